"""Chaos across hosts (issue 9): agent workers in their own network namespaces ("hosts"), each reaching Redis
through a few-ms delay proxy over its own veth, while beat and the loop worker stay with Redis in the root
namespace. One host is cut off the network, or Redis is frozen, while agents run.

Checked from the agents' own records (start / term / end events and a heartbeat every 0.1 s, see
``tests/support.RECORDING_AGENT``; the exits of the agents running when the fault begins are also watched,
by pidfd, to the millisecond): never two live agents of one issue at the same moment; every issue done
exactly once; an agent cut off from Redis dead before its claim could expire (the claim's expiry read from
Redis once nothing more from that agent's host could reach it); the fleet recovers. Needs root and iproute2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from collections import Counter
from typing import NamedTuple

import pytest
import redis

from factory_worker.ledger.core import done_markers
from factory_worker.ledger.keys import Keys
from tests.netns import Fleet, Host, NetnsUnavailable
from tests.support import (
    AgentLife,
    DeathWatch,
    agent_lives,
    assert_audit_clean,
    ctl,
    max_overlap_s,
    pid_alive,
    read_events,
    wait_until,
    write_issues,
)

NEEDS_NETNS = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and iproute2 to create network namespaces"
)
pytestmark = [
    pytest.mark.integration,
    pytest.mark.e2e,
    pytest.mark.chaos,
    pytest.mark.netns,
    NEEDS_NETNS,
    pytest.mark.timeout(180),
]

N_HOSTS = 3  # three agent workers and the root stack run fine on 2 cores with these timings
CONCURRENCY = 2
LEASE_S = 3.0
HEARTBEAT_S = 0.1
SETTINGS = {
    "FACTORY_DISPATCH__LEASE_TTL_S": f"{LEASE_S:g}",
    # without a renew an agent is stopped 3 - 0.3 - 1 = 1.7 s after the last one, SIGKILLed 1 s later
    "FACTORY_AGENT__TERM_GRACE_S": "1",
    "FACTORY_LOOP__MAX_ITERATIONS": "5",
    "FACTORY_LOOP__LEASE_TTL_S": "5",  # a run lost to the fault is replaced in seconds (default 60)
    "AGENT_SLEEP": "8",
    "AGENT_TERM_CLEANUP_S": "1.5",  # longer than the grace: an agent stopped for its lease ends by SIGKILL
    "AGENT_HEARTBEAT_S": f"{HEARTBEAT_S:g}",
}


@pytest.fixture
def fleet(tmp_path, namespace):
    f = Fleet(tmp_path, namespace, n_hosts=N_HOSTS)
    try:
        try:
            f.build()
        except NetnsUnavailable as exc:
            pytest.skip(f"cannot create network namespaces here: {exc}")
        yield f
    finally:
        f.close()


class Verdict(NamedTuple):
    lives: list[AgentLife]
    overlap_s: float
    overlap_issue: str | None
    duplicates: list[str]  # issues completed (exit 0) more than once
    reruns: list[str]  # issues an agent started for after the issue was completed
    stuck: list[str]  # issues not done when the test stopped waiting


def start_fleet(fleet: Fleet, tmp_path, prefix: str) -> tuple[dict[str, str], list[str]]:
    issues = [f"{prefix}-{i}" for i in range(N_HOSTS * CONCURRENCY)]
    write_issues(tmp_path / "issues.jsonl", [{"id": i, "title": "t", "state": "ready"} for i in issues])
    return fleet.start(CONCURRENCY, **SETTINGS), issues


def running(out) -> list[dict]:
    """The start records of the agents running now (started, not ended, alive)."""
    events = read_events(out)
    ended = {e["pid"] for e in events if e["event"] == "end"}
    return [e for e in events if e["event"] == "start" and e["pid"] not in ended and pid_alive(e["pid"])]


def wait_running(out, n: int, timeout: float = 60) -> list[dict]:
    """The start records of the running agents, once ``n`` run at the same time."""
    return wait_until(
        lambda: (lambda live: live if len(live) >= n else None)(running(out)), timeout, what=f"{n} agents running"
    )


def claim_expiries(r: redis.Redis, keys: Keys) -> dict[str, float]:
    """token -> when its claim expires, on the server's clock (the agents' records use the same clock)."""
    names = list(r.scan_iter(match=keys.claim("*"), count=1000))
    p = r.pipeline(transaction=True)
    p.time()
    for name in names:
        p.get(name).pttl(name)
    (sec, usec), *rest = p.execute()
    now = int(sec) + int(usec) / 1e6
    return {token: now + ttl / 1000 for token, ttl in zip(rest[::2], rest[1::2]) if token and ttl > 0}


def wait_all_done(r: redis.Redis, keys: Keys, issues: list[str], timeout: float) -> list[str]:
    """The issues still not done after ``timeout`` s (stuck), at most that long."""
    try:
        wait_until(
            lambda: set(issues) <= {i for i, _ in done_markers(r, keys)}, timeout, interval=0.25, what="all done"
        )
    except AssertionError:
        pass
    return sorted(set(issues) - {i for i, _ in done_markers(r, keys)})


def listed_running(r: redis.Redis, keys: Keys, timeout: float = 10) -> list[str]:
    """Agent tasks still listed as running (``{ns}:agents``) ``timeout`` s after every agent ended (none
    expected: the loop forgets those whose claims are gone)."""
    try:
        wait_until(lambda: not r.smembers(keys.agents), timeout, interval=0.25, what="no agent listed as running")
    except AssertionError:
        pass
    return sorted(r.smembers(keys.agents))


def verdict(out, stuck: list[str], died: dict[int, float]) -> Verdict:
    lives = agent_lives(out, HEARTBEAT_S, died)
    overlap, issue = max_overlap_s(lives)
    ok = [life for life in lives if life.code == 0]
    completed = Counter(life.issue for life in ok)
    first_done = {i: min(life.end for life in ok if life.issue == i) for i in completed}
    reruns = sorted({life.issue for life in lives if life.issue in first_done and life.start > first_done[life.issue]})
    return Verdict(lives, overlap, issue, sorted(i for i, n in completed.items() if n > 1), reruns, stuck)


def at_fault(lives: list[AgentLife], at: float, expiries: dict[str, float]) -> tuple[list[float], list[str]]:
    """For the agents alive at ``at``: how long before its claim's expiry each died (s), and the problems
    (died after it, or no claim held it at all)."""
    leads, problems = [], []
    for life in (x for x in lives if x.start <= at < x.end):
        if life.token not in expiries:
            problems.append(f"{life.issue} pid {life.pid}: running while no claim held its token {life.token}")
            continue
        lead = expiries[life.token] - life.end
        leads.append(lead)
        if lead <= 0:
            problems.append(f"{life.issue} pid {life.pid}: alive {-lead:.2f}s after its claim expired")
    return leads, problems


def presence_after(r: redis.Redis, keys: Keys, host: Host, after: float, timeout: float = 30) -> float:
    """When ``host``'s worker wrote its presence again after ``after`` (s since the epoch)."""
    node = f"{host.name}@{socket.gethostname()}"

    def written():
        raw = r.get(keys.worker(node))
        return raw is not None and json.loads(raw)["updated_ms"] / 1000 >= after

    wait_until(written, timeout, what=f"{node} present again")
    return time.time()


