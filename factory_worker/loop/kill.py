"""What a kill is and what it means, shared by loop control, ``kill-loop`` and the CLI's early path: who acts,
the ``kill`` hash's fields, the record of a kill (:class:`Kill`; :class:`EarlyKill`, the one the early path
already wrote), and what one ``kill-loop`` means, decided once as a value:

1. :func:`kill_target`: refuse (:class:`Refused`: nothing live, not forced, and no killed loop's agents to stop)
   or name the run the kill is written against (:class:`Target`);
2. the operation writes the kill (unless the early path did: then it starts here);
3. :func:`kill_plan`: read after the kill was written, :class:`KillPlan` says which run is killed, whether the
   loop was between runs, which task ids are revoked (durably, and through Celery for those not yet run),
   which agents are stopped and what the answer says. :func:`factory_worker.ops.operations.kill_loop` only
   carries it out and reports.

Standard library only at import (the fast path imports this module): the decisions read Redis through the
:class:`~factory_worker.loop.control.LoopControl` they are given.
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from factory_worker.ledger.records import as_int
from factory_worker.ledger.states import RunStatus

if TYPE_CHECKING:
    from factory_worker.loop.control import LoopControl
    from factory_worker.loop.heartbeat import Liveness


def who() -> str:
    """``user@host:pid`` of the operator (or process) acting."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = os.environ.get("USER", "unknown")
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def kill_record(run_id: str | None, by: str, at_ms: int, reason: str = "kill-loop") -> dict[str, str]:
    """The ``kill`` hash's fields (``control.LoopControl.set_kill`` writes the same)."""
    return {"run_id": run_id or "", "by": by, "at_ms": str(at_ms), "reason": reason}


@dataclass(frozen=True)
class Kill:
    """A kill as written: the run it names (None: no run known), who killed, when (ms, Redis clock)."""

    run_id: str | None
    by: str
    at_ms: int


@dataclass(frozen=True)
class EarlyKill(Kill):
    """A kill written by :func:`~factory_worker.cli.quick.kill_first`: the run it names, who killed it, and
    where it went (namespace, Redis URL)."""

    namespace: str
    url: str

    def went_to(self, namespace: str, url: str) -> bool:
        """Whether it went to this namespace at this Redis (else the full command decides again)."""
        return (self.namespace, self.url) == (namespace, url)


@dataclass(frozen=True)
class Refused:
    """``kill-loop`` finds nothing to kill (exit 1): why, in one line."""

    why: str

    def answer(self) -> dict[str, Any]:
        return {"killed": None, "refused": self.why}


@dataclass(frozen=True)
class Target:
    """The run a kill about to be written names: the live heartbeat's, else the current run (None: none)."""

    run_id: str | None


@dataclass(frozen=True)
class KillPlan:
    """What one kill means, read once after the kill was written.

    ``run_id``: the run it is about (the kill's, or a newer one a kickoff started just before the kill was
    set). ``between``: that run had ended before the kill's time (by the Redis clock), so the loop was live
    between runs: nothing to end or revoke (a run that ended at or after it, e.g. its next iteration saw an
    early kill first, was killed by this kill). ``last_status``: how that run ended (between runs).
    ``revoke``: the run's task ids, for the durable revoked set; ``celery_revoke``: those not yet run (Celery's
    revoke is broadcast to every worker and kept in memory); ``agents``: every running agent to stop
    (``--release-agents``; runs are short and agents outlive the run that sent them).
    """

    kill: Kill
    run_id: str | None
    between: bool
    last_status: str | None
    revoke: tuple[str, ...]
    celery_revoke: tuple[str, ...]
    agents: tuple[str, ...]

    @property
    def killed(self) -> str | None:
        """The run this kill ends (None between runs, or when there is no run at all)."""
        return None if self.between else self.run_id

    @property
    def ends_run(self) -> bool:
        """Whether a run is to be ended (``killed``); otherwise only the heartbeat turns ``stopping``."""
        return self.killed is not None

    @property
    def reason(self) -> str:
        """The killed run's end reason."""
        return f"kill-loop by {self.kill.by}"

    def answer(
        self, released: list[dict[str, Any]], celery_revoke_sent: bool, celery_revoke_error: str | None = None
    ) -> dict[str, Any]:
        """``kill-loop``'s answer (what ``--json`` prints) once carried out: the agents ``released``, whether the
        Celery revoke was sent, and its error if it failed."""
        out: dict[str, Any] = {
            "killed": self.killed,
            "loop_killed": True,
            "last_run": {"run_id": self.run_id, "status": self.last_status} if self.between else None,
            "revoked": list(self.revoke),
            "released_agents": released,
            "by": self.kill.by,
            "celery_revoke_sent": celery_revoke_sent,
        }
        if celery_revoke_error:
            out["celery_revoke_error"] = celery_revoke_error
        return out


def kill_target(control: LoopControl, force: bool = False, release_agents: bool = False) -> Target | Refused:
    """Refuse without a live heartbeat, unless ``force``d or a killed loop's agents are to be stopped
    (``kill-loop --release-agents`` after a ``kill-loop``); else the run the kill names."""
    live = control.liveness()
    again = release_agents and control.kill_info() is not None
    if not live.live and not force and not again:
        return Refused(_why_refused(control, live))
    return Target((live.heartbeat.run_id if live.heartbeat else None) or control.current_run_id())


def kill_plan(control: LoopControl, kill: Kill, release_agents: bool = False) -> KillPlan:
    """What ``kill`` (written already) means now: see :class:`KillPlan`. Reads only."""
    run_id = kill.run_id
    newest = control.current_run_id()
    if newest and newest != run_id and control.run_status(newest) == RunStatus.RUNNING:
        run_id = newest  # a kickoff started a run just before the kill was set: that is the run to kill
    run = control.run(run_id) or {}
    status = run.get("status")
    between = status not in (None, RunStatus.RUNNING) and as_int(run.get("finished_ms")) < kill.at_ms
    task_ids = () if between else tuple(t for t in run.get("task_ids", []) if isinstance(t, str))
    not_run = task_ids[max(0, as_int(run.get("iterations_done")) - 1) :] if status == RunStatus.RUNNING else ()
    agents = tuple(control.running_agents()) if release_agents else ()
    return KillPlan(kill, run_id, between, status if between else None, task_ids, not_run, agents)


def _why_refused(control: LoopControl, live: Liveness) -> str:
    """Why kill-loop finds nothing to kill (one line)."""
    kill = control.kill_info()
    if kill:
        return (
            f"the loop is already killed (by {kill.get('by', '?')}, run {kill.get('run_id') or '-'}); "
            "kill-loop --release-agents also stops its running agents; start-loop resumes it"
        )
    why = {
        "missing": "no heartbeat (missing, malformed or expired)",
        "stale": f"heartbeat is stale ({live.age_s:.1f}s old)" if live.age_s is not None else "stale",
        "stopping": "the run is already stopping",
    }.get(live.state, live.state)
    return f"no live run: {why}; use --force to kill anyway"
