"""The dispatch ledger on fakeredis with a controllable clock: every operation and its edge cases."""

from __future__ import annotations

import random

import pytest

from factory_worker.config.settings import load_settings
from factory_worker.ledger.core import MAX_BATCH, STATES, Claim, Ledger, LedgerError, StaleClaimError, fence_of
from tests.conftest import roomy_fleet

LEASE_S = 30.0


@pytest.fixture
def dispatch(make_settings):
    """Dispatch settings for the ledger tests: 30 s lease, cap 4, 3 attempts, backoff 5 s .. 300 s, jitter 0.1."""

    def _make(**over):
        # queue lease = running lease: these tests are about a claim's lease, queued or running
        cfg = {
            "lease_ttl_s": LEASE_S,
            "queue_lease_s": LEASE_S,
            "max_in_flight": 4,
            "max_attempts": 3,
            "backoff_base_s": 5.0,
            "backoff_max_s": 300.0,
            "backoff_jitter": 0.1,
        }
        cfg.update(over)
        return make_settings(dispatch=cfg).dispatch

    return _make


@pytest.fixture
def ledger(fake_redis, keys, dispatch) -> Ledger:
    """A ledger whose jitter is always 0 (deterministic backoff windows), with a roomy agent fleet."""
    roomy_fleet(fake_redis, keys)
    return Ledger(fake_redis, keys, dispatch(), rng=lambda: 0.0)


def set_ms(clock, ms: int) -> None:
    """Move the fake server clock into the middle of millisecond ``ms`` (robust to float rounding)."""
    clock.now = ms / 1000 + 0.0004


def snapshot(r, keys) -> dict:
    """Every key of the namespace with its type, value and remaining TTL: to prove a write changed nothing."""
    out = {}
    for key in sorted(r.scan_iter(match=keys.pattern(), count=1000)):
        kind = r.type(key)
        if kind == "string":
            value = r.get(key)
        elif kind == "hash":
            value = r.hgetall(key)
        elif kind == "zset":
            value = r.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = sorted(r.smembers(key))
        else:  # pragma: no cover - the ledger uses no other types
            value = kind
        out[key] = (kind, value, r.pttl(key))
    return out


def one(ledger: Ledger, issue: str) -> Claim:
    batch = ledger.claim([issue])
    assert [c.issue for c in batch.claims] == [issue], batch.skipped
    return batch.claims[0]


def skip_of(ledger: Ledger, issue: str):
    batch = ledger.claim([issue])
    assert not batch.claims, f"{issue} was claimed"
    return batch.skipped[0]


# -- claims ----------------------------------------------------------------------------------------------
def test_claim_issues_fenced_tokens_in_one_batch(ledger, fake_redis, keys):
    batch = ledger.claim(["a", "b", "c"])
    assert [c.issue for c in batch.claims] == ["a", "b", "c"]
    assert batch.skipped == []
    assert all(c.fence == 1 and fence_of(c.token) == 1 for c in batch.claims)
    # "<fence>:<owner>.<i>": one random owner per call, and every claim its own token
    assert len({c.token for c in batch.claims}) == 3
    owners = {c.token.split(":", 1)[1].rsplit(".", 1)[0] for c in batch.claims}
    assert len(owners) == 1 and len(owners.pop()) == 32
    for c in batch.claims:
        assert ledger.current_token(c.issue) == c.token
        assert 0 < fake_redis.pttl(keys.claim(c.issue)) <= LEASE_S * 1000
    assert ledger.counters()["claimed"] == 3
    assert ledger.gauges() == {"in_flight": 3, "backoff": 0, "parked": 0, "done": 0}


def test_two_calls_have_different_owners(ledger):
    a, b = ledger.claim(["a"]).claims[0], ledger.claim(["b"]).claims[0]
    assert a.token.split(":", 1)[1].rsplit(".", 1)[0] != b.token.split(":", 1)[1].rsplit(".", 1)[0]


def test_skip_done(ledger):
    c = one(ledger, "a")
    ledger.complete("a", c.token)
    s = skip_of(ledger, "a")
    assert s.reason == "done"
    assert s.detail["fence"] == 1 and s.detail["completed_ms"] > 0


def test_skip_in_flight(ledger, clock):
    one(ledger, "a")
    clock.advance(10)
    s = skip_of(ledger, "a")
    assert s.reason == "in-flight"
    assert 19_000 <= s.detail["lease_left_ms"] <= 20_000


