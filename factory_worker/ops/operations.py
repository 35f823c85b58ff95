"""Operator actions behind the control CLI: status, kill, start, pause. Redis only (plus a revoke hook).

Each returns a plain dict (what ``--json`` prints) and an exit code, so the CLI stays a thin view.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import redis

from factory_worker.config.essentials import Essentials
from factory_worker.config.urls import mask_url
from factory_worker.context import Context
from factory_worker.ledger.core import Explanation
from factory_worker.ledger.records import shown, step_text
from factory_worker.ledger.redis_client import decoded_hash, redis_py_sender
from factory_worker.ledger.states import Gate, RunStatus
from factory_worker.loop import status
from factory_worker.loop.kill import EarlyKill, Kill, Refused, kill_plan, kill_target, who
from factory_worker.loop.presence import live_workers, worker_alive
from factory_worker.sources import concurrency
from factory_worker.sources.base import MalformedIssue
from factory_worker.sources.rules import Rules

log = logging.getLogger(__name__)

#: Sends a Celery revoke for task ids (None when no broker is wanted).
Revoker = Callable[[list[str]], None]


def loop_status(ctx: Context) -> tuple[dict[str, Any], int]:
    """Heartbeat + liveness + run + kill/pause + counters + workers + the reasons the loop cannot make progress;
    exit 0 live with no reason, else 1 (:func:`factory_worker.loop.status.read`, the reader the CLI's early path
    uses too)."""
    s = ctx.settings
    return status.read(
        redis_py_sender(ctx.redis),
        status.Query(
            ctx.keys,
            s.loop.stale_after_s,
            s.tracker.write_back,
            mask_url(s.effective_redis_url),
            s.dispatch.min_replica_acks,
            s.effective_broker_url == s.effective_redis_url,
        ),
    )


def recovery_status(r: redis.Redis, e: Essentials) -> tuple[dict[str, Any], int]:
    """:func:`loop_status` from the recovery commands' settings alone (:mod:`factory_worker.config.essentials`:
    the full CLI's ``loop-status`` works whatever the other settings say, as the early path does)."""
    return status.read(redis_py_sender(r), status.Query.of(e))


#: The gate's answers after which the source is asked too: the issue would be dispatched, or the whole loop is
#: stopped (the issue itself may still be unknown or malformed).
_ASK_SOURCE = (Gate.CLAIMABLE, Gate.NO_FREE_SLOT, Gate.MAX_IN_FLIGHT, Gate.KILLED, Gate.PAUSED)


def explain(ctx: Context, issue_id: str) -> Explanation:
    """The gate's answer for ``issue_id`` (with its last result, :meth:`Ledger.explain`), a staged issue's kept steps
    (stage, round, outcome); when the gate would dispatch it (or the loop is stopped, or the ledger knows nothing of it), also
    what the source says: ``unknown`` when neither has it (the CLI exits 1), ``malformed`` with the validation
    reason every poll skips it for, ``not-in-source``, or the eligibility rules' verdict (out of scope, not
    ready). The CLI needs only Redis: an unreachable source is noted, not fatal."""
    e = ctx.ledger.explain(issue_id)
    known = ctx.ledger.view.knows(issue_id)
    if e.state == Gate.IN_FLIGHT or (e.state == Gate.CLAIMABLE and ctx.settings.agent.staged):
        e = _with_stage(ctx, e)
    e = _with_steps(ctx, e)
    if known and e.state not in _ASK_SOURCE:
        return e
    try:
        issue = ctx.source.get(issue_id)
    except MalformedIssue as exc:  # what every poll skips, with the poll's reason
        return Explanation(
            issue_id,
            Gate.MALFORMED,
            f"malformed in the source, so every poll skips it: "
            f"{(str(exc).splitlines() or [''])[0]} (the ledger alone says: {e.state})",
            {**e.detail, "malformed": str(exc)},
        )
    except Exception as exc:
        return replace(e, detail={**e.detail, "source_error": f"{type(exc).__name__}: {exc}"})
    if issue is None and not known:
        return Explanation(issue_id, Gate.UNKNOWN, "neither the ledger nor the source has this id", {})
    if e.state in (Gate.KILLED, Gate.PAUSED):
        return e
    if issue is None:
        return Explanation(
            issue_id,
            Gate.NOT_IN_SOURCE,
            "not in the source: never dispatched unless it appears "
            f"there in a ready state (the ledger alone says: {e.state})",
            e.detail,
        )
    verdict = Rules.from_settings(ctx.settings.source, ctx.settings.workspace).check(issue)
    if verdict is not None:
        return Explanation(
            issue_id,
            verdict.gate,
            f"{verdict.text} (the ledger alone says: {e.state})",
            {**e.detail, "rule": verdict.reason},
        )
    if ctx.settings.dispatch.concurrency and e.state == Gate.CLAIMABLE:  # the gate again, with the issue's keys
        e = _with_steps(ctx, ctx.ledger.explain(issue_id, concurrency.groups(ctx.settings, [issue])))
    return e


