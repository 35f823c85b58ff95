"""A task's writes to its claim by token: :func:`settle` an agent's outcome (through a Redis outage of up to
one lease), :func:`release_quietly`, and :func:`release_task_claim` by a task id (revoke, teardown, kill)."""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from factory_worker.context import Context
from factory_worker.dispatch.job import Job
from factory_worker.ledger.outage import FailureLog
from factory_worker.ledger.redis_client import decoded_hash
from factory_worker.ledger.scripts import StaleClaimError
from factory_worker.ledger.states import Outcome, ReleaseReason, Settled, TaskState
from factory_worker.ledger.types import Rider
from factory_worker.loop.presence import SHUTDOWN

log = logging.getLogger(__name__)

#: A settle retried during a warm shutdown gives up this long before the soft-shutdown window ends: what Celery
#: needs to stop its pool and the worker to exit (about 1.5 s measured with two pool processes).
SETTLE_MARGIN_S = 2.25


def settle(
    job: Job, outcome: str, error: str = "", rider: Rider | None = None, result: dict[str, Any] | None = None
) -> Settled:
    """Write an agent's outcome to the ledger by token; a stale token changes nothing. ``result``: what a done
    dispatch made (its summary and pull request go on the ``done`` event).

    A Redis outage (restart, failover) is retried for up to one lease TTL: the claim is still ours until
    then, and giving up early would make the issue run again. The last try is made at that deadline (a
    Sentinel promotion that ends just before it still gets the outcome). The deadline counts from the
    agent's end, so it can pass the claim's real end by up to one renew interval; such a try is fenced. During
    the worker's warm shutdown the retries end ``SETTLE_MARGIN_S`` before its window does (the worker must exit
    in it; an outcome not written is the lease's to end: the issue is claimable again after it).
    """
    deadline = time.monotonic() + job.ctx.settings.dispatch.lease_ttl_s
    window_end = SHUTDOWN.window_end()  # a warm shutdown: no later than its window (the lease ends the claim)
    bounded = window_end is not None and window_end - SETTLE_MARGIN_S < deadline
    if window_end is not None and bounded:
        deadline = window_end - SETTLE_MARGIN_S
    delay = 0.1
    failures = FailureLog(f"settling {job.issue_id} (Redis unavailable)", log)
    while True:
        try:
            return _settle_once(job, outcome, error, rider, result)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            left = deadline - time.monotonic()
            if left <= 0 and bounded:
                log.warning(
                    "%s of %s not written: Redis unavailable until the shutdown window ended; the claim ends with "
                    "its lease (%gs), then the issue is claimable again",
                    outcome,
                    job.issue_id,
                    job.ctx.settings.dispatch.lease_ttl_s,
                )
                return Settled.UNWRITTEN
            if left <= 0:
                raise
            wait = min(delay, left)
            failures.failed(exc, f"retrying for {left:.1f}s more")
            time.sleep(wait)
            delay = min(delay * 2, 1.0)


def _settle_once(job: Job, outcome: str, error: str, rider: Rider | None, result: dict[str, Any] | None) -> Settled:
    ctx, issue_id, token = job.ctx, job.issue_id, job.token
    if rider is not None and rider.sent:  # a retry after a connection error: the rider went already
        rider = None
    try:
        if outcome == Outcome.OK:
            ctx.ledger.complete(issue_id, token, rider, result)
            ctx.notifier.send_event("done", issue_id=issue_id)
            return Settled.DONE
        if outcome == Outcome.LEASE_LOST:
            return Settled.LEASE_LOST
        if outcome == Outcome.INTERRUPTED:
            ctx.ledger.release(issue_id, token, reason=ReleaseReason.INTERRUPTED, rider=rider)
            return Settled.RELEASED
        failed = ctx.ledger.fail(issue_id, token, error or outcome, rider)
        if failed.state == Settled.PARKED:
            ctx.notifier.send_event("parked", issue_id=issue_id, attempts=failed.attempts, last_error=error)
        return Settled(failed.state)
    except StaleClaimError as exc:
        log.warning("late %s for %s rejected: %s", outcome, issue_id, exc)
        return Settled.STALE


def release_quietly(ctx: Context, issue_id: str, token: str, reason: str) -> bool:
    """Release by token; False (and nothing changed) when the token no longer holds the claim."""
    try:
        ctx.ledger.release(issue_id, token, reason=reason)
        return True
    except StaleClaimError:
        return False


def release_task_claim(
    ctx: Context, task_id: str, reason: str = ReleaseReason.INTERRUPTED, only_if_queued: bool = False
) -> str | None:
    """Release the claim of agent or stage task ``task_id`` by its recorded token (used on revoke/teardown).

    ``only_if_queued``: leave it alone when its agent is running (a discarded duplicate of a message whose
    twin runs elsewhere must not free the running agent's claim).
    """
    rec = decoded_hash(ctx.redis.hgetall(ctx.keys.agent_task(task_id)))
    if not rec.get("issue") or not rec.get("token"):
        return None
    if only_if_queued and rec.get("state") == TaskState.RUNNING:
        return None
    return rec["issue"] if release_quietly(ctx, rec["issue"], rec["token"], reason) else None
