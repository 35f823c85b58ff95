"""The one life of a dispatch's step on a worker, for a single agent and for each stage of a staged attempt.

:func:`run` builds the step (``steps.py``; with a workspace its worktree, ``worktree.py``: prepared before the
agent, published after an exit 0 that completes the dispatch, released always), runs it, decides what its end
means (``decisions.py``: a single agent is the one-stage case, :func:`decide_single`) and :func:`finish`
carries that out by token: complete,
fail (backoff/park), release, escalate, or hand over to the next stage; with the task's bookkeeping (its
running entry, record and stop flag) and the refill's first backlog pop riding in that write's round trip
(:class:`~factory_worker.ledger.types.Rider`), and so does the dispatch's result (``ledger/results.py``); then
the freed slot is refilled from the backlog at once
(:func:`factory_worker.loop.iteration.refill`). Nothing between a task's start and its step's end can leave
the claim unsettled: an exception there is a failed attempt, so a poisoned issue backs off and is parked
instead of being re-dispatched every lease.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from typing import Any

import redis

from factory_worker.agents.sandbox import remove_shared_workdir
from factory_worker.chat.inbox import AgentInbox
from factory_worker.chat.notify import clean
from factory_worker.chat.slack import ended_text
from factory_worker.dispatch.claims import settle
from factory_worker.dispatch.decisions import Decision, Move, decide, decide_single, read_output
from factory_worker.dispatch.job import Job
from factory_worker.dispatch.steps import converse, dispatch_for, make_runner, run_step, tell
from factory_worker.dispatch.worktree import Checkout, checkout, failed
from factory_worker.ledger.keys import Keys
from factory_worker.ledger.results import queue_result
from factory_worker.ledger.scripts import StaleClaimError
from factory_worker.ledger.stages import Progress, StageLedger
from factory_worker.ledger.states import Outcome, ReleaseReason, Settled
from factory_worker.ledger.types import Rider
from factory_worker.loop.iteration import refill
from factory_worker.workspace import WorkspaceError

log = logging.getLogger(__name__)

#: the bookkeeping's own commands in a pipeline (:func:`bookkeeping`); the backlog pop, when asked for, is next
CLEAN_UP_COMMANDS = 3


def new_stage_task_id() -> str:
    return f"stage-{uuid.uuid4().hex}"


def run(job: Job, prog: Progress | None = None) -> dict[str, Any]:
    """Run the step of a started task (a single agent, or with its progress ``prog`` one stage) and
    :func:`finish` it. Returns the task's result."""
    result = job.result()
    conversation: AgentInbox | None = None
    ident = None
    tree: Checkout | None = None
    decision: Decision | None = None
    try:
        runner = job.runner or make_runner(job.ctx)
        ident = getattr(runner, "ident", None)
        if prog is not None:
            result["round"] = prog.round
        tree = checkout(job, prog, ident)
        if tree is not None and tree.lost:  # the claim went while the worktree was made: nothing runs
            decision = Decision(Move.LOST, Outcome.LEASE_LOST, error=tree.lost)
        else:
            dispatch = dispatch_for(job, prog, ident, tree.prepared if tree is not None else None)
            conversation = converse(job, dispatch, ident, prog)
            if prog is not None:
                log.info(
                    "issue %s: stage %s (step %d, round %d) starts", job.issue_id, prog.stage, prog.step, prog.round
                )
            res = run_step(job, runner, dispatch)
            if prog is None:
                decision = decide_single(res.outcome, res.error)
            else:
                output = read_output(res.log_path, Keys.FEEDBACK_MAX_BYTES)
                decision = decide(job.ctx.settings.agent, prog, res.outcome, res.exit_code, res.error, output)
            result.update(
                exit_code=res.exit_code,
                duration_s=round(res.duration_s, 3),
                log=str(res.log_path) if res.log_path else None,
                error=res.error if prog is None else (res.error or None),
            )
            if res.usage is not None:
                result["usage"] = res.usage
            if tree is not None:  # published (or what it left recorded) before the settle
                decision = tree.settle(decision)
    except WorkspaceError as exc:  # the worktree could not be made: nothing ran
        decision = failed(exc)
        log.error("%s: %s", job.label, decision.error)
    except Exception as exc:
        what = "the agent" if prog is None else f"stage {job.stage!r}"
        decision = Decision(Move.FAIL, Outcome.FAILED, error=f"could not run {what}: {type(exc).__name__}: {exc}")
        log.error("%s: %s", job.label, decision.error)
    finally:
        if tree is not None:  # always, and before the settle: the issue's next dispatch may start at once
            tree.release(decision)
            result["workspace"] = tree.shown()
    assert decision is not None  # every way through the block above decides (a BaseException goes on up)
    return finish(job, decision, result, prog, conversation, ident)


