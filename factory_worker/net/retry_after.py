"""How long a reply asks us to wait before the next request: one reader for every service, always within the
caller's cap.

Read in this order; the first usable one wins:

1. ``Retry-After`` (RFC 9110): delay seconds, or an HTTP date (one in the past means now);
2. the service's epoch reset headers (:class:`ResetHeader`: GitHub's ``X-RateLimit-Reset`` in epoch seconds,
   Linear's ``X-RateLimit-Requests-Reset`` / ``X-RateLimit-Complexity-Reset`` in epoch ms), each only for a
   window that is spent (its remaining-count header says 0, or is absent); of several, the latest reset;
3. nothing usable: None from :func:`retry_after_s` (the caller's own backoff applies), ``default`` (60 s)
   from :func:`retry_wait_s`.

A value that is not usable (garbage, ``nan``, a negative delay, a date without a zone, an epoch time below 0)
is passed over, so the next one applies; ``inf``, huge numbers and far-off dates are cut to the cap: no
reply can stop a client for longer than its cap (so none needs a restart). Nothing here raises.
"""

from __future__ import annotations

import email.utils
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

log = logging.getLogger(__name__)

#: Wait after a rate-limit reply that says nothing usable about how long (seconds, before the cap); GitHub
#: documents "at least one minute" for this case.
DEFAULT_RETRY_S = 60.0


@dataclass(frozen=True)
class ResetHeader:
    """A rate-limit window's reset header: the epoch time ``name`` (in units of ``unit_s`` seconds) at which
    the window refills; it applies while ``remaining`` (when the reply has it) says no request is left."""

    name: str
    unit_s: float = 1.0
    remaining: str | None = None


#: GitHub's primary rate limit (REST): epoch seconds.
GITHUB_RESETS = (ResetHeader("x-ratelimit-reset", 1.0, "x-ratelimit-remaining"),)
#: Linear's request and complexity budgets: epoch milliseconds.
LINEAR_RESETS = (
    ResetHeader("x-ratelimit-requests-reset", 0.001, "x-ratelimit-requests-remaining"),
    ResetHeader("x-ratelimit-complexity-reset", 0.001, "x-ratelimit-complexity-remaining"),
)


def retry_after_s(
    headers: Mapping[str, str], now: float, cap: float, resets: Sequence[ResetHeader] = ()
) -> float | None:
    """The wait (s) the reply asks for, within ``[0, cap]``; None when it asks for none usable.
    ``headers``: a case-insensitive mapping (``httpx.Headers``) or one with lowercase names."""
    wait = _asked_s(headers, now, resets)
    return None if wait is None else _capped(wait, cap)


def retry_wait_s(
    headers: Mapping[str, str],
    now: float,
    cap: float,
    default: float = DEFAULT_RETRY_S,
    resets: Sequence[ResetHeader] = (),
) -> float:
    """Seconds to wait before the next request after a rate-limit reply, always within ``[0, cap]``:
    what the reply asks for (:func:`retry_after_s`), else ``default``."""
    wait = _asked_s(headers, now, resets)
    return _capped(default if wait is None else wait, cap)


def _capped(wait: float, cap: float) -> float:
    cap = max(0.0, cap)
    if wait > cap:
        log.info("rate-limit wait of %s s cut to %s s (the client's cap)", wait, cap)
    return float(min(max(wait, 0.0), cap))


def _asked_s(headers: Mapping[str, str], now: float, resets: Sequence[ResetHeader]) -> float | None:
    retry_after = headers.get("retry-after")
    if retry_after:
        wait = _parse(retry_after, now, _delta_or_date)
        if wait is not None:
            return wait
    waits = []
    for reset in resets:
        value = headers.get(reset.name)
        if value and _spent(headers.get(reset.remaining) if reset.remaining else None):
            waits.append(_parse(value, now, partial(_epoch, unit_s=reset.unit_s)))
    usable = [w for w in waits if w is not None]
    return max(usable) if usable else None


def _spent(remaining: str | None) -> bool:
    """A window is spent unless its remaining-count header says requests are left (absent, garbage: spent)."""
    try:
        return not float(str(remaining)) > 0
    except ValueError:
        return True


def _parse(value: object, now: float, parse: Callable[[str, float], float]) -> float | None:
    """``parse(value, now)`` as a wait in seconds; None when unusable (garbage, NaN, a negative delay)."""
    try:
        wait = parse(str(value).strip(), now)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return None if math.isnan(wait) else wait


def _delta_or_date(value: str, now: float) -> float:
    """``Retry-After``: delay seconds (not negative) or an HTTP date (one in the past means now)."""
    try:
        delay = float(value)
    except ValueError:
        date = email.utils.parsedate_to_datetime(value)  # ValueError/TypeError when it is not a date
        if date.tzinfo is None:
            raise ValueError("a date without a zone") from None
        return max(0.0, date.timestamp() - now)
    if delay < 0:
        raise ValueError("a negative delay")
    return delay


def _epoch(value: str, now: float, unit_s: float) -> float:
    """A reset header: the epoch time the window refills, in ``unit_s`` (one in the past means now)."""
    reset = float(value)
    if reset < 0 or math.isnan(reset):
        raise ValueError("not an epoch time")
    return max(0.0, reset * unit_s - now)
