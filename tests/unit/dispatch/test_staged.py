"""Staged dispatch without Celery (fakeredis[lua]): the stage script's owner check, fencing and at-most-once,
resume of an attempt by a new claim, escalation, and whole pipelines run in-process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from factory_worker.agents import CommandAgent
from factory_worker.context import Context
from factory_worker.dispatch.job import Job
from factory_worker.dispatch.staged import run_inline, run_stage
from factory_worker.ledger.core import StaleClaimError
from factory_worker.ledger.stages import StageLedger
from factory_worker.sources.base import Issue
from tests.support import AGENT_USER

AGENT = str(Path(__file__).resolve().parents[2] / "stage_agent.py")


def staged(ctx: Context, tmp_path, triage: bool = True, **agent) -> Context:
    stages = [
        {"name": "implement", "command": [sys.executable, AGENT, "implement", "{id}"]},
        {"name": "review", "command": [sys.executable, AGENT, "review", "{id}"], "back_to": "implement"},
    ]
    update = {"stages": stages, "env_allowlist": ["PATH", "AGENT_OUT"], **agent}
    if triage:
        update["triage"] = {"command": [sys.executable, AGENT, "triage", "{id}"]}
    settings = ctx.settings.model_copy(deep=True)
    settings.agent = settings.agent.model_validate({**settings.agent.model_dump(), **update})
    return Context(settings, ctx.redis, ctx.source)


@pytest.fixture
def out(tmp_path, monkeypatch):
    d = tmp_path / "out"
    d.mkdir()
    monkeypatch.setenv("AGENT_OUT", str(d))
    return d


def records(out: Path) -> list[dict]:
    p = out / "stages.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def begun(ctx: Context, issue: str) -> str:
    claim = ctx.ledger.claim([issue]).claims[0]
    assert ctx.ledger.begin(issue, claim.token) == "started"
    return claim.token


# -- the stage script ---------------------------------------------------------------------------------
def test_stage_script_owner_check_fencing_and_at_most_once(ctx):
    stages = StageLedger(ctx.ledger)
    token = begun(ctx, "I-0")
    opened = stages.open("I-0", token, "s-1", None, "implement", ["implement", "review"], "w-1")
    assert (opened.step, opened.stage, opened.resumed) == (1, "implement", False)
    assert ctx.redis.hget(ctx.keys.agent_task("s-1"), "state") == "queued"
    with pytest.raises(StaleClaimError):  # not the holder
        stages.start("I-0", "1:someone.1", "s-1", 1, "implement", "h", 1)
    status, prog = stages.start("I-0", token, "s-1", 1, "implement", "h", 1)
    assert status == "ok" and prog.workdir == "w-1" and prog.plan == ["implement", "review"]
    assert stages.start("I-0", token, "s-1", 1, "implement", "h", 1)[0] == "duplicate"  # at most once
    assert stages.next("I-0", token, 1, "ok", "review", 1, 0, "", "s-2", None) == 2
    assert stages.next("I-0", token, 1, "ok", "review", 1, 0, "", "s-3", None) is None  # a late repeat
    assert stages.start("I-0", token, "s-1", 1, "implement", "h", 1)[0] == "moved"  # step 1 is done
    assert stages.start("I-0", token, "s-2", 2, "review", "h", 1)[0] == "ok"
    history = stages.progress("I-0")["history"]
    assert history == "1:implement:ok"


def test_a_new_claim_of_the_same_attempt_resumes_and_the_dead_holder_is_fenced_off(ctx, clock):
    stages = StageLedger(ctx.ledger)
    old = begun(ctx, "I-0")
    stages.open("I-0", old, "s-1", None, "implement", ["implement", "review"], "w-1")
    stages.start("I-0", old, "s-1", 1, "implement", "h", 1)
    stages.next("I-0", old, 1, "ok", "review", 1, 0, "", "s-2", None)
    stages.start("I-0", old, "s-2", 2, "review", "h", 1)
    clock.advance(60)  # the holder died mid-review: its lease runs out
    new = begun(ctx, "I-0")
    opened = stages.open("I-0", new, "s-3", None, "implement", ["implement", "review"], "w-2")
    assert (opened.step, opened.stage, opened.resumed) == (2, "review", True)  # the review, not the implementation
    status, prog = stages.start("I-0", new, "s-3", 2, "review", "h2", 2)
    assert status == "ok" and prog.workdir == "w-1"  # the attempt's directory is kept
    with pytest.raises(StaleClaimError):  # the dead holder's late review result
        stages.next("I-0", old, 2, "ok", "deploy", 1, 0, "", "s-9", None)
    with pytest.raises(StaleClaimError):
        ctx.ledger.complete("I-0", old)
    assert ctx.ledger.counters()["stages_resumed"] == 1


def test_progress_of_another_attempt_is_not_resumed_and_ends_with_the_attempt(ctx, clock):
    stages = StageLedger(ctx.ledger)
    token = begun(ctx, "I-0")
    stages.open("I-0", token, "s-1", None, "implement", ["implement"], "w-1")
    ctx.ledger.fail("I-0", token, "boom")
    assert not ctx.redis.exists(ctx.keys.stages("I-0"))  # fail clears it
    clock.advance(600)
    token = begun(ctx, "I-0")
    assert not stages.open("I-0", token, "s-2", None, "implement", ["implement"], "w-2").resumed
    ctx.redis.hset(ctx.keys.stages("I-0"), "attempt", "7")  # progress left by another attempt
    ctx.redis.hset(ctx.keys.stages("I-0"), "step", "5")
    clock.advance(600)
    token = begun(ctx, "I-0")
    opened = stages.open("I-0", token, "s-3", None, "implement", ["implement"], "w-3")
    assert (opened.step, opened.resumed) == (1, False)
    ctx.ledger.complete("I-0", token)
    assert not ctx.redis.exists(ctx.keys.stages("I-0"))


def test_kill_and_revoke_start_nothing(ctx):
    stages = StageLedger(ctx.ledger)
    token = begun(ctx, "I-0")
    stages.open("I-0", token, "s-1", None, "implement", ["implement"], "w-1")
    ctx.control.revoke_ids(["s-1"])
    assert stages.start("I-0", token, "s-1", 1, "implement", "h", 1)[0] == "revoked"
    ctx.control.set_kill(None, "test")
    assert stages.start("I-0", token, "s-2", 1, "implement", "h", 1)[0] == "killed"
    assert ctx.redis.hget(ctx.keys.stages("I-0"), "state") == "pending"  # nothing started


def test_escalate_parks_without_an_attempt_and_retry_releases(ctx):
    token = begun(ctx, "I-0")
    StageLedger(ctx.ledger).escalate("I-0", token, "needs-human: triage confidence 0.1 < 0.5: unsure")
    e = ctx.ledger.explain("I-0")
    assert e.state == "parked" and "needs-human" in e.text and e.detail["attempts"] == 0
    assert ctx.ledger.gauges()["in_flight"] == 0
    ctx.ledger.retry("I-0")
    assert ctx.ledger.explain("I-0").state == "claimable"


# -- whole pipelines, in-process ----------------------------------------------------------------------
def test_pipeline_review_rejects_once_then_done(ctx, tmp_path, out):
    ctx = staged(ctx, tmp_path)
    issue = Issue(id="I-0", title="t", state="ready", labels=["reject-once"])
    results = run_inline(ctx, issue, begun(ctx, "I-0"))
    starts = [(r["stage"], r["round"]) for r in records(out) if r["event"] == "start"]
    assert starts == [("triage", 1), ("implement", 1), ("review", 1), ("implement", 2), ("review", 2)]
    assert [r["settled"] for r in results] == ["next", "next", "next", "next", "done"]
    second_impl = [r for r in records(out) if r["event"] == "start" and r["stage"] == "implement"][1]
    assert "please add a test" in second_impl["feedback"]
    assert [r for r in records(out) if r["event"] == "read"][-1]["work"] == "round 1\nround 2\n"  # one directory
    assert ctx.ledger.explain("I-0").state == "done"
    assert not ctx.redis.exists(ctx.keys.stages("I-0"))
    assert not Path(records(out)[0]["workdir"]).exists()  # removed with the attempt
    assert not [t for t in ctx.redis.smembers(ctx.keys.agents) if t.startswith("stage-")]
    assert not ctx.redis.zcard(ctx.keys.queued) and not ctx.redis.keys(ctx.keys.agent_task("stage-*"))


def test_low_confidence_escalates_and_invalid_triage_fails(ctx, tmp_path, out):
    ctx = staged(ctx, tmp_path)
    res = run_inline(ctx, Issue(id="I-0", title="t", state="ready", labels=["unsure"]), begun(ctx, "I-0"))
    assert res[-1]["settled"] == "parked" and res[-1]["escalated"]
    e = ctx.ledger.explain("I-0")
    assert e.state == "parked" and "needs-human" in e.text and e.detail["attempts"] == 0
    res = run_inline(ctx, Issue(id="I-1", title="t", state="ready", labels=["bad-triage"]), begun(ctx, "I-1"))
    assert res[-1]["settled"] == "backoff" and "not a JSON object" in res[-1]["error"]
    assert {r["stage"] for r in records(out)} == {"triage"}


def test_rejections_beyond_max_rounds_fail_the_attempt(ctx, tmp_path, out):
    ctx = staged(ctx, tmp_path, triage=False, max_rounds=1)
    res = run_inline(ctx, Issue(id="I-0", title="t", state="ready", labels=["reject-once"]), begun(ctx, "I-0"))
    assert res[-1]["settled"] == "backoff" and "max_rounds=1" in res[-1]["error"]
    assert ctx.ledger.explain("I-0").detail["attempts"] == 1


def test_a_late_stage_result_is_rejected(ctx, tmp_path, out, clock):
    ctx = staged(ctx, tmp_path, triage=False)
    old = begun(ctx, "I-0")
    sent = []
    from factory_worker.dispatch.staged import hand_over

    issue = {"id": "I-0", "title": "t", "state": "ready"}
    hand_over(Job(ctx, "a-1", issue, old, send_stage=lambda *a: sent.append(a)))
    clock.advance(60)  # the claim is gone before the stage task runs (its worker died)
    new = begun(ctx, "I-0")
    task_id, _, _, stage, step, _ = sent[0]
    res = run_stage(
        Job(
            ctx,
            task_id,
            {"id": "I-0", "title": "t", "state": "ready"},
            old,
            stage=stage,
            step=step,
            runner=CommandAgent(ctx.settings.agent, 0.5),
            send_stage=lambda *a: sent.append(a),
        )
    )
    assert res["outcome"] == "stale" and not records(out)
    assert ctx.ledger.current_token("I-0") == new


def test_escalation_is_written_back_and_explain_shows_the_stage(fake_redis, make_settings, issues_file, tmp_path):
    from factory_worker.loop.presence import publish_slots
    from factory_worker.ops.operations import explain
    from factory_worker.sources import FileSource

    s = make_settings(
        source={"path": str(issues_file)},
        dispatch={"lease_ttl_s": 10, "queue_lease_s": 10},
        agent={
            "command": ["true"],
            "log_dir": str(tmp_path / "l"),
            "workdir_root": str(tmp_path / "w"),
            "stages": [{"name": "implement", "command": ["true"]}],
            **AGENT_USER,
        },
    )
    ctx = Context(s, fake_redis, FileSource(issues_file))
    publish_slots(ctx, "agents@test", 10)
    ctx.ledger.outbox = "1"
    stages = StageLedger(ctx.ledger)
    token = begun(ctx, "I-0")
    stages.open("I-0", token, "s-1", None, "implement", ["implement"], "w-1")
    e = explain(ctx, "I-0")
    assert e.state == "in-flight" and "stage next: implement (step 1, round 1)" in e.text
    stages.escalate("I-0", token, "needs-human: triage confidence 0.1 < 0.5: vague")
    events = [f for _, f in fake_redis.xrange(ctx.keys.outbox) if f["event"] == "parked"]
    assert events and events[0]["reason"] == "needs-human" and "vague" in events[0]["error"]


def test_the_example_pipeline_runs(fake_redis, make_settings, tmp_path, monkeypatch):
    """examples/pipeline.toml with its agents: a reviewed issue takes two rounds; a docs one is not reviewed; a
    security one is escalated."""
    from factory_worker.loop.presence import publish_slots

    root = Path(__file__).resolve().parents[3]
    monkeypatch.chdir(root)
    monkeypatch.setenv("FACTORY_CONFIG", str(root / "examples" / "pipeline.toml"))
    s = make_settings(
        agent={"log_dir": str(tmp_path / "logs"), "workdir_root": str(tmp_path / "work"), **AGENT_USER},
        dispatch={"lease_ttl_s": 10, "queue_lease_s": 10},
    )
    assert [x.name for x in s.agent.stages] == ["implement", "review"] and s.agent.triage is not None
    monkeypatch.setenv("FACTORY_AGENT_SLEEP_S", "0")
    s.agent.env_allowlist.append("FACTORY_AGENT_SLEEP_S")
    ctx = Context(s, fake_redis)
    publish_slots(ctx, "agents@test", 10)
    code = run_inline(ctx, Issue(id="EX-2", title="retry", state="ready", labels=["enhancement"]), begun(ctx, "EX-2"))
    assert [(r["stage"], r.get("outcome")) for r in code] == [
        ("triage", "ok"),
        ("implement", "ok"),
        ("review", "rejected"),
        ("implement", "ok"),
        ("review", "ok"),
    ]
    assert code[-1]["settled"] == "done"
    docs = run_inline(ctx, Issue(id="EX-1", title="typo", state="ready", labels=["docs"]), begun(ctx, "EX-1"))
    assert [r["stage"] for r in docs] == ["triage", "implement"] and docs[-1]["settled"] == "done"
    sec = run_inline(ctx, Issue(id="EX-8", title="$(touch x)", state="ready", labels=["security"]), begun(ctx, "EX-8"))
    assert sec[-1]["settled"] == "parked" and "needs-human" in ctx.ledger.explain("EX-8").text


def test_a_staged_dispatch_keeps_one_slack_thread_and_a_reply_reaches_the_running_stage(
    ctx, tmp_path, out, monkeypatch
):
    """Slack on: hand-over opens one thread for the attempt (kept in the progress), each stage posts its start
    and its end in it, and a human's reply lands in the running stage's FACTORY_INBOX."""
    import threading

    from factory_worker.config.settings import SlackSettings
    from harness import wait_until
    from tests.fake_slack import CHANNEL, FakeSlack

    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-test")
    with FakeSlack() as slack:
        c = staged(ctx, tmp_path, triage=False)
        c.settings.slack = SlackSettings(channel=CHANNEL, api_url=slack.url, poll_s=0.1, poll_max_s=1)

        def answer() -> None:  # a human answers once the review runs
            wait_until(
                lambda: (
                    any(r["stage"] == "review" for r in records(out))
                    or any("stage review started" in m.get("text", "") for t in slack.threads.values() for m in t)
                ),
                20,
                what="the review running",
            )
            slack.reply(next(iter(slack.threads)), "use the v2 API")

        helper = threading.Thread(target=answer, daemon=True)
        helper.start()
        res = run_inline(c, Issue(id="I-0", title="t", state="ready", labels=["wait-inbox"]), begun(c, "I-0"))
        helper.join(20)
        threads = dict(slack.threads)
    assert [r["settled"] for r in res] == ["next", "done"]
    assert len(threads) == 1  # one thread for the whole attempt
    texts = [m["text"] for m in next(iter(threads.values())) if m.get("bot_id")]
    assert (
        texts[0].startswith("factory-worker: agents started on I-0") and "implement -&gt; review" in texts[0]
    )  # Slack shows ->
    assert texts[1:] == [
        "factory-worker: stage implement started (step 1, round 1)",
        "factory-worker: stage implement ok; next: review",
        "factory-worker: stage review started (step 2, round 1)",
        "factory-worker: done",
    ]
    review = next(r for r in records(out) if r["stage"] == "review" and r["event"] == "start")
    assert json.loads(review["inbox"].splitlines()[0])["text"] == "use the v2 API"
    assert not ctx.redis.exists(ctx.keys.stages("I-0"))  # done: progress (and its thread ref) gone


def test_a_staged_dispatch_gets_the_comments_relayed_to_its_running_stage(ctx, tmp_path, out):
    """``webhooks.inbox`` on, Slack off: the running stage's FACTORY_INBOX receives what the webhook receiver
    queued for that stage's task."""
    import threading

    from factory_worker.chat.inbox import deliver
    from harness import wait_until

    c = staged(ctx, tmp_path, triage=False)
    c.settings.webhooks.inbox = True

    def review_task() -> str | None:
        for t in c.redis.smembers(c.keys.agents):
            if c.redis.hget(c.keys.agent_task(t), "stage") == "review":
                return t
        return None

    def comment() -> None:
        task_id = wait_until(review_task, 20, interval=0.02, what="the review running")
        deliver(c.redis, c.keys, [task_id], {"source": "linear", "ts": "t", "user": "Ada", "text": "ship it"})

    helper = threading.Thread(target=comment, daemon=True)
    helper.start()
    res = run_inline(c, Issue(id="I-0", title="t", state="ready", labels=["wait-inbox"]), begun(c, "I-0"))
    helper.join(20)
    assert [r["settled"] for r in res] == ["next", "done"]
    review = next(r for r in records(out) if r["stage"] == "review" and r["event"] == "start")
    assert [(json.loads(x)["source"], json.loads(x)["text"]) for x in review["inbox"].splitlines()] == [
        ("linear", "ship it")
    ]
