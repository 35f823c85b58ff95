"""agent_task without Celery: begin, run, settle by token, containment, release by task id (fakeredis)."""

from __future__ import annotations

import sys

import pytest

from factory_worker.agents import CommandAgent
from factory_worker.dispatch.claims import release_task_claim
from factory_worker.dispatch.job import Job
from factory_worker.dispatch.single import execute
from factory_worker.loop.iteration import iterate
from tests.support import Recorder


def make_runner(ctx, argv):
    return CommandAgent(ctx.settings.agent.model_copy(update={"command": argv}), 0.5)


@pytest.mark.parametrize("argv,state", [(["true"], "done"), (["false"], "backoff")])
def test_execute_settles_by_token(ctx, argv, state):
    claim = ctx.ledger.claim(["I-0"]).claims[0]
    out = execute(
        Job(ctx, "task-1", {"id": "I-0", "title": "t", "state": "ready"}, claim.token, runner=make_runner(ctx, argv))
    )
    assert out["settled"] == state
    assert ctx.ledger.explain("I-0").state == state
    assert not ctx.redis.smembers(ctx.keys.agents)


def test_execute_twice_with_one_token_runs_once(ctx, tmp_path):
    marker = tmp_path / "runs"
    argv = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"]
    claim = ctx.ledger.claim(["I-0"]).claims[0]
    ctx.ledger.begin("I-0", claim.token)  # a twin message already started this claim's agent
    out = execute(
        Job(ctx, "task-2", {"id": "I-0", "title": "t", "state": "ready"}, claim.token, runner=make_runner(ctx, argv))
    )
    assert out["outcome"] == "duplicate" and not marker.exists()


def test_execute_after_kill_or_revoke_releases_and_runs_nothing(ctx, tmp_path):
    marker = tmp_path / "ran"
    argv = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    a, b = ctx.ledger.claim(["I-0", "I-1"]).claims[:2]
    ctx.control.revoke_ids(["t-a"])
    assert (
        execute(Job(ctx, "t-a", {"id": "I-0", "title": "t", "state": "ready"}, a.token, runner=make_runner(ctx, argv)))[
            "outcome"
        ]
        == "revoked"
    )
    ctx.control.set_kill(None, "test")
    assert (
        execute(Job(ctx, "t-b", {"id": "I-1", "title": "t", "state": "ready"}, b.token, runner=make_runner(ctx, argv)))[
            "outcome"
        ]
        == "killed"
    )
    assert not marker.exists()
    assert ctx.ledger.gauges()["in_flight"] == 0
    assert ctx.ledger.explain("I-0").detail["attempts"] == 0


def test_stale_message_does_nothing(ctx):
    claim = ctx.ledger.claim(["I-0"]).claims[0]
    ctx.ledger.release("I-0", claim.token)
    out = execute(
        Job(
            ctx, "task-3", {"id": "I-0", "title": "t", "state": "ready"}, claim.token, runner=make_runner(ctx, ["true"])
        )
    )
    assert out["outcome"] == "stale"
    assert ctx.ledger.explain("I-0").state == "claimable"


def test_release_task_claim_by_task_id(ctx):
    send = Recorder()
    iterate(ctx, send)
    task_id, issue, token, _ = send.sent[0]
    assert release_task_claim(ctx, task_id) == issue
    assert release_task_claim(ctx, task_id) is None  # the token is stale now: nothing changes
    assert ctx.ledger.explain(issue).state == "claimable"


def test_an_exception_between_begin_and_the_agent_start_is_a_failed_attempt_not_a_stuck_claim(ctx):
    """Issue 12: a poisoned dispatch backs off and is parked instead of being re-dispatched every lease."""

    class Exploding:
        def run(self, dispatch, renew, should_stop, on_start=None):
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")

    claim = ctx.ledger.claim(["I-0"]).claims[0]
    out = execute(Job(ctx, "agent-x", {"id": "I-0", "title": "t", "state": "ready"}, claim.token, runner=Exploding()))
    assert out["outcome"] == "failed" and out["settled"] == "backoff" and "UnicodeEncodeError" in out["error"]
    assert ctx.ledger.explain("I-0").state == "backoff"
    assert ctx.ledger.current_token("I-0") is None  # settled, not left held until its lease runs out


