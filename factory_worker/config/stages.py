"""Settings of a staged dispatch: an ordered list of named stages and an optional triage (TOML-friendly).

```toml
[agent]
max_rounds = 3          # implement -> review rounds of one attempt
min_confidence = 0.5    # a triage below this escalates the issue (parked, needs-human)

[agent.triage]
command = ["python3", "examples/pipeline/triage.py", "{id}"]

[[agent.stages]]
name = "implement"
command = ["python3", "examples/pipeline/implement.py", "{id}"]
on_failure = "retry"    # fail (default) | retry | back

[[agent.stages]]
name = "review"
command = ["python3", "examples/pipeline/review.py", "{id}"]
back_to = "implement"   # where a rejection (exit 3) or on_failure = "back" goes, with the output as feedback
```

Commands follow ``agent.command``'s rules (an argv list, never a shell string; ``{id}``/``{title}`` substituted
inside single elements). Without ``stages`` and ``triage`` nothing changes: ``agent.command`` is the one agent.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import NoDecode

log = logging.getLogger(__name__)

#: A stage's exit code that means "rejected": go back to ``back_to`` with this stage's output as feedback.
REJECT_EXIT = 3
#: The name triage runs under (in Flower, the logs and the ledger's stage progress).
TRIAGE = "triage"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


def argv(v: Any) -> Any:
    """An argv: a list of strings, or its JSON text (an env var); never a shell string."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            raise ValueError("must be a JSON list of strings (an argv), not a shell string") from None
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise ValueError("must be a non-empty list of strings (an argv)")
    if not v[0].strip():
        raise ValueError("argv[0] must not be empty")
    return v


class StageSettings(BaseModel):
    """One stage: a name, its argv, its timeout, and what its failure means."""

    name: str = Field(description="lower-case letters, digits, - and _ (at most 40)")
    command: Annotated[list[str], NoDecode] = Field(description="argv, as agent.command")
    timeout_s: float | None = Field(default=None, gt=0, description="default: agent.timeout_s")
    on_failure: Literal["fail", "retry", "back"] = Field(
        default="fail",
        description="a failure (non-zero exit other than 3, timeout, signal): fail the attempt, retry "
        "this stage (up to `retries` times), or go back to `back_to` with the output",
    )
    retries: int = Field(default=1, ge=0, le=10, description="retries of this stage per attempt (on_failure = retry)")
    back_to: str | None = Field(
        default=None,
        description="the earlier stage a rejection (exit 3) or on_failure = back "
        "goes to; default: the stage before this one",
    )

    model_config = {"extra": "forbid"}

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be lower-case letters, digits, '-' or '_' (at most 40), e.g. 'review'")
        return v

    @field_validator("command", mode="before")
    @classmethod
    def _argv(cls, v: Any) -> Any:
        return argv(v)


class TriageSettings(BaseModel):
    """Triage: a command whose output is JSON ``{"stages": [...], "confidence": 0..1, "reason": "..."}``."""

    command: Annotated[list[str], NoDecode] = Field(description="argv, as agent.command")
    timeout_s: float = Field(default=120.0, gt=0)

    model_config = {"extra": "forbid"}

    @field_validator("command", mode="before")
    @classmethod
    def _argv(cls, v: Any) -> Any:
        return argv(v)


def check_pipeline(stages: list[StageSettings], triage: TriageSettings | None) -> None:
    """Cross-stage rules; ValueError naming the stage and the setting."""
    names = [s.name for s in stages]
    for i, stage in enumerate(stages):
        where = f"agent.stages[{i}] ({stage.name!r}; FACTORY_AGENT__STAGES)"
        if stage.name in names[:i]:
            raise ValueError(f"{where}: the name is used twice")
        if triage is not None and stage.name == TRIAGE:
            raise ValueError(f"{where}: {TRIAGE!r} is the triage's name; rename the stage")
        if stage.back_to is not None and stage.back_to not in names[: i + 1]:
            raise ValueError(
                f"{where}: back_to {stage.back_to!r} is not this or an earlier stage "
                f"(one of {', '.join(names[: i + 1])})"
            )
        if stage.on_failure == "back" and stage.back_to is None and i == 0:
            raise ValueError(f"{where}: on_failure 'back' needs back_to on the first stage")


def default_stage(command: list[str], timeout_s: float) -> StageSettings:
    """``agent.command`` as the one stage of a pipeline (a triage with no ``agent.stages``)."""
    return StageSettings(name="agent", command=command, timeout_s=timeout_s)
