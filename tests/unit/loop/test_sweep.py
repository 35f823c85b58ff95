"""The loop's housekeeping (sweep.py) on fakeredis: agents of dead workers forgotten once their claims are
gone; claims whose broker message is gone released, and only those."""

from __future__ import annotations

import json

import pytest

from factory_worker.config.settings import load_settings
from factory_worker.context import Context
from factory_worker.ledger.core import Ledger
from factory_worker.ledger.states import Begin
from factory_worker.loop.sweep import (
    KOMBU_UNACKED,
    LOST_AFTER_S,
    broker_task_ids,
    forget_dead_agents,
    release_lost_messages,
)
from factory_worker.ops.audit import audit
from tests.conftest import roomy_fleet

QUEUE = "t.agents"


@pytest.fixture
def ledger(fake_redis, keys, make_settings):
    roomy_fleet(fake_redis, keys)
    return Ledger(fake_redis, keys, make_settings(dispatch={"max_in_flight": 10}).dispatch)


@pytest.fixture
def ctx(fake_redis, keys, ledger):
    c = Context(load_settings(namespace=keys.namespace), fake_redis)
    c.ledger = ledger
    return c


def checks(r, keys):
    return {(v["check"], v["subject"]) for v in audit(r, keys)["violations"]}


def _sent(r, keys, ledger, issue, task_id, sent_s):
    """A claim whose agent task was sent at ``sent_s`` (as loop.dispatch_claims records it)."""
    claim = ledger.claim([issue]).claims[0]
    r.hset(keys.agent_task(task_id), mapping={"issue": issue, "token": claim.token, "state": "queued"})
    r.zadd(keys.queued, {task_id: int(sent_s * 1000)})
    return claim


def _message(task_id):
    return json.dumps({"body": "e30=", "headers": {"id": task_id, "task": "factory.agent.run"}, "properties": {}})


def test_the_loop_forgets_the_agents_of_a_dead_worker_once_their_claims_are_gone(fake_redis, keys, ledger, clock, ctx):
    a = ledger.claim(["a"]).claims[0]
    fake_redis.hset(keys.agent_task("agent-a"), mapping={"issue": "a", "token": a.token})  # as the loop sends it
    ledger.begin("a", a.token, "agent-a", hostname="dead@h")  # its worker was SIGKILLed: no presence
    assert forget_dead_agents(ctx) == []  # its claim still holds: the lease has not run out
    clock.advance(ledger.cfg.lease_ttl_s + 1)
    assert ("agent-on-dead-worker", "agent-a") in checks(fake_redis, keys)
    assert forget_dead_agents(ctx) == ["agent-a"]
    assert not checks(fake_redis, keys)


def test_the_loop_forgets_an_agent_a_live_worker_could_not_clean_up_once_its_claim_is_gone(
    fake_redis, keys, ledger, clock, ctx
):
    """A worker cut off from Redis stops its agent before the lease ends but cannot remove it from the
    running set; healed, it lives on: the entry goes once the claim is gone (test_partition.py saw them)."""
    a = ledger.claim(["a"]).claims[0]
    fake_redis.hset(keys.agent_task("agent-a"), mapping={"issue": "a", "token": a.token})
    ledger.begin("a", a.token, "agent-a", hostname="w1@h")
    fake_redis.set(keys.worker("w1@h"), json.dumps({"hostname": "w1@h"}))  # alive throughout
    assert forget_dead_agents(ctx) == []  # held: its agent may be running
    clock.advance(ledger.cfg.lease_ttl_s + 1)
    assert forget_dead_agents(ctx) == ["agent-a"]
    assert not fake_redis.smembers(keys.agents) and not fake_redis.exists(keys.agent_task("agent-a"))
    assert not checks(fake_redis, keys)


def test_a_claim_whose_message_is_gone_is_released_and_claimable_again(fake_redis, keys, ledger, clock, ctx):
    now = clock.time()
    _sent(fake_redis, keys, ledger, "lost", "t-lost", now - LOST_AFTER_S - 1)
    _sent(fake_redis, keys, ledger, "waiting", "t-wait", now - LOST_AFTER_S - 1)
    _sent(fake_redis, keys, ledger, "unacked", "t-unacked", now - LOST_AFTER_S - 1)
    _sent(fake_redis, keys, ledger, "young", "t-young", now - 1)
    fake_redis.lpush(QUEUE, _message("t-wait"))  # still waiting in the agent queue
    fake_redis.hset(KOMBU_UNACKED, "tag-1", json.dumps([json.loads(_message("t-unacked")), "", QUEUE]))
    assert broker_task_ids(fake_redis, QUEUE) == {"t-wait", "t-unacked"}
    assert release_lost_messages(ctx, fake_redis, QUEUE, now_s=now, recheck_s=0) == ["t-lost"]
    assert ledger.current_token("lost") is None and ledger.explain("lost").state == "claimable"
    assert all(ledger.current_token(i) for i in ("waiting", "unacked", "young"))  # left alone
    assert int(fake_redis.hget(keys.counters, "released_message-lost")) == 1
    assert fake_redis.zscore(keys.queued, "t-lost") is None


def test_a_started_agent_is_never_released_and_a_late_message_runs_nothing(fake_redis, keys, ledger, clock, ctx):
    now = clock.time()
    started = _sent(fake_redis, keys, ledger, "s", "t-s", now - LOST_AFTER_S - 1)
    assert ledger.begin("s", started.token, "t-s") == Begin.STARTED  # begin takes it off the queued set
    assert fake_redis.zscore(keys.queued, "t-s") is None
    fake_redis.zadd(keys.queued, {"t-s": int((now - LOST_AFTER_S - 1) * 1000)})  # even if it were still listed
    assert release_lost_messages(ctx, fake_redis, QUEUE, now_s=now, recheck_s=0) == []
    assert ledger.current_token("s") == started.token
    late = _sent(fake_redis, keys, ledger, "late", "t-late", now - LOST_AFTER_S - 1)
    assert release_lost_messages(ctx, fake_redis, QUEUE, now_s=now, recheck_s=0) == ["t-late"]
    with pytest.raises(Exception, match="no live claim|stale|gone|held"):
        ledger.begin("late", late.token, "t-late")  # the message shows up after all: it runs nothing


def test_garbage_in_the_broker_is_ignored(fake_redis):
    fake_redis.lpush(QUEUE, "not json", json.dumps({"headers": {}}), json.dumps([1, 2]))
    fake_redis.hset(KOMBU_UNACKED, "x", "[]")
    assert broker_task_ids(fake_redis, QUEUE) == set()
