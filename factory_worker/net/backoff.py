"""The one backoff of a client retrying a service: exponential, capped, optionally jittered, and never sooner
than the service asked (its ``Retry-After``, read by :mod:`.retry_after`).

The window before retry ``n`` (1: the first retry) is ``min(base_s * 2**(n-1), max_s)``, DESIGN's rule
(the ledger's own backoff of a failed attempt follows it too, inside ``fail.lua``, with its jitter added
there). Jitter (:class:`Jitter`) spreads clients that failed together: ``full`` draws the wait in
``[0, window]``, ``equal`` in ``[window/2, window]``, ``none`` keeps the window.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

#: Above this many doublings the window is ``max_s`` whatever ``base_s`` (2.0**1000 is still a float).
_MAX_DOUBLINGS = 1000


class Jitter(StrEnum):
    NONE = "none"
    FULL = "full"
    EQUAL = "equal"


@dataclass(frozen=True)
class Backoff:
    """``min(base_s * 2**(n-1), max_s)`` before retry ``n``, jittered; see the module docstring."""

    base_s: float
    max_s: float
    jitter: Jitter = Jitter.NONE

    def window_s(self, attempt: int) -> float:
        """The window before retry ``attempt`` (below 1 counts as 1), without jitter."""
        doublings = min(max(attempt - 1, 0), _MAX_DOUBLINGS)
        return max(0.0, min(self.max_s, self.base_s * 2.0**doublings))

    def wait_s(self, attempt: int, retry_after: float | None = None, rng: Callable[[], float] = random.random) -> float:
        """The wait before retry ``attempt``: the jittered window, or ``retry_after`` (what the service asked,
        already within the caller's cap) when that is longer; never beyond ``max_s``."""
        window = self.window_s(attempt)
        if self.jitter is Jitter.FULL:
            window *= rng()
        elif self.jitter is Jitter.EQUAL:
            window = window / 2 + window / 2 * rng()
        return min(max(window, retry_after or 0.0, 0.0), max(0.0, self.max_s))
