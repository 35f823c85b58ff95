"""The GitHub write-back (``tracker.GitHubWriter``) against the local GitHub fake (``tests/fake_github.py``):
a slow GitHub, 5xx and 429, and the marker that keeps a retried event to one comment."""

from __future__ import annotations

import pytest

from factory_worker.config.settings import load_settings
from factory_worker.writeback.github import GitHubWriter, marker
from factory_worker.writeback.outbox import DeliveryError, Event
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


def test_an_issue_github_does_not_have_is_a_permanent_failure(gh):
    with pytest.raises(DeliveryError) as gone:
        writer(gh).deliver(done("404"))
    assert gone.value.permanent
