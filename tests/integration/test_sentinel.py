"""Chaos (issue 9): the fleet on a Sentinel deployment (primary + replica + 3 sentinels on loopback), the
primary SIGKILLed mid-run. The fleet follows the promotion without a restart; with
``min_replica_acks=1`` no issue completes twice and nothing is left stuck."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter

import pytest

from factory_worker.ledger.core import Ledger
from factory_worker.ledger.redis_client import client_from_url
from tests.sentinel import SentinelCluster
from tests.support import (
    CeleryProc,
    assert_audit_clean,
    ctl,
    read_events,
    settings_from,
    stack_env,
    wait_until,
    write_issues,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.chaos]

N_ISSUES = 200


@pytest.fixture
def cluster(tmp_path):
    with SentinelCluster(tmp_path / "sentinel") as c:
        yield c


@pytest.mark.parametrize("acks", [1, 0])
def test_primary_killed_mid_run_the_fleet_follows_the_promotion(cluster, namespace, tmp_path, procs, acks):
    write_issues(tmp_path / "issues.jsonl", [{"id": f"S-{i}", "title": "t", "state": "ready"} for i in range(N_ISSUES)])
    env = stack_env(
        cluster.url,
        namespace,
        tmp_path,
        AGENT_SLEEP="0.2",
        FACTORY_DISPATCH__MAX_IN_FLIGHT="8",
        FACTORY_DISPATCH__QUEUE_LEASE_S="10",
        FACTORY_DISPATCH__MIN_REPLICA_ACKS=str(acks),
        FACTORY_LOOP__MAX_ITERATIONS="5",
        # an agent that ends while the primary is down settles once the replica is promoted: the
        # promise needs the promotion (down-after 2 s + election, ~3-4 s) inside the claim's lease
        FACTORY_DISPATCH__LEASE_TTL_S="10",
        # a loop message lost with the primary leaves the run's lease to expire before beat's
        # next kickoff starts a new run: the lease bounds that gap (default 60 s)
        FACTORY_LOOP__LEASE_TTL_S="5",
    )
    worker = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "4"])
    procs.append(worker)
    worker.wait_ready()
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    client = client_from_url(cluster.url)
    ledger = Ledger.from_settings(settings_from(env), client)
    wait_until(lambda: ledger.gauges()["done"] >= N_ISSUES // 4, 60, what="a quarter done")

    cluster.primary.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    failover_s = cluster.wait_failover()
    cluster.rejoin_old_primary()  # back as a replica, so acks can be given again

    def progressed() -> bool:
        return any(e["event"] == "start" and e["t"] > time.time() - 1 for e in read_events(tmp_path / "out"))

    wait_until(progressed, 60, what="agents started after the failover")
    recovery_s = time.monotonic() - killed_at
    wait_until(lambda: _safe_done(ledger) == N_ISSUES, 90, what="every issue done after the failover")
    drained_s = time.monotonic() - killed_at

    events = read_events(tmp_path / "out")
    ok_ends = Counter(e["issue"] for e in events if e["event"] == "end" and e["code"] == 0)
    twice = sorted(i for i, n in ok_ends.items() if n > 1)
    counters = ledger.counters()
    print(
        f"\nsentinel failover, min_replica_acks={acks}: promotion {failover_s:.1f}s, agents again after "
        f"{recovery_s:.1f}s, all {N_ISSUES} done {drained_s:.1f}s after the kill; issues completed twice: "
        f"{len(twice)}; claims unacked: {counters.get('claims_unacked', 0)}; "
        f"ack retries: {counters.get('replica_ack_retries', 0)}; settles unacked: "
        f"{counters.get('settles_unacked', 0)}; no-op agent tasks: {counters.get('agent_tasks_noop', 0)}"
    )
    assert set(ok_ends) == {f"S-{i}" for i in range(N_ISSUES)}
    if acks:
        assert twice == [], f"completed twice despite replica acks: {twice}"
    wait_until(lambda: ledger.gauges()["in_flight"] == 0, 30, what="nothing left in flight")
    status = ctl(env, "loop-status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["redis"].startswith("sentinel://")
    assert_audit_clean(cluster.url, namespace)


def _safe_done(ledger: Ledger) -> int:
    try:
        return ledger.gauges()["done"]
    except Exception:
        return -1
