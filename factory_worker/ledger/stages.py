"""The ledger's side of a staged dispatch: stage progress by token (``lua/stage.lua``) and escalation
(``lua/escalate.lua``). Every write is a compare-and-set on the claim's token, so a dead holder's late stage
result changes nothing (:class:`~factory_worker.ledger.scripts.StaleClaimError`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from factory_worker.ledger.core import Ledger
from factory_worker.ledger.keys import Keys
from factory_worker.ledger.redis_client import decoded_hash
from factory_worker.ledger.scripts import Reply, checked
from factory_worker.ledger.states import StageStart
from factory_worker.ledger.types import Rider

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Where an attempt is (``stage.lua`` start's reply): the step being run and what it was given."""

    step: int
    stage: str
    round: int = 1
    retries: int = 0
    plan: list[str] = field(default_factory=list)
    feedback: str = ""
    workdir: str = ""
    history: str = ""
    thread: str = ""  # the attempt's Slack thread, "<channel>:<ts>" ("" without Slack)


_ARGS = (
    "op",
    "token",
    "issue",
    "lease_ms",
    "step",
    "stage",
    "task_id",
    "run_id",
    "sent_ms",
    "hostname",
    "worker_pid",
    "round",
    "retries",
    "plan",
    "feedback",
    "workdir",
    "outcome",
    "record_ttl_ms",
    "progress_ttl_ms",
    "thread",
)


class StageUnackedError(RuntimeError):
    """``open`` was not acknowledged by ``dispatch.min_replica_acks`` replicas; the claim was released."""


@dataclass(frozen=True)
class Opened:
    """``open``'s answer: the step the claim's first stage task runs, and whether that resumes an attempt."""

    step: int
    stage: str
    resumed: bool
    thread: str = ""  # the attempt's Slack thread ("<channel>:<ts>") when one was opened


