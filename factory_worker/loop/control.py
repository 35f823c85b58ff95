"""Loop control: the loop lease (overlap SKIP), run records, kill / pause flags, revoked task ids.

A run is started by :meth:`LoopControl.start_run` (the kickoff) and ended exactly once by
:meth:`LoopControl.end_run`. The loop lease is a token (the run id) with a TTL, renewed by each iteration
and released by run id only.
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from factory_worker.config.settings import MAX_ITERATIONS_CEILING, Settings
from factory_worker.ledger.keys import Keys
from factory_worker.ledger.records import as_int, parse_run
from factory_worker.ledger.redis_client import decoded, decoded_hash, hash_mapping, server_now_ms
from factory_worker.ledger.scripts import scripts_for
from factory_worker.ledger.states import RunStatus
from factory_worker.loop import heartbeat
from factory_worker.loop.kill import kill_record, who
from factory_worker.loop.presence import worker_alive

log = logging.getLogger(__name__)


@dataclass
class Kickoff:
    started: bool
    run_id: str | None = None
    reason: str = ""
    task_ids: list[str] = field(default_factory=list)
    cleared_kill: dict[str, str] | None = None  # the kill record start-loop cleared (restored on failure)

    def as_dict(self) -> dict[str, Any]:
        return {"started": self.started, "run_id": self.run_id, "reason": self.reason, "task_ids": self.task_ids}


#: How many skipped issues a stored report keeps as examples (per-issue detail stays in the ledger).
REPORT_EXAMPLES = 5


def bounded_report(report: dict[str, Any], examples: int = REPORT_EXAMPLES) -> dict[str, Any]:
    """``report`` with its per-issue lists cut to a few examples, and skips counted by reason."""
    skipped = report.get("skipped") or []
    by_reason: dict[str, int] = {}
    for s in skipped:
        reason = str(s.get("reason", "?")).split(":", 1)[0]
        by_reason[reason] = by_reason.get(reason, 0) + 1
    dispatches = report.get("dispatches") or []
    return {
        **report,
        "skipped": skipped[:examples],
        "skipped_total": len(skipped),
        "skipped_by_reason": by_reason,
        "dispatches": dispatches[:examples],
        "dispatches_total": len(dispatches),
    }


class LoopControl:
    """Reads and writes the loop's control state in Redis."""

    def __init__(self, r: redis.Redis, settings: Settings) -> None:
        self.r = r
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self._s = scripts_for(r)

    # -- counters -------------------------------------------------------------------------------------
    def count(self, name: str, n: int = 1) -> None:
        self.r.hincrby(self.keys.counters, name, n)

    # -- kill / pause ---------------------------------------------------------------------------------
    def liveness(self) -> heartbeat.Liveness:
        """The loop's liveness now: its heartbeat judged on the Redis clock (``loop.stale_after_s``)."""
        return heartbeat.check(self.r, self.keys, self.settings.loop.stale_after_s)

    def running_agents(self) -> list[str]:
        """The task ids of every agent running now (``{ns}:agents``), whichever run dispatched it."""
        return sorted(str(t) for t in self.r.smembers(self.keys.agents))

    def kill_info(self) -> dict[str, str] | None:
        return decoded_hash(self.r.hgetall(self.keys.kill)) or None

    def pause_info(self) -> dict[str, str] | None:
        return decoded_hash(self.r.hgetall(self.keys.paused)) or None

    def set_paused(self, paused: bool, by: str | None = None) -> bool:
        """Pause or resume; returns whether anything changed."""
        if not paused:
            return bool(self.r.delete(self.keys.paused))
        changed = not self.r.exists(self.keys.paused)
        self.r.hset(self.keys.paused, mapping={"by": by or who(), "at_ms": server_now_ms(self.r)})
        return changed

    def is_revoked(self, task_id: str | None) -> bool:
        return bool(task_id and self.r.sismember(self.keys.revoked, task_id))

    def revoke_ids(self, task_ids: list[str]) -> None:
        if task_ids:
            p = self.r.pipeline(transaction=True)
            p.sadd(self.keys.revoked, *task_ids)
            p.expire(self.keys.revoked, self.keys.REVOKED_TTL_S)
            p.execute()

    def set_kill(self, run_id: str | None, by: str, reason: str = "kill-loop") -> int:
        """Write the kill record; returns its time (ms, Redis server clock)."""
        now = server_now_ms(self.r)
        self.r.hset(self.keys.kill, mapping=hash_mapping(kill_record(run_id, by, now, reason)))
        return now

    def _clear_seen_kill(self, seen: dict[str, str] | None) -> bool:
        """Clear the kill record ``seen`` earlier, never a newer one; False when a newer kill stands."""
        at = (seen or {}).get("at_ms", "")
        return self._s["kill_clear"](self.keys, at_ms=at).status == "ok"

    # -- runs -----------------------------------------------------------------------------------------
    def current_run_id(self) -> str | None:
        return decoded(self.r.get(self.keys.current_run))

    def run(self, run_id: str | None) -> dict[str, Any] | None:
        if not run_id:
            return None
        return parse_run(decoded_hash(self.r.hgetall(self.keys.run(run_id))))

    def lease_holder(self) -> str | None:
        return decoded(self.r.get(self.keys.loop_lease))

    def start_run(self, max_iterations: int | None = None, by: str = "beat", clear_kill: bool = False) -> Kickoff:
        """Take the loop lease and write the run record; SKIP (counted) if killed or a run is live. A pause
        does not stop runs (their iterations claim nothing): the loop stays live while paused.

        ``clear_kill`` (start-loop) takes the lease *before* clearing the kill flag, so a beat kickoff in
        between still sees the kill and cannot take the run from the operator. Task ids of the whole chain
        are generated up front: ``iter-0..n-1`` then ``finish``. ``max_iterations`` comes from a message,
        so it is clamped to ``1..MAX_ITERATIONS_CEILING`` whatever sent it.
        """
        n = min(max(1, int(max_iterations or self.settings.loop.max_iterations)), MAX_ITERATIONS_CEILING)
        kill = self.kill_info()
        if kill and not clear_kill:
            self.count("kickoffs_skipped_killed")
            return Kickoff(False, reason=f"killed by {kill.get('by', '?')}; run start-loop to clear")
        run_id = uuid.uuid4().hex[:16]
        ttl_ms = int(self.settings.loop.lease_ttl_s * 1000)
        if not self.r.set(self.keys.loop_lease, run_id, nx=True, px=ttl_ms) and not self._take_over(run_id, ttl_ms):
            self.count("kickoffs_skipped_overlap")
            if clear_kill:
                self._clear_seen_kill(kill)
            return Kickoff(False, run_id=self.lease_holder(), reason="a run is live (overlap policy SKIP)")
        if clear_kill and not self._clear_seen_kill(kill):
            self._s["lease_release"](self.keys, run_id=run_id)
            return Kickoff(False, reason="killed again while starting; run start-loop again to clear it")
        previous = self.current_run_id()
        if previous and self.run_status(previous) == RunStatus.RUNNING:  # its chain was lost: end it
            self.end_run(
                previous,
                RunStatus.ABANDONED,
                "its chain was lost (a worker died or Redis failed mid-run); the loop lease expired or its holder died",
            )
        task_ids = [f"{run_id}-iter-{i}" for i in range(n)] + [f"{run_id}-finish"]
        now = server_now_ms(self.r)
        p = self.r.pipeline(transaction=True)
        p.hset(
            self.keys.run(run_id),
            mapping={
                "run_id": run_id,
                "status": RunStatus.RUNNING,
                "started_ms": now,
                "max_iterations": n,
                "by": by,
                "task_ids": json.dumps(task_ids),
                "iterations_done": 0,
                "failures": 0,
                "consecutive_failures": 0,
            },
        )
        p.expire(self.keys.run(run_id), int(self.settings.loop.run_retention_s))
        p.set(self.keys.current_run, run_id)
        p.hincrby(self.keys.counters, "runs_started", 1)
        p.execute()
        heartbeat.write(self.r, self.keys, run_id, "running", 0, n, self.settings.loop.heartbeat_ttl_s)
        log.info("run %s started by %s (%d iterations)", run_id, by, n)
        return Kickoff(True, run_id=run_id, task_ids=task_ids, cleared_kill=kill if clear_kill else None)

    def _take_over(self, run_id: str, ttl_ms: int) -> bool:
        """Take the loop lease from a live-looking run whose holder is dead: the worker that ran its latest
        iteration (``holder``, written by ``iteration_begin.lua``) has no presence key any more (it stopped
        refreshing it ``worker.heartbeat_ttl_s`` ago). Without this, a SIGKILLed loop worker kept the loop
        stopped for the whole ``loop.lease_ttl_s``. Should the run still have an iteration queued (sent just
        before its worker died), that iteration finds the run ended and stops: claims stay gated by the
        ledger, so the overlap can never dispatch twice."""
        old = self.lease_holder()
        holder = decoded(self.r.hget(self.keys.run(old), "holder")) if old else None
        if not holder or worker_alive(self.r, self.keys, holder):
            return False
        if self._s["lease_takeover"](self.keys, old_run_id=old, new_run_id=run_id, lease_ms=ttl_ms).status != "ok":
            return False
        log.warning("run %s: its holder %s is gone (no presence key); taking the loop lease over", old, holder)
        self.count("lease_takeovers")
        return True

    def abandon_start(self, kick: Kickoff, error: str) -> None:
        """The chain could not be sent: end the run, free the lease, and restore a kill start-loop cleared."""
        if kick.cleared_kill:
            self.r.hset(self.keys.kill, mapping=hash_mapping(kick.cleared_kill))
        self.end_run(str(kick.run_id), RunStatus.FAILED, f"could not send the chain: {error}")

    def begin_iteration(
        self, run_id: str, iteration: int, max_iterations: int, gap_s: float, worker: str | None = None
    ) -> str | None:
        """Renew the loop lease (for the gap before the next iteration too) and write the heartbeat
        ``running(iteration)`` in one script; returns why the run must stop instead, or None."""
        loop = self.settings.loop
        hb = heartbeat.make(run_id, "running", iteration, max_iterations, server_now_ms(self.r))
        reply = self._s["iteration_begin"](
            self.keys,
            run_id=run_id,
            lease_ms=int((loop.lease_ttl_s + gap_s) * 1000),
            heartbeat_json=hb.to_json(),
            heartbeat_ms=int(loop.heartbeat_ttl_s * 1000),
            worker=worker or "",
        )
        return {"ok": None, "lost-lease": "lost the loop lease", "ended": "the run has ended"}[reply.status]

    def run_status(self, run_id: str) -> str | None:
        return decoded(self.r.hget(self.keys.run(run_id), "status"))

    def record_iteration(
        self, run_id: str, index: int, report: dict[str, Any], failed: bool, worker: str | None = None
    ) -> int:
        """Store an iteration's outcome on the run (:func:`bounded_report`: a size that does not grow with
        the backlog); returns the consecutive failure count."""
        key = self.keys.run(run_id)
        p = self.r.pipeline(transaction=True)
        p.hset(
            key,
            mapping={
                "iterations_done": index + 1,
                "last_report": json.dumps(bounded_report(report)),
                "last_worker": worker or socket.gethostname(),
            },
        )
        failing = self.keys.loop_failing
        if failed:
            error = str(report.get("error", ""))[: self.keys.ERROR_MAX_CHARS]
            p.hincrby(key, "failures", 1)
            p.hincrby(key, "consecutive_failures", 1)
            p.hset(key, "last_error", error)
            p.hincrby(self.keys.counters, "iterations_failed", 1)
            # since when the loop fails, across runs (loop-status says it); the first failure sets since_ms
            now = server_now_ms(self.r)
            p.hsetnx(failing, "since_ms", now)
            p.hset(failing, mapping={"last_ms": now, "error": error, "run_id": run_id})
            p.hincrby(failing, "failures", 1)
            p.expire(failing, self.keys.LOOP_FAILING_TTL_S)
        else:
            p.hset(key, "consecutive_failures", 0)
            if not report.get("stopped"):  # it polled, and that worked (a paused iteration polls nothing)
                p.delete(failing)
        p.hincrby(self.keys.counters, "iterations", 1)
        p.hget(key, "consecutive_failures")
        return int(p.execute()[-1] or 0)

    def end_heartbeat(self, run_id: str, status: heartbeat.Status) -> None:
        """The heartbeat of ``run_id``'s end: ``idle`` (finished: live until stale) or ``stopping`` (not live;
        also instead of idle while the loop is killed); left alone when it belongs to a newer run."""
        if status == "idle" and self.kill_info():  # a killed loop is not live, whoever ends its last run
            status = "stopping"
        rec = self.run(run_id) or {}
        ttl = self.settings.loop.heartbeat_ttl_s if status == "idle" else self.settings.loop.stale_after_s
        current = heartbeat.read(self.r, self.keys)
        if current is None or current.run_id == run_id:  # it keeps saying where the run ran
            heartbeat.write(
                self.r,
                self.keys,
                run_id,
                status,
                max(0, as_int(rec.get("iterations_done"))),
                max(0, as_int(rec.get("max_iterations"))),
                ttl,
                where=current,
            )

    def end_run(self, run_id: str, status: RunStatus, reason: str = "") -> bool:
        """End ``run_id`` once: status, heartbeat (idle, or stopping), lease released by run id.

        Only the call that ends the run writes its heartbeat: a later one (``finish`` after a kill, a kill
        after the run finished) leaves what the first wrote."""
        now = server_now_ms(self.r)
        ended = self._s["run_end"](self.keys, run_id=run_id, status=status, reason=reason, now_ms=now).status == "ok"
        if ended:
            self.end_heartbeat(run_id, "idle" if status == RunStatus.FINISHED else "stopping")
        self._s["lease_release"](self.keys, run_id=run_id)
        if ended:
            self.count(f"runs_{status}")
            log.info("run %s ended: %s %s", run_id, status, reason)
        return ended
