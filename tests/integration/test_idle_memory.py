"""Issue 8: with nothing to do, Redis memory stays flat — nothing kept per run, iteration or poll grows
with the backlog (5,000 done issues in the source, a real worker and beat iterating for a minute)."""

from __future__ import annotations

import time

import pytest

from factory_worker.ledger import Ledger
from tests.support import CeleryProc, assert_audit_clean, settings_from, stack_env, wait_until, write_issues

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

N_DONE = 5000
WATCH_S = 60.0


def _complete_all(ledger: Ledger, ids: list[str]) -> None:
    for start in range(0, len(ids), 1000):
        for claim in ledger.claim(ids[start : start + 1000]).claims:
            ledger.complete(claim.issue, claim.token)


def test_idle_iterations_over_a_large_done_source_keep_redis_memory_flat(redis_url, real_redis, namespace,
                                                                         tmp_path, procs):
    ids = [f"D-{i}" for i in range(N_DONE)]
    write_issues(tmp_path / "issues.jsonl", [{"id": i, "title": "t", "state": "ready"} for i in ids])
    env = stack_env(redis_url, namespace, tmp_path, FACTORY_LOOP__INTERVAL_S="2",
                    FACTORY_LOOP__MAX_ITERATIONS="4", FACTORY_LOOP__RUN_RETENTION_S="10",
                    FACTORY_DISPATCH__MAX_IN_FLIGHT="5000")
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    ledger.cfg.max_in_flight = N_DONE
    _complete_all(ledger, ids)
    assert ledger.gauges()["done"] == N_DONE
    worker = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "2"])
    procs.append(worker)
    worker.wait_ready()
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    counters = lambda: ledger.counters().get("iterations", 0)  # noqa: E731
    wait_until(lambda: counters() >= 4, 30, what="the loop iterating")
    # warm up for one run retention, so run records are expiring as fast as they are written
    time.sleep(15)
    samples, first_iter = [], counters()
    t_end = time.monotonic() + WATCH_S
    while time.monotonic() < t_end:
        samples.append(int(real_redis.info("memory")["used_memory"]))
        time.sleep(5)
    iterations = counters() - first_iter
    growth = (max(samples) - samples[0]) / samples[0]
    print(f"\nidle memory over {WATCH_S:.0f}s ({iterations} iterations, {N_DONE} done issues in the source): "
          f"first {samples[0]:,} B, min {min(samples):,} B, max {max(samples):,} B, growth {growth:+.2%}")
    assert iterations >= 20, "the loop did not iterate while watched"
    assert ledger.counters().get("claimed", 0) == N_DONE  # nothing was dispatched again
    assert growth < 0.03, f"Redis memory grew {growth:.1%} over {WATCH_S:.0f}s of idle iterations"
    assert_audit_clean(redis_url, namespace)
