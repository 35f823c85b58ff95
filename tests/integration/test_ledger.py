"""The ledger on a real redis-server: multi-process claim races, lease expiry and renewal in real time,
and script registration."""

from __future__ import annotations

import multiprocessing as mp
import random
import time

import pytest
import redis

from factory_worker.config.settings import load_settings
from factory_worker.ledger.core import Ledger, StaleClaimError
from factory_worker.ledger.keys import Keys
from factory_worker.ledger.scripts import NAMES, scripts_for

pytestmark = pytest.mark.integration

PROCS = 8
N_ISSUES = 1000


def _racer(url: str, namespace: str, issues: list[str], batch: int, seed: int, barrier, out) -> None:
    """One competing worker process: wait for the others, then claim every issue in batches."""
    try:
        client = redis.Redis.from_url(url, decode_responses=True)
        ledger = Ledger(
            client,
            Keys(namespace),
            load_settings(dispatch={"max_in_flight": 100_000, "lease_ttl_s": 120, "queue_lease_s": 120}).dispatch,
        )
        order = list(issues)
        if seed % 2:  # half walk the issues in input order (head-to-head), half in their own order
            random.Random(seed).shuffle(order)
        barrier.wait(timeout=60)
        claims, skips = [], {}
        for start in range(0, len(order), batch):
            res = ledger.claim(order[start : start + batch])
            claims += [(c.issue, c.token, c.fence) for c in res.claims]
            for s in res.skipped:
                skips[s.reason] = skips.get(s.reason, 0) + 1
        out.put(("ok", claims, skips))
    except BaseException as exc:
        out.put(("error", repr(exc), {}))


