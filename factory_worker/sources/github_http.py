"""HTTP helpers of GitHub's clients (the source, the writer, the pull requests): what is a rate limit and how
long it may make them wait (the one reader of :mod:`factory_worker.net`, with GitHub's reset header), and
the source's page cache.

Both bound what a server reply can do to us: a ``Retry-After`` of ``inf``, a year, a date in 2999 or
garbage never stops the source for longer than ``source.github_max_retry_after_s`` (so it never needs a
restart), and the ETag cache holds the pages of the latest poll only, however the server's page links
change from one poll to the next.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from factory_worker import net
from factory_worker.net import DEFAULT_RETRY_S, GITHUB_RESETS

log = logging.getLogger(__name__)


def origin(url: str) -> tuple[str, str]:
    """``(scheme, host:port)`` of ``url``, lowercased: a pagination link must keep the API's."""
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rate_limited(status: int, headers: Mapping[str, str]) -> bool:
    """Whether GitHub's answer is a rate limit (primary or secondary): a 429, or a 403 that carries
    ``Retry-After`` or ``X-RateLimit-Remaining: 0``. Every GitHub client of ours (source, writer, pull
    requests) reads an answer so."""
    return status == 429 or (
        status == 403 and ("retry-after" in headers or headers.get("x-ratelimit-remaining") == "0")
    )


def retry_wait_s(headers: Mapping[str, str], now: float, cap: float, default: float = DEFAULT_RETRY_S) -> float:
    """Seconds to wait after GitHub's rate-limit answer, always within ``[0, cap]``: ``Retry-After`` (delay
    seconds or an HTTP date), else ``X-RateLimit-Reset`` (epoch seconds) while ``X-RateLimit-Remaining`` is
    0 (or absent), else ``default``; the one reader of :mod:`factory_worker.net.retry_after`."""
    return net.retry_wait_s(headers, now, cap, default, GITHUB_RESETS)


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
