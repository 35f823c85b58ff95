"""The loop core without Celery: iterate, run_iteration, breaker, kill checks, refill (fakeredis)."""

from __future__ import annotations

import pytest

from factory_worker.context import Context
from factory_worker.loop import heartbeat
from factory_worker.loop.iteration import finish_run, iterate, run_iteration
from factory_worker.sources import FileSource
from factory_worker.sources.base import SourceError
from tests.conftest import roomy_fleet
from tests.support import Recorder


def test_iterate_claims_up_to_the_cap_and_reports_every_skip(ctx):
    send = Recorder()
    report = iterate(ctx, send)
    assert report.pulled == 5 and report.dispatched == 3 and not report.dry_run
    assert [s[1] for s in send.sent] == ["I-0", "I-1", "I-2"]
    assert {s["issue"]: s["reason"] for s in report.skipped} == {"I-3": "max-in-flight", "I-4": "max-in-flight"}
    again = iterate(ctx, Recorder())
    assert again.dispatched == 0
    assert {s["reason"] for s in again.skipped} == {"in-flight", "max-in-flight"}
    # every sent task maps to its claim, so a revoke can release by token
    task_id, issue, token, _ = send.sent[0]
    assert ctx.redis.hgetall(ctx.keys.agent_task(task_id))["token"] == token


def test_send_failure_releases_every_unsent_claim(ctx):
    send = Recorder(fail_after=1)
    with pytest.raises(ConnectionError):
        iterate(ctx, send)
    assert len(send.sent) == 1
    assert ctx.ledger.gauges()["in_flight"] == 1  # only the sent one is held
    for issue in ("I-1", "I-2"):
        assert ctx.ledger.explain(issue).state == "claimable"
    assert ctx.ledger.counters()["released_send-failed"] == 2


def test_dry_run_writes_nothing(ctx):
    before = {k: ctx.redis.dump(k) for k in ctx.redis.keys("*")}
    report = iterate(ctx, None, dry_run=True)
    assert report.dry_run and report.dispatched == 3 and report.pulled == 5
    assert {k: ctx.redis.dump(k) for k in ctx.redis.keys("*")} == before


def test_paused_loop_claims_nothing(ctx):
    ctx.control.set_paused(True, by="test")
    report = iterate(ctx, Recorder())
    assert report.stopped == "paused" and report.dispatched == 0
    assert ctx.ledger.gauges()["in_flight"] == 0
    kick = ctx.control.start_run(3, by="beat")  # a pause stops no run: the loop stays live, claiming nothing
    assert kick.started
    for index in range(2):
        report, go_on = run_iteration(ctx, Recorder(), kick.run_id, index, task_id=kick.task_ids[index])
        assert report.stopped == "paused" and report.dispatched == 0 and go_on  # not ended as idle
    assert ctx.control.run(kick.run_id)["status"] == "running"
    assert heartbeat.check(ctx.redis, ctx.keys, 60).live
    finish_run(ctx, kick.run_id)
    ctx.control.set_paused(False)
    assert iterate(ctx, Recorder()).dispatched == 3


def test_run_lifecycle_heartbeat_and_lease(ctx):
    kick = ctx.control.start_run(2, by="test")
    assert kick.started and kick.task_ids == [f"{kick.run_id}-iter-0", f"{kick.run_id}-iter-1", f"{kick.run_id}-finish"]
    assert not ctx.control.start_run(by="beat").started  # overlap SKIP
    report, go_on = run_iteration(ctx, Recorder(), kick.run_id, 0)
    assert go_on and report.dispatched == 3
    hb = heartbeat.read(ctx.redis, ctx.keys)
    assert hb.status == "running" and hb.iteration == 1 and hb.max_iterations == 2
    assert finish_run(ctx, kick.run_id)
    assert not finish_run(ctx, kick.run_id)  # ends once
    assert heartbeat.read(ctx.redis, ctx.keys).status == "idle"
    assert ctx.control.lease_holder() is None
    assert ctx.control.run(kick.run_id)["status"] == "finished"
    assert ctx.control.start_run(by="beat").started


def test_kill_flag_stops_the_next_iteration(ctx):
    kick = ctx.control.start_run(3, by="test")
    ctx.control.set_kill(kick.run_id, "test")
    report, go_on = run_iteration(ctx, Recorder(), kick.run_id, 0)
    assert not go_on and report.stopped.startswith("killed")
    assert ctx.control.run(kick.run_id)["status"] == "killed"
    assert heartbeat.read(ctx.redis, ctx.keys).status == "stopping"
    assert ctx.control.lease_holder() is None
    k = ctx.control.start_run(by="beat")
    assert not k.started and "killed" in k.reason
    assert ctx.ledger.gauges()["in_flight"] == 0