def retry(ctx: Context, issue_id: str) -> tuple[dict[str, Any], int]:
    """``factory-worker retry``: a fresh attempt budget (:meth:`Ledger.retry`); exit 1 with ``unknown`` when
    neither the ledger nor the source has ``issue_id`` (an unreachable source: not unknown, nothing to retry)."""
    known = ctx.ledger.view.knows(issue_id)
    data = {**ctx.ledger.retry(issue_id), "unknown": False}
    if known:
        return data, 0
    try:
        in_source = ctx.source.get(issue_id) is not None
    except MalformedIssue:
        in_source = True
    except Exception as exc:
        return {**data, "source_error": f"{type(exc).__name__}: {exc}"}, 0
    return ({**data, "unknown": True}, 1) if not in_source else (data, 0)


def _with_steps(ctx: Context, e: Explanation) -> Explanation:
    """The steps the ledger kept of a staged issue's attempts (stage, round, outcome), the last one's outcome
    as its last step: the latest attempt's in the text, every kept one in ``detail["steps"]``."""
    steps = ctx.ledger.view.stage_history(e.issue)
    if not steps:
        return e
    last = steps[-1]
    latest = [s for s in steps if s["attempt"] == last["attempt"]]
    told = ", ".join(step_text(s) for s in latest)
    text = f"{e.text}; attempt {last['attempt']}'s stages: {told}"
    return replace(e, text=text, detail={**e.detail, "steps": steps, "last_step": step_text(last)})


def _with_stage(ctx: Context, e: Explanation) -> Explanation:
    """A staged dispatch's progress beside the gate's answer: which stage (step, round) it is at or resumes at."""
    p = decoded_hash(ctx.redis.hgetall(ctx.keys.stages(e.issue)))
    if not p.get("stage"):
        return e
    stage = {
        "stage": p["stage"],
        "step": shown(p.get("step")),
        "round": shown(p.get("round"), 1),
        "stage_state": p.get("state"),
        "stage_history": p.get("history") or "",
    }
    doing = "running" if p.get("state") == "running" else ("resumes at" if e.state == Gate.CLAIMABLE else "next")
    text = f"{e.text}; stage {doing}: {p['stage']} (step {stage['step']}, round {stage['round']})"
    return replace(e, text=text, detail={**e.detail, **stage})


