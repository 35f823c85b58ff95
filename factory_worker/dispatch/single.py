"""The life of one dispatch on a worker: verify the claim, run the agent, settle the claim by token.

Called by the ``factory.agent.run`` task; testable without Celery. ``begin.lua`` checks the claim before
the agent starts (the token holds it, no agent started for that token yet, not revoked, not killed), so a
redelivered, duplicated or superseded message runs nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import redis

from factory_worker.agents import AgentRunner, CommandAgent, Dispatch
from factory_worker.chat.inbox import AgentInbox
from factory_worker.chat.slack import ended_text
from factory_worker.context import Context
from factory_worker.ledger.core import Rider
from factory_worker.ledger.guard import LedgerLostError
from factory_worker.ledger.redis_client import decoded_hash
from factory_worker.ledger.scripts import StaleClaimError
from factory_worker.ledger.states import Begin, Outcome, Settled
from factory_worker.loop.iteration import Sender, refill
from factory_worker.sources.base import Issue

log = logging.getLogger(__name__)

#: How often (s) the Redis stop flags are read while an agent runs.
STOP_POLL_S = 0.5


def renew_interval(ctx: Context) -> float:
    return max(0.05, ctx.settings.dispatch.lease_ttl_s / 3)


def make_runner(ctx: Context) -> AgentRunner:
    return CommandAgent(ctx.settings.agent, renew_interval(ctx), ctx.settings.dispatch.lease_ttl_s)


class StopCheck:
    """Polls the agent's stop flag and the worker's shutdown deadline, at most every STOP_POLL_S."""

    def __init__(self, ctx: Context, task_id: str, hostname: str) -> None:
        self.ctx, self.task_id, self.hostname = ctx, task_id, hostname
        self._next = time.monotonic() + STOP_POLL_S  # begin() just checked revoke and kill
        self._reason: str | None = None
        self._deadline: float | None = None  # local monotonic time of the worker's shutdown deadline

    def __call__(self) -> str | None:
        if self._reason:
            return self._reason
        now = time.monotonic()
        if self._deadline is not None and now >= self._deadline:
            self._reason = "worker shutdown: soft-shutdown window elapsed"
            return self._reason
        if now < self._next:
            return None
        self._next = now + STOP_POLL_S
        k = self.ctx.keys
        try:
            p = self.ctx.redis.pipeline(transaction=False)
            p.get(k.agent_stop(self.task_id))
            p.get(k.worker_shutdown(self.hostname))
            p.time()
            stop, deadline, (sec, usec) = p.execute()
        except Exception:
            log.warning("could not read stop flags for %s", self.task_id, exc_info=True)
            return None
        if stop:
            self._reason = f"stopped by operator ({stop})"
        elif deadline:
            left_s = (int(deadline) - (int(sec) * 1000 + int(usec) // 1000)) / 1000
            self._deadline = time.monotonic() + left_s  # then checked locally on every tick
            if left_s <= 0:
                self._reason = "worker shutdown: soft-shutdown window elapsed"
        return self._reason


def execute(
    ctx: Context,
    task_id: str,
    issue_data: dict[str, Any],
    token: str,
    run_id: str | None = None,
    hostname: str | None = None,
    runner: AgentRunner | None = None,
    send: Sender | None = None,
    send_stage: Any = None,
) -> dict[str, Any]:
    """Run the agent for one claim and settle it: complete, fail (backoff/park) or release; then, with
    ``send``, refill the slot it freed from the backlog at once (:func:`factory_worker.loop.iteration.refill`).

    A staged dispatch (``agent.stages`` / ``agent.triage``) with ``send_stage``: after ``begin`` the claim is
    handed over to its stage tasks (:func:`factory_worker.dispatch.staged.hand_over`), which settle it.

    Nothing between ``begin`` and the agent's end can leave the claim unsettled: an exception there
    (the issue cannot be handed to the agent, the spawn fails, a bug) settles it as a failed attempt, so a
    poisoned issue backs off and is parked instead of being re-dispatched every lease.
    """
    hostname = hostname or socket.gethostname()
    issue_id = str(issue_data.get("id", "")) if isinstance(issue_data, dict) else ""
    result: dict[str, Any] = {"issue": issue_id, "task_id": task_id}
    began = _begin(ctx, issue_id, token, task_id, hostname)
    if began != Begin.STARTED:
        try:  # it never starts: off the queued set now rather than at the loop's next sweep
            ctx.redis.zrem(ctx.keys.queued, task_id)
        except redis.RedisError:
            log.warning("could not drop %s from the queued set", task_id)
        return {**result, "outcome": began}
    if ctx.settings.agent.staged and send_stage is not None:
        return {**result, **_hand_over(ctx, task_id, issue_data, token, run_id, send_stage)}
    conversation = None
    # the task's clean-up and the refill's first backlog pop ride in the settle's round trip
    rider = Rider(lambda p: _clean_up(ctx, p, task_id, pop=send is not None))
    try:
        issue = Issue.model_validate(issue_data)
        runner = runner or make_runner(ctx)
        dispatch = Dispatch(issue=issue, token=token, dispatch_id=task_id)
        conversation = _converse(ctx, runner, dispatch)
        res = runner.run(
            dispatch, renew=lambda: ctx.ledger.renew(issue.id, token), should_stop=StopCheck(ctx, task_id, hostname)
        )
    except Exception as exc:
        error = f"could not run the agent: {type(exc).__name__}: {exc}"
        log.error("agent task %s for %s: %s", task_id, issue_id, error)
        result.update(
            outcome=Outcome.FAILED, settled=settle(ctx, issue_id, token, Outcome.FAILED, error, rider), error=error
        )
    else:
        result.update(
            outcome=res.outcome,
            settled=settle(ctx, issue_id, token, res.outcome, res.error, rider),
            exit_code=res.exit_code,
            duration_s=round(res.duration_s, 3),
            log=str(res.log_path) if res.log_path else None,
            error=res.error,
        )
    finally:
        if conversation is not None:  # no read of the thread after this; then its end is told
            try:
                conversation.close(ended_text(str(result.get("settled", "")), str(result.get("error") or "")))
            finally:  # the inbox goes with its dispatch (the stopped watcher never makes it again)
                conversation.inbox.unlink(missing_ok=True)
        refilling = send is not None and result.get("settled") != Settled.LEASE_LOST
        if not rider.replies:  # no settle was sent (a lost lease, Redis gone), or its answer was lost
            p = ctx.redis.pipeline(transaction=False)
            _clean_up(ctx, p, task_id, pop=refilling and not rider.sent)  # idempotent, but never pop twice
            rider.replies = p.execute()
    if refilling and send is not None:  # refilling implies a sender: said again for the type checker
        try:
            # the popped entry, or (a lost answer: the pop may have run) the refill pops for itself
            popped = {"popped": rider.replies[CLEAN_UP_COMMANDS]} if len(rider.replies) > CLEAN_UP_COMMANDS else {}
            result["refilled"] = refill(ctx, send, run_id, **popped)
        except Exception:
            log.warning("could not refill the slot freed by %s", task_id, exc_info=True)
    return result


#: the clean-up's own commands in a pipeline; the backlog pop, when asked for, is the next one
CLEAN_UP_COMMANDS = 3


def _clean_up(ctx: Context, pipe: Any, task_id: str, pop: bool) -> None:
    """The agent task's records go (running set, task record, stop flag: :data:`CLEAN_UP_COMMANDS`); with
    ``pop``, the refill's first backlog candidate is popped in the same round trip, right after them."""
    pipe.srem(ctx.keys.agents, task_id).delete(ctx.keys.agent_task(task_id)).delete(ctx.keys.agent_stop(task_id))
    if pop:
        pipe.lpop(ctx.keys.backlog)


