"""The IssueSource protocol and the Issue model every source produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: Limits on an issue (untrusted input): nesting of any field, the title, the body, the whole item.
MAX_DEPTH = 32
MAX_TITLE_CHARS = 1_000
MAX_BODY_CHARS = 256 * 1024
MAX_ITEM_CHARS = 1024 * 1024


def _check_tree(value: Any, depth: int = 0) -> int:
    """Walk ``value`` (iteratively bounded by MAX_DEPTH); returns its size in characters, or raises
    ValueError for a depth bomb or a string that is not valid Unicode (a lone surrogate)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("contains a lone surrogate (not valid Unicode text)") from None
        return len(value)
    if isinstance(value, dict):
        return sum(_check_tree(k, depth + 1) + _check_tree(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_check_tree(v, depth + 1) for v in value)
    return 8


class Issue(BaseModel):
    """A work item. ``id``, ``title`` and ``state`` are required; text fields are untrusted input.

    Whatever validates can be handed to an agent: it is valid Unicode, at most MAX_DEPTH deep and
    MAX_ITEM_CHARS large, so it serializes to JSON for the broker and the agent's issue file."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1, max_length=256)
    title: str = Field(max_length=MAX_TITLE_CHARS)
    state: str = Field(max_length=256)
    body: str = Field(default="", max_length=MAX_BODY_CHARS)
    labels: list[str] = Field(default_factory=list, max_length=256)
    updated_at: str | None = None
    #: who opened it, as GitHub says (``OWNER``, ``MEMBER``, ``COLLABORATOR``, ``NONE``...); None when unknown
    author_association: str | None = Field(default=None, max_length=64)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
            raise ValueError("must not contain control characters")
        if v.startswith("-"):
            raise ValueError("must not start with '-' (alone in an agent's argv it would read as an option)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _untrusted(cls, data: Any) -> Any:
        if isinstance(data, dict) and _check_tree(data) > MAX_ITEM_CHARS:
            raise ValueError(f"larger than {MAX_ITEM_CHARS} characters")
        return data

    def as_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


@dataclass
class PollResult:
    """What one poll found: the ready issues and one line per problem (``file:line: reason``)."""

    issues: list[Issue] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: total items seen (ready or not), for reporting
    seen: int = 0


def validation_reason(exc: ValidationError) -> str:
    """A ValidationError as one short line: ``field: message`` for the first problem."""
    errs = exc.errors()
    first = errs[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "item"
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc}: {first.get('msg', 'invalid')}{more}"


class SourceError(Exception):
    """The source as a whole is unavailable (missing file, HTTP failure, a malformed page): the iteration fails."""


class MalformedIssue(ValueError):
    """``get(id)``: the source has this issue but it is malformed, so every poll skips it; the message is the
    reason the poll gives (``explain`` shows it)."""


@runtime_checkable
class IssueSource(Protocol):
    """Anything with ``poll()`` returning the issues in a ready state; ``get(id)`` finds one issue by id or
    None (or raises :class:`MalformedIssue` for one the polls skip as malformed). The loop applies the
    eligibility rules (``rules.py``) on top: a source need not know them.

    A poll reports each malformed item in ``PollResult.errors`` and goes on; it raises only when the source
    as a whole fails (:class:`SourceError`). The loop turns any other exception of a poll into a
    :class:`SourceError` too, so the iteration is recorded as failed and ``run-once`` says it in one line."""

    def poll(self) -> PollResult: ...

    def get(self, issue_id: str) -> Issue | None: ...
