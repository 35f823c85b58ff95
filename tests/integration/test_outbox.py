"""The tracker outbox on a real redis-server and a local fake GitHub: events written with their ledger
transitions only, delivered idempotently (one comment per dispatch and event), retried, parked."""

from __future__ import annotations

import json

import pytest

from factory_worker.config.settings import load_settings
from factory_worker.ledger.core import Ledger
from factory_worker.ledger.keys import Keys
from factory_worker.writeback.events import Event, marker
from factory_worker.writeback.github import GitHubWriter
from factory_worker.writeback.outbox import GROUP, OutboxSender, backlog
from tests.conftest import roomy_fleet
from tests.fake_github import FakeGitHub
from tests.support import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def gh():
    with FakeGitHub() as fake:
        yield fake


@pytest.fixture
def settings(gh, namespace):
    return load_settings(
        namespace=namespace,
        source={"kind": "github", "github_repo": gh.repo, "github_api_url": gh.url, "github_labels": ["agent"]},
        tracker={"write_back": True, "max_attempts": 3, "backoff_base_s": 0, "takeover_s": 0.2},
    )


@pytest.fixture
def ledger(real_redis, settings):
    roomy_fleet(real_redis, Keys(settings.namespace))
    return Ledger.from_settings(settings, real_redis)


def sender(real_redis, settings, consumer="w1", clock=None):
    kw = {"clock": clock} if clock else {}
    return OutboxSender(
        real_redis,
        Keys(settings.namespace),
        settings.tracker,
        GitHubWriter(settings.source, settings.tracker),
        consumer,
        **kw,
    )


def events(real_redis, keys):
    return [(f["event"], f["issue"]) for _, f in real_redis.xrange(keys.outbox)]


def test_each_transition_writes_its_event_and_only_then(real_redis, ledger, settings):
    k = ledger.keys
    a, b, c, d = (ledger.claim([i]).claims[0] for i in "1234")
    assert events(real_redis, k) == []  # a claim is not news: its agent may never start
    ledger.begin("1", a.token, "t1")
    ledger.complete("1", a.token)
    ledger.begin("2", b.token, "t2")
    ledger.fail("2", b.token, "exit 1")
    ledger.release("3", c.token, reason="send-failed")  # never started: nothing was announced, nothing to take back
    ledger.begin("4", d.token, "t4")
    ledger.release("4", d.token, reason="interrupted")
    ledger.retry("2")
    assert events(real_redis, k) == [
        ("dispatched", "1"),
        ("done", "1"),
        ("dispatched", "2"),
        ("backoff", "2"),
        ("dispatched", "4"),
        ("released", "4"),
        ("retried", "2"),
    ]
    off = Ledger(real_redis, Keys("other"), settings.dispatch)  # write-back off: no outbox at all
    roomy_fleet(real_redis, Keys("other"))
    e = off.claim(["9"]).claims[0]
    off.begin("9", e.token, "t9")
    off.complete("9", e.token)
    assert not real_redis.exists(Keys("other").outbox)


def test_delivery_sets_labels_and_posts_one_comment_per_event(real_redis, ledger, settings, gh):
    for n in (1, 2):
        gh.add(n, f"issue {n}")
    a = ledger.claim(["1"]).claims[0]
    ledger.begin("1", a.token, "t1")
    s = sender(real_redis, settings)
    assert s.drain().delivered == 1
    assert gh.issues[1].labels == {"agent", "factory:working"}
    ledger.complete("1", a.token)
    b = ledger.claim(["2"]).claims[0]
    ledger.begin("2", b.token, "t2-0")
    for attempt in range(1, 4):  # parked at the dispatch's max_attempts (3)
        res = ledger.fail("2", b.token, "exit 1")
        if res.state == "parked":
            break
        real_redis.zadd(ledger.keys.backoff, {"2": 0})  # its backoff window is over
        b = ledger.claim(["2"]).claims[0]
        ledger.begin("2", b.token, f"t2-{attempt}")
    assert res.state == "parked"
    report = s.drain()
    assert report.parked == 0 and backlog(real_redis, ledger.keys) == {"pending": 0, "parked": 0}
    assert gh.issues[1].labels == {"agent", "factory:done"}
    assert gh.issues[2].labels == {"agent", "factory:parked"}
    assert len(gh.issues[1].comments) == 2 and "**done**" in gh.issues[1].comments[1]
    kinds = [c.split("**")[1] for c in gh.issues[2].comments]  # one comment per (dispatch, event)
    assert kinds == ["dispatched", "backoff", "dispatched", "backoff", "dispatched", "parked"]
    assert "exit 1" in gh.issues[2].comments[-1]
    ledger.retry("2")
    s.drain()
    assert gh.issues[2].labels == {"agent"}