def test_revoked_iteration_does_nothing(ctx):
    kick = ctx.control.start_run(3, by="test")
    ctx.control.revoke_ids([kick.task_ids[1]])
    _, go_on = run_iteration(ctx, Recorder(), kick.run_id, 1, task_id=kick.task_ids[1])
    assert not go_on
    assert ctx.ledger.gauges()["in_flight"] == 0


class BrokenSource:
    def poll(self):
        raise SourceError("source down")

    def get(self, issue_id):
        return None


def test_failing_iterations_are_recorded_and_the_breaker_opens(fake_redis, make_settings):
    s = make_settings(loop={"breaker_failures": 3})
    ctx = Context(s, fake_redis, BrokenSource())
    kick = ctx.control.start_run(5, by="test")
    for i in range(2):
        report, go_on = run_iteration(ctx, Recorder(), kick.run_id, i)
        assert go_on and "source down" in report.error
    report, go_on = run_iteration(ctx, Recorder(), kick.run_id, 2)
    assert not go_on and report.stopped == "breaker open"
    run = ctx.control.run(kick.run_id)
    assert run["status"] == "stopping" and "breaker open" in run["reason"] and run["failures"] == 3
    assert heartbeat.read(ctx.redis, ctx.keys).status == "stopping"


def test_one_good_iteration_resets_the_breaker(fake_redis, make_settings, issues_file):
    s = make_settings(loop={"breaker_failures": 2})
    ctx = Context(s, fake_redis, BrokenSource())
    kick = ctx.control.start_run(5, by="test")
    assert run_iteration(ctx, Recorder(), kick.run_id, 0)[1]
    ctx._source = FileSource(issues_file)
    assert run_iteration(ctx, Recorder(), kick.run_id, 1)[1]
    ctx._source = BrokenSource()
    assert run_iteration(ctx, Recorder(), kick.run_id, 2)[1]  # 1 consecutive failure only


def test_a_killed_loop_claims_nothing_even_mid_iteration(ctx):
    """kill-loop may land after an iteration passed its kill check: the claim script refuses then."""
    ctx.control.set_kill(None, "test")
    batch = ctx.ledger.claim(["I-0", "I-1"])
    assert not batch.claims and {s.reason for s in batch.skipped} == {"killed"}
    assert ctx.ledger.counters()["skipped_killed"] == 2
    ctx.redis.delete(ctx.keys.kill)
    assert len(ctx.ledger.claim(["I-0"]).claims) == 1


def test_an_ended_run_never_flips_the_heartbeat_back_to_running(ctx):
    """kill-loop ends the run between an iteration's checks and its heartbeat: the heartbeat stays stopping."""
    kick = ctx.control.start_run(3, by="test")
    ctx.control.end_run(kick.run_id, "killed", "kill-loop")
    assert ctx.control.begin_iteration(kick.run_id, 1, 3, 0.0) == "the run has ended"
    assert heartbeat.read(ctx.redis, ctx.keys).status == "stopping"


def test_the_lease_covers_the_gap_before_the_next_iteration(ctx, clock):
    kick = ctx.control.start_run(3, by="test")
    lease_s = ctx.settings.loop.lease_ttl_s
    assert ctx.control.begin_iteration(kick.run_id, 1, 3, gap_s=lease_s * 2) is None
    clock.advance(lease_s * 2.5)  # longer than a bare lease, shorter than lease + gap
    assert ctx.control.lease_holder() == kick.run_id


def test_a_kickoff_takes_the_lease_over_from_a_run_whose_holder_is_dead(ctx):
    """The worker that ran a run's latest iteration is its holder; while its presence key lives the run is
    live (overlap SKIP), once it is gone the next kickoff takes the lease and ends the lost run."""
    kick = ctx.control.start_run(3, by="test")
    assert ctx.control.begin_iteration(kick.run_id, 1, 3, 0.0, worker="loop1@h") is None
    ctx.redis.set(ctx.keys.worker("loop1@h"), "{}")  # alive
    assert not ctx.control.start_run(3, by="test").started
    ctx.redis.delete(ctx.keys.worker("loop1@h"))  # SIGKILLed: its presence key expired
    again = ctx.control.start_run(3, by="test")
    assert again.started and ctx.control.lease_holder() == again.run_id
    assert ctx.control.run_status(kick.run_id) == "abandoned"
    assert ctx.control.begin_iteration(kick.run_id, 2, 3, 0.0, worker="loop2@h") == "the run has ended"
    assert ctx.redis.hget(ctx.keys.counters, "lease_takeovers") == "1"


def test_no_takeover_before_a_run_has_a_holder(ctx):
    kick = ctx.control.start_run(3, by="test")  # its first iteration has not begun: no holder yet
    assert not ctx.control.start_run(3, by="test").started and ctx.control.lease_holder() == kick.run_id


def test_a_paused_loop_claims_nothing_even_mid_iteration(ctx):
    ctx.control.set_paused(True, by="test")
    batch = ctx.ledger.claim(["I-0"])
    assert not batch.claims and batch.skipped[0].reason == "paused"
    ctx.control.set_paused(False)
    assert ctx.ledger.claim(["I-0"]).claims


