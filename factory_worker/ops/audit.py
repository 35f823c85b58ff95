"""``factory-worker audit``: check the ledger's invariants and list every violation.

Checks (each a name in the report):

- ``claim-without-inflight`` / ``inflight-without-claim``: every live claim key has its in-flight entry and
  every live in-flight entry its claim key (an entry whose lease ended more than 1 ms ago is not live, as the
  gate counts it);
- ``started-not-claimed``: an issue marked as having a started agent is held by that very token;
- ``done-and-*``: a done issue is never in flight, backing off or parked;
- ``fence-below-done``: no fence counter is below the fence of the issue's done marker;
- ``invalid-number``: every fence counter, done marker (``<fence>:<completed_ms>``) and in-flight or backoff
  score is a finite integer within Redis's 64-bit range (``inf``, ``1e999`` or garbage is reported, never raised);
- ``agent-on-dead-worker``: every agent task listed as running belongs to a worker whose presence is live.

A live fleet moves while it is read, so a violation is reported only if a second read, ``recheck_s``
later, still shows it. Every chaos test ends with an audit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import redis

from factory_worker.ledger.core import done_markers
from factory_worker.ledger.keys import Keys
from factory_worker.ledger.records import number
from factory_worker.ledger.redis_client import decoded, server_now_ms
from factory_worker.ledger.types import fence_in
from factory_worker.loop.presence import worker_alive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Violation:
    check: str
    subject: str  # the issue or agent task id
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fence(value: str | None) -> int:
    return fence_in(value) or 0


def _claim_issues(r: redis.Redis, keys: Keys) -> dict[str, str]:
    """issue -> token of every claim key (SCAN: may miss a claim made while scanning; the recheck covers it)."""
    prefix = keys.claim("")
    names = list(r.scan_iter(match=keys.claim("*"), count=1000))
    tokens = r.mget(names) if names else []
    return {n[len(prefix) :]: decoded(t) for n, t in zip(names, tokens) if t is not None}


def _snapshot(r: redis.Redis, keys: Keys) -> dict[str, Any]:
    # done markers first (scanned, bucket by bucket): an issue completed after this is simply not seen as
    # done, never as done-and-in-flight; everything else comes from one atomic pipeline after it
    done = dict(done_markers(r, keys))
    p = r.pipeline(transaction=True)
    p.time()
    p.zrange(keys.inflight, 0, -1, withscores=True)
    p.hgetall(keys.started)
    p.zrange(keys.backoff, 0, -1, withscores=True)
    p.hkeys(keys.parked)
    p.hgetall(keys.fences)
    p.smembers(keys.agents)
    (sec, usec), inflight, started, backoff, parked, fences, agents = p.execute()
    now = int(sec) * 1000 + int(usec) // 1000
    scores = {"in-flight": dict(inflight), "backoff": dict(backoff)}
    return {
        "now": now,
        "claims": _claim_issues(r, keys),
        "scores": scores,
        "inflight": {i for i, s in inflight if s >= Keys.live_from(now)},
        "started": started,
        "done": done,
        "backoff": {i for i, s in backoff if s > now},
        "parked": set(parked),
        "fences": fences,
        "agents": agents,
    }


def _violations(r: redis.Redis, keys: Keys, snap: dict[str, Any]) -> Iterator[Violation]:
    claims, inflight = snap["claims"], snap["inflight"]
    for issue in sorted(set(claims) - inflight):
        yield Violation("claim-without-inflight", issue, f"claim {claims[issue]} is not counted in flight")
    for issue in sorted(inflight - set(claims)):
        yield Violation("inflight-without-claim", issue, "counted in flight, but no claim key holds it")
    for issue, token in sorted(snap["started"].items()):
        if claims.get(issue) != token:
            yield Violation(
                "started-not-claimed", issue, f"agent started for {token}, claim is {claims.get(issue) or 'gone'}"
            )
    done = snap["done"]
    for name, members in (
        ("in-flight", set(claims) | inflight),
        ("backoff", snap["backoff"]),
        ("parked", snap["parked"]),
    ):
        for issue in sorted(members & set(done)):
            yield Violation(f"done-and-{name}", issue, f"done ({done[issue]}) but also {name}")
    yield from _invalid_numbers(snap)
    for issue, fence in sorted(snap["fences"].items()):
        if issue in done and number(fence) is not None and int(fence) < _fence(done[issue]):
            yield Violation("fence-below-done", issue, f"fence {fence} < done fence {_fence(done[issue])}")
    for task_id in sorted(snap["agents"]):
        host = decoded(r.hget(keys.agent_task(task_id), "hostname"))
        if not host or not worker_alive(r, keys, host):
            yield Violation(
                "agent-on-dead-worker",
                task_id,
                f"listed as running on {host or 'an unknown worker'}, which has no live presence",
            )


def _shown(value: Any) -> str:
    text = str(value)
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def _invalid_numbers(snap: dict[str, Any]) -> Iterator[Violation]:
    for issue, fence in sorted(snap["fences"].items()):
        if number(fence) is None:
            yield Violation("invalid-number", issue, f"its fence counter holds {_shown(fence)}, not a number")
    for issue, marker in sorted(snap["done"].items()):
        if fence_in(marker) is None or number(marker.partition(":")[2]) is None:
            yield Violation("invalid-number", issue, f"its done marker is {_shown(marker)}, not <fence>:<completed_ms>")
    for name, scores in snap["scores"].items():
        for issue, score in sorted(scores.items()):
            if number(score) is None:
                yield Violation("invalid-number", issue, f"its {name} score is {_shown(score)}, not a time in ms")


def audit(r: redis.Redis, keys: Keys, recheck_s: float = 0.5) -> dict[str, Any]:
    """Every invariant violation that persists across two reads ``recheck_s`` apart (Redis errors propagate)."""
    first = {(v.check, v.subject) for v in _violations(r, keys, _snapshot(r, keys))}
    if first and recheck_s > 0:
        time.sleep(recheck_s)
    found = [v for v in _violations(r, keys, _snapshot(r, keys)) if (v.check, v.subject) in first] if first else []
    return {
        "namespace": keys.namespace,
        "checked_at_ms": server_now_ms(r),
        "clean": not found,
        "violations": [v.as_dict() for v in found],
    }
