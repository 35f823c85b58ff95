"""Property-based test of the claim protocol: a hypothesis state machine against a model of the ledger.

Runs on fakeredis with the controllable clock (the ``fake_redis`` / ``clock`` fixtures); every example
starts from an empty Redis and a fresh model. Time is moved in whole milliseconds, kept off the exact
millisecond a lease ends (that boundary has its own deterministic test in test_ledger.py) but driven right
onto backoff boundaries. Invariants: never two live holders (the model's single holder is Redis' claim),
a token that is not the current holder's raises StaleClaimError and changes nothing, done is final,
backoff windows are honoured to the millisecond, fences per issue strictly increase, and the number of
live claims never exceeds max_in_flight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from factory_worker.ledger.core import Ledger, LedgerError, StaleClaimError, done_markers, fence_of
from tests.conftest import roomy_fleet

ISSUES = ["i0", "i1", "i2", "i3"]
CAP = 2
LEASE_MS = 10_000
BASE_MS = 1_000
MAX_MS = 1_500  # the second window (2 000 ms) is clamped to the max
MAX_ATTEMPTS = 3
JITTER = 0.5
START_MS = 1_800_000_000_000

TOKEN_KINDS = ("current", "stale", "other-issue", "forged")


@dataclass
class Held:
    token: str
    fence: int
    expires_ms: int


def snapshot(r, keys) -> dict:
    out = {}
    for key in sorted(r.scan_iter(match=keys.pattern(), count=1000)):
        kind = r.type(key)
        value = {"string": r.get, "hash": r.hgetall, "zset": lambda k: r.zrange(k, 0, -1, withscores=True)}[kind](key)
        out[key] = (kind, value, r.pttl(key))
    return out


def decisions(issues: list[str], batch) -> list[str]:
    """The gate's decision per input issue, in input order: "ok" (claimed) or the skip reason."""
    claimed = {c.issue for c in batch.claims}
    skipped = iter(batch.skipped)
    got, ok = [], set()
    for issue in issues:
        if issue in claimed and issue not in ok:
            got.append("ok")
            ok.add(issue)
        else:
            s = next(skipped)
            assert s.issue == issue
            got.append(s.reason)
    return got


