"""The dispatch ledger: fenced claims with leases, backoff, parking, done markers, explain.

Every write is one Lua script (see ``lua/``): ``claim`` gates a whole batch in one round trip; ``renew``,
``complete``, ``fail`` and ``release`` are compare-and-set on the claim's token, so a stale holder gets a
:class:`~factory_worker.scripts.StaleClaimError` and changes nothing. Time is Redis server time.
"""

from __future__ import annotations

import logging
import random
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import redis

from .config import DispatchSettings, Settings
from .keys import Keys
from .redis_client import server_now_ms
from .scripts import LedgerError, StaleClaimError, checked, scripts_for

__all__ = [
    "Claim", "ClaimBatch", "Explanation", "FailResult", "Ledger", "LedgerError", "Skip", "StaleClaimError",
    "STATES", "fence_of",
]

log = logging.getLogger(__name__)

STATES = ("in-flight", "backoff", "parked", "done")
#: Issues per claim script call; a larger batch is split (each call is still one round trip).
MAX_BATCH = 1000
ERROR_MAX_CHARS = 500


def fence_of(token: str) -> int:
    """The fencing number inside a token ``"<fence>:<owner>"``."""
    head, _, _ = token.partition(":")
    if not head.isdigit():
        raise ValueError(f"malformed dispatch token {token!r}")
    return int(head)


@dataclass(frozen=True)
class Claim:
    issue: str
    token: str
    fence: int


@dataclass(frozen=True)
class Skip:
    issue: str
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClaimBatch:
    claims: list[Claim] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


@dataclass(frozen=True)
class FailResult:
    issue: str
    state: str  # "backoff" | "parked"
    attempts: int
    until_ms: int  # end of the backoff window, or the time it was parked


@dataclass(frozen=True)
class Explanation:
    issue: str
    state: str  # done | in-flight | parked | backoff | max-in-flight | claimable
    text: str
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int(v: Any, default: int = 0) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return default


def _inflight_min(now_ms: int) -> int:
    """Lowest ``inflight`` score still counted as live at ``now_ms``, exactly as ``claim.lua`` counts it.

    Redis keeps a key alive through the millisecond it expires at (and a script's expiry clock may lag
    TIME by 1 ms), so a lease ending at ``now - 1`` may still be live: it keeps counting.
    """
    return now_ms - 1


