"""One malformed Linear node (issue 20, item 3) no longer stops all dispatching: ``"state": "Todo"`` (a string
where the schema has a WorkflowState object) is one skipped issue with its reason in ``run-once --dry-run``
and ``explain``, and a real worker and beat dispatch the good issues beside it, no iteration failing. Against
the local fake of Linear's GraphQL API (``tests/fake_linear.py``) and a real Redis."""

from __future__ import annotations

import json

import pytest

from factory_worker.ledger.core import Ledger
from tests.fake_linear import FakeLinear
from tests.support import CeleryProc, assert_audit_clean, ctl, read_events, settings_from, stack_env, wait_until

pytestmark = [pytest.mark.integration]

TOKEN = "lin_api_malformed"
REASON = "state: expected an object, got a string"


@pytest.fixture
def linear():
    with FakeLinear(TOKEN) as fake:
        for n in (1, 2, 3):
            fake.add(f"ENG-{n}", f"issue {n}")
        fake.tamper["ENG-2"] = lambda node: {**node, "state": "Todo"}
        yield fake


def _env(redis_url, namespace, tmp_path, linear):
    return stack_env(
        redis_url,
        namespace,
        tmp_path,
        AGENT_SLEEP="0.1",
        LINEAR_API_KEY=TOKEN,
        FACTORY_SOURCE__KIND="linear",
        FACTORY_SOURCE__LINEAR__TEAM="ENG",
        FACTORY_SOURCE__LINEAR__API_URL=linear.url,
    )


def test_run_once_and_explain_name_the_malformed_node_in_one_line(redis_url, real_redis, namespace, tmp_path, linear):
    env = _env(redis_url, namespace, tmp_path, linear)
    res = ctl(env, "run-once", "--dry-run", "--json")  # was: a traceback (AttributeError), exit 1
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    report = json.loads(res.stdout)
    assert report["pulled"] == 2
    assert [s for s in report["skipped"] if s["reason"].startswith("source:")] == [
        {"issue": "linear:ENG#1 (ENG-2)", "reason": f"source: linear:ENG#1 (ENG-2): {REASON}; skipped"}
    ]
    text = ctl({**env, "COLUMNS": "300"}, "run-once", "--dry-run")  # one table row, not wrapped
    assert text.returncode == 0 and REASON in text.stdout and "Traceback" not in text.stderr, text.stderr
    res = ctl(env, "explain", "--json", "ENG-2")
    assert res.returncode == 0, res.stderr
    e = json.loads(res.stdout)
    assert e["state"] == "malformed" and REASON in e["text"]


def test_a_worker_and_beat_dispatch_the_good_issues_beside_a_malformed_node(
    redis_url, real_redis, namespace, tmp_path, procs, linear
):
    env = _env(redis_url, namespace, tmp_path, linear)
    worker = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "2"])
    procs.append(worker)
    worker.wait_ready()
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    wait_until(lambda: ledger.gauges()["done"] == 2, 60, what="the two good issues done")  # was: never
    iterations = int(ledger.counters().get("iterations", 0))
    wait_until(
        lambda: int(ledger.counters().get("iterations", 0)) >= iterations + 2,
        30,
        interval=0.3,
        what="two more polls over the malformed node",
    )
    assert {e["issue"] for e in read_events(tmp_path / "out")} == {"ENG-1", "ENG-3"}
    assert int(ledger.counters().get("iterations_failed", 0)) == 0
    assert real_redis.hget(ledger.keys.fences, "ENG-2") is None  # never claimed
    assert_audit_clean(redis_url, namespace)
