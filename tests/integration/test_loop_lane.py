"""The loop never starves behind agents (issue 21, item 2): a plain ``celery -A factory_worker worker -c 1``
(no ``-Q``: both queues) runs an agent that outlives ``loop.stale_after_s`` while the loop stays live."""

from __future__ import annotations

import json
import time

import pytest

from factory_worker.ledger.core import Ledger
from tests.support import CeleryProc, ctl, read_events, settings_from, stack_env, wait_until, write_issues

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_one_process_worker_runs_an_agent_and_keeps_the_loop_live(redis_url, real_redis, namespace, tmp_path, procs):
    write_issues(
        tmp_path / "issues.jsonl",
        [{"id": "L-1", "title": "t", "state": "ready"}, {"id": "L-2", "title": "t", "state": "ready"}],
    )
    env = stack_env(
        redis_url,
        namespace,
        tmp_path,
        FACTORY_LOOP__STALE_AFTER_S="3",
        AGENT_SLEEP="7",
        FACTORY_DISPATCH__LEASE_TTL_S="6",
    )
    worker = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "1"], no_queues=True)
    beat = CeleryProc("beat", env, tmp_path, "beat")
    procs.extend([worker, beat])
    worker.wait_ready()
    beat.wait_ready()
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    wait_until(lambda: any(e["event"] == "start" for e in read_events(tmp_path / "out")), 20, what="a first agent")
    first = next(e for e in read_events(tmp_path / "out") if e["event"] == "start")["issue"]
    second = "L-2" if first == "L-1" else "L-1"
    # the one pool process runs the agent for 7 s, more than twice stale_after_s: the loop stays live throughout
    seen: list[tuple[float, int, str]] = []
    began = time.monotonic()
    while ledger.explain(first).state == "in-flight" and time.monotonic() - began < 30:
        res = ctl(env, "loop-status", "--json")
        seen.append(
            (round(time.monotonic() - began, 1), res.returncode, json.loads(res.stdout or "{}").get("liveness"))
        )
        time.sleep(0.3)
    assert seen and seen[-1][0] >= 4, f"sampled while the agent ran (more than stale_after_s): {seen}"
    assert all(code == 0 for _, code, _ in seen), f"loop-status while the agent ran: {seen}\n{worker.log()[-3000:]}"
    assert ledger.explain(second).state != "done"
    # once it ends the slot is the second issue's
    wait_until(lambda: ledger.explain(first).state == "done", 20, what=f"{first} done")
    wait_until(lambda: ledger.explain(second).state == "done", 30, what=f"{second} dispatched and done")
    assert "loop lane" in worker.log()