class LedgerMachine(RuleBasedStateMachine):
    # set by the test function from its fixtures (fakeredis client, fake clock, keys, dispatch settings)
    r = clock = keys = dispatch = None

    @initialize()
    def reset(self) -> None:
        self.r.flushall()
        roomy_fleet(self.r, self.keys)
        self.ms = START_MS
        self._set_clock()
        self.jitter = 0.0
        self.ledger = Ledger(self.r, self.keys, self.dispatch, rng=lambda: self.jitter)
        self.holders: dict[str, Held] = {}
        self.fences: dict[str, int] = {}
        self.tokens: dict[str, list[str]] = {i: [] for i in ISSUES}  # every token ever issued, per issue
        self.all_tokens: set[str] = set()
        self.done: set[str] = set()
        self.parked: set[str] = set()
        self.attempts: dict[str, int] = {}
        self.backoff: dict[str, int] = {}  # issue -> until_ms

    # -- time --------------------------------------------------------------------------------------------
    def _set_clock(self) -> None:
        self.clock.now = self.ms / 1000 + 0.0004  # mid-millisecond: robust to float rounding

    def _move_to(self, ms: int) -> None:
        assert ms >= self.ms
        self.ms = ms
        # drop leases that ended (they expire in Redis); keep off the exact end millisecond of a live lease
        while any(abs(h.expires_ms - self.ms) <= 1 for h in self.holders.values()):
            self.ms += 1
        for issue in [i for i, h in self.holders.items() if h.expires_ms < self.ms]:
            del self.holders[issue]
        self._set_clock()
        assert self.ledger.now_ms() == self.ms

    @rule(ms=st.one_of(st.integers(1, 3_000), st.sampled_from([LEASE_MS - 5, LEASE_MS + 5, 2 * LEASE_MS])))
    def advance(self, ms: int) -> None:
        self._move_to(self.ms + ms)

    @precondition(lambda self: any(u > self.ms + 1 for u in self.backoff.values()))
    @rule(
        data=st.data(),
        offset=st.sampled_from([-1, 0, 1]),
        fail_again=st.sampled_from([True, True, False]),
        jitter=st.floats(0.0, 0.999999),
    )
    def backoff_boundary(self, data, offset: int, fail_again: bool, jitter: float) -> None:
        """Jump to 1 ms before / at / after a backoff window's end and claim the issue (then maybe fail it)."""
        issue = data.draw(st.sampled_from(sorted(i for i, u in self.backoff.items() if u > self.ms + 1)))
        self._move_to(self.backoff[issue] + offset)
        self.claim([issue])
        if fail_again and issue in self.holders:
            self._fail(issue, "current", jitter)

    # -- claims ------------------------------------------------------------------------------------------
    def _expected(self, issues: list[str]) -> list[str]:
        seen: set[str] = set()
        live = len(self.holders)
        out = []
        for issue in issues:
            if issue in seen:
                out.append("duplicate")
                continue
            seen.add(issue)
            if issue in self.done:
                out.append("done")
            elif issue in self.holders:
                out.append("in-flight")
            elif issue in self.parked:
                out.append("parked")
            elif self.backoff.get(issue, 0) > self.ms:
                out.append("backoff")
            elif live >= CAP:
                out.append("max-in-flight")
            else:
                out.append("ok")
                live += 1
        return out

    @rule(issues=st.lists(st.sampled_from(ISSUES), min_size=1, max_size=5))
    def claim(self, issues: list[str]) -> None:
        expected = self._expected(issues)
        batch = self.ledger.claim(issues)
        got = decisions(issues, batch)
        assert got == expected, (issues, got, expected)
        for c in batch.claims:
            # fences per issue strictly increase (across expiry, release, fail and retry)
            assert c.fence == self.fences.get(c.issue, 0) + 1
            assert fence_of(c.token) == c.fence
            assert c.token not in self.all_tokens, "a token was issued twice"
            self.fences[c.issue] = c.fence
            self.tokens[c.issue].append(c.token)
            self.all_tokens.add(c.token)
            self.holders[c.issue] = Held(c.token, c.fence, self.ms + LEASE_MS)
            self.backoff.pop(c.issue, None)
        for s in batch.skipped:
            if s.reason == "backoff":
                assert s.detail["until_ms"] == self.backoff[s.issue] > self.ms
            if s.reason == "in-flight":
                assert s.detail["lease_left_ms"] == self.holders[s.issue].expires_ms - self.ms

    # -- compare-and-set writes --------------------------------------------------------------------------
    def _token(self, issue: str, kind: str) -> str | None:
        held = self.holders.get(issue)
        if kind == "current":
            return held.token if held else None
        if kind == "stale":
            old = [t for t in self.tokens[issue] if not held or t != held.token]
            return old[-1] if old else None
        if kind == "other-issue":
            others = [t for i, ts in self.tokens.items() if i != issue for t in ts]
            return others[-1] if others else None
        return f"{self.fences.get(issue, 0) + 1}:forged"

    def _cas(self, op, issue: str, kind: str):
        """Run ``op(token)``: success iff the token is the live holder's; otherwise nothing changes."""
        token = self._token(issue, kind)
        if token is None:
            return None, None
        held = self.holders.get(issue)
        if held is not None and token == held.token:
            return token, op(token)
        before = snapshot(self.r, self.keys)
        with pytest.raises(StaleClaimError) as exc:
            op(token)
        assert exc.value.current == (held.token if held else None)
        assert snapshot(self.r, self.keys) == before, "a stale write changed the ledger"
        return None, None

    @precondition(lambda self: bool(self.holders))
    @rule(
        data=st.data(),
        op=st.sampled_from(["renew", "complete", "fail", "fail", "release"]),
        jitter=st.one_of(st.just(0.0), st.floats(0.0, 0.999999)),
    )
    def holder_writes(self, data, op: str, jitter: float) -> None:
        """The live holder writes with its own token (the common path, driven more often than chance)."""
        issue = data.draw(st.sampled_from(sorted(self.holders)))
        self._write(op, issue, "current", jitter)

    @precondition(lambda self: bool(self.holders))
    @rule(data=st.data(), jitter=st.floats(0.0, 0.999999))
    def holder_fails(self, data, jitter: float) -> None:
        """Failures drive backoff and parking: give them a rule of their own."""
        self._fail(data.draw(st.sampled_from(sorted(self.holders))), "current", jitter)

    @rule(
        op=st.sampled_from(["renew", "complete", "fail", "release"]),
        issue=st.sampled_from(ISSUES),
        kind=st.sampled_from(TOKEN_KINDS),
        jitter=st.floats(0.0, 0.999999),
    )
    def any_write(self, op: str, issue: str, kind: str, jitter: float) -> None:
        """Any token on any issue: the current holder's succeeds, every other raises and changes nothing."""
        self._write(op, issue, kind, jitter)

    def _write(self, op: str, issue: str, kind: str, jitter: float) -> None:
        if op == "fail":
            self._fail(issue, kind, jitter)
        else:
            getattr(self, "_" + op)(issue, kind)

    def _renew(self, issue: str, kind: str) -> None:
        token, expires = self._cas(lambda t: self.ledger.renew(issue, t), issue, kind)
        if token:
            assert expires == self.ms + LEASE_MS
            self.holders[issue].expires_ms = expires

    def _complete(self, issue: str, kind: str) -> None:
        token, _ = self._cas(lambda t: self.ledger.complete(issue, t), issue, kind)
        if token:
            del self.holders[issue]
            self.done.add(issue)
            self.attempts.pop(issue, None)
            self.backoff.pop(issue, None)

    def _fail(self, issue: str, kind: str, jitter: float) -> None:
        self.jitter = jitter
        token, res = self._cas(lambda t: self.ledger.fail(issue, t, "boom"), issue, kind)
        if not token:
            return
        del self.holders[issue]
        n = self.attempts.get(issue, 0) + 1
        self.attempts[issue] = n
        assert res.attempts == n
        if n >= MAX_ATTEMPTS:
            assert (res.state, res.until_ms) == ("parked", self.ms)
            self.parked.add(issue)
            self.backoff.pop(issue, None)
        else:
            window = min(BASE_MS * 2 ** (n - 1), MAX_MS)
            assert res.state == "backoff"
            assert res.until_ms == self.ms + math.floor(window * (1 + float(repr(JITTER * jitter))))
            assert self.ms + window <= res.until_ms < self.ms + window * (1 + JITTER) + 1
            self.backoff[issue] = res.until_ms

    def _release(self, issue: str, kind: str) -> None:
        token, _ = self._cas(lambda t: self.ledger.release(issue, t, "interrupted"), issue, kind)
        if token:
            del self.holders[issue]  # no attempt counted, no backoff

    @rule(issue=st.sampled_from(ISSUES))
    def retry(self, issue: str) -> None:
        if issue in self.done:
            before = snapshot(self.r, self.keys)
            with pytest.raises(LedgerError):
                self.ledger.retry(issue)
            assert snapshot(self.r, self.keys) == before
            return
        res = self.ledger.retry(issue)
        assert res["was_parked"] == (issue in self.parked)
        assert res["attempts_before"] == self.attempts.get(issue, 0)
        self.parked.discard(issue)
        self.attempts.pop(issue, None)
        self.backoff.pop(issue, None)

    @rule(issues=st.lists(st.sampled_from(ISSUES), min_size=1, max_size=5))
    def dry_claim(self, issues: list[str]) -> None:
        """The gate's read-only mode takes the real claim's decisions, fences included, and writes nothing."""
        before = snapshot(self.r, self.keys)
        batch = self.ledger.claim(issues, dry_run=True)
        assert snapshot(self.r, self.keys) == before
        got = decisions(issues, batch)
        assert got == self._expected(issues), (issues, got)
        for c in batch.claims:
            assert c.fence == self.fences.get(c.issue, 0) + 1 and c.token == ""

    @rule(issue=st.sampled_from(ISSUES))
    def explain(self, issue: str) -> None:
        state = self.ledger.explain(issue).state
        expected = self._expected([issue])[0]
        assert state == {"ok": "claimable"}.get(expected, expected)

    # -- invariants --------------------------------------------------------------------------------------
    @invariant()
    def redis_matches_the_model(self) -> None:
        if not hasattr(self, "ledger"):
            return
        p = self.r.pipeline(transaction=False)
        for issue in ISSUES:
            p.get(self.keys.claim(issue))
        current = dict(zip(ISSUES, p.execute()))
        # one holder per issue, and it is the model's (or nobody)
        assert current == {i: (self.holders[i].token if i in self.holders else None) for i in ISSUES}
        live = [i for i, t in current.items() if t is not None]
        assert len(live) <= CAP, f"{len(live)} live claims > cap {CAP}"
        assert not (set(live) & self.done), "a done issue is claimed"
        assert {i for i, _ in done_markers(self.r, self.keys)} == self.done
        assert set(self.r.hkeys(self.keys.parked)) == self.parked
        assert self.ledger.gauges()["in_flight"] == len(self.holders)


def test_claim_protocol_state_machine(fake_redis, clock, keys, make_settings):
    LedgerMachine.r, LedgerMachine.clock, LedgerMachine.keys = fake_redis, clock, keys
    LedgerMachine.dispatch = make_settings(
        dispatch={
            "max_in_flight": CAP,
            "lease_ttl_s": LEASE_MS / 1000,
            "queue_lease_s": LEASE_MS / 1000,
            "max_attempts": MAX_ATTEMPTS,
            "backoff_base_s": BASE_MS / 1000,
            "backoff_max_s": MAX_MS / 1000,
            "backoff_jitter": JITTER,
        }
    ).dispatch
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=150,
            stateful_step_count=40,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
