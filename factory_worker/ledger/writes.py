"""How the ledger writes: one path per kind of write, used by the
:class:`~factory_worker.ledger.core.Ledger` and the stage ledger (:class:`~factory_worker.ledger.stages.StageLedger`)
alike, so neither reaches into the other.

Every write is one Lua script (``lua/``) in one round trip:

* :meth:`LedgerWrites.call`: the script alone, nothing waited for (``renew``, ``retry``, the gate's dry run).
* :meth:`LedgerWrites.acked`: with ``dispatch.min_replica_acks``, the script and ``WAIT`` in one pipeline on one
  connection, so the wait covers this write; it answers whether enough replicas acknowledged it (stage steps).
* :meth:`LedgerWrites.guarded`: an acknowledged write whose script checks the ledger's generation (``claim``,
  ``begin``), sent once more after adopting a ledger an operator accepted (:meth:`LedgerWrites.guarded_dry`: the
  read-only run of such a script, for dry runs and ``explain``).
* :meth:`LedgerWrites.settle`: a write by token (``complete``, ``fail``, ``release``, ``escalate``), with what rides
  in its round trip (:class:`~factory_worker.ledger.types.Rider`), repeated until acknowledged
  (:meth:`LedgerWrites.confirm`).
* :meth:`LedgerWrites.release_unacked`: the release of a claim whose claim or start too few replicas acknowledged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import redis

from factory_worker.config.settings import DispatchSettings
from factory_worker.ledger.guard import LedgerGuard, LedgerLostError
from factory_worker.ledger.keys import Keys
from factory_worker.ledger.scripts import Reply, checked, scripts_for
from factory_worker.ledger.states import Gate
from factory_worker.ledger.types import Rider

log = logging.getLogger(__name__)


class Written(NamedTuple):
    """A write's parsed reply, and whether ``dispatch.min_replica_acks`` replicas acknowledged it."""

    reply: Reply
    acked: bool


