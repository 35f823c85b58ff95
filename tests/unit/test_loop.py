"""The loop core without Celery: iterate, runs, breaker, kill checks, dispatch execution (fakeredis)."""

from __future__ import annotations

import json
import sys

import pytest

from factory_worker import heartbeat
from factory_worker.agents import CommandAgent
from factory_worker.dispatch import execute, release_task_claim
from factory_worker.loop import Factory, finish_run, iterate, run_iteration
from factory_worker.sources import FileSource
from factory_worker.sources.base import SourceError


def write(path, issues):
    path.write_text("".join(json.dumps(i) + "\n" for i in issues))


@pytest.fixture
def issues_file(tmp_path):
    p = tmp_path / "issues.jsonl"
    write(p, [{"id": f"I-{n}", "title": f"t{n}", "state": "ready"} for n in range(5)]
          + [{"id": "B-1", "title": "b", "state": "blocked"}])
    return p


@pytest.fixture
def factory(fake_redis, make_settings, issues_file):
    s = make_settings(source={"path": str(issues_file)}, dispatch={"max_in_flight": 3, "lease_ttl_s": 10})
    return Factory(s, fake_redis, FileSource(issues_file))


class Recorder:
    def __init__(self, fail_after: int | None = None) -> None:
        self.sent: list[tuple] = []
        self.fail_after = fail_after

    def __call__(self, task_id, issue, claim, run_id):
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise ConnectionError("broker down")
        self.sent.append((task_id, issue.id, claim.token, run_id))


def test_iterate_claims_up_to_the_cap_and_reports_every_skip(factory):
    send = Recorder()
    report = iterate(factory, send)
    assert report.pulled == 5 and report.dispatched == 3 and not report.dry_run
    assert [s[1] for s in send.sent] == ["I-0", "I-1", "I-2"]
    assert {s["issue"]: s["reason"] for s in report.skipped} == {"I-3": "max-in-flight", "I-4": "max-in-flight"}
    again = iterate(factory, Recorder())
    assert again.dispatched == 0
    assert {s["reason"] for s in again.skipped} == {"in-flight", "max-in-flight"}
    # every sent task maps to its claim, so a revoke can release by token
    task_id, issue, token, _ = send.sent[0]
    assert factory.r.hgetall(factory.keys.agent_task(task_id))["token"] == token


def test_send_failure_releases_every_unsent_claim(factory):
    send = Recorder(fail_after=1)
    with pytest.raises(ConnectionError):
        iterate(factory, send)
    assert len(send.sent) == 1
    assert factory.ledger.gauges()["in_flight"] == 1  # only the sent one is held
    for issue in ("I-1", "I-2"):
        assert factory.ledger.explain(issue).state == "claimable"
    assert factory.ledger.counters()["released_send-failed"] == 2


def test_dry_run_writes_nothing(factory):
    before = {k: factory.r.dump(k) for k in factory.r.keys("*")}
    report = iterate(factory, None, dry_run=True)
    assert report.dry_run and report.dispatched == 3 and report.pulled == 5
    assert {k: factory.r.dump(k) for k in factory.r.keys("*")} == before


def test_paused_loop_claims_nothing(factory):
    factory.control.set_paused(True, by="test")
    report = iterate(factory, Recorder())
    assert report.stopped == "paused" and report.dispatched == 0
    assert factory.ledger.gauges()["in_flight"] == 0
    assert not factory.control.start_run(by="beat").started
    factory.control.set_paused(False)
    assert iterate(factory, Recorder()).dispatched == 3


def test_run_lifecycle_heartbeat_and_lease(factory):
    kick = factory.control.start_run(2, by="test")
    assert kick.started and kick.task_ids == [f"{kick.run_id}-iter-0", f"{kick.run_id}-iter-1",
                                               f"{kick.run_id}-finish"]
    assert not factory.control.start_run(by="beat").started  # overlap SKIP
    report, go_on = run_iteration(factory, Recorder(), kick.run_id, 0)
    assert go_on and report.dispatched == 3
    hb = heartbeat.read(factory.r, factory.keys)
    assert hb.status == "running" and hb.iteration == 1 and hb.max_iterations == 2
    assert finish_run(factory, kick.run_id)
    assert not finish_run(factory, kick.run_id)  # ends once
    assert heartbeat.read(factory.r, factory.keys).status == "idle"
    assert factory.control.lease_holder() is None
    assert factory.control.run(kick.run_id)["status"] == "finished"
    assert factory.control.start_run(by="beat").started


