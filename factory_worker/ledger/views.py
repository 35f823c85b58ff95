"""The read side of the dispatch ledger: issue-by-issue listings, counters, gauges, the done markers, the live
token of an issue and the server clock (:class:`LedgerView`, a plain class on a client and the key names; the
:class:`~factory_worker.ledger.core.Ledger` holds one and answers its reads with it). Nothing here writes. A stored
number that is not one (a score of ``inf``, ``1e999`` attempts, a garbage marker) is listed as ``invalid``
(``records.shown``), never an exception."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import redis

from factory_worker.ledger.keys import Keys
from factory_worker.ledger.records import (
    INVALID,
    as_int,
    gauge_commands,
    parse_counters,
    parse_gauges,
    parse_steps,
    shown,
)
from factory_worker.ledger.redis_client import decoded, decoded_hash, decoded_scored, server_now_ms
from factory_worker.ledger.results import parse_result
from factory_worker.ledger.states import LedgerState
from factory_worker.ledger.types import fence_in

#: The states ``entries`` lists (``dispatches --state``).
STATES = tuple(s.value for s in LedgerState)


def done_markers(r: redis.Redis, keys: Keys) -> Iterator[tuple[str, str]]:
    """Every (issue, done marker) of the ledger: its done buckets, then the legacy single done hash."""
    for bucket in r.scan_iter(match=keys.done_bucket_pattern(), count=1000):
        yield from r.hscan_iter(bucket)
    yield from r.hscan_iter(keys.done)


_int = as_int


def _fence(token: str | None) -> Any:
    """The fence of a stored token: None without one, :data:`INVALID` when it has none that can be read."""
    if token is None:
        return None
    fence = fence_in(token)
    return INVALID if fence is None else fence


class LedgerView:
    """What a ledger shows, read from ``r`` under the key names ``keys`` (no other dependency)."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r = r
        self.keys = keys

    def now_ms(self) -> int:
        """Redis server time (ms): the clock every lease and backoff is measured by."""
        return server_now_ms(self.r)

    def current_token(self, issue: str) -> str | None:
        """The token of the live claim on ``issue``, if any."""
        token = self.r.get(self.keys.claim(issue))
        return None if token is None else str(token)

    def entries(self, state: str) -> list[dict[str, Any]]:
        """The ledger issue by issue for ``state`` (one of :data:`STATES`), each with its last ``result`` when
        it has one (``ledger/results.py``)."""
        return self.with_results(self._entries(state))

    def with_results(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``rows`` (each with an ``issue``), each given its last ``result`` if any: one ``MGET`` per 500."""
        for start in range(0, len(rows), 500):
            chunk = rows[start : start + 500]
            for row, raw in zip(chunk, self.r.mget([self.keys.result(row["issue"]) for row in chunk])):
                if (found := parse_result(raw)) is not None:
                    row["result"] = found
        return rows

    def result(self, issue: str) -> dict[str, Any] | None:
        """``issue``'s last result (``ledger/results.py``), or None."""
        return parse_result(self.r.get(self.keys.result(issue)))

    def _entries(self, state: str) -> list[dict[str, Any]]:
        k = self.keys
        now = self.now_ms()
        if state == "in-flight":
            rows = decoded_scored(self.r.zrangebyscore(k.inflight, Keys.live_from(now), "+inf", withscores=True))
            out = []
            for i, s in rows:
                token = self.current_token(i)
                out.append(
                    {
                        "issue": i,
                        "state": state,
                        "until_ms": shown(s),
                        "token": token,
                        "fence": _fence(token),
                        "attempts": shown(self.r.hget(k.attempts, i)),
                        **({"stage": st} if (st := self.r.hget(k.stages(i), "stage")) else {}),
                    }
                )
            return out
        if state == "backoff":
            rows = decoded_scored(self.r.zrangebyscore(k.backoff, f"({now}", "+inf", withscores=True))
            return [
                {
                    "issue": i,
                    "state": state,
                    "until_ms": shown(s),
                    "attempts": shown(self.r.hget(k.attempts, i)),
                    "last_error": self.r.hget(k.errors, i),
                }
                for i, s in rows
            ]
        if state == "parked":
            return [
                {
                    "issue": i,
                    "state": state,
                    "parked_ms": shown(v),
                    "attempts": shown(self.r.hget(k.attempts, i)),
                    "last_error": self.r.hget(k.errors, i),
                }
                for i, v in sorted(self.r.hgetall(k.parked).items())
            ]
        if state == "done":
            out = []
            for i, v in self.done_markers():
                fence, _, at = v.partition(":")
                out.append({"issue": i, "state": state, "fence": shown(fence), "completed_ms": shown(at)})
            return sorted(out, key=lambda e: e["issue"])
        raise ValueError(f"unknown state {state!r}; expected one of {', '.join(STATES)}")

    def all_entries(self, states: Iterable[str] = STATES) -> list[dict[str, Any]]:
        return [e for s in states for e in self.entries(s)]

    def counters(self) -> dict[str, Any]:
        """Ledger counters: claimed, deduped, backed_off, parked, completed, released, ... (one hash)."""
        return parse_counters(decoded_hash(self.r.hgetall(self.keys.counters)))

    def gauges(self) -> dict[str, Any]:
        """How many issues are in flight, backing off, parked, done now."""
        p = self.r.pipeline(transaction=False)
        for command in gauge_commands(self.keys, self.now_ms()):
            p.execute_command(*command)
        return parse_gauges(p.execute())

    def done_marker(self, issue: str) -> str | None:
        """``<fence>:<completed_ms>`` when ``issue`` is done (its bucket, else the legacy hash)."""
        return decoded(self.r.hget(self.keys.done_bucket(issue), issue) or self.r.hget(self.keys.done, issue))

    def done_markers(self) -> Iterator[tuple[str, str]]:
        """Every (issue, done marker): the buckets, then the legacy hash (``SCAN``/``HSCAN``, no big reply)."""
        yield from done_markers(self.r, self.keys)

    def knows(self, issue: str) -> bool:
        """Whether the ledger holds anything of ``issue``: a claim, a fence, a done marker, attempts or an
        error, a backoff window, a park, a start, stage progress or history, a last result or usage (one round trip). An id it does
        not know was never claimed here (or its traces are gone: done markers never go)."""
        k = self.keys
        p = self.r.pipeline(transaction=False)
        p.exists(k.claim(issue), k.stages(issue), k.stage_history(issue), k.result(issue), k.usage(issue))
        for hashed in (k.fences, k.done_bucket(issue), k.done, k.attempts, k.errors, k.parked, k.started):
            p.hexists(hashed, issue)
        p.zscore(k.backoff, issue)
        p.zscore(k.inflight, issue)
        return any(p.execute())

    def stage_history(self, issue: str) -> list[dict[str, Any]]:
        """Every step of ``issue``'s staged attempts that the ledger kept (``Keys.stage_history``), oldest first:
        ``{attempt, step, stage, round, outcome, at_ms[, error]}``; an entry that is not such an object is left out."""
        return parse_steps(self.r.lrange(self.keys.stage_history(issue), 0, -1))

    def last_steps(self, issues: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The last kept step of each of ``issues`` that has one (one round trip for all of them)."""
        wanted = list(issues)
        p = self.r.pipeline(transaction=False)
        for issue in wanted:
            p.lindex(self.keys.stage_history(issue), -1)
        out = {}
        for issue, raw in zip(wanted, p.execute()):
            steps = parse_steps([raw]) if raw is not None else []
            if steps:
                out[issue] = steps[0]
        return out
