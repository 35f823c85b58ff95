"""The life of a staged dispatch on the workers: one claim, many stages, each its own ``factory.agent.stage``
task, handed over from one to the next through the ledger (``progress.py``, ``lua/stage.lua``).

``factory.agent.run`` begins the claim as for one agent (:func:`factory_worker.dispatch.single.execute`), then
:func:`hand_over` opens the attempt's stage progress (or finds it: a resumed attempt) and sends the task of
its current step. Each :func:`run_stage` starts its step by token (at most once; never once the loop is killed
or the task revoked), runs the stage's command in the attempt's shared directory, decides the next move
(``pipeline.decide``) and acts: hands over to the next step (and sends its task), completes, fails, escalates,
or releases. Testable without Celery: sending is a callable; :func:`run_inline` runs a whole pipeline in-process.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

import redis

from factory_worker.agents import AgentRunner, Dispatch
from factory_worker.agents.command import safe_name
from factory_worker.agents.sandbox import remove_shared_workdir, shared_workdir, write_feedback
from factory_worker.chat.notify import clean
from factory_worker.config.stages import TRIAGE
from factory_worker.context import Context
from factory_worker.dispatch.decisions import Decision, Progress, decide, read_output
from factory_worker.dispatch.single import StopCheck, make_runner, settle
from factory_worker.ledger.keys import Keys
from factory_worker.ledger.scripts import StaleClaimError
from factory_worker.ledger.stages import StageLedger
from factory_worker.ledger.states import Outcome, Settled
from factory_worker.loop.iteration import Sender, refill
from factory_worker.sources.base import Issue

log = logging.getLogger(__name__)

#: Sends one ``factory.agent.stage`` task: (task_id, issue, token, stage, step, run_id) -> None; raises on failure.
StageSender = Callable[[str, Issue, str, str, int, "str | None"], None]


def new_stage_task_id() -> str:
    return f"stage-{uuid.uuid4().hex}"


def hand_over(
    ctx: Context, task_id: str, issue: Issue, token: str, run_id: str | None, send_stage: StageSender
) -> dict[str, Any]:
    """After ``begin`` (by ``factory.agent.run`` task ``task_id``, whose bookkeeping the caller clears): open or
    resume the attempt's progress and send the task of its current step. The claim's lease becomes the queue
    lease while that message waits."""
    agent = ctx.settings.agent
    plan = [s.name for s in agent.pipeline()]
    first = TRIAGE if agent.triage else plan[0]
    workdir = f"{safe_name(issue.id, 60)}-{uuid.uuid4().hex[:12]}"
    next_id = new_stage_task_id()
    stages = StageLedger(ctx.ledger)
    opened = stages.open(issue.id, token, next_id, run_id, first, plan, workdir)
    if opened.resumed:
        log.info("issue %s: resuming its attempt at step %d (%s)", issue.id, opened.step, opened.stage)
    if ctx.settings.slack.channel and not opened.thread:  # one thread per attempt, kept when it resumes
        _open_thread(ctx, stages, issue, token, task_id, [first, *plan] if first == TRIAGE else plan)
    _send(ctx, send_stage, next_id, issue, token, opened.stage, opened.step, run_id)
    return {
        "outcome": "staged",
        "stage": opened.stage,
        "step": opened.step,
        "resumed": opened.resumed,
        "stage_task_id": next_id,
    }


def _open_thread(ctx: Context, stages: StageLedger, issue: Issue, token: str, task_id: str, plan: list[str]) -> None:
    """Open the attempt's Slack thread and keep it in the progress (best effort: Slack never stops stages)."""
    from factory_worker.chat.slack import open_thread

    try:
        thread = open_thread(ctx.settings.slack, issue.id, issue.title, task_id, plan)
    except Exception as exc:
        log.warning("issue %s: no Slack thread (%s: %s)", issue.id, type(exc).__name__, exc)
        return
    if thread:
        try:
            stages.set_thread(issue.id, token, thread)
        except (redis.RedisError, StaleClaimError) as exc:
            log.warning("issue %s: could not keep its Slack thread: %s", issue.id, exc)


