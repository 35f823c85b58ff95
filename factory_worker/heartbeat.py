"""The loop heartbeat: a JSON value with expiry, read defensively, and its liveness.

A missing, malformed or wrongly-typed value reads as missing (never as live). Ages are measured on the
Redis server clock, so a worker's skewed clock cannot make a dead loop look live.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .keys import Keys
from .redis_client import server_now_ms

log = logging.getLogger(__name__)

Status = Literal["running", "idle", "stopping"]


class Heartbeat(BaseModel):
    """What the loop publishes about itself."""

    model_config = ConfigDict(extra="ignore", strict=True)

    run_id: str = Field(min_length=1)
    status: Status
    iteration: int = Field(ge=0)
    max_iterations: int = Field(ge=0)
    hostname: str
    pid: int
    updated_at: str
    updated_at_ms: int = Field(ge=0)


@dataclass(frozen=True)
class Liveness:
    """``state`` is live | stale | stopping | missing; ``live`` only for live."""

    state: str
    age_s: float | None
    heartbeat: Heartbeat | None

    @property
    def live(self) -> bool:
        return self.state == "live"


def make(run_id: str, status: Status, iteration: int, max_iterations: int, now_ms: int) -> Heartbeat:
    return Heartbeat(
        run_id=run_id,
        status=status,
        iteration=iteration,
        max_iterations=max_iterations,
        hostname=socket.gethostname(),
        pid=os.getpid(),
        updated_at=datetime.fromtimestamp(now_ms / 1000, tz=timezone.utc).isoformat(),
        updated_at_ms=now_ms,
    )


def write(
    r: redis.Redis, keys: Keys, run_id: str, status: Status, iteration: int, max_iterations: int, ttl_s: float
) -> Heartbeat:
    """Publish the heartbeat (timestamped by the Redis clock) with an expiry of ``ttl_s``."""
    hb = make(run_id, status, iteration, max_iterations, server_now_ms(r))
    r.set(keys.heartbeat, hb.model_dump_json(), px=max(1, int(ttl_s * 1000)))
    return hb


def parse(raw: str | bytes | None) -> Heartbeat | None:
    """A heartbeat from its stored JSON, or None when missing, malformed or wrongly typed."""
    if raw is None:
        return None
    try:
        return Heartbeat.model_validate(json.loads(raw))
    except (ValueError, TypeError, ValidationError) as exc:  # UnicodeDecodeError is a ValueError
        log.warning("malformed heartbeat treated as missing: %s", str(exc).splitlines()[0])
        return None


def _get_raw(r: redis.Redis, keys: Keys) -> bytes | None:
    """The stored bytes, undecoded: a value that is not UTF-8 must read as malformed, not crash."""
    return r.execute_command("GET", keys.heartbeat, NEVER_DECODE=True)


def read(r: redis.Redis, keys: Keys) -> Heartbeat | None:
    return parse(_get_raw(r, keys))


def liveness(hb: Heartbeat | None, now_ms: int, stale_after_s: float) -> Liveness:
    """live | stale (older than ``stale_after_s``) | stopping | missing."""
    if hb is None:
        return Liveness("missing", None, None)
    age = max(0.0, (now_ms - hb.updated_at_ms) / 1000)
    if hb.status == "stopping":
        return Liveness("stopping", age, hb)
    if age > stale_after_s:
        return Liveness("stale", age, hb)
    return Liveness("live", age, hb)


def check(r: redis.Redis, keys: Keys, stale_after_s: float) -> Liveness:
    """Read the heartbeat and judge its liveness on the server clock."""
    raw = _get_raw(r, keys)
    sec, usec = r.time()
    return liveness(parse(raw), int(sec) * 1000 + int(usec) // 1000, stale_after_s)