def test_skip_backoff(ledger, clock):
    c = one(ledger, "a")
    res = ledger.fail("a", c.token, "boom")
    s = skip_of(ledger, "a")
    assert s.reason == "backoff"
    assert s.detail == {"until_ms": res.until_ms, "attempts": 1}


def test_skip_parked(fake_redis, keys, dispatch):
    ledger = Ledger(fake_redis, keys, dispatch(max_attempts=1), rng=lambda: 0.0)
    c = one(ledger, "a")
    res = ledger.fail("a", c.token, "boom")
    assert res.state == "parked" and res.attempts == 1
    s = skip_of(ledger, "a")
    assert s.reason == "parked"
    assert s.detail == {"parked_ms": res.until_ms, "attempts": 1}


def test_skip_max_in_flight_cap(fake_redis, keys, dispatch, clock):
    ledger = Ledger(fake_redis, keys, dispatch(max_in_flight=2))
    batch = ledger.claim(["a", "b", "c", "d"])
    assert [c.issue for c in batch.claims] == ["a", "b"]
    assert [(s.issue, s.reason) for s in batch.skipped] == [("c", "max-in-flight"), ("d", "max-in-flight")]
    assert batch.skipped[0].detail == {"in_flight": 2, "cap": 2}
    # finishing one frees one slot
    ledger.complete("a", batch.claims[0].token)
    again = ledger.claim(["c", "d"])
    assert [c.issue for c in again.claims] == ["c"]
    assert [s.reason for s in again.skipped] == ["max-in-flight"]
    # expired leases free their slots too (the dead worker's claims stop counting)
    clock.advance(LEASE_S + 1)
    assert [c.issue for c in ledger.claim(["d", "e"]).claims] == ["d", "e"]
    assert ledger.counters()["skipped_cap"] == 3


def test_cap_counts_a_lease_through_its_last_millisecond(fake_redis, keys, dispatch, clock):
    """Redis keeps a key alive through the millisecond it expires at: the cap must still count it."""
    ledger = Ledger(fake_redis, keys, dispatch(max_in_flight=1))
    start = clock.now  # a whole millisecond
    a = one(ledger, "a")
    clock.now = start + LEASE_S  # the lease's last millisecond: the claim key is still there (PTTL 0)
    assert fake_redis.get(keys.claim("a")) == a.token
    assert skip_of(ledger, "a").reason == "in-flight"
    assert skip_of(ledger, "b").reason == "max-in-flight"  # not two live claims under a cap of 1
    assert ledger.explain("b").state == "max-in-flight"
    assert ledger.gauges()["in_flight"] == 1
    clock.now = start + LEASE_S + 0.0025
    assert fake_redis.get(keys.claim("a")) is None
    assert [c.issue for c in ledger.claim(["b", "a"]).claims] == ["b"]


def test_cap_counts_claims_already_held_by_others(fake_redis, keys, dispatch):
    first = Ledger(fake_redis, keys, dispatch(max_in_flight=3))
    second = Ledger(fake_redis, keys, dispatch(max_in_flight=3))
    assert len(first.claim(["a", "b"]).claims) == 2
    batch = second.claim(["c", "d"])
    assert [c.issue for c in batch.claims] == ["c"]
    assert batch.skipped[0].reason == "max-in-flight"


def test_skip_duplicate_in_batch(ledger):
    batch = ledger.claim(["a", "b", "a", "a"])
    assert [c.issue for c in batch.claims] == ["a", "b"]
    assert [(s.issue, s.reason) for s in batch.skipped] == [("a", "duplicate"), ("a", "duplicate")]
    assert ledger.counters()["deduped"] == 2


def test_mixed_batch_reports_every_reason_in_input_order(fake_redis, keys, dispatch):
    ledger = Ledger(fake_redis, keys, dispatch(max_in_flight=3, max_attempts=1), rng=lambda: 0.0)
    ledger.complete("done", one(ledger, "done").token)
    ledger.fail("parked", one(ledger, "parked").token)  # max_attempts=1: parked at once
    held = one(ledger, "held")
    ledger2 = Ledger(fake_redis, keys, dispatch(max_in_flight=3, max_attempts=5), rng=lambda: 0.0)
    ledger2.fail("backoff", one(ledger2, "backoff").token)
    batch = ledger.claim(["new1", "done", "held", "parked", "backoff", "new1", "new2", "new3"])
    got = [("ok", c.issue) for c in batch.claims] + [(s.reason, s.issue) for s in batch.skipped]
    assert sorted(got) == sorted(
        [
            ("ok", "new1"),
            ("done", "done"),
            ("in-flight", "held"),
            ("parked", "parked"),
            ("backoff", "backoff"),
            ("duplicate", "new1"),
            ("ok", "new2"),
            ("max-in-flight", "new3"),
        ]
    )
    assert [s.issue for s in batch.skipped] == ["done", "held", "parked", "backoff", "new1", "new3"]
    assert ledger.current_token("held") == held.token


