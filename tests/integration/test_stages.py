"""Staged dispatch end to end: real redis-server, real `celery worker` / `celery beat` subprocesses.

triage -> implement -> review, where the review rejects once; a low-confidence triage escalates; a worker
SIGKILLed mid-review resumes at the review on another worker; kill-loop mid-pipeline starts no further stage;
kill-loop --release-agents stops the running stage; pause lets a claimed issue finish its stages.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from factory_worker.context import Context
from factory_worker.ledger.core import StaleClaimError
from tests.support import (
    CeleryProc,
    assert_audit_clean,
    ctl,
    host_pid,
    pid_alive,
    settings_from,
    stack_env,
    start_worker_and_beat,
    wait_until,
    warm_shutdown,
    write_issues,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.timeout(180)]

AGENT = str(Path(__file__).resolve().parents[1] / "stage_agent.py")


def staged_env(redis_url: str, namespace: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    stages = [
        {"name": "implement", "command": [sys.executable, AGENT, "implement", "{id}"]},
        {"name": "review", "command": [sys.executable, AGENT, "review", "{id}"], "back_to": "implement"},
    ]
    return stack_env(
        redis_url,
        namespace,
        tmp_path,
        **{
            "FACTORY_AGENT__STAGES": json.dumps(stages),
            "FACTORY_AGENT__TRIAGE__COMMAND": json.dumps([sys.executable, AGENT, "triage", "{id}"]),
            "FACTORY_AGENT__MAX_ROUNDS": "3",
            "FACTORY_AGENT__MIN_CONFIDENCE": "0.5",
            "FACTORY_AGENT__ENV_ALLOWLIST": json.dumps(["PATH", "AGENT_OUT", "AGENT_SLOW_S"]),
            **extra,
        },
    )


def records(tmp_path: Path, issue: str | None = None, event: str | None = "start") -> list[dict]:
    p = tmp_path / "out" / "stages.jsonl"
    rows = [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []
    for r in rows:
        r["pid"] = host_pid(r)  # the stage's agent as seen here (it is pid 1 in a PID namespace of its own)
    return sorted(
        (r for r in rows if (issue is None or r["issue"] == issue) and (event is None or r["event"] == event)),
        key=lambda r: r["t"],
    )


def _implementing(
    redis_url: str,
    namespace: str,
    tmp_path: Path,
    procs: list,
    issue: str,
    label: str,
    concurrency: str = "2",
    **extra: str,
) -> dict[str, str]:
    """One worker and beat on one staged issue labelled ``label``; returns the env once its implementation
    has started."""
    write_issues(tmp_path / "issues.jsonl", [{"id": issue, "title": "t", "state": "ready", "labels": [label]}])
    env = staged_env(redis_url, namespace, tmp_path, FACTORY_LOOP__MAX_ITERATIONS="50", **extra)
    procs.append(CeleryProc("worker", env, tmp_path, "w1", extra=["-c", concurrency]))
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    for p in procs:
        p.wait_ready()
    wait_until(
        lambda: [r for r in records(tmp_path, issue) if r["stage"] == "implement"],
        30,
        what="the implementation started",
    )
    return env


@pytest.fixture(autouse=True)
def _ends_with_an_audit(redis_url, namespace, procs):
    yield
    assert_audit_clean(redis_url, namespace)


def test_triage_implement_review_rejected_once_then_done_and_low_confidence_escalates(
    redis_url, real_redis, namespace, tmp_path, procs
):
    write_issues(
        tmp_path / "issues.jsonl",
        [
            {"id": "P-1", "title": "add a parser", "state": "ready", "labels": ["reject-once"]},
            {"id": "P-2", "title": "something vague", "state": "ready", "labels": ["unsure"]},
        ],
    )
    env = staged_env(redis_url, namespace, tmp_path, FACTORY_LOOP__MAX_ITERATIONS="20")
    start_worker_and_beat(procs, env, tmp_path, 3)
    ctx = Context(settings_from(env), real_redis)
    wait_until(
        lambda: ctx.ledger.explain("P-1").state == "done" and ctx.ledger.explain("P-2").state == "parked",
        60,
        interval=0.2,
        what="P-1 done, P-2 escalated",
    )

    # the stages ran in order, once each per round, in one directory, the feedback reaching round 2
    starts = records(tmp_path, "P-1")
    assert [(r["stage"], r["round"]) for r in starts] == [
        ("triage", 1),
        ("implement", 1),
        ("review", 1),
        ("implement", 2),
        ("review", 2),
    ]
    assert [r["step"] for r in starts] == [1, 2, 3, 4, 5]
    assert len({r["token"] for r in starts}) == 1  # one claim through every stage
    assert len({r["workdir"] for r in starts}) == 1 and all(r["cwd"] == r["workdir"] for r in starts)
    assert starts[1]["feedback"] == "" and "please add a test" in starts[3]["feedback"]
    assert records(tmp_path, "P-1", "read")[-1]["work"] == "round 1\nround 2\n"
    assert not Path(starts[0]["workdir"]).exists()  # removed with the attempt
    assert not real_redis.exists(ctx.keys.stages("P-1"))
    assert ctx.ledger.explain("P-1").detail["fence"] == 1
    # explain and dispatches tell the story: the steps kept after the attempt ended, with their rounds
    told = json.loads(ctl(env, "explain", "P-1", "--json").stdout)
    assert [(s["stage"], s["round"], s["outcome"]) for s in told["detail"]["steps"]] == [
        ("triage", 1, "ok"),
        ("implement", 1, "ok"),
        ("review", 1, "rejected"),
        ("implement", 2, "ok"),
        ("review", 2, "done"),
    ]
    assert told["detail"]["last_step"] == "5 review (round 2): done" and "review (round 1): rejected" in told["text"]
    done = json.loads(ctl(env, "dispatches", "--state", "done", "--json").stdout)
    assert [r.get("last_step") for r in done if r["issue"] == "P-1"] == ["5 review (round 2): done"]

    # the low-confidence triage escalated: parked, needs-human, no attempt counted, nothing else ran
    assert [r["stage"] for r in records(tmp_path, "P-2")] == ["triage"]
    why = ctl(env, "explain", "P-2", "--json")
    assert why.returncode == 0, why.stderr
    e = json.loads(why.stdout)
    assert e["state"] == "parked" and "needs-human" in e["text"] and e["detail"]["attempts"] == 0
    assert e["detail"]["last_step"].startswith("1 triage (round 1): escalated (needs-human")
    assert ctx.ledger.counters()["escalated"] == 1
    # retry releases it: triage runs again (and escalates again)
    assert ctl(env, "retry", "P-2").returncode == 0
    wait_until(
        lambda: len(records(tmp_path, "P-2")) == 2 and ctx.ledger.explain("P-2").state == "parked",
        30,
        what="P-2 triaged again after retry",
    )
    log = procs[0].log()
    assert "factory.agent.stage" in log and "factory.agent.run" in log


def test_sigkill_mid_review_resumes_at_the_review_on_another_worker(redis_url, real_redis, namespace, tmp_path, procs):
    write_issues(
        tmp_path / "issues.jsonl", [{"id": "K-1", "title": "t", "state": "ready", "labels": ["slow-review-once"]}]
    )
    env = staged_env(redis_url, namespace, tmp_path, FACTORY_DISPATCH__LEASE_TTL_S="3")
    w1 = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "1"])
    procs.append(w1)
    w1.wait_ready()
    assert ctl(env, "run-once", "--json").returncode == 0
    review = wait_until(
        lambda: [r for r in records(tmp_path, "K-1") if r["stage"] == "review"], 30, what="the review started"
    )[0]
    w2 = CeleryProc("worker", env, tmp_path, "w2", extra=["-c", "1"])
    procs.append(w2)
    w2.wait_ready()

    w1.signal(signal.SIGKILL)
    killed_at = time.time()
    wait_until(lambda: not pid_alive(review["pid"]), 2.0, interval=0.02, what="the review died with its worker")
    ctx = Context(settings_from(env), real_redis)
    wait_until(lambda: ctx.ledger.explain("K-1").state == "claimable", 8, what="the dead holder's lease expired")
    assert ctl(env, "run-once", "--json").returncode == 0
    wait_until(lambda: ctx.ledger.explain("K-1").state == "done", 30, what="K-1 done on w2")

    starts = records(tmp_path, "K-1")
    assert [r["stage"] for r in starts] == ["triage", "implement", "review", "review"]  # not the implementation
    again = starts[-1]
    assert again["token"] != review["token"] and again["step"] == review["step"] == 3
    assert again["workdir"] == review["workdir"]  # the attempt's directory, with the implementation in it
    assert records(tmp_path, "K-1", "read")[-1]["work"] == "round 1\n"
    resumed_s = again["t"] - killed_at
    print(f"review resumed {resumed_s:.2f}s after the SIGKILL (lease 3 s)")
    assert resumed_s < 3 + 8
    assert ctx.ledger.counters()["stages_resumed"] == 1
    assert ctx.ledger.explain("K-1").detail.get("fence") == 2
    with pytest.raises(StaleClaimError):  # the dead holder's late result is fenced off
        ctx.ledger.complete("K-1", review["token"])


def test_kill_loop_mid_pipeline_starts_no_further_stage_and_start_loop_resumes(
    redis_url, real_redis, namespace, tmp_path, procs
):
    env = _implementing(redis_url, namespace, tmp_path, procs, "L-1", "slow-implement", AGENT_SLOW_S="3")
    res = ctl(env, "kill-loop", "--json")
    assert res.returncode == 0, res.stderr
    wait_until(
        lambda: records(tmp_path, "L-1", "end")[-1]["stage"] == "implement",
        10,
        what="the running implementation finished",
    )
    time.sleep(3)
    assert [r["stage"] for r in records(tmp_path, "L-1")] == ["triage", "implement"]  # no review started
    ctx = Context(settings_from(env), real_redis)
    wait_until(lambda: ctx.ledger.current_token("L-1") is None, 5, what="the claim released")
    progress = real_redis.hgetall(ctx.keys.stages("L-1"))
    assert progress["stage"] == "review" and progress["state"] == "pending"
    assert ctx.ledger.explain("L-1").detail.get("attempts") == 0
    assert ctx.ledger.counters().get("released_interrupted", 0) == 1

    assert ctl(env, "start-loop", "--json").returncode == 0
    wait_until(lambda: ctx.ledger.explain("L-1").state == "done", 30, what="L-1 done after start-loop")
    assert [r["stage"] for r in records(tmp_path, "L-1")] == ["triage", "implement", "review"]


def test_kill_loop_release_agents_stops_the_running_stage_and_start_loop_resumes_it(
    redis_url, real_redis, namespace, tmp_path, procs
):
    """``kill-loop --release-agents`` mid-implementation: the stage's agent is stopped at once, its claim
    released as interrupted (no attempt counted) with the progress kept at the implementation; no further
    stage starts; after start-loop the implementation runs again (the stopped one never ended), then the
    review, once."""
    env = _implementing(redis_url, namespace, tmp_path, procs, "R-1", "slow-implement-once")
    (impl,) = [r for r in records(tmp_path, "R-1") if r["stage"] == "implement"]
    t0 = time.monotonic()
    res = ctl(env, "kill-loop", "--release-agents", "--json")
    assert res.returncode == 0, res.stderr
    wait_until(lambda: not pid_alive(impl["pid"]), 15, what="the implementation's agent stopped")
    print(f"\nrelease-agents mid-stage: the stage's agent gone {time.monotonic() - t0:.2f}s after kill-loop")
    ctx = Context(settings_from(env), real_redis)
    wait_until(lambda: ctx.ledger.current_token("R-1") is None, 10, what="the claim released")
    time.sleep(2)
    assert [r["stage"] for r in records(tmp_path, "R-1")] == ["triage", "implement"]  # no review started
    assert not [r for r in records(tmp_path, "R-1", "end") if r["stage"] == "implement"]  # it never ended
    progress = real_redis.hgetall(ctx.keys.stages("R-1"))
    assert progress["stage"] == "implement"  # left by the released holder: the next claim's open resumes it
    assert ctx.ledger.explain("R-1").detail.get("attempts") == 0
    wait_until(lambda: not real_redis.smembers(ctx.keys.agents), 5, what="no agent listed as running")

    assert ctl(env, "start-loop", "--json").returncode == 0
    wait_until(lambda: ctx.ledger.explain("R-1").state == "done", 40, what="R-1 done after start-loop")
    assert [r["stage"] for r in records(tmp_path, "R-1")] == ["triage", "implement", "implement", "review"]
    assert [r["stage"] for r in records(tmp_path, "R-1", "end")] == ["triage", "implement", "review"]


def test_pause_mid_pipeline_lets_the_claimed_issue_finish_its_stages_and_claims_nothing_new(
    redis_url, real_redis, namespace, tmp_path, procs
):
    """Pause stops no stage of a claimed issue (as it stops no running agent): the implementation running
    when the loop is paused hands over to the review and the issue is done; an issue that becomes ready
    meanwhile is not claimed until resume."""
    env = _implementing(
        redis_url, namespace, tmp_path, procs, "P-1", "slow-implement", concurrency="3", AGENT_SLOW_S="3"
    )
    assert ctl(env, "pause", "--json").returncode == 0
    write_issues(
        tmp_path / "issues.jsonl",
        [
            {"id": "P-1", "title": "t", "state": "ready", "labels": ["slow-implement"]},
            {"id": "P-2", "title": "t", "state": "ready"},
        ],
    )
    ctx = Context(settings_from(env), real_redis)
    wait_until(lambda: "P-1" in dict(ctx.ledger.done_markers()), 30, what="P-1 done while paused")
    assert [r["stage"] for r in records(tmp_path, "P-1")] == ["triage", "implement", "review"]
    time.sleep(2)  # two more loop intervals, paused
    assert records(tmp_path, "P-2") == [] and ctx.ledger.explain("P-2").state == "paused"
    assert ctl(env, "resume", "--json").returncode == 0
    wait_until(lambda: ctx.ledger.explain("P-2").state == "done", 30, what="P-2 done after resume")
    assert [r["stage"] for r in records(tmp_path, "P-2")] == ["triage", "implement", "review"]


def test_warm_shutdown_mid_review_releases_the_claim_and_the_review_resumes_elsewhere(
    redis_url, real_redis, namespace, tmp_path, procs
):
    """SIGTERM the worker running a review that outlives its soft-shutdown window: the review's group is
    stopped, the claim released as interrupted (no attempt counted), and another worker's next claim resumes
    at the review, in the same attempt directory; the implementation does not run again."""
    write_issues(
        tmp_path / "issues.jsonl", [{"id": "W-1", "title": "t", "state": "ready", "labels": ["slow-review-once"]}]
    )
    env = staged_env(
        redis_url, namespace, tmp_path, FACTORY_WORKER__SOFT_SHUTDOWN_S="3", FACTORY_LOOP__MAX_ITERATIONS="50"
    )
    w1 = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "2"])
    procs.append(w1)
    w1.wait_ready()
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    review = wait_until(
        lambda: [r for r in records(tmp_path, "W-1") if r["stage"] == "review"], 30, what="the review started"
    )[0]
    w2 = CeleryProc("worker", env, tmp_path, "w2", extra=["-c", "2"])
    procs.append(w2)
    w2.wait_ready()

    took = warm_shutdown(w1, 3)
    assert took <= 3 + 3, f"warm shutdown took {took:.1f}s"
    assert not pid_alive(review["pid"])
    ctx = Context(settings_from(env), real_redis)
    wait_until(lambda: ctx.ledger.explain("W-1").state == "done", 40, what="W-1 done on w2")
    starts = records(tmp_path, "W-1")
    assert [r["stage"] for r in starts] == ["triage", "implement", "review", "review"]  # resumed at the review
    again = starts[-1]
    assert again["token"] != review["token"] and again["step"] == review["step"] == 3
    assert again["workdir"] == review["workdir"]  # w1 is gone: w2 ran it
    assert records(tmp_path, "W-1", "read")[-1]["work"] == "round 1\n"
    assert ctx.ledger.counters().get("released_interrupted", 0) == 1
    assert ctx.ledger.explain("W-1").detail.get("fence") == 2


def test_one_slack_thread_spans_the_stages_a_reply_reaches_the_review_and_the_end_stops_the_reads(
    redis_url, real_redis, namespace, tmp_path, procs
):
    from tests.fake_slack import CHANNEL, FakeSlack

    with FakeSlack() as slack:
        write_issues(
            tmp_path / "issues.jsonl", [{"id": "P-9", "title": "talk", "state": "ready", "labels": ["wait-inbox"]}]
        )
        env = staged_env(
            redis_url,
            namespace,
            tmp_path,
            FACTORY_SLACK__CHANNEL=CHANNEL,
            FACTORY_SLACK__API_URL=slack.url,
            FACTORY_SLACK__POLL_S="0.2",
            SLACK_BOT_TOKEN="xoxb-test",
        )
        worker = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "3"])
        procs.append(worker)
        worker.wait_ready()
        procs.append(CeleryProc("beat", env, tmp_path, "beat"))
        thread_ts = wait_until(lambda: next(iter(slack.threads), None), 30, what="the attempt's Slack thread")
        texts = lambda: [m["text"] for m in slack.threads[thread_ts] if m.get("bot_id")]  # noqa: E731
        wait_until(lambda: any("stage review started" in t for t in texts()), 60, what="the review running")
        slack.reply(thread_ts, "ship it")
        ctx = Context(settings_from(env), real_redis)
        wait_until(lambda: ctx.ledger.explain("P-9").state == "done", 60, what="P-9 done")
        wait_until(lambda: texts()[-1] == "factory-worker: done", 20, what="the end told in the thread")
        ended = time.time()
        time.sleep(1.5)  # seven poll intervals
        assert slack.reads_of(thread_ts, after=ended) == 0, "the thread was read after the dispatch ended"
        assert len(slack.threads) == 1
        assert [t.split(" (")[0] for t in texts()[1:]] == [
            "factory-worker: stage triage started",
            "factory-worker: stage triage ok; next: implement",
            "factory-worker: stage implement started",
            "factory-worker: stage implement ok; next: review",
            "factory-worker: stage review started",
            "factory-worker: done",
        ]
    (review,) = [r for r in records(tmp_path, "P-9") if r["stage"] == "review"]
    assert [json.loads(x)["text"] for x in review["inbox"].splitlines()] == ["ship it"]
