"""The life of one dispatch on a worker: verify the claim, run the agent, settle the claim by token.

Called by the ``factory.agent.run`` task; testable without Celery. The claim is checked (a renew, which
is a compare-and-set) before the agent starts, so a redelivered or superseded message runs nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import redis

from .agents import AgentRunner, CommandAgent, Dispatch
from .loop import Factory
from .scripts import StaleClaimError
from .sources.base import Issue

log = logging.getLogger(__name__)

#: How often (s) the Redis stop flags are read while an agent runs.
STOP_POLL_S = 0.5


def renew_interval(f: Factory) -> float:
    return max(0.05, f.settings.dispatch.lease_ttl_s / 3)


def make_runner(f: Factory) -> AgentRunner:
    return CommandAgent(f.settings.agent, renew_interval(f), f.settings.dispatch.lease_ttl_s)


class StopCheck:
    """Polls the agent's stop flag and the worker's shutdown deadline, at most every STOP_POLL_S."""

    def __init__(self, f: Factory, task_id: str, hostname: str) -> None:
        self.f, self.task_id, self.hostname = f, task_id, hostname
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
        k = self.f.keys
        try:
            p = self.f.r.pipeline(transaction=False)
            p.get(k.agent_stop(self.task_id)).get(k.worker_shutdown(self.hostname)).time()
            stop, deadline, (sec, usec) = p.execute()
        except Exception:  # noqa: BLE001 - Redis blip: keep running, the lease decides
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


def execute(f: Factory, task_id: str, issue_data: dict[str, Any], token: str, run_id: str | None = None,
            hostname: str | None = None, runner: AgentRunner | None = None) -> dict[str, Any]:
    """Run the agent for one claim and settle it: complete, fail (backoff/park) or release."""
    issue = Issue.model_validate(issue_data)
    hostname = hostname or socket.gethostname()
    result: dict[str, Any] = {"issue": issue.id, "task_id": task_id}
    try:
        began = f.ledger.begin(issue.id, token, task_id, run_id, hostname, os.getpid())
    except StaleClaimError as exc:
        log.warning("agent task %s for %s does nothing: %s", task_id, issue.id, exc)
        return {**result, "outcome": "stale"}
    if began in ("revoked", "killed"):
        log.warning("agent task %s for %s does nothing: %s; claim released", task_id, issue.id, began)
        _release_quietly(f, issue.id, token, "interrupted")
        return {**result, "outcome": began}
    if began == "duplicate":
        log.warning("agent task %s for %s does nothing: an agent already started for this claim",
                    task_id, issue.id)
        return {**result, "outcome": "duplicate"}
    key = f.keys.agent_task(task_id)
    runner = runner or make_runner(f)
    try:
        res = runner.run(
            Dispatch(issue=issue, token=token, dispatch_id=task_id),
            renew=lambda: f.ledger.renew(issue.id, token),
            should_stop=StopCheck(f, task_id, hostname),
        )
        outcome = settle(f, issue.id, token, res.outcome, res.error)
        return {**result, "outcome": res.outcome, "settled": outcome, "exit_code": res.exit_code,
                "duration_s": round(res.duration_s, 3), "log": str(res.log_path) if res.log_path else None}
    finally:
        p = f.r.pipeline(transaction=False)
        p.srem(f.keys.agents, task_id).delete(key).delete(f.keys.agent_stop(task_id))
        p.execute()


def settle(f: Factory, issue_id: str, token: str, outcome: str, error: str = "") -> str:
    """Write an agent outcome to the ledger by token; a stale token changes nothing.

    A Redis outage (restart, failover) is retried for up to one lease TTL: the claim is still ours until
    then, and giving up early would make the issue run again.
    """
    deadline = time.monotonic() + f.settings.dispatch.lease_ttl_s
    delay = 0.1
    while True:
        try:
            return _settle_once(f, issue_id, token, outcome, error)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("Redis unavailable while settling %s (%s); retrying in %.1fs", issue_id, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _settle_once(f: Factory, issue_id: str, token: str, outcome: str, error: str) -> str:
    try:
        if outcome == "ok":
            f.ledger.complete(issue_id, token)
            f.notifier.send_event("done", issue_id=issue_id)
            return "done"
        if outcome == "lease-lost":
            return "lease-lost"
        if outcome == "interrupted":
            f.ledger.release(issue_id, token, reason="interrupted")
            return "released"
        failed = f.ledger.fail(issue_id, token, error or outcome)
        if failed.state == "parked":
            f.notifier.send_event("parked", issue_id=issue_id, attempts=failed.attempts, last_error=error)
        return failed.state
    except StaleClaimError as exc:
        log.warning("late %s for %s rejected: %s", outcome, issue_id, exc)
        return "stale"


def _release_quietly(f: Factory, issue_id: str, token: str, reason: str) -> bool:
    """Release by token; False (and nothing changed) when the token no longer holds the claim."""
    try:
        f.ledger.release(issue_id, token, reason=reason)
        return True
    except StaleClaimError:
        return False


def release_task_claim(f: Factory, task_id: str, reason: str = "interrupted",
                       only_if_queued: bool = False) -> str | None:
    """Release the claim of agent task ``task_id`` by its recorded token (used on revoke/teardown).

    ``only_if_queued``: leave it alone when its agent is running (a discarded duplicate of a message whose
    twin runs elsewhere must not free the running agent's claim).
    """
    rec = f.r.hgetall(f.keys.agent_task(task_id))
    if not rec.get("issue") or not rec.get("token"):
        return None
    if only_if_queued and rec.get("state") == "running":
        return None
    return rec["issue"] if _release_quietly(f, rec["issue"], rec["token"], reason) else None