def _converse(ctx: Context, prog: Progress, task_id: str, issue: Issue, ident: Any) -> Any:
    """One stage run's inbox (``FACTORY_INBOX``): fed by a watcher of the attempt's Slack thread (the stage's
    start posted in it) and / or the relay of the comments on its issue (``webhooks.relays_comments``); None
    when neither is on or both failed (the stage runs anyway)."""
    slack = bool(ctx.settings.slack.channel and prog.thread)
    relay_comments = ctx.settings.webhooks.relays_comments
    if not slack and not relay_comments:
        return None
    from factory_worker.agents.sandbox import make_inbox
    from factory_worker.chat.inbox import AgentInbox, TrackerRelay
    from factory_worker.chat.slack import join_conversation

    try:
        inbox = make_inbox(ctx.settings.agent, task_id, ident, issue.id)
    except OSError as exc:
        log.warning("stage task %s: no inbox (%s)", task_id, exc)
        return None
    conversation = None
    if slack:
        try:
            conversation = join_conversation(ctx.settings.slack, inbox, prog.thread)
        except Exception as exc:
            log.warning("stage task %s: no Slack thread (%s: %s)", task_id, type(exc).__name__, exc)
    if conversation is None and not relay_comments:
        inbox.unlink(missing_ok=True)
        return None
    if conversation is not None:
        _tell(
            conversation.post,
            f"factory-worker: stage {clean(prog.stage, 64)} started (step {clean(prog.step, 20)}, "
            f"round {clean(prog.round, 20)})",
        )
    relay = TrackerRelay(ctx.redis, ctx.keys, task_id, inbox).start() if relay_comments else None
    return AgentInbox(inbox, conversation, relay)


def _stage_end_text(result: dict[str, Any]) -> str:
    """What the thread is told when a stage's run ends the dispatch (a hand-over is told by :func:`_act`)."""
    from factory_worker.chat.slack import ended_text

    return ended_text(str(result.get("settled", "")), str(result.get("error") or ""))


def _tell(tell: Callable[[str], None] | None, text: str) -> None:
    """Post ``text`` in the attempt's thread, if any; nothing Slack does can fail the stage."""
    if tell is None:
        return
    try:
        tell(text)
    except Exception as exc:
        log.warning("could not post in the Slack thread: %s: %s", type(exc).__name__, exc)


def _send(
    ctx: Context,
    send_stage: StageSender,
    task_id: str,
    issue: Issue,
    token: str,
    stage: str,
    step: int,
    run_id: str | None,
) -> None:
    """Send a stage task whose record ``stage.lua`` wrote; if that fails, release the claim (progress kept:
    the next claim resumes at this step) and re-raise."""
    try:
        send_stage(task_id, issue, token, stage, step, run_id)
    except Exception:
        log.exception("issue %s: could not send stage %s (step %d); claim released", issue.id, stage, step)
        try:
            ctx.redis.zrem(ctx.keys.queued, task_id)
            ctx.ledger.release(issue.id, token, reason="send-failed")
        except Exception:
            log.warning("could not release %s after a failed send", issue.id, exc_info=True)
        raise