def test_multi_process_race_has_exactly_one_winner_per_issue(real_redis, redis_server, namespace):
    ctx = mp.get_context("spawn")
    issues = [f"ISSUE-{n}" for n in range(N_ISSUES)]
    barrier = ctx.Barrier(PROCS)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_racer, args=(redis_server.url, namespace, issues, batch, seed, barrier, out))
        for seed, batch in enumerate([10, 25, 50, 100] * (PROCS // 4))
    ]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():  # pragma: no cover - only on a hang
                p.kill()
    errors = [r[1] for r in results if r[0] != "ok"]
    assert not errors, errors

    winners: dict[str, list[tuple[str, int]]] = {}
    for _, claims, _ in results:
        for issue, token, fence in claims:
            winners.setdefault(issue, []).append((token, fence))
    assert sorted(winners) == sorted(issues), "some issue was never claimed"
    doubles = {i: w for i, w in winners.items() if len(w) != 1}
    assert not doubles, f"{len(doubles)} issues claimed more than once, e.g. {list(doubles.items())[:3]}"
    assert {fence for w in winners.values() for _, fence in w} == {1}
    tokens = [token for w in winners.values() for token, _ in w]
    assert len(set(tokens)) == N_ISSUES
    # the losers saw every issue as in flight, nothing else
    skipped: dict[str, int] = {}
    for _, _, skips in results:
        for reason, n in skips.items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == {"in-flight": (PROCS - 1) * N_ISSUES}
    # and Redis agrees: each issue's claim key holds its winner's token
    keys = Keys(namespace)
    p = real_redis.pipeline(transaction=False)
    for issue in issues:
        p.get(keys.claim(issue))
    assert dict(zip(issues, p.execute())) == {i: w[0][0] for i, w in winners.items()}
    ledger = Ledger(real_redis, keys, load_settings().dispatch)
    counters = ledger.counters()
    assert counters["claimed"] == N_ISSUES and counters["deduped"] == (PROCS - 1) * N_ISSUES
    assert ledger.gauges()["in_flight"] == N_ISSUES


# -- leases in real time ---------------------------------------------------------------------------------
def short_lease(make_settings, **over):
    return make_settings(
        dispatch={"lease_ttl_s": 0.3, "queue_lease_s": 0.3, "max_in_flight": 10, **over},
        agent={"term_grace_s": 0, "command": ["true"]},
    ).dispatch


def durable_state(r, keys) -> dict:
    """Every ledger key and value (no TTLs: real time moves between two reads)."""
    out = {}
    for key in sorted(r.scan_iter(match=keys.pattern())):
        kind = r.type(key)
        value = {"string": r.get, "hash": r.hgetall, "zset": lambda k: r.zrange(k, 0, -1, withscores=True)}[kind](key)
        out[key] = (kind, value)
    return out


def test_lease_expiry_hands_the_issue_to_another_claimer(real_redis, redis_server, keys, make_settings):
    cfg = short_lease(make_settings)
    first = Ledger(real_redis, keys, cfg)
    second = Ledger(redis_server.client(), keys, cfg)  # another worker, another connection
    old = first.claim(["a"]).claims[0]
    assert old.fence == 1
    assert second.claim(["a"]).skipped[0].reason == "in-flight"
    time.sleep(0.45)  # the first holder never renews: its lease runs out
    new = second.claim(["a"]).claims[0]
    assert new.fence == 2 and new.token != old.token
    before = durable_state(real_redis, keys)
    for late in (
        lambda: first.complete("a", old.token),
        lambda: first.renew("a", old.token),
        lambda: first.fail("a", old.token, "late"),
        lambda: first.release("a", old.token),
    ):
        with pytest.raises(StaleClaimError) as exc:
            late()
        assert exc.value.current == new.token
    assert durable_state(real_redis, keys) == before
    assert real_redis.get(keys.claim("a")) == new.token
    second.complete("a", new.token)
    assert first.claim(["a"]).skipped[0].reason == "done"
    assert first.explain("a").detail["fence"] == 2


def test_renew_keeps_a_claim_alive_past_several_ttls(real_redis, keys, make_settings):
    cfg = short_lease(make_settings)
    holder = Ledger(real_redis, keys, cfg)
    rival = Ledger(real_redis, keys, cfg)
    claim = holder.claim(["a"]).claims[0]
    deadline = time.monotonic() + 1.2  # four TTLs
    while time.monotonic() < deadline:
        time.sleep(0.08)
        holder.renew("a", claim.token)
        assert rival.claim(["a"]).skipped[0].reason == "in-flight"
    assert holder.current_token("a") == claim.token
    assert 0 < real_redis.pttl(keys.claim("a")) <= 300
    holder.complete("a", claim.token)
    assert rival.claim(["a"]).skipped[0].reason == "done"


def test_an_unrenewed_claim_frees_its_in_flight_slot(real_redis, keys, make_settings):
    ledger = Ledger(real_redis, keys, short_lease(make_settings, max_in_flight=1))
    ledger.claim(["a"])
    assert ledger.claim(["b"]).skipped[0].reason == "max-in-flight"
    time.sleep(0.45)
    assert [c.issue for c in ledger.claim(["b"]).claims] == ["b"]


# -- script registration ---------------------------------------------------------------------------------
def test_scripts_are_registered_once_per_client(real_redis, redis_server, keys, make_settings):
    cfg = make_settings().dispatch
    regs = scripts_for(real_redis)
    assert scripts_for(real_redis) is regs
    assert set(regs) == set(NAMES)
    a, b = Ledger(real_redis, keys, cfg), Ledger(real_redis, keys, cfg)
    assert a.writes.scripts is regs and b.writes.scripts is regs
    other = redis_server.client()
    assert scripts_for(other) is not regs
    assert {n: s.sha for n, s in scripts_for(other).items()} == {n: s.sha for n, s in regs.items()}

    real_redis.script_flush()
    claim = a.claim(["x"]).claims[0]
    b.renew("x", claim.token)
    b.complete("x", claim.token)
    used = [regs[n].sha for n in ("claim", "renew", "complete")]
    assert real_redis.script_exists(*used) == [True, True, True]
    # a flushed script cache (e.g. a Redis restart) is reloaded transparently
    real_redis.script_flush()
    assert real_redis.script_exists(regs["claim"].sha) == [False]
    assert a.claim(["y"]).claims[0].fence == 1
    assert real_redis.script_exists(regs["claim"].sha) == [True]


def _calls(r: redis.Redis, command: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_rider_goes_in_the_settles_round_trip_and_survives_a_flushed_script_cache(real_redis, keys, make_settings):
    from factory_worker.ledger.core import Rider

    ledger = Ledger(real_redis, keys, make_settings().dispatch)
    real_redis.rpush(keys.backlog, "next-1", "next-2")
    real_redis.sadd(keys.agents, "task-a", "task-b")
    a, b = (ledger.claim([i]).claims[0] for i in ("a", "b"))
    ride = Rider(lambda p: p.srem(keys.agents, "task-a").lpop(keys.backlog))
    scripts_before = _calls(real_redis, "script|exists") + _calls(real_redis, "script")
    ledger.complete("a", a.token, ride)
    assert ride.sent and ride.replies == [1, "next-1"]
    assert _calls(real_redis, "script|exists") + _calls(real_redis, "script") == scripts_before  # one round trip
    assert ledger.explain("a").state == "done"
    # after a Redis restart (its script cache empty) the settle is loaded and sent again; the rider went once
    real_redis.script_flush()
    ride = Rider(lambda p: p.srem(keys.agents, "task-b").lpop(keys.backlog))
    failed = ledger.fail("b", b.token, "boom", ride)
    assert failed.attempts == 1 and ride.replies == [1, "next-2"]
    assert real_redis.llen(keys.backlog) == 0 and real_redis.scard(keys.agents) == 0
    # a stale token still raises, and its rider was sent all the same
    ride = Rider(lambda p: p.lpop(keys.backlog))
    with pytest.raises(StaleClaimError):
        ledger.complete("b", b.token, ride)
    assert ride.sent and ride.replies == [None]
    # a rider's own error is its reply: the settle it rode with stands, and says so
    real_redis.delete(keys.backlog)
    real_redis.set(keys.backlog, "not a list")
    c = ledger.claim(["c"]).claims[0]
    ride = Rider(lambda p: p.lpop(keys.backlog))
    ledger.complete("c", c.token, ride)
    assert isinstance(ride.replies[0], redis.ResponseError) and ledger.explain("c").state == "done"
