"""Chaos and kill tests: real redis-server, real worker/beat subprocesses, faults on purpose. Bounded."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import pytest

from factory_worker.context import Context
from factory_worker.ledger.core import Ledger, StaleClaimError
from factory_worker.loop import heartbeat
from factory_worker.ops.embedded import RedisServer
from tests.support import (
    CeleryProc,
    assert_audit_clean,
    ctl,
    pid_alive,
    read_events,
    settings_from,
    stack_env,
    start_worker_and_beat,
    wait_until,
    warm_shutdown,
    write_issues,
)


@pytest.fixture(autouse=True)
def _ends_with_an_audit(redis_url, namespace, procs):
    """Every test here ends with the ledger's invariants checked, its workers still up."""
    yield
    assert_audit_clean(redis_url, namespace)


pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(180)]

#: The key chaos tests run on both worker pools and both brokers (the ``stack`` fixture, tests/conftest.py), in
#: two stacks to keep the suite in its budget: prefork on Redis (the plain command) and threads on RabbitMQ
#: (agent workers run ``-P threads`` in production; threads on Redis: tests/unit/agents/test_threads_pool.py and
#: the deploy files' stacks, prefork on RabbitMQ: tests/integration/test_rabbitmq.py).
STACKS = pytest.mark.parametrize("stack", ["prefork", "threads+amqp"], indirect=True)


def starts(tmp_path, issue=None):
    return [
        e for e in read_events(tmp_path / "out") if e["event"] == "start" and (issue is None or e["issue"] == issue)
    ]


def ok_ends(tmp_path):
    return Counter(e["issue"] for e in read_events(tmp_path / "out") if e["event"] == "end" and e["code"] == 0)


@STACKS
def test_sigkill_worker_kills_its_agent_and_the_issue_runs_again_once(
    stack, redis_url, real_redis, namespace, tmp_path, procs
):
    write_issues(tmp_path / "issues.jsonl", [{"id": "K-1", "title": "t", "state": "ready", "labels": ["slow-once"]}])
    env = stack_env(redis_url, namespace, tmp_path, FACTORY_DISPATCH__LEASE_TTL_S="3")
    w1 = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "1"])
    procs.append(w1)
    w1.wait_ready()
    assert ctl(env, "run-once", "--json").returncode == 0
    first = wait_until(lambda: starts(tmp_path, "K-1"), 20, what="agent start")[0]
    w2 = CeleryProc("worker", env, tmp_path, "w2", extra=["-c", "1"])
    procs.append(w2)
    w2.wait_ready()

    w1.signal(signal.SIGKILL)
    t0 = time.monotonic()
    wait_until(lambda: not pid_alive(first["pid"]), 1.0, interval=0.02, what="agent gone with its worker")
    assert time.monotonic() - t0 <= 1.0

    ctx = Context(settings_from(env), real_redis)
    assert ctx.ledger.explain("K-1").state == "in-flight"  # the dead holder's lease runs out, no sooner
    wait_until(lambda: ctx.ledger.explain("K-1").state == "claimable", 6, what="lease expiry")
    assert ctl(env, "run-once", "--json").returncode == 0
    wait_until(lambda: ctx.ledger.explain("K-1").state == "done", 20, what="K-1 done by w2")
    assert ok_ends(tmp_path)["K-1"] == 1
    assert len(starts(tmp_path, "K-1")) == 2
    with pytest.raises(StaleClaimError):
        ctx.ledger.complete("K-1", first["token"])


