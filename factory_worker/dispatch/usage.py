"""A step's usage report: each usage line of its agent (``FACTORY_USAGE``) sent to the ledger
(:func:`factory_worker.ledger.usage.add_usage`), and what a budget crossed means for the agent: an issue
budget stops it as ``budget`` (parked ``needs-human: budget ...``: no further attempt, ``retry`` grants a fresh
budget); the day's stops claiming (the gate) and lets it finish, unless ``budget.day_hard`` (then it is stopped
and its claim released, no attempt counted). The run time alone (a report without a line) is sent only when
``budget.issue_wall_s`` is set: a dispatch without usage lines costs no extra round trip.
"""

from __future__ import annotations

import logging

from factory_worker.agents.usage import Usage, UsageReport
from factory_worker.dispatch.job import Job
from factory_worker.ledger.states import Outcome
from factory_worker.ledger.usage import add_usage

log = logging.getLogger(__name__)


def usage_report(job: Job) -> UsageReport:
    """The report callable of ``job``'s step (called from its lease keeper's thread)."""
    ctx, budget, issue = job.ctx, job.ctx.settings.budget, job.issue_id

    def report(delta: Usage, wall_s: float) -> tuple[str, str] | None:
        if not delta.lines and not delta.malformed and not budget.issue_wall_s:
            return None  # only the run time, and no budget counts it: no round trip
        t = add_usage(
            ctx.redis,
            ctx.keys,
            budget,
            issue,
            delta.cost_usd,
            delta.tokens,
            wall_s,
            delta.lines,
            delta.malformed,
        )
        if t.over == "issue-usd":
            return Outcome.BUDGET, (
                f"needs-human: budget: issue spent {t.issue_cost_usd:.4g} USD of budget.issue_usd {budget.issue_usd:g}"
            )
        if t.over == "issue-wall":
            return Outcome.BUDGET, (
                f"needs-human: budget: issue ran {t.issue_wall_s:.1f} s of budget.issue_wall_s {budget.issue_wall_s:g}"
            )
        if t.over == "day" and budget.day_hard:
            return Outcome.INTERRUPTED, (
                f"day budget spent: {t.day_cost_usd:.4g} USD of budget.day_usd {budget.day_usd:g} (budget.day_hard)"
            )
        return None

    return report
