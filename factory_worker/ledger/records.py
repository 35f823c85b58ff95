"""Records as Redis returns them, parsed the same way by every reader: run records, counters, gauges, the
guard's identity, presence values, ``TIME`` replies. Replies may come from redis-py or from the CLI's own
socket (:mod:`factory_worker.cli.quick`): bytes or text, flat lists or dicts. Standard library only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from factory_worker.ledger.keys import Keys

COUNTERS = ("claimed", "deduped", "backed_off", "parked", "completed", "released")
RUN_INTS = ("max_iterations", "iterations_done", "failures", "consecutive_failures", "started_ms", "finished_ms")
SCAN_COUNT = 500


def text(value: Any) -> Any:
    """A reply as text: bytes decoded (bad UTF-8 replaced), lists and dicts decoded inside, the rest as is."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [text(v) for v in value]
    if isinstance(value, dict):
        return {text(k): text(v) for k, v in value.items()}
    return value


def as_dict(flat: Any) -> dict[str, str]:
    """An ``HGETALL`` reply (a flat list, or redis-py's dict) as a dict of text."""
    if isinstance(flat, dict):
        return text(flat)
    items = text(flat or [])
    return dict(zip(items[::2], items[1::2]))


#: What a reader shows for a stored number that is not one (see :func:`number`).
INVALID = "invalid"
#: Redis's integers are 64-bit: nothing the factory counts, scores or stamps is larger.
INT_MAX = 2**63 - 1
_NUMBER_CHARS = 32


def number(v: Any) -> int | None:
    """A stored number (a reply: bytes, str, int or float) as an int when it is a finite number within Redis's
    64-bit integers (``"12"``, ``" 7 "``, ``"1.5"`` -> 1, a zset score), else None: garbage, ``inf``, ``nan``,
    ``1e999``, ``9223372036854775808`` and beyond, non-ASCII digits. Never raises."""
    if isinstance(v, bytes):
        v = v.decode("ascii", "replace")
    if isinstance(v, bool):
        return None
    if isinstance(v, float):
        if not math.isfinite(v) or abs(v) > INT_MAX:
            return None
        v = int(v)
    elif isinstance(v, str):
        text = v.strip()
        if not text or len(text) > _NUMBER_CHARS or not text.isascii():
            return None
        try:
            v = int(text)
        except ValueError:
            try:
                f = float(text)
            except ValueError:
                return None
            if not math.isfinite(f) or abs(f) > INT_MAX:
                return None
            v = int(f)
    if not isinstance(v, int):
        return None
    return v if -INT_MAX - 1 <= v <= INT_MAX else None


def as_int(v: Any, default: int = 0) -> int:
    """:func:`number`, ``default`` when it is none (for arithmetic on what is stored: never raises)."""
    n = number(v)
    return default if n is None else n


def shown(v: Any, default: Any = 0) -> Any:
    """What a reader shows for a stored number: ``default`` when missing (None), the int, or :data:`INVALID`
    when something is stored that is not one."""
    if v is None:
        return default
    n = number(v)
    return INVALID if n is None else n


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(raw: Any) -> Any:
    """Stored JSON, strictly: ``NaN`` / ``Infinity`` (which Python's parser accepts) raise ValueError, so nothing
    read is printed as JSON no strict parser reads."""
    return json.loads(raw, parse_constant=_no_constant)