def assert_safe(v: Verdict, issues: list[str], leads: list[float], problems: list[str]) -> None:
    assert v.overlap_s <= 0, f"two live agents of {v.overlap_issue} for {v.overlap_s:.2f}s"
    assert not problems, problems
    assert leads, "no agent was running when the fault began"
    assert not v.duplicates and not v.reruns, (v.duplicates, v.reruns)
    assert not v.stuck, f"never done: {v.stuck}"
    completed = Counter(life.issue for life in v.lives if life.code == 0)
    assert sorted(completed) == sorted(issues)


def test_a_host_cut_off_mid_run_loses_its_agents_before_their_leases_and_each_issue_is_done_once(
    fleet, tmp_path, namespace
):
    out = tmp_path / "out"
    _, issues = start_fleet(fleet, tmp_path, "P")
    r, keys = fleet.client(), Keys(namespace)
    wait_running(out, len(issues))
    time.sleep(2.0)  # every agent is 2 s into its 8 s
    live = running(out)
    victim = next(h for h in fleet.hosts if h.name == Counter(e["host"] for e in live).most_common(1)[0][0])
    with DeathWatch([e["pid"] for e in live]) as watch:
        cut_at = time.time()
        victim.cut()
        time.sleep(0.5)  # what its proxy had already received reaches Redis; nothing more can
        expiries = claim_expiries(r, keys)
        time.sleep(max(0.0, cut_at + 3 * LEASE_S - time.time()))
        victim.heal()
        healed_at = time.time()
        stuck = wait_all_done(r, keys, issues, 60)
    back_s = presence_after(r, keys, victim, healed_at) - healed_at
    phantoms = listed_running(r, keys)

    v = verdict(out, stuck, watch.died)
    cut = [life for life in v.lives if life.host == victim.name and life.start <= cut_at < life.end]
    leads, problems = at_fault(cut, cut_at, expiries)
    again = [
        min((x.start for x in v.lives if x.issue == c.issue and x.start > cut_at), default=float("nan")) for c in cut
    ]
    print(
        f"\npartition: {victim.name} cut for {healed_at - cut_at:.1f}s with {len(cut)} agents running: "
        f"max overlap {v.overlap_s:.2f}s, duplicates {len(v.duplicates)}, stuck {len(v.stuck)}, "
        f"cut agents dead {min(leads, default=0):.2f}-{max(leads, default=0):.2f}s before their claims expired "
        f"(SIGTERMed {sum(c.termed for c in cut)}, SIGKILLed {sum(c.code is None for c in cut)}), "
        f"recovery: its issues restarted elsewhere {max(again, default=float('nan')) - cut_at:.1f}s after the "
        f"cut, the host back {back_s:.1f}s after the heal; agents still listed as running {len(phantoms)}"
    )
    assert_safe(v, issues, leads, problems)
    assert all(c.code != 0 for c in cut), "an agent cut off from Redis finished its work anyway"
    assert not phantoms, f"listed as running after every agent ended: {phantoms}"
    assert_audit_clean(fleet.url, namespace)