def test_kill_flag_stops_the_next_iteration(factory):
    kick = factory.control.start_run(3, by="test")
    factory.control.set_kill(kick.run_id, "test")
    report, go_on = run_iteration(factory, Recorder(), kick.run_id, 0)
    assert not go_on and report.stopped.startswith("killed")
    assert factory.control.run(kick.run_id)["status"] == "killed"
    assert heartbeat.read(factory.r, factory.keys).status == "stopping"
    assert factory.control.lease_holder() is None
    k = factory.control.start_run(by="beat")
    assert not k.started and "killed" in k.reason
    assert factory.ledger.gauges()["in_flight"] == 0


def test_revoked_iteration_does_nothing(factory):
    kick = factory.control.start_run(3, by="test")
    factory.control.revoke_ids([kick.task_ids[1]])
    _, go_on = run_iteration(factory, Recorder(), kick.run_id, 1, task_id=kick.task_ids[1])
    assert not go_on
    assert factory.ledger.gauges()["in_flight"] == 0


class BrokenSource:
    def poll(self):
        raise SourceError("source down")

    def get(self, issue_id):
        return None


def test_failing_iterations_are_recorded_and_the_breaker_opens(fake_redis, make_settings):
    s = make_settings(loop={"breaker_failures": 3})
    f = Factory(s, fake_redis, BrokenSource())
    kick = f.control.start_run(5, by="test")
    for i in range(2):
        report, go_on = run_iteration(f, Recorder(), kick.run_id, i)
        assert go_on and "source down" in report.error
    report, go_on = run_iteration(f, Recorder(), kick.run_id, 2)
    assert not go_on and report.stopped == "breaker open"
    run = f.control.run(kick.run_id)
    assert run["status"] == "stopping" and "breaker open" in run["reason"] and run["failures"] == 3
    assert heartbeat.read(f.r, f.keys).status == "stopping"


def test_one_good_iteration_resets_the_breaker(fake_redis, make_settings, issues_file):
    s = make_settings(loop={"breaker_failures": 2})
    f = Factory(s, fake_redis, BrokenSource())
    kick = f.control.start_run(5, by="test")
    assert run_iteration(f, Recorder(), kick.run_id, 0)[1]
    f._source = FileSource(issues_file)
    assert run_iteration(f, Recorder(), kick.run_id, 1)[1]
    f._source = BrokenSource()
    assert run_iteration(f, Recorder(), kick.run_id, 2)[1]  # 1 consecutive failure only


def make_runner(f, argv):
    return CommandAgent(f.settings.agent.model_copy(update={"command": argv}), 0.5)


@pytest.mark.parametrize("argv,state", [(["true"], "done"), (["false"], "backoff")])
def test_execute_settles_by_token(factory, argv, state):
    claim = factory.ledger.claim(["I-0"]).claims[0]
    out = execute(factory, "task-1", {"id": "I-0", "title": "t", "state": "ready"}, claim.token,
                  runner=make_runner(factory, argv))
    assert out["settled"] == state
    assert factory.ledger.explain("I-0").state == state
    assert not factory.r.smembers(factory.keys.agents)


def test_execute_twice_with_one_token_runs_once(factory, tmp_path):
    marker = tmp_path / "runs"
    argv = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"]
    claim = factory.ledger.claim(["I-0"]).claims[0]
    factory.ledger.begin("I-0", claim.token)  # a twin message already started this claim's agent
    out = execute(factory, "task-2", {"id": "I-0", "title": "t", "state": "ready"}, claim.token,
                  runner=make_runner(factory, argv))
    assert out["outcome"] == "duplicate" and not marker.exists()


def test_execute_after_kill_or_revoke_releases_and_runs_nothing(factory, tmp_path):
    marker = tmp_path / "ran"
    argv = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    a, b = factory.ledger.claim(["I-0", "I-1"]).claims[:2]
    factory.control.revoke_ids(["t-a"])
    assert execute(factory, "t-a", {"id": "I-0", "title": "t", "state": "ready"}, a.token,
                   runner=make_runner(factory, argv))["outcome"] == "revoked"
    factory.control.set_kill(None, "test")
    assert execute(factory, "t-b", {"id": "I-1", "title": "t", "state": "ready"}, b.token,
                   runner=make_runner(factory, argv))["outcome"] == "killed"
    assert not marker.exists()
    assert factory.ledger.gauges()["in_flight"] == 0
    assert factory.ledger.explain("I-0").detail["attempts"] == 0


