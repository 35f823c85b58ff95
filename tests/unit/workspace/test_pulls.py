"""One pull request per issue on a fake GitHub (documented fields and status codes) that loses answers."""

from __future__ import annotations

import httpx
import pytest

from factory_worker.workspace.pulls import PullRequestError, PullRequests
from tests.fake_github import FakeGitHub

CLIENT = httpx.Client(timeout=5, follow_redirects=False)  # one client: an SSL context costs ~20 ms to build


@pytest.fixture
def gh():
    with FakeGitHub("acme/widgets") as fake:
        yield fake


def prs(gh: FakeGitHub, tries: int = 5) -> PullRequests:
    """A new client object each time (a new attempt knows nothing of the last one but what GitHub says)."""
    return PullRequests(gh.url, "acme/widgets", "tok", tries=tries, client=CLIENT, sleep=lambda s: None)


def test_created_once_then_updated(gh):
    first = prs(gh).ensure("factory/1", "main", "Fix 1", "body one")
    assert first.created and gh.pulls[first.number].title == "Fix 1"
    again = prs(gh).ensure("factory/1", "main", "Fix 1 (better)", "body two")
    assert (again.number, again.created, again.updated) == (first.number, False, True)
    assert len(gh.open_pulls()) == 1 and gh.pulls[first.number].body == "body two"
    same = prs(gh).ensure("factory/1", "main", "Fix 1 (better)", "body two")
    assert not same.updated and gh.pulls[first.number].updates == 1  # nothing to change: no PATCH
    assert ("GET", "/repos/acme/widgets/pulls") in gh.requests


@pytest.mark.parametrize("methods", [None, {"POST"}, {"PATCH"}])
def test_exactly_once_with_every_third_answer_lost(gh, methods):
    gh.drop_every, gh.drop_methods = 3, methods
    for round_ in range(2):  # the second round is a later attempt: it updates
        for n in range(10):
            prs(gh).ensure(f"factory/{n}", "main", f"t{n} r{round_}", f"b{n} r{round_}")
    assert gh.dropped >= 3
    for n in range(10):
        open_ = gh.open_pulls(f"factory/{n}")
        assert len(open_) == 1, (n, open_)
        assert open_[0].title == f"t{n} r1"
    assert len(gh.pulls) == 10


def test_every_create_answer_lost(gh):
    gh.drop_every, gh.drop_methods = 1, {"POST"}
    pr = prs(gh).ensure("factory/x", "main", "t", "b")
    assert not pr.created  # created by the lost POST, found by the next find
    assert len(gh.pulls) == 1


def test_a_lost_answer_then_a_new_process_finds_it(gh):
    """SIGKILL between GitHub's 201 and reading it: the next attempt (a new client) finds, not creates."""
    gh.drop_every, gh.drop_methods = 1, {"POST"}
    with pytest.raises(PullRequestError, match="gave up after 1 tries"):
        prs(gh, tries=1).ensure("factory/y", "main", "t", "b")
    gh.drop_every = 0
    pr = prs(gh).ensure("factory/y", "main", "t2", "b2")
    assert not pr.created and pr.updated and len(gh.pulls) == 1


def test_a_branch_github_does_not_have_is_refused_and_reported(gh):
    gh.branches = lambda b: b == "factory/pushed"
    with pytest.raises(PullRequestError, match="422 Validation Failed"):
        prs(gh, tries=2).ensure("factory/not-pushed", "main", "t", "b")
    assert not gh.pulls


def test_permanent_and_transient_errors(gh):
    with pytest.raises(PullRequestError, match="404") as exc:
        PullRequests(gh.url, "acme/other", "tok", client=CLIENT, sleep=lambda s: None).ensure(
            "factory/1", "main", "t", "b"
        )
    assert exc.value.permanent
    gh.fail("GET", "/pulls", 503, times=2)
    gh.fail("POST", "/pulls", 500, times=1)
    pr = prs(gh).ensure("factory/2", "main", "t", "b")
    assert pr.created and len(gh.pulls) == 1


def test_the_token_goes_to_the_api_only_as_a_header(gh):
    seen = []

    def hook(request: httpx.Request) -> None:
        seen.append((str(request.url), request.headers.get("authorization")))

    client = httpx.Client(event_hooks={"request": [hook]}, follow_redirects=False)
    PullRequests(gh.url, "acme/widgets", "s3cret", client=client).ensure("factory/3", "main", "t", "b")
    assert seen and all(auth == "Bearer s3cret" and "s3cret" not in url for url, auth in seen)
    assert all(url.startswith(gh.url) for url, _ in seen)


@pytest.mark.parametrize(
    "status, headers, slept",
    [
        (429, {"Retry-After": "4"}, 4.0),
        (403, {"Retry-After": "3"}, 3.0),  # a secondary rate limit: retried, not permanent
        (403, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "99999999999"}, 30.0),  # at most MAX_WAIT_S
        (503, {"Retry-After": "2"}, 2.0),
        (502, {}, 0.25),  # no ask: the backoff's first window
    ],
)
def test_a_retry_waits_as_github_asks_at_most_max_wait(gh, status, headers, slept):
    sleeps: list[float] = []
    gh.fail("GET", "/pulls", status, headers=headers)
    p = PullRequests(gh.url, "acme/widgets", "tok", client=CLIENT, sleep=sleeps.append)
    assert p.ensure("factory/9", "main", "t", "b").created
    assert sleeps == [pytest.approx(slept, abs=1)]