def test_empty_batch_is_a_no_op(ledger, fake_redis, keys):
    before = snapshot(fake_redis, keys)
    batch = ledger.claim([])
    assert batch.claims == [] and batch.skipped == []
    assert snapshot(fake_redis, keys) == before


def test_batches_larger_than_max_batch_are_split(fake_redis, keys, dispatch):
    ledger = Ledger(fake_redis, keys, dispatch(max_in_flight=10_000))
    issues = [f"i{n}" for n in range(MAX_BATCH + 7)]
    batch = ledger.claim(issues)
    assert [c.issue for c in batch.claims] == issues
    assert len({c.token.split(":", 1)[1].rsplit(".", 1)[0] for c in batch.claims}) == 2  # two script calls
    assert len({c.token for c in batch.claims}) == len(issues)
    assert ledger.counters()["claimed"] == len(issues)


def test_issue_ids_are_strings(ledger):
    assert ledger.claim([42]).claims[0].issue == "42"  # type: ignore[list-item]


# -- fencing ---------------------------------------------------------------------------------------------
def test_fences_only_grow_across_expiry_release_fail_and_retry(ledger, clock):
    fences = [one(ledger, "a").fence]
    clock.advance(LEASE_S + 0.01)  # lease expired, never renewed
    c = one(ledger, "a")
    fences.append(c.fence)
    ledger.release("a", c.token)
    c = one(ledger, "a")
    fences.append(c.fence)
    res = ledger.fail("a", c.token, "x")
    set_ms(clock, res.until_ms)
    c = one(ledger, "a")
    fences.append(c.fence)
    ledger.fail("a", c.token, "x")
    ledger.retry("a")
    c = one(ledger, "a")
    fences.append(c.fence)
    assert fences == [1, 2, 3, 4, 5]
    ledger.complete("a", c.token)
    assert ledger.explain("a").detail["fence"] == 5


def test_fence_of():
    assert fence_of("12:abc") == 12
    with pytest.raises(ValueError):
        fence_of("abc")
    with pytest.raises(ValueError):
        fence_of(":abc")


