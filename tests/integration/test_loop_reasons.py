"""loop-status says why the loop cannot make progress, with real workers and beat (issue 21, item 1): as users
run it (the early path and the full command), and doctor says the same."""

from __future__ import annotations

import json
import signal
import time

import pytest

from factory_worker.ledger.keys import Keys
from tests.support import CeleryProc, ctl, stack_env, wait_until, write_issues

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def status(env: dict[str, str]) -> tuple[dict, int]:
    res = ctl(env, "loop-status", "--json")
    assert res.returncode in (0, 1), res.stderr
    return json.loads(res.stdout), res.returncode


def full_status(env: dict[str, str]) -> tuple[dict, int]:
    """The full command's answer (a URL option the early path leaves to redis-py)."""
    return status({**env, "FACTORY_REDIS_URL": env["FACTORY_REDIS_URL"] + "?socket_read_size=65536"})


@pytest.fixture
def env(redis_url, real_redis, namespace, tmp_path):
    write_issues(tmp_path / "issues.jsonl", [{"id": "R-1", "title": "one", "state": "ready"}])
    return stack_env(redis_url, namespace, tmp_path, FACTORY_WORKER__HEARTBEAT_INTERVAL_S="0.5")


def test_only_agent_workers_and_beat_no_worker_consumes_the_loop_queue(env, procs, tmp_path):
    keys = Keys(env["FACTORY_NAMESPACE"])
    procs.append(CeleryProc("worker", env, tmp_path, "agents", queues=[keys.agent_queue], extra=["-c", "2"]))
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    for p in procs:
        p.wait_ready()
    wait_until(lambda: (status(env)[0]["loop_queue"]["waiting"] or 0) >= 3, 30, what="kickoffs piling up")
    for answer in (status(env), full_status(env)):
        data, code = answer
        assert code == 1 and "no-loop-worker" in data["reason_codes"], data["reasons"]
        why = data["reasons"][data["reason_codes"].index("no-loop-worker")]
        waiting = data["loop_queue"]["waiting"]
        assert why.startswith(f"no worker consumes the loop queue {keys.loop_queue} ({waiting} loop task(s)")
        assert data["workers"][0]["queues"] == [keys.agent_queue]
    text = ctl(env, "loop-status")
    assert text.returncode == 1 and "reason: no worker consumes the loop queue" in text.stdout
    doctor = ctl(env, "doctor", "--json")
    findings = {f["check"]: f for f in json.loads(doctor.stdout)["findings"]}
    assert doctor.returncode == 1 and findings["loop:no-loop-worker"]["severity"] == "error"
    assert "no worker consumes the loop queue" in findings["loop:no-loop-worker"]["message"]


def test_a_live_heartbeat_without_any_worker_is_not_healthy(env, procs, tmp_path):
    procs.append(CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "2"]))
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    for p in procs:
        p.wait_ready()
    wait_until(lambda: status(env)[1] == 0, 30, what="a live loop, nothing in its way")
    procs[0].signal(signal.SIGTERM)  # every worker stops (cleanly: its presence goes at once)
    procs[0].proc.wait(30)
    data, code = status(env)
    assert data["liveness"] == "live" and code == 1, data  # within stale_after_s the heartbeat still looks live
    assert data["reason_codes"] == ["no-worker"] and data["workers"] == []


def test_one_worker_with_one_process_and_a_long_agent_is_not_starved_thanks_to_its_loop_lane(env, procs, tmp_path):
    """``-c 1`` and an agent that runs long: its one process runs the agent, the loop lane the loop; the worker
    says so (its pool busy, the loop queue consumed by its lane), and loop-status finds nothing in the way. A
    worker without the lane (an older version) whose every process ran an agent while loop tasks waited was
    reported as starving the loop (tests/unit/loop/test_status.py)."""
    keys = Keys(env["FACTORY_NAMESPACE"])
    write_issues(tmp_path / "issues.jsonl", [{"id": "R-1", "title": "long", "state": "ready", "labels": ["slow"]}])
    procs.append(CeleryProc("worker", env, tmp_path, "solo", extra=["-c", "1"]))
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    for p in procs:
        p.wait_ready()

    def busy() -> dict | None:
        data, code = status(env)
        workers = data["workers"]
        return data if code == 0 and workers and workers[0].get("agents_running") == 1 else None

    data = wait_until(busy, 40, what="the agent running on the only process, the loop live")
    worker = data["workers"][0]
    assert (worker["concurrency"], worker["loop_lane"]) == (1, True)
    assert worker["queues"] == sorted([keys.loop_queue, keys.agent_queue])
    time.sleep(float(env["FACTORY_LOOP__STALE_AFTER_S"]) + 1)  # well past a stale heartbeat, were it starved
    data, code = status(env)
    assert (code, data["reason_codes"]) == (0, []), data["reasons"]


def test_killed_reads_killed_until_start_loop_never_missing(env, procs, tmp_path):
    procs.append(CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "2"]))
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    for p in procs:
        p.wait_ready()
    wait_until(lambda: status(env)[1] == 0, 30, what="a live loop")
    killed = ctl(env, "kill-loop", "--json")
    assert killed.returncode == 0, killed.stderr
    by = json.loads(killed.stdout)["by"]
    stale_s = float(env["FACTORY_LOOP__STALE_AFTER_S"])
    for answer in (status(env), full_status(env)):
        data, code = answer
        assert (data["liveness"], code, data["reason_codes"]) == ("killed", 1, ["killed"])
        assert by in data["reasons"][0]
    text = ctl(env, "loop-status").stdout
    assert "loop: killed" in text and f"by {by}" in text
    time.sleep(stale_s + 1)  # the stopping heartbeat expires (its TTL is stale_after_s): still killed
    data, code = status(env)
    assert (data["liveness"], code) == ("killed", 1) and data["heartbeat"] is None
    assert ctl(env, "start-loop").returncode == 0
    wait_until(lambda: status(env)[0]["liveness"] == "live", 30, what="live again after start-loop")