def run_stage(
    ctx: Context,
    task_id: str,
    issue_data: dict[str, Any],
    token: str,
    stage: str,
    step: int,
    run_id: str | None = None,
    hostname: str | None = None,
    runner: AgentRunner | None = None,
    send_stage: StageSender | None = None,
    send: Sender | None = None,
) -> dict[str, Any]:
    """Run step ``step`` (stage ``stage``) of a staged dispatch and act on its end (see the module doc).
    ``send``: refill the slot from the backlog once the claim is settled, as an agent task does."""
    hostname = hostname or socket.gethostname()
    issue_id = str(issue_data.get("id", "")) if isinstance(issue_data, dict) else ""
    result: dict[str, Any] = {"issue": issue_id, "task_id": task_id, "stage": stage, "step": step}
    stages = StageLedger(ctx.ledger)
    try:
        status, prog = stages.start(issue_id, token, task_id, step, stage, hostname, os.getpid())
    except StaleClaimError as exc:
        log.warning("stage task %s (%s of %s) does nothing: %s", task_id, stage, issue_id, exc)
        ctx.control.count("stage_tasks_noop")
        _forget_task(ctx, task_id, queued_only=True)
        return {**result, "outcome": Settled.STALE}
    if status != "ok" or prog is None:
        log.warning("stage task %s (%s of %s) does nothing: %s", task_id, stage, issue_id, status)
        if status == "unacked":  # start released the claim already
            _forget_task(ctx, task_id)
        elif status in ("revoked", "killed"):
            _forget_task(ctx, task_id)
            try:
                ctx.ledger.release(issue_id, token, reason=Outcome.INTERRUPTED)
            except StaleClaimError:
                pass
        else:
            _forget_task(ctx, task_id, queued_only=True)
        return {**result, "outcome": status}
    ident = conversation = None
    try:
        issue = Issue.model_validate(issue_data)
        runner = runner or make_runner(ctx)
        ident = getattr(runner, "ident", None)
        result["round"] = prog.round
        conversation = _converse(ctx, prog, task_id, issue, ident)
        try:
            res = _run(
                ctx,
                runner,
                issue,
                token,
                task_id,
                hostname,
                prog,
                ident,
                conversation.inbox if conversation is not None else None,
            )
        finally:  # no read of the thread after the stage's end
            if conversation is not None:
                conversation.close()
        output = read_output(res.log_path, Keys.FEEDBACK_MAX_BYTES)
        decision = decide(ctx.settings.agent, prog, res.outcome, res.exit_code, res.error, output)
        result.update(
            exit_code=res.exit_code,
            duration_s=round(res.duration_s, 3),
            error=res.error or None,
            log=str(res.log_path) if res.log_path else None,
        )
    except Exception as exc:
        decision = Decision("fail", "failed", error=f"could not run stage {stage!r}: {type(exc).__name__}: {exc}")
        log.error("stage task %s for %s: %s", task_id, issue_id, decision.error)
    tell = conversation.post if conversation is not None else None
    try:
        result.update(_act(ctx, decision, issue_data, token, prog, run_id, send_stage, ident, tell))
    finally:
        _forget_task(ctx, task_id)
        if conversation is not None:
            if result.get("settled") != "next":  # a hand-over was told before the next stage was sent
                _tell(tell, _stage_end_text(result))
            conversation.inbox.unlink(missing_ok=True)
    if send is not None and result.get("settled") not in (None, "next", Settled.LEASE_LOST):
        try:
            result["refilled"] = refill(ctx, send, run_id)
        except Exception:
            log.warning("could not refill the slot freed by %s", task_id, exc_info=True)
    return result


def _run(
    ctx: Context,
    runner: AgentRunner,
    issue: Issue,
    token: str,
    task_id: str,
    hostname: str,
    prog: Progress,
    ident: Any,
    inbox: Any = None,
):
    """Run the step's command in the attempt's shared directory, with its feedback file (and its Slack
    inbox, when the attempt has a thread)."""
    agent = ctx.settings.agent
    if prog.stage == TRIAGE and agent.triage is not None:
        command, timeout_s = agent.triage.command, agent.triage.timeout_s
    else:
        cfg = agent.stage(prog.stage)
        if cfg is None:
            raise ValueError(f"stage {prog.stage!r} is not configured (agent.stages)")
        command, timeout_s = cfg.command, cfg.timeout_s or agent.timeout_s
    workdir, feedback = shared_workdir(agent, prog.workdir, issue, ident)
    write_feedback(feedback, prog.feedback, ident)
    env = {
        "FACTORY_WORKDIR": str(workdir),
        "FACTORY_FEEDBACK": str(feedback),
        "FACTORY_STAGE": prog.stage,
        "FACTORY_ROUND": str(prog.round),
        "FACTORY_STEP": str(prog.step),
    }
    if inbox is not None:
        env["FACTORY_INBOX"] = str(inbox)
    dispatch = Dispatch(
        issue=issue, token=token, dispatch_id=task_id, env=env, command=command, timeout_s=timeout_s, workdir=workdir
    )
    log.info("issue %s: stage %s (step %d, round %d) starts", issue.id, prog.stage, prog.step, prog.round)
    return runner.run(
        dispatch, renew=lambda: ctx.ledger.renew(issue.id, token), should_stop=StopCheck(ctx, task_id, hostname)
    )