def test_a_delivery_repeated_after_a_crash_does_not_comment_twice(real_redis, ledger, settings, gh):
    import time

    gh.add(1, "one")
    a = ledger.claim(["1"]).claims[0]
    ledger.begin("1", a.token, "t1")
    sender(real_redis, settings, consumer="dead")._ensure_group()
    ((_, [(entry_id, raw)]),) = real_redis.xreadgroup(GROUP, "dead", {ledger.keys.outbox: ">"}, count=10)
    writer = GitHubWriter(settings.source, settings.tracker)
    writer.deliver(Event.from_entry(entry_id, raw))  # posted, then the worker "died" before the ack
    time.sleep(settings.tracker.takeover_s + 0.1)
    assert sender(real_redis, settings, consumer="alive").drain().delivered == 1  # delivered again...
    assert len(gh.issues[1].comments) == 1  # ...but seen once on the tracker
    assert marker(Event.from_entry(entry_id, raw)) in gh.issues[1].comments[0]


def test_marker_found_on_a_later_comments_page(real_redis, ledger, settings, gh):
    issue = gh.add(1, "one")
    gh.comments_per_page = 2
    a = ledger.claim(["1"]).claims[0]
    ledger.begin("1", a.token, "t1")
    entry_id, raw = real_redis.xrange(ledger.keys.outbox)[0]
    for body in ["x", "y", "z", "w", "posted " + marker(Event.from_entry(entry_id, raw))]:
        gh.comment(1, body)
    GitHubWriter(settings.source, settings.tracker).deliver(Event.from_entry(entry_id, raw))  # not fresh
    assert len(issue.comments) == 5


def test_a_busy_issue_gets_one_comment_per_event_in_a_few_requests(real_redis, ledger, settings, gh):
    """An issue with 2,050 comments from others; the dispatched comment's answer is lost once. The sender's
    retry finds the comment among those written since the event (one page), and never posts it twice."""
    import time

    issue = gh.add(1, "busy")
    for n in range(2050):
        gh.comment(1, f"+1 ({n})", at=time.time() - 3600 + n)
    now = [1_000.0]
    s = sender(real_redis, settings, clock=lambda: now[0])
    a = ledger.claim(["1"]).claims[0]
    ledger.begin("1", a.token, "t1")
    gh.lose("POST", "/comments", every=1)
    assert s.drain().retried == 1  # posted; the answer lost
    gh.losses.clear()
    now[0] += 60
    assert s.drain().delivered == 1
    ledger.complete("1", a.token)
    assert s.drain().delivered == 1
    kinds = [c.split("**")[1] for c in issue.comments[2050:]]
    lists = [p for m, p in gh.requests if m == "GET" and p.endswith("/comments")]
    print(f"\nbusy issue: {len(lists)} comment list requests for 3 deliveries, comments {kinds}")
    assert kinds == ["dispatched", "done"] and len(lists) == 1


