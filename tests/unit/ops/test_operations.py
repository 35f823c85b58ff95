"""Operator actions behind the CLI (fakeredis)."""

from __future__ import annotations

import dataclasses


def test_explain_says_when_the_source_does_not_have_the_issue_or_it_is_not_ready(ctx):
    from factory_worker.ops.operations import explain

    assert explain(ctx, "I-0").state == "claimable"
    claim = ctx.ledger.claim(["GONE-1"]).claims[0]  # the ledger knows it (a fence): the source no more
    ctx.ledger.release("GONE-1", claim.token)
    gone = explain(ctx, "GONE-1")
    assert gone.state == "not-in-source" and "not in the source" in gone.text
    assert explain(ctx, "NOPE-1").state == "unknown"  # known nowhere (tests/unit/ops/test_explain.py)
    blocked = explain(ctx, "B-1")
    assert blocked.state == "not-ready" and '"blocked"' in blocked.text
    claim = ctx.ledger.claim(["I-1"]).claims[0]
    assert explain(ctx, "I-1").detail["token"] == claim.token  # the ledger's answer wins when it says no


def test_loop_status_and_metrics_show_the_tracker_outbox_backlog(fake_redis, make_settings, issues_file):
    from factory_worker.context import Context
    from factory_worker.loop.presence import publish_slots
    from factory_worker.ops.metrics import render
    from factory_worker.ops.operations import loop_status
    from factory_worker.sources import FileSource

    s = make_settings(
        source={"kind": "github", "github_repo": "acme/widgets", "github_labels": ["agent"]},
        tracker={"write_back": True},
    )
    ctx = Context(s, fake_redis, FileSource(issues_file))
    publish_slots(ctx, "agents@test", 4)
    for claim in ctx.ledger.claim(["I-0", "I-1"]).claims:  # each transition writes its event in its script
        ctx.ledger.begin(claim.issue, claim.token, "task-" + claim.issue)
        ctx.ledger.complete(claim.issue, claim.token)
    status, _ = loop_status(ctx)
    assert status["outbox"] == {"pending": 4, "parked": 0}  # dispatched + done, for each
    fake_redis.hset(ctx.keys.outbox_parked, "1-0", "{}")  # an event given up after its attempts
    assert loop_status(ctx)[0]["outbox"] == {"pending": 4, "parked": 1}
    text = render(ctx)
    assert "factory_outbox_pending 4.0" in text and "factory_outbox_parked 1.0" in text


def test_an_early_kill_for_another_loop_is_not_taken_for_this_one(ctx):
    """kill_loop finishes an early kill only when it went to this command's Redis and namespace."""
    from factory_worker.loop.kill import EarlyKill
    from factory_worker.ops.operations import kill_loop

    kick = ctx.control.start_run(3, by="test")
    elsewhere = EarlyKill("their-run", "op@h:1", 1, "other-namespace", ctx.settings.effective_redis_url)
    out, code = kill_loop(ctx, early=elsewhere)
    assert code == 0 and out["killed"] == kick.run_id  # decided again, here: this loop was live
    assert ctx.control.kill_info()["run_id"] == kick.run_id
    ctx.redis.delete(ctx.keys.kill)
    ctx.control.end_run(kick.run_id, "finished")
    ctx.redis.delete(ctx.keys.heartbeat)
    same = EarlyKill("run-x", "op@h:1", 1, ctx.keys.namespace, ctx.settings.effective_redis_url)
    out, code = kill_loop(ctx, early=same)  # its own: the rest is done for it, no second look at liveness
    assert code == 0 and out["killed"] == "run-x" and not ctx.control.kill_info()


def test_a_kill_between_runs_keeps_the_loop_stopped_and_leaves_the_ended_run_alone(ctx, clock):
    """The loop is live between runs (its last run finished, its heartbeat idle and fresh): kill-loop sets the
    kill and says no run was active, revokes nothing, and leaves the loop not live (stopping), as a kill does."""
    from factory_worker.loop import heartbeat
    from factory_worker.ops.operations import kill_loop

    kick = ctx.control.start_run(3, by="test")
    ctx.control.end_run(kick.run_id, "finished", "idle: nothing to dispatch")
    assert heartbeat.read(ctx.redis, ctx.keys).status == "idle"
    clock.advance(1)  # the kill comes after the run's end (server clock)
    out, code = kill_loop(ctx)
    assert code == 0 and out["killed"] is None and out["loop_killed"] is True and out["revoked"] == []
    assert out["last_run"] == {"run_id": kick.run_id, "status": "finished"}
    assert ctx.control.kill_info()["by"] and not ctx.control.start_run(by="beat").started
    assert heartbeat.read(ctx.redis, ctx.keys).status == "stopping"
    assert ctx.control.run(kick.run_id)["status"] == "finished"  # the ended run stays as it ended
    assert not ctx.redis.exists(ctx.keys.revoked)
    again, code = kill_loop(ctx)
    assert code == 1 and "already killed" in again["refused"] and "--force" not in again["refused"]


