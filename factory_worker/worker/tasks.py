"""The Celery tasks: thin views over :mod:`factory_worker.loop` and :mod:`factory_worker.dispatch`.

``factory.loop.kickoff`` -> chain of ``factory.loop.iteration`` x N -> ``factory.loop.finish``;
``factory.agent.run`` runs one agent for one claim (or, staged, hands the claim over to its
``factory.agent.stage`` tasks, each sending the next). Tasks are ``shared_task`` s (they never import the
app: ``app.py`` imports them), take their context from :func:`factory_worker.context.current`, and never
name a queue: ``task_routes`` in ``app.py`` does.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from celery import chain, shared_task, states
from celery.backends.base import DisabledBackend
from celery.exceptions import Ignore

from factory_worker.agents.logs import last_lines
from factory_worker.context import current
from factory_worker.dispatch.decisions import read_output
from factory_worker.dispatch.job import Job, message_issue
from factory_worker.dispatch.single import execute
from factory_worker.dispatch.staged import run_stage
from factory_worker.ledger.core import Claim, fence_of
from factory_worker.ledger.keys import Keys
from factory_worker.ledger.states import Outcome, Settled
from factory_worker.loop import iteration as loop
from factory_worker.loop.control import Kickoff
from factory_worker.sources.base import Issue
from factory_worker.worker import acks

log = logging.getLogger(__name__)


def send_agent(task_id: str, issue: Issue, claim: Claim, run_id: str | None, producer: Any = None) -> None:
    """Send one ``factory.agent.run``; Flower shows the issue id, never the token or the issue body."""
    agent_run.apply_async(
        producer=producer,
        args=[issue.id, claim.token, run_id],
        kwargs={"issue": issue.as_json_dict()},
        task_id=task_id,
        argsrepr=repr([issue.id, f"fence={claim.fence}", run_id]),
        kwargsrepr="{}",
    )


def send_stage(
    task_id: str, issue: Issue, token: str, stage: str, step: int, run_id: str | None, producer: Any = None
) -> None:
    """Send one ``factory.agent.stage``; Flower shows the issue id, the stage and its step, never the token or
    the issue body."""
    agent_stage.apply_async(
        producer=producer,
        args=[issue.id, stage, step, token, run_id],
        kwargs={"issue": issue.as_json_dict()},
        task_id=task_id,
        argsrepr=repr([issue.id, stage, f"step={step}", f"fence={fence_of(token)}", run_id]),
        kwargsrepr="{}",
    )


def send_run(kick: Kickoff, gap_s: float) -> None:
    """Send a run's chain: ``iteration`` x N (the first now, the next ``gap_s`` apart), then ``finish``."""
    ids, run_id = kick.task_ids, kick.run_id
    n = len(ids) - 1
    steps = [iteration.si(run_id, i).set(task_id=ids[i], countdown=gap_s if i else None) for i in range(n)]
    steps.append(finish.si(run_id).set(task_id=ids[-1]))
    chain(*steps).apply_async()


def start_run(max_iterations: int | None = None, by: str = "beat", clear_kill: bool = False) -> Kickoff:
    """Start a run and send its chain (overlap policy SKIP). Shared by beat's kickoff and start-loop."""
    return loop.start_run(current(), send_run, max_iterations, by=by, clear_kill=clear_kill)


@shared_task(name="factory.loop.kickoff", bind=True, send_events=False)
def kickoff(self, max_iterations: int | None = None, by: str = "beat") -> dict[str, Any]:
    """Start a run unless one is live or the loop is killed (each a counted no-op); a paused loop's runs
    claim nothing."""
    return start_run(max_iterations, by=by).as_dict()


@shared_task(name="factory.loop.iteration", bind=True, send_events=False)
def iteration(self, run_id: str, index: int) -> dict[str, Any]:
    """Poll, gate through the ledger, dispatch agents; stops the chain when the run must end."""
    with self.app.producer_or_acquire() as producer:  # one producer for every agent message of the batch
        send = functools.partial(send_agent, producer=producer)
        report, go_on = loop.run_iteration(
            current(), send, run_id, index, task_id=self.request.id, worker=self.request.hostname
        )
    if not go_on:
        # End the chain here. Celery sends the rest of a chain from ``request.chain`` after the task
        # returns; emptying it is how Celery's maintainers say to stop a chain (celery/celery#3550) and
        # what ``Task.replace`` does itself. Should that ever change, nothing breaks: every later iteration
        # checks the run's status first and stops, and ``finish`` ends an already ended run as a no-op.
        self.request.chain = None
    return summary(report.as_dict())


