"""A small client of Linear's GraphQL API, shared by the Linear source and the Linear writer.

One POST per operation to ``source.linear.api_url`` with ``{"query", "variables"}``, the API key in
``Authorization`` (never logged, never in an error). What Linear documents and this client maps:

- ``200`` with ``data``: the answer. ``200`` (or ``400``) with ``errors``: the first error's message; an
  error whose ``extensions.code`` is ``RATELIMITED`` is a rate limit, one whose ``extensions.type`` or code
  says the entity was not found (``InvalidInput``/``Entity not found``) is permanent.
- ``429``, or ``RATELIMITED``: wait for ``Retry-After`` (s or an HTTP date), else
  ``X-RateLimit-Requests-Reset`` / ``X-RateLimit-Complexity-Reset`` (epoch ms) of a spent budget, else 60 s,
  capped at ``max_retry_after_s`` (the one reader, :func:`factory_worker.net.retry_wait_s`); until then
  :meth:`LinearAPI.call` raises without sending.
- ``401``/``403``: the key is missing, wrong or lacks access (not permanent: the operator can fix it).
- ``5xx``, timeouts and connection errors: :class:`LinearError`, retried by the caller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from factory_worker.net import LINEAR_RESETS, HttpError, retry_wait_s

log = logging.getLogger(__name__)

USER_AGENT = "factory-worker"
DEFAULT_WAIT_S = 60.0
#: Linear's workflow-state types of an open issue. Every other type ends it (``completed``, ``canceled``,
#: ``duplicate``, and any type Linear adds): never ready, never moved by write-back.
OPEN_TYPES = ("triage", "backlog", "unstarted", "started")


def is_open(state_type: object) -> bool:
    """Whether a workflow state of this type leaves the issue open (a missing or unknown type: closed)."""
    return state_type in OPEN_TYPES


class LinearError(HttpError):
    """A call failed. ``retry_after``: Linear asked for this wait (s); ``permanent``: retrying cannot help."""


class LinearAPI:
    """Calls one GraphQL endpoint with one key; holds off every call while a rate limit lasts."""

    def __init__(
        self,
        api_url: str,
        token: str | None,
        timeout_s: float = 10.0,
        max_retry_after_s: float = 300.0,
        client: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api_url, self.max_retry_after_s, self.clock = api_url, max_retry_after_s, clock
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if token:
            headers["Authorization"] = token
        self.http = client or httpx.Client(headers=headers, timeout=timeout_s, follow_redirects=False)
        self._lock = threading.Lock()
        self._not_before = 0.0

    def __repr__(self) -> str:  # never the key
        return f"LinearAPI({self.api_url!r})"

    def call(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """``data`` of one operation, or :class:`LinearError` (one line, no key)."""
        op = _operation(query)
        with self._lock:
            left = self._not_before - self.clock()
        if left > 0:
            raise LinearError(f"linear {op}: rate limited, next call in {left:.0f}s", retry_after=left)
        try:
            resp = self.http.post(self.api_url, json={"query": query, "variables": variables or {}})
        except httpx.HTTPError as exc:
            raise LinearError(f"linear {op}: {type(exc).__name__}") from None
        body = _json(resp)
        errors = body.get("errors") if isinstance(body, dict) else None
        errors = (
            [e if isinstance(e, dict) else {} for e in errors] if isinstance(errors, list) else ([{}] if errors else [])
        )  # a malformed reply's errors still fail the call, in one line
        codes = {str(_obj(e.get("extensions")).get("code", "")).upper() for e in errors}
        if resp.status_code == 429 or "RATELIMITED" in codes:
            wait = retry_wait_s(resp.headers, self.clock(), self.max_retry_after_s, DEFAULT_WAIT_S, LINEAR_RESETS)
            with self._lock:
                self._not_before = max(self._not_before, self.clock() + wait)
            log.warning("linear %s: rate limited; holding off %.0fs", op, wait)
            raise LinearError(
                f"linear {op}: rate limited (HTTP {resp.status_code}), retry in {wait:.0f}s",
                retry_after=wait,
                status=resp.status_code,
            )
        if errors:
            first = errors[0]
            message = (str(first.get("message") or "").strip()[:200].splitlines() or ["error"])[0]
            ext = _obj(first.get("extensions"))
            gone = "not found" in message.lower() or str(ext.get("type", "")).lower() == "invalid input"
            raise LinearError(
                f"linear {op}: HTTP {resp.status_code}: {message}", permanent=gone, status=resp.status_code
            )
        if resp.status_code >= 300:
            raise LinearError(f"linear {op}: HTTP {resp.status_code}", status=resp.status_code)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict):
            raise LinearError(f"linear {op}: HTTP {resp.status_code}: no data in the reply", status=resp.status_code)
        return data


def _operation(query: str) -> str:
    """``query Issues(...)`` -> ``Issues``: names a call in errors and logs."""
    words = query.split(None, 2)
    return words[1].split("(")[0] if len(words) > 1 else "call"


def _json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
        return None


def _obj(value: Any) -> dict[str, Any]:
    """``value`` when it is an object, else ``{}``: a reply's envelope of the wrong shape is read as empty."""
    return value if isinstance(value, dict) else {}