def _started_with_a_failing_label(real_redis, ledger, settings, gh):
    """Issue 1 started (its ``dispatched`` event written), the next label POST answered 502; a sender on a
    settable clock (``now[0]``) with a 1 s backoff. Returns (now, sender, claim)."""
    gh.add(1, "one")
    now = [1_000.0]
    s = sender(real_redis, settings, clock=lambda: now[0])
    s.cfg = settings.tracker.model_copy(update={"backoff_base_s": 1.0})
    a = ledger.claim(["1"]).claims[0]
    ledger.begin("1", a.token, "t1")
    gh.fail("POST", "/labels", 502)
    return now, s, a


def test_5xx_and_429_are_retried_after_their_wait_then_delivered_once(real_redis, ledger, settings, gh):
    now, s, a = _started_with_a_failing_label(real_redis, ledger, settings, gh)
    assert s.drain().retried == 1
    assert s.drain().delivered == 0  # its backoff (1 s) has not passed
    now[0] += 1.1
    gh.fail("POST", "/labels", 429, headers={"Retry-After": "30"})
    assert s.drain().retried == 1
    now[0] += 10
    assert s.drain().delivered == 0  # Retry-After 30 s is honoured
    now[0] += 25
    assert s.drain().delivered == 1
    assert len(gh.issues[1].comments) == 1 and gh.issues[1].labels == {"agent", "factory:working"}


def test_an_event_retried_after_a_newer_one_comments_but_leaves_the_labels_to_it(real_redis, ledger, settings, gh):
    """dispatched fails and backs off; meanwhile done is delivered; dispatched's retry must not put the
    working label back on a done issue (found by the SIGKILL e2e under load)."""
    now, s, a = _started_with_a_failing_label(real_redis, ledger, settings, gh)
    assert s.drain().retried == 1  # dispatched backs off for 1 s
    ledger.complete("1", a.token)
    assert s.drain().delivered == 1  # done goes first
    assert gh.issues[1].labels == {"agent", "factory:done"}
    now[0] += 1.1
    assert s.drain().delivered == 1  # dispatched, late: its comment, not its label
    assert gh.issues[1].labels == {"agent", "factory:done"}
    assert [c.split("**")[1] for c in gh.issues[1].comments] == ["done", "dispatched"]


def _drain_until_empty(real_redis, keys, senders, now):
    for _ in range(50):
        for s in senders:
            s.drain()
        now[0] += 60  # past every backoff
        if backlog(real_redis, keys)["pending"] == 0:
            return
    raise AssertionError(f"the outbox did not empty: {backlog(real_redis, keys)}")


def test_labels_end_as_the_ledger_ended_when_no_label_write_is_answered(real_redis, ledger, settings, gh):
    """GitHub applies every label write and every answer is lost. Done, parked, failed-then-done and a
    late (superseded) dispatched: a final read of each issue's labels shows what the ledger ended with."""
    for n in (1, 2, 3, 4):
        gh.add(n, f"issue {n}")
    for method in ("POST", "DELETE"):
        gh.lose(method, "/labels")
    now = [1_000.0]
    s = sender(real_redis, settings, clock=lambda: now[0])
    a = ledger.claim(["1"]).claims[0]
    ledger.begin("1", a.token, "t1")
    s.drain()
    ledger.complete("1", a.token)
    b = ledger.claim(["2"]).claims[0]
    for attempt in range(3):  # parked at the dispatch's max_attempts (3)
        ledger.begin("2", b.token, f"t2-{attempt}")
        if ledger.fail("2", b.token, "exit 1").state == "parked":
            break
        real_redis.zadd(ledger.keys.backoff, {"2": 0})
        b = ledger.claim(["2"]).claims[0]
    c = ledger.claim(["3"]).claims[0]
    ledger.begin("3", c.token, "t3")
    ledger.fail("3", c.token, "exit 1")
    real_redis.zadd(ledger.keys.backoff, {"3": 0})
    c = ledger.claim(["3"]).claims[0]
    ledger.begin("3", c.token, "t3b")
    ledger.complete("3", c.token)
    d = ledger.claim(["4"]).claims[0]
    ledger.begin("4", d.token, "t4")
    gh.fail("POST", "/issues/4/comments", 502)  # dispatched fails; done goes first, dispatched comes late
    s.drain()
    ledger.complete("4", d.token)
    _drain_until_empty(real_redis, ledger.keys, [s], now)
    assert {n: gh.labels_of(n) for n in gh.issues} == {
        1: {"agent", "factory:done"},
        2: {"agent", "factory:parked"},
        3: {"agent", "factory:done"},
        4: {"agent", "factory:done"},
    }
    assert backlog(real_redis, ledger.keys) == {"pending": 0, "parked": 0}
    assert [c.split("**")[1] for c in gh.issues[4].comments] == ["dispatched", "done"]