class LedgerWrites:
    """The ledger's writes on ``client`` under ``keys``: replica acknowledgements as ``dispatch`` says, the
    generation from ``guard``; ``outbox``: each transition also writes its tracker event (``tracker.write_back``)."""

    def __init__(
        self, client: redis.Redis, keys: Keys, dispatch: DispatchSettings, guard: LedgerGuard, outbox: bool = False
    ) -> None:
        self.r = client
        self.keys = keys
        self.cfg = dispatch
        self.guard = guard
        #: the ``outbox`` argument of the scripts that write tracker events ("1" or "0")
        self.outbox = "1" if outbox else "0"
        #: the registered scripts of ``client`` (:func:`~factory_worker.ledger.scripts.scripts_for`)
        self.scripts = scripts_for(client)

    @property
    def waits(self) -> bool:
        """Whether acknowledged writes wait for replicas (``dispatch.min_replica_acks`` > 0)."""
        return bool(self.cfg.min_replica_acks)

    # -- the kinds of write ---------------------------------------------------------------------------
    def call(self, name: str, items: Sequence[str] = (), **args: Any) -> Reply:
        """Run script ``name`` alone; no replica is waited for."""
        return self.scripts[name](self.keys, items, **args)

    def acked(self, name: str, items: Sequence[str] = (), rider: Rider | None = None, **args: Any) -> Written:
        """Run script ``name`` (then ``rider``'s commands); with ``min_replica_acks``, in one pipeline with
        ``WAIT`` (one round trip)."""
        return self._send(name, items, args, rider, self.waits)

    def guarded(self, name: str, items: Sequence[str] = (), **args: Any) -> Written:
        """An acknowledged write of a script that compares the ledger's generation (``ARGV generation``) with
        the stored one; see :meth:`_adopting` for its ``ledger-lost`` answer."""
        return self._adopting(lambda g: self.acked(name, items, generation=g, **args), lambda: self.guard.generation)

    def guarded_dry(self, name: str, items: Sequence[str] = (), **args: Any) -> Reply:
        """The read-only run of a guarded script (a dry run): the remembered generation, else the stored one,
        nothing created; no replica is waited for (nothing is written)."""
        return self._adopting(lambda g: Written(self.call(name, items, generation=g, **args), True), self.guard.peek)[0]

    def settle(self, name: str, issue: str, token: str, rider: Rider | None = None, **args: Any) -> Reply:
        """A settle (complete, fail, release, escalate) by token, acknowledged by ``min_replica_acks`` replicas.

        ``rider``: commands sent in the same round trip, after the script (sent once, whatever the script
        answers). A stale token raises :class:`~factory_worker.ledger.scripts.StaleClaimError` (its rider went
        all the same). Unacknowledged, it is repeated: :meth:`confirm`.
        """
        args["outbox"] = self.outbox
        reply, acked = self._send(name, (), {**args, "token": token, "issue": issue}, rider, self.waits)
        checked(reply, issue, token)
        return self.confirm(name, issue, token, reply, acked, **args)

    def confirm(self, name: str, issue: str, token: str, reply: Reply, acked: bool, **args: Any) -> Reply:
        """Repeat an unacknowledged write by token until a replica acknowledges it or one lease has passed.

        After a failover that lost the first write the claim is still ours on the new primary and the repeat
        applies it (``ok``: it replaces ``reply``); when the first write did survive, the repeat finds the claim
        gone and ``reply`` stands; one the claim refuses to its new holder raises
        :class:`~factory_worker.ledger.scripts.StaleClaimError`. Connection errors in between (the failover
        itself) are waited out. After one lease it is logged and counted (``settles_unacked``) and the reply
        stands: the write is on the primary, and only a second failover before a replica catches up could still
        lose it. Each repeat also increments a counter (``replica_ack_retries``): a write that always
        replicates, for a repeat whose script writes nothing.
        """
        deadline = time.monotonic() + self.cfg.lease_ttl_s
        while not acked:
            if time.monotonic() > deadline:
                log.error(
                    "%s of %s by %s: fewer than %d replica(s) acknowledged it within %gs",
                    name,
                    issue,
                    token,
                    self.cfg.min_replica_acks,
                    self.cfg.lease_ttl_s,
                )
                self.count_quietly("settles_unacked")
                break
            touch = Rider(lambda p: p.hincrby(self.keys.counters, "replica_ack_retries", 1))
            try:
                again, acked = self._send(name, (), {**args, "token": token, "issue": issue}, touch, self.waits)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("Redis unavailable while confirming %s of %s (%s); retrying", name, issue, exc)
                time.sleep(0.2)
                continue
            if again.status == "ok":
                reply = again  # the first write was lost with a failed primary: this one counts
            elif again.status == "held":
                checked(again, issue, token)  # lost, and the issue was claimed again meanwhile
        return reply

    def release_unacked(self, issue: str, token: str, counter: str) -> None:
        """Release a claim whose claim (or a stage's open or start) too few replicas acknowledged: a failover
        could lose it, so nothing runs on it; no attempt is counted, and ``counter`` counts it. Not waiting for
        acknowledgements again (with a replica down that would stall the loop for every claim, or hold a task
        for a lease); should the release itself fail, the claim's lease ends it."""
        try:
            self.call("release", token=token, issue=issue, reason=Gate.UNACKED, outbox=self.outbox)
        except redis.RedisError:
            log.warning("could not release unacknowledged claim %s on %s; its lease ends it", token, issue)
        self.count_quietly(counter)

    def count_quietly(self, counter: str) -> None:
        """Increment ledger counter ``counter``; a failure is logged, never raised."""
        try:
            self.r.hincrby(self.keys.counters, counter, 1)
        except redis.RedisError:
            log.warning("could not count %s", counter)

    # -- the mechanism --------------------------------------------------------------------------------
    def _adopting(self, send: Callable[[str], Written], generation: Callable[[], str]) -> Written:
        """``send(generation())``; on ``ledger-lost`` (the stored generation is missing or new) once more, only
        after adopting a ledger an operator accepted (:meth:`LedgerGuard.lost`, which otherwise reports the
        loss and raises :class:`~factory_worker.ledger.guard.LedgerLostError`)."""
        for _ in range(2):
            written = send(generation())
            if written.reply.status != "ledger-lost":
                return written
            self.guard.lost(written.reply.values[0])
        raise LedgerLostError(self.guard.generation, written.reply.values[0])

    def _send(self, name: str, items: Sequence[str], args: dict[str, Any], rider: Rider | None, wait: bool) -> Written:
        """Script ``name``, then ``rider``'s commands, then (``wait``) ``WAIT``, in one round trip on one
        connection; the script alone without either. A restarted Redis (``NOSCRIPT``) gets the script loaded
        and sent again alone (the rider went already). A rider's own error stays a value in its replies."""
        script, n = self.scripts[name], self.cfg.min_replica_acks
        if not wait and rider is None:
            return Written(script(self.keys, items, **args), True)
        pipe = self.r.pipeline(transaction=False)
        script.queue(pipe, self.keys, items, **args)
        if rider is not None:
            rider.queue(pipe)
        last = len(pipe)
        if wait:
            pipe.execute_command("WAIT", n, max(1, int(self.cfg.replica_ack_timeout_s * 1000)))
        if rider is not None:
            rider.sent = True  # from here on it may have run: a retry (its reply lost) must not send it again
        out = pipe.execute(raise_on_error=False)
        if rider is not None:
            rider.replies = out[1:last]  # a rider's own error stays a value: the write itself went
        for reply in out[:1] + out[last:]:
            if isinstance(reply, Exception) and not isinstance(reply, redis.exceptions.NoScriptError):
                raise reply
        if isinstance(out[0], redis.exceptions.NoScriptError):
            script.load()
            return self._send(name, items, args, None, wait)
        return Written(script.parse(out[0]), int(out[-1]) >= n if wait else True)
