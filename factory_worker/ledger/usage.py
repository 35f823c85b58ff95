"""The ledger's side of usage and budgets: the agents' usage lines summed per issue and per UTC day
(``lua/usage.lua``: the add and the budget compare in one atomic step) and the reads ``explain``,
``dispatches``, ``loop-status`` and the metrics show.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis

from factory_worker.config.budget import BudgetSettings
from factory_worker.ledger.keys import Keys, utc_day
from factory_worker.ledger.redis_client import decoded_hash
from factory_worker.ledger.scripts import scripts_for

log = logging.getLogger(__name__)

__all__ = ["Totals", "add_usage", "day_spend", "issue_usage", "utc_day"]


@dataclass(frozen=True)
class Totals:
    """The sums after one usage line, and which budget (if any) they reached: ``over`` is '' | 'issue-usd' |
    'issue-wall' | 'day'."""

    issue_cost_usd: float
    issue_wall_s: float
    day_cost_usd: float
    over: str


def add_usage(
    client: redis.Redis,
    keys: Keys,
    budget: BudgetSettings,
    issue: str,
    cost_usd: float = 0.0,
    tokens: int = 0,
    wall_s: float = 0.0,
    lines: int = 0,
    malformed: int = 0,
) -> Totals:
    """Add one delta to ``issue``'s and today's sums and compare them with ``budget`` (one round trip)."""
    reply = scripts_for(client)["usage"](
        keys,
        issue=issue,
        day=utc_day(),
        cost_usd=repr(float(cost_usd)),
        tokens=int(tokens),
        wall_s=repr(max(0.0, float(wall_s))),
        lines=int(lines),
        malformed=int(malformed),
        issue_usd=repr(budget.issue_usd),
        issue_wall_s=repr(budget.issue_wall_s),
        day_usd=repr(budget.day_usd),
        spend_ttl_ms=Keys.SPEND_TTL_S * 1000,
    )
    ic, iw, dc, over = (v.decode() if isinstance(v, bytes) else str(v) for v in reply.values)
    return Totals(float(ic), float(iw), float(dc), over)


def _numbers(raw: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in raw.items():
        try:
            out[name] = int(value) if name in ("tokens", "lines", "malformed") else round(float(value), 6)
        except ValueError:
            out[name] = value
    return out


def issue_usage(client: redis.Redis, keys: Keys, issue: str) -> dict[str, Any]:
    """``issue``'s usage over its attempts ({} when none was reported)."""
    return _numbers(decoded_hash(client.hgetall(keys.usage(issue))))


def day_spend(client: redis.Redis, keys: Keys, day: str | None = None) -> dict[str, Any]:
    """The fleet's usage in a UTC day (today by default): cost_usd, tokens, lines."""
    got = _numbers(decoded_hash(client.hgetall(keys.spend(day or utc_day()))))
    return {"day": day or utc_day(), "cost_usd": got.get("cost_usd", 0.0), "tokens": got.get("tokens", 0), **got}


def costs(client: redis.Redis, keys: Keys, issues: list[str]) -> dict[str, float | None]:
    """Each issue's spend over its attempts (None: nothing reported), in one round trip (``dispatches``)."""
    if not issues:
        return {}
    pipe = client.pipeline(transaction=False)
    for issue in issues:
        pipe.hget(keys.usage(issue), "cost_usd")
    out: dict[str, float | None] = {}
    for issue, raw in zip(issues, pipe.execute()):
        try:
            out[issue] = None if raw is None else round(float(raw), 6)
        except ValueError:
            out[issue] = None
    return out
