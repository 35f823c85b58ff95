"""Tracker write-back end to end: a real worker and beat over a (fake) GitHub repository, the outbox
delivered by the workers: labels end right for done and parked issues, and a worker SIGKILLed between a
comment's POST and its acknowledgement does not make it appear twice."""

from __future__ import annotations

import json
import re
import signal
import time
from collections import Counter

import pytest

from factory_worker.ledger.core import Ledger
from factory_worker.writeback.outbox import backlog
from tests.fake_github import FakeGitHub
from tests.support import CeleryProc, assert_audit_clean, ctl, read_events, settings_from, stack_env, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.chaos]


@pytest.fixture
def gh():
    with FakeGitHub() as fake:
        yield fake


def _env(redis_url, namespace, tmp_path, gh, **extra):
    return stack_env(
        redis_url,
        namespace,
        tmp_path,
        AGENT_SLEEP="0.2",
        FACTORY_SOURCE__KIND="github",
        FACTORY_SOURCE__GITHUB_REPO=gh.repo,
        FACTORY_SOURCE__GITHUB_API_URL=gh.url,
        FACTORY_SOURCE__GITHUB_LABELS=json.dumps(["agent"]),
        FACTORY_TRACKER__WRITE_BACK="true",
        FACTORY_TRACKER__POLL_S="0.2",
        FACTORY_TRACKER__TAKEOVER_S="2",
        FACTORY_TRACKER__BACKOFF_BASE_S="0.2",
        FACTORY_DISPATCH__MAX_ATTEMPTS="2",
        # a run whose worker is SIGKILLed holds the loop lease until it expires (default 60 s)
        FACTORY_LOOP__LEASE_TTL_S="5",
        **extra,
    )


def _settled(ledger: Ledger, n: int) -> bool:
    g = ledger.gauges()
    return g["done"] + g["parked"] == n and backlog(ledger.r, ledger.keys)["pending"] == 0


def _fleet(env, tmp_path, procs, real_redis, concurrency: int) -> Ledger:
    """One worker (``-c concurrency``) and beat, started; the ledger they write."""
    worker = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", str(concurrency)])
    procs.append(worker)
    worker.wait_ready()
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    return Ledger.from_settings(settings_from(env), real_redis)


def test_labels_end_right_for_done_and_parked_issues(redis_url, real_redis, namespace, tmp_path, procs, gh):
    for n in (1, 2, 3):
        gh.add(n, f"issue {n}")
    gh.add(4, "always fails", ("agent", "always-fails"))
    gh.add(5, "fails once", ("agent", "fails-once"))
    env = _env(redis_url, namespace, tmp_path, gh)
    ledger = _fleet(env, tmp_path, procs, real_redis, 3)
    wait_until(lambda: _settled(ledger, 5), 60, what="every issue settled and reported")
    labels = {n: gh.issues[n].labels - {"agent", "always-fails", "fails-once"} for n in gh.issues}
    assert labels == {
        1: {"factory:done"},
        2: {"factory:done"},
        3: {"factory:done"},
        4: {"factory:parked"},
        5: {"factory:done"},
    }
    kinds = [c.split("**")[1] for c in gh.issues[5].comments]
    assert kinds == ["dispatched", "backoff", "dispatched", "done"]
    assert backlog(real_redis, ledger.keys) == {"pending": 0, "parked": 0}
    # retried: the parked label goes, the issue is ready again, runs (and, always failing, parks again)
    assert ctl(env, "retry", "4").returncode == 0
    wait_until(
        lambda: ("DELETE", f"/repos/{gh.repo}/issues/4/labels/factory%3Aparked") in gh.requests,
        30,
        what="the parked label removed on retry",
    )
    wait_until(
        lambda: (
            len([c for c in gh.issues[4].comments if "**parked**" in c]) == 2
            and backlog(real_redis, ledger.keys)["pending"] == 0
        ),
        60,
        what="parked again after its new attempts",
    )
    assert gh.issues[4].labels - {"agent", "always-fails"} == {"factory:parked"}
    assert_audit_clean(redis_url, namespace)


