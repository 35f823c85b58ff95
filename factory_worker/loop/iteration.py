"""The iteration: poll -> rules -> gate -> dispatch -> report, and the run around it (kill checks, breaker).

Testable without Celery: sending an agent task is a callable (:class:`Sender`) handed in by the caller.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any, cast

from factory_worker.context import Context
from factory_worker.ledger.core import WAITING, Claim
from factory_worker.ledger.guard import LedgerLostError
from factory_worker.ledger.records import as_int
from factory_worker.ledger.scripts import scripts_for
from factory_worker.ledger.states import Gate, ReleaseReason, RunStatus
from factory_worker.loop import heartbeat
from factory_worker.loop.control import Kickoff
from factory_worker.loop.sweep import forget_dead_agents, release_lost_messages
from factory_worker.sources.base import Issue, PollResult, SourceError
from factory_worker.sources.concurrency import groups
from factory_worker.sources.rules import Rules

log = logging.getLogger(__name__)

#: Sends one ``factory.agent.run`` task: (task_id, issue, claim, run_id) -> None; raises on failure.
Sender = Callable[[str, Issue, Claim, str | None], None]
#: Sends a started run's tasks: (kickoff, seconds between iterations) -> None; raises on failure.
RunSender = Callable[[Kickoff, float], None]


@dataclass
class IterationReport:
    pulled: int = 0
    dispatched: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    #: polled issues the eligibility rules left out, counted by reason, and a few of them as examples
    ruled_out: dict[str, int] = field(default_factory=dict)
    ruled_out_examples: list[dict[str, str]] = field(default_factory=list)
    dry_run: bool = False
    run_id: str | None = None
    iteration: int | None = None
    dispatches: list[dict[str, Any]] = field(default_factory=list)
    #: ready issues not gated this poll: the fleet was full and enough were waiting already (Ledger.claim)
    unexamined: int = 0
    error: str | None = None
    stopped: str | None = None
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Shallow: the lists are copied, their entries (flat dicts of str) shared. ``dataclasses.asdict``
        deep-copies every skip entry and was the iteration's largest cost on a big backlog (py-spy)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("skipped", "ruled_out_examples", "dispatches"):
            out[name] = list(out[name])
        out["ruled_out"] = dict(self.ruled_out)
        return out


def new_agent_task_id() -> str:
    return f"agent-{uuid.uuid4().hex}"


def iterate(
    ctx: Context, send: Sender | None, run_id: str | None = None, dry_run: bool = False, iteration: int | None = None
) -> IterationReport:
    """One poll -> rules -> gate -> dispatch pass. Raises if the source is down or sending fails.

    The eligibility rules (``sources/rules.py``) leave out what is out of scope or carries the factory's
    done/parked label; those are only counted by reason (``ruled_out``), never listed one by one.

    Sending failures release every claim not yet sent (reason ``send-failed``) before re-raising, so
    nothing is left held. A dry run asks the gate in its read-only mode and writes nothing.
    """
    report = IterationReport(dry_run=dry_run, run_id=run_id, iteration=iteration)
    if not dry_run and ctx.control.pause_info():  # a dry run asks the gate, which says "paused" per issue
        report.stopped = "paused"
        return report
    polled = _poll(ctx)
    report.skipped.extend({"issue": e.split(": ", 1)[0], "reason": f"source: {e}"} for e in polled.errors)
    screened = Rules.from_settings(ctx.settings.source, ctx.settings.workspace).screen(polled.issues)
    report.ruled_out, report.ruled_out_examples = screened.ruled_out, screened.examples
    issues = {i.id: i for i in screened.issues}
    report.pulled = len(issues)
    try:
        batch = ctx.ledger.claim(
            list(issues),
            dry_run=dry_run,
            fleet_slots=True,
            enough_waiting=0 if dry_run else ctx.keys.BACKLOG_MAX,
            groups=groups(ctx.settings, issues.values()),
        )
    except LedgerLostError as exc:  # safe mode: claim nothing, tell the team once, keep the loop alive
        report.stopped = "ledger lost"
        report.error = str(exc)
        if ctx.redis.set(ctx.keys.notified("ledger-lost", exc.remembered), 1, nx=True, ex=ctx.keys.NOTIFIED_TTL_S):
            ctx.notifier.send_event("ledger-lost", remembered=exc.remembered, current=exc.current)
        return report
    report.skipped.extend({"issue": s.issue, "reason": s.reason} for s in batch.skipped)
    report.unexamined = batch.unexamined
    if dry_run:  # the gate's own decisions, nothing written
        report.dispatches = [{"issue": c.issue, "task_id": None, "fence": c.fence} for c in batch.claims]
        report.dispatched = len(batch.claims)
        return report
    _remember_backlog(ctx, issues, batch.skipped)
    try:
        report.dispatches = dispatch_claims(ctx, send, batch.claims, issues, run_id)
    finally:
        report.dispatched = len(report.dispatches)
    _sweep(ctx)
    return report


def _poll(ctx: Context) -> PollResult:
    """The source's poll. A malformed item is one line in ``errors`` (the sources report and skip it); any
    exception is the source failing as a whole: a :class:`SourceError` in one line (the iteration is recorded
    as failed, ``run-once`` prints it), whatever a custom source raised."""
    try:
        polled = ctx.source.poll()
    except SourceError:
        raise
    except Exception as exc:
        log.warning("the source's poll failed", exc_info=True)
        text = (str(exc).splitlines() or [""])[0]
        raise SourceError(f"source poll failed: {type(exc).__name__}{': ' + text if text else ''}") from exc
    if not isinstance(polled, PollResult):
        raise SourceError(f"source poll returned {type(polled).__name__}, not a PollResult")
    return polled


def _sweep(ctx: Context) -> None:
    """Housekeeping after dispatching (``sweep.py``); a failure waits for the next iteration."""
    try:
        forget_dead_agents(ctx)
        if ctx.broker_redis is not None:
            release_lost_messages(ctx, ctx.broker_redis, ctx.keys.agent_queue)
    except Exception:
        log.warning("could not sweep what dead workers and lost messages left", exc_info=True)


def dispatch_claims(
    ctx: Context,
    send: Sender | None,
    claims: list[Claim],
    issues: dict[str, Issue],
    run_id: str | None,
    counter: str = "dispatched",
) -> list[dict[str, Any]]:
    """Send one agent task per claim; returns what was sent. If sending fails, every claim not yet sent is
    released (reason ``send-failed``) before re-raising, so nothing is left held.

    ``counter`` (and ``dispatched``) are counted with the task records, in the same round trip; what could
    not be sent is taken off again."""
    sent: list[dict[str, Any]] = []
    task_ids = [new_agent_task_id() for _ in claims]
    counts = {"dispatched": len(claims), counter: len(claims)}
    try:
        if claims:
            _remember_agent_tasks(ctx, zip(task_ids, claims), run_id, counts)
        for task_id, claim in zip(task_ids, claims):
            assert send is not None
            send(task_id, issues[claim.issue], claim, run_id)
            sent.append({"issue": claim.issue, "task_id": task_id, "fence": claim.fence})
            ctx.notifier.send_event("dispatched", issue_id=claim.issue, title=issues[claim.issue].title, run_id=run_id)
    except Exception:
        for task_id, claim in list(zip(task_ids, claims))[len(sent) :]:
            try:
                ctx.redis.zrem(ctx.keys.queued, task_id)
                ctx.ledger.release(claim.issue, claim.token, reason=ReleaseReason.SEND_FAILED)
            except Exception:
                log.exception("could not release unsent claim on %s", claim.issue)
        raise
    finally:
        if len(sent) < len(claims):
            for name in counts:
                ctx.control.count(name, len(sent) - len(claims))
    return sent


def _remember_backlog(ctx: Context, issues: dict[str, Issue], skipped: Iterable[Any]) -> None:
    """Replace the backlog with this poll's ready issues that wait for room, or for a slot of their concurrency
    key (the gate's order: source order, round-robin between keys; at most
    ``Keys.BACKLOG_MAX``; it expires after max(60 s, two intervals), so a stopped loop leaves nothing behind)."""
    waiting = [
        issues[s.issue].model_dump_json()
        for s in itertools.islice(
            (s for s in skipped if s.reason in WAITING or s.reason == Gate.CONCURRENCY), ctx.keys.BACKLOG_MAX
        )
    ]
    ttl_ms = int(max(60.0, 2 * ctx.settings.loop.interval_s) * 1000)
    p = ctx.redis.pipeline(transaction=True)
    p.delete(ctx.keys.backlog)
    if waiting:
        p.rpush(ctx.keys.backlog, *waiting)
        p.pexpire(ctx.keys.backlog, ttl_ms)
    p.execute()


_POP = object()


def refill(ctx: Context, send: Sender, run_id: str | None = None, tries: int = 5, popped: Any = _POP) -> str | None:
    """A slot just freed: gate the next backlog issue through the same gate and cap, and send its agent
    at once (the beat-driven poll stays the safety net). Returns the issue dispatched, if any.

    An issue the gate skips for good (done, in flight, backing off, parked) is dropped and the next one
    tried; one that must still wait for room (or a killed / paused loop) is put back, and refill stops.
    ``popped``: the first backlog entry, already popped by the caller (in a round trip it made anyway).
    """
    for _ in range(tries):
        # LPOP without a count: one element or None (redis-py types it as one with LPOP's list-of-count form)
        raw, popped = (cast("str | None", ctx.redis.lpop(ctx.keys.backlog)) if popped is _POP else popped), _POP
        if raw is None:
            return None
        issue = Issue.model_validate_json(raw)
        batch = ctx.ledger.claim([issue.id], fleet_slots=True, groups=groups(ctx.settings, [issue]))
        if batch.claims:
            dispatch_claims(ctx, send, batch.claims, {issue.id: issue}, run_id, counter="refilled")
            return issue.id
        if batch.skipped[0].reason in (*WAITING, Gate.KILLED, Gate.PAUSED):
            ctx.redis.lpush(ctx.keys.backlog, raw)
            return None
        if batch.skipped[0].reason == Gate.CONCURRENCY:  # its key is full: behind the others, the next one tried
            ctx.redis.rpush(ctx.keys.backlog, raw)
    return None


def _remember_agent_tasks(
    ctx: Context, pairs: Iterable[tuple[str, Claim]], run_id: str | None, counts: dict[str, int]
) -> None:
    """Map each agent task id to its claim, so a revoke or teardown can release by token, and add
    ``counts`` to the counters: one round trip (``queue_tasks.lua``, the record stage.lua writes too)."""
    pairs = list(pairs)
    scripts_for(ctx.redis)["queue_tasks"](
        ctx.keys,
        [task_id for task_id, _ in pairs],
        run_id=run_id or "",
        sent_ms=int(time.time() * 1000),
        record_ttl_ms=ctx.keys.AGENT_TASK_TTL_S * 1000,
        counts=json.dumps(counts),
        claims=json.dumps([[claim.issue, claim.token] for _, claim in pairs]),
    )


def stop_reason(ctx: Context, run: dict[str, Any], task_id: str | None) -> tuple[RunStatus, str] | None:
    """Why this run (its record, ``run``) must not do anything more, and the status that ends it
    (checked first by every iteration)."""
    kill = ctx.control.kill_info()
    if kill:
        return RunStatus.KILLED, f"killed by {kill.get('by', '?')}"
    if ctx.control.is_revoked(task_id):
        return RunStatus.KILLED, "revoked"
    status = run.get("status")
    if status != RunStatus.RUNNING:
        return RunStatus.STOPPING, f"run is {status or 'unknown'}"
    return None


def run_iteration(
    ctx: Context, send: Sender, run_id: str, index: int, task_id: str | None = None, worker: str | None = None
) -> tuple[IterationReport, bool]:
    """One iteration of run ``run_id``; returns (report, whether the chain should go on).

    A failing iteration is recorded and the run goes on, until ``loop.breaker_failures`` consecutive
    failures end the run (status ``stopping``).
    """
    cfg = ctx.settings.loop
    rec = ctx.control.run(run_id) or {}
    stop = stop_reason(ctx, rec, task_id)
    if stop:
        ctx.control.end_run(run_id, *stop)
        return IterationReport(run_id=run_id, iteration=index, stopped=stop[1]), False
    max_it = as_int(rec.get("max_iterations"), cfg.max_iterations)
    gap = cfg.spacing_s(max_it) if index + 1 < max_it else 0.0
    reason = ctx.control.begin_iteration(run_id, index + 1, max_it, gap, worker)
    if reason:
        ctx.control.end_run(run_id, RunStatus.STOPPING, reason)
        return IterationReport(run_id=run_id, iteration=index, stopped=reason), False
    began = time.monotonic()
    try:
        report = iterate(ctx, send, run_id=run_id, iteration=index)
        failed = False
    except Exception as exc:
        log.exception("iteration %d of run %s failed", index, run_id)
        report = IterationReport(run_id=run_id, iteration=index, error=f"{type(exc).__name__}: {exc}")
        failed = True
    report.duration_s = round(time.monotonic() - began, 4)
    consecutive = ctx.control.record_iteration(run_id, index, report.as_dict(), failed, worker)
    if failed and consecutive >= cfg.breaker_failures:
        ctx.control.end_run(
            run_id,
            RunStatus.STOPPING,
            f"breaker open: {consecutive} consecutive failed iterations (last: {report.error})",
        )
        report.stopped = "breaker open"
        return report, False
    if cfg.end_idle_runs and not failed and index + 1 < max_it and is_idle(report):
        ctx.control.end_run(run_id, RunStatus.FINISHED, "idle: nothing to dispatch")
        report.stopped = "idle"
        return report, False
    return report, True


def is_idle(report: IterationReport) -> bool:
    """Nothing dispatched and nothing waiting for room: the run's next iterations could only poll again
    (a freed slot is refilled by its agent task; a new or re-readied issue waits for the next kickoff).
    A paused iteration is not idle: a pause keeps the run alive (its heartbeat fresh) and claims nothing."""
    if report.stopped == "paused":
        return False
    return report.dispatched == 0 and not any(s.get("reason") in WAITING for s in report.skipped)


def finish_run(ctx: Context, run_id: str) -> bool:
    """The chain's last task: end the run as finished (heartbeat idle, lease released)."""
    return ctx.control.end_run(run_id, RunStatus.FINISHED)