class Ledger:
    """Claims, fencing, renew, complete, fail/backoff, park, release, explain, listing and counters."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        dispatch: DispatchSettings,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.r = client
        self.keys = keys
        self.cfg = dispatch
        self.rng = rng
        self._s = scripts_for(client)

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis | None = None) -> "Ledger":
        from .redis_client import client as make_client

        return cls(client or make_client(settings), Keys(settings.namespace), settings.dispatch)

    @property
    def lease_ms(self) -> int:
        return max(1, int(self.cfg.lease_ttl_s * 1000))

    def now_ms(self) -> int:
        return server_now_ms(self.r)

    # -- claims ---------------------------------------------------------------------------------------
    def claim(self, issues: Sequence[str]) -> ClaimBatch:
        """Gate ``issues`` and claim every claimable one; one script call (round trip) per batch."""
        out = ClaimBatch()
        items = [str(i) for i in issues]
        for start in range(0, len(items), MAX_BATCH):
            self._claim_chunk(items[start : start + MAX_BATCH], out)
        return out

    def _claim_chunk(self, issues: list[str], out: ClaimBatch) -> None:
        if not issues:
            return
        k = self.keys
        fixed = [k.fences, k.done, k.inflight, k.backoff, k.parked, k.attempts, k.counters, k.kill, k.paused]
        res = self._s["claim"](
            keys=fixed + [k.claim(i) for i in issues],
            args=[self.lease_ms, self.cfg.max_in_flight, uuid.uuid4().hex, *issues],
        )
        claims, skipped = out.claims, out.skipped
        for issue, entry in zip(issues, res):
            if entry[:1].isdigit():  # a token "<fence>:<owner>.<i>"
                claims.append(Claim(issue, entry, int(entry.partition(":")[0])))
            else:
                code, _, rest = entry.partition(":")
                skipped.append(Skip(issue, code, self._skip_detail(code, rest.split(":"))))

    @staticmethod
    def _skip_detail(code: str, parts: list[str]) -> dict[str, Any]:
        a = parts[0]
        b = parts[1] if len(parts) > 1 else ""
        if code == "done":
            return {"fence": _int(a), "completed_ms": _int(b)}
        if code == "in-flight":
            return {"lease_left_ms": _int(a)}
        if code == "backoff":
            return {"until_ms": _int(a), "attempts": _int(b)}
        if code == "parked":
            return {"parked_ms": _int(a), "attempts": _int(b)}
        if code == "max-in-flight":
            return {"in_flight": _int(a), "cap": _int(b)}
        return {}

    def renew(self, issue: str, token: str) -> int:
        """Extend the lease of ``token``'s claim; returns the new expiry (ms). Stale -> StaleClaimError."""
        k = self.keys
        res = self._s["renew"](keys=[k.claim(issue), k.inflight], args=[token, self.lease_ms, issue])
        return int(checked(res, issue, token)[1])

    def begin(self, issue: str, token: str, task_id: str = "", run_id: str | None = None,
              hostname: str = "", pid: int = 0) -> str:
        """Start the agent for ``token``'s claim; also renews the lease.

        Returns ``"started"`` (once per token), ``"duplicate"`` (an agent already started for this token),
        ``"revoked"`` (``task_id`` was revoked) or ``"killed"`` (the loop is killed). When started, the
        agent task is recorded under ``task_id`` and listed as running. Stale or superseded token ->
        StaleClaimError.
        """
        k = self.keys
        res = self._s["begin"](
            keys=[k.claim(issue), k.inflight, k.started, k.revoked, k.kill, k.agent_task(task_id), k.agents],
            args=[token, self.lease_ms, issue, task_id, run_id or "", hostname, pid],
        )
        code = int(res[0])
        if code == 2:
            return "duplicate"
        if code == 3:
            return str(res[1])
        checked(res, issue, token)
        return "started"

    def complete(self, issue: str, token: str) -> None:
        """Mark ``issue`` done for good (the holder only)."""
        k = self.keys
        res = self._s["complete"](
            keys=[k.claim(issue), k.inflight, k.fences, k.done, k.backoff, k.attempts, k.errors, k.counters,
                  k.started],
            args=[token, issue],
        )
        checked(res, issue, token)
        log.info("issue %s done (fence %s)", issue, fence_of(token))

    def fail(self, issue: str, token: str, error: str = "") -> FailResult:
        """Count a failed attempt: a backoff window, or parked after ``max_attempts``."""
        k = self.keys
        cfg = self.cfg
        res = self._s["fail"](
            keys=[k.claim(issue), k.inflight, k.backoff, k.parked, k.attempts, k.errors, k.counters, k.started],
            args=[
                token, issue, int(cfg.backoff_base_s * 1000), int(cfg.backoff_max_s * 1000), cfg.max_attempts,
                repr(cfg.backoff_jitter * self.rng()), (error or "failed")[:ERROR_MAX_CHARS],
            ],
        )
        _, state, at, attempts = checked(res, issue, token)
        log.info("issue %s failed attempt %s -> %s", issue, attempts, state)
        return FailResult(issue, state, int(attempts), int(at))

    def release(self, issue: str, token: str, reason: str = "interrupted") -> None:
        """Free the claim without counting an attempt (no backoff penalty)."""
        k = self.keys
        res = self._s["release"](keys=[k.claim(issue), k.inflight, k.counters, k.started],
                                 args=[token, issue, reason])
        checked(res, issue, token)
        log.info("issue %s released (%s)", issue, reason)

    def current_token(self, issue: str) -> str | None:
        """The token of the live claim on ``issue``, if any."""
        return self.r.get(self.keys.claim(issue))

    # -- operator actions -----------------------------------------------------------------------------
    def retry(self, issue: str) -> dict[str, Any]:
        """Unpark ``issue`` / end its backoff with a fresh attempt budget. Done issues are refused."""
        k = self.keys
        res = self._s["retry"](
            keys=[k.done, k.parked, k.backoff, k.attempts, k.errors, k.counters], args=[issue]
        )
        if res[0] == "done":
            raise LedgerError(f"issue {issue!r} is done; done is final and cannot be retried")
        return {"issue": issue, "was_parked": bool(int(res[1])), "attempts_before": int(res[2]),
                "had_backoff": bool(int(res[3]))}

    # -- reading --------------------------------------------------------------------------------------
    def explain(self, issue: str) -> Explanation:
        """Why ``issue`` is or is not claimable now, from one atomic snapshot."""
        k = self.keys
        p = self.r.pipeline(transaction=True)
        p.time().hget(k.done, issue).get(k.claim(issue)).pttl(k.claim(issue)).hget(k.parked, issue)
        p.zscore(k.backoff, issue).hget(k.attempts, issue).hget(k.errors, issue)
        (sec, usec), done, token, pttl, parked, until, attempts, error = p.execute()
        now = int(sec) * 1000 + int(usec) // 1000
        n = _int(attempts)
        if done:
            fence, _, at = done.partition(":")
            return Explanation(issue, "done", f"done (fence {fence}); never dispatched again",
                               {"fence": _int(fence), "completed_ms": _int(at)})
        if token:
            until_ms = now + max(_int(pttl), 0)
            return Explanation(issue, "in-flight", f"held by token {token} (fence {fence_of(token)}) "
                               f"for {max(_int(pttl), 0) / 1000:.1f}s more",
                               {"token": token, "fence": fence_of(token), "until_ms": until_ms})
        if parked:
            return Explanation(issue, "parked", f"parked after {n} attempts; last error: {error or '-'}; "
                               f"run `factory-worker retry {issue}` to try again",
                               {"attempts": n, "parked_ms": _int(parked), "last_error": error})
        if until is not None and float(until) > now:
            return Explanation(issue, "backoff", f"backing off for {(float(until) - now) / 1000:.1f}s more "
                               f"after attempt {n}; last error: {error or '-'}",
                               {"attempts": n, "until_ms": int(float(until)), "last_error": error})
        in_flight = self.r.zcount(k.inflight, _inflight_min(now), "+inf")
        if in_flight >= self.cfg.max_in_flight:
            return Explanation(issue, "max-in-flight", f"claimable, but the in-flight cap is reached "
                               f"({in_flight}/{self.cfg.max_in_flight})",
                               {"in_flight": in_flight, "cap": self.cfg.max_in_flight, "attempts": n})
        return Explanation(issue, "claimable", f"claimable now ({n} failed attempts so far)", {"attempts": n})

    def entries(self, state: str) -> list[dict[str, Any]]:
        """The ledger issue by issue for ``state`` (one of :data:`STATES`)."""
        k = self.keys
        now = self.now_ms()
        if state == "in-flight":
            rows = self.r.zrangebyscore(k.inflight, _inflight_min(now), "+inf", withscores=True)
            return [{"issue": i, "state": state, "until_ms": int(s), "token": self.current_token(i)}
                    for i, s in rows]
        if state == "backoff":
            rows = self.r.zrangebyscore(k.backoff, f"({now}", "+inf", withscores=True)
            return [{"issue": i, "state": state, "until_ms": int(s), "attempts": _int(self.r.hget(k.attempts, i)),
                     "last_error": self.r.hget(k.errors, i)} for i, s in rows]
        if state == "parked":
            return [{"issue": i, "state": state, "parked_ms": _int(v), "attempts": _int(self.r.hget(k.attempts, i)),
                     "last_error": self.r.hget(k.errors, i)} for i, v in sorted(self.r.hgetall(k.parked).items())]
        if state == "done":
            out = []
            for i, v in self.r.hscan_iter(k.done):
                fence, _, at = v.partition(":")
                out.append({"issue": i, "state": state, "fence": _int(fence), "completed_ms": _int(at)})
            return sorted(out, key=lambda e: e["issue"])
        raise ValueError(f"unknown state {state!r}; expected one of {', '.join(STATES)}")

    def all_entries(self, states: Iterable[str] = STATES) -> list[dict[str, Any]]:
        return [e for s in states for e in self.entries(s)]

    def counters(self) -> dict[str, int]:
        """Ledger counters: claimed, deduped, backed_off, parked, completed, released, ... (one hash)."""
        raw = self.r.hgetall(self.keys.counters)
        base = dict.fromkeys(("claimed", "deduped", "backed_off", "parked", "completed", "released"), 0)
        base.update({name: _int(v) for name, v in raw.items()})
        return base

    def gauges(self) -> dict[str, int]:
        """How many issues are in flight, backing off, parked, done now."""
        k = self.keys
        now = self.now_ms()
        p = self.r.pipeline(transaction=False)
        p.zcount(k.inflight, _inflight_min(now), "+inf").zcount(k.backoff, f"({now}", "+inf")
        p.hlen(k.parked).hlen(k.done)
        inflight, backoff, parked, done = p.execute()
        return {"in_flight": inflight, "backoff": backoff, "parked": parked, "done": done}
