"""End to end: real redis-server, real `celery worker` x2 and `celery beat` x2 subprocesses."""

from __future__ import annotations

import json
import threading
from collections import defaultdict

import pytest

from factory_worker.context import Context
from factory_worker.ledger.core import Ledger
from factory_worker.ledger.keys import Keys
from factory_worker.loop.control import LoopControl
from factory_worker.worker.app import agent_queue
from tests.conftest import roomy_fleet
from tests.support import STACK, CeleryProc, ctl, read_events, settings_from, stack_env, wait_until, write_issues

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

#: Exactly-once end to end on both worker pools and both brokers, in two stacks (the ``stack`` fixture,
#: tests/conftest.py): prefork on Redis, threads on RabbitMQ (see test_chaos.py's STACKS).
STACKS = pytest.mark.parametrize("stack", ["prefork", "threads+amqp"], indirect=True)


def _sixty_issues() -> list[dict]:
    """I-00..I-59: every 7th (from I-03) fails once, I-59 always fails, the rest succeed."""
    issues = []
    for n in range(60):
        labels = ["fails-once"] if n % 7 == 3 else []
        if n == 59:
            labels = ["always-fails"]
        issues.append({"id": f"I-{n:02d}", "title": f"issue {n}", "state": "ready", "labels": labels})
    return issues


def _start_two_workers_two_beats(env, tmp_path, procs) -> None:
    for name in ("w1", "w2"):
        procs.append(CeleryProc("worker", env, tmp_path, name, extra=["-c", "4"]))
    for name in ("beat1", "beat2"):  # two beats firing at once must still start one run at a time
        procs.append(CeleryProc("beat", env, tmp_path, name))
    for p in procs:
        p.wait_ready()


def _events_by_issue(out) -> dict[str, list[dict]]:
    by_issue: dict[str, list[dict]] = defaultdict(list)
    for e in read_events(out):
        by_issue[e["issue"]].append(e)
    return by_issue


def _assert_no_overlapping_agent_runs(by_issue: dict[str, list[dict]]) -> None:
    for issue, evs in by_issue.items():
        spans = []
        starts = {e["pid"]: e["t"] for e in evs if e["event"] == "start"}
        for e in evs:
            if e["event"] == "end":
                spans.append((starts[e["pid"]], e["t"]))
        assert len(spans) == len(starts), issue
        spans.sort()
        for (_, e1), (s2, _) in zip(spans, spans[1:]):
            assert s2 >= e1, f"{issue}: overlapping agent runs"


def _assert_backoff_respected(by_issue: dict[str, list[dict]]) -> None:
    for n in range(59):
        if n % 7 != 3:
            continue
        evs = sorted(by_issue[f"I-{n:02d}"], key=lambda e: e["t"])
        first_end = next(e for e in evs if e["event"] == "end")
        assert first_end["code"] == 1
        second_start = [e for e in evs if e["event"] == "start"][1]
        assert second_start["t"] - first_end["t"] >= 1.0, (n, second_start["t"] - first_end["t"])


def _assert_runs_never_overlapped(ctx: Context, real_redis) -> None:
    runs = []
    for key in real_redis.scan_iter(match=ctx.keys.run("*")):
        if key.endswith(":current"):
            continue
        rec = ctx.control.run(key.rsplit(":", 1)[1])
        if rec and "started_ms" in rec:
            runs.append((rec["started_ms"], rec.get("finished_ms") or 10**15, rec["status"]))
    runs.sort()
    assert len(runs) >= 2
    for (_, e1, _), (s2, _, _) in zip(runs, runs[1:]):
        assert s2 >= e1, "two runs were live at once"


@STACKS
def test_sixty_issues_done_exactly_once_with_backoff_and_parking(
    stack, redis_url, real_redis, namespace, tmp_path, procs
):
    write_issues(tmp_path / "issues.jsonl", _sixty_issues())
    env = stack_env(redis_url, namespace, tmp_path)
    _start_two_workers_two_beats(env, tmp_path, procs)
    settings = settings_from(env)
    ledger = Ledger.from_settings(settings, real_redis)
    wait_until(
        lambda: ledger.gauges()["done"] == 59 and ledger.gauges()["parked"] == 1,
        120,
        interval=0.5,
        what="59 done + 1 parked",
    )

    by_issue = _events_by_issue(tmp_path / "out")
    # every issue done exactly once
    for n in range(59):
        ends_ok = [e for e in by_issue[f"I-{n:02d}"] if e["event"] == "end" and e["code"] == 0]
        assert len(ends_ok) == 1, (n, by_issue[f"I-{n:02d}"])
    # no two runs of one issue overlap in time
    _assert_no_overlapping_agent_runs(by_issue)
    # a failed issue is not retried before its backoff window (base 1 s, no jitter)
    _assert_backoff_respected(by_issue)
    # the always-failing issue is parked after max_attempts
    assert len([e for e in by_issue["I-59"] if e["event"] == "start"]) == 3
    assert ledger.explain("I-59").state == "parked"
    # runs never overlapped, though two beats kicked off
    ctx = Context(settings, real_redis)
    _assert_runs_never_overlapped(ctx, real_redis)
    # nothing is left owned
    assert ledger.gauges()["in_flight"] == 0
    assert not real_redis.keys(ctx.keys.claim("*"))