class StageLedger:
    """Stage progress of claims: open (after begin), start a step, hand over to the next, escalate.

    It writes through the ledger's public parts only: ``ledger.writes`` (:class:`~factory_worker.ledger.writes.
    LedgerWrites`: the acknowledged ``stage.lua`` call, its repeat, the settle of an escalation, the release of an
    unacknowledged claim), the lease lengths and the client ``ledger.r``.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.keys: Keys = ledger.keys

    def _call(
        self, op: str, issue: str, token: str, rider: Rider | None = None, **args: Any
    ) -> tuple[Reply, dict[str, Any], bool]:
        """Run ``stage.lua``'s ``op``; with ``dispatch.min_replica_acks``, in one pipeline with ``WAIT`` (as the
        ledger's own writes); ``rider``: commands sent in the same round trip (:class:`Rider`). Returns (reply,
        the script's arguments, acknowledged)."""
        values: dict[str, Any] = dict.fromkeys(_ARGS, "")
        values.update(
            op=op,
            token=token,
            issue=issue,
            lease_ms=self.ledger.lease_ms,
            record_ttl_ms=Keys.AGENT_TASK_TTL_S * 1000,
            progress_ttl_ms=Keys.STAGE_PROGRESS_TTL_S * 1000,
            sent_ms=int(time.time() * 1000),
            round=1,
            retries=0,
            worker_pid=0,
        )
        values.update(args)
        reply, acked = self.ledger.writes.acked("stage", rider=rider, **values)
        return checked(reply, issue, token), values, acked

    def _unacked(self, op: str, issue: str, token: str) -> None:
        """An ``open`` or ``start`` no replica acknowledged: nothing runs on it (a failover could lose it, as
        an unacknowledged ``begin``), the claim is released without counting an attempt; progress stays."""
        log.warning(
            "stage %s of %s by %s not acknowledged by %d replica(s): claim released",
            op,
            issue,
            token,
            self.ledger.cfg.min_replica_acks,
        )
        self.ledger.writes.release_unacked(issue, token, "stages_unacked")

    def open(
        self, issue: str, token: str, task_id: str, run_id: str | None, first_stage: str, plan: list[str], workdir: str
    ) -> Opened:
        """Create or resume the attempt's progress; record ``task_id`` (queued) to run its current step. The
        claim's lease becomes the queue lease while that task's message waits."""
        reply, _, acked = self._call(
            "open",
            issue,
            token,
            task_id=task_id,
            run_id=run_id or "",
            stage=first_stage,
            plan=json.dumps(plan),
            workdir=workdir,
            lease_ms=self.ledger.queue_lease_ms,
        )
        if not acked:
            self._unacked("open", issue, token)
            try:  # its task is never sent: off the queued set now rather than at the loop's next sweep
                self.ledger.r.zrem(self.keys.queued, task_id)
            except redis.RedisError:
                pass
            raise StageUnackedError(f"stage open of {issue} not acknowledged by a replica")
        step, stage, resumed, thread = reply.values
        return Opened(int(step), str(stage), bool(int(resumed)), str(thread or ""))

    def set_thread(self, issue: str, token: str, thread: str) -> bool:
        """Record the attempt's Slack thread (holder only); False when the attempt has no progress."""
        reply, _, _ = self._call("thread", issue, token, thread=thread)
        return reply.status == "ok"

    def start(
        self, issue: str, token: str, task_id: str, step: int, stage: str, hostname: str, pid: int
    ) -> tuple[StageStart, Progress | None]:
        """Start step ``step`` (``stage``): ``(OK, progress)``, or ``(MOVED | DUPLICATE | REVOKED | KILLED |
        UNACKED, None)``: nothing may run (revoked / killed: the caller releases the claim; unacked: released
        here). See :class:`~factory_worker.ledger.states.StageStart`."""
        reply, _, acked = self._call(
            "start", issue, token, task_id=task_id, step=step, stage=stage, hostname=hostname, worker_pid=pid
        )
        if reply.status != StageStart.OK:
            return StageStart(reply.status), None
        if not acked:
            self._unacked("start", issue, token)
            return StageStart.UNACKED, None
        rnd, retries, plan, feedback, workdir, history, thread = reply.values
        try:
            names = [str(x) for x in json.loads(plan or "[]")]
        except ValueError:
            names = []
        return StageStart.OK, Progress(
            step, stage, int(rnd), int(retries), names, feedback or "", workdir or "", history or "", thread or ""
        )

    def next(
        self,
        issue: str,
        token: str,
        step: int,
        outcome: str,
        stage: str,
        round: int,
        retries: int,
        feedback: str,
        task_id: str,
        run_id: str | None,
        plan: list[str] | None = None,
        rider: Rider | None = None,
    ) -> int | None:
        """Finish step ``step`` with ``outcome`` and make ``stage`` the next (pending) step, run by ``task_id``
        (recorded queued). Returns the new step, or None when step ``step`` is not running by ``token`` (a
        duplicate's late result). The claim's lease becomes the queue lease. ``rider``: see :class:`Rider`."""
        feedback_bytes = feedback.encode("utf-8", "replace")[-Keys.FEEDBACK_MAX_BYTES :]
        reply, values, acked = self._call(
            "next",
            issue,
            token,
            rider,
            step=step,
            outcome=outcome,
            stage=stage,
            round=round,
            retries=retries,
            feedback=feedback_bytes.decode("utf-8", "ignore"),
            task_id=task_id,
            run_id=run_id or "",
            plan=json.dumps(plan) if plan else "",
            lease_ms=self.ledger.queue_lease_ms,
        )
        if reply.status == "ok" and not acked:  # a finished step lost in a failover would run again: repeat
            rest = {k: v for k, v in values.items() if k not in ("token", "issue")}
            reply = self.ledger.writes.confirm("stage", issue, token, reply, acked, **rest)
        return int(reply.values[0]) if reply.status == "ok" else None

    def escalate(self, issue: str, token: str, error: str, rider: Rider | None = None) -> None:
        """Park ``issue`` for a human (``needs-human``): no attempt counted, progress gone (holder only).
        ``rider``: see :class:`Rider`."""
        self.ledger.writes.settle("escalate", issue, token, rider, error=error[: Keys.ERROR_MAX_CHARS])
        log.info("issue %s escalated: %s", issue, error)

    def progress(self, issue: str) -> dict[str, str]:
        """The raw progress hash of ``issue`` (explain, tests)."""
        return decoded_hash(self.ledger.r.hgetall(self.keys.stages(issue)))
