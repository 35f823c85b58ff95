from factory_worker.config import load_settings
from factory_worker.ledger import Ledger


def test_fake_clock_drives_lease_expiry(fake_redis, clock, keys):
    ledger = Ledger(fake_redis, keys, load_settings().dispatch)
    claim = ledger.claim(["a"]).claims[0]
    assert ledger.claim(["a"]).skipped[0].reason == "in-flight"
    clock.advance(31)
    again = ledger.claim(["a"]).claims[0]
    assert again.fence == claim.fence + 1


def test_real_redis_fixture(real_redis, keys):
    ledger = Ledger(real_redis, keys, load_settings().dispatch)
    assert [c.issue for c in ledger.claim(["a", "b"]).claims] == ["a", "b"]
