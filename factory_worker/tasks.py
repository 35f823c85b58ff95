"""The Celery tasks: thin views over :mod:`loop`, :mod:`runs` and :mod:`dispatch`.

``factory.loop.kickoff`` -> chain of ``factory.loop.iteration`` x N -> ``factory.loop.finish``;
``factory.agent.run`` runs one agent for one claim.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery import chain

from . import dispatch, heartbeat, loop
from .app import AGENT_QUEUE, LOOP_QUEUE, app
from .ledger import Claim
from .runs import Kickoff
from .sources.base import Issue

log = logging.getLogger(__name__)

_factory: loop.Factory | None = None


def factory() -> loop.Factory:
    """The process-wide Factory (one Redis pool per process)."""
    global _factory
    if _factory is None:
        _factory = loop.Factory(app.conf.factory_settings)
    return _factory


def send_agent(task_id: str, issue: Issue, claim: Claim, run_id: str | None, producer: Any = None) -> None:
    """Send one ``factory.agent.run``; Flower shows the issue id, never the token or the issue body."""
    agent_run.apply_async(
        producer=producer,
        args=[issue.id, claim.token, run_id],
        kwargs={"issue": issue.as_json_dict()},
        task_id=task_id,
        queue=AGENT_QUEUE,
        argsrepr=repr([issue.id, f"fence={claim.fence}", run_id]),
        kwargsrepr="{}",
    )


def start_run(max_iterations: int | None = None, by: str = "beat", clear_kill: bool = False) -> Kickoff:
    """Take the loop lease and send the run's chain (overlap policy SKIP). Shared by beat and start-loop."""
    f = factory()
    _notify_if_stale(f)
    kick = f.control.start_run(max_iterations, by=by, clear_kill=clear_kill)
    if not kick.started:
        log.info("kickoff skipped: %s", kick.reason)
        return kick
    ids = kick.task_ids
    run_id = kick.run_id
    n = len(ids) - 1
    # Short countdowns spread the run's polls over the interval (far below the visibility timeout).
    gap = f.settings.loop.spacing_s(n)
    steps = [iteration.si(run_id, i).set(task_id=ids[i], queue=LOOP_QUEUE, countdown=gap if i else None)
             for i in range(n)]
    steps.append(finish.si(run_id).set(task_id=ids[-1], queue=LOOP_QUEUE))
    try:
        chain(*steps).apply_async()
    except Exception as exc:
        f.control.abandon_start(kick, f"{type(exc).__name__}: {exc}")
        raise
    return kick


def _notify_if_stale(f: loop.Factory) -> None:
    """Tell the team, once per run, that the loop's heartbeat went stale."""
    if not f.notifier.enabled:
        return
    live = heartbeat.check(f.r, f.keys, f.settings.loop.stale_after_s)
    hb = live.heartbeat
    if live.state == "stale" and hb and f.r.set(f.keys.notified("stale", hb.run_id), 1, nx=True, ex=86400):
        f.notifier.send_event("stale", age_s=live.age_s, run_id=hb.run_id, hostname=hb.hostname)


@app.task(name="factory.loop.kickoff", bind=True)
def kickoff(self, max_iterations: int | None = None, by: str = "beat") -> dict[str, Any]:
    """Start a run unless one is live, the loop is killed or paused (each a counted no-op)."""
    return start_run(max_iterations, by=by).as_dict()


@app.task(name="factory.loop.iteration", bind=True)
def iteration(self, run_id: str, index: int) -> dict[str, Any]:
    """Poll, gate through the ledger, dispatch agents; stops the chain when the run must end."""
    with app.producer_or_acquire() as producer:  # one producer for every agent message of the batch
        send = functools.partial(send_agent, producer=producer)
        report, go_on = loop.run_iteration(factory(), send, run_id, index, task_id=self.request.id,
                                           worker=self.request.hostname)
    if not go_on:
        self.request.chain = None  # end the chain here: nothing after this iteration is sent
    return summary(report.as_dict())


def summary(report: dict[str, Any], keep: int = 20) -> dict[str, Any]:
    """The report as a task result (logged by Celery, shown by Flower): the first ``keep`` skips only.

    The whole report stays on the run record (``loop-status --json`` shows it as ``last_report``).
    """
    skipped = report.get("skipped", [])
    if len(skipped) <= keep:
        return report
    return {**report, "skipped": skipped[:keep], "skipped_total": len(skipped)}


@app.task(name="factory.loop.finish", bind=True)
def finish(self, run_id: str) -> dict[str, Any]:
    """End the run: heartbeat idle, loop lease released."""
    f = factory()
    if f.control.is_revoked(self.request.id):
        return {"run_id": run_id, "finished": False}
    return {"run_id": run_id, "finished": loop.finish_run(f, run_id)}


@app.task(name="factory.agent.run", bind=True)
def agent_run(self, issue_id: str, token: str, run_id: str | None = None,
              issue: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the agent for one claimed issue and settle the claim by its token."""
    data = issue or {"id": issue_id, "title": "", "state": "ready"}
    return dispatch.execute(factory(), self.request.id, data, token, run_id, hostname=self.request.hostname)