@STACKS
def test_sigterm_worker_releases_unfinished_agents_and_the_loop_goes_on(
    stack, redis_url, real_redis, namespace, tmp_path, procs
):
    issues = [{"id": f"S-{n}", "title": "t", "state": "ready", "labels": ["slow-once"]} for n in range(2)]
    write_issues(tmp_path / "issues.jsonl", issues)
    env = stack_env(
        redis_url, namespace, tmp_path, FACTORY_WORKER__SOFT_SHUTDOWN_S="3", FACTORY_LOOP__MAX_ITERATIONS="20"
    )
    w1 = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "3"])
    procs.append(w1)
    w1.wait_ready()
    beat = CeleryProc("beat", env, tmp_path, "beat")
    procs.append(beat)
    beat.wait_ready()
    first = wait_until(lambda: len(starts(tmp_path)) >= 2 and starts(tmp_path), 30, what="both slow agents")
    ctx = Context(settings_from(env), real_redis)
    tokens = {e["issue"]: e["token"] for e in first}
    w2 = CeleryProc("worker", env, tmp_path, "w2", extra=["-c", "3"])
    procs.append(w2)
    w2.wait_ready()

    took = warm_shutdown(w1, 3)
    assert took <= 3 + 3, f"warm shutdown took {took:.1f}s"
    for e in first:
        assert not pid_alive(e["pid"])
    counters = ctx.ledger.counters()
    assert counters.get("released_interrupted", 0) >= 2
    for issue, token in tokens.items():
        assert real_redis.get(ctx.keys.claim(issue)) != token  # nothing left owned by w1
        assert ctx.ledger.explain(issue).detail.get("attempts", 0) == 0  # interrupted, not failed
    assert real_redis.get(ctx.keys.worker("w1@" + os.uname().nodename)) is None
    # the loop continues on w2: both issues get done there
    wait_until(lambda: all(ctx.ledger.explain(i["id"]).state == "done" for i in issues), 40, what="done on w2")
    assert all(n == 1 for n in ok_ends(tmp_path).values())
    run = ctx.control.run(ctx.control.current_run_id())
    assert run["last_worker"].startswith("w2@")


def _stack_after_done(redis_url, real_redis, namespace, tmp_path, procs, prefix: str, n: int, **settings):
    """A worker (-c 2) and beat that have done ``n`` ready issues ``<prefix>-<i>``: (source path, env, ctx)."""
    path = tmp_path / "issues.jsonl"
    write_issues(path, [{"id": f"{prefix}-{i}", "title": "t", "state": "ready"} for i in range(n)])
    env = stack_env(redis_url, namespace, tmp_path, **settings)
    start_worker_and_beat(procs, env, tmp_path, 2)
    ctx = Context(settings_from(env), real_redis)
    wait_until(lambda: ctx.ledger.gauges()["done"] == n, 30, what="first issues done")
    return path, env, ctx


@STACKS
def test_kill_loop_stops_dispatching_and_start_loop_resumes(stack, redis_url, real_redis, namespace, tmp_path, procs):
    path, env, ctx = _stack_after_done(
        redis_url, real_redis, namespace, tmp_path, procs, "A", 4, FACTORY_LOOP__MAX_ITERATIONS="50"
    )
    assert ctl(env, "loop-status").returncode == 0

    res = ctl(env, "kill-loop", "--json")
    killed_at = time.time()
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    # the running run is killed, or (idle runs end at once: the loop was between runs) the loop is
    run_id = out["killed"] or out["last_run"]["run_id"]
    assert run_id and (out["revoked"] if out["killed"] else out["loop_killed"])
    # a second kill with nothing live is refused
    again = ctl(env, "kill-loop")
    assert again.returncode == 1 and "refused" in again.stderr
    with open(path, "a") as fh:  # new ready issues arrive while killed
        for n in range(3):
            fh.write(json.dumps({"id": f"N-{n}", "title": "t", "state": "ready"}) + "\n")
    time.sleep(3 * 1.0 + 0.5)  # three loop intervals
    assert not [e for e in starts(tmp_path) if e["t"] > killed_at + 0.05]
    status = json.loads(ctl(env, "loop-status", "--json").stdout)
    assert status["killed"]["run_id"] == run_id
    assert status["counters"].get("kickoffs_skipped_killed", 0) >= 2
    assert status["liveness"] == "killed"  # until start-loop, never "missing" (issue 21)

    started = ctl(env, "start-loop", "--json")
    assert started.returncode == 0, started.stdout + started.stderr
    wait_until(lambda: ctx.ledger.gauges()["done"] == 7, 30, what="dispatching resumed")