# -- compare-and-set: renew / complete / fail / release ------------------------------------------------
OPS = {
    "renew": lambda lg, issue, tok: lg.renew(issue, tok),
    "complete": lambda lg, issue, tok: lg.complete(issue, tok),
    "fail": lambda lg, issue, tok: lg.fail(issue, tok, "late"),
    "release": lambda lg, issue, tok: lg.release(issue, tok),
    "begin": lambda lg, issue, tok: lg.begin(issue, tok, "task-x"),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_superseded_token_raises_and_changes_nothing(op, ledger, fake_redis, keys, clock):
    old = one(ledger, "a")
    clock.advance(LEASE_S + 1)  # the first holder paused past its lease
    new = one(ledger, "a")
    assert new.fence == old.fence + 1
    before = snapshot(fake_redis, keys)
    with pytest.raises(StaleClaimError) as exc:
        OPS[op](ledger, "a", old.token)
    assert exc.value.current == new.token and not exc.value.expired
    assert exc.value.issue == "a" and exc.value.token == old.token
    assert snapshot(fake_redis, keys) == before
    # the current holder is unaffected and can still finish
    ledger.complete("a", new.token)


@pytest.mark.parametrize("op", sorted(OPS))
def test_expired_token_raises_and_changes_nothing(op, ledger, fake_redis, keys, clock):
    old = one(ledger, "a")
    clock.advance(LEASE_S + 1)
    before = snapshot(fake_redis, keys)
    with pytest.raises(StaleClaimError) as exc:
        OPS[op](ledger, "a", old.token)
    assert exc.value.current is None and exc.value.expired
    assert "no live claim" in str(exc.value)
    assert snapshot(fake_redis, keys) == before


@pytest.mark.parametrize("op", sorted(OPS))
def test_forged_token_on_a_live_claim_raises_and_changes_nothing(op, ledger, fake_redis, keys):
    held = one(ledger, "a")
    before = snapshot(fake_redis, keys)
    for forged in ("1:not-the-owner", held.token.replace("1:", "2:", 1), "", held.token + "x"):
        with pytest.raises(StaleClaimError) as exc:
            OPS[op](ledger, "a", forged)
        assert exc.value.current == held.token
    assert snapshot(fake_redis, keys) == before


@pytest.mark.parametrize("settle", ["complete", "fail", "release"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_token_is_dead_after_it_settled(settle, op, ledger, fake_redis, keys):
    c = one(ledger, "a")
    OPS[settle](ledger, "a", c.token)
    before = snapshot(fake_redis, keys)
    with pytest.raises(StaleClaimError):
        OPS[op](ledger, "a", c.token)
    assert snapshot(fake_redis, keys) == before


def test_token_of_another_issue_is_refused(ledger, fake_redis, keys):
    a, b = ledger.claim(["a", "b"]).claims
    before = snapshot(fake_redis, keys)
    with pytest.raises(StaleClaimError):
        ledger.complete("a", b.token)
    assert snapshot(fake_redis, keys) == before


def test_stale_error_is_a_ledger_error():
    assert issubclass(StaleClaimError, LedgerError)


# -- renew -----------------------------------------------------------------------------------------------
def test_renew_keeps_the_claim_past_its_first_lease(ledger, clock, fake_redis, keys):
    c = one(ledger, "a")
    for _ in range(5):
        clock.advance(LEASE_S * 0.7)
        expires = ledger.renew("a", c.token)
        assert expires == ledger.now_ms() + int(LEASE_S * 1000)
        assert fake_redis.zscore(keys.inflight, "a") == expires
    assert skip_of(ledger, "a").reason == "in-flight"
    assert ledger.current_token("a") == c.token
    clock.advance(LEASE_S + 0.01)
    assert one(ledger, "a").fence == 2


def test_renew_keeps_the_claim_counted_against_the_cap(fake_redis, keys, dispatch, clock):
    ledger = Ledger(fake_redis, keys, dispatch(max_in_flight=1))
    c = one(ledger, "a")
    clock.advance(LEASE_S * 0.9)
    ledger.renew("a", c.token)
    clock.advance(LEASE_S * 0.9)  # past the first lease, inside the renewed one
    assert skip_of(ledger, "b").reason == "max-in-flight"


def test_done_markers_of_a_ledger_written_before_the_buckets_still_count(ledger, fake_redis, keys):
    """A ledger from before the done buckets keeps its markers in the one ``done`` hash: the gate, retry,
    listings and gauges still read them; a new completion goes to a bucket and is counted once."""
    fake_redis.hset(keys.done, "old", "7:1700000000000")
    assert skip_of(ledger, "old").reason == "done"
    with pytest.raises(LedgerError, match="done is final"):
        ledger.retry("old")
    c = one(ledger, "new")
    ledger.complete("new", c.token)
    assert fake_redis.hget(keys.done_bucket("new"), "new") and not fake_redis.hexists(keys.done, "new")
    assert {e["issue"] for e in ledger.entries("done")} == {"old", "new"}
    assert ledger.gauges()["done"] == 2 and ledger.done_marker("old") == "7:1700000000000"


# -- begin (an agent starts at most once per token) -----------------------------------------------------
def test_begin_once_per_token_and_again_for_a_new_claim(ledger, clock):
    c = one(ledger, "a")
    assert ledger.begin("a", c.token, "task-1") == "started"
    assert ledger.begin("a", c.token, "task-1") == "duplicate"  # a redelivered message starts nothing
    ledger.release("a", c.token)
    c2 = one(ledger, "a")
    assert ledger.begin("a", c2.token, "task-2") == "started"


# -- complete --------------------------------------------------------------------------------------------
def test_complete_is_final(ledger, fake_redis, keys, clock):
    c = one(ledger, "a")
    ledger.fail("a", c.token, "first try")
    clock.advance(10)
    c = one(ledger, "a")
    ledger.complete("a", c.token)
    assert ledger.current_token("a") is None
    # attempts, errors, backoff and the fence counter are cleaned; the marker holds the fence
    assert fake_redis.hget(keys.attempts, "a") is None
    assert fake_redis.hget(keys.errors, "a") is None
    assert fake_redis.zscore(keys.backoff, "a") is None
    assert fake_redis.hget(keys.fences, "a") is None
    assert fake_redis.hget(keys.done_bucket("a"), "a").startswith("2:")
    for _ in range(3):
        clock.advance(10_000)
        assert skip_of(ledger, "a").reason == "done"
    before = snapshot(fake_redis, keys)
    with pytest.raises(LedgerError, match="done is final"):
        ledger.retry("a")
    assert snapshot(fake_redis, keys) == before
    assert ledger.counters()["completed"] == 1


# -- fail and backoff ------------------------------------------------------------------------------------
def test_backoff_window_is_honoured_to_the_millisecond(ledger, clock):
    c = one(ledger, "a")
    failed_at = ledger.now_ms()
    res = ledger.fail("a", c.token, "boom")
    assert (res.state, res.attempts) == ("backoff", 1)
    assert res.until_ms == failed_at + 5_000  # base * 2^0 with jitter 0
    set_ms(clock, res.until_ms - 1)
    s = skip_of(ledger, "a")
    assert s.reason == "backoff" and s.detail["until_ms"] == res.until_ms
    set_ms(clock, res.until_ms)
    assert one(ledger, "a").fence == 2


def test_backoff_windows_double_up_to_the_max(fake_redis, keys, dispatch, clock):
    ledger = Ledger(fake_redis, keys, dispatch(max_attempts=10, backoff_base_s=1, backoff_max_s=10), rng=lambda: 0.0)
    windows = []
    for n in range(1, 8):
        c = one(ledger, "a")
        at = ledger.now_ms()
        res = ledger.fail("a", c.token, f"fail {n}")
        assert (res.state, res.attempts) == ("backoff", n)
        windows.append(res.until_ms - at)
        set_ms(clock, res.until_ms - 1)
        assert skip_of(ledger, "a").reason == "backoff"
        set_ms(clock, res.until_ms)
    assert windows == [1_000, 2_000, 4_000, 8_000, 10_000, 10_000, 10_000]


def test_backoff_jitter_is_added_within_bounds(fake_redis, keys, dispatch, clock):
    cfg = dispatch(max_attempts=100, backoff_base_s=2, backoff_max_s=2, backoff_jitter=0.5)
    # the largest jitter the rng can produce stays under base * (1 + jitter)
    top = Ledger(fake_redis, keys, cfg, rng=lambda: 0.999999)
    c = one(top, "a")
    at = top.now_ms()
    window = top.fail("a", c.token).until_ms - at
    assert window == int(2000 * (1 + 0.5 * 0.999999)) == 2999
    clock.advance(5)
    # a real rng: every window in [base, base * (1 + jitter)), and they differ
    rng = random.Random(7)
    ledger = Ledger(fake_redis, keys, cfg, rng=rng.random)
    seen = set()
    for _ in range(40):
        c = one(ledger, "a")
        at = ledger.now_ms()
        window = ledger.fail("a", c.token).until_ms - at
        assert 2000 <= window < 3000
        seen.add(window)
        clock.advance(3.5)
    assert len(seen) > 10


def test_fail_records_the_error_truncated(ledger, fake_redis, keys):
    c = one(ledger, "a")
    ledger.fail("a", c.token, "x" * 10_000)
    assert fake_redis.hget(keys.errors, "a") == "x" * 500
    c2 = one(ledger, "b")
    ledger.fail("b", c2.token, "")
    assert fake_redis.hget(keys.errors, "b") == "failed"


def test_parked_after_max_attempts(ledger, clock, fake_redis, keys):
    results = []
    for _ in range(3):
        c = one(ledger, "a")
        res = ledger.fail("a", c.token, f"boom {c.fence}")
        results.append(res)
        if res.state == "backoff":
            set_ms(clock, res.until_ms)
    assert [(r.state, r.attempts) for r in results] == [("backoff", 1), ("backoff", 2), ("parked", 3)]
    assert fake_redis.zscore(keys.backoff, "a") is None  # parked, not backing off
    clock.advance(100_000)  # parked stays parked whatever the time
    assert skip_of(ledger, "a").reason == "parked"
    counters = ledger.counters()
    assert (counters["backed_off"], counters["parked"]) == (2, 1)


def test_retry_unparks_with_a_fresh_budget(ledger, clock):
    for _ in range(3):
        c = one(ledger, "a")
        res = ledger.fail("a", c.token, "boom")
        set_ms(clock, res.until_ms)
    assert res.state == "parked"
    assert ledger.retry("a") == {"issue": "a", "was_parked": True, "attempts_before": 3, "had_backoff": False}
    assert ledger.explain("a").state == "claimable"
    c = one(ledger, "a")
    res = ledger.fail("a", c.token, "again")
    assert (res.state, res.attempts) == ("backoff", 1)  # a fresh budget: backoff, not parked
    assert ledger.counters()["retried"] == 1


def test_retry_ends_a_backoff_now(ledger):
    c = one(ledger, "a")
    ledger.fail("a", c.token, "boom")
    assert skip_of(ledger, "a").reason == "backoff"
    assert ledger.retry("a") == {"issue": "a", "was_parked": False, "attempts_before": 1, "had_backoff": True}
    assert one(ledger, "a").fence == 2


def test_retry_of_an_unknown_issue_is_harmless(ledger):
    assert ledger.retry("nope") == {"issue": "nope", "was_parked": False, "attempts_before": 0, "had_backoff": False}
    assert ledger.counters().get("retried", 0) == 0  # retrying nothing changes nothing
    assert one(ledger, "nope").fence == 1


# -- release ---------------------------------------------------------------------------------------------
def test_release_interrupted_counts_no_attempt(ledger, fake_redis, keys):
    c = one(ledger, "a")
    ledger.release("a", c.token, reason="interrupted")
    assert fake_redis.hget(keys.attempts, "a") is None
    assert fake_redis.zscore(keys.inflight, "a") is None
    c2 = one(ledger, "a")  # claimable at once: no backoff penalty
    assert c2.fence == 2
    counters = ledger.counters()
    assert counters["released"] == 1 and counters["released_interrupted"] == 1
    assert counters["backed_off"] == 0


def test_release_keeps_earlier_attempts(ledger, clock):
    c = one(ledger, "a")
    res = ledger.fail("a", c.token, "boom")
    set_ms(clock, res.until_ms)
    c = one(ledger, "a")
    ledger.release("a", c.token, reason="send-failed")
    assert ledger.explain("a").detail["attempts"] == 1
    assert ledger.counters()["released_send-failed"] == 1
    c = one(ledger, "a")
    assert ledger.fail("a", c.token).attempts == 2


# -- explain ---------------------------------------------------------------------------------------------
def test_explain_every_state(fake_redis, keys, dispatch, clock):
    roomy_fleet(fake_redis, keys)
    ledger = Ledger(fake_redis, keys, dispatch(max_in_flight=2, max_attempts=2), rng=lambda: 0.0)
    e = ledger.explain("fresh")
    assert (e.state, e.detail) == ("claimable", {"attempts": 0})
    assert "claimable now" in e.text

    c = one(ledger, "a")
    e = ledger.explain("a")
    assert e.state == "in-flight"
    assert c.token in e.text and "fence 1" in e.text and "30.0s more" in e.text
    assert e.detail["token"] == c.token and e.detail["fence"] == 1
    assert e.detail["until_ms"] == ledger.now_ms() + 30_000

    res = ledger.fail("a", c.token, "kaboom")
    e = ledger.explain("a")
    assert e.state == "backoff"
    assert "5.0s more" in e.text and "attempt 1" in e.text and "kaboom" in e.text
    assert e.detail == {"attempts": 1, "until_ms": res.until_ms, "last_error": "kaboom"}

    set_ms(clock, res.until_ms)
    assert ledger.explain("a").state == "claimable"
    assert ledger.explain("a").detail == {"attempts": 1}
    ledger.fail("a", one(ledger, "a").token, "again")
    e = ledger.explain("a")
    assert e.state == "parked"
    assert "parked after 2 attempts" in e.text and "again" in e.text and "retry" in e.text
    assert e.detail["attempts"] == 2 and e.detail["last_error"] == "again"

    b, d = ledger.claim(["b", "d"]).claims
    e = ledger.explain("x")
    assert e.state == "max-in-flight"
    assert "(2/2)" in e.text
    assert e.detail == {"in_flight": 2, "cap": 2, "attempts": 0}

    ledger.complete("b", b.token)
    e = ledger.explain("b")
    assert e.state == "done"
    assert "done (fence 1)" in e.text and "never dispatched again" in e.text
    assert e.detail["fence"] == 1 and e.as_dict()["state"] == "done"
    assert ledger.explain("x").state == "claimable"


def test_explain_after_a_lease_expired_is_claimable(ledger, clock):
    one(ledger, "a")
    clock.advance(LEASE_S + 0.01)
    assert ledger.explain("a").state == "claimable"


# -- listing, counters, gauges ---------------------------------------------------------------------------
def test_entries_by_state(fake_redis, keys, dispatch, clock):
    ledger = Ledger(fake_redis, keys, dispatch(max_in_flight=10, max_attempts=1), rng=lambda: 0.0)
    other = Ledger(fake_redis, keys, dispatch(max_in_flight=10, max_attempts=5), rng=lambda: 0.0)
    batch = ledger.claim(["d2", "d1", "p", "b", "f1", "f2", "gone"])
    tok = {c.issue: c.token for c in batch.claims}
    ledger.complete("d2", tok["d2"])
    ledger.complete("d1", tok["d1"])
    ledger.fail("p", tok["p"], "parked error")
    bres = other.fail("b", tok["b"], "backoff error")
    clock.advance(1)
    ledger.renew("f1", tok["f1"])

    done = ledger.entries("done")
    assert [e["issue"] for e in done] == ["d1", "d2"]
    assert all(e["state"] == "done" and e["fence"] == 1 and e["completed_ms"] > 0 for e in done)

    parked = ledger.entries("parked")
    assert [(e["issue"], e["attempts"], e["last_error"]) for e in parked] == [("p", 1, "parked error")]

    backoff = ledger.entries("backoff")
    assert backoff == [
        {"issue": "b", "state": "backoff", "until_ms": bres.until_ms, "attempts": 1, "last_error": "backoff error"}
    ]

    inflight = {e["issue"]: e for e in ledger.entries("in-flight")}
    assert set(inflight) == {"f1", "f2", "gone"}
    assert inflight["f1"]["token"] == tok["f1"] and inflight["f1"]["state"] == "in-flight"
    assert inflight["f1"]["fence"] == int(tok["f1"].split(":")[0])  # dispatches shows it, as explain does
    assert inflight["f1"]["until_ms"] == ledger.now_ms() + 30_000

    clock.advance(LEASE_S - 0.5)  # f2 and gone expired, f1 was renewed; the backoff window (5 s) ended
    assert [e["issue"] for e in ledger.entries("in-flight")] == ["f1"]
    assert ledger.entries("backoff") == []
    assert ledger.gauges() == {"in_flight": 1, "backoff": 0, "parked": 1, "done": 2}
    assert len(ledger.all_entries()) == 1 + 1 + 2
    assert {e["state"] for e in ledger.all_entries()} <= set(STATES)
    with pytest.raises(ValueError, match="unknown state"):
        ledger.entries("bogus")


def test_counters_hash(ledger, fake_redis, keys, clock):
    assert ledger.counters() == dict.fromkeys(
        ("claimed", "deduped", "backed_off", "parked", "completed", "released"), 0
    )
    a, b, c = ledger.claim(["a", "b", "c"]).claims
    ledger.claim(["a", "a"])  # in-flight + duplicate: both deduped
    ledger.complete("a", a.token)
    ledger.claim(["a"])  # done: deduped
    ledger.fail("b", b.token)
    ledger.claim(["b"])  # backoff
    ledger.release("c", c.token)
    counters = ledger.counters()
    assert counters["claimed"] == 3
    assert counters["deduped"] == 3
    assert counters["completed"] == 1
    assert counters["backed_off"] == 1
    assert counters["skipped_backoff"] == 1
    assert counters["released"] == 1 and counters["released_interrupted"] == 1
    assert counters["parked"] == 0
    assert fake_redis.type(keys.counters) == "hash"


def test_every_key_lives_under_the_namespace_hash_tag(ledger, fake_redis, keys, clock):
    a, b, c = ledger.claim(["a", "b", "c"]).claims
    ledger.complete("a", a.token)
    ledger.fail("b", b.token)
    ledger.release("c", c.token)
    ledger.retry("b")
    names = fake_redis.keys("*")
    assert names and all(n.startswith(keys.prefix + ":") for n in names)


def test_a_killed_loop_claims_nothing(ledger, fake_redis, keys):
    fake_redis.hset(keys.kill, mapping={"run_id": "r1", "by": "test"})
    batch = ledger.claim(["a", "b", "a"])
    assert batch.claims == []
    assert [(s.issue, s.reason) for s in batch.skipped] == [("a", "killed"), ("b", "killed"), ("a", "duplicate")]
    assert ledger.current_token("a") is None and fake_redis.hget(keys.fences, "a") is None
    fake_redis.delete(keys.kill)
    assert one(ledger, "a").fence == 1


@pytest.mark.parametrize("flag", ["kill", "paused"])
def test_a_stopped_loop_still_says_what_an_issue_is(ledger, fake_redis, keys, flag):
    """Kill and pause stop every claim, but explain of a done or held issue says done / in flight first."""
    done = one(ledger, "d")
    ledger.complete("d", done.token)
    held = one(ledger, "h")
    fake_redis.hset(getattr(keys, flag), mapping={"by": "test"})
    why = "killed" if flag == "kill" else "paused"
    assert ledger.explain("d").state == "done" and ledger.explain("h").state == "in-flight"
    assert ledger.explain("n").state == why
    batch = ledger.claim(["d", "h", "n"])
    assert batch.claims == [] and [s.reason for s in batch.skipped] == ["done", "in-flight", why]
    assert ledger.counters()[f"skipped_{why}"] == 1 and held.token == ledger.current_token("h")


# -- capacity: queue lease and fleet slots (issue 8) -------------------------------------------------------
def test_a_queued_claim_holds_the_queue_lease_and_begin_switches_to_the_running_lease(
    fake_redis, keys, dispatch, clock
):
    ledger = Ledger(fake_redis, keys, dispatch(queue_lease_s=600), rng=lambda: 0.0)
    c = one(ledger, "a")
    assert 599_000 < fake_redis.pttl(keys.claim("a")) <= 600_000  # waiting in the broker: not the 30 s lease
    clock.advance(LEASE_S + 5)  # a running lease would have expired by now; the queued claim still holds
    assert ledger.claim(["a"]).skipped[0].reason == "in-flight"
    assert ledger.begin("a", c.token, "agent-1") == "started"
    assert 0 < fake_redis.pttl(keys.claim("a")) <= LEASE_S * 1000  # now the running lease, renewed while it runs
    clock.advance(LEASE_S + 1)
    assert [x.issue for x in ledger.claim(["a"]).claims] == ["a"]  # a dead agent's claim frees after the lease


def test_the_gate_claims_no_more_than_the_live_fleets_agent_slots(fake_redis, keys, dispatch, clock):
    from factory_worker.context import Context
    from factory_worker.loop.presence import fleet_slots, publish_slots

    ctx = Context(load_settings(namespace=keys.namespace), fake_redis)
    ledger = Ledger(fake_redis, keys, dispatch(max_in_flight=100), rng=lambda: 0.0)
    batch = ledger.claim(["a", "b"], fleet_slots=True)
    assert not batch.claims and [s.reason for s in batch.skipped] == ["no-free-slot"] * 2  # no live worker
    assert ledger.explain("a").state == "no-free-slot" and "no free agent slot" in ledger.explain("a").text
    publish_slots(ctx, "w1@h", 2)
    publish_slots(ctx, "w2@h", 1)
    fake_redis.hset(keys.slots, "junk@h", "not-a-count")  # never counted by the gate nor the display
    assert fleet_slots(ctx) == 3  # loop-status shows what the gate counts (the same Lua)
    batch = ledger.claim(["a", "b", "c", "d"], fleet_slots=True)
    assert [c.issue for c in batch.claims] == ["a", "b", "c"]
    assert batch.skipped[0].reason == "no-free-slot" and batch.skipped[0].detail == {"in_flight": 3, "slots": 3}
    assert ledger.counters()["skipped_no_slot"] == 3  # 2 with no worker + 1 now (dry runs count nothing)
    ledger.complete("a", batch.claims[0].token)  # a slot frees
    assert [c.issue for c in ledger.claim(["d"], fleet_slots=True).claims] == ["d"]
    clock.advance(ctx.settings.worker.heartbeat_ttl_s + 1)  # both workers stopped publishing: their slots go
    assert fleet_slots(ctx) == 0 and fake_redis.hlen(keys.slots) == 2  # counted, not pruned (claims pruned the junk)
    assert ledger.claim(["e"], fleet_slots=True).skipped[0].reason == "no-free-slot"
    assert fake_redis.hlen(keys.slots) == 0  # pruned by the gate
    assert [c.issue for c in ledger.claim(["e"]).claims] == ["e"]  # a bare ledger call ignores the fleet
