"""The settings of the Linear source and its write-back (``source.linear.*``, ``FACTORY_SOURCE__LINEAR__*``).

Linear is polled over its GraphQL API (``sources/linear.py``); write-back moves an issue between workflow
states and comments on it (``tracker_linear.py``). States are named as in the team's workflow ("Todo",
"In Progress", "Done"); the names are resolved to ids once per writer.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, Field, field_validator

TEAM_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class LinearSettings(BaseModel):
    """Which Linear issues are work, and what write-back does to them."""

    api_url: str = Field(default="https://api.linear.app/graphql", description="Linear's GraphQL endpoint")
    token_env: str = Field(
        default="LINEAR_API_KEY",
        min_length=1,
        description="name of the env var holding the API key "
        "(sent as 'Authorization: <key>'; an OAuth token as 'Bearer <token>'); *_FILE works too",
    )
    team: str | None = Field(default=None, description="the team's key, e.g. ENG (required for kind=linear)")
    project: str | None = Field(default=None, max_length=200, description="only issues of this project (its name)")
    states: list[str] = Field(
        default_factory=lambda: ["Todo"], min_length=1, description="workflow states whose issues are ready (names)"
    )
    labels: list[str] = Field(default_factory=list, description="an issue needs all of them (any case)")
    timeout_s: float = Field(default=10.0, gt=0, description="HTTP timeout of one request")
    max_retry_after_s: float = Field(
        default=300.0, gt=0, le=86400, allow_inf_nan=False, description="longest pause a rate-limit reply can impose"
    )
    # -- write-back (tracker.write_back): workflow states an issue is moved to --------------------------------
    working_state: str | None = Field(default="In Progress", description="when an agent starts it; None: not moved")
    done_state: str | None = Field(default="Done", description="when it is done; None: not moved")
    parked_state: str | None = Field(default=None, description="when it is parked; None: not moved (comment only)")
    poll_working_state: bool | None = Field(
        default=None,
        description="also poll issues in working_state (the ledger says "
        "whether an agent has one); default: when tracker.write_back is on",
    )

    @field_validator("team")
    @classmethod
    def _team(cls, v: str | None) -> str | None:
        if v is not None and not TEAM_KEY_RE.match(v):
            raise ValueError("must be a team key such as 'ENG' (letters, digits, '_' or '-')")
        return v

    @field_validator("states", "labels", mode="before")
    @classmethod
    def _names(cls, v: object) -> object:
        return [x.strip() for x in v if not isinstance(x, str) or x.strip()] if isinstance(v, list) else v

    @field_validator("api_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("https://", "http://")):
            raise ValueError("must be an http(s):// URL")
        return v

    @property
    def polled_states(self) -> list[str]:
        """The states polled: the ready ones, plus the working state when write-back moves issues there (an
        issue whose agent died with its worker stays in it and must be found again)."""
        extra = [self.working_state] if self.poll_working_state and self.working_state else []
        return list(self.states) + [x for x in extra if x not in self.states]

    @property
    def ready_state(self) -> str:
        """Where a released, backed-off or retried issue goes back to: the first ready state."""
        return self.states[0]
