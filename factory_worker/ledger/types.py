"""What the ledger answers with (claims, skips, explanations, failed attempts) and what may ride along with a
settle (:class:`Rider`); :mod:`.ledger` re-exports them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from factory_worker.ledger.states import Gate

#: Skip reasons that mean "ready, waiting for room" (a freed slot refills from them: ``loop.refill``).
WAITING = (Gate.NO_FREE_SLOT, Gate.MAX_IN_FLIGHT)


def fence_of(token: str) -> int:
    """The fencing number inside a token ``"<fence>:<owner>"``."""
    fence = fence_in(token)
    if fence is None:
        raise ValueError(f"malformed dispatch token {token!r}")
    return fence


def fence_in(value: str | None) -> int | None:
    """The fence at the head of ``value`` (a token, or a done marker ``<fence>:<completed_ms>``); None when it
    has none (missing or malformed): for readers that show or check what is stored, never for a write."""
    head = (value or "").partition(":")[0]
    # ASCII digits only ("²".isdigit() is True, int() refuses it), and no more than a 64-bit counter holds
    if not (head.isascii() and head.isdigit() and len(head) <= 19):
        return None
    fence = int(head)
    return fence if fence <= 2**63 - 1 else None


@dataclass(frozen=True)
class Claim:
    issue: str
    token: str
    fence: int


@dataclass(frozen=True)
class Skip:
    issue: str
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClaimBatch:
    """The gate's answer for a batch. In a dry run ``claims`` are what would be claimed (token ``""``)."""

    claims: list[Claim] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    dry_run: bool = False
    fleet_slots: bool = False
    #: issues not gated: enough were waiting for room already (``claim(enough_waiting=...)``)
    unexamined: int = 0


@dataclass(frozen=True)
class FailResult:
    issue: str
    state: str  # "backoff" | "parked"
    attempts: int
    until_ms: int  # end of the backoff window, or the time it was parked


@dataclass(frozen=True)
class Explanation:
    issue: str
    state: str  # a Gate word: done | in-flight | parked | backoff | max-in-flight | killed | paused | claimable
    text: str
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Rider:
    """Commands that ride in a settle's round trip, after its script: an agent task's clean-up and its
    refill's first backlog pop (``agent_task``). ``queue(pipe)`` adds them. ``sent`` is True once they may
    have run (never sent twice); ``replies`` holds their replies (errors as values), empty when the round
    trip's answer was lost."""

    def __init__(self, queue: Callable[[Any], Any]) -> None:
        self.queue = queue
        self.sent = False
        self.replies: list[Any] = []