def test_a_sender_killed_between_post_and_ack_posts_each_comment_once(
    redis_url, real_redis, namespace, tmp_path, procs, gh
):
    for n in range(1, 5):
        gh.add(n, f"issue {n}")
    gh.delay_comment_s = 3.0  # GitHub stores the comment, then the 201 takes 3 s: the kill lands in between
    env = _env(redis_url, namespace, tmp_path, gh)
    doomed = CeleryProc("worker", env, tmp_path, "doomed", extra=["-c", "2"])
    procs.append(doomed)
    doomed.wait_ready()
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    wait_until(lambda: any(i.comments for i in gh.issues.values()), 30, what="a comment posted")
    doomed.signal(signal.SIGKILL)  # inside the 3 s: posted on the tracker, never acknowledged in the outbox
    doomed.proc.wait(10)
    killed_at = time.monotonic()
    gh.delay_comment_s = 0.0
    survivor = CeleryProc("worker", env, tmp_path, "survivor", extra=["-c", "2"])
    procs.append(survivor)
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    wait_until(lambda: _settled(ledger, 4), 60, what="every issue done and reported")
    markers = Counter(
        m for i in gh.issues.values() for c in i.comments for m in re.findall(r"<!-- factory-worker:(\S+) -->", c)
    )
    twice = {m: n for m, n in markers.items() if n > 1}
    print(
        f"\nwrite-back after SIGKILL between POST and ack: {sum(markers.values())} comments, "
        f"{len(twice)} posted twice, settled {time.monotonic() - killed_at:.1f}s after the kill"
    )
    assert not twice, f"comments posted twice: {twice}"
    assert all("factory:done" in i.labels and "factory:working" not in i.labels for i in gh.issues.values())
    assert_audit_clean(redis_url, namespace)


def test_with_write_back_an_emptied_ledger_reruns_no_done_issue(redis_url, real_redis, namespace, tmp_path, procs, gh):
    """The tracker is the second record of done: after the ledger is lost and accepted, issues labelled
    done are not ready, so none runs again."""
    for n in (1, 2, 3):
        gh.add(n, f"issue {n}")
    env = _env(redis_url, namespace, tmp_path, gh)
    ledger = _fleet(env, tmp_path, procs, real_redis, 2)
    wait_until(lambda: _settled(ledger, 3), 60, what="every issue done and reported")
    real_redis.flushall()  # the ledger is lost (restart without persistence, failover to a stale replica...)
    time.sleep(3)  # the loop polls: the done issues carry the done label, so nothing is even a candidate
    gh.add(4, "new work")  # a candidate: claiming it reveals the loss (safe mode) until an operator accepts
    wait_until(
        lambda: json.loads(ctl(env, "loop-status", "--json").stdout)["ledger_lost"],
        30,
        what="safe mode (the loss reported)",
    )
    res = ctl(env, "ledger", "accept", "--json")
    wait_until(lambda: ledger.explain("4").state == "done", 40, what="new work done after the loss")
    starts = Counter(e["issue"] for e in read_events(tmp_path / "out") if e["event"] == "start")
    assert starts == Counter({"1": 1, "2": 1, "3": 1, "4": 1}), f"a done issue ran again: {starts}"
    assert res.returncode == 0


def test_labels_end_as_the_ledger_ended_when_no_label_write_is_answered(
    redis_url, real_redis, namespace, tmp_path, procs, gh
):
    """Every label write is applied by GitHub and its answer lost; two workers (two senders) deliver. In the
    end every done issue carries the done label and not the working label, the parked one the parked label,
    as a final read of every issue's labels says."""
    for n in range(1, 10):
        gh.add(n, f"issue {n}")
    gh.add(10, "fails once", ("agent", "fails-once"))
    gh.add(11, "fails once too", ("agent", "fails-once"))
    gh.add(12, "always fails", ("agent", "always-fails"))
    for method in ("POST", "DELETE"):
        gh.lose(method, "/labels")
    env = _env(redis_url, namespace, tmp_path, gh, FACTORY_TRACKER__MAX_ATTEMPTS="3")
    ledger = _fleet(env, tmp_path, procs, real_redis, 3)
    procs.append(CeleryProc("worker", env, tmp_path, "w2", extra=["-c", "3"]))
    wait_until(lambda: _settled(ledger, 12), 120, what="every issue settled and reported")
    labels = {n: gh.labels_of(n) - {"agent", "fails-once", "always-fails"} for n in gh.issues}
    lost = sum(1 for m, p in gh.requests if m in ("POST", "DELETE") and "/labels" in p)
    print(f"\nlabels after {lost} label writes, every answer lost: {labels}; outbox {backlog(real_redis, ledger.keys)}")
    assert labels == {**{n: {"factory:done"} for n in range(1, 12)}, 12: {"factory:parked"}}
    assert backlog(real_redis, ledger.keys) == {"pending": 0, "parked": 0}
