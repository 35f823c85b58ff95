"""``dispatch.min_replica_acks`` on a real primary + replica: claims, begins and settles wait for the
replica (Redis WAIT); an unacknowledged claim is released unused, an unacknowledged begin starts nothing,
an unacknowledged settle is sent again until acknowledged."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from factory_worker.config.settings import load_settings
from factory_worker.ledger.core import Ledger
from factory_worker.ledger.keys import Keys
from factory_worker.ledger.states import Begin, Gate
from factory_worker.ops.embedded import RedisServer
from harness import wait_until
from tests.sentinel import replica_acks

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.fixture
def pair(tmp_path: Path):
    primary = RedisServer(tmp_path / "primary", extra=["--repl-diskless-sync-delay", "0"]).start()
    replica = RedisServer(tmp_path / "replica", extra=["--replicaof", "127.0.0.1", str(primary.port)])
    try:
        replica.start()
        wait_until(lambda: replica_acks(primary.client()), 15, what="replica acknowledging")
        yield primary, replica
    finally:
        if replica.proc is not None and replica.proc.poll() is None:
            replica.proc.send_signal(signal.SIGCONT)
        replica.stop()
        primary.stop()


def _ledger(primary: RedisServer, lease_s: float = 10.0) -> Ledger:
    d = load_settings(
        dispatch={"min_replica_acks": 1, "replica_ack_timeout_s": 0.2, "lease_ttl_s": lease_s, "queue_lease_s": 30}
    ).dispatch
    return Ledger(primary.client(), Keys("acks"), d)


def test_acknowledged_claim_begin_and_settle_reach_the_replica(pair):
    primary, replica = pair
    ledger = _ledger(primary)
    batch = ledger.claim(["A", "B"])
    assert [c.issue for c in batch.claims] == ["A", "B"]
    # WAIT returned: the replica holds the claims at once, without any polling
    assert replica.client().get(Keys("acks").claim("A")) == batch.claims[0].token
    assert ledger.begin("A", batch.claims[0].token, "t-1") == Begin.STARTED
    ledger.complete("A", batch.claims[0].token)
    assert replica.client().hget(Keys("acks").done_bucket("A"), "A") is not None


def test_claim_without_replica_ack_is_released_unused(pair):
    primary, replica = pair
    replica.proc.send_signal(signal.SIGSTOP)  # the replica stops acknowledging
    ledger = _ledger(primary)
    batch = ledger.claim(["A", "B"])
    assert batch.claims == []
    assert {s.issue: s.reason for s in batch.skipped} == {"A": Gate.UNACKED, "B": Gate.UNACKED}
    k = Keys("acks")
    r = primary.client()
    assert r.get(k.claim("A")) is None and r.zcard(k.inflight) == 0  # nothing left owned
    assert r.hget(k.attempts, "A") is None  # no attempt counted
    assert int(r.hget(k.counters, "claims_unacked")) == 2
    replica.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: [c.issue for c in ledger.claim(["A"]).claims] == ["A"], 10, what="claim acknowledged")


def test_begin_without_replica_ack_does_not_start(pair):
    primary, replica = pair
    ledger = _ledger(primary)
    claim = ledger.claim(["A"]).claims[0]
    replica.proc.send_signal(signal.SIGSTOP)
    assert ledger.begin("A", claim.token, "t-1") == Begin.UNACKED


def test_settle_is_repeated_until_the_replica_acknowledges(pair):
    primary, replica = pair
    ledger = _ledger(primary)
    claim = ledger.claim(["A"]).claims[0]
    assert ledger.begin("A", claim.token, "t-1") == Begin.STARTED
    replica.proc.send_signal(signal.SIGSTOP)
    resume = threading.Timer(1.0, lambda: replica.proc.send_signal(signal.SIGCONT))
    resume.start()
    t0 = time.monotonic()
    ledger.complete("A", claim.token)  # blocks until the replica is back, then returns normally
    waited = time.monotonic() - t0
    resume.join()
    assert waited >= 0.9
    assert replica.client().hget(Keys("acks").done_bucket("A"), "A") is not None
    assert int(primary.client().hget(Keys("acks").counters, "replica_ack_retries")) >= 1


def test_settle_never_acknowledged_is_counted_after_one_lease_and_stands(pair):
    primary, replica = pair
    ledger = _ledger(primary)
    ledger.cfg.lease_ttl_s = 1.0  # the retries' window is one lease (agents need longer; the ledger does not)
    batch = ledger.claim(["A"])
    assert batch.claims, batch.skipped
    claim = batch.claims[0]
    replica.proc.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    assert ledger.fail("A", claim.token, "boom").state == "backoff"
    assert 1.0 <= time.monotonic() - t0 < 5.0
    r = primary.client()
    assert int(r.hget(Keys("acks").counters, "settles_unacked")) == 1
    assert r.get(Keys("acks").claim("A")) is None and r.hget(Keys("acks").attempts, "A") == "1"


def _staged(ledger: Ledger, issue: str = "A"):
    """A claim begun and opened for stages (step 1 = implement, queued for task s-1)."""
    from factory_worker.ledger.stages import StageLedger

    claim = ledger.claim([issue]).claims[0]
    assert ledger.begin(issue, claim.token, "t-1") == Begin.STARTED
    stages = StageLedger(ledger)
    opened = stages.open(issue, claim.token, "s-1", None, "implement", ["implement", "review"], "w")
    assert (opened.step, opened.stage) == (1, "implement")
    return stages, claim.token


def test_stage_start_without_replica_ack_runs_nothing_and_frees_the_claim_to_resume(pair):
    primary, replica = pair
    ledger = _ledger(primary)
    stages, token = _staged(ledger)
    replica.proc.send_signal(signal.SIGSTOP)
    assert stages.start("A", token, "s-1", 1, "implement", "h", 1) == ("unacked", None)
    r, k = primary.client(), Keys("acks")
    assert r.get(k.claim("A")) is None and r.hget(k.attempts, "A") is None  # released, no attempt counted
    assert int(r.hget(k.counters, "stages_unacked")) == 1
    replica.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: ledger.claim(["A"]).claims, 10, what="claim acknowledged")
    token2 = r.get(k.claim("A"))
    assert ledger.begin("A", token2, "t-2") == Begin.STARTED
    again = stages.open("A", token2, "s-2", None, "implement", ["implement", "review"], "w")
    assert (again.step, again.stage, again.resumed) == (1, "implement", True)  # step 1 never ran: it runs


def test_stage_open_without_replica_ack_raises_and_releases(pair):
    from factory_worker.ledger.stages import StageLedger, StageUnackedError

    primary, replica = pair
    ledger = _ledger(primary)
    claim = ledger.claim(["A"]).claims[0]
    assert ledger.begin("A", claim.token, "t-1") == Begin.STARTED
    replica.proc.send_signal(signal.SIGSTOP)
    with pytest.raises(StageUnackedError):
        StageLedger(ledger).open("A", claim.token, "s-1", None, "implement", ["implement"], "w")
    assert primary.client().get(Keys("acks").claim("A")) is None
    assert primary.client().zscore(Keys("acks").queued, "s-1") is None  # its task is never sent


def test_stage_hand_over_is_repeated_until_the_replica_acknowledges(pair):
    primary, replica = pair
    ledger = _ledger(primary)
    stages, token = _staged(ledger)
    assert stages.start("A", token, "s-1", 1, "implement", "h", 1)[0] == "ok"
    replica.proc.send_signal(signal.SIGSTOP)
    resume = threading.Timer(1.0, lambda: replica.proc.send_signal(signal.SIGCONT))
    resume.start()
    t0 = time.monotonic()
    new_step = stages.next("A", token, 1, "ok", "review", 1, 0, "", "s-2", None)
    waited = time.monotonic() - t0
    resume.join()
    assert new_step == 2 and waited >= 0.9  # a finished step is on the replica before the next is sent
    assert replica.client().hget(Keys("acks").stages("A"), "step") == "2"
    assert int(primary.client().hget(Keys("acks").counters, "replica_ack_retries")) >= 1


def test_loop_status_says_claims_are_refused_for_want_of_replica_acknowledgements(pair):
    """After a failover with one replica left, min_replica_acks=2 stops dispatching by design: loop-status says why."""
    import io
    import json

    from factory_worker.cli.quick import status_first

    primary, replica = pair
    env = {"FACTORY_REDIS_URL": primary.url, "FACTORY_NAMESPACE": "acks", "FACTORY_DISPATCH__MIN_REPLICA_ACKS": "2"}

    def answer(environ: dict[str, str]) -> dict:
        out = io.StringIO()
        assert status_first(["loop-status", "--json"], environ, Path("/nonexistent"), out=out) == 1
        return json.loads(out.getvalue())

    data = answer(env)
    assert data["replicas"] == {"role": "master", "connected": 1} and data["min_replica_acks"] == 2
    why = data["reasons"][data["reason_codes"].index("replica-acks")]
    assert "min_replica_acks is 2 but the primary has 1 connected replica(s)" in why
    assert "replica-acks" not in answer({**env, "FACTORY_DISPATCH__MIN_REPLICA_ACKS": "1"})["reason_codes"]
    replica.stop()  # the last replica gone: a worker's own setting (published with its presence) says 1
    primary.client().set(Keys("acks").worker("w@h"), json.dumps({"hostname": "w@h", "min_replica_acks": 1}))
    wait_until(lambda: primary.client().info("replication")["connected_slaves"] == 0, 10, what="replica gone")
    data = answer({k: v for k, v in env.items() if k != "FACTORY_DISPATCH__MIN_REPLICA_ACKS"})
    assert "replica-acks" in data["reason_codes"] and data["min_replica_acks"] == 1