def summary(report: dict[str, Any], keep: int = 20) -> dict[str, Any]:
    """The report as a task result (logged by Celery, shown by Flower): the first ``keep`` skips only."""
    skipped = report.get("skipped", [])
    if len(skipped) <= keep:
        return report
    return {**report, "skipped": skipped[:keep], "skipped_total": len(skipped)}


@shared_task(name="factory.loop.finish", bind=True, send_events=False)
def finish(self, run_id: str) -> dict[str, Any]:
    """End the run: heartbeat idle, loop lease released."""
    ctx = current()
    if ctx.control.is_revoked(self.request.id):
        return {"run_id": run_id, "finished": False}
    return {"run_id": run_id, "finished": loop.finish_run(ctx, run_id)}


class AgentFailed(Exception):
    """An agent failed, timed out or was parked: the task ends in FAILURE (the ledger is already settled)."""


#: Agent tasks' worker-side request: acknowledged at begin on RabbitMQ (:mod:`factory_worker.worker.acks`).
AGENT_REQUEST = "factory_worker.worker.acks:BeginAckRequest"


@shared_task(name="factory.agent.run", bind=True, throws=(AgentFailed,), Request=AGENT_REQUEST)
def agent_run(
    self, issue_id: str, token: str, run_id: str | None = None, issue: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run the agent for one claimed issue and settle the claim by its token.

    Flower tells the truth: an agent that failed, timed out or was parked ends the task in FAILURE with
    the reason as its exception text, raised only after the ledger is settled (never a Celery retry: the
    ledger's backoff decides); done -> SUCCESS. ``throws`` keeps it one log line, no traceback.
    """
    return _truthful(self, execute(_job(self.request, issue_id, token, run_id, issue)))


def _job(request: Any, issue_id: str, token: str, run_id: str | None, issue: Any, **step: Any) -> Job:
    """The dispatch an agent or stage task's message carries, on this worker (which refills and hands over
    by sending tasks)."""
    data = message_issue(issue_id, issue)
    began = functools.partial(acks.started, request.id)
    return Job(
        current(),
        request.id,
        data,
        token,
        run_id,
        request.hostname,
        send=send_agent,
        send_stage=send_stage,
        began=began,
        **step,
    )


def _truthful(task: Any, result: dict[str, Any]) -> dict[str, Any]:
    """The task's end as Flower shows it, once the ledger is settled: FAILURE (an :class:`AgentFailed` whose text
    ends with the agent's last output lines, escaped and capped: :func:`~factory_worker.agents.logs.last_lines`),
    REVOKED for an interrupted agent (kill-loop --release-agents, a worker's shutdown: its claim was released
    with no attempt counted), else SUCCESS with the result."""
    if result.get("settled") in (Settled.BACKOFF, Settled.PARKED):
        why = result.get("error") or result.get("outcome")
        text = f"issue {result.get('issue')}: {result.get('outcome')} -> {result['settled']}: {why}"
        tail = last_lines(read_output(Path(result["log"]), Keys.FEEDBACK_MAX_BYTES)) if result.get("log") else ""
        raise AgentFailed(f"{text}\n--- the agent's last output lines ---\n{tail}" if tail else text)
    if result.get("outcome") == Outcome.INTERRUPTED and result.get("settled") == Settled.RELEASED:
        _revoked(task, result)
    return result


def _revoked(task: Any, result: dict[str, Any]) -> None:
    """End the task as REVOKED, not SUCCESS: the event Flower reads (``task-revoked``, with the reason), the
    state in a result backend if one is configured, then :class:`~celery.exceptions.Ignore` (no
    ``task-succeeded`` follows)."""
    reason = f"issue {result.get('issue')}: interrupted -> released: {result.get('error') or 'interrupted'}"
    log.info("%s", reason)
    try:
        task.send_event("task-revoked", terminated=True, signum=None, expired=False, reason=reason)
    except Exception:
        log.warning("could not send the task-revoked event of %s", task.request.id, exc_info=True)
    if not isinstance(task.backend, DisabledBackend):
        task.update_state(state=states.REVOKED, meta={"exc_type": "Interrupted", "exc_message": [reason], **result})
    raise Ignore()


@shared_task(name="factory.agent.stage", bind=True, throws=(AgentFailed,), Request=AGENT_REQUEST)
def agent_stage(
    self,
    issue_id: str,
    stage: str,
    step: int,
    token: str,
    run_id: str | None = None,
    issue: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one stage (step ``step``) of a staged dispatch and hand over to the next, or settle the claim.

    Like ``factory.agent.run``: FAILURE when the attempt failed or was parked (escalated), after the ledger
    is settled; a stage that hands over (a rejection included) is a SUCCESS naming the next stage."""
    return _truthful(self, run_stage(_job(self.request, issue_id, token, run_id, issue, stage=stage, step=int(step))))
