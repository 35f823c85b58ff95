"""``budget.*``: what a dispatch may spend (the agent's usage lines, ``FACTORY_USAGE``); re-exported by
:mod:`factory_worker.config.settings`."""

from __future__ import annotations

from pydantic import BaseModel, Field


class BudgetSettings(BaseModel):
    """Cost and time budgets. 0 (the default) is no budget. An issue's budgets sum its attempts; the day's is
    the fleet's spend in the UTC day."""

    issue_usd: float = Field(default=0.0, ge=0, description="an issue's spend (USD, all attempts) before it is parked")
    issue_wall_s: float = Field(
        default=0.0, ge=0, description="an issue's agent run time (s, all attempts) before it is parked"
    )
    day_usd: float = Field(default=0.0, ge=0, description="the fleet's spend in a UTC day before claiming stops")
    day_hard: bool = Field(default=False, description="also stop running agents once the day budget is spent")

    @property
    def watches(self) -> bool:
        """Some budget is set (usage is read and summed whatever this says)."""
        return bool(self.issue_usd or self.issue_wall_s or self.day_usd)
