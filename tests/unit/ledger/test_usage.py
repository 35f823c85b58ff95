"""Usage and budgets in the ledger (issue 24): ``usage.lua`` adds and compares in one atomic step, the gate
stops claiming once the day budget is spent, ``retry`` grants a fresh budget. On a real redis-server: many
threads racing past a budget each overshoot by at most one line."""

from __future__ import annotations

import threading

import pytest

from factory_worker.config.budget import BudgetSettings
from factory_worker.ledger.core import Ledger
from factory_worker.ledger.usage import add_usage, day_spend, issue_usage
from tests.conftest import roomy_fleet


@pytest.fixture
def budget_ledger(fake_redis, keys, make_settings):
    def _make(**budget) -> Ledger:
        s = make_settings(budget=budget)
        return Ledger(fake_redis, keys, s.dispatch, budget=s.budget)

    return _make


def test_the_issue_sums_cross_attempts_and_the_crossing_line_says_so(fake_redis, keys):
    b = BudgetSettings(issue_usd=1.0)
    overs = [add_usage(fake_redis, keys, b, "I-1", cost_usd=0.3, tokens=10, lines=1).over for _ in range(4)]
    assert overs == ["", "", "", "issue-usd"]
    assert issue_usage(fake_redis, keys, "I-1") == {
        "cost_usd": 1.2,
        "tokens": 40,
        "wall_s": 0.0,
        "lines": 4,
        "malformed": 0,
    }
    wall = BudgetSettings(issue_wall_s=2.0)
    assert add_usage(fake_redis, keys, wall, "I-2", wall_s=1.5).over == ""
    assert add_usage(fake_redis, keys, wall, "I-2", wall_s=0.6).over == "issue-wall"
    assert day_spend(fake_redis, keys)["cost_usd"] == pytest.approx(1.2)


def test_the_day_budget_stops_the_gate_and_explain_says_day_budget_spent(budget_ledger, fake_redis, keys):
    ledger = budget_ledger(day_usd=1.0)
    roomy_fleet(fake_redis, keys)
    assert [c.issue for c in ledger.claim(["A"]).claims] == ["A"]
    t = add_usage(fake_redis, keys, ledger.budget, "A", cost_usd=1.0, lines=1)
    assert t.over == "day"
    batch = ledger.claim(["B", "C"])
    assert not batch.claims and [s.reason for s in batch.skipped] == ["day-budget", "day-budget"]
    why = ledger.explain("B")
    assert why.state == "day-budget" and why.text.startswith("day budget spent"), why
    assert int(ledger.counters()["skipped_day_budget"]) == 2
    unbounded = budget_ledger()  # no day budget: the same spend stops nothing
    assert [c.issue for c in unbounded.claim(["B"]).claims] == ["B"]


def test_retry_grants_a_fresh_budget(budget_ledger, fake_redis, keys):
    ledger = budget_ledger(issue_usd=1.0)
    add_usage(fake_redis, keys, ledger.budget, "I-1", cost_usd=2.0, lines=1)
    assert ledger.explain("I-1").detail["usage"]["cost_usd"] == 2.0
    ledger.retry("I-1")
    assert issue_usage(fake_redis, keys, "I-1") == {}
    assert add_usage(fake_redis, keys, ledger.budget, "I-1", cost_usd=0.3, lines=1).over == ""


def test_racing_reporters_overshoot_by_at_most_one_line_each(real_redis, keys):
    """Eight threads report 0.1 USD lines as fast as they can, each stopping at the first 'over' it is told:
    the add and the compare are one script, so every line after the crossing one is a reporter's last."""
    b = BudgetSettings(day_usd=5.0)
    threads_n, stopped_after = 8, []

    def reporter(n: int) -> None:
        for i in range(1000):
            if add_usage(real_redis, keys, b, f"I-{n}", cost_usd=0.1, lines=1).over:
                stopped_after.append(i + 1)
                return

    threads = [threading.Thread(target=reporter, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    spent = day_spend(real_redis, keys)["cost_usd"]
    assert len(stopped_after) == threads_n
    assert 5.0 - 1e-9 <= spent <= 5.0 + threads_n * 0.1 + 1e-9, spent  # at most one line past it, each


# -- concurrency keys (dispatch.concurrency) ---------------------------------------------------------------
def _groups(spec: dict[str, str], limit: int = 2) -> dict[str, list[tuple[str, int]]]:
    return {issue: [(key, limit)] if key else [] for issue, key in spec.items()}


def test_the_gate_counts_each_key_with_the_cap_fairly_and_a_claims_end_frees_its_key(
    fake_redis, keys, make_settings, clock
):
    from factory_worker.ledger.core import fair_order

    s = make_settings(dispatch={"max_in_flight": 8, "lease_ttl_s": 30, "queue_lease_s": 30})
    roomy_fleet(fake_redis, keys)
    ledger = Ledger(fake_redis, keys, s.dispatch)
    spec = {**{f"A{i}": "repo:a" for i in range(1, 6)}, **{f"B{i}": "repo:b" for i in range(1, 4)}, "C1": ""}
    g = _groups(spec)
    assert fair_order(list(spec), g)[:5] == ["A1", "B1", "C1", "A2", "B2"]
    batch = ledger.claim(list(spec), groups=g)
    claimed = {c.issue: c.token for c in batch.claims}
    assert set(claimed) == {"A1", "A2", "B1", "B2", "C1"}, batch
    reasons = {sk.issue: (sk.reason, sk.detail) for sk in batch.skipped}
    assert reasons["A3"] == ("concurrency-key", {"held": 2, "limit": 2, "key": "repo:a"})
    why = ledger.explain("A3", g)
    assert why.state == "concurrency-key" and "concurrency key repo:a at its limit 2" in why.text, why
    assert ledger.explain("A3").state == "claimable"  # without rules: the cap alone
    ledger.complete("A1", claimed["A1"])  # a claim's end frees its key's slot
    assert [c.issue for c in ledger.claim(list(spec), groups=g).claims] == ["A3"]
    ledger.release("B1", claimed["B1"])
    assert [c.issue for c in ledger.claim(list(spec), groups=g).claims] == ["B1"]  # released: claimable again
    clock.advance(31)  # every lease ran out (a dead worker): every key is free again
    again = ledger.claim(list(spec), groups=g)
    assert sum(c.issue.startswith("A") for c in again.claims) == 2, again
    assert int(ledger.counters()["skipped_concurrency"]) > 0


def test_an_issue_claimed_without_a_key_drops_the_keys_of_its_last_claim(fake_redis, keys, make_settings):
    s = make_settings(dispatch={"max_in_flight": 8})
    roomy_fleet(fake_redis, keys)
    ledger = Ledger(fake_redis, keys, s.dispatch)
    [first] = ledger.claim(["X"], groups={"X": [("repo:x", 1)]}).claims
    assert fake_redis.hget(keys.concurrency, "X") in ("repo:x", b"repo:x")
    ledger.release("X", first.token)
    assert [c.issue for c in ledger.claim(["X"], groups={"X": []}).claims] == ["X"]  # its labels changed
    assert fake_redis.hget(keys.concurrency, "X") is None
    assert [c.issue for c in ledger.claim(["Y"], groups={"Y": [("repo:x", 1)]}).claims] == ["Y"]  # X holds none
