"""Is a delivery really from the service, and fresh? Each check raises :class:`Refused` (status and reason)
or returns; every signature is compared in constant time (:func:`hmac.compare_digest`) on bytes.

- GitHub: ``X-Hub-Signature-256: sha256=<hex>``, the HMAC SHA-256 of the raw body with the webhook secret
  (GitHub signs no timestamp: a replay is caught by its ``X-GitHub-Delivery`` id, see :mod:`.events`).
- Linear: ``Linear-Signature: <hex>``, the HMAC SHA-256 of the raw body with the signing secret; the body's
  ``webhookTimestamp`` (ms) must be within ``webhooks.linear_max_age_s`` (60 s) of now, checked once the
  signature says the body is Linear's.
- Slack (Events API): ``X-Slack-Signature: v0=<hex>``, the HMAC SHA-256 of ``v0:<X-Slack-Request-Timestamp>:
  <body>`` with the app's signing secret; the timestamp (s) within ``webhooks.slack_max_age_s`` (5 min).

A missing or wrong signature, or a stale timestamp, is 401; a timestamp that is not a number is 400.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


class Refused(Exception):
    """The request is refused with ``status``; ``reason`` is safe to log and to answer (no secret, no body)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def hmac_hex(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison of a header (latin-1, as HTTP carries it) with what it should be."""
    return hmac.compare_digest(given.strip().encode("latin-1", "replace"), expected.encode("ascii"))


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if not value:
        raise Refused(401, f"missing {name}")
    return value


def check_github(secret: bytes, headers: Mapping[str, str], body: bytes) -> None:
    given = _header(headers, "X-Hub-Signature-256")
    if not _same(given, "sha256=" + hmac_hex(secret, body)):
        raise Refused(401, "wrong X-Hub-Signature-256")


def check_linear(secret: bytes, headers: Mapping[str, str], body: bytes) -> None:
    """The signature only: the timestamp is in the body, checked by :func:`check_linear_age` once parsed."""
    given = _header(headers, "Linear-Signature")
    if not _same(given, hmac_hex(secret, body)):
        raise Refused(401, "wrong Linear-Signature")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise Refused(400, f"{what} is not a number")
    try:
        n = float(value)
    except ValueError:
        raise Refused(400, f"{what} is not a number") from None
    if not math.isfinite(n):
        raise Refused(400, f"{what} is not a number")
    return n


def check_linear_age(payload: Mapping[str, Any], now_s: float, max_age_s: float) -> None:
    if payload.get("webhookTimestamp") is None:
        raise Refused(400, "no webhookTimestamp")
    at_s = _number(payload["webhookTimestamp"], "webhookTimestamp") / 1000.0
    if abs(now_s - at_s) > max_age_s:
        raise Refused(401, f"stale webhookTimestamp ({now_s - at_s:.0f}s old; at most {max_age_s:g}s)")


def check_slack(secret: bytes, headers: Mapping[str, str], body: bytes, now_s: float, max_age_s: float) -> None:
    stamp = _header(headers, "X-Slack-Request-Timestamp").strip()
    given = _header(headers, "X-Slack-Signature")
    at_s = _number(stamp, "X-Slack-Request-Timestamp")
    if abs(now_s - at_s) > max_age_s:
        raise Refused(401, f"stale X-Slack-Request-Timestamp ({now_s - at_s:.0f}s old; at most {max_age_s:g}s)")
    base = b"v0:" + stamp.encode("latin-1", "replace") + b":" + body
    if not _same(given, "v0=" + hmac_hex(secret, base)):
        raise Refused(401, "wrong X-Slack-Signature")


__all__ = ["Refused", "check_github", "check_linear", "check_linear_age", "check_slack", "hmac_hex"]
