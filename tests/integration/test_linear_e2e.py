"""Linear end to end: a real worker and beat poll a (fake) Linear team, run the agents and write back through
the outbox: done issues end in Done with one comment per (dispatch, event), a retried one shows its backoff,
a worker SIGKILLed while a comment is being created does not make it appear twice, and the key never
reaches an agent or a log."""

from __future__ import annotations

import json
import re
import signal
from collections import Counter

import pytest

from factory_worker.ledger.core import Ledger
from factory_worker.writeback.outbox import backlog
from tests.fake_linear import FakeLinear
from tests.support import CeleryProc, assert_audit_clean, settings_from, stack_env, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.chaos]

TOKEN = "lin_api_e2e_secret"


@pytest.fixture
def linear():
    with FakeLinear(TOKEN) as fake:
        yield fake


def _env(redis_url, namespace, tmp_path, linear):
    return stack_env(
        redis_url,
        namespace,
        tmp_path,
        AGENT_SLEEP="0.2",
        LINEAR_API_KEY=TOKEN,
        FACTORY_SOURCE__KIND="linear",
        FACTORY_SOURCE__LINEAR__TEAM="ENG",
        FACTORY_SOURCE__LINEAR__API_URL=linear.url,
        FACTORY_SOURCE__LINEAR__LABELS='["agent"]',
        FACTORY_TRACKER__WRITE_BACK="true",
        FACTORY_TRACKER__POLL_S="0.2",
        FACTORY_TRACKER__TAKEOVER_S="2",
        FACTORY_TRACKER__BACKOFF_BASE_S="0.2",
        FACTORY_LOOP__LEASE_TTL_S="5",
    )


def _kinds(comments: list[str]) -> list[str]:
    return [c.split("**")[1] for c in comments]


def _drained(ledger: Ledger, n: int) -> bool:
    g = ledger.gauges()
    return g["done"] + g["parked"] == n and backlog(ledger.r, ledger.keys)["pending"] == 0


def test_linear_issues_run_once_and_end_done_with_one_comment_per_event(
    redis_url, real_redis, namespace, tmp_path, procs, linear
):
    for n in (1, 2):
        linear.add(f"ENG-{n}", f"issue {n}", labels=("agent",))
    linear.add("ENG-3", "fails once", labels=("agent", "fails-once"))
    linear.add("ENG-4", "not for agents")
    env = _env(redis_url, namespace, tmp_path, linear)
    worker = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "3"])
    procs.append(worker)
    worker.wait_ready()
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    wait_until(lambda: _drained(ledger, 3), 60, what="every issue done and reported")
    states = {k: i.state for k, i in linear.issues.items()}
    assert states == {"ENG-1": "Done", "ENG-2": "Done", "ENG-3": "Done", "ENG-4": "Todo"}
    assert _kinds(linear.issues["ENG-1"].comments) == ["dispatched", "done"]
    assert _kinds(linear.issues["ENG-3"].comments) == ["dispatched", "backoff", "dispatched", "done"]
    assert linear.issues["ENG-4"].comments == []
    assert {auth for _, auth in linear.requests} == {TOKEN}
    agents_env = (tmp_path / "out").read_text() if (tmp_path / "out").is_file() else ""
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.log")) + agents_env
    assert TOKEN not in logs
    assert_audit_clean(redis_url, namespace)


def test_a_worker_killed_while_a_comment_is_created_does_not_post_it_twice(
    redis_url, real_redis, namespace, tmp_path, procs, linear
):
    for n in range(1, 5):
        linear.add(f"ENG-{n}", f"issue {n}", labels=("agent",))
    linear.delay_comment_s = 1.5  # created at once, answered late: the window between POST and ack
    env = _env(redis_url, namespace, tmp_path, linear)
    doomed = CeleryProc("worker", env, tmp_path, "doomed", extra=["-c", "2"])
    procs.append(doomed)
    doomed.wait_ready()
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    wait_until(lambda: any(i.comments for i in linear.issues.values()), 30, what="a comment created")
    doomed.signal(signal.SIGKILL)
    linear.delay_comment_s = 0
    survivor = CeleryProc("worker", env, tmp_path, "survivor", extra=["-c", "2"])
    procs.append(survivor)
    survivor.wait_ready()
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    wait_until(lambda: _drained(ledger, 4), 90, what="every issue done and reported after the kill")
    for issue in linear.issues.values():
        marks = Counter(re.findall(r"<!-- factory-worker:(\S+) -->", "\n".join(issue.comments)))
        assert marks and max(marks.values()) == 1, (issue.identifier, issue.comments)
        assert issue.state == "Done" and _kinds(issue.comments)[-1] == "done"
    assert json.loads(json.dumps(backlog(real_redis, ledger.keys))) == {"pending": 0, "parked": 0}