def test_two_senders_delivering_one_issue_at_once_end_with_the_newest_labels(real_redis, ledger, settings, gh):
    """Sender A delivers dispatched and GitHub is slow to apply its label; meanwhile the issue is done and
    sender B delivers that: A's working label lands after B took it off. A looks again after its delivery
    and writes done's labels once more."""
    import threading

    gh.add(1, "one")
    a_sender, b_sender = sender(real_redis, settings, "A"), sender(real_redis, settings, "B")
    a = ledger.claim(["1"]).claims[0]
    ledger.begin("1", a.token, "t1")
    gh.hold("POST", "/issues/1/labels", 1.5)  # the working label lands 1.5 s after it was sent
    reports = []
    t = threading.Thread(target=lambda: reports.append(a_sender.drain()))
    t.start()
    try:
        wait_until(lambda: gh.holds[0]["times"] == 0, 5, what="A's label write on its way")
        ledger.complete("1", a.token)
        assert b_sender.drain().delivered == 1  # done, while A's write is still on its way
    finally:
        t.join(10)
    assert gh.labels_of(1) == {"agent", "factory:done"}
    assert (reports[0].delivered, reports[0].settled) == (1, 1)
    assert sorted(c.split("**")[1] for c in gh.issues[1].comments) == ["dispatched", "done"]


