"""What ``loop-status`` shows: read in a few pipelined round trips through any client, and its text.

:func:`read` takes a ``send(commands) -> replies`` function that sends raw commands in one round trip and
returns Redis's replies (bulk strings as bytes, error replies as exception values; lists, or what redis-py's
response callbacks make of them: ``TIME`` a tuple, ``HGETALL`` a dict, ``SCAN`` a (cursor, keys) pair,
``INFO`` a dict): the full CLI, ``metrics`` and ``up`` use
:func:`factory_worker.ledger.redis_client.redis_py_sender`; the CLI's early path (:mod:`factory_worker.cli.quick`)
its own socket, before redis-py, pydantic and click are loaded. So both answer with the same dict, built here
only, with the reasons the loop cannot make progress (:mod:`.reasons`). The other
readers of these keys (``control.run``, ``ledger.gauges``, ``guard.status``, ``presence``) share the parsing
below, and its readers of stored numbers (:func:`number`, :func:`as_int`, :func:`shown`): a counter, score or
marker that is not a finite integer within Redis's 64-bit range (``inf``, ``1e999``, 400 digits, garbage) is
shown as :data:`INVALID`, never an exception. Standard library only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from factory_worker.config.essentials import Essentials
from factory_worker.config.urls import mask_url
from factory_worker.ledger.contracts import source
from factory_worker.ledger.keys import Keys, utc_day
from factory_worker.ledger.records import (
    SCAN_COUNT,
    as_dict,
    as_int,
    gauge_commands,
    parse_counters,
    parse_failing,
    parse_gauges,
    parse_guard,
    parse_objects,
    parse_replication,
    parse_run,
    parse_workers,
    raise_errors,
    text,
    time_ms,
)
from factory_worker.ledger.states import Liveness, Stuck
from factory_worker.loop import heartbeat, reasons

#: Sends raw commands in one round trip; their replies, in order (errors as exception values).
Sender = Callable[[Sequence[Sequence[Any]]], list[Any]]


# -- loop-status ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Query:
    """What ``loop-status`` is asked about: the namespace's keys and the few settings it reads (both CLI paths
    take them from :class:`factory_worker.config.essentials.Essentials`; ``metrics`` and ``up`` from the full
    settings): the stale threshold, whether to count the tracker outbox, how the Redis URL is shown, this
    side's ``dispatch.min_replica_acks`` (each worker publishes its own) and whether the broker's queues are
    lists in this Redis (then the loop queue's waiting tasks are counted)."""

    keys: Keys
    stale_after_s: float
    write_back: bool = False
    redis_shown: str = ""
    min_replica_acks: int = 0
    broker_is_ledger: bool = True

    @classmethod
    def of(cls, e: Essentials) -> Query:
        """From the recovery commands' settings (both CLI paths)."""
        return cls(
            Keys(e.namespace),
            e.stale_after_s,
            e.write_back,
            mask_url(e.redis_url),
            e.min_replica_acks,
            e.broker_is_ledger,
        )


#: kombu's Redis transport keeps a queue's messages of priority p > 0 in ``<queue>\x06\x16<p>``.
_PRIORITIES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def _scan(pattern: str, cursor: Any) -> tuple[Any, ...]:
    return ("SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT)


def _scan_values(send: Sender, first: Any, pattern: str) -> list[Any]:
    """The values of the keys ``pattern`` matches, from ``first`` (the reply to its first SCAN) on."""
    found, cursor = list(first[1]), int(first[0])
    while cursor:
        cursor_raw, more = raise_errors(send([_scan(pattern, cursor)]))[0]
        cursor = int(cursor_raw)
        found += more
    return raise_errors(send([("MGET", *found)]))[0] if found else []


def read(send: Sender, q: Query) -> tuple[dict[str, Any], int]:
    """Heartbeat + liveness + run + kill/pause + counters + workers and beats + the reasons the loop cannot make
    progress (:mod:`.reasons`); exit 0 live with no reason, else 1."""
    keys = q.keys
    first: list[tuple[Any, ...]] = [
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
        ("HGETALL", keys.loop_failing),
        ("HGET", keys.spend(utc_day()), "cost_usd"),  # today's spend (issue 24)
    ]
    first += [("XLEN", keys.outbox), ("HLEN", keys.outbox_parked)] if q.write_back else []
    # what may be refused without failing the answer (INFO disabled, an ACL limited to the namespace's keys):
    # an error reply here is a value, and what it would say unknown
    optional: list[tuple[Any, ...]] = [("INFO", "replication")]
    optional += [("LLEN", keys.loop_queue + p) for p in _PRIORITIES] if q.broker_is_ledger else []
    replies = send(first + optional)
    info, *queued = replies[len(first) :]
    hb_raw, time_reply, current, holder, kill, paused, counters, generation, lost, slots, failing, spent, *outbox = (
        raise_errors(replies[: len(first)])
    )
    waiting = None
    if q.broker_is_ledger and not any(isinstance(n, Exception) for n in queued):
        waiting = sum(int(n) for n in queued)
    live = heartbeat.judge(hb_raw, time_reply, q.stale_after_s)
    now = time_ms(time_reply)
    run_id = live.heartbeat.run_id if live.heartbeat else text(current)
    second = [_scan(keys.worker_pattern(), 0), _scan(keys.beat("*"), 0), *gauge_commands(keys, now)]
    scanned, beats_scanned, *gauges = raise_errors(send(second + ([("HGETALL", keys.run(run_id))] if run_id else [])))
    run_raw = gauges.pop() if run_id else None
    worker_values = _scan_values(send, scanned, keys.worker_pattern())
    beat_values = _scan_values(send, beats_scanned, keys.beat("*"))
    run = parse_run(as_dict(run_raw)) if run_id else None
    guard = parse_guard(generation, as_dict(lost))
    workers = parse_workers(text(worker_values))
    killed = as_dict(kill) or None
    state = Liveness.KILLED if killed else Liveness(live.state)
    status: dict[str, Any] = {
        "redis": q.redis_shown,
        "namespace": keys.namespace,
        "liveness": state,
        "live": state == Liveness.LIVE,
        "age_s": None if live.age_s is None else round(live.age_s, 3),
        "heartbeat": live.heartbeat.as_dict() if live.heartbeat else None,
        "run": run,
        "lease_holder": text(holder),
        "killed": killed,
        "paused": as_dict(paused) or None,
        "counters": parse_counters(as_dict(counters)),
        "ledger": parse_gauges(gauges),
        "workers": workers,
        "beats": sorted(str(b.get("node", "")) for b in parse_objects(text(beat_values))),
        "agent_slots": int(slots[1]),
        "last_iteration_worker": (run or {}).get("last_worker"),
        "ledger_guard": guard,
        "outbox": {"pending": int(outbox[0]), "parked": int(outbox[1])} if q.write_back else None,
        "ledger_lost": guard["ledger_lost"],
        "loop_queue": {
            "name": keys.loop_queue,
            "agents": keys.agent_queue,
            "waiting": waiting,
        },
        "failing": parse_failing(as_dict(failing)),
        "replicas": parse_replication(info),
        "min_replica_acks": max([q.min_replica_acks, *(max(0, as_int(w.get("min_replica_acks"))) for w in workers)]),
        "spend_today": {"day": utc_day(), "cost_usd": _usd(spent)},
    }
    found = reasons.find(status)
    status["reasons"] = [why for _, why in found]
    status["reason_codes"] = [code for code, _ in found]
    return status, 0 if status["live"] and not found else 1


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
    for code, why in zip(d["reason_codes"], d["reasons"]):
        if code not in (Stuck.KILLED, Stuck.LEDGER_LOST):  # said above, in their own lines
            out.append(f"{style('reason', 'red')}: {esc(why)}")
    out.append("ledger: " + ", ".join(f"{k}={v}" for k, v in d["ledger"].items()))
    out.append("counters: " + ", ".join(f"{esc(k)}={v}" for k, v in sorted(d["counters"].items())))
    out.append(
        f"workers: {', '.join(esc(w.get('hostname')) for w in d['workers']) or 'none'}; "
        f"agent slots {d['agent_slots']}; last iteration on {esc(d['last_iteration_worker'] or '-')}"
    )
    if d.get("spend_today"):
        out.append(f"spend today (UTC {d['spend_today']['day']}): {d['spend_today']['cost_usd']} USD")
    waiting = d["loop_queue"]["waiting"]
    if waiting:
        out.append(f"loop queue {esc(d['loop_queue']['name'])}: {waiting} task(s) waiting")
    out.append(f"beats: {', '.join(esc(b) for b in d['beats']) or 'none'}")
    if d["outbox"] is not None:
        out.append(f"tracker outbox: {d['outbox']['pending']} event(s) to deliver, {d['outbox']['parked']} parked")
    return out