def raise_errors(replies: list[Any]) -> list[Any]:
    """``replies`` of a :data:`Sender`, unless one is an error reply: then that is raised."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def parse_run(raw: dict[str, str]) -> dict[str, Any] | None:
    """A run record (``control.run``) from its hash: JSON fields decoded, counts as ints."""
    if not raw:
        return None
    rec: dict[str, Any] = dict(raw)
    for name in ("task_ids", "last_report"):
        if name in rec:
            try:
                rec[name] = loads(rec[name])
            except (ValueError, RecursionError):
                pass
    for name in RUN_INTS:
        if name in rec:
            rec[name] = shown(rec[name])  # an int, or "invalid": readers do arithmetic through as_int
    return rec


def parse_counters(raw: dict[str, str]) -> dict[str, Any]:
    """The ledger counters (``ledger.counters``), the usual ones present as 0 when never counted; a value that
    is not a number is :data:`INVALID`."""
    base: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
    base.update({name: shown(v) for name, v in raw.items()})
    return base


def gauge_commands(keys: Keys, now_ms: int) -> list[tuple[Any, ...]]:
    """The commands behind :func:`parse_gauges` (``ledger.gauges`` sends the same)."""
    return [
        ("ZCOUNT", keys.inflight, Keys.live_from(now_ms), "+inf"),
        ("ZCOUNT", keys.backoff, f"({now_ms}", "+inf"),
        ("HLEN", keys.parked),
        ("GET", keys.done_count),
        ("HLEN", keys.done),
    ]


def parse_gauges(replies: Sequence[Any]) -> dict[str, Any]:
    inflight, backoff, parked, done, legacy = replies
    counted = shown(text(done))
    return {
        "in_flight": int(inflight),
        "backoff": int(backoff),
        "parked": int(parked),
        "done": counted if counted == INVALID else counted + int(legacy),
    }


def parse_guard(generation: Any, lost: dict[str, str]) -> dict[str, Any]:
    """``{generation, lost: {generation: {by, at_ms, current}}, ledger_lost}`` (``guard.status``)."""
    out = {}
    for gen, raw in lost.items():
        try:
            out[gen] = loads(raw)
        except (ValueError, RecursionError):
            out[gen] = {}
    return {"generation": text(generation), "lost": out, "ledger_lost": bool(out)}


def parse_objects(values: Sequence[Any]) -> list[dict[str, Any]]:
    """Presence values: the JSON objects among them (anything else is skipped)."""
    out = []
    for raw in values:
        try:
            rec = loads(raw) if raw else None
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def parse_workers(values: Sequence[Any]) -> list[dict[str, Any]]:
    """Worker presence values, sorted by host name (``presence.live_workers``)."""
    return sorted(parse_objects(values), key=lambda w: str(w.get("hostname", "")))


def time_ms(time_reply: Any) -> int:
    """Redis ``TIME``'s reply ``(seconds, microseconds)`` in ms."""
    sec, usec = time_reply
    return int(sec) * 1000 + int(usec) // 1000


def parse_failing(raw: dict[str, str]) -> dict[str, Any] | None:
    """The loop's failing record (``Keys.loop_failing``): since when its iterations fail, the last error."""
    if not raw:
        return None
    out: dict[str, Any] = dict(raw)
    for name in ("since_ms", "last_ms", "failures"):
        if name in out:
            out[name] = shown(out[name])
    return out


def parse_replication(reply: Any) -> dict[str, Any] | None:
    """``INFO replication``'s role and connected replicas (``{role, connected}``), from its text or redis-py's
    parsed dict; None when it is an error reply (INFO disabled) or says neither."""
    if isinstance(reply, Exception) or reply is None:
        return None
    if isinstance(reply, dict):
        fields = {str(k): v for k, v in text(reply).items()}
    else:
        fields = {}
        for line in str(text(reply)).splitlines():
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip()] = value.strip()
    if "role" not in fields and "connected_slaves" not in fields:
        return None
    return {"role": str(fields.get("role", "")), "connected": max(0, as_int(fields.get("connected_slaves")))}


def parse_steps(values: Sequence[Any]) -> list[dict[str, Any]]:
    """Stage history entries (``Keys.stage_history``): the JSON objects among ``values``, numbers checked."""
    out = []
    for rec in parse_objects(text(list(values))):
        step = {name: shown(rec.get(name)) for name in ("attempt", "step", "round", "at_ms")}
        step.update(stage=str(rec.get("stage", "")), outcome=str(rec.get("outcome", "")))
        if rec.get("error"):
            step["error"] = str(rec["error"])
        out.append(step)
    return out


def step_text(step: dict[str, Any]) -> str:
    """One kept step in a few words: ``2 review (round 1): rejected``."""
    error = f" ({step['error']})" if step.get("error") else ""
    return f"{step['step']} {step['stage']} (round {step['round']}): {step['outcome']}{error}"