def _hand_over(
    ctx: Context, task_id: str, issue_data: dict[str, Any], token: str, run_id: str | None, send_stage: Any
) -> dict[str, Any]:
    """The staged path after ``begin``: anything that stops the hand-over settles the claim."""
    from factory_worker.dispatch.staged import hand_over
    from factory_worker.ledger.stages import StageUnackedError

    issue_id = str(issue_data.get("id", "")) if isinstance(issue_data, dict) else ""
    try:
        return hand_over(ctx, task_id, Issue.model_validate(issue_data), token, run_id, send_stage)
    except StaleClaimError as exc:
        log.warning("agent task %s for %s: stage hand-over rejected: %s", task_id, issue_id, exc)
        return {"outcome": Settled.STALE, "settled": Settled.STALE}
    except StageUnackedError:  # released, no attempt counted: nothing ran
        return {"outcome": Begin.UNACKED, "settled": Settled.RELEASED}
    except Exception as exc:
        error = f"could not hand over to the stages: {type(exc).__name__}: {exc}"
        log.error("agent task %s for %s: %s", task_id, issue_id, error)
        return {
            "outcome": Outcome.FAILED,
            "settled": settle(ctx, issue_id, token, Outcome.FAILED, error),
            "error": error,
        }
    finally:
        try:
            p = ctx.redis.pipeline(transaction=False)
            p.srem(ctx.keys.agents, task_id)
            p.delete(ctx.keys.agent_task(task_id))
            p.delete(ctx.keys.agent_stop(task_id))
            p.execute()
        except redis.RedisError:
            log.warning("could not clean up after %s", task_id)


def _converse(ctx: Context, runner: AgentRunner, dispatch: Dispatch) -> AgentInbox | None:
    """The dispatch's ``FACTORY_INBOX`` and what feeds it: with ``slack.channel`` set its Slack thread (the
    humans' replies), with tracker comments relayed (``webhooks.relays_comments``) the comments on its issue.
    None when both are off, or failed (the agent runs anyway)."""
    relay_comments = ctx.settings.webhooks.relays_comments
    if not ctx.settings.slack.channel and not relay_comments:
        return None
    from factory_worker.agents.sandbox import make_inbox
    from factory_worker.chat.inbox import TrackerRelay
    from factory_worker.chat.slack import open_conversation

    try:
        inbox = make_inbox(ctx.settings.agent, dispatch.dispatch_id, getattr(runner, "ident", None), dispatch.issue.id)
    except OSError as exc:
        log.warning("no inbox for %s: it could not be made (%s)", dispatch.dispatch_id, exc)
        return None
    conversation = None
    if ctx.settings.slack.channel:
        conversation = open_conversation(
            ctx.settings.slack, inbox, dispatch.issue.id, dispatch.issue.title, dispatch.dispatch_id
        )
    if conversation is None and not relay_comments:
        inbox.unlink(missing_ok=True)
        return None
    relay = TrackerRelay(ctx.redis, ctx.keys, dispatch.dispatch_id, inbox).start() if relay_comments else None
    dispatch.env["FACTORY_INBOX"] = str(inbox)
    return AgentInbox(inbox, conversation, relay)


