"""A step's usage report (issue 24): what each budget crossed means for the running agent."""

from __future__ import annotations

from factory_worker.agents.usage import Usage
from factory_worker.context import Context
from factory_worker.dispatch.job import Job
from factory_worker.dispatch.usage import usage_report


def _report(make_settings, fake_redis, **budget):
    ctx = Context(make_settings(budget=budget), fake_redis)
    return usage_report(Job(ctx, "agent-1", {"id": "I-1", "title": "t", "state": "ready"}, "1:x.1"))


def test_an_issue_budget_stops_the_agent_as_budget_needs_human(make_settings, fake_redis):
    report = _report(make_settings, fake_redis, issue_usd=1.0)
    assert [report(Usage(0.3, 1, 1, 0), 0.1) for _ in range(3)] == [None] * 3
    outcome, why = report(Usage(0.3, 1, 1, 0), 0.1)
    assert outcome == "budget" and why.startswith("needs-human: budget: issue spent 1.2 USD"), why


def test_the_wall_budget_counts_the_reported_run_time(make_settings, fake_redis):
    report = _report(make_settings, fake_redis, issue_wall_s=2.0)
    assert report(Usage(), 1.5) is None
    outcome, why = report(Usage(), 1.0)
    assert outcome == "budget" and "budget.issue_wall_s 2" in why


def test_the_day_budget_lets_running_agents_finish_unless_hard(make_settings, fake_redis):
    soft = _report(make_settings, fake_redis, day_usd=1.0)
    assert soft(Usage(2.0, 0, 1, 0), 0.0) is None  # spent, but the agent finishes (the gate stops claiming)
    hard = _report(make_settings, fake_redis, day_usd=1.0, day_hard=True)
    outcome, why = hard(Usage(0.1, 0, 1, 0), 0.0)
    assert outcome == "interrupted" and why.startswith("day budget spent"), why
