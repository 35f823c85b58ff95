"""Operator actions behind the control CLI: status, kill, start, pause. Redis only (plus a revoke hook).

Each returns a plain dict (what ``--json`` prints) and an exit code, so the CLI stays a thin view.
"""

from __future__ import annotations

import json
import logging
import time
from urllib.parse import urlsplit, urlunsplit
from typing import Any, Callable

from . import heartbeat
from .dispatch import release_task_claim
from .loop import Factory
from .runs import who

log = logging.getLogger(__name__)

#: Sends a Celery revoke for task ids (None when no broker is wanted).
Revoker = Callable[[list[str]], None]


def live_workers(f: Factory) -> list[dict[str, Any]]:
    out = []
    for key in f.r.scan_iter(match=f.keys.worker_pattern(), count=500):
        raw = f.r.get(key)
        try:
            out.append(json.loads(raw)) if raw else None
        except ValueError:
            continue
    return sorted(out, key=lambda w: w.get("hostname", ""))


def _masked(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def loop_status(f: Factory) -> tuple[dict[str, Any], int]:
    """Heartbeat + liveness + run + kill/pause + counters + workers; exit 0 live, 1 not live."""
    live = heartbeat.check(f.r, f.keys, f.settings.loop.stale_after_s)
    run_id = live.heartbeat.run_id if live.heartbeat else f.control.current_run_id()
    run = f.control.run(run_id)
    status = {
        "redis": _masked(f.settings.effective_redis_url),
        "namespace": f.settings.namespace,
        "liveness": live.state,
        "live": live.live,
        "age_s": None if live.age_s is None else round(live.age_s, 3),
        "heartbeat": live.heartbeat.model_dump() if live.heartbeat else None,
        "run": run,
        "lease_holder": f.control.lease_holder(),
        "killed": f.control.kill_info(),
        "paused": f.control.pause_info(),
        "counters": f.ledger.counters(),
        "ledger": f.ledger.gauges(),
        "workers": live_workers(f),
        "last_iteration_worker": (run or {}).get("last_worker"),
    }
    return status, 0 if live.live else 1


def kill_loop(f: Factory, force: bool = False, release_agents: bool = False,
              revoke: Revoker | None = None, grace_s: float | None = None) -> tuple[dict[str, Any], int]:
    """Kill the live run and keep the loop stopped. Exit 1 (refused) when nothing is live, unless forced."""
    live = heartbeat.check(f.r, f.keys, f.settings.loop.stale_after_s)
    if not live.live and not force:
        why = {"missing": "no heartbeat (missing, malformed or expired)", "stale": f"heartbeat is stale "
               f"({live.age_s:.1f}s old)" if live.age_s is not None else "stale",
               "stopping": "the run is already stopping"}.get(live.state, live.state)
        return {"killed": None, "refused": f"no live run: {why}; use --force to kill anyway"}, 1
    run_id = (live.heartbeat.run_id if live.heartbeat else None) or f.control.current_run_id()
    run = f.control.run(run_id) or {}
    by = who()
    f.control.set_kill(run_id, by)
    task_ids = [t for t in run.get("task_ids", []) if isinstance(t, str)]
    agent_ids = run_agent_tasks(f, run_id) if release_agents else []
    f.control.revoke_ids(task_ids)  # all of them, durably: iterations check this set first
    # Celery's revoke is broadcast to every worker and kept in memory: only the tasks not yet run need it.
    pending = task_ids[max(0, int(run.get("iterations_done", 0)) - 1):] if run.get("status") == "running" else []
    revoked_sent, revoke_error = False, None
    if revoke is not None and pending:
        try:
            revoke(pending)
            revoked_sent = True
        except Exception as exc:  # noqa: BLE001 - the Redis revoke list already stops them
            revoke_error = f"{type(exc).__name__}: {exc}"
            log.warning("celery revoke failed (the Redis revoke list still applies): %s", revoke_error)
    if run_id:
        f.control.end_run(run_id, "killed", f"kill-loop by {by}")
    released = stop_agents(f, agent_ids, grace_s) if release_agents else []
    f.notifier.send_event("killed", run_id=run_id, by=by)
    f.notifier.close()
    out = {"killed": run_id, "revoked": task_ids, "released_agents": released, "by": by,
           "celery_revoke_sent": revoked_sent}
    if revoke_error:
        out["celery_revoke_error"] = revoke_error
    return out, 0


def run_agent_tasks(f: Factory, run_id: str | None) -> list[str]:
    """Agent task ids of ``run_id`` that are running now (all runs when ``run_id`` is None)."""
    ids = []
    for task_id in f.r.smembers(f.keys.agents):
        rec_run = f.r.hget(f.keys.agent_task(task_id), "run_id")
        if run_id is None or rec_run == run_id:
            ids.append(task_id)
    return sorted(ids)


def stop_agents(f: Factory, task_ids: list[str], grace_s: float | None = None) -> list[dict[str, Any]]:
    """Ask the agents' workers to stop them (SIGTERM, then SIGKILL after the agent grace) and release
    their claims as interrupted; whatever is still held after the grace is released here by token."""
    if not task_ids:
        return []
    grace = grace_s if grace_s is not None else f.settings.agent.term_grace_s + 2.0
    records = {t: f.r.hgetall(f.keys.agent_task(t)) for t in task_ids}
    p = f.r.pipeline(transaction=False)
    for t in task_ids:
        p.set(f.keys.agent_stop(t), who(), ex=3600)
    p.execute()
    deadline = time.monotonic() + grace
    pending = set(task_ids)
    while pending and time.monotonic() < deadline:
        pending = {t for t in pending if f.r.sismember(f.keys.agents, t)}
        if pending:
            time.sleep(0.1)
    out = []
    for t in task_ids:
        rec = records.get(t) or {}
        released_by = "worker"
        if t in pending:
            # Only a dead worker's claims are released here: a live one may be settling right now.
            if rec.get("hostname") and f.r.exists(f.keys.worker(rec["hostname"])):
                released_by = "pending (its worker is alive and still stopping it)"
            else:
                released_by = "ctl" if release_task_claim(f, t) is not None else "lease expiry"
                f.r.srem(f.keys.agents, t)  # its worker is gone: nobody else will clean this entry
        out.append({"task_id": t, "issue": rec.get("issue"), "stopped": t not in pending,
                    "released_by": released_by})
    return out


def start_loop(f: Factory, start: Callable[[int | None, str], Any], max_iterations: int | None = None
               ) -> tuple[dict[str, Any], int]:
    """Clear a kill and start a run now (overlap policy applies): exit 0 started, 1 skipped."""
    cleared = f.control.kill_info() is not None
    kick = start(max_iterations, f"start-loop {who()}")  # clears the kill once it holds the loop lease
    out = {"cleared_kill": cleared, **kick.as_dict()}
    return out, 0 if kick.started else 1


def set_paused(f: Factory, paused: bool) -> tuple[dict[str, Any], int]:
    changed = f.control.set_paused(paused, who())
    return {"paused": paused, "changed": changed}, 0