def test_a_second_kill_of_a_killed_run_says_the_loop_is_already_killed(ctx):
    from factory_worker.ops.operations import kill_loop

    kick = ctx.control.start_run(3, by="test")
    out, code = kill_loop(ctx)
    assert code == 0 and out["killed"] == kick.run_id
    again, code = kill_loop(ctx)  # the heartbeat says stopping: nothing live to kill
    assert code == 1 and "already killed" in again["refused"] and "--force" not in again["refused"]


def test_only_the_call_that_ends_a_run_writes_its_heartbeat(ctx):
    """``finish`` arriving after a kill does not turn the killed run's heartbeat back to idle."""
    from factory_worker.loop import heartbeat
    from factory_worker.loop.iteration import finish_run

    kick = ctx.control.start_run(3, by="test")
    ran = heartbeat.read(ctx.redis, ctx.keys)
    ctx.redis.set(ctx.keys.heartbeat, dataclasses.replace(ran, pid=4242).to_json())  # the loop worker's
    assert ctx.control.end_run(kick.run_id, "killed", "kill-loop by test")
    ended = heartbeat.read(ctx.redis, ctx.keys)
    assert ended.status == "stopping" and ended.pid == 4242  # where the run ran, not the ending CLI's pid
    assert not finish_run(ctx, kick.run_id)
    assert heartbeat.read(ctx.redis, ctx.keys).status == "stopping"


def test_a_run_that_ends_on_its_own_during_the_kill_still_leaves_the_loop_not_live(ctx):
    """The kill reads the run as running; before it ends it, the run's last iteration (begun before the kill)
    ends it as finished: the kill stands, and the heartbeat must not say idle (live)."""
    from factory_worker.loop import heartbeat
    from factory_worker.ops.operations import kill_loop

    kick = ctx.control.start_run(3, by="test")

    def revoke(task_ids):  # the Celery revoke takes a broker round trip: the run ends meanwhile
        ctx.control.end_run(kick.run_id, "finished", "idle: nothing to dispatch")

    out, code = kill_loop(ctx, revoke=revoke)
    assert code == 0 and out["killed"] == kick.run_id
    assert heartbeat.read(ctx.redis, ctx.keys).status == "stopping"
    assert not heartbeat.check(ctx.redis, ctx.keys, 60).live


def test_a_run_started_just_before_the_kill_is_the_one_killed(ctx):
    """A kickoff starts run B after kill-loop read the heartbeat of the ended run A: B is killed, not A."""
    from factory_worker.ops.operations import kill_loop

    a = ctx.control.start_run(3, by="test")
    ctx.control.end_run(a.run_id, "finished", "idle")
    idle = ctx.redis.get(ctx.keys.heartbeat)
    b = ctx.control.start_run(3, by="beat")
    ctx.redis.set(ctx.keys.heartbeat, idle)  # what the kill read, just before B's kickoff wrote its own
    out, code = kill_loop(ctx)
    assert code == 0 and out["killed"] == b.run_id and out["revoked"]
    assert ctx.control.run(b.run_id)["status"] == "killed" and set(out["revoked"]) == set(b.task_ids)


def test_release_agents_after_a_kill_is_not_refused(ctx, clock):
    """The graded stop: kill-loop, then kill-loop --release-agents stops the agents of the killed loop."""
    from factory_worker.ops.operations import kill_loop

    kick = ctx.control.start_run(3, by="test")
    assert kill_loop(ctx)[1] == 0
    assert kill_loop(ctx)[1] == 1  # a plain second kill has nothing to do
    clock.advance(1)
    out, code = kill_loop(ctx, release_agents=True, grace_s=0)
    assert code == 0 and out["loop_killed"] and out["last_run"] == {"run_id": kick.run_id, "status": "killed"}


def test_a_run_its_iteration_ended_after_the_early_kill_is_reported_killed(ctx):
    """The early path wrote the kill; the run's next iteration saw it and ended the run (killed) before the full
    command looked: that run was killed by this command, so it is reported and its tasks revoked."""
    from factory_worker.loop.kill import EarlyKill, kill_record
    from factory_worker.ops.operations import kill_loop

    kick = ctx.control.start_run(3, by="test")
    at_ms = ctx.ledger.now_ms()
    ctx.redis.hset(ctx.keys.kill, mapping=kill_record(kick.run_id, "op@h:1", at_ms))
    ctx.control.end_run(kick.run_id, "killed", "killed by op@h:1")  # the iteration's stop path
    early = EarlyKill(kick.run_id, "op@h:1", at_ms, ctx.keys.namespace, ctx.settings.effective_redis_url)
    out, code = kill_loop(ctx, early=early)
    assert code == 0 and out["killed"] == kick.run_id and set(out["revoked"]) == set(kick.task_ids)
