"""Who is alive: worker and beat presence keys and agent slots, written here only (Celery-free); loop-status
reads the worker keys through :func:`factory_worker.loop.status.read`, on either CLI path.

``{ns}:worker:<node>`` and ``{ns}:beat:<host>/<pid>`` are JSON with an expiry: a process that dies
vanishes after the TTL. A worker's value also says what it consumes and how busy it is (:class:`WorkerFacts`:
its queues, pool size, processes running agents, loop tasks waiting for one, its ``min_replica_acks``), so
``loop-status`` can say why the loop cannot make progress (:mod:`.reasons`). ``{ns}:shutdown:<node>`` is a warm-shutting-down worker's deadline for its agents.
Written by :mod:`factory_worker.worker.lifecycle` (a worker bootstep and the beat scheduler); read by
``loop-status``, ``doctor`` and ``metrics``.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import socket
import struct
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import redis

from factory_worker.ledger.keys import Keys
from factory_worker.ledger.records import SCAN_COUNT, parse_objects, parse_workers
from factory_worker.ledger.redis_client import server_now_ms
from factory_worker.ledger.scripts import scripts_for

if TYPE_CHECKING:
    from factory_worker.context import Context

log = logging.getLogger(__name__)


# -- workers -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerFacts:
    """What a worker publishes beside its liveness: the queues it consumes, its pool size, how many of its
    processes run agents now and how many loop tasks it holds waiting for a free one."""

    queues: tuple[str, ...] = ()
    concurrency: int = 0
    agents_running: int = 0
    loop_waiting: int = 0
    #: the loop's tasks run outside its pool (``worker.lane``): agents never hold them up
    loop_lane: bool = False


def publish_worker(
    ctx: Context, node: str, started_ms: int, shutting_down: bool = False, facts: WorkerFacts | None = None
) -> None:
    cfg = ctx.settings.worker
    value: dict[str, Any] = {
        "hostname": node,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_ms": started_ms,
        "updated_ms": server_now_ms(ctx.redis),
        "shutting_down": shutting_down,
        "min_replica_acks": ctx.settings.dispatch.min_replica_acks,
    }
    if facts is not None:
        value.update(asdict(facts), queues=list(facts.queues))
    ctx.redis.set(ctx.keys.worker(node), json.dumps(value), px=int(cfg.heartbeat_ttl_s * 1000))


def worker_alive(r: redis.Redis, keys: Keys, node: str) -> bool:
    """Whether worker ``node`` has a live presence key (it refreshed it within ``worker.heartbeat_ttl_s``)."""
    return bool(r.exists(keys.worker(node)))


def clear_worker(ctx: Context, node: str) -> None:
    """A worker's own goodbye at shutdown: its presence, shutdown deadline and slots go at once."""
    ctx.redis.delete(ctx.keys.worker(node), ctx.keys.worker_shutdown(node))
    clear_slots(ctx, node)


class LocalShutdown:
    """A warm shutdown's times, shared with this worker's pool processes without Redis: an anonymous shared
    mapping made when this module is imported (by the worker's main process, before its pool forks), holding
    two ``time.monotonic()`` readings (``CLOCK_MONOTONIC``: one clock for every process of the host): when the
    agents must stop, and when the soft-shutdown window ends. A pool process reads them on every stop check
    (``dispatch.steps.StopCheck``) and bounds its last writes by them (``dispatch.claims.settle``), so a worker
    whose Redis vanished during its shutdown still stops its agents and exits within the window."""

    _FORMAT = "dd"

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, struct.calcsize(self._FORMAT))  # MAP_SHARED | MAP_ANONYMOUS

    def begin(self, window_s: float, margin_s: float, now: float | None = None) -> None:
        """The shutdown was asked for ``now``: agents stop ``margin_s`` before the window of ``window_s`` ends."""
        start = time.monotonic() if now is None else now
        self._map[:] = struct.pack(self._FORMAT, start + max(0.0, window_s - margin_s), start + window_s)

    def clear(self) -> None:
        self._map[:] = struct.pack(self._FORMAT, 0.0, 0.0)

    def _times(self) -> tuple[float, float]:
        stop, end = struct.unpack(self._FORMAT, self._map[:])
        return stop, end

    def agents_stop_at(self) -> float | None:
        """When this worker's agents must have stopped (monotonic), or None: no shutdown asked."""
        return self._times()[0] or None

    def window_end(self) -> float | None:
        """When the soft-shutdown window ends (monotonic), or None."""
        return self._times()[1] or None