def finish(
    job: Job,
    d: Decision,
    result: dict[str, Any],
    prog: Progress | None = None,
    conversation: AgentInbox | None = None,
    ident: Any = None,
) -> dict[str, Any]:
    """Carry out decision ``d`` for a task whose step ran (see the module doc), tell the step's Slack thread
    how it ended (a hand-over was told before the next stage was sent) and stop watching it; then refill."""
    if d.kind == Move.NEXT and job.send_stage is None:  # cannot hand over (a bug in the caller): free the claim
        log.error("%s: no stage sender to hand over to %s; claim released, progress kept", job.label, d.stage)
        d = replace(d, kind=Move.RELEASE)
    pop = job.send is not None and d.kind not in (Move.NEXT, Move.LOST)
    rider = Rider(lambda p: bookkeeping(job, p, pop=pop, record=d.record))
    try:
        result.update(act(job, d, prog, rider, conversation, ident))
    finally:
        settled = result.get("settled")
        if conversation is not None:  # no read of the thread after this; then its end is told
            final = None if settled == Settled.NEXT else ended_text(str(settled or ""), str(result.get("error") or ""))
            try:
                conversation.close(final)
            finally:  # the inbox goes with its dispatch (the stopped watcher never makes it again)
                conversation.inbox.unlink(missing_ok=True)
        refilling = job.send is not None and settled not in (None, Settled.NEXT, Settled.LEASE_LOST, Settled.UNWRITTEN)
        if not rider.replies:  # nothing was sent (a lost lease, Redis gone), or its answer was lost
            forget(job, pop=refilling and pop and not rider.sent, rider=rider)  # idempotent; never pop twice
    if refilling and job.send is not None:
        try:
            # the popped entry, or (a lost answer: the pop may have run) the refill pops for itself
            got = pop and len(rider.replies) > CLEAN_UP_COMMANDS
            popped = {"popped": rider.replies[CLEAN_UP_COMMANDS]} if got else {}
            result["refilled"] = refill(job.ctx, job.send, job.run_id, **popped)
        except Exception:
            log.warning("could not refill the slot freed by %s", job.task_id, exc_info=True)
    return result


def act(
    job: Job, d: Decision, prog: Progress | None, rider: Rider, conversation: AgentInbox | None, ident: Any
) -> dict[str, Any]:
    """Write decision ``d`` by token (``rider`` in its round trip); what to add to the result (``settled``...)."""
    out: dict[str, Any] = {"outcome": d.outcome}
    if d.error:
        out["error"] = d.error
    if d.kind == Move.LOST:
        return {**out, "settled": Settled.LEASE_LOST}
    if d.kind == Move.RELEASE:
        return {**out, "settled": settle(job, Outcome.INTERRUPTED, d.error, rider)}
    if d.kind == Move.NEXT and prog is not None:
        return {**out, **to_next_step(job, d, prog, rider, conversation)}
    if d.kind == Move.ESCALATE:
        try:
            StageLedger(job.ctx.ledger).escalate(job.issue_id, job.token, d.error, rider)
            settled: Settled = Settled.PARKED
            job.ctx.notifier.send_event("parked", issue_id=job.issue_id, attempts=0, last_error=d.error)
        except StaleClaimError as exc:
            log.warning("late escalation of %s rejected: %s", job.issue_id, exc)
            settled = Settled.STALE
        out.update(escalated=True)
    elif d.kind == Move.COMPLETE:
        settled = settle(job, Outcome.OK, d.error, rider, d.record)
    else:  # a failed attempt: a single agent's as its run's outcome (timeout, signalled, ...), a stage's as failed
        settled = settle(job, d.outcome if prog is None else Outcome.FAILED, d.error, rider)
    if prog is not None and settled != Settled.STALE:  # the attempt ended: its shared directory goes
        remove_shared_workdir(job.ctx.settings.agent, prog.workdir, ident)
    return {**out, "settled": settled}


