"""The life of one ``factory.agent.run`` task on a worker: verify the claim, then run its agent (or hand a
staged dispatch over to its stage tasks), and settle the claim by token.

Called by the ``factory.agent.run`` task with a :class:`~factory_worker.dispatch.job.Job`; testable without
Celery. ``begin.lua`` checks the claim before the agent starts (the token holds it, no agent started for that
token yet, not revoked, not killed), so a redelivered, duplicated or superseded message runs nothing. The
agent's run and its end are every dispatch's (:func:`factory_worker.dispatch.lifecycle.run`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from factory_worker.dispatch.claims import release_quietly
from factory_worker.dispatch.job import Job
from factory_worker.dispatch.lifecycle import forget, run
from factory_worker.dispatch.staged import hand_over_claim
from factory_worker.ledger.guard import LedgerLostError
from factory_worker.ledger.scripts import StaleClaimError
from factory_worker.ledger.states import Begin, ReleaseReason, Settled

log = logging.getLogger(__name__)


def execute(job: Job) -> dict[str, Any]:
    """Run the agent for one claim and settle it: complete, fail (backoff/park) or release; then, with
    ``job.send``, refill the slot it freed from the backlog at once.

    A staged dispatch (``agent.stages`` / ``agent.triage``) with ``job.send_stage``: after ``begin`` the claim
    is handed over to its stage tasks (:func:`factory_worker.dispatch.staged.hand_over`), which settle it.
    """
    began = begin(job)
    job.begun()
    if began != Begin.STARTED:  # it never starts: off the queued set now rather than at the loop's next sweep
        forget(job, queued=True, ran=False)
        return {**job.result(), "outcome": began}
    if job.ctx.settings.agent.staged and job.send_stage is not None:
        return {**job.result(), **hand_over_claim(job)}
    return run(job)


def begin(job: Job) -> Begin | Settled:
    """``begin`` for this task; anything but :attr:`Begin.STARTED` means nothing runs (and a revoked, killed
    or unacknowledged start has released its claim)."""
    ctx = job.ctx
    try:
        began = ctx.ledger.begin(job.issue_id, job.token, job.task_id, job.hostname, os.getpid())
    except LedgerLostError as exc:  # safe mode: nothing starts (its claim is not in this ledger anyway)
        log.error("%s does nothing: %s", job.label, exc)
        return Begin.LEDGER_LOST
    except StaleClaimError as exc:
        log.warning("%s does nothing: %s", job.label, exc)
        ctx.control.count("agent_tasks_noop")  # must be rare: a claim released or taken over while queued
        return Settled.STALE
    if began in (Begin.REVOKED, Begin.KILLED, Begin.UNACKED):
        log.warning("%s does nothing: %s; claim released", job.label, began)
        reason = ReleaseReason.UNACKED if began == Begin.UNACKED else ReleaseReason.INTERRUPTED
        release_quietly(job.ctx, job.issue_id, job.token, reason)
    elif began == Begin.DUPLICATE:
        log.warning("%s does nothing: an agent already started for this claim", job.label)
    return began