def test_a_freed_slot_is_refilled_from_the_backlog_through_the_same_gate(fake_redis, make_settings, issues_file):
    """Issue 8: the agent task that frees a slot dispatches the next waiting issue at once, never past the
    cap, never an issue the gate refuses, and never while the loop is killed."""
    from factory_worker.loop.iteration import refill

    s = make_settings(source={"path": str(issues_file)}, dispatch={"max_in_flight": 2})
    ctx = Context(s, fake_redis, FileSource(issues_file))
    roomy_fleet(fake_redis, ctx.keys)
    send = Recorder()
    first = iterate(ctx, send)
    assert first.dispatched == 2 and fake_redis.llen(ctx.keys.backlog) == first.pulled - 2
    assert refill(ctx, send) is None and len(send.sent) == 2  # no room yet: the cap holds
    _, issue, token, _ = send.sent[0]
    ctx.ledger.complete(issue, token)  # a slot frees
    ctx.control.set_kill(None, "test")
    assert refill(ctx, send) is None and len(send.sent) == 2  # killed: nothing, and the issue waits on
    ctx.redis.delete(ctx.keys.kill)
    nxt = refill(ctx, send)
    assert nxt is not None and len(send.sent) == 3 and send.sent[-1][1] == nxt
    assert ctx.ledger.explain(nxt).state == "in-flight"
    assert ctx.ledger.counters()["refilled"] == 1


@pytest.mark.parametrize("end_idle", [True, False])
def test_a_run_ends_at_an_idle_iteration_and_goes_on_while_issues_wait_for_room(ctx, end_idle):
    """5 issues, cap 3: iteration 1 dispatches, iteration 2 has two issues waiting for room (goes on);
    once all 5 are done, an iteration has nothing to do and ends the run as finished, unless turned off."""
    ctx.settings.loop.end_idle_runs = end_idle
    kick = ctx.control.start_run(5, by="test")
    send = Recorder()
    assert run_iteration(ctx, send, kick.run_id, 0)[1]
    report, go_on = run_iteration(ctx, send, kick.run_id, 1)
    assert report.dispatched == 0 and go_on  # I-3 and I-4 wait for room: polling again may dispatch them
    for _, issue, token, _ in send.sent:
        ctx.ledger.complete(issue, token)
    assert run_iteration(ctx, send, kick.run_id, 2)[0].dispatched == 2
    for _, issue, token, _ in send.sent[3:]:
        ctx.ledger.complete(issue, token)
    report, go_on = run_iteration(ctx, send, kick.run_id, 3)
    assert report.dispatched == 0 and {s["reason"] for s in report.skipped} == {"done"}
    assert go_on is not end_idle
    run = ctx.control.run(kick.run_id)
    if end_idle:
        assert report.stopped == "idle" and run["status"] == "finished"
        assert heartbeat.read(ctx.redis, ctx.keys).status == "idle" and ctx.control.lease_holder() is None
        assert ctx.control.start_run(by="beat").started  # the next kickoff polls again
    else:
        assert run["status"] == "running"


def test_a_full_fleet_does_not_gate_a_big_backlog_in_full(fake_redis, make_settings, tmp_path):
    """Issue 8: with the fleet full, a poll gates only until a backlog's worth of issues waits for room; the
    rest are counted, not looked at (the gate re-read a 3,000-issue backlog every second before)."""
    from tests.support import write_issues

    path = tmp_path / "big.jsonl"
    n = 1000
    write_issues(path, [{"id": f"I-{i}", "title": "t", "state": "ready"} for i in range(n)])
    s = make_settings(source={"path": str(path)}, dispatch={"max_in_flight": 3, "lease_ttl_s": 10, "queue_lease_s": 10})
    ctx = Context(s, fake_redis, FileSource(path))
    roomy_fleet(fake_redis, ctx.keys)
    ctx.ledger.complete("I-1", ctx.ledger.claim(["I-1"]).claims[0].token)  # one done issue in the way
    first = iterate(ctx, Recorder())
    waiting = [x for x in first.skipped if x["reason"] == "max-in-flight"]
    backlog = ctx.keys.BACKLOG_MAX
    assert first.dispatched == 3 and len(waiting) == 2 * backlog - 4  # 252 in the first batch were not enough
    assert {"issue": "I-1", "reason": "done"} in first.skipped
    assert first.unexamined == n - 2 * backlog and first.pulled == n  # two batches of the backlog's size
    assert ctx.redis.llen(ctx.keys.backlog) == backlog  # the refill's next candidates, in source order
    assert ctx.redis.lindex(ctx.keys.backlog, 0) is not None and '"I-4"' in ctx.redis.lindex(ctx.keys.backlog, 0)
    dry = iterate(ctx, None, dry_run=True)  # a dry run (run-once --dry-run, explain) still gates everything
    assert dry.unexamined == 0 and len(dry.skipped) == n