def test_two_kickoffs_at_the_same_moment_start_one_run(real_redis, make_settings, redis_url):
    settings = make_settings(redis_url=redis_url)
    barrier = threading.Barrier(8)
    results = []

    def kick() -> None:
        control = LoopControl(real_redis, settings)
        barrier.wait()
        results.append(control.start_run(by="test"))

    threads = [threading.Thread(target=kick) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [k for k in results if k.started]
    assert len(started) == 1
    assert all("overlap" in k.reason for k in results if not k.started)
    assert int(real_redis.hget(Keys_for(settings).counters, "kickoffs_skipped_overlap")) == 7


def Keys_for(settings):
    from factory_worker.ledger.keys import Keys

    return Keys(settings.namespace)


def test_dry_run_dispatches_nothing_and_writes_nothing(redis_url, real_redis, namespace, tmp_path):
    write_issues(tmp_path / "issues.jsonl", [{"id": f"D-{n}", "title": "t", "state": "ready"} for n in range(5)])
    env = stack_env(redis_url, namespace, tmp_path)
    roomy_fleet(real_redis, Keys(namespace))  # a live agent worker with room (none runs in this test)
    before = {k: real_redis.dump(k) for k in real_redis.keys("*")}
    res = ctl(env, "run-once", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["dry_run"] is True and report["pulled"] == 5 and report["dispatched"] == 5
    after = {k: real_redis.dump(k) for k in real_redis.keys("*")}
    assert after == before
    assert real_redis.llen(agent_queue(namespace)) == 0


@STACKS
def test_redelivered_agent_message_runs_the_agent_once(stack, redis_url, real_redis, namespace, tmp_path, procs):
    write_issues(tmp_path / "issues.jsonl", [{"id": "R-1", "title": "t", "state": "ready"}])
    env = stack_env(redis_url, namespace, tmp_path, AGENT_SLEEP="1.0")
    procs.append(CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "2"]))
    procs[0].wait_ready()
    settings = settings_from(env)
    ledger = Ledger.from_settings(settings, real_redis)
    claim = ledger.claim(["R-1"]).claims[0]
    from celery import Celery

    sender = Celery(broker=STACK.broker_url or redis_url)
    sender.conf.task_serializer = "json"
    msg = dict(
        args=["R-1", claim.token, None],
        kwargs={"issue": {"id": "R-1", "title": "t", "state": "ready"}},
        queue=agent_queue(namespace),
    )
    sender.send_task("factory.agent.run", task_id="dup-1", **msg)
    sender.send_task("factory.agent.run", task_id="dup-1", **msg)  # the same message, delivered again
    wait_until(lambda: ledger.explain("R-1").state == "done", 30, what="R-1 done")
    import time

    time.sleep(1.5)  # give a duplicate time to (wrongly) start
    starts = [e for e in read_events(tmp_path / "out") if e["event"] == "start"]
    assert len(starts) == 1


def test_hostile_title_reaches_the_agent_as_plain_text(redis_url, real_redis, namespace, tmp_path, procs):
    pwned = tmp_path / "pwned"
    title = f"$(touch {pwned}); touch {pwned}2 `touch {pwned}3` | touch {pwned}4"
    write_issues(tmp_path / "issues.jsonl", [{"id": "X-1", "title": title, "state": "ready"}])
    env = stack_env(redis_url, namespace, tmp_path)
    procs.append(CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "1"]))
    procs[0].wait_ready()
    res = ctl(env, "run-once", "--json")
    assert res.returncode == 0, res.stderr
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    wait_until(lambda: ledger.explain("X-1").state == "done", 30, what="X-1 done")
    start = next(e for e in read_events(tmp_path / "out") if e["event"] == "start")
    assert start["argv"] == ["X-1", title]
    assert not list(tmp_path.glob("pwned*"))


@STACKS
def test_flower_sees_failed_agents_as_failure_and_done_ones_as_success(
    stack, redis_url, real_redis, namespace, tmp_path, procs
):
    """The agent task's Celery state tells the truth (issue 8): failed -> FAILURE with the reason, done -> SUCCESS."""
    write_issues(
        tmp_path / "issues.jsonl",
        [
            {"id": "F-ok", "title": "t", "state": "ready"},
            {"id": "F-bad", "title": "t", "state": "ready", "labels": ["always-fails"]},
        ],
    )
    env = stack_env(
        redis_url, namespace, tmp_path, FACTORY_DISPATCH__BACKOFF_BASE_S="30", FACTORY_DISPATCH__BACKOFF_MAX_S="30"
    )
    w = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "2"])
    procs.append(w)
    w.wait_ready()
    assert ctl(env, "run-once", "--json").returncode == 0
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    wait_until(
        lambda: ledger.explain("F-ok").state == "done" and ledger.explain("F-bad").state == "backoff",
        30,
        what="one done, one backing off",
    )
    wait_until(lambda: "raised expected: AgentFailed" in w.log(), 10, what="the failed task's FAILURE")
    log = w.log()
    assert "issue F-bad: failed -> backoff" in log
    assert log.count("raised expected: AgentFailed") == 1  # the done one succeeded
