"""One dispatch as a worker's task holds it: :class:`Job`, the one value every step of its life is given.

A ``factory.agent.run`` task is a job without a step; a ``factory.agent.stage`` task is a job of one step
(``stage``, ``step``) of a staged attempt. The message's issue stays the dict it came as until the job needs
the :class:`~factory_worker.sources.base.Issue` (:attr:`Job.issue`, validated after ``begin``: a malformed
body is a failed attempt, not a task that dies with its claim held).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from factory_worker.agents import AgentRunner
from factory_worker.context import Context
from factory_worker.loop.iteration import Sender
from factory_worker.sources.base import Issue

log = logging.getLogger(__name__)

#: Sends one ``factory.agent.stage`` task: (task_id, issue, token, stage, step, run_id) -> None; raises on failure.
StageSender = Callable[[str, Issue, str, str, int, "str | None"], None]


def message_issue(issue_id: str, body: dict[str, Any] | None) -> dict[str, Any]:
    """The issue an agent or stage task's message carries: its body, else (a message sent without one) the id
    from its arguments."""
    return body or {"id": issue_id, "title": "", "state": "ready"}


@dataclass(frozen=True)
class Job:
    """One agent task (``step`` 0) or stage task (``stage``, ``step`` >= 1) of a claim, on this worker.

    ``send`` refills the slot the job frees from the backlog once its claim is settled; ``send_stage`` sends
    the next stage task (a staged dispatch); ``began`` is called once ``begin`` (a stage: its start) answered,
    whatever it said (a RabbitMQ worker acknowledges the task's message then). ``runner`` defaults to the
    configured command agent."""

    ctx: Context
    task_id: str
    data: dict[str, Any]  # the message's issue (see :func:`message_issue`)
    token: str
    run_id: str | None = None
    hostname: str = field(default_factory=socket.gethostname)
    runner: AgentRunner | None = None
    send: Sender | None = None
    send_stage: StageSender | None = None
    began: Callable[[], None] | None = None
    stage: str = ""
    step: int = 0

    def __post_init__(self) -> None:
        if not self.hostname:  # a Celery request without one
            object.__setattr__(self, "hostname", socket.gethostname())

    def begun(self) -> None:
        """``begin`` answered: tell the worker (:attr:`began`); a failure here never stops the dispatch."""
        if self.began is not None:
            try:
                self.began()
            except Exception:
                log.warning("%s: could not acknowledge its message at begin", self.label, exc_info=True)

    @cached_property
    def issue_id(self) -> str:
        """The issue's id as the message gives it ("" when the message is malformed)."""
        return str(self.data.get("id", "")) if isinstance(self.data, dict) else ""

    @cached_property
    def issue(self) -> Issue:
        """The message's issue, validated (raises ``pydantic.ValidationError`` on a malformed body)."""
        return Issue.model_validate(self.data)

    @property
    def staged(self) -> bool:
        """A stage task (one step of a staged attempt)."""
        return self.step > 0

    @property
    def label(self) -> str:
        """How the logs name this task."""
        if self.staged:
            return f"stage task {self.task_id} ({self.stage} of {self.issue_id})"
        return f"agent task {self.task_id} for {self.issue_id}"

    def result(self) -> dict[str, Any]:
        """The start of the task's result: which issue and task (and, for a stage, which step)."""
        out: dict[str, Any] = {"issue": self.issue_id, "task_id": self.task_id}
        if self.staged:
            out.update(stage=self.stage, step=self.step)
        return out
