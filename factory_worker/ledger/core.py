"""The dispatch ledger: fenced claims with leases, backoff, parking, done markers, explain.

Every write is one Lua script (see ``lua/``): ``claim`` gates a whole batch in one round trip and is the
only place that decides whether an issue may be dispatched (dry runs and :meth:`Ledger.explain` run it in
its read-only mode); ``renew``, ``complete``, ``fail`` and ``release`` are compare-and-set on the claim's
token, so a stale holder gets a :class:`~factory_worker.ledger.scripts.StaleClaimError` and changes nothing.
Time is Redis server time. How each kind of write is sent (replica acknowledgements, the ledger-loss guard,
the repeats of a settle) is :mod:`~factory_worker.ledger.writes`; what the ledger shows is
:mod:`~factory_worker.ledger.views`.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import redis

from factory_worker.config.budget import BudgetSettings
from factory_worker.config.settings import DispatchSettings, Settings
from factory_worker.ledger.guard import LedgerGuard, LedgerLostError
from factory_worker.ledger.keys import Keys
from factory_worker.ledger.records import INVALID, shown
from factory_worker.ledger.redis_client import decoded
from factory_worker.ledger.results import described
from factory_worker.ledger.scripts import LedgerError, StaleClaimError, checked
from factory_worker.ledger.states import Begin, Gate

# the ledger's result types are this module's API too
from factory_worker.ledger.types import (
    WAITING,
    Claim,
    ClaimBatch,
    Explanation,
    FailResult,
    Rider,
    Skip,
    fence_in,
    fence_of,
)
from factory_worker.ledger.usage import issue_usage, utc_day
from factory_worker.ledger.views import STATES, LedgerView, done_markers  # noqa: F401 - this module's API too
from factory_worker.ledger.views import as_int as _int
from factory_worker.ledger.writes import LedgerWrites

__all__ = [
    "Claim",
    "ClaimBatch",
    "Explanation",
    "FailResult",
    "Ledger",
    "LedgerError",
    "LedgerLostError",
    "Rider",
    "Skip",
    "StaleClaimError",
    "STATES",
    "fence_of",
]

log = logging.getLogger(__name__)

#: Issues per claim script call; a larger batch is split (each call is still one round trip).
MAX_BATCH = 1000


class Ledger:
    """Claims, fencing, renew, complete, fail/backoff, park, release, explain, listing and counters.

    Its parts, public for the stage ledger and for tests: ``guard`` (the generation this process works in),
    ``writes`` (:class:`~factory_worker.ledger.writes.LedgerWrites`: how each kind of write is sent) and ``view``
    (:class:`~factory_worker.ledger.views.LedgerView`: the read side, whose answers the reading methods here give).
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        dispatch: DispatchSettings,
        rng: Callable[[], float] = random.random,
        outbox: bool = False,
        budget: BudgetSettings | None = None,
    ) -> None:
        self.r = client
        self.budget = budget or BudgetSettings()
        self.keys = keys
        self.cfg = dispatch
        self.rng = rng
        self.guard = LedgerGuard(client, keys)
        self.writes = LedgerWrites(client, keys, dispatch, self.guard, outbox)
        self.view = LedgerView(client, keys)

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis | None = None) -> Ledger:
        from factory_worker.ledger.redis_client import client as make_client

        return cls(
            client or make_client(settings),
            Keys(settings.namespace),
            settings.dispatch,
            outbox=settings.tracker.write_back,
            budget=settings.budget,
        )

    @property
    def outbox(self) -> str:
        """``"1"`` when each transition also writes its tracker event to the outbox (``tracker.write_back``)."""
        return self.writes.outbox

    @outbox.setter
    def outbox(self, value: str) -> None:
        self.writes.outbox = value

    @property
    def lease_ms(self) -> int:
        """The running lease (from ``begin``, renewed while the agent runs)."""
        return max(1, int(self.cfg.lease_ttl_s * 1000))

    @property
    def queue_lease_ms(self) -> int:
        """The lease of a claim whose agent message waits in the broker (until ``begin``)."""
        return max(1, int((self.cfg.queue_lease_s or self.cfg.lease_ttl_s) * 1000))

    # -- claims ---------------------------------------------------------------------------------------
    def claim(
        self,
        issues: Sequence[str],
        dry_run: bool = False,
        fleet_slots: bool = False,
        enough_waiting: int = 0,
        groups: Mapping[str, Sequence[tuple[str, int]]] | None = None,
    ) -> ClaimBatch:
        """Gate ``issues`` and claim every claimable one; one script call (round trip) per batch.

        ``dry_run``: the same decisions, nothing written (``claims`` are what would be claimed).
        ``fleet_slots``: also bound the in-flight count by the live workers' agent slots (the loop always
        does; a bare ledger, e.g. in tests and benchmarks of the protocol, may not).
        ``enough_waiting``: gate in batches of that many and stop once that many issues wait for room (the
        fleet is full: nothing after them could be claimed); the rest are counted in ``unexamined``. The loop
        passes its backlog's size, so a big backlog is not gated in full every poll.
        ``groups``: each issue's concurrency keys and their limits (``dispatch.concurrency``,
        :func:`factory_worker.sources.concurrency.groups`); the gate claims none whose key holds its limit of live
        claims, counted in the same script as the cap. The issues are then gated round-robin between their
        first keys (:func:`fair_order`), so one key's backlog cannot take every slot.
        """
        out = ClaimBatch(dry_run=dry_run, fleet_slots=fleet_slots)
        items = [str(i) for i in issues]
        if groups is not None:
            items = fair_order(items, groups)
        size, waiting = enough_waiting or MAX_BATCH, 0
        for start in range(0, len(items), size):
            gated = len(out.skipped)
            self._claim_chunk(items[start : start + size], out, groups)
            waiting += sum(s.reason in WAITING for s in out.skipped[gated:])
            if enough_waiting and waiting >= enough_waiting:
                out.unexamined = max(0, len(items) - start - size)
                break
        return out

    def _claim_chunk(
        self, issues: list[str], out: ClaimBatch, groups: Mapping[str, Sequence[tuple[str, int]]] | None = None
    ) -> None:
        if not issues:
            return
        args = {
            "queue_lease_ms": self.queue_lease_ms,
            "max_in_flight": self.cfg.max_in_flight,
            "owner": uuid.uuid4().hex,
            "use_slots": "1" if out.fleet_slots else "0",
            "day": utc_day(),
            "day_usd": repr(self.budget.day_usd),
            "groups": encode_groups(issues, groups),
        }
        if out.dry_run:
            reply, acked = self.writes.guarded_dry("claim", issues, mode="dry", **args), True
        else:
            reply, acked = self.writes.guarded("claim", issues, mode="claim", **args)
        claims, skipped = out.claims, out.skipped
        for issue, entry in zip(issues, reply.values):
            if entry[:1].isdigit():  # a token "<fence>:<owner>.<i>"
                if acked:
                    claims.append(Claim(issue, entry, fence_of(entry)))
                else:  # too few replicas acknowledged it: released unused, the issue waits for the next pass
                    self.writes.release_unacked(issue, entry, "claims_unacked")
                    detail = {"token": entry, "min_replica_acks": self.cfg.min_replica_acks}
                    skipped.append(Skip(issue, Gate.UNACKED, detail))
                continue
            code, _, rest = entry.partition(":")
            if code == Gate.CLAIMABLE:  # a dry run's fence: "invalid" when the stored one is not a number
                claims.append(Claim(issue, "", shown(rest)))
            else:
                skipped.append(Skip(issue, code, self._skip_detail(code, rest.split(":"))))

    @staticmethod
    def _skip_detail(code: str, parts: list[str]) -> dict[str, Any]:
        """The numbers in a skip, as stored: an int, or ``invalid`` (``records.shown``: ``inf``, garbage)."""
        a = parts[0]
        b = parts[1] if len(parts) > 1 else None
        if code == Gate.DONE:
            return {"fence": shown(a), "completed_ms": shown(b)}
        if code == Gate.IN_FLIGHT:
            return {"lease_left_ms": _int(a)}  # PTTL's own reply
        if code == Gate.BACKOFF:
            return {"until_ms": shown(a), "attempts": shown(b)}
        if code == Gate.PARKED:
            return {"parked_ms": shown(a), "attempts": shown(b)}
        if code == Gate.MAX_IN_FLIGHT:
            return {"in_flight": shown(a), "cap": shown(b)}
        if code == Gate.NO_FREE_SLOT:
            return {"in_flight": shown(a), "slots": shown(b)}
        if code == Gate.DAY_BUDGET:
            return {"spent_usd": a, "day_usd": b}
        if code == Gate.CONCURRENCY:
            return {"held": shown(a), "limit": shown(b), "key": ":".join(parts[2:])}
        return {}

    def renew(self, issue: str, token: str) -> int:
        """Extend the lease of ``token``'s claim; returns the new expiry (ms). Stale -> StaleClaimError."""
        reply = self.writes.call("renew", token=token, lease_ms=self.lease_ms, issue=issue)
        return int(checked(reply, issue, token).values[0])

    def begin(self, issue: str, token: str, task_id: str = "", hostname: str = "", pid: int = 0) -> Begin:
        """Start the agent for ``token``'s claim; also renews the lease.

        Returns ``started`` (once per token), ``duplicate`` (an agent already started for this token),
        ``revoked`` (``task_id`` was revoked) or ``killed`` (the loop is killed). When started, the agent
        task's record (written by the loop when it sent the task) becomes ``running`` and the task is listed
        as running. Stale or superseded token -> StaleClaimError.
        """
        reply, acked = self.writes.guarded(
            "begin",
            token=token,
            lease_ms=self.lease_ms,
            issue=issue,
            task_id=task_id,
            hostname=hostname,
            worker_pid=pid,
            outbox=self.outbox,
        )
        checked(reply, issue, token)
        if reply.status == "ok" and not acked:
            log.warning(
                "begin of %s by %s not acknowledged by %d replica(s): not starting it",
                issue,
                token,
                self.cfg.min_replica_acks,
            )
            return Begin.UNACKED
        return Begin.STARTED if reply.status == "ok" else Begin(reply.status)

    def complete(
        self, issue: str, token: str, rider: Rider | None = None, result: dict[str, Any] | None = None
    ) -> None:
        """Mark ``issue`` done for good (the holder only). ``rider``: see :class:`Rider`. ``result``: what the
        dispatch made (``ledger/results.py``); its summary, pull request, branch and "no changes" ride on the
        ``done`` outbox event (the tracker's comment)."""
        r = result or {}
        self.writes.settle(
            "complete",
            issue,
            token,
            rider,
            summary=str(r.get("summary") or "")[: Keys.RESULT_SUMMARY_MAX_CHARS],
            pr_url=str(r.get("pr_url") or "")[:500],
            branch=str(r.get("branch") or "")[:500],
            no_changes="1" if r.get("no_changes") else "",
        )
        log.info("issue %s done (fence %s)", issue, fence_of(token))

    def fail(self, issue: str, token: str, error: str = "", rider: Rider | None = None) -> FailResult:
        """Count a failed attempt: a backoff window, or parked after ``max_attempts``."""
        cfg = self.cfg
        reply = self.writes.settle(
            "fail",
            issue,
            token,
            rider,
            backoff_base_ms=int(cfg.backoff_base_s * 1000),
            backoff_max_ms=int(cfg.backoff_max_s * 1000),
            max_attempts=cfg.max_attempts,
            jitter=repr(cfg.backoff_jitter * self.rng()),
            error=(error or "failed")[: Keys.ERROR_MAX_CHARS],
        )
        state, at, attempts = reply.values
        log.info("issue %s failed attempt %s -> %s", issue, attempts, state)
        return FailResult(issue, state, int(attempts), int(at))

    def release(self, issue: str, token: str, reason: str = "interrupted", rider: Rider | None = None) -> None:
        """Free the claim without counting an attempt (no backoff penalty)."""
        self.writes.settle("release", issue, token, rider, reason=reason)
        log.info("issue %s released (%s)", issue, reason)

    # -- operator actions -----------------------------------------------------------------------------
    def retry(self, issue: str) -> dict[str, Any]:
        """Unpark ``issue`` / end its backoff with a fresh attempt budget. Done issues are refused."""
        reply = self.writes.call("retry", issue=issue, outbox=self.outbox)
        if reply.status == "done":
            raise LedgerError(f"issue {issue!r} is done; done is final and cannot be retried")
        was_parked, attempts, had_backoff = reply.values
        return {
            "issue": issue,
            "was_parked": bool(int(was_parked)),
            "attempts_before": int(attempts),
            "had_backoff": bool(int(had_backoff)),
        }

    # -- reading (the answers of ``view``) -------------------------------------------------------------
    def now_ms(self) -> int:
        return self.view.now_ms()

    def current_token(self, issue: str) -> str | None:
        """The token of the live claim on ``issue``, if any."""
        return self.view.current_token(issue)

    def entries(self, state: str) -> list[dict[str, Any]]:
        """The ledger issue by issue for ``state`` (one of :data:`STATES`)."""
        return self.view.entries(state)

    def all_entries(self, states: Iterable[str] = STATES) -> list[dict[str, Any]]:
        return self.view.all_entries(states)

    def counters(self) -> dict[str, int]:
        """Ledger counters: claimed, deduped, backed_off, parked, completed, released, ... (one hash)."""
        return self.view.counters()

    def gauges(self) -> dict[str, int]:
        """How many issues are in flight, backing off, parked, done now."""
        return self.view.gauges()

    def result(self, issue: str) -> dict[str, Any] | None:
        """``issue``'s last result (summary, branch, head sha, pull request URL, cost, tokens...), or None."""
        return self.view.result(issue)

    def done_marker(self, issue: str) -> str | None:
        """``<fence>:<completed_ms>`` when ``issue`` is done (its bucket, else the legacy hash)."""
        return self.view.done_marker(issue)

    def done_markers(self) -> Iterator[tuple[str, str]]:
        """Every (issue, done marker): the buckets, then the legacy hash (``SCAN``/``HSCAN``, no big reply)."""
        return self.view.done_markers()

    def explain(self, issue: str, groups: Mapping[str, Sequence[tuple[str, int]]] | None = None) -> Explanation:
        """Why ``issue`` is or is not dispatched now: the gate's own decision (``claim.lua``, read-only, with
        the fleet's slots as the loop counts them), with the details (holder, last error, the usage its
        agents reported: ``usage``; the last result its workspace made: ``result``) read beside it."""
        e = self._explain(issue, groups)
        usage = issue_usage(self.r, self.keys, issue)
        if usage:
            spent = f"{e.text}; its agents spent {usage.get('cost_usd', 0)} USD, {usage.get('tokens', 0)} tokens"
            e = replace(e, text=spent, detail={**e.detail, "usage": usage})
        result = self.view.result(issue)
        if result is None:
            return e
        return Explanation(e.issue, e.state, f"{e.text}; {described(result)}", {**e.detail, "result": result})

    def _explain(self, issue: str, groups: Mapping[str, Sequence[tuple[str, int]]] | None) -> Explanation:
        batch = self.claim([issue], dry_run=True, fleet_slots=True, groups=groups)
        k = self.keys
        token, attempts, error = (
            decoded(self.r.get(k.claim(issue))),
            self.r.hget(k.attempts, issue),
            decoded(self.r.hget(k.errors, issue)),
        )
        n = shown(attempts)  # an int, or "invalid": shown as stored, never raised
        if batch.claims:
            return Explanation(issue, Gate.CLAIMABLE, f"claimable now ({n} failed attempts so far)", {"attempts": n})
        skip = batch.skipped[0]
        d = dict(skip.detail)
        if skip.reason == Gate.DONE:
            return Explanation(issue, Gate.DONE, f"done (fence {d['fence']}); never dispatched again", d)
        if skip.reason == Gate.IN_FLIGHT:
            left = max(d["lease_left_ms"], 0)
            fence = (fence_in(token) if fence_in(token) is not None else INVALID) if token else None
            return Explanation(
                issue,
                Gate.IN_FLIGHT,
                f"held by token {token} (fence {fence}) for {left / 1000:.1f}s more",
                {"token": token, "fence": fence, "until_ms": self.now_ms() + left},
            )
        if skip.reason == Gate.PARKED and d["parked_ms"] == INVALID:
            error = f"{error or '-'} (and its parked-at time is invalid: not a number)"
        if skip.reason == Gate.PARKED and (error or "").startswith("needs-human"):
            return Explanation(
                issue,
                Gate.PARKED,
                f"escalated to a human ({error}); no attempt counted; run `factory-worker retry {issue}` to release it",
                {"attempts": n, "parked_ms": d["parked_ms"], "reason": "needs-human", "last_error": error},
            )
        if skip.reason == Gate.PARKED:
            return Explanation(
                issue,
                Gate.PARKED,
                f"parked after {n} attempts; last error: {error or '-'}; "
                f"run `factory-worker retry {issue}` to try again",
                {"attempts": n, "parked_ms": d["parked_ms"], "last_error": error},
            )
        if skip.reason == Gate.BACKOFF:
            for_s = (
                f"for {max((d['until_ms'] - self.now_ms()) / 1000, 0):.1f}s more"
                if d["until_ms"] != INVALID
                else "until a time that is invalid (its score is not a number)"
            )
            return Explanation(
                issue,
                Gate.BACKOFF,
                f"backing off {for_s} after attempt {n}; last error: {error or '-'}",
                {"attempts": n, "until_ms": d["until_ms"], "last_error": error},
            )
        if skip.reason == Gate.MAX_IN_FLIGHT:
            return Explanation(
                issue,
                Gate.MAX_IN_FLIGHT,
                f"claimable, but the in-flight cap is reached ({d['in_flight']}/{d['cap']})",
                {**d, "attempts": n},
            )
        if skip.reason == Gate.NO_FREE_SLOT:
            return Explanation(
                issue,
                Gate.NO_FREE_SLOT,
                f"claimable, but no free agent slot ({d['in_flight']} in "
                f"flight, {d['slots']} slots on live agent workers)",
                {**d, "attempts": n},
            )
        if skip.reason == Gate.CONCURRENCY:
            return Explanation(
                issue,
                Gate.CONCURRENCY,
                f"claimable, but concurrency key {d['key']} at its limit {d['limit']}",
                {**d, "attempts": n},
            )
        if skip.reason == Gate.DAY_BUDGET:
            return Explanation(
                issue,
                Gate.DAY_BUDGET,
                f"day budget spent ({d['spent_usd']} of {d['day_usd']} USD today, UTC): "
                "nothing is claimed until the next UTC day",
                {**d, "attempts": n},
            )
        return Explanation(issue, skip.reason, f"not dispatched: the loop is {skip.reason}", {"attempts": n})


def fair_order(issues: list[str], groups: Mapping[str, Sequence[tuple[str, int]]]) -> list[str]:
    """``issues`` round-robin between their first concurrency keys (each key's issues in their order; issues
    without a key form one more group), so the gate meets every key's next issue before a key's second."""
    queues: dict[str | None, list[str]] = {}
    for issue in issues:
        keys = groups.get(issue) or ()
        queues.setdefault(keys[0][0] if keys else None, []).append(issue)
    if len(queues) < 2:
        return issues
    out: list[str] = []
    lanes = list(queues.values())
    for i in range(max(len(q) for q in lanes)):
        out.extend(q[i] for q in lanes if i < len(q))
    return out


def encode_groups(issues: Sequence[str], groups: Mapping[str, Sequence[tuple[str, int]]] | None) -> str:
    """``claim.lua``'s ARGV ``groups``: '' without rules, else a field per issue (see the script)."""
    if groups is None:
        return ""
    fields = "\x1e".join("\x1f".join(f"{k}\x1f{int(limit)}" for k, limit in groups.get(i) or ()) for i in issues)
    return fields or "\x1e"  # rules, but no key here: still counted (its stale keys dropped at its claim)
