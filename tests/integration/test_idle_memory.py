"""Issue 8: with nothing to do, Redis memory stays flat — nothing kept per run, iteration or poll grows
with the backlog (5,000 done issues in the source, a real worker and beat iterating for a minute)."""

from __future__ import annotations

import statistics
import time

import pytest

from factory_worker.ledger.core import Ledger
from tests.support import CeleryProc, assert_audit_clean, settings_from, stack_env, wait_until, write_issues

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

N_DONE = 5000
WATCH_S = 40.0


def _complete_all(ledger: Ledger, ids: list[str]) -> None:
    for start in range(0, len(ids), 1000):
        for claim in ledger.claim(ids[start : start + 1000]).claims:
            ledger.complete(claim.issue, claim.token)


def _floor_used_memory(r, reads: int = 10, gap_s: float = 0.05) -> int:
    """Redis's used_memory with in-flight traffic filtered out: a claim call carries thousands of issue ids,
    and reply buffers come and go, so one read swings by ~40-120 KB (1.5-4%) on its own; the least of a
    burst of reads is closer to what Redis keeps."""
    least = None
    for _ in range(reads):
        used = int(r.info("memory")["used_memory"])
        least = used if least is None else min(least, used)
        time.sleep(gap_s)
    return least


def _trend_growth(times: list[float], values: list[int]) -> float:
    """Growth over the watch implied by the Theil-Sen slope (median of pairwise slopes): a leak of so many
    bytes per iteration shows in full, while a one-off step (a buffer or hash table resized once) or a
    spike in one sample does not move the median."""
    slopes = [
        (values[j] - values[i]) / (times[j] - times[i]) for i in range(len(values)) for j in range(i + 1, len(values))
    ]
    return statistics.median(slopes) * (times[-1] - times[0]) / values[0]


def _stored_bytes(r) -> tuple[int, int]:
    """(keys, exact bytes of every key) in the database: what is kept, counted key by key."""
    keys = list(r.scan_iter(count=1000))
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.execute_command("MEMORY", "USAGE", key, "SAMPLES", 0)
    return len(keys), sum(size or 0 for size in pipe.execute())


def test_idle_iterations_over_a_large_done_source_keep_redis_memory_flat(
    redis_url, real_redis, namespace, tmp_path, procs
):
    ids = [f"D-{i}" for i in range(N_DONE)]
    write_issues(tmp_path / "issues.jsonl", [{"id": i, "title": "t", "state": "ready"} for i in ids])
    env = stack_env(
        redis_url,
        namespace,
        tmp_path,
        FACTORY_LOOP__INTERVAL_S="2",
        FACTORY_LOOP__MAX_ITERATIONS="4",
        FACTORY_LOOP__RUN_RETENTION_S="10",
        FACTORY_DISPATCH__MAX_IN_FLIGHT="5000",
    )
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
    time.sleep(12)
    times, samples, stored, first_iter = [], [], [], counters()
    t_end = time.monotonic() + WATCH_S
    while time.monotonic() < t_end:
        times.append(time.monotonic())
        samples.append(_floor_used_memory(real_redis))
        stored.append(_stored_bytes(real_redis))
        time.sleep(3)
    iterations = counters() - first_iter
    growth = _trend_growth(times, samples)
    key_bytes = [b for _, b in stored]
    key_growth = (max(key_bytes) - key_bytes[0]) / key_bytes[0]
    print(
        f"\nidle memory over {WATCH_S:.0f}s ({iterations} iterations, {N_DONE} done issues in the source): "
        f"used_memory first {samples[0]:,} B, min {min(samples):,} B, max {max(samples):,} B, "
        f"trend {growth:+.2%}, max/first {max(samples) / samples[0] - 1:+.2%}; "
        f"keys {stored[0][0]:,} to {max(k for k, _ in stored):,}, their bytes first {key_bytes[0]:,} B, "
        f"max {max(key_bytes):,} B, growth {key_growth:+.2%}"
    )
    assert iterations >= 20, "the loop did not iterate while watched"
    assert ledger.counters().get("claimed", 0) == N_DONE  # nothing was dispatched again
    assert max(k for k, _ in stored) <= stored[0][0] + 10, "keys pile up while idle"
    assert key_growth < 0.03, f"the keys grew {key_growth:.1%} over {WATCH_S:.0f}s of idle iterations"
    assert growth < 0.03, f"Redis memory grew {growth:.1%} over {WATCH_S:.0f}s of idle iterations (trend)"
    assert_audit_clean(redis_url, namespace)
