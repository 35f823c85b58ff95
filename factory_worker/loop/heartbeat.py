"""The loop heartbeat: a JSON value with expiry, read defensively, and its liveness.

A missing, malformed or wrongly-typed value reads as missing (never as live). Ages are measured on the
Redis server clock, so a worker's skewed clock cannot make a dead loop look live.

Standard library only (``redis`` is a type here, imported lazily): the CLI's early kill (:mod:`.quick`)
judges liveness with these very functions before it imports anything heavy.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from factory_worker.ledger.keys import Keys
from factory_worker.ledger.records import time_ms

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

Status = Literal["running", "idle", "stopping"]
STATUSES = ("running", "idle", "stopping")
#: ``loop.stale_after_s``'s default: a heartbeat older than this is stale.
#: The largest number a heartbeat field may hold (Redis's 64-bit integers).
MAX_INT = 2**63 - 1


@dataclass(frozen=True)
class Heartbeat:
    """What the loop publishes about itself."""

    run_id: str
    status: Status
    iteration: int
    max_iterations: int
    hostname: str
    pid: int
    updated_at: str
    updated_at_ms: int

    @classmethod
    def from_dict(cls, data: Any) -> Heartbeat:
        """Strict: every field present with its exact JSON type (a number as a string, a bool as a number,
        a negative count, a number beyond 64 bits, an empty run id or an unknown status raise ``ValueError``);
        extra fields ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"not an object: {type(data).__name__}")
        values: dict[str, Any] = {}  # typed by the checks below, field by field
        for f in fields(cls):
            if f.name not in data:
                raise ValueError(f"{f.name}: missing")
            v = data[f.name]
            want = str if f.type in ("str", "Status") else int
            if type(v) is not want:  # exactly: bool is not an int here, nor 1.5
                raise ValueError(f"{f.name}: expected {want.__name__}, got {type(v).__name__}")
            if isinstance(v, str):
                v.encode("utf-8")  # a lone surrogate ("\ud800" is valid JSON) is no text: UnicodeEncodeError
            values[f.name] = v
        if not values["run_id"]:
            raise ValueError("run_id: empty")
        if values["status"] not in STATUSES:
            raise ValueError(f"status: {values['status']!r} is not one of {', '.join(STATUSES)}")
        for name in ("iteration", "max_iterations", "updated_at_ms"):
            if values[name] < 0:
                raise ValueError(f"{name}: negative")
        for name in ("iteration", "max_iterations", "pid", "updated_at_ms"):
            if abs(values[name]) > MAX_INT:  # no clock or count is that large: ages would overflow a float
                raise ValueError(f"{name}: beyond a 64-bit integer")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":"))


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
        updated_at=datetime.fromtimestamp(now_ms / 1000, tz=UTC).isoformat(),
        updated_at_ms=now_ms,
    )


def write(
    r: redis.Redis,
    keys: Keys,
    run_id: str,
    status: Status,
    iteration: int,
    max_iterations: int,
    ttl_s: float,
    where: Heartbeat | None = None,
) -> Heartbeat:
    """Publish the heartbeat (timestamped by the Redis clock) with an expiry of ``ttl_s``; ``where``: keep its
    hostname and pid (the loop worker's, when a CLI ends the run it was running) instead of this process's."""
    hb = make(run_id, status, iteration, max_iterations, time_ms(r.time()))
    if where is not None:
        hb = replace(hb, hostname=where.hostname, pid=where.pid)
    r.set(keys.heartbeat, hb.to_json(), px=max(1, int(ttl_s * 1000)))
    return hb


def parse(raw: str | bytes | None) -> Heartbeat | None:
    """A heartbeat from its stored JSON, or None when missing, malformed or wrongly typed."""
    if raw is None:
        return None
    try:
        return Heartbeat.from_dict(json.loads(raw))
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
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


def judge(raw: str | bytes | None, time_reply: Any, stale_after_s: float) -> Liveness:
    """The liveness of a stored heartbeat ``raw`` at the server time ``time_reply`` (``TIME``'s reply): what
    every reader sends is ``GET heartbeat`` and ``TIME``."""
    return liveness(parse(raw), time_ms(time_reply), stale_after_s)


def check(r: redis.Redis, keys: Keys, stale_after_s: float) -> Liveness:
    """Read the heartbeat and judge its liveness on the server clock."""
    return judge(_get_raw(r, keys), r.time(), stale_after_s)
