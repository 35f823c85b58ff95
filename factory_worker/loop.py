"""The iteration: poll -> gate -> dispatch -> report, and the run around it (kill checks, breaker).

Testable without Celery: sending an agent task is a callable (:class:`Sender`) handed in by the caller.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Iterable

import redis

from .config import Settings
from .keys import Keys
from .ledger import Claim, Ledger
from .redis_client import client as make_client
from .runs import LoopControl
from .sources import IssueSource, load_source
from .sources.base import Issue

if TYPE_CHECKING:
    from .notify import Notifier

log = logging.getLogger(__name__)

#: Sends one ``factory.agent.run`` task: (task_id, issue, claim, run_id) -> None; raises on failure.
Sender = Callable[[str, Issue, Claim, str | None], None]
AGENT_TASK_TTL_S = 7 * 24 * 3600


@dataclass
class IterationReport:
    pulled: int = 0
    dispatched: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    dry_run: bool = False
    run_id: str | None = None
    iteration: int | None = None
    dispatches: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    stopped: str | None = None
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Factory:
    """Everything an iteration or an agent task needs, built from settings (lazily)."""

    def __init__(self, settings: Settings, r: redis.Redis | None = None,
                 source: IssueSource | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self._r = r
        self._source = source

    @cached_property
    def r(self) -> redis.Redis:
        return self._r or make_client(self.settings)

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.r, self.keys, self.settings.dispatch)

    @cached_property
    def control(self) -> LoopControl:
        return LoopControl(self.r, self.settings)

    @cached_property
    def notifier(self) -> "Notifier":
        from .notify import Notifier

        return Notifier.from_settings(self.settings.notify)

    @property
    def source(self) -> IssueSource:
        if self._source is None:
            self._source = load_source(self.settings.source)
        return self._source


def new_agent_task_id() -> str:
    return f"agent-{uuid.uuid4().hex}"


def iterate(f: Factory, send: Sender | None, run_id: str | None = None, dry_run: bool = False,
            iteration: int | None = None) -> IterationReport:
    """One poll -> gate -> dispatch pass. Raises if the source is down or sending fails.

    Sending failures release every claim not yet sent (reason ``send-failed``) before re-raising, so
    nothing is left held. A dry run reads the ledger (``explain``) and writes nothing.
    """
    report = IterationReport(dry_run=dry_run, run_id=run_id, iteration=iteration)
    if f.control.pause_info():
        report.stopped = "paused"
        return report
    polled = f.source.poll()
    report.skipped.extend({"issue": e.split(":", 1)[0], "reason": f"source: {e}"} for e in polled.errors)
    issues = {i.id: i for i in polled.issues}
    report.pulled = len(issues)
    if dry_run:
        return _dry_gate(f, issues, report)
    batch = f.ledger.claim(list(issues))
    report.skipped.extend({"issue": s.issue, "reason": s.reason} for s in batch.skipped)
    sent = 0
    task_ids = [new_agent_task_id() for _ in batch.claims]
    try:
        if batch.claims:
            _remember_agent_tasks(f, zip(task_ids, batch.claims), run_id)
        for task_id, claim in zip(task_ids, batch.claims):
            assert send is not None
            send(task_id, issues[claim.issue], claim, run_id)
            sent += 1
            report.dispatches.append({"issue": claim.issue, "task_id": task_id, "fence": claim.fence})
            f.notifier.send_event("dispatched", issue_id=claim.issue, title=issues[claim.issue].title,
                                  run_id=run_id)
    except Exception:
        for claim in batch.claims[sent:]:
            try:
                f.ledger.release(claim.issue, claim.token, reason="send-failed")
            except Exception:  # noqa: BLE001 - best effort, the lease TTL frees it anyway
                log.exception("could not release unsent claim on %s", claim.issue)
        raise
    finally:
        report.dispatched = sent
    if sent:
        f.control.count("dispatched", sent)
    return report


def _dry_gate(f: Factory, issues: dict[str, Issue], report: IterationReport) -> IterationReport:
    cap_left = f.settings.dispatch.max_in_flight - f.ledger.gauges()["in_flight"]
    for issue_id in issues:
        why = f.ledger.explain(issue_id)
        if why.state == "claimable" and cap_left > 0:
            cap_left -= 1
            report.dispatches.append({"issue": issue_id, "task_id": None, "fence": None})
        else:
            reason = "max-in-flight" if why.state == "claimable" else why.state
            report.skipped.append({"issue": issue_id, "reason": reason})
    report.dispatched = len(report.dispatches)
    return report


def _remember_agent_tasks(f: Factory, pairs: Iterable[tuple[str, Claim]], run_id: str | None) -> None:
    """Map each agent task id to its claim (one round trip), so a revoke or teardown can release by token."""
    p = f.r.pipeline(transaction=False)
    for task_id, claim in pairs:
        key = f.keys.agent_task(task_id)
        p.hset(key, mapping={"issue": claim.issue, "token": claim.token, "run_id": run_id or "",
                             "state": "queued"})
        p.expire(key, AGENT_TASK_TTL_S)
    p.execute()


def stop_reason(f: Factory, run: dict[str, Any], task_id: str | None) -> str | None:
    """Why this run (its record, ``run``) must not do anything more (checked first by every iteration)."""
    kill = f.control.kill_info()
    if kill:
        return f"killed by {kill.get('by', '?')}"
    if f.control.is_revoked(task_id):
        return "revoked"
    status = run.get("status")
    if status != "running":
        return f"run is {status or 'unknown'}"
    return None


def run_iteration(f: Factory, send: Sender, run_id: str, index: int, task_id: str | None = None,
                  worker: str | None = None) -> tuple[IterationReport, bool]:
    """One iteration of run ``run_id``; returns (report, whether the chain should go on).

    A failing iteration is recorded and the run goes on, until ``loop.breaker_failures`` consecutive
    failures end the run (status ``stopping``).
    """
    cfg = f.settings.loop
    rec = f.control.run(run_id) or {}
    reason = stop_reason(f, rec, task_id)
    if reason:
        f.control.end_run(run_id, "killed" if reason.startswith(("killed", "revoked")) else "stopping", reason)
        return IterationReport(run_id=run_id, iteration=index, stopped=reason), False
    max_it = int(rec.get("max_iterations", cfg.max_iterations))
    gap = cfg.spacing_s(max_it) if index + 1 < max_it else 0.0
    reason = f.control.begin_iteration(run_id, index + 1, max_it, gap)
    if reason:
        f.control.end_run(run_id, "stopping", reason)
        return IterationReport(run_id=run_id, iteration=index, stopped=reason), False
    began = time.monotonic()
    try:
        report = iterate(f, send, run_id=run_id, iteration=index)
        failed = False
    except Exception as exc:  # noqa: BLE001 - recorded on the run; the breaker decides
        log.exception("iteration %d of run %s failed", index, run_id)
        report = IterationReport(run_id=run_id, iteration=index, error=f"{type(exc).__name__}: {exc}")
        failed = True
    report.duration_s = round(time.monotonic() - began, 4)
    consecutive = f.control.record_iteration(run_id, index, report.as_dict(), failed, worker)
    if failed and consecutive >= cfg.breaker_failures:
        f.control.end_run(run_id, "stopping", f"breaker open: {consecutive} consecutive failed iterations "
                                              f"(last: {report.error})")
        report.stopped = "breaker open"
        return report, False
    return report, True


def finish_run(f: Factory, run_id: str) -> bool:
    """The chain's last task: end the run as finished (heartbeat idle, lease released)."""
    return f.control.end_run(run_id, "finished")
