"""The settings of where issues come from and which of them are work (``source.*``, ``FACTORY_SOURCE__*``):
the source kind and its connection, and the eligibility rules (``sources/rules.py``) that apply to every
kind. Linear's own settings are :mod:`.linear_settings`. Re-exported by :mod:`.config`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from factory_worker.config.linear import LinearSettings

#: The values GitHub gives an issue's ``author_association``.
GITHUB_ASSOCIATIONS = (
    "COLLABORATOR",
    "CONTRIBUTOR",
    "FIRST_TIMER",
    "FIRST_TIME_CONTRIBUTOR",
    "MANNEQUIN",
    "MEMBER",
    "NONE",
    "OWNER",
)
_REQUIRED = "source.required_labels (FACTORY_SOURCE__REQUIRED_LABELS)"


class SourceSettings(BaseModel):
    """Where issues come from (``file``: a .jsonl/.json file or a directory, ``github`` or ``module:Class``) and
    which of them the factory may work on: the eligibility rules (``sources/rules.py``), for every kind."""

    kind: str = Field(default="file", min_length=1)
    path: Path = Path("examples/issues.jsonl")
    ready_states: list[str] = Field(default_factory=lambda: ["ready"], min_length=1)
    required_labels: list[str] = Field(default_factory=list, description="an issue needs all of them (any case)")
    excluded_labels: list[str] = Field(default_factory=list, description="an issue with one of them is out")
    title_prefix: str = Field(default="", max_length=200, description="a title must start with it, e.g. '[factory]'")
    id_pattern: str | None = Field(default=None, max_length=500, description="a regex the issue id must fullmatch")
    author_associations: list[str] = Field(
        default_factory=list,
        description="GitHub author_association values allowed (OWNER, MEMBER, COLLABORATOR...); [] = any",
    )
    done_label: str = Field(default="factory:done", validate_default=True, description="an issue with it is not ready")
    parked_label: str = Field(
        default="factory:parked", validate_default=True, description="an issue with it is not ready"
    )
    working_label: str = Field(
        default="factory:working", min_length=1, description="tracker write-back: an agent works it"
    )
    github_repo: str | None = Field(default=None, description="owner/name for kind=github")
    github_labels: list[str] = Field(default_factory=list)
    github_api_url: str = "https://api.github.com"
    github_token_env: str = Field(default="GITHUB_TOKEN", description="name of the env var holding the token")
    github_max_retry_after_s: float = Field(
        default=300.0, gt=0, le=86400, allow_inf_nan=False, description="longest pause a rate-limit reply can impose"
    )
    github_all_open_issues: bool = Field(
        default=False, validate_default=True, description="kind=github without a label filter: every open issue"
    )
    linear: LinearSettings = Field(
        default_factory=LinearSettings,
        validate_default=True,
        description="kind=linear: team, states, labels, write-back states",
    )

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in ("file", "github", "linear") and ":" not in v:
            raise ValueError("must be 'file', 'github', 'linear' or 'module:Class'")
        return v

    @field_validator("required_labels", "excluded_labels", "github_labels", "author_associations", mode="before")
    @classmethod
    def _names(cls, v: Any, info: ValidationInfo) -> Any:
        if not isinstance(v, list):
            return v
        v = [x.strip() for x in v if not isinstance(x, str) or x.strip()]
        if info.field_name == "author_associations":
            v = [x.upper() if isinstance(x, str) else x for x in v]
            if bad := [x for x in v if x not in GITHUB_ASSOCIATIONS]:
                raise ValueError(f"unknown value {bad[0]!r}: expected some of {', '.join(GITHUB_ASSOCIATIONS)}")
        return v

    @field_validator("excluded_labels", "done_label", "parked_label")
    @classmethod
    def _not_required(cls, v: Any, info: ValidationInfo) -> Any:
        """A required label that is also excluded (or that the factory sets when done) would stop everything."""
        required = {x.casefold() for x in info.data.get("required_labels") or []}
        for name in v if isinstance(v, list) else [v]:
            if name and name.casefold() in required:
                raise ValueError(f"{name!r} is also in {_REQUIRED}: no issue would ever be ready")
        return v

    @field_validator("id_pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        try:
            return re.compile(v).pattern if v else None
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None

    @field_validator("github_all_open_issues")
    @classmethod
    def _github_scope(cls, v: bool, info: ValidationInfo) -> bool:
        """A public repository must not let anyone queue agent work by opening an issue."""
        data = info.data
        if data.get("kind") == "github" and not v and not (data.get("github_labels") or data.get("required_labels")):
            raise ValueError(
                f"kind 'github' needs a label filter (opening an issue must not be enough to queue "
                f"agent work): set source.github_labels (FACTORY_SOURCE__GITHUB_LABELS) or {_REQUIRED}, "
                "or opt in to every open issue with source.github_all_open_issues=true"
            )
        return v

    @field_validator("linear")
    @classmethod
    def _linear_team(cls, v: LinearSettings, info: ValidationInfo) -> LinearSettings:
        if info.data.get("kind") == "linear" and not v.team:
            raise ValueError(
                "kind 'linear' needs the team's key: set source.linear.team (FACTORY_SOURCE__LINEAR__TEAM)"
            )
        return v
