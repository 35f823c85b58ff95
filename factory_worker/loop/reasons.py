"""Why the loop cannot make progress, from what ``loop-status`` read (:func:`factory_worker.loop.status.read`):
one ``(code, text)`` per finding, the code a :class:`~factory_worker.ledger.states.Stuck` word. ``loop-status``
exits 1 when there is any; ``doctor`` reports the same findings. Pure functions over the status dict,
standard library only (the CLI's early path computes them too).

What a worker publishes beside its liveness (:func:`factory_worker.loop.presence.publish_worker`) makes them
decidable: the queues it consumes, its pool size, how many of its processes run agents and how many loop
tasks it holds waiting for a process, whether its loop lane runs the loop's tasks outside its pool (then agents
never starve the loop). A worker of an older version publishes none of it: it is taken to consume both queues
and to have room (no finding is made from what it does not say).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from factory_worker.ledger.records import as_int, number
from factory_worker.ledger.states import Liveness, Stuck

Finding = tuple[Stuck, str]


def when(ms: Any) -> str:
    """A stored ms timestamp as ISO 8601 UTC to the second (``invalid`` when it is not a number)."""
    n = number(ms)
    if n is None:
        return "invalid"
    try:
        return datetime.fromtimestamp(n / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return "invalid"


def consumes(worker: dict[str, Any], queue: str) -> bool:
    """Whether ``worker`` (a presence value) consumes ``queue``; one that does not say is taken to."""
    queues = worker.get("queues")
    return not isinstance(queues, list) or queue in queues


def _count(worker: dict[str, Any], name: str) -> int:
    return max(0, as_int(worker.get(name)))


def starved(worker: dict[str, Any]) -> bool:
    """Every process of ``worker``'s pool runs an agent: a loop task it is given waits for one to end (never
    with its loop lane: the loop's tasks run outside the pool)."""
    if worker.get("loop_lane"):
        return False
    size = _count(worker, "concurrency")
    return size > 0 and _count(worker, "agents_running") >= size


def _waiting(n: int | None, queue: str) -> str:
    return f" ({n} loop task(s) wait in {queue}: kickoffs, iterations)" if n else ""


def workers(d: dict[str, Any]) -> list[Finding]:
    """The fleet's findings: no live worker, none on the loop queue, the loop starved, no agent slot."""
    loop_q, agent_q = d["loop_queue"]["name"], d["loop_queue"]["agents"]
    waiting = d["loop_queue"]["waiting"]
    everyone = d["workers"]
    live = [w for w in everyone if not w.get("shutting_down")]
    if not live:
        going = f"; {len(everyone)} shutting down" if everyone else ""
        return [
            (Stuck.NO_WORKER, f"no live worker{going}: nothing runs the loop or its agents{_waiting(waiting, loop_q)}")
        ]
    out: list[Finding] = []
    on_loop = [w for w in live if consumes(w, loop_q)]
    if not on_loop:
        out.append(
            (
                Stuck.NO_LOOP_WORKER,
                f"no worker consumes the loop queue {loop_q}{_waiting(waiting, loop_q)}: start one that does "
                f"(`celery -A factory_worker worker`, or `-Q {loop_q}`)",
            )
        )
    else:
        held = sum(_count(w, "loop_waiting") for w in on_loop)
        if all(starved(w) for w in on_loop) and (waiting or held):
            names = ", ".join(str(w.get("hostname")) for w in on_loop)
            size = sum(_count(w, "concurrency") for w in on_loop)
            out.append(
                (
                    Stuck.LOOP_STARVED,
                    f"the loop is starved: every process of the worker(s) on {loop_q} ({names}; {size} in all) "
                    f"runs an agent while {(waiting or 0) + held} loop task(s) wait; give the loop a worker of "
                    f"its own (`-Q {loop_q}`) or more processes (`-c`)",
                )
            )
    if not d["agent_slots"]:
        on_agents = [w for w in live if consumes(w, agent_q)]
        why = "its workers advertise none" if on_agents else f"no live worker consumes {agent_q}"
        out.append((Stuck.NO_AGENT_SLOT, f"no agent slot in the fleet ({why}): nothing can be dispatched"))
    return out


def _replicas(d: dict[str, Any]) -> list[Finding]:
    acks, connected = d["min_replica_acks"], (d.get("replicas") or {}).get("connected")
    if acks and connected is not None and connected < acks:
        return [
            (
                Stuck.REPLICA_ACKS,
                f"claims are refused: dispatch.min_replica_acks is {acks} but the primary has {connected} connected "
                "replica(s), so no claim is acknowledged and nothing is dispatched; add replicas or lower "
                "FACTORY_DISPATCH__MIN_REPLICA_ACKS",
            )
        ]
    return []


def _failing(d: dict[str, Any]) -> list[Finding]:
    f = d.get("failing")
    if not f:
        return []
    error = str(f.get("error") or "-")
    source = error.startswith(("SourceError", "MalformedIssue"))
    what = "the source is failing" if source else "iterations are failing"
    return [
        (
            Stuck.SOURCE_FAILING if source else Stuck.ITERATIONS_FAILING,
            f"{what} since {when(f.get('since_ms'))} ({f.get('failures', '?')} failed iteration(s), the last at "
            f"{when(f.get('last_ms'))}): {error}",
        )
    ]


def find(d: dict[str, Any]) -> list[Finding]:
    """Every reason the loop described by ``d`` (``status.read``'s dict) cannot make progress; none when it can."""
    out: list[Finding] = []
    kill = d.get("killed")
    if kill:
        out.append(
            (
                Stuck.KILLED,
                f"killed by {kill.get('by', '?')} at {when(kill.get('at_ms'))}: beat's kickoffs do nothing until "
                "`factory-worker start-loop`",
            )
        )
    if d["ledger_lost"]:
        gens = ", ".join(sorted(d["ledger_guard"]["lost"]))
        out.append(
            (
                Stuck.LEDGER_LOST,
                f"ledger lost: processes worked in generation {gens}, Redis holds "
                f"{d['ledger_guard']['generation'] or 'none'}; safe mode (nothing is claimed or started): check "
                "Redis, then `factory-worker ledger accept`",
            )
        )
    out += workers(d)
    if not d["beats"] and d["liveness"] != Liveness.LIVE:  # a live run goes on without it (and a flushed
        # Redis lacks the beat's key until its next refresh): no kickoff is why a loop that is not live stays so
        out.append(
            (Stuck.NO_BEAT, "no live beat: nothing kicks off runs; run exactly one `celery -A factory_worker beat`")
        )
    out += _failing(d) + _replicas(d)
    if not out and d["liveness"] != Liveness.LIVE:
        age = d.get("age_s")
        out.append(
            {
                Liveness.MISSING: (Stuck.NO_HEARTBEAT, "no run's heartbeat (missing, malformed or expired)"),
                Liveness.STALE: (Stuck.HEARTBEAT_STALE, f"the heartbeat is stale ({age}s old): is a run stuck?"),
            }.get(d["liveness"], (Stuck.STOPPING, "the last run is stopping (ended, not by a kill)"))
        )
    return out
