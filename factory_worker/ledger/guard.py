"""The ledger-loss guard: a process never claims or starts work in a ledger other than the one it began in.

The ledger has an identity, ``{ns}:ledger`` = {generation, created_ms}, created once (a fresh deployment
starts without ceremony). Each process remembers the generation it first saw; ``claim.lua`` and
``begin.lua`` compare it atomically with the stored one. When Redis lost the ledger (restarted empty, a
``FLUSHALL``, eviction, a failover to a stale replica, a lost volume) the stored generation is missing or
new, so every process that remembers the old one goes to *safe mode*: nothing is claimed or started, the
loss is reported in ``{ns}:ledger:lost`` (``loop-status`` exits 1 and says ``ledger lost``; ``doctor``,
the metric ``factory_ledger_lost`` and one notification say so too), until an operator runs
``factory-worker ledger accept``: the lost generations are then marked superseded and each process adopts
the current ledger.

What it cannot see: every process restarted together against an emptied Redis (nobody remembers the old
generation). ``doctor`` checks what prevents that: persistence, ``noeviction``, replicas.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from typing import Any

import redis

from factory_worker.ledger.keys import Keys
from factory_worker.ledger.records import parse_guard
from factory_worker.ledger.redis_client import decoded_hash, server_now_ms
from factory_worker.ledger.scripts import LedgerError

log = logging.getLogger(__name__)


class LedgerLostError(LedgerError):
    """The ledger is not the one this process worked in: safe mode, nothing is claimed or started."""

    def __init__(self, remembered: str, current: str | None) -> None:
        self.remembered, self.current = remembered, current
        now = f"generation {current}" if current else "no generation at all (emptied)"
        super().__init__(
            f"ledger lost: this process worked in generation {remembered}, Redis now holds {now}; "
            "nothing is claimed or started until `factory-worker ledger accept`"
        )


class LedgerGuard:
    """The generation this process works in (one per Redis client and namespace)."""

    def __init__(self, r: redis.Redis, keys: Keys, who: str = "") -> None:
        self.r, self.keys, self.who = r, keys, who
        self._generation: str | None = None
        self._lock = threading.Lock()

    @property
    def generation(self) -> str:
        """The remembered generation; on first use the stored one, created if there is none yet."""
        with self._lock:
            if self._generation is None:
                self._generation = ensure_generation(self.r, self.keys)
            return self._generation

    def peek(self) -> str:
        """For read-only questions (dry runs, ``explain``): the remembered generation, else the stored one
        ("" when there is none yet), without creating or remembering anything."""
        with self._lock:
            if self._generation is not None:
                return self._generation
        return str(self.r.hget(self.keys.ledger, "generation") or "")

    def lost(self, current: str | None) -> None:
        """A script answered ``ledger-lost``: adopt the current ledger if an operator accepted it for our
        generation, else report the loss and raise :class:`LedgerLostError`."""
        remembered = self.generation
        current = current or None
        if current and self.r.sismember(self.keys.ledger_superseded, remembered):
            with self._lock:
                log.warning("ledger generation %s was accepted in place of %s: adopting it", current, remembered)
                self._generation = current
            return
        first = self.r.hsetnx(
            self.keys.ledger_lost,
            remembered,
            json.dumps({"by": self.who, "at_ms": server_now_ms(self.r), "current": current}),
        )
        if first:
            log.error("ledger lost: worked in generation %s, Redis holds %s: safe mode", remembered, current)
        raise LedgerLostError(remembered, current)


def ensure_generation(r: redis.Redis, keys: Keys) -> str:
    """The stored generation, created (once, whoever comes first) when there is none."""
    r.hsetnx(keys.ledger, "generation", uuid.uuid4().hex)
    r.hsetnx(keys.ledger, "created_ms", server_now_ms(r))
    return str(r.hget(keys.ledger, "generation"))


def status(r: redis.Redis, keys: Keys) -> dict[str, Any]:
    """``{generation, lost: {generation: {by, at_ms, current}}, ledger_lost}`` for loop-status and metrics."""
    return parse_guard(r.hget(keys.ledger, "generation"), decoded_hash(r.hgetall(keys.ledger_lost)) or {})


def accept(r: redis.Redis, keys: Keys) -> dict[str, Any]:
    """Adopt the current ledger: every reported lost generation is superseded by it (processes that
    remember one adopt the current generation on their next claim or start)."""
    current = ensure_generation(r, keys)
    lost = list(r.hkeys(keys.ledger_lost))
    p = r.pipeline(transaction=True)
    if lost:
        p.sadd(keys.ledger_superseded, *lost)
    p.delete(keys.ledger_lost)
    p.execute()
    return {"generation": current, "superseded": sorted(lost)}