#: this worker's warm shutdown (written by its main process: ``worker.lifecycle``)
SHUTDOWN = LocalShutdown()


def write_shutdown_deadline(ctx: Context, node: str) -> int:
    """Tell this worker's agents when the soft-shutdown window ends (ms, server clock)."""
    cfg = ctx.settings.worker
    window_ms = int(cfg.soft_shutdown_s * 1000)
    # leave the margin to release claims and for Celery to stop its pool (~2 s measured)
    deadline = server_now_ms(ctx.redis) + max(0, window_ms - int(cfg.shutdown_margin_s * 1000))
    ctx.redis.set(ctx.keys.worker_shutdown(node), deadline, px=window_ms + 60_000)
    running = ctx.redis.scard(ctx.keys.agents)
    level = logging.WARNING if running else logging.INFO
    log.log(
        level,
        "warm shutdown: agents still running in %.1fs will be stopped and their claims released",
        (deadline - server_now_ms(ctx.redis)) / 1000,
    )
    return deadline


def publish_slots(ctx: Context, node: str, slots: int) -> None:
    """Advertise ``slots`` free-or-busy agent slots of ``node`` until its presence TTL (the gate sums the
    live entries and subtracts the in-flight claims; see ``claim.lua``)."""
    expires = server_now_ms(ctx.redis) + int(ctx.settings.worker.heartbeat_ttl_s * 1000)
    ctx.redis.hset(ctx.keys.slots, node, f"{max(0, int(slots))}:{expires}")


def clear_slots(ctx: Context, node: str) -> None:
    ctx.redis.hdel(ctx.keys.slots, node)


def fleet_slots(ctx: Context) -> int:
    """The agent slots of the live workers now: what the gate counts (the same Lua, ``live_slots``)."""
    return int(scripts_for(ctx.redis)["fleet_slots"](ctx.keys).values[0])


def live_workers(ctx: Context) -> list[dict[str, Any]]:
    """The workers whose presence key is live, sorted by node name."""
    return parse_workers(_scan_values(ctx, ctx.keys.worker_pattern()))


# -- beat ----------------------------------------------------------------------------------------------
def beat_ttl_s(ctx: Context) -> float:
    return max(30.0, 3 * ctx.settings.loop.interval_s)


def beat_node(hostname: str | None = None, pid: int | None = None) -> str:
    return f"{hostname or socket.gethostname()}/{pid or os.getpid()}"


def publish_beat(ctx: Context, hostname: str | None = None, pid: int | None = None, ttl_s: float | None = None) -> str:
    """Announce a live beat; returns the key. The value carries the host clock and the Redis clock, so
    ``doctor`` can see a skewed beat host."""
    node = beat_node(hostname, pid)
    key = ctx.keys.beat(node)
    value = {
        "node": node,
        "hostname": hostname or socket.gethostname(),
        "pid": pid or os.getpid(),
        "host_ms": int(time.time() * 1000),
        "updated_ms": server_now_ms(ctx.redis),
    }
    ctx.redis.set(key, json.dumps(value), px=max(1, int((ttl_s or beat_ttl_s(ctx)) * 1000)))
    return key


def clear_beat(ctx: Context, hostname: str | None = None, pid: int | None = None) -> None:
    """Remove this beat's presence key (on clean shutdown)."""
    ctx.redis.delete(ctx.keys.beat(beat_node(hostname, pid)))


def beat_seen(ctx: Context) -> list[dict[str, Any]]:
    """The beats whose presence key is live, sorted by node."""
    return sorted(parse_objects(_scan_values(ctx, ctx.keys.beat("*"))), key=lambda b: str(b.get("node", "")))


def _scan_values(ctx: Context, pattern: str) -> list[Any]:
    """The values of the keys matching ``pattern`` (one that expired meanwhile: None)."""
    keys = list(ctx.redis.scan_iter(match=pattern, count=SCAN_COUNT))
    return ctx.redis.mget(keys) if keys else []
