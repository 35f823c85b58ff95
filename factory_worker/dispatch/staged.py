"""The life of a staged dispatch on the workers: one claim, many stages, each its own ``factory.agent.stage``
task, handed over from one to the next through the stage ledger (``ledger/stages.py``, ``lua/stage.lua``).

``factory.agent.run`` begins the claim as for one agent (:func:`factory_worker.dispatch.single.execute`), then
:func:`hand_over` opens the attempt's stage progress (or finds it: a resumed attempt) and sends the task of
its current step. Each :func:`run_stage` starts its step by token (at most once; never once the loop is killed
or the task revoked); then its step runs and ends as any dispatch's (:func:`factory_worker.dispatch.lifecycle.run`:
the stage's command in the attempt's shared directory, the decision, the hand-over to the next step or the
settle). With a workspace the attempt's directory is a git worktree on the issue's branch
(``dispatch/worktree.py``): made by the attempt's first stage, handed from stage to stage on this root, published
when the last stage completes the attempt. Testable without Celery: sending is a callable; :func:`run_inline`
runs a whole pipeline in-process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from typing import Any

import redis

from factory_worker.agents import AgentRunner
from factory_worker.agents.command import safe_name
from factory_worker.config.stages import TRIAGE
from factory_worker.context import Context
from factory_worker.dispatch.claims import settle
from factory_worker.dispatch.job import Job, StageSender
from factory_worker.dispatch.lifecycle import forget, new_stage_task_id, run, send_stage_task
from factory_worker.ledger.scripts import StaleClaimError
from factory_worker.ledger.stages import StageLedger, StageUnackedError
from factory_worker.ledger.states import Begin, Outcome, ReleaseReason, Settled, StageStart
from factory_worker.ledger.types import fence_of
from factory_worker.sources.base import Issue

log = logging.getLogger(__name__)

__all__ = ["StageSender", "hand_over", "hand_over_claim", "new_stage_task_id", "run_inline", "run_stage"]


def hand_over_claim(job: Job) -> dict[str, Any]:
    """The staged path of a begun ``factory.agent.run`` task: :func:`hand_over`; anything that stops the
    hand-over settles the claim; the task's bookkeeping goes either way."""
    try:
        return hand_over(job)
    except StaleClaimError as exc:
        log.warning("%s: stage hand-over rejected: %s", job.label, exc)
        return {"outcome": Settled.STALE, "settled": Settled.STALE}
    except StageUnackedError:  # released, no attempt counted: nothing ran
        return {"outcome": Begin.UNACKED, "settled": Settled.RELEASED}
    except Exception as exc:
        error = f"could not hand over to the stages: {type(exc).__name__}: {exc}"
        log.error("%s: %s", job.label, error)
        return {"outcome": Outcome.FAILED, "settled": settle(job, Outcome.FAILED, error), "error": error}
    finally:
        forget(job)


def hand_over(job: Job) -> dict[str, Any]:
    """After ``begin`` (by ``factory.agent.run`` task ``job.task_id``, whose bookkeeping the caller clears):
    open or resume the attempt's progress and send the task of its current step. The claim's lease becomes
    the queue lease while that message waits."""
    ctx, issue = job.ctx, job.issue
    agent = ctx.settings.agent
    plan = [s.name for s in agent.pipeline()]
    first = TRIAGE if agent.triage else plan[0]
    if ctx.workspace.enabled:  # the attempt's worktree, made by its first stage (``dispatch/worktree.py``)
        workdir = ctx.workspace.tree_name(issue, fence_of(job.token))
    else:
        workdir = f"{safe_name(issue.id, 60)}-{uuid.uuid4().hex[:12]}"
    next_id = new_stage_task_id()
    stages = StageLedger(ctx.ledger)
    opened = stages.open(issue.id, job.token, next_id, job.run_id, first, plan, workdir)
    if opened.resumed:
        log.info("issue %s: resuming its attempt at step %d (%s)", issue.id, opened.step, opened.stage)
    if ctx.settings.slack.channel and not opened.thread:  # one thread per attempt, kept when it resumes
        _open_thread(job, stages, [first, *plan] if first == TRIAGE else plan)
    send_stage_task(job, next_id, opened.stage, opened.step)
    return {
        "outcome": Outcome.STAGED,
        "stage": opened.stage,
        "step": opened.step,
        "resumed": opened.resumed,
        "stage_task_id": next_id,
    }


def _open_thread(job: Job, stages: StageLedger, plan: list[str]) -> None:
    """Open the attempt's Slack thread and keep it in the progress (best effort: Slack never stops stages)."""
    from factory_worker.chat.slack import open_thread

    issue = job.issue
    try:
        thread = open_thread(job.ctx.settings.slack, issue.id, issue.title, job.task_id, plan)
    except Exception as exc:
        log.warning("issue %s: no Slack thread (%s: %s)", issue.id, type(exc).__name__, exc)
        return
    if thread:
        try:
            stages.set_thread(issue.id, job.token, thread)
        except (redis.RedisError, StaleClaimError) as exc:
            log.warning("issue %s: could not keep its Slack thread: %s", issue.id, exc)


def run_stage(job: Job) -> dict[str, Any]:
    """Run step ``job.step`` (stage ``job.stage``) of a staged dispatch and act on its end (see the module
    doc). ``job.send``: refill the slot from the backlog once the claim is settled, as an agent task does."""
    ctx = job.ctx
    stages = StageLedger(ctx.ledger)
    try:
        status, prog = stages.start(
            job.issue_id, job.token, job.task_id, job.step, job.stage, job.hostname, os.getpid()
        )
        job.begun()
    except StaleClaimError as exc:
        job.begun()
        log.warning("%s does nothing: %s", job.label, exc)
        ctx.control.count("stage_tasks_noop")
        forget(job, queued=True, ran=False)
        return {**job.result(), "outcome": Settled.STALE}
    if status != StageStart.OK or prog is None:
        log.warning("%s does nothing: %s", job.label, status)
        if status == StageStart.UNACKED:  # start released the claim already
            forget(job, queued=True)
        elif status in (StageStart.REVOKED, StageStart.KILLED):
            forget(job, queued=True)
            try:
                ctx.ledger.release(job.issue_id, job.token, reason=ReleaseReason.INTERRUPTED)
            except StaleClaimError:
                pass
        else:  # a twin runs it, or it ran: its records are not ours to drop
            forget(job, queued=True, ran=False)
        return {**job.result(), "outcome": status}
    return run(job, prog)


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

    job = Job(ctx, f"inline-{uuid.uuid4().hex}", issue.as_json_dict(), token, run_id, hostname, runner, send_stage=send)
    hand_over(job)
    results: list[dict[str, Any]] = []
    while queue and len(results) < max_steps:
        task_id, stage, step = queue.pop(0)
        results.append(run_stage(dataclasses.replace(job, task_id=task_id, stage=stage, step=step)))
    return results