def test_pause_keeps_the_loop_live_claims_nothing_and_resume_dispatches(
    redis_url, real_redis, namespace, tmp_path, procs
):
    """DESIGN: pause claims nothing, running agents go on, the run stays alive. Paused past ``stale_after_s``
    the loop still answers live (exit 0) and paused; nothing new starts; resume dispatches what arrived."""
    path, env, ctx = _stack_after_done(
        redis_url, real_redis, namespace, tmp_path, procs, "Q", 2, FACTORY_LOOP__STALE_AFTER_S="3"
    )
    assert ctl(env, "pause").returncode == 0
    paused_at = time.time()
    with open(path, "a") as fh:  # new ready issues arrive while paused
        for n in range(3):
            fh.write(json.dumps({"id": f"P-{n}", "title": "t", "state": "ready"}) + "\n")
    time.sleep(3 + 2)  # past stale_after_s
    res = ctl(env, "loop-status", "--json")
    status = json.loads(res.stdout)
    assert res.returncode == 0 and status["liveness"] == "live" and status["paused"]["by"], res.stdout
    assert not [e for e in starts(tmp_path) if e["t"] > paused_at + 0.05]
    assert ctx.ledger.explain("P-0").state == "paused"
    assert ctl(env, "resume").returncode == 0
    wait_until(lambda: ctx.ledger.gauges()["done"] == 5, 30, what="dispatching resumed")
    assert all(n == 1 for n in ok_ends(tmp_path).values())


def test_kill_loop_refuses_stale_and_malformed_heartbeats(redis_url, real_redis, namespace, tmp_path):
    env = stack_env(redis_url, namespace, tmp_path)
    ctx = Context(settings_from(env), real_redis)
    now = int(real_redis.time()[0]) * 1000
    stale = heartbeat.make("old-run", "running", 1, 3, now - 60_000)
    real_redis.set(ctx.keys.heartbeat, stale.to_json())
    res = ctl(env, "kill-loop")
    assert res.returncode == 1 and "stale" in res.stderr
    assert not real_redis.exists(ctx.keys.kill)
    real_redis.set(ctx.keys.heartbeat, '{"run_id": 5, "status": "running"')
    status = ctl(env, "loop-status", "--json")
    assert status.returncode == 1
    assert json.loads(status.stdout)["liveness"] == "missing"
    assert ctl(env, "kill-loop").returncode == 1
    forced = ctl(env, "kill-loop", "--force", "--json")
    assert forced.returncode == 0 and real_redis.exists(ctx.keys.kill)


@STACKS
def test_kill_loop_release_agents_stops_every_agent_and_frees_claims(
    stack, redis_url, real_redis, namespace, tmp_path, procs
):
    issues = [{"id": f"L-{n}", "title": "t", "state": "ready", "labels": ["slow"]} for n in range(3)]
    write_issues(tmp_path / "issues.jsonl", issues)
    # one iteration per run: the agents outlive the run that sent them, and kill-loop kills a later run
    env = stack_env(redis_url, namespace, tmp_path, FACTORY_LOOP__MAX_ITERATIONS="1", FACTORY_AGENT__TERM_GRACE_S="2")
    start_worker_and_beat(procs, env, tmp_path, 4)
    running = wait_until(lambda: len(starts(tmp_path)) >= 3 and starts(tmp_path), 30, what="3 agents running")
    ctx = Context(settings_from(env), real_redis)
    sent_by = {real_redis.hget(ctx.keys.agent_task(t), "run_id") for t in real_redis.smembers(ctx.keys.agents)}
    wait_until(lambda: ctx.control.current_run_id() not in sent_by | {None}, 10, what="a later run")
    t0 = time.monotonic()
    res = ctl(env, "kill-loop", "--release-agents", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert sorted(a["issue"] for a in out["released_agents"]) == ["L-0", "L-1", "L-2"]
    wait_until(lambda: not any(pid_alive(e["pid"]) for e in running), 2 + 2, what="agents gone")
    assert time.monotonic() - t0 <= 2 + 2 + 1
    for i in issues:
        assert ctx.ledger.current_token(i["id"]) is None
        assert ctx.ledger.explain(i["id"]).detail.get("attempts") == 0
    assert ctx.ledger.gauges()["in_flight"] == 0
    assert ctx.ledger.counters().get("released_interrupted", 0) == 3


def test_redis_restart_mid_run_every_issue_done_once(tmp_path, namespace, procs):
    server = RedisServer(tmp_path / "redis-aof", appendonly=True).start()
    try:
        issues = [{"id": f"R-{n:02d}", "title": "t", "state": "ready"} for n in range(30)]
        write_issues(tmp_path / "issues.jsonl", issues)
        env = stack_env(
            server.url,
            namespace,
            tmp_path,
            AGENT_SLEEP="0.3",
            FACTORY_LOOP__MAX_ITERATIONS="20",
            FACTORY_DISPATCH__MAX_IN_FLIGHT="4",
        )
        procs.append(CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "2"]))
        procs.append(CeleryProc("worker", env, tmp_path, "w2", extra=["-c", "2"]))
        procs.append(CeleryProc("beat", env, tmp_path, "beat"))
        for p in procs:
            p.wait_ready()
        r = server.client()
        ledger = Ledger.from_settings(settings_from(env), r)
        wait_until(lambda: ledger.gauges()["done"] >= 8, 60, what="some issues done")
        server.restart(signal.SIGTERM)  # AOF keeps the ledger
        r = server.client()
        ledger = Ledger.from_settings(settings_from(env), r)
        wait_until(lambda: ledger.gauges()["done"] == 30, 90, interval=0.5, what="all 30 done after restart")
        assert ledger.counters()["completed"] == 30
        ends = ok_ends(tmp_path)
        assert set(ends) == {i["id"] for i in issues}
        assert all(n == 1 for n in ends.values()), {k: n for k, n in ends.items() if n != 1}
    finally:
        for p in procs:
            p.stop(timeout=20)
        procs.clear()
        server.stop()


