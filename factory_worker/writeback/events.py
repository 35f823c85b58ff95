"""What the outbox hands a writer: an :class:`Event`, how it shows on a tracker (its comment and the marker
that makes it findable again), the :class:`Writer` protocol and the :class:`DeliveryError` a writer raises.
Shared by the outbox and both writers (GitHub, Linear)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Protocol

from factory_worker.net import HttpError


@dataclass(frozen=True)
class Event:
    """One outbox entry: ``event`` about ``issue`` by dispatch ``token`` (empty for ``retried``)."""

    id: str
    event: str
    issue: str
    token: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    #: a newer event of the same issue was handed to the writer already (this one was retried after it, see
    #: ``outbox_newest.lua``): comment, but write the labels or workflow state of ``newest``, not its own
    superseded: bool = False
    #: the name of that newer event ('' when unknown: then no labels or state are written)
    newest: str = ""
    #: read as a new entry (never handed to a writer before), and no other sender may take it over before
    #: this time (``time.monotonic()``): until then nothing of it is on the tracker but what this delivery
    #: wrote (the writer need not look for its comment); 0: unknown
    fresh_until: float = 0.0

    @property
    def fresh(self) -> bool:
        return time.monotonic() < self.fresh_until

    @property
    def dispatch_id(self) -> str:
        """The dispatch as the tracker may see it: ``<fence>-<16 hex of sha256(token)>``, stable across the
        retries of an event, unique per dispatch (also after a lost ledger restarts the fences), and not the
        token (which stays in Redis and with the agent); the entry id for an event without a dispatch."""
        if not self.token:
            return self.id
        fence = self.token.partition(":")[0]
        return f"{fence}-{hashlib.sha256(self.token.encode()).hexdigest()[:16]}"

    @property
    def shows(self) -> str:
        """The event whose labels or workflow state this delivery writes: its own, or the newer one's."""
        return self.newest if self.superseded else self.event

    @property
    def key(self) -> str:
        """What makes a delivery unique on the tracker: (dispatch id, event)."""
        return f"{self.dispatch_id}:{self.event}"

    @classmethod
    def from_entry(cls, entry_id: str, raw: dict[str, str]) -> Event:
        core = {k: raw.get(k, "") for k in ("event", "issue", "token")}
        rest = {k: v for k, v in raw.items() if k not in core}
        return cls(entry_id, core["event"], core["issue"], core["token"], rest)


class DeliveryError(HttpError):
    """A delivery failed. ``retry_after``: the tracker asked for this wait (s, within the writer's cap);
    ``permanent``: it cannot pass by retrying (the event is parked at once); ``status``: the tracker's answer."""


class Writer(Protocol):
    def deliver(self, event: Event) -> None:
        """Apply ``event`` to the tracker idempotently (the labels or state of ``event.shows``, its comment);
        :class:`DeliveryError` when it did not happen."""

    def settle(self, issue: str, event: str) -> None:
        """Write the labels or workflow state that ``event`` leaves on ``issue`` (no comment)."""


def marker(event: Event) -> str:
    return f"<!-- factory-worker:{event.key} -->"


def comment_body(event: Event) -> str:
    """The comment for ``event``: one line of facts, then the marker. Error text is the ledger's own
    (truncated, from the agent's exit), fenced so it renders as text."""
    f = event.fields
    fence = event.token.partition(":")[0] if event.token else ""
    facts = [f"**{event.event}**"]
    if fence:
        facts.append(f"dispatch {fence}")
    if f.get("attempt"):
        facts.append(f"attempt {f['attempt']}")
    if f.get("reason"):
        facts.append(f"reason: {f['reason']}")
    if f.get("no_changes"):
        facts.append("no changes")
    body = "factory-worker: " + ", ".join(facts)
    if f.get("pr_url", "").startswith(("https://", "http://")):
        body += f"\n\nPull request: {_one_line(f['pr_url'])}"
    elif f.get("branch"):
        body += f"\n\nBranch: `{_one_line(f['branch']).replace('`', '')}`"
    if f.get("summary"):
        body += "\n\n" + _quoted(f["summary"])
    if f.get("error"):
        body += "\n\n```\n" + f["error"].replace("```", "'''") + "\n```"
    return body + "\n\n" + marker(event)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


def _quoted(text: str) -> str:
    """The agent's summary as a quote, its text only: no HTML comment (a marker it wrote must not pass for one
    of ours: ``<!--`` is escaped), no line that could end the quote."""
    lines = text.replace("<!--", "&lt;!--").replace("\r", "").strip().splitlines()
    return "\n".join("> " + line for line in lines)
