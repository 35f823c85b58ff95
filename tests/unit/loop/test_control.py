"""LoopControl: run records, abandoned runs, start-loop and kills (fakeredis)."""

from __future__ import annotations

import json

from factory_worker.context import Context
from factory_worker.ledger.keys import Keys
from factory_worker.loop import heartbeat
from factory_worker.loop.iteration import run_iteration
from factory_worker.sources import FileSource
from tests.conftest import roomy_fleet
from tests.support import Recorder


def test_a_lost_chain_is_ended_as_abandoned_by_the_next_run(ctx):
    old = ctx.control.start_run(3, by="test")
    ctx.redis.delete(ctx.keys.loop_lease)  # the lease expired: its worker died mid-run
    new = ctx.control.start_run(3, by="beat")
    assert new.started
    assert ctx.control.run(old.run_id)["status"] == "abandoned"
    assert ctx.control.run(new.run_id)["status"] == "running"
    assert heartbeat.read(ctx.redis, ctx.keys).run_id == new.run_id


def test_start_loop_clears_only_the_kill_it_saw(ctx, monkeypatch):
    ctx.control.set_kill(None, "alice")
    kick = ctx.control.start_run(3, by="start-loop", clear_kill=True)
    assert kick.started and ctx.control.kill_info() is None
    assert kick.cleared_kill["by"] == "alice"
    ctx.control.end_run(kick.run_id, "finished")
    # bob kills between start-loop reading the flag and clearing it: bob's kill stands, nothing starts
    ctx.control.set_kill(None, "alice")
    real_set = ctx.redis.set

    def set_then_bob_kills(*a, **kw):
        out = real_set(*a, **kw)
        if a and a[0] == ctx.keys.loop_lease:
            ctx.redis.hset(ctx.keys.kill, mapping={"by": "bob", "at_ms": "1", "run_id": "", "reason": "x"})
        return out

    monkeypatch.setattr(ctx.redis, "set", set_then_bob_kills)
    kick = ctx.control.start_run(3, by="start-loop", clear_kill=True)
    assert not kick.started and "killed again" in kick.reason
    assert ctx.control.kill_info()["by"] == "bob"
    assert ctx.control.lease_holder() is None


def test_the_run_record_does_not_grow_with_the_backlog(fake_redis, make_settings, tmp_path):
    """Issue 8: a run keeps counts by skip reason and a few examples; per-issue detail stays in the ledger."""
    sizes = {}
    for n in (50, 2000):
        path = tmp_path / f"issues-{n}.jsonl"
        path.write_text("".join(json.dumps({"id": f"B-{i}", "title": "t", "state": "ready"}) + "\n" for i in range(n)))
        s = make_settings(source={"path": str(path)}, dispatch={"max_in_flight": 1})
        fake_redis.flushall()
        roomy_fleet(fake_redis, Keys(s.namespace))
        ctx = Context(s, fake_redis, FileSource(path, s.source.ready_states))
        kick = ctx.control.start_run(1)
        report, _ = run_iteration(ctx, Recorder(), kick.run_id, 0)
        # past a backlog's worth of waiting issues the poll stops gating: the rest are only counted
        gated = len(report.skipped)
        assert report.dispatched == 1 and gated + report.unexamined == n - 1 and gated <= 2 * ctx.keys.BACKLOG_MAX
        stored = ctx.control.run(kick.run_id)["last_report"]
        assert stored["skipped_total"] == gated and stored["skipped_by_reason"] == {"max-in-flight": gated}
        assert stored["unexamined"] == report.unexamined
        assert len(stored["skipped"]) <= 5
        sizes[n] = len(fake_redis.hget(ctx.keys.run(kick.run_id), "last_report"))
        assert fake_redis.ttl(ctx.keys.run(kick.run_id)) <= s.loop.run_retention_s
    assert sizes[2000] <= sizes[50] + 20, sizes  # the same size (up to the digits of the counts)


def test_a_forged_kickoff_cannot_ask_for_an_unbounded_run(ctx):
    from factory_worker.config.settings import MAX_ITERATIONS_CEILING

    kick = ctx.control.start_run(10**9, by="forged")
    assert kick.started and len(kick.task_ids) == MAX_ITERATIONS_CEILING + 1  # iterations, then finish
    assert kick.task_ids[-1].endswith("-finish")
    ctx.control.end_run(kick.run_id, "finished")
    ctx.redis.delete(ctx.keys.loop_lease)
    kick = ctx.control.start_run(-7, by="forged")
    assert kick.started and len(kick.task_ids) == 2