def test_b_redis_frozen_for_two_leases_every_agent_dies_in_time_and_the_loop_recovers(fleet, tmp_path, namespace):
    out = tmp_path / "out"
    env, issues = start_fleet(fleet, tmp_path, "F")
    r, keys = fleet.client(), Keys(namespace)
    wait_running(out, len(issues))
    time.sleep(2.0)
    with DeathWatch([e["pid"] for e in running(out)]) as watch:
        fleet.hold()  # a few ms: no host's write may land between reading the claims and the freeze
        try:
            time.sleep(0.05)
            expiries = claim_expiries(r, keys)
            fleet.redis.proc.send_signal(signal.SIGSTOP)
            frozen_at = time.time()
        finally:
            fleet.release()
        time.sleep(2 * LEASE_S)
        fleet.redis.proc.send_signal(signal.SIGCONT)
        resumed_at = time.time()
        new = wait_until(
            lambda: [e["t"] for e in read_events(out) if e["event"] == "start" and e["t"] > resumed_at],
            60,
            what="agents started after the freeze",
        )
    agents_s = min(new) - resumed_at
    wait_until(lambda: ctl(env, "loop-status").returncode == 0, 60, interval=0.5, what="loop-status live again")
    status_s = time.time() - resumed_at
    stuck = wait_all_done(r, keys, issues, 60)
    phantoms = listed_running(r, keys)

    v = verdict(out, stuck, watch.died)
    frozen = [life for life in v.lives if life.start <= frozen_at < life.end]
    leads, problems = at_fault(frozen, frozen_at, expiries)
    print(
        f"\nfreeze: Redis SIGSTOPped {resumed_at - frozen_at:.1f}s with {len(frozen)} agents running: "
        f"max overlap {v.overlap_s:.2f}s, duplicates {len(v.duplicates)}, stuck {len(v.stuck)}, "
        f"agents dead {min(leads, default=0):.2f}-{max(leads, default=0):.2f}s before their claims expired "
        f"(SIGKILLed {sum(life.code is None for life in frozen)}), recovery: agents again {agents_s:.1f}s "
        f"after SIGCONT, loop-status 0 after {status_s:.1f}s; agents still listed as running {len(phantoms)}"
    )
    assert_safe(v, issues, leads, problems)
    assert len(frozen) == len(issues) and all(life.code != 0 for life in frozen)
    assert not phantoms, f"listed as running after every agent ended: {phantoms}"
    assert_audit_clean(fleet.url, namespace)