def start_run(
    ctx: Context, send_run: RunSender, max_iterations: int | None = None, by: str = "beat", clear_kill: bool = False
) -> Kickoff:
    """Take the loop lease and send the run's tasks (overlap policy SKIP). Shared by beat and start-loop.

    Iterations after the first are spaced ``loop.spacing_s`` apart (short countdowns, far below the
    visibility timeout), so a run's polls spread over the interval. If sending fails the run is ended.
    """
    _notify_if_stale(ctx)
    kick = ctx.control.start_run(max_iterations, by=by, clear_kill=clear_kill)
    if not kick.started:
        log.info("kickoff skipped: %s", kick.reason)
        return kick
    try:
        send_run(kick, ctx.settings.loop.spacing_s(len(kick.task_ids) - 1))
    except Exception as exc:
        ctx.control.abandon_start(kick, f"{type(exc).__name__}: {exc}")
        raise
    return kick


def _notify_if_stale(ctx: Context) -> None:
    """Tell the team, once per run, that the loop's heartbeat went stale."""
    if not ctx.notifier.enabled:
        return
    live = heartbeat.check(ctx.redis, ctx.keys, ctx.settings.loop.stale_after_s)
    hb = live.heartbeat
    if (
        live.state == "stale"
        and hb
        and ctx.redis.set(ctx.keys.notified("stale", hb.run_id), 1, nx=True, ex=ctx.keys.NOTIFIED_TTL_S)
    ):
        ctx.notifier.send_event("stale", age_s=live.age_s, run_id=hb.run_id, hostname=hb.hostname)