@pytest.mark.parametrize("outage_s,settled", [(9.95, "done"), (10.5, None)])
def test_settle_retries_a_redis_outage_until_the_lease_ends_and_tries_once_at_the_end(
    ctx, monkeypatch, outage_s, settled
):
    """A Sentinel promotion that ends just inside the lease (10 s here) still gets the agent's outcome:
    the backoff's last wait is cut to land on the deadline instead of giving up a wait early."""
    import redis

    from factory_worker.dispatch import claims as agent_task

    clock = [0.0]
    monkeypatch.setattr(agent_task.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(agent_task.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    real = agent_task._settle_once
    tries = []

    def flaky(*args):
        tries.append(clock[0])
        if clock[0] < outage_s:
            raise redis.ConnectionError("No master found for 'factory-master'")
        return real(*args)

    monkeypatch.setattr(agent_task, "_settle_once", flaky)
    claim = ctx.ledger.claim(["I-0"]).claims[0]
    if settled is None:
        with pytest.raises(redis.ConnectionError):
            agent_task.settle(Job(ctx, "task-0", {"id": "I-0"}, claim.token), "ok")
        assert tries[-1] == pytest.approx(10.0)  # the last try was at the lease's end
    else:
        assert agent_task.settle(Job(ctx, "task-0", {"id": "I-0"}, claim.token), "ok") == settled
        assert ctx.ledger.explain("I-0").state == "done"
    assert max(b - a for a, b in zip(tries, tries[1:])) <= 1.0


def test_with_tracker_comments_relayed_every_dispatch_gets_an_inbox_fed_from_redis(ctx, tmp_path):
    """``webhooks.inbox`` on, Slack off: the agent still gets FACTORY_INBOX, and what the webhook receiver queues
    for its task (``chat.inbox.deliver``) is in the file while it runs; the list is gone when the dispatch ends."""
    import json
    import threading

    from factory_worker.chat.inbox import deliver
    from harness import wait_until

    ctx.settings.webhooks.inbox = True
    seen = tmp_path / "seen.jsonl"
    script = (
        "import os, time\n"
        "inbox = os.environ['FACTORY_INBOX']\n"
        "deadline = time.time() + 10\n"
        "while time.time() < deadline and not open(inbox).read().strip():\n"
        "    time.sleep(0.02)\n"
        f"open({str(seen)!r}, 'w').write(open(inbox).read())\n"
    )
    claim = ctx.ledger.claim(["I-0"]).claims[0]

    def comment() -> None:
        wait_until(lambda: ctx.redis.sismember(ctx.keys.agents, "task-9"), 10, interval=0.02, what="the agent running")
        line = {"source": "github", "ts": "t1", "user": "bob", "text": "use the blue one", "issue": "I-0", "url": ""}
        assert deliver(ctx.redis, ctx.keys, ["task-9"], line) == 1

    helper = threading.Thread(target=comment, daemon=True)
    helper.start()
    out = execute(
        Job(
            ctx,
            "task-9",
            {"id": "I-0", "title": "t", "state": "ready"},
            claim.token,
            runner=make_runner(ctx, [sys.executable, "-c", script]),
        )
    )
    helper.join(10)
    assert out["settled"] == "done"
    assert [json.loads(x)["text"] for x in seen.read_text().splitlines()] == ["use the blue one"]
    assert json.loads(seen.read_text())["source"] == "github"
    assert not ctx.redis.exists(ctx.keys.inbox("task-9"))
    assert not list((tmp_path / "work").glob("inbox-*"))  # the file goes with its dispatch


def test_without_slack_or_relayed_comments_no_inbox(ctx, tmp_path):
    seen = tmp_path / "env"
    script = f"import os; open({str(seen)!r}, 'w').write(os.environ.get('FACTORY_INBOX', '-'))"
    claim = ctx.ledger.claim(["I-0"]).claims[0]
    out = execute(
        Job(
            ctx,
            "task-8",
            {"id": "I-0", "title": "t", "state": "ready"},
            claim.token,
            runner=make_runner(ctx, [sys.executable, "-c", script]),
        )
    )
    assert out["settled"] == "done" and seen.read_text() == "-"


@pytest.mark.parametrize("outcome", ["timeout", "signalled"])
def test_a_failed_run_without_an_error_is_recorded_with_its_outcome(ctx, outcome):
    """The ledger's last error of a failed attempt is the run's error, else its outcome word (the one-stage
    case of the lifecycle settles a single agent's failure as its run's outcome, not as a bare ``failed``)."""
    from factory_worker.agents import AgentResult

    class Ends:
        def run(self, dispatch, renew, should_stop, on_start=None):
            return AgentResult(outcome, None, 0.0, None, "")

    claim = ctx.ledger.claim(["I-0"]).claims[0]
    out = execute(Job(ctx, "agent-y", {"id": "I-0", "title": "t", "state": "ready"}, claim.token, runner=Ends()))
    assert (out["outcome"], out["settled"], out["error"]) == (outcome, "backoff", "")
    e = ctx.ledger.explain("I-0")
    assert e.state == "backoff" and outcome in e.text, e
