"""Records as Redis returns them, parsed the same way by every reader: run records, counters, gauges, the
guard's identity, presence values, ``TIME`` replies. Replies may come from redis-py or from the CLI's own
socket (:mod:`factory_worker.cli.quick`): bytes or text, flat lists or dicts. Standard library only.
"""

from __future__ import annotations

import json
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


def as_int(v: Any, default: int = 0) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return default


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
                rec[name] = json.loads(rec[name])
            except ValueError:
                pass
    for name in RUN_INTS:
        if name in rec:
            rec[name] = int(rec[name])
    return rec


def parse_counters(raw: dict[str, str]) -> dict[str, int]:
    """The ledger counters (``ledger.counters``), the usual ones present as 0 when never counted."""
    base = dict.fromkeys(COUNTERS, 0)
    base.update({name: as_int(v) for name, v in raw.items()})
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


def parse_gauges(replies: Sequence[Any]) -> dict[str, int]:
    inflight, backoff, parked, done, legacy = replies
    return {
        "in_flight": int(inflight),
        "backoff": int(backoff),
        "parked": int(parked),
        "done": as_int(text(done)) + int(legacy),
    }


def parse_guard(generation: Any, lost: dict[str, str]) -> dict[str, Any]:
    """``{generation, lost: {generation: {by, at_ms, current}}, ledger_lost}`` (``guard.status``)."""
    out = {}
    for gen, raw in lost.items():
        try:
            out[gen] = json.loads(raw)
        except ValueError:
            out[gen] = {}
    return {"generation": text(generation), "lost": out, "ledger_lost": bool(out)}


def parse_objects(values: Sequence[Any]) -> list[dict[str, Any]]:
    """Presence values: the JSON objects among them (anything else is skipped)."""
    out = []
    for raw in values:
        try:
            rec = json.loads(raw) if raw else None
        except ValueError:
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
