"""The ledger-loss guard (issue 9): a process never claims or starts in a ledger other than its own."""

from __future__ import annotations

import pytest

from factory_worker.ledger import guard
from factory_worker.ledger.core import Ledger
from factory_worker.ledger.guard import LedgerLostError
from tests.conftest import roomy_fleet


@pytest.fixture
def dispatch(make_settings):
    return make_settings(dispatch={"lease_ttl_s": 30, "max_in_flight": 10}).dispatch


def test_an_emptied_ledger_puts_a_running_process_in_safe_mode_until_accepted(fake_redis, keys, dispatch):
    old = Ledger(fake_redis, keys, dispatch)  # a process that has been working
    done = old.claim(["a"]).claims[0]
    old.complete("a", done.token)
    queued = old.claim(["b"]).claims[0]
    remembered = old.guard.generation
    fake_redis.flushall()  # Redis restarted empty (or FLUSHALL, eviction, a stale replica...)
    roomy_fleet(fake_redis, keys)
    with pytest.raises(LedgerLostError, match="ledger lost"):
        old.claim(["a"])  # the done issue must not run again
    with pytest.raises(LedgerLostError):
        old.begin("b", queued.token, "agent-b")  # nor may a queued agent start
    st = guard.status(fake_redis, keys)
    assert st["ledger_lost"] and remembered in st["lost"]
    assert not fake_redis.exists(keys.claim("a"))  # safe mode wrote no claim

    # a process started after the loss sees a fresh ledger (the guard cannot know better; doctor's job)
    new = Ledger(fake_redis, keys, dispatch)
    assert new.guard.generation != remembered
    with pytest.raises(LedgerLostError):
        old.claim(["a"])  # the old process stays safe while nobody accepted

    accepted = guard.accept(fake_redis, keys)
    assert accepted == {"generation": new.guard.generation, "superseded": [remembered]}
    assert not guard.status(fake_redis, keys)["ledger_lost"]
    assert [c.issue for c in old.claim(["c"]).claims] == ["c"]  # adopted the accepted ledger
    assert old.guard.generation == new.guard.generation


def test_a_fresh_deployment_needs_no_ceremony_and_a_dry_run_creates_nothing(fake_redis, keys, dispatch):
    roomy_fleet(fake_redis, keys)
    ledger = Ledger(fake_redis, keys, dispatch)
    assert [c.issue for c in ledger.claim(["x"], dry_run=True).claims] == ["x"]
    assert not fake_redis.exists(keys.ledger)  # read-only: no generation written
    assert [c.issue for c in ledger.claim(["x"]).claims] == ["x"]
    assert fake_redis.hget(keys.ledger, "generation") == ledger.guard.generation