def test_sigkill_of_the_loop_worker_is_followed_by_a_new_run_before_the_loop_lease_expires(
    redis_url, real_redis, namespace, tmp_path, procs
):
    """The loop worker dies mid-run with the default 60 s loop lease: the next kickoff sees that the run's
    holder has no presence key any more and takes the lease over (after the worker's presence TTL, 15 s),
    ending the lost run as abandoned; every issue still runs once."""
    issues = [{"id": f"H-{n:02d}", "title": "t", "state": "ready"} for n in range(20)]
    write_issues(tmp_path / "issues.jsonl", issues)
    env = stack_env(
        redis_url,
        namespace,
        tmp_path,
        AGENT_SLEEP="0.5",
        FACTORY_LOOP__MAX_ITERATIONS="50",
        FACTORY_LOOP__ITERATION_SPACING_S="0.5",
        FACTORY_DISPATCH__MAX_IN_FLIGHT="2",
    )
    assert "FACTORY_LOOP__LEASE_TTL_S" not in env  # the default: 60 s
    loop1 = CeleryProc("worker", env, tmp_path, "loop1", queues=[f"{namespace}.loop"], extra=["-c", "1"])
    agents = CeleryProc("worker", env, tmp_path, "agents", queues=[f"{namespace}.agents"], extra=["-c", "2"])
    procs.extend([loop1, agents])
    for p in (loop1, agents):
        p.wait_ready()
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    ctx = Context(settings_from(env), real_redis)
    lost = wait_until(
        lambda: (
            (r := ctx.control.current_run_id())
            and (ctx.control.run(r) or {}).get("holder", "").startswith("loop1@")
            and r
        ),
        30,
        what="a run held by loop1",
    )
    loop1.signal(signal.SIGKILL)
    killed = time.monotonic()
    loop2 = CeleryProc("worker", env, tmp_path, "loop2", queues=[f"{namespace}.loop"], extra=["-c", "1"])
    procs.append(loop2)
    loop2.wait_ready()
    wait_until(
        lambda: ctx.control.current_run_id() not in (lost, None),
        45,
        interval=0.2,
        what="a new run after the loop worker's death",
    )
    took = time.monotonic() - killed
    print(f"new run {took:.1f}s after the loop worker's SIGKILL (loop lease 60 s, presence TTL 15 s)")
    assert took < 30, f"the loop stayed stopped {took:.1f}s"
    assert ctx.control.run_status(lost) == "abandoned"
    assert int(real_redis.hget(ctx.keys.counters, "lease_takeovers") or 0) >= 1
    wait_until(lambda: ctx.ledger.gauges()["done"] == 20, 60, what="every issue done")
    assert set(ok_ends(tmp_path).values()) == {1}
