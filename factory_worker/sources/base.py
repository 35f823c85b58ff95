"""The IssueSource protocol and the Issue model every source produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field


class Issue(BaseModel):
    """A work item. ``id``, ``title`` and ``state`` are required; text fields are untrusted input."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")  # no control characters
    title: str
    state: str
    body: str = ""
    labels: list[str] = Field(default_factory=list)
    updated_at: str | None = None

    def as_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


@dataclass
class PollResult:
    """What one poll found: the ready issues and one line per problem (``file:line: reason``)."""

    issues: list[Issue] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: total items seen (ready or not), for reporting
    seen: int = 0


class SourceError(Exception):
    """The source as a whole is unavailable (missing file, HTTP failure): the iteration fails."""


@runtime_checkable
class IssueSource(Protocol):
    """Anything with ``poll()`` returning the ready issues; ``get(id)`` finds one issue by id or None."""

    def poll(self) -> PollResult: ...

    def get(self, issue_id: str) -> Issue | None: ...