def test_stale_message_does_nothing(factory):
    claim = factory.ledger.claim(["I-0"]).claims[0]
    factory.ledger.release("I-0", claim.token)
    out = execute(factory, "task-3", {"id": "I-0", "title": "t", "state": "ready"}, claim.token,
                  runner=make_runner(factory, ["true"]))
    assert out["outcome"] == "stale"
    assert factory.ledger.explain("I-0").state == "claimable"


def test_release_task_claim_by_task_id(factory):
    send = Recorder()
    iterate(factory, send)
    task_id, issue, token, _ = send.sent[0]
    assert release_task_claim(factory, task_id) == issue
    assert release_task_claim(factory, task_id) is None  # the token is stale now: nothing changes
    assert factory.ledger.explain(issue).state == "claimable"


def test_a_killed_loop_claims_nothing_even_mid_iteration(factory):
    """kill-loop may land after an iteration passed its kill check: the claim script refuses then."""
    factory.control.set_kill(None, "test")
    batch = factory.ledger.claim(["I-0", "I-1"])
    assert not batch.claims and {s.reason for s in batch.skipped} == {"killed"}
    assert factory.ledger.counters()["skipped_killed"] == 2
    factory.control.clear_kill()
    assert len(factory.ledger.claim(["I-0"]).claims) == 1


def test_an_ended_run_never_flips_the_heartbeat_back_to_running(factory):
    """kill-loop ends the run between an iteration's checks and its heartbeat: the heartbeat stays stopping."""
    kick = factory.control.start_run(3, by="test")
    factory.control.end_run(kick.run_id, "killed", "kill-loop")
    assert factory.control.begin_iteration(kick.run_id, 1, 3, 0.0) == "the run has ended"
    assert heartbeat.read(factory.r, factory.keys).status == "stopping"


def test_a_lost_chain_is_ended_as_abandoned_by_the_next_run(factory):
    old = factory.control.start_run(3, by="test")
    factory.r.delete(factory.keys.loop_lease)  # the lease expired: its worker died mid-run
    new = factory.control.start_run(3, by="beat")
    assert new.started
    assert factory.control.run(old.run_id)["status"] == "abandoned"
    assert factory.control.run(new.run_id)["status"] == "running"
    assert heartbeat.read(factory.r, factory.keys).run_id == new.run_id


def test_the_lease_covers_the_gap_before_the_next_iteration(factory, clock):
    kick = factory.control.start_run(3, by="test")
    lease_s = factory.settings.loop.lease_ttl_s
    assert factory.control.begin_iteration(kick.run_id, 1, 3, gap_s=lease_s * 2) is None
    clock.advance(lease_s * 2.5)  # longer than a bare lease, shorter than lease + gap
    assert factory.control.lease_holder() == kick.run_id


def test_a_paused_loop_claims_nothing_even_mid_iteration(factory):
    factory.control.set_paused(True, by="test")
    batch = factory.ledger.claim(["I-0"])
    assert not batch.claims and batch.skipped[0].reason == "paused"
    factory.control.set_paused(False)
    assert factory.ledger.claim(["I-0"]).claims


def test_start_loop_clears_only_the_kill_it_saw(factory, monkeypatch):
    factory.control.set_kill(None, "alice")
    kick = factory.control.start_run(3, by="start-loop", clear_kill=True)
    assert kick.started and factory.control.kill_info() is None
    assert kick.cleared_kill["by"] == "alice"
    factory.control.end_run(kick.run_id, "finished")
    # bob kills between start-loop reading the flag and clearing it: bob's kill stands, nothing starts
    factory.control.set_kill(None, "alice")
    real_set = factory.r.set

    def set_then_bob_kills(*a, **kw):
        out = real_set(*a, **kw)
        if a and a[0] == factory.keys.loop_lease:
            factory.r.hset(factory.keys.kill, mapping={"by": "bob", "at_ms": "1", "run_id": "", "reason": "x"})
        return out

    monkeypatch.setattr(factory.r, "set", set_then_bob_kills)
    kick = factory.control.start_run(3, by="start-loop", clear_kill=True)
    assert not kick.started and "killed again" in kick.reason
    assert factory.control.kill_info()["by"] == "bob"
    assert factory.control.lease_holder() is None
