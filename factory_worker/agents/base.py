"""The AgentRunner protocol and the result of running an agent for one dispatch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from factory_worker.agents.usage import UsageReport
from factory_worker.sources.base import Issue


@dataclass(frozen=True)
class AgentResult:
    outcome: str  # an Outcome word (factory_worker.ledger.states)
    exit_code: int | None
    duration_s: float
    log_path: Path | None
    error: str = ""
    #: the attempt's usage lines summed (``FACTORY_USAGE``: :class:`~factory_worker.agents.usage.Usage`)
    usage: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass
class Dispatch:
    """What an agent run needs to know about its claim."""

    issue: Issue
    token: str
    dispatch_id: str  # the agent task id; names the log file
    #: variables the factory adds to the agent's environment for this dispatch (e.g. ``FACTORY_INBOX``)
    env: dict[str, str] = field(default_factory=dict)
    #: a stage's own argv and timeout (default: ``agent.command`` / ``agent.timeout_s``)
    command: list[str] | None = None
    timeout_s: float | None = None
    #: the attempt's shared directory (staged dispatch: made and removed by the caller), else a fresh one
    workdir: Path | None = None
    #: sends each usage line to the ledger and says when a budget stops the agent (None: only summed here)
    report: UsageReport | None = None


class AgentRunner(Protocol):
    def run(
        self,
        dispatch: Dispatch,
        renew: Callable[[], object],
        should_stop: Callable[[], str | None],
        on_start: Callable[[int], None] | None = None,
    ) -> AgentResult:
        """Run the agent to completion.

        ``renew()`` is called every renewal interval while the agent runs; if it raises
        ``StaleClaimError`` the agent's process group is stopped and the outcome is ``lease-lost``.
        ``should_stop()`` is polled as often; a non-None reason stops the agent (outcome ``interrupted``).
        ``on_start(pid)`` is called once the subprocess exists (its pid is also its process group id).
        """
        ...
