"""Capacity-true dispatch (issue 8) with a real redis-server, a real worker and a real beat."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import pytest

from factory_worker.ledger.core import Ledger
from factory_worker.worker.app import agent_queue
from tests.support import (
    CeleryProc,
    assert_audit_clean,
    read_events,
    settings_from,
    stack_env,
    wait_until,
    write_issues,
)


@pytest.fixture(autouse=True)
def _ends_with_an_audit(redis_url, namespace, procs):
    """Every test here ends with the ledger's invariants checked, its workers still up."""
    yield
    assert_audit_clean(redis_url, namespace)


pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_a_cap_far_above_the_fleet_drains_without_no_op_tasks_or_a_flooded_queue(
    redis_url, real_redis, namespace, tmp_path, procs
):
    n, concurrency = 300, 4
    slots = concurrency  # a worker on both queues runs the loop in its lane, outside the pool (issue 21)
    write_issues(tmp_path / "issues.jsonl", [{"id": f"Q-{i}", "title": "t", "state": "ready"} for i in range(n)])
    env = stack_env(
        redis_url,
        namespace,
        tmp_path,
        FACTORY_DISPATCH__MAX_IN_FLIGHT="5000",
        FACTORY_DISPATCH__LEASE_TTL_S="2",
        AGENT_SLEEP="0",
    )
    worker = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", str(concurrency)])
    procs.append(worker)
    worker.wait_ready()
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    queue, longest, stop = agent_queue(namespace), [0], threading.Event()

    def watch_queue() -> None:
        while not stop.is_set():
            longest[0] = max(longest[0], real_redis.llen(queue))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch_queue, daemon=True)
    watcher.start()
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    try:
        wait_until(lambda: ledger.gauges()["done"] == n, 150, interval=0.5, what=f"{n} issues done")
    finally:
        stop.set()
        watcher.join(2)
    starts = Counter(e["issue"] for e in read_events(tmp_path / "out") if e["event"] == "start")
    assert len(starts) == n and set(starts.values()) == {1}  # each agent ran once
    log = worker.log()
    assert log.count("does nothing") == 0, "agent tasks that did nothing (a claim expired in the queue)"
    assert longest[0] <= 2 * slots, f"the agent queue reached {longest[0]} messages for {slots} slots"
    counters = ledger.counters()
    assert counters["refilled"] > 0  # freed slots were refilled between polls
    assert counters["claimed"] == n


@pytest.mark.chaos
def test_a_worker_that_stops_takes_its_slots_with_it(redis_url, real_redis, namespace, tmp_path, procs):
    write_issues(tmp_path / "issues.jsonl", [{"id": "S-1", "title": "t", "state": "ready"}])
    env = stack_env(
        redis_url, namespace, tmp_path, FACTORY_WORKER__HEARTBEAT_INTERVAL_S="0.5", FACTORY_WORKER__HEARTBEAT_TTL_S="2"
    )
    worker = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "3"])
    procs.append(worker)
    worker.wait_ready()
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    wait_until(lambda: real_redis.hlen(ledger.keys.slots) == 1, 10, what="slots advertised")
    assert ledger.explain("S-1").state == "claimable"
    worker.signal(9)  # SIGKILL: no goodbye; its slots expire with its presence
    worker.proc.wait(10)
    wait_until(lambda: ledger.explain("S-1").state == "no-free-slot", 10, what="the dead worker's slots gone")
    assert "no free agent slot" in ledger.explain("S-1").text


@pytest.mark.chaos
def test_a_queued_claim_whose_message_died_with_its_worker_runs_once_elsewhere(
    redis_url, real_redis, namespace, tmp_path, procs
):
    """A worker popped an agent message and was SIGKILLed before recording it (or a failover lost it): the
    message is gone from the broker, its claim is queued. The loop's sweep releases it and the issue runs
    exactly once on another worker, long before the queue lease (1 h here) would have freed it."""
    write_issues(tmp_path / "issues.jsonl", [])
    env = stack_env(
        redis_url,
        namespace,
        tmp_path,
        FACTORY_WORKER__HEARTBEAT_INTERVAL_S="0.5",
        FACTORY_WORKER__HEARTBEAT_TTL_S="3",
        AGENT_SLEEP="0.2",
    )
    loop_worker = CeleryProc("worker", env, tmp_path, "loop", extra=["-c", "1", "-Q", f"{namespace}.loop"])
    doomed = CeleryProc("worker", env, tmp_path, "doomed", extra=["-c", "2", "-Q", f"{namespace}.agents"])
    procs.extend([loop_worker, doomed])
    loop_worker.wait_ready()
    doomed.wait_ready()
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    wait_until(
        lambda: any(not v.startswith("0:") for v in real_redis.hvals(ledger.keys.slots)),
        10,
        what="the agent worker's slots",
    )
    doomed.signal(signal.SIGSTOP)  # it may still have a BRPOP pending: a message it can never run
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    write_issues(tmp_path / "issues.jsonl", [{"id": "M-1", "title": "t", "state": "ready"}])
    wait_until(lambda: real_redis.zcard(ledger.keys.queued) == 1, 20, what="the claim sent")
    real_redis.delete(agent_queue(namespace))  # the message is gone (popped by the stopped worker, or here)
    doomed.signal(signal.SIGKILL)
    doomed.proc.wait(10)
    sent_at = time.monotonic()
    survivor = CeleryProc("worker", env, tmp_path, "survivor", extra=["-c", "2", "-Q", f"{namespace}.agents"])
    procs.append(survivor)
    wait_until(lambda: ledger.explain("M-1").state == "done", 60, what="the issue done on the survivor")
    took = time.monotonic() - sent_at
    starts = [e for e in read_events(tmp_path / "out") if e["event"] == "start"]
    print(f"\nlost agent message: released and done {took:.1f}s after its worker died (queue lease 3660 s)")
    assert [e["issue"] for e in starts] == ["M-1"]  # exactly once
    counters = ledger.counters()
    assert counters["released_message-lost"] == 1 and counters.get("agent_tasks_noop", 0) == 0
