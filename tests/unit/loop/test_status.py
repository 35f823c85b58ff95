"""loop-status's answer (loop/status.py, loop/reasons.py) on fakeredis: each reason the loop cannot make
progress, the killed state, and a loop that can (exit 0). With real workers: tests/integration/test_loop_reasons.py."""

from __future__ import annotations

import pytest

from factory_worker.ledger.redis_client import redis_py_sender
from factory_worker.loop import presence, reasons, status
from factory_worker.loop.iteration import run_iteration
from factory_worker.ops.operations import kill_loop, loop_status
from factory_worker.sources.base import PollResult, SourceError
from tests.support import Recorder


def fleet(ctx, queues=None, concurrency=4, agents=0, waiting=0, slots=3, node="w1@h", beat=True):
    both = (ctx.keys.loop_queue, ctx.keys.agent_queue)
    facts = presence.WorkerFacts(tuple(queues or both), concurrency, agents, waiting)
    presence.publish_worker(ctx, node, 1, facts=facts)
    presence.publish_slots(ctx, node, slots)
    if beat:
        presence.publish_beat(ctx)


@pytest.fixture
def live(ctx):
    """A live run on a fleet that can make progress: a worker on both queues and a beat."""
    ctx.redis.delete(ctx.keys.slots)
    fleet(ctx)
    assert ctx.control.start_run(3, by="test").started
    return ctx


def test_a_loop_that_can_make_progress_has_no_reason(live):
    data, code = loop_status(live)
    assert (data["liveness"], code, data["reasons"], data["reason_codes"]) == ("live", 0, [], [])
    assert data["beats"] and data["workers"][0]["queues"] == [live.keys.loop_queue, live.keys.agent_queue]


def test_live_without_any_worker_exits_1(live):
    presence.clear_worker(live, "w1@h")  # every worker stopped; the heartbeat is still fresh
    data, code = loop_status(live)
    assert data["liveness"] == "live" and code == 1
    assert data["reason_codes"] == ["no-worker"] and data["reasons"][0].startswith("no live worker")


def test_no_worker_on_the_loop_queue_with_the_kickoffs_waiting(live):
    presence.clear_worker(live, "w1@h")
    fleet(live, queues=[live.keys.agent_queue], node="a1@h")
    live.redis.rpush(live.keys.loop_queue, *["kickoff"] * 7)  # kombu's list of the loop queue (the broker)
    live.redis.rpush(live.keys.loop_queue + "\x06\x163", "kickoff")  # and of its priority 3
    data, code = loop_status(live)
    assert code == 1 and data["reason_codes"] == ["no-loop-worker"] and data["loop_queue"]["waiting"] == 8
    assert data["reasons"][0].startswith(f"no worker consumes the loop queue {live.keys.loop_queue} (8 loop task(s)")


def test_no_agent_slot_in_the_fleet(live):
    presence.clear_worker(live, "w1@h")
    fleet(live, queues=[live.keys.loop_queue], slots=0, node="loop@h")
    presence.clear_slots(live, "loop@h")
    data, code = loop_status(live)
    assert code == 1 and data["reason_codes"] == ["no-agent-slot"]
    assert f"no live worker consumes {live.keys.agent_queue}" in data["reasons"][0]


def test_the_only_workers_processes_all_running_agents_while_loop_tasks_wait(live):
    presence.clear_worker(live, "w1@h")
    fleet(live, concurrency=1, agents=1, waiting=1, slots=1, node="solo@h")  # -c 1: its one process runs an agent
    data, code = loop_status(live)
    assert code == 1 and data["reason_codes"] == ["loop-starved"]
    assert "solo@h" in data["reasons"][0] and "1 loop task(s) wait" in data["reasons"][0]
    fleet(live, concurrency=1, agents=1, waiting=0, slots=1, node="solo@h")  # nothing waits: not starved (yet)
    assert loop_status(live)[1] == 0
    fleet(live, queues=[live.keys.loop_queue], concurrency=2, slots=0, node="loop@h")  # a worker for the loop
    fleet(live, concurrency=1, agents=1, waiting=1, slots=1, node="solo@h")
    assert loop_status(live)[0]["reason_codes"] == []


def test_no_beat_is_why_a_loop_that_is_not_live_stays_so(live):
    presence.clear_beat(live)
    assert loop_status(live)[1] == 0  # the live run goes on without it (a flushed Redis lacks its key a while)
    live.control.end_run(live.control.current_run_id(), "stopping")
    data, code = loop_status(live)
    assert code == 1 and data["reason_codes"] == ["no-beat"]


class Down:
    def poll(self) -> PollResult:
        raise SourceError("issue source /data/issues.jsonl: no such file or directory")

    def get(self, issue_id):
        return None


def test_the_source_failing_since_when_and_its_error(live, clock):
    run_id = live.control.current_run_id()
    live._source = Down()
    run_iteration(live, Recorder(), run_id, 0)
    since = live.ledger.now_ms()
    clock.advance(30)
    fleet(live)  # its presence refreshed meanwhile
    run_iteration(live, Recorder(), run_id, 1)
    data, code = loop_status(live)
    assert code == 1 and data["reason_codes"] == ["source-failing"]
    assert data["failing"]["since_ms"] == since and data["failing"]["failures"] == 2
    why = data["reasons"][0]
    assert why.startswith(f"the source is failing since {reasons.when(since)} (2 failed iteration(s)")
    assert "no such file or directory" in why
    # across runs, until an iteration polls again without failing
    kick = live.control.start_run(3, by="test")
    assert not kick.started  # the run is live: the same run goes on
    live._source = None  # the file source again
    run_iteration(live, Recorder(), run_id, 2)
    assert loop_status(live)[0]["failing"] is None


def test_claims_refused_for_want_of_replica_acknowledgements(live):
    live.redis.set(
        live.keys.worker("w1@h"),
        live.redis.get(live.keys.worker("w1@h")).replace('"min_replica_acks": 0', '"min_replica_acks": 2'),
    )
    data = status.read(redis_py_sender(live.redis), status.Query(live.keys, 60))[0]
    assert data["min_replica_acks"] == 2
    data["replicas"] = {"role": "master", "connected": 1}  # what INFO says on a real primary (fakeredis has none)
    found = reasons.find(data)
    assert [c for c, _ in found] == ["replica-acks"]
    assert "min_replica_acks is 2 but the primary has 1 connected replica(s)" in found[0][1]


def test_killed_until_start_loop_never_missing(live, clock):
    out, code = kill_loop(live)
    assert code == 0
    data, code = loop_status(live)
    assert (data["liveness"], data["live"], code) == ("killed", False, 1)
    assert data["reason_codes"] == ["killed"] and out["by"] in data["reasons"][0]
    clock.advance(3600)  # the heartbeat expired long ago
    presence.publish_beat(live)
    fleet(live)
    assert not live.redis.exists(live.keys.heartbeat)
    data, code = loop_status(live)
    assert (data["liveness"], code) == ("killed", 1)
    assert live.control.start_run(3, by="start-loop", clear_kill=True).started
    assert loop_status(live)[:2][1] == 0


def test_the_text_says_each_reason(live):
    presence.clear_worker(live, "w1@h")
    data, _ = loop_status(live)
    text = status.lines(data, lambda t, tag: t, str, str)
    assert "reason: no live worker: nothing runs the loop or its agents" in text
