"""A worker whose Redis vanishes during its warm shutdown (issue 21, item 6): it still stops its agent and exits
within its soft-shutdown window, and logs one line per kind of failure, never a traceback per attempt. Before,
it printed ~22 tracebacks and exited only once its agent's lease ran out (32 s after SIGTERM, window 20 s):
the agent learnt the shutdown deadline from Redis only, and the release was retried for a whole lease."""

from __future__ import annotations

import signal
import time

import pytest

from factory_worker.ops.embedded import RedisServer
from tests.support import CeleryProc, ctl, read_events, stack_env, wait_until, write_issues

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.chaos]

WINDOW_S = 8.0
LEASE_S = 30.0  # longer than the window: the agent must not wait for its lease to end


@pytest.mark.parametrize("redis_dies_after_s", [0.3, 2.0])  # before or after the agent read the deadline
def test_redis_killed_during_the_warm_shutdown(tmp_path, namespace, procs, redis_dies_after_s):
    server = RedisServer(tmp_path / "redis").start()
    try:
        write_issues(tmp_path / "issues.jsonl", [{"id": "S-1", "title": "slow", "state": "ready", "labels": ["slow"]}])
        env = stack_env(
            server.url,
            namespace,
            tmp_path,
            FACTORY_DISPATCH__LEASE_TTL_S=str(LEASE_S),
            FACTORY_WORKER__SOFT_SHUTDOWN_S=str(WINDOW_S),
            FACTORY_WORKER__HEARTBEAT_INTERVAL_S="0.5",
        )
        worker = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "2"])
        procs.append(worker)
        worker.wait_ready()
        assert ctl(env, "start-loop").returncode == 0
        wait_until(lambda: any(e["event"] == "start" for e in read_events(tmp_path / "out")), 30, what="agent start")
        t0 = time.monotonic()
        worker.signal(signal.SIGTERM)
        time.sleep(redis_dies_after_s)
        server.proc.kill()  # Redis vanishes mid-shutdown
        server.proc.wait(10)
        worker.proc.wait(LEASE_S + 20)
        took = time.monotonic() - t0
    finally:
        server.stop()
    log = worker.log()
    assert took < WINDOW_S + 1.0, f"exited {took:.1f}s after SIGTERM (window {WINDOW_S:g}s)\n{log[-3000:]}"
    assert worker.proc.returncode == 0
    assert "Traceback" not in log, log[-3000:]
    assert log.count("worker presence: Redis write failed") == 1, log[-3000:]  # one line per failure kind
    assert log.count("renewing the claim failed") <= 1 and log.count("reading the stop flags") <= 2
    assert "agent interrupted" in log and "worker shutdown: soft-shutdown window elapsed" in log
    ends = [e for e in read_events(tmp_path / "out") if e["event"] == "end"]
    assert not ends or ends[0]["t"] - t0 < WINDOW_S  # the agent (killed: no end record, or one) is gone in time
