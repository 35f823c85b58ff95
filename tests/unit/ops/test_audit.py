"""factory-worker audit: each ledger invariant, planted broken one at a time, is found (fakeredis)."""

from __future__ import annotations

import json

import pytest

from factory_worker.ledger.core import Ledger
from factory_worker.ops.audit import audit
from tests.conftest import roomy_fleet


@pytest.fixture
def ledger(fake_redis, keys, make_settings):
    roomy_fleet(fake_redis, keys)
    return Ledger(fake_redis, keys, make_settings(dispatch={"max_in_flight": 10}).dispatch)


def checks(r, keys):
    return {(v["check"], v["subject"]) for v in audit(r, keys, recheck_s=0)["violations"]}


def test_a_healthy_ledger_is_clean(fake_redis, keys, ledger):
    a, b = ledger.claim(["a", "b"]).claims
    ledger.begin("a", a.token, "agent-a", hostname="w1@h")
    fake_redis.set(keys.worker("w1@h"), json.dumps({"hostname": "w1@h"}), px=10_000)
    ledger.complete("b", b.token)
    c = ledger.claim(["c"]).claims[0]
    ledger.fail("c", c.token, "boom")
    result = audit(fake_redis, keys, recheck_s=0)
    assert result["clean"] and result["violations"] == []


@pytest.mark.parametrize(
    "plant, expected",
    [
        (lambda r, k, l: r.zrem(k.inflight, "a"), ("claim-without-inflight", "a")),
        (lambda r, k, l: r.zadd(k.inflight, {"ghost": 2**52}), ("inflight-without-claim", "ghost")),
        (lambda r, k, l: r.hset(k.started, "a", "9:someone.1"), ("started-not-claimed", "a")),
        (lambda r, k, l: r.hset(k.done, "a", "1:123"), ("done-and-in-flight", "a")),
        (
            lambda r, k, l: (r.hset(k.done_bucket("z"), "z", "5:123"), r.zadd(k.backoff, {"z": 2**52})),
            ("done-and-backoff", "z"),
        ),
        (
            lambda r, k, l: (r.hset(k.done_bucket("z"), "z", "5:123"), r.hset(k.parked, "z", 1)),
            ("done-and-parked", "z"),
        ),
        (
            lambda r, k, l: (r.hset(k.done_bucket("z"), "z", "5:123"), r.hset(k.fences, "z", 3)),
            ("fence-below-done", "z"),
        ),
        (
            lambda r, k, l: (r.sadd(k.agents, "agent-x"), r.hset(k.agent_task("agent-x"), "hostname", "gone@host")),
            ("agent-on-dead-worker", "agent-x"),
        ),
    ],
)
def test_each_planted_violation_is_reported(fake_redis, keys, ledger, plant, expected):
    ledger.claim(["a"])
    assert not checks(fake_redis, keys)
    plant(fake_redis, keys, ledger)
    assert expected in checks(fake_redis, keys)


def test_a_running_agent_on_a_live_worker_is_fine(fake_redis, keys, ledger):
    a = ledger.claim(["a"]).claims[0]
    ledger.begin("a", a.token, "agent-a", hostname="w1@h")
    fake_redis.set(keys.worker("w1@h"), json.dumps({"hostname": "w1@h"}), px=10_000)
    assert not checks(fake_redis, keys)
    fake_redis.delete(keys.worker("w1@h"))
    assert ("agent-on-dead-worker", "agent-a") in checks(fake_redis, keys)
