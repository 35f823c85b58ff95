"""The loop heartbeat: write/read roundtrip, defensive parsing, liveness on the server clock."""

from __future__ import annotations

import json

import pytest

from factory_worker.loop import heartbeat
from factory_worker.loop.heartbeat import Heartbeat, liveness

NOW_MS = 1_800_000_000_000


def valid(**over) -> dict:
    data = {
        "run_id": "run-1",
        "status": "running",
        "iteration": 2,
        "max_iterations": 5,
        "hostname": "h1",
        "pid": 123,
        "updated_at": "2027-01-15T08:00:00+00:00",
        "updated_at_ms": NOW_MS,
    }
    data.update(over)
    return data


def test_write_read_roundtrip(fake_redis, keys, clock):
    hb = heartbeat.write(fake_redis, keys, "run-1", "running", 2, 5, ttl_s=120)
    assert hb.updated_at_ms == int(clock.now * 1000)
    assert hb.updated_at.startswith("2027-01-15T08:00:00")
    got = heartbeat.read(fake_redis, keys)
    assert got == hb
    assert (got.run_id, got.status, got.iteration, got.max_iterations) == ("run-1", "running", 2, 5)
    assert got.pid > 0 and got.hostname
    stored = json.loads(fake_redis.get(keys.heartbeat))
    assert set(stored) == {
        "run_id",
        "status",
        "iteration",
        "max_iterations",
        "hostname",
        "pid",
        "updated_at",
        "updated_at_ms",
    }
    assert 0 < fake_redis.pttl(keys.heartbeat) <= 120_000


def test_heartbeat_expires(fake_redis, keys, clock):
    heartbeat.write(fake_redis, keys, "run-1", "idle", 0, 3, ttl_s=10)
    clock.advance(9)
    assert heartbeat.read(fake_redis, keys) is not None
    clock.advance(2)
    assert heartbeat.read(fake_redis, keys) is None
    assert heartbeat.check(fake_redis, keys, stale_after_s=60).state == "missing"


def test_missing_reads_as_none(fake_redis, keys):
    assert heartbeat.read(fake_redis, keys) is None
    assert heartbeat.parse(None) is None


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "not json",
        "{",
        "[]",
        "null",
        "42",
        '"running"',
        json.dumps(valid(iteration="2")),  # a number as a string
        json.dumps(valid(status="bogus")),
        json.dumps(valid(pid="123")),
        json.dumps(valid(updated_at_ms=str(NOW_MS))),
        json.dumps(valid(updated_at_ms=1.5)),
        json.dumps(valid(iteration=-1)),
        json.dumps(valid(run_id="")),
        json.dumps(valid(iteration=True)),
        json.dumps({k: v for k, v in valid().items() if k != "run_id"}),
        json.dumps({k: v for k, v in valid().items() if k != "updated_at_ms"}),
        '{"run_id": "\\ud800run", "status": "running", "iteration": 1, "max_iterations": 3, "hostname": "h", '
        '"pid": 1, "updated_at": "t", "updated_at_ms": 1}',  # a lone surrogate is valid JSON, not text
    ],
)
def test_malformed_or_wrongly_typed_reads_as_none(raw, fake_redis, keys):
    assert heartbeat.parse(raw) is None
    fake_redis.set(keys.heartbeat, raw)
    assert heartbeat.read(fake_redis, keys) is None
    assert heartbeat.check(fake_redis, keys, stale_after_s=60).state == "missing"


def test_parse_of_non_utf8_bytes_is_none():
    assert heartbeat.parse(b"\xff\xfe not utf-8") is None


def test_non_utf8_heartbeat_in_redis_reads_as_missing(fake_redis, keys):
    fake_redis.set(keys.heartbeat, b"\xff\xfe not utf-8")
    assert heartbeat.check(fake_redis, keys, stale_after_s=60).state == "missing"
    assert heartbeat.read(fake_redis, keys) is None


def test_parse_accepts_bytes_and_ignores_extra_fields():
    hb = heartbeat.parse(json.dumps(valid(extra="ignored")).encode())
    assert isinstance(hb, Heartbeat) and hb.run_id == "run-1"


def test_liveness_states():
    hb = Heartbeat(**valid())
    live = liveness(hb, NOW_MS + 5_000, stale_after_s=60)
    assert (live.state, live.live, live.age_s, live.heartbeat) == ("live", True, 5.0, hb)
    assert liveness(hb, NOW_MS + 60_000, 60).state == "live"  # exactly at the limit: not yet stale
    stale = liveness(hb, NOW_MS + 60_001, 60)
    assert (stale.state, stale.live) == ("stale", False)
    stopping = liveness(Heartbeat(**valid(status="stopping")), NOW_MS, 60)
    assert (stopping.state, stopping.live) == ("stopping", False)
    idle = liveness(Heartbeat(**valid(status="idle")), NOW_MS, 60)
    assert idle.live
    missing = liveness(None, NOW_MS, 60)
    assert (missing.state, missing.live, missing.age_s, missing.heartbeat) == ("missing", False, None, None)
    # a heartbeat from the "future" (clock skew) has age 0, not a negative age
    assert liveness(hb, NOW_MS - 10_000, 60).age_s == 0.0


def test_check_uses_the_server_clock(fake_redis, keys, clock):
    heartbeat.write(fake_redis, keys, "run-1", "running", 1, 3, ttl_s=300)
    assert heartbeat.check(fake_redis, keys, stale_after_s=60).state == "live"
    clock.advance(61)
    state = heartbeat.check(fake_redis, keys, stale_after_s=60)
    assert state.state == "stale" and not state.live
    assert 61 <= state.age_s < 62
    heartbeat.write(fake_redis, keys, "run-1", "stopping", 3, 3, ttl_s=300)
    assert heartbeat.check(fake_redis, keys, stale_after_s=60).state == "stopping"
    heartbeat.write(fake_redis, keys, "run-2", "running", 0, 3, ttl_s=300)
    assert heartbeat.check(fake_redis, keys, stale_after_s=60).live
