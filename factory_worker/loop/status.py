"""What ``loop-status`` shows: read in a few pipelined round trips through any client, and its text.

:func:`read` takes a ``send(commands) -> replies`` function that sends raw commands in one round trip and
returns Redis's replies as sent (bulk strings as bytes, error replies as exception values): the full CLI,
``metrics`` and ``up`` use :func:`factory_worker.ledger.redis_client.redis_py_sender`; the CLI's early path (:mod:`.quick`) its own socket, before
redis-py, pydantic and click are loaded. So both answer with the same dict, built here only. The other
readers of these keys (``control.run``, ``ledger.gauges``, ``guard.status``, ``presence``) share the parsing
below, and its readers of stored numbers (:func:`number`, :func:`as_int`, :func:`shown`): a counter, score or
marker that is not a finite integer within Redis's 64-bit range (``inf``, ``1e999``, 400 digits, garbage) is
shown as :data:`INVALID`, never an exception. Standard library only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from factory_worker.ledger.contracts import source
from factory_worker.ledger.keys import Keys, utc_day
from factory_worker.ledger.records import (
    SCAN_COUNT,
    as_dict,
    gauge_commands,
    parse_counters,
    parse_gauges,
    parse_guard,
    parse_run,
    parse_workers,
    raise_errors,
    text,
    time_ms,
)
from factory_worker.loop import heartbeat

#: Sends raw commands in one round trip; their replies, in order (errors as exception values).
Sender = Callable[[Sequence[Sequence[Any]]], list[Any]]


# -- loop-status ---------------------------------------------------------------------------------------
def _scan_workers(keys: Keys, cursor: Any) -> tuple[Any, ...]:
    return ("SCAN", cursor, "MATCH", keys.worker_pattern(), "COUNT", SCAN_COUNT)


def read(
    send: Sender, keys: Keys, stale_after_s: float, write_back: bool, redis_shown: str
) -> tuple[dict[str, Any], int]:
    """Heartbeat + liveness + run + kill/pause + counters + workers; exit 0 live, 1 not live or ledger lost."""
    first = [
        ("GET", keys.heartbeat),
        ("TIME",),
        ("GET", keys.current_run),
        ("GET", keys.loop_lease),
        ("HGETALL", keys.kill),
        ("HGETALL", keys.paused),
        ("HGETALL", keys.counters),
        ("HGET", keys.ledger, "generation"),
        ("HGETALL", keys.ledger_lost),
        ("EVAL", source("fleet_slots"), 1, keys.slots),
        ("HGET", keys.spend(utc_day()), "cost_usd"),  # today's spend (issue 24)
    ]
    if write_back:
        first += [("XLEN", keys.outbox), ("HLEN", keys.outbox_parked)]
    hb_raw, time_reply, current, holder, kill, paused, counters, generation, lost, slots, spent, *outbox = raise_errors(
        send(first)
    )
    live = heartbeat.judge(hb_raw, time_reply, stale_after_s)
    now = time_ms(time_reply)
    run_id = live.heartbeat.run_id if live.heartbeat else text(current)
    second = [_scan_workers(keys, 0), *gauge_commands(keys, now)]
    scanned, *gauges = raise_errors(send(second + ([("HGETALL", keys.run(run_id))] if run_id else [])))
    run_raw = gauges.pop() if run_id else None
    worker_keys, cursor = list(scanned[1]), int(scanned[0])
    while cursor:
        cursor_raw, more = raise_errors(send([_scan_workers(keys, cursor)]))[0]
        cursor = int(cursor_raw)
        worker_keys += more
    values = raise_errors(send([("MGET", *worker_keys)]))[0] if worker_keys else []
    run = parse_run(as_dict(run_raw)) if run_id else None
    guard = parse_guard(generation, as_dict(lost))
    status = {
        "redis": redis_shown,
        "namespace": keys.namespace,
        "liveness": live.state,
        "live": live.live,
        "age_s": None if live.age_s is None else round(live.age_s, 3),
        "heartbeat": live.heartbeat.as_dict() if live.heartbeat else None,
        "run": run,
        "lease_holder": text(holder),
        "killed": as_dict(kill) or None,
        "paused": as_dict(paused) or None,
        "counters": parse_counters(as_dict(counters)),
        "ledger": parse_gauges(gauges),
        "workers": parse_workers(text(values)),
        "agent_slots": int(slots[1]),
        "last_iteration_worker": (run or {}).get("last_worker"),
        "ledger_guard": guard,
        "outbox": {"pending": int(outbox[0]), "parked": int(outbox[1])} if write_back else None,
        "ledger_lost": guard["ledger_lost"],
        "spend_today": {"day": utc_day(), "cost_usd": _usd(spent)},
    }
    return status, 0 if live.live and not guard["ledger_lost"] else 1


def _usd(raw: Any) -> Any:
    """A stored spend (HINCRBYFLOAT's text) as a number, or :data:`INVALID` (never an exception)."""
    try:
        value = float(text(raw) or 0)
    except ValueError:
        return "invalid"
    return round(value, 6) if value == value and abs(value) != float("inf") else "invalid"


# -- its text --------------------------------------------------------------------------------------------
def lines(
    d: dict[str, Any], style: Callable[[str, str], str], esc: Callable[[Any], str], when: Callable[[Any], str]
) -> list[str]:
    """``loop-status``'s text: ``style(text, "red")`` marks words up (rich markup, or nothing), ``esc`` makes
    stored text safe to show (markup escaped, control bytes as ``\\xNN``), ``when`` shows a ms timestamp."""
    hb = d["heartbeat"] or {}
    out = [
        f"redis: {esc(d['redis'])} namespace {esc(d['namespace'])}",
        f"loop: {style(d['liveness'], 'bold')}" + (f" (heartbeat {d['age_s']}s old)" if hb else ""),
    ]
    if d["ledger_lost"]:
        gens = ", ".join(sorted(d["ledger_guard"]["lost"]))
        out.append(
            f"{style('ledger lost', 'red')}: processes worked in generation {esc(gens)}, Redis holds "
            f"{esc(d['ledger_guard']['generation'] or 'none')}; safe mode (nothing is claimed or started): "
            "check Redis, then `factory-worker ledger accept`"
        )
    if hb:
        out.append(
            f"run {esc(hb['run_id'])}: {hb['status']} iteration {hb['iteration']}/{hb['max_iterations']}"
            f" on {esc(hb['hostname'])} pid {hb['pid']}"
        )
    if d["killed"]:
        k = d["killed"]
        out.append(
            f"{style('killed', 'red')} at {when(k.get('at_ms'))} by {esc(k.get('by'))}: run start-loop to resume"
        )
    if d["paused"]:
        p = d["paused"]
        out.append(f"{style('paused', 'yellow')} at {when(p.get('at_ms'))} by {esc(p.get('by'))}")
    out.append("ledger: " + ", ".join(f"{k}={v}" for k, v in d["ledger"].items()))
    out.append("counters: " + ", ".join(f"{esc(k)}={v}" for k, v in sorted(d["counters"].items())))
    out.append(
        f"workers: {', '.join(esc(w.get('hostname')) for w in d['workers']) or 'none'}; "
        f"agent slots {d['agent_slots']}; last iteration on {esc(d['last_iteration_worker'] or '-')}"
    )
    if d.get("spend_today"):
        out.append(f"spend today (UTC {d['spend_today']['day']}): {d['spend_today']['cost_usd']} USD")
    if d["outbox"] is not None:
        out.append(f"tracker outbox: {d['outbox']['pending']} event(s) to deliver, {d['outbox']['parked']} parked")
    return out
