"""Operator actions behind the control CLI: status, kill, start, pause. Redis only (plus a revoke hook).

Each returns a plain dict (what ``--json`` prints) and an exit code, so the CLI stays a thin view.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from factory_worker.config.urls import mask_url
from factory_worker.context import Context
from factory_worker.ledger.core import Explanation
from factory_worker.ledger.redis_client import redis_py_sender
from factory_worker.ledger.states import Gate, RunStatus
from factory_worker.loop import heartbeat, status
from factory_worker.loop.kill import EarlyKill, who
from factory_worker.loop.presence import live_workers, worker_alive
from factory_worker.sources.rules import Rules

log = logging.getLogger(__name__)

#: Sends a Celery revoke for task ids (None when no broker is wanted).
Revoker = Callable[[list[str]], None]


def loop_status(ctx: Context) -> tuple[dict[str, Any], int]:
    """Heartbeat + liveness + run + kill/pause + counters + workers; exit 0 live, 1 not live or ledger lost
    (:func:`factory_worker.loop.status.read`, the reader the CLI's early path uses too)."""
    return status.read(
        redis_py_sender(ctx.redis),
        ctx.keys,
        ctx.settings.loop.stale_after_s,
        ctx.settings.tracker.write_back,
        mask_url(ctx.settings.effective_redis_url),
    )


def explain(ctx: Context, issue_id: str) -> Explanation:
    """The gate's answer for ``issue_id``; when the gate would dispatch it, also whether the source has it and
    whether the eligibility rules let it through (out of scope, or not ready: its state or a factory label).
    The CLI needs only Redis: an unreachable source is noted, not fatal."""
    e = ctx.ledger.explain(issue_id)
    if e.state == Gate.IN_FLIGHT or (e.state == Gate.CLAIMABLE and ctx.settings.agent.staged):
        e = _with_stage(ctx, e)
    if e.state not in (Gate.CLAIMABLE, Gate.NO_FREE_SLOT, Gate.MAX_IN_FLIGHT):
        return e
    try:
        issue = ctx.source.get(issue_id)
    except Exception as exc:
        return replace(e, detail={**e.detail, "source_error": f"{type(exc).__name__}: {exc}"})
    if issue is None:
        return Explanation(
            issue_id,
            Gate.NOT_IN_SOURCE,
            "not in the source: never dispatched unless it appears "
            f"there in a ready state (the ledger alone says: {e.state})",
            e.detail,
        )
    verdict = Rules.from_settings(ctx.settings.source).check(issue)
    if verdict is not None:
        return Explanation(
            issue_id,
            verdict.gate,
            f"{verdict.text} (the ledger alone says: {e.state})",
            {**e.detail, "rule": verdict.reason},
        )
    return e


def _with_stage(ctx: Context, e: Explanation) -> Explanation:
    """A staged dispatch's progress beside the gate's answer: which stage (step, round) it is at or resumes at."""
    p = ctx.redis.hgetall(ctx.keys.stages(e.issue))
    if not p.get("stage"):
        return e
    stage = {
        "stage": p["stage"],
        "step": int(p.get("step") or 0),
        "round": int(p.get("round") or 1),
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
    this does the rest for that kill (the loop may have begun to stop since)."""
    if early is not None and (early.namespace, early.url) != (ctx.keys.namespace, ctx.settings.effective_redis_url):
        log.error(
            "the early kill went to namespace %s at %s, not this command's %s at %s: deciding again",
            early.namespace,
            mask_url(early.url),
            ctx.keys.namespace,
            mask_url(ctx.settings.effective_redis_url),
        )
        early = None
    if early is not None:
        run_id, by, killed_at = early.run_id, early.by, early.at_ms
    else:
        live = heartbeat.check(ctx.redis, ctx.keys, ctx.settings.loop.stale_after_s)
        # a killed loop's agents can still be stopped: kill-loop --release-agents after a kill-loop
        again = release_agents and ctx.control.kill_info() is not None
        if not live.live and not force and not again:
            return {"killed": None, "refused": _refusal(ctx, live)}, 1
        run_id = (live.heartbeat.run_id if live.heartbeat else None) or ctx.control.current_run_id()
        by = who()
        killed_at = ctx.control.set_kill(run_id, by)
    newest = ctx.control.current_run_id()
    if newest and newest != run_id and ctx.control.run_status(newest) == RunStatus.RUNNING:
        run_id = newest  # a kickoff started a run just before the kill was set: that is the run to kill
    run = ctx.control.run(run_id) or {}
    # the loop was live between runs when its last run had ended before the kill: nothing to end or revoke. A
    # run that ended at or after the kill (its iteration saw the early kill first) was killed by this command.
    between = run.get("status") not in (None, RunStatus.RUNNING) and int(run.get("finished_ms") or 0) < killed_at
    task_ids = [] if between else [t for t in run.get("task_ids", []) if isinstance(t, str)]
    # every running agent, not only the killed run's: runs are short and agents outlive the run that sent them
    agent_ids = running_agent_tasks(ctx) if release_agents else []
    ctx.control.revoke_ids(task_ids)  # all of them, durably: iterations check this set first
    # Celery's revoke is broadcast to every worker and kept in memory: only the tasks not yet run need it.
    pending = (
        task_ids[max(0, int(run.get("iterations_done", 0)) - 1) :] if run.get("status") == RunStatus.RUNNING else []
    )
    revoked_sent, revoke_error = False, None
    if revoke is not None and pending:
        try:
            revoke(pending)
            revoked_sent = True
        except Exception as exc:
            revoke_error = f"{type(exc).__name__}: {exc}"
            log.warning("celery revoke failed (the Redis revoke list still applies): %s", revoke_error)
    if run_id and (between or not ctx.control.end_run(run_id, RunStatus.KILLED, f"kill-loop by {by}")):
        # between runs, or the run ended on its own meanwhile (an iteration that began before the kill found
        # nothing to do), or its record is gone: the kill stands, so the heartbeat must not say idle (live)
        ctx.control.end_heartbeat(run_id, "stopping")
    released = stop_agents(ctx, agent_ids, grace_s) if release_agents else []
    killed = None if between else run_id
    ctx.notifier.send_event("killed", run_id=killed, by=by)
    ctx.notifier.close()
    out = {
        "killed": killed,
        "loop_killed": True,
        "last_run": {"run_id": run_id, "status": run["status"]} if between else None,
        "revoked": task_ids,
        "released_agents": released,
        "by": by,
        "celery_revoke_sent": revoked_sent,
    }
    if revoke_error:
        out["celery_revoke_error"] = revoke_error
    return out, 0


def _refusal(ctx: Context, live: heartbeat.Liveness) -> str:
    """Why kill-loop finds nothing to kill (one line)."""
    kill = ctx.control.kill_info()
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


def running_agent_tasks(ctx: Context) -> list[str]:
    """The task ids of every agent running now, whichever run dispatched it."""
    return sorted(ctx.redis.smembers(ctx.keys.agents))


def stop_agents(ctx: Context, task_ids: list[str], grace_s: float | None = None) -> list[dict[str, Any]]:
    """Ask the agents' workers to stop them (SIGTERM, then SIGKILL after the agent grace) and release
    their claims as interrupted; whatever is still held after the grace is released here by token."""
    if not task_ids:
        return []
    grace = grace_s if grace_s is not None else ctx.settings.agent.term_grace_s + 2.0
    records = {t: ctx.redis.hgetall(ctx.keys.agent_task(t)) for t in task_ids}
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
