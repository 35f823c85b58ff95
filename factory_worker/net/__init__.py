"""net/: the one HTTP edge every client of a service goes through (the GitHub source, writer and pull
requests, Linear's API, Slack's Web API, the webhook notifier): the error a call raises
(:class:`HttpError`: ``retry_after``, ``permanent``, ``status``), how long a reply asks us to wait
(:func:`retry_after_s` / :func:`retry_wait_s`: ``Retry-After`` as seconds or an HTTP date, else a service's
epoch reset headers; always within the caller's cap, whatever the reply says), and the one backoff
(:class:`Backoff`: exponential, capped, optionally jittered, never sooner than the server asked).

It decides nothing about a service's answers (which status is permanent, what is a rate limit): each client
does; so it holds no client and imports no HTTP library.

May import: nothing of ours (the standard library only).
"""

from __future__ import annotations

from factory_worker.net.backoff import Backoff, Jitter
from factory_worker.net.errors import HttpError
from factory_worker.net.retry_after import (
    DEFAULT_RETRY_S,
    GITHUB_RESETS,
    LINEAR_RESETS,
    ResetHeader,
    retry_after_s,
    retry_wait_s,
)

__all__ = [
    "DEFAULT_RETRY_S",
    "GITHUB_RESETS",
    "LINEAR_RESETS",
    "Backoff",
    "HttpError",
    "Jitter",
    "ResetHeader",
    "retry_after_s",
    "retry_wait_s",
]