def kill_loop(
    ctx: Context,
    force: bool = False,
    release_agents: bool = False,
    revoke: Revoker | None = None,
    grace_s: float | None = None,
    early: EarlyKill | None = None,
) -> tuple[dict[str, Any], int]:
    """Kill the live run and keep the loop stopped. Exit 1 (refused) when nothing is live, unless forced.

    ``early``: the kill record :func:`factory_worker.cli.quick.kill_first` already wrote (the loop was live then):
    this does the rest for that kill (the loop may have begun to stop since). What the kill means is decided by
    loop control (:mod:`factory_worker.loop.kill`); this carries it out and reports."""
    kill: Kill
    if early is not None and early.went_to(ctx.keys.namespace, ctx.settings.effective_redis_url):
        kill = early
    else:
        if early is not None:
            log.error(
                "the early kill went to namespace %s at %s, not this command's %s at %s: deciding again",
                early.namespace,
                mask_url(early.url),
                ctx.keys.namespace,
                mask_url(ctx.settings.effective_redis_url),
            )
        target = kill_target(ctx.control, force, release_agents)
        if isinstance(target, Refused):
            return target.answer(), 1
        by = who()
        kill = Kill(target.run_id, by, ctx.control.set_kill(target.run_id, by))
    plan = kill_plan(ctx.control, kill, release_agents)
    ctx.control.revoke_ids(list(plan.revoke))  # all of them, durably: iterations check this set first
    revoked_sent, revoke_error = _celery_revoke(revoke, plan.celery_revoke)
    if plan.run_id and not (plan.ends_run and ctx.control.end_run(plan.run_id, RunStatus.KILLED, plan.reason)):
        # between runs, or the run ended on its own meanwhile (an iteration that began before the kill found
        # nothing to do), or its record is gone: the kill stands, so the heartbeat must not say idle (live)
        ctx.control.end_heartbeat(plan.run_id, "stopping")
    released = stop_agents(ctx, list(plan.agents), grace_s)
    ctx.notifier.send_event("killed", run_id=plan.killed, by=kill.by)
    ctx.notifier.close()
    return plan.answer(released, revoked_sent, revoke_error), 0


def _celery_revoke(revoke: Revoker | None, task_ids: tuple[str, ...]) -> tuple[bool, str | None]:
    """Send Celery's revoke for ``task_ids`` (none: nothing sent); (sent, the error when it failed)."""
    if revoke is None or not task_ids:
        return False, None
    try:
        revoke(list(task_ids))
        return True, None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.warning("celery revoke failed (the Redis revoke list still applies): %s", error)
        return False, error


def stop_agents(ctx: Context, task_ids: list[str], grace_s: float | None = None) -> list[dict[str, Any]]:
    """Ask the agents' workers to stop them (SIGTERM, then SIGKILL after the agent grace) and release
    their claims as interrupted; whatever is still held after the grace is released here by token."""
    if not task_ids:
        return []
    grace = grace_s if grace_s is not None else ctx.settings.agent.term_grace_s + 2.0
    records = {t: decoded_hash(ctx.redis.hgetall(ctx.keys.agent_task(t))) for t in task_ids}
    p = ctx.redis.pipeline(transaction=False)
    for t in task_ids:
        p.set(ctx.keys.agent_stop(t), who(), ex=ctx.keys.AGENT_STOP_TTL_S)
    p.execute()
    deadline = time.monotonic() + grace
    pending = set(task_ids)
    while pending and time.monotonic() < deadline:
        pending = {t for t in pending if ctx.redis.sismember(ctx.keys.agents, t)}
        if pending:
            time.sleep(0.1)
    out = []
    for t in task_ids:
        rec = records.get(t) or {}
        released_by = "worker"
        if t in pending:
            # Only a dead worker's claims are released here: a live one may be settling right now.
            if rec.get("hostname") and worker_alive(ctx.redis, ctx.keys, rec["hostname"]):
                released_by = "pending (its worker is alive and still stopping it)"
            else:
                # lazily: status commands need none of it
                from factory_worker.dispatch.claims import release_task_claim

                released_by = "ctl" if release_task_claim(ctx, t) is not None else "lease expiry"
                ctx.redis.srem(ctx.keys.agents, t)  # its worker is gone: nobody else will clean this entry
        out.append({"task_id": t, "issue": rec.get("issue"), "stopped": t not in pending, "released_by": released_by})
    return out


def start_loop(
    ctx: Context, start: Callable[[int | None, str], Any], max_iterations: int | None = None
) -> tuple[dict[str, Any], int]:
    """Clear a kill and start a run now (overlap policy applies): exit 0 started, 1 skipped."""
    cleared = ctx.control.kill_info() is not None
    kick = start(max_iterations, f"start-loop {who()}")  # clears the kill once it holds the loop lease
    out = {
        "cleared_kill": cleared,
        **kick.as_dict(),
        "paused": ctx.control.pause_info() is not None,
        "live_workers": len(live_workers(ctx)),
    }
    return out, 0 if kick.started else 1


def set_paused(ctx: Context, paused: bool) -> tuple[dict[str, Any], int]:
    changed = ctx.control.set_paused(paused, who())
    return {"paused": paused, "changed": changed}, 0