def _begin(ctx: Context, issue_id: str, token: str, task_id: str, hostname: str) -> str:
    """``begin`` for this task; anything but :attr:`Begin.STARTED` means nothing runs (and a revoked, killed
    or unacknowledged start has released its claim)."""
    try:
        began = ctx.ledger.begin(issue_id, token, task_id, hostname, os.getpid())
    except LedgerLostError as exc:  # safe mode: nothing starts (its claim is not in this ledger anyway)
        log.error("agent task %s for %s does nothing: %s", task_id, issue_id, exc)
        return "ledger-lost"
    except StaleClaimError as exc:
        log.warning("agent task %s for %s does nothing: %s", task_id, issue_id, exc)
        ctx.control.count("agent_tasks_noop")  # must be rare: a claim released or taken over while queued
        return Settled.STALE
    if began in (Begin.REVOKED, Begin.KILLED, Begin.UNACKED):
        log.warning("agent task %s for %s does nothing: %s; claim released", task_id, issue_id, began)
        _release_quietly(ctx, issue_id, token, began if began == Begin.UNACKED else Outcome.INTERRUPTED)
    elif began == Begin.DUPLICATE:
        log.warning("agent task %s for %s does nothing: an agent already started for this claim", task_id, issue_id)
    return began


def settle(
    ctx: Context, issue_id: str, token: str, outcome: str, error: str = "", rider: Rider | None = None
) -> Settled:
    """Write an agent outcome to the ledger by token; a stale token changes nothing.

    A Redis outage (restart, failover) is retried for up to one lease TTL: the claim is still ours until
    then, and giving up early would make the issue run again. The last try is made at that deadline (a
    Sentinel promotion that ends just before it still gets the outcome). The deadline counts from the
    agent's end, so it can pass the claim's real end by up to one renew interval; such a try is fenced.
    """
    deadline = time.monotonic() + ctx.settings.dispatch.lease_ttl_s
    delay = 0.1
    while True:
        try:
            return _settle_once(ctx, issue_id, token, outcome, error, rider)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            wait = min(delay, left)
            log.warning("Redis unavailable while settling %s (%s); retrying in %.1fs", issue_id, exc, wait)
            time.sleep(wait)
            delay = min(delay * 2, 1.0)


def _settle_once(ctx: Context, issue_id: str, token: str, outcome: str, error: str, rider: Rider | None) -> Settled:
    if rider is not None and rider.sent:  # a retry after a connection error: the rider went already
        rider = None
    try:
        if outcome == Outcome.OK:
            ctx.ledger.complete(issue_id, token, rider)
            ctx.notifier.send_event("done", issue_id=issue_id)
            return Settled.DONE
        if outcome == Outcome.LEASE_LOST:
            return Settled.LEASE_LOST
        if outcome == Outcome.INTERRUPTED:
            ctx.ledger.release(issue_id, token, reason=Outcome.INTERRUPTED, rider=rider)
            return Settled.RELEASED
        failed = ctx.ledger.fail(issue_id, token, error or outcome, rider)
        if failed.state == Settled.PARKED:
            ctx.notifier.send_event("parked", issue_id=issue_id, attempts=failed.attempts, last_error=error)
        return Settled(failed.state)
    except StaleClaimError as exc:
        log.warning("late %s for %s rejected: %s", outcome, issue_id, exc)
        return Settled.STALE


def _release_quietly(ctx: Context, issue_id: str, token: str, reason: str) -> bool:
    """Release by token; False (and nothing changed) when the token no longer holds the claim."""
    try:
        ctx.ledger.release(issue_id, token, reason=reason)
        return True
    except StaleClaimError:
        return False


def release_task_claim(
    ctx: Context, task_id: str, reason: str = "interrupted", only_if_queued: bool = False
) -> str | None:
    """Release the claim of agent task ``task_id`` by its recorded token (used on revoke/teardown).

    ``only_if_queued``: leave it alone when its agent is running (a discarded duplicate of a message whose
    twin runs elsewhere must not free the running agent's claim).
    """
    rec = decoded_hash(ctx.redis.hgetall(ctx.keys.agent_task(task_id)))
    if not rec.get("issue") or not rec.get("token"):
        return None
    if only_if_queued and rec.get("state") == "running":
        return None
    return rec["issue"] if _release_quietly(ctx, rec["issue"], rec["token"], reason) else None
