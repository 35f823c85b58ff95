"""The GitHub write-back (``tracker.GitHubWriter``) against the local GitHub fake (``tests/fake_github.py``):
a slow GitHub, 5xx and 429, and the marker that keeps a retried event to one comment."""

from __future__ import annotations

import email.utils
import re
import time

import pytest

from factory_worker.config.settings import load_settings
from factory_worker.writeback.events import DeliveryError, Event, marker
from factory_worker.writeback.github import GitHubWriter
from tests.fake_github import FakeGitHub


@pytest.fixture
def gh():
    with FakeGitHub("acme/widgets") as fake:
        yield fake


def writer(gh: FakeGitHub, timeout_s: float = 5.0) -> GitHubWriter:
    s = load_settings(
        source={
            "kind": "github",
            "github_repo": "acme/widgets",
            "github_api_url": gh.base_url,
            "github_labels": ["agent"],
        },
        tracker={"write_back": True, "timeout_s": timeout_s},
    )
    return GitHubWriter(s.source, s.tracker)  # its own client: the timeout is tracker.timeout_s


def done(issue: str = "7") -> Event:
    return Event("1-0", "done", issue, "3:abc.0", {})


def test_a_timed_out_comment_is_retried_and_posted_once(gh):
    issue = gh.add(7, "t", labels=("agent", "factory:working"))
    w = writer(gh, timeout_s=0.3)
    gh.delay_comment_s = 1.0  # GitHub stores the comment; its 201 comes after the client gave up
    with pytest.raises(DeliveryError) as slow:
        w.deliver(done())
    assert not slow.value.permanent and len(issue.comments) == 1
    gh.delay_comment_s = 0.0
    w.deliver(done())  # the outbox's retry: the marker is found, no second comment; the labels are set
    assert len(issue.comments) == 1 and marker(done()) in issue.comments[0]
    assert "factory:done" in issue.labels and "factory:working" not in issue.labels


def test_server_errors_and_rate_limits_are_retried_later_never_parked(gh):
    issue = gh.add(7, "t")
    w = writer(gh)
    gh.fail("POST", "/comments", 502)
    with pytest.raises(DeliveryError) as busy:
        w.deliver(done())
    assert not busy.value.permanent
    gh.fail("GET", "/comments", 429, headers={"Retry-After": "7"})
    with pytest.raises(DeliveryError) as limited:
        w.deliver(done())
    assert limited.value.retry_after == 7 and not limited.value.permanent
    w.deliver(done())
    assert len(issue.comments) == 1


def _http_date(value: str) -> str:
    """``date+N``: the HTTP date N seconds from now (made when the test runs, not when it is collected)."""
    if not value.startswith("date+"):
        return value
    return email.utils.formatdate(time.time() + float(value[5:]), usegmt=True)


@pytest.mark.parametrize(
    "status, headers, wait",
    [
        (429, {"Retry-After": "inf"}, 300),  # the source's cap (github_max_retry_after_s), not for ever
        (429, {"Retry-After": "date+120"}, 120),  # an HTTP date, 120 s from now
        (403, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(time.time()) + 3600)}, 300),
        (403, {"Retry-After": "9"}, 9),  # a secondary rate limit
        (429, {}, 60),  # a rate limit that says nothing: GitHub's minute, as the source waits
    ],
)
def test_a_rate_limit_is_read_as_the_source_reads_it(gh, status, headers, wait):
    gh.add(7, "t")
    headers = {k: _http_date(v) for k, v in headers.items()}
    gh.fail("GET", "/comments", status, headers=headers)
    with pytest.raises(DeliveryError) as limited:
        writer(gh).deliver(done())
    assert limited.value.retry_after == pytest.approx(wait, abs=2)
    assert not limited.value.permanent and limited.value.status == status


def test_an_issue_github_does_not_have_is_a_permanent_failure(gh):
    with pytest.raises(DeliveryError) as gone:
        writer(gh).deliver(done("404"))
    assert gone.value.permanent


def _comment_lists(gh: FakeGitHub) -> list[dict]:
    return [q for m, p, q in gh.queries if m == "GET" and p.endswith("/comments")]


def test_a_lost_comment_answer_on_a_busy_issue_posts_once_reading_one_page(gh):
    """2,050 comments from others before the event, 500 after the factory's: the retry of an event whose
    comment answer was lost finds that comment on the first page of the comments since the event (GitHub
    lists an issue's comments oldest first and takes only ``since``, ``per_page``, ``page``)."""
    issue = gh.add(7, "busy")
    now = time.time()
    for n in range(2050):
        gh.comment(7, f"me too {n}", at=now - 86400 + n)
    ev = Event("1-0", "dispatched", "7", "3:abc.0", {"at_ms": str(int(now * 1000)), "attempt": "1"})
    gh.lose("POST", "/comments", every=1)  # GitHub stores the comment; the answer never comes
    w = writer(gh)
    with pytest.raises(DeliveryError):
        w.deliver(ev)
    gh.losses.clear()
    for n in range(500):
        gh.comment(7, f"flood {n}")
    before = len(_comment_lists(gh))
    w.deliver(ev)  # the outbox's retry
    assert sum(marker(ev) in c for c in issue.comments) == 1
    lists = _comment_lists(gh)[before:]
    assert len(lists) == 1, f"{len(lists)} list requests for one delivery"
    assert set(lists[0]) <= {"since", "per_page", "page"}  # what issues/list-comments documents


def test_a_fresh_event_posts_without_listing_comments(gh):
    gh.add(7, "t")
    writer(gh).deliver(Event("1-0", "done", "7", "3:abc.0", {}, fresh_until=time.monotonic() + 60))
    assert _comment_lists(gh) == [] and len(gh.issues[7].comments) == 1


def test_the_marker_carries_a_dispatch_id_not_the_token(gh):
    issue = gh.add(7, "t")
    token = "3:0123456789abcdef0123456789abcdef.0"
    w = writer(gh)
    w.deliver(Event("1-0", "dispatched", "7", token, {}))
    w.deliver(Event("1-0", "dispatched", "7", token, {}))  # a retry of the same event: the same marker
    assert len(issue.comments) == 1
    body = issue.comments[0]
    assert token not in body and token.split(":")[1].split(".")[0] not in body
    marks = re.findall(r"<!-- factory-worker:(\S+) -->", body)
    assert marks and marks[0].startswith("3-") and marks[0].endswith(":dispatched")
    # a lost ledger starts the fences again: another dispatch with fence 3 comments again
    w.deliver(Event("2-0", "dispatched", "7", "3:fedcba9876543210fedcba9876543210.0", {}))
    assert len(issue.comments) == 2
