"""What a kill means (loop/kill.py), decided from Redis as one value, case by case (fakeredis): the target (or
the refusal) before the kill is written, the plan after it. Neither writes anything."""

from __future__ import annotations

import pytest

from factory_worker.loop.kill import EarlyKill, Kill, KillPlan, Refused, Target, kill_plan, kill_target


def _snapshot(r):
    return {k: r.dump(k) for k in sorted(r.keys("*"))}


def _kill(ctx, run_id, by="op@h:1"):
    """Write a kill as the operation does, and the record of it."""
    return Kill(run_id, by, ctx.control.set_kill(run_id, by))


@pytest.fixture
def frozen(ctx):
    """Asserts that what the test plans leaves Redis exactly as it was."""
    before = []
    yield lambda: before.append(_snapshot(ctx.redis))
    assert before and before[-1] == _snapshot(ctx.redis), "a kill target or plan wrote to Redis"


def test_nothing_live_is_refused_and_says_why_unless_forced(ctx, clock, frozen):
    frozen()
    refused = kill_target(ctx.control)
    assert refused == Refused("no live run: no heartbeat (missing, malformed or expired); use --force to kill anyway")
    assert refused.answer() == {"killed": None, "refused": refused.why}
    assert kill_target(ctx.control, release_agents=True) == refused  # nothing killed: no killed loop's agents
    assert kill_target(ctx.control, force=True) == Target(None)  # forced, and no run ever: a kill naming none


def test_a_stale_heartbeat_is_refused_with_its_age(ctx, clock):
    kick = ctx.control.start_run(3, by="test")
    clock.advance(ctx.settings.loop.stale_after_s + 5)
    refused = kill_target(ctx.control)
    assert isinstance(refused, Refused) and "heartbeat is stale (" in refused.why and "--force" in refused.why
    assert kill_target(ctx.control, force=True) == Target(kick.run_id)  # the stale heartbeat still names it


def test_a_killed_loop_is_refused_as_killed_but_its_agents_can_still_be_stopped(ctx, frozen):
    kick = ctx.control.start_run(3, by="test")
    ctx.control.set_kill(kick.run_id, "op@h:1")
    ctx.control.end_run(kick.run_id, "killed", "kill-loop by op@h:1")  # heartbeat: stopping
    frozen()
    refused = kill_target(ctx.control)
    assert isinstance(refused, Refused)
    assert refused.why.startswith(f"the loop is already killed (by op@h:1, run {kick.run_id})")
    assert "--force" not in refused.why
    assert kill_target(ctx.control, release_agents=True) == Target(kick.run_id)


def test_a_live_run_is_the_target_and_the_plan_kills_it_and_revokes_all_its_tasks(ctx):
    kick = ctx.control.start_run(3, by="test")
    target = kill_target(ctx.control)
    assert target == Target(kick.run_id)
    kill = _kill(ctx, target.run_id)
    plan = kill_plan(ctx.control, kill)
    assert plan == KillPlan(kill, kick.run_id, False, None, tuple(kick.task_ids), tuple(kick.task_ids), ())
    assert plan.killed == kick.run_id and plan.ends_run and plan.reason == "kill-loop by op@h:1"


def test_celery_revokes_only_the_tasks_not_yet_run(ctx):
    kick = ctx.control.start_run(3, by="test")
    for i in range(2):  # iterations 0 and 1 done; iteration 1's successor (2) and finish are still to run
        ctx.control.record_iteration(kick.run_id, i, {}, failed=False)
    plan = kill_plan(ctx.control, _kill(ctx, kick.run_id))
    assert plan.revoke == tuple(kick.task_ids)  # durably: every one of them
    assert plan.celery_revoke == tuple(kick.task_ids[1:])  # from the running iteration on


def test_between_runs_nothing_is_ended_or_revoked(ctx, clock, frozen):
    kick = ctx.control.start_run(3, by="test")
    ctx.control.end_run(kick.run_id, "finished", "idle: nothing to dispatch")
    clock.advance(1)  # the kill comes after the run's end (server clock)
    kill = _kill(ctx, kick.run_id)
    frozen()
    plan = kill_plan(ctx.control, kill, release_agents=True)
    assert plan == KillPlan(kill, kick.run_id, True, "finished", (), (), ())
    assert plan.killed is None and not plan.ends_run
    assert plan.answer([], False) == {
        "killed": None,
        "loop_killed": True,
        "last_run": {"run_id": kick.run_id, "status": "finished"},
        "revoked": [],
        "released_agents": [],
        "by": "op@h:1",
        "celery_revoke_sent": False,
    }


def test_a_run_that_ended_at_or_after_the_kill_was_killed_by_it(ctx, frozen):
    """The early path wrote the kill; the run's next iteration saw it and ended the run before the full
    command looked: that run counts as killed by this kill (its tasks revoked; none left for Celery)."""
    kick = ctx.control.start_run(3, by="test")
    kill = _kill(ctx, kick.run_id)
    ctx.control.end_run(kick.run_id, "killed", "killed by op@h:1")  # the iteration's stop path
    frozen()
    plan = kill_plan(ctx.control, kill)
    assert not plan.between and plan.killed == kick.run_id and plan.ends_run
    assert plan.revoke == tuple(kick.task_ids) and plan.celery_revoke == ()


def test_a_run_started_just_before_the_kill_is_the_one_killed(ctx):
    a = ctx.control.start_run(3, by="test")
    ctx.control.end_run(a.run_id, "finished", "idle")
    b = ctx.control.start_run(3, by="beat")  # after the kill's target was read, before it was written
    plan = kill_plan(ctx.control, _kill(ctx, a.run_id))
    assert plan.run_id == b.run_id and plan.killed == b.run_id and plan.revoke == tuple(b.task_ids)


def test_release_agents_stops_every_running_agent_whichever_run_sent_it(ctx, frozen):
    kick = ctx.control.start_run(3, by="test")
    ctx.redis.sadd(ctx.keys.agents, "old-run-agent", "a-task")
    kill = _kill(ctx, kick.run_id)
    frozen()
    assert kill_plan(ctx.control, kill).agents == ()
    assert kill_plan(ctx.control, kill, release_agents=True).agents == ("a-task", "old-run-agent")


def test_a_forced_kill_with_no_run_at_all_names_none(ctx):
    kill = _kill(ctx, None)
    plan = kill_plan(ctx.control, kill)
    assert plan == KillPlan(kill, None, False, None, (), (), ())
    assert plan.killed is None and not plan.ends_run
    answer = plan.answer([{"task_id": "t"}], True, "OSError: broker down")
    assert answer["last_run"] is None and answer["revoked"] == [] and answer["released_agents"] == [{"task_id": "t"}]
    assert answer["celery_revoke_sent"] is True and answer["celery_revoke_error"] == "OSError: broker down"


def test_an_early_kill_counts_only_where_it_went(ctx):
    url = ctx.settings.effective_redis_url
    early = EarlyKill("run-x", "op@h:1", 1, ctx.keys.namespace, url)
    assert early.went_to(ctx.keys.namespace, url)
    assert not early.went_to("other-namespace", url) and not early.went_to(ctx.keys.namespace, "redis://elsewhere")
    assert isinstance(early, Kill)  # a kill like any other once it counts: the plan starts from it
