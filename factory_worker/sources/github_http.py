"""HTTP helpers of the GitHub source: how long a rate-limit reply may make it wait, and its page cache.

Both bound what a server reply can do to us: a ``Retry-After`` of ``inf``, a year, a date in 2999 or
garbage never stops the source for longer than ``source.github_max_retry_after_s`` (so it never needs a
restart), and the ETag cache holds the pages of the latest poll only, however the server's page links
change from one poll to the next.
"""

from __future__ import annotations

import email.utils
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

#: Wait after a rate-limit reply that says nothing usable about how long (seconds, before the cap).
DEFAULT_RETRY_S = 60.0


def origin(url: str) -> tuple[str, str]:
    """``(scheme, host:port)`` of ``url``, lowercased: a pagination link must keep the API's."""
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seconds(value: str, now: float, parse: Callable[[str, float], float]) -> float | None:
    """``parse(value, now)`` as a wait in seconds; None when unusable (garbage, NaN, a negative delay)."""
    try:
        wait = parse(value.strip(), now)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    if math.isnan(wait):
        return None
    return wait


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


def _epoch(value: str, now: float, unit_s: float = 1.0) -> float:
    """``X-RateLimit-Reset``: the epoch time the window resets, in ``unit_s`` (one in the past means now)."""
    reset = float(value)
    if reset < 0 or math.isnan(reset):
        raise ValueError("not an epoch time")
    return max(0.0, reset * unit_s - now)


def retry_wait_s(
    headers: Any,
    now: float,
    cap: float,
    default: float = DEFAULT_RETRY_S,
    reset_header: str = "x-ratelimit-reset",
    reset_unit_s: float = 1.0,
) -> float:
    """Seconds to wait before the next request, always within ``[0, cap]``.

    ``Retry-After`` (delay seconds or an HTTP date), else ``reset_header`` (an epoch time in ``reset_unit_s``:
    GitHub's ``X-RateLimit-Reset`` in seconds, Linear's ``X-RateLimit-Requests-Reset`` in milliseconds), else
    ``default``. A header that is not usable (garbage, ``nan``, a negative delay, a date without a zone)
    is ignored, so the next one applies; ``inf`` and huge values are cut to ``cap``."""
    wait = None
    retry_after, reset = headers.get("retry-after"), headers.get(reset_header)
    if retry_after:
        wait = _seconds(retry_after, now, _delta_or_date)
    if wait is None and reset:
        wait = _seconds(reset, now, lambda v, n: _epoch(v, n, reset_unit_s))
    if wait is None:
        wait = default
    if wait > cap:
        log.info("rate-limit wait of %s s cut to %s s (the source's max_retry_after_s)", wait, cap)
    return min(max(wait, 0.0), cap)


class Page(NamedTuple):
    """One cached page: its ETag, its JSON payload and its ``next`` link."""

    etag: str
    payload: Any
    next_url: str | None


class PageCache:
    """ETag and payload per page URL, for conditional requests; keeps only the pages the latest poll used.

    A poll calls :meth:`begin_poll`, reads and stores pages, then :meth:`end_poll`. After a complete poll
    every page it did not touch is evicted, so the cache holds at most the pages of one poll
    (``MAX_PAGES``) even when the server's page links change every time (a cursor in the URL). A poll cut
    short (rate limit, HTTP error) also keeps the last complete poll's pages, whose ETags the next poll
    wants: at most two polls' pages. Not thread-safe: the source holds a lock around a poll."""

    def __init__(self) -> None:
        self._pages: dict[str, Page] = {}
        self._touched: set[str] | None = None
        self._last_complete: set[str] = set()

    def __len__(self) -> int:
        return len(self._pages)

    def _touch(self, url: str) -> None:
        if self._touched is not None:
            self._touched.add(url)

    def get(self, url: str) -> Page | None:
        self._touch(url)
        return self._pages.get(url)

    def put(self, url: str, page: Page) -> None:
        self._touch(url)
        self._pages[url] = page

    def drop(self, url: str) -> None:
        self._pages.pop(url, None)

    def begin_poll(self) -> None:
        self._touched = set()

    def end_poll(self, complete: bool) -> None:
        """Evict the pages this poll did not touch (and, after a poll cut short, not the last complete one)."""
        touched, self._touched = self._touched or set(), None
        if complete:
            self._last_complete = touched
            keep = touched
        else:
            keep = touched | self._last_complete
        for url in [u for u in self._pages if u not in keep]:
            del self._pages[url]