def to_next_step(
    job: Job, d: Decision, prog: Progress, rider: Rider, conversation: AgentInbox | None
) -> dict[str, Any]:
    """Finish step ``prog.step`` and make ``d.stage`` the next one (``stage.lua`` next), then send its task."""
    next_id = new_stage_task_id()
    try:
        new_step = StageLedger(job.ctx.ledger).next(
            job.issue_id,
            job.token,
            prog.step,
            d.outcome,
            d.stage,
            d.round,
            d.retries,
            d.feedback,
            next_id,
            job.run_id,
            d.plan,
            rider,
        )
    except StaleClaimError as exc:
        log.warning("late result of %s step %d rejected: %s", job.issue_id, prog.step, exc)
        return {"settled": Settled.STALE}
    if new_step is None:
        return {"settled": Settled.MOVED}
    tell(
        conversation,
        f"factory-worker: stage {clean(prog.stage, 64)} {clean(d.outcome, 64)}; next: {clean(d.stage, 64)}",
    )  # before it can start
    send_stage_task(job, next_id, d.stage, new_step)
    log.info(
        "issue %s: step %d (%s) %s -> step %d (%s, round %d)",
        job.issue_id,
        prog.step,
        prog.stage,
        d.outcome,
        new_step,
        d.stage,
        d.round,
    )
    return {"settled": Settled.NEXT, "next_stage": d.stage, "next_step": new_step, "next_task_id": next_id}


def send_stage_task(job: Job, task_id: str, stage: str, step: int) -> None:
    """Send a stage task whose record ``stage.lua`` wrote; if that fails, release the claim (progress kept:
    the next claim resumes at this step) and re-raise."""
    if job.send_stage is None:
        raise RuntimeError(f"{job.label}: no stage sender")
    try:
        job.send_stage(task_id, job.issue, job.token, stage, step, job.run_id)
    except Exception:
        log.exception("issue %s: could not send stage %s (step %d); claim released", job.issue_id, stage, step)
        try:
            job.ctx.redis.zrem(job.ctx.keys.queued, task_id)
            job.ctx.ledger.release(job.issue_id, job.token, reason=ReleaseReason.SEND_FAILED)
        except Exception:
            log.warning("could not release %s after a failed send", job.issue_id, exc_info=True)
        raise


def bookkeeping(
    job: Job, pipe: Any, queued: bool = False, ran: bool = True, pop: bool = False, record: dict | None = None
) -> None:
    """A task's records once it ends, queued on ``pipe``: with ``queued``, off the queued set (a task that never
    started); with ``ran``, off the running set, its record and stop flag gone (:data:`CLEAN_UP_COMMANDS`; a
    duplicate must not drop those of its running twin); with ``pop``, the refill's first backlog candidate;
    then the dispatch's ``record``, the issue's last result (``ledger/results.py``)."""
    k = job.ctx.keys
    if queued:
        pipe.zrem(k.queued, job.task_id)
    if ran:
        pipe.srem(k.agents, job.task_id).delete(k.agent_task(job.task_id)).delete(k.agent_stop(job.task_id))
    if pop:
        pipe.lpop(k.backlog)
    if record is not None:
        queue_result(pipe, k, job.issue_id, record)


def forget(job: Job, queued: bool = False, ran: bool = True, pop: bool = False, rider: Rider | None = None) -> None:
    """:func:`bookkeeping` in a round trip of its own (its replies kept in ``rider``); Redis errors are logged."""
    try:
        p = job.ctx.redis.pipeline(transaction=False)
        bookkeeping(job, p, queued, ran, pop)
        replies = p.execute()
    except redis.RedisError as exc:  # one line: a Redis outage is no bug (its records expire)
        log.warning("could not clean up after task %s (%s: %s)", job.task_id, type(exc).__name__, exc)
        return
    if rider is not None:
        rider.replies = replies