def test_an_event_taken_over_mid_delivery_comments_once_and_its_late_label_is_undone(real_redis, ledger, settings, gh):
    """Sender A reads dispatched and its label write hangs past ``takeover_s``: sender B takes the event over
    and delivers it, then done. A's working label lands last, and A's delivery then fails (GitHub 502 on the
    comments): A neither comments twice (its event is no longer fresh) nor leaves the working label on."""
    import threading
    import time

    gh.add(1, "one")
    a_sender, b_sender = sender(real_redis, settings, "A"), sender(real_redis, settings, "B")
    a = ledger.claim(["1"]).claims[0]
    ledger.begin("1", a.token, "t1")
    gh.hold("POST", "/issues/1/labels", 1.5)
    t = threading.Thread(target=a_sender.drain)
    t.start()
    try:
        wait_until(lambda: gh.holds[0]["times"] == 0, 5, what="A's label write on its way")
        time.sleep(settings.tracker.takeover_s + 0.1)
        assert b_sender.drain().delivered == 1  # B took dispatched over
        ledger.complete("1", a.token)
        assert b_sender.drain().delivered == 1  # and done
        gh.fail("GET", "/issues/1/comments", 502)  # A's look for its comment
    finally:
        t.join(10)
    assert gh.labels_of(1) == {"agent", "factory:done"}
    assert [c.split("**")[1] for c in gh.issues[1].comments] == ["dispatched", "done"]
    assert not real_redis.hlen(ledger.keys.outbox_retry)  # A's failure of an entry B delivered: no retry left
    assert backlog(real_redis, ledger.keys) == {"pending": 0, "parked": 0}


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_three_senders_lost_answers_and_slow_writes_end_with_the_ledgers_labels(real_redis, ledger, settings, gh, seed):
    """Three sender threads (three workers) deliver while issues start and end; every third write's answer is
    lost after it was applied and some label writes land late. Every done issue ends done, never working."""
    import random
    import threading
    import time

    rnd = random.Random(seed)
    for n in range(1, 13):
        gh.add(n, f"issue {n}")
    for method in ("POST", "DELETE"):
        gh.lose(method, "/", every=3)
    cfg = settings.tracker.model_copy(
        update={"max_attempts": 30, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 1.0}
    )
    stop = threading.Event()

    def deliver(name):
        s = OutboxSender(real_redis, ledger.keys, cfg, GitHubWriter(settings.source, cfg), name)
        while not stop.is_set():
            s.drain()
            time.sleep(0.01)

    threads = [threading.Thread(target=deliver, args=(f"w{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        todo, running = [str(n) for n in range(1, 13)], {}
        while todo or running:
            if rnd.random() < 0.3:
                gh.hold("POST", "/labels", rnd.random() * 0.3)  # this label lands late
            if rnd.random() < 0.5 and todo and len(running) < 3:
                issue = todo.pop(0)
                claim = ledger.claim([issue]).claims[0]
                ledger.begin(issue, claim.token, f"t{issue}")
                running[issue] = claim.token
            elif running:
                issue = rnd.choice(sorted(running))
                ledger.complete(issue, running.pop(issue))
            time.sleep(rnd.random() * 0.05)
        wait_until(lambda: backlog(real_redis, ledger.keys)["pending"] == 0, 60, what="the outbox delivered")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    labels = {n: gh.labels_of(n) - {"agent"} for n in gh.issues}
    assert labels == {n: {"factory:done"} for n in gh.issues}
    assert backlog(real_redis, ledger.keys) == {"pending": 0, "parked": 0}


def test_poison_events_are_parked_with_their_error(real_redis, ledger, settings, gh):
    a = ledger.claim(["404"]).claims[0]  # no such issue on the tracker: permanent
    ledger.begin("404", a.token, "t")
    gh.add(5, "five")
    b = ledger.claim(["5"]).claims[0]
    ledger.begin("5", b.token, "t5")
    gh.fail("POST", "/issues/5/labels", 503, times=10)
    now = [1_000.0]
    s = sender(real_redis, settings, clock=lambda: now[0])
    parked = 0
    for _ in range(5):
        parked += s.drain().parked
        now[0] += 60
    assert parked == 2
    rows = {k: json.loads(v) for k, v in real_redis.hgetall(ledger.keys.outbox_parked).items()}
    assert sorted((r["issue"], r["attempts"]) for r in rows.values()) == [("404", 1), ("5", 3)]
    assert all("HTTP" in r["error"] for r in rows.values())
    assert backlog(real_redis, ledger.keys) == {"pending": 0, "parked": 2}


def test_a_dead_senders_pending_event_is_taken_over(real_redis, ledger, settings, gh):
    import time

    gh.add(1, "one")
    a = ledger.claim(["1"]).claims[0]
    ledger.begin("1", a.token, "t1")
    dead = sender(real_redis, settings, consumer="dead")
    dead._ensure_group()
    real_redis.xreadgroup(GROUP, "dead", {ledger.keys.outbox: ">"}, count=10)  # read, never acknowledged
    time.sleep(settings.tracker.takeover_s + 0.1)
    assert sender(real_redis, settings, consumer="alive").drain().delivered == 1
    assert len(gh.issues[1].comments) == 1 and real_redis.xlen(ledger.keys.outbox) == 0


def test_a_lost_stream_and_group_are_made_again(real_redis, ledger, settings, gh):
    gh.add(1, "one")
    s = sender(real_redis, settings)
    s.drain()
    real_redis.delete(ledger.keys.outbox)  # an emptied Redis takes the consumer group with it
    with pytest.raises(Exception, match="NOGROUP"):
        s.drain()
    a = ledger.claim(["1"]).claims[0]
    ledger.begin("1", a.token, "t1")
    assert s.drain().delivered == 1
