"""Chaos (issue 9): the ledger is emptied mid-run under a real worker and beat: safe mode, nothing re-run."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from factory_worker.ledger.core import Ledger
from tests.support import (
    CeleryProc,
    assert_audit_clean,
    ctl,
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


pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.chaos]


def test_an_emptied_ledger_is_safe_mode_and_no_completed_issue_runs_again(
    redis_url, real_redis, namespace, tmp_path, procs
):
    issues = [{"id": f"L-{i}", "title": "t", "state": "ready"} for i in range(6)]
    write_issues(tmp_path / "issues.jsonl", issues)
    env = stack_env(redis_url, namespace, tmp_path, AGENT_SLEEP="0")
    worker = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "3"])
    procs.append(worker)
    worker.wait_ready()
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    wait_until(lambda: ledger.gauges()["done"] == len(issues), 40, what="all issues done")

    real_redis.flushall()  # Redis restarted empty, a FLUSHALL, an eviction, a stale replica promoted...
    lost_at = time.monotonic()

    def status() -> tuple[int, dict]:
        res = ctl(env, "loop-status", "--json")
        return res.returncode, json.loads(res.stdout)

    code, st = wait_until(
        lambda: (lambda s: s if s[1]["ledger_lost"] else None)(status()), 20, what="loop-status to report the loss"
    )
    detected_s = time.monotonic() - lost_at
    assert code == 1 and st["ledger_guard"]["lost"]
    assert "ledger lost" in ctl(env, "loop-status").stdout
    time.sleep(3)  # several iterations in safe mode
    starts = Counter(e["issue"] for e in read_events(tmp_path / "out") if e["event"] == "start")
    assert set(starts.values()) == {1}, f"a completed issue ran again: {starts}"
    assert not real_redis.keys(ledger.keys.claim("*")), "safe mode claimed something"
    assert detected_s < 20

    accepted = json.loads(ctl(env, "ledger", "accept", "--json").stdout)
    assert accepted["superseded"]
    write_issues(tmp_path / "issues.jsonl", [{"id": "L-new", "title": "t", "state": "ready"}])
    wait_until(lambda: ledger.explain("L-new").state == "done", 30, what="the loop to work again after accept")
    assert ctl(env, "loop-status", "--json").returncode == 0