def _act(
    ctx: Context,
    d: Decision,
    issue_data: dict[str, Any],
    token: str,
    prog: Progress,
    run_id: str | None,
    send_stage: StageSender | None,
    ident: Any,
    tell: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Carry out decision ``d`` by token; returns what to add to the task's result (``settled`` and more)."""
    issue_id = str(issue_data.get("id", ""))
    out: dict[str, Any] = {"outcome": d.outcome}
    if d.error:
        out["error"] = d.error
    if d.kind == "lost":
        return {**out, "settled": Settled.LEASE_LOST}
    if d.kind == "release":
        return {**out, "settled": settle(ctx, issue_id, token, Outcome.INTERRUPTED, d.error)}
    if d.kind == "next" and send_stage is not None:
        next_id = new_stage_task_id()
        try:
            new_step = StageLedger(ctx.ledger).next(
                issue_id, token, prog.step, d.outcome, d.stage, d.round, d.retries, d.feedback, next_id, run_id, d.plan
            )
        except StaleClaimError as exc:
            log.warning("late result of %s step %d rejected: %s", issue_id, prog.step, exc)
            return {**out, "settled": Settled.STALE}
        if new_step is None:
            return {**out, "settled": "moved"}
        _tell(
            tell, f"factory-worker: stage {clean(prog.stage, 64)} {clean(d.outcome, 64)}; next: {clean(d.stage, 64)}"
        )  # before it can start
        _send(ctx, send_stage, next_id, Issue.model_validate(issue_data), token, d.stage, new_step, run_id)
        log.info(
            "issue %s: step %d (%s) %s -> step %d (%s, round %d)",
            issue_id,
            prog.step,
            prog.stage,
            d.outcome,
            new_step,
            d.stage,
            d.round,
        )
        return {**out, "settled": "next", "next_stage": d.stage, "next_step": new_step, "next_task_id": next_id}
    if d.kind == "next":  # no sender: cannot hand over (a bug in the caller); free the claim, keep progress
        return {**out, "settled": settle(ctx, issue_id, token, Outcome.INTERRUPTED, "no stage sender")}
    if d.kind == "escalate":
        try:
            StageLedger(ctx.ledger).escalate(issue_id, token, d.error)
            settled: str = Settled.PARKED
            ctx.notifier.send_event("parked", issue_id=issue_id, attempts=0, last_error=d.error)
        except StaleClaimError as exc:
            log.warning("late escalation of %s rejected: %s", issue_id, exc)
            settled = Settled.STALE
        out.update(escalated=True)
    else:
        settled = settle(ctx, issue_id, token, Outcome.OK if d.kind == "complete" else Outcome.FAILED, d.error)
    if settled != Settled.STALE:
        remove_shared_workdir(ctx.settings.agent, prog.workdir, ident)
    return {**out, "settled": settled}


def _forget_task(ctx: Context, task_id: str, queued_only: bool = False) -> None:
    """A task's bookkeeping once it ends (off the running set, its record and stop flag gone); with
    ``queued_only`` only off the queued set (a duplicate must not drop the record of its running twin)."""
    try:
        p = ctx.redis.pipeline(transaction=False)
        p.zrem(ctx.keys.queued, task_id)
        if not queued_only:
            p.srem(ctx.keys.agents, task_id)
            p.delete(ctx.keys.agent_task(task_id))
            p.delete(ctx.keys.agent_stop(task_id))
        p.execute()
    except redis.RedisError:
        log.warning("could not clean up after task %s", task_id, exc_info=True)


def run_inline(
    ctx: Context,
    issue: Issue,
    token: str,
    runner: AgentRunner | None = None,
    run_id: str | None = None,
    hostname: str = "inline",
    max_steps: int = 100,
) -> list[dict[str, Any]]:
    """Run a begun claim's whole pipeline in this process (tests, ``run-once``): every stage task that would
    be sent runs here, in order. Returns the stage results."""
    queue: list[tuple[str, str, int]] = []

    def send(task_id: str, _issue: Issue, _token: str, stage: str, step: int, _run_id: str | None) -> None:
        queue.append((task_id, stage, step))

    hand_over(ctx, f"inline-{uuid.uuid4().hex}", issue, token, run_id, send)
    results: list[dict[str, Any]] = []
    while queue and len(results) < max_steps:
        task_id, stage, step = queue.pop(0)
        results.append(
            run_stage(ctx, task_id, issue.as_json_dict(), token, stage, step, run_id, hostname, runner, send)
        )
    return results
