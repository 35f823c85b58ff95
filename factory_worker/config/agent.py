"""``agent.*``: the agent program, what it is given, and a staged dispatch's stages; re-exported by
:mod:`factory_worker.config.settings`."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import NoDecode

from factory_worker.config.stages import StageSettings, TriageSettings, check_pipeline, default_stage

#: What an agent gets of the worker's environment by default (HOME is its own directory unless listed).
DEFAULT_AGENT_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a user or group: a name or a number


def _json_list(v: Any, what: str, hint: str = "") -> Any:
    """A list of strings from a list or its JSON text (an env var), else ValueError naming ``what``."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            raise ValueError(f"must be a JSON list of {what}{hint}") from None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"must be a JSON list of {what}")
    return v


class AgentSettings(BaseModel):
    """The agent program: an argv list (never a shell string), its timeout, where its logs go, and what it is
    given (see :mod:`factory_worker.agents.sandbox`): a fresh directory, an allowlisted environment, its own
    uid/gid."""

    command: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [sys.executable, os.path.abspath("examples/agent.py"), "{id}"], min_length=1
    )
    timeout_s: float = Field(default=600.0, gt=0)
    log_dir: Path = Path(".factory/logs")
    log_max_bytes: int = Field(default=50 * 1024 * 1024, ge=1024, description="an agent log is cut at this size")
    log_retention_s: float = Field(
        default=7 * 24 * 3600.0, ge=0, description="agent logs older than this are removed (0: kept)"
    )
    term_grace_s: float = Field(default=5.0, ge=0, description="SIGTERM -> SIGKILL grace for an agent's group")
    stall_s: float = Field(
        default=900.0,
        ge=0,
        description="an agent (a stage) with no byte of output and no usage line for this long is stopped "
        "as a failed attempt (0: never)",
    )
    workdir_root: Path = Field(
        default=Path(".factory/work"), description="each dispatch runs in a fresh directory here"
    )
    keep_workdir: bool = Field(default=False, description="keep a dispatch's directory after its run (debugging)")
    env_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_AGENT_ENV), description="the worker's variables an agent gets"
    )
    user: str | None = Field(
        default=None,
        description="run agents as this user (name or uid); default: the worker's, "
        "and a root worker refuses to run agents unless this says root",
    )
    group: str | None = Field(default=None, description="the agents' group (name or gid); default: agent.user's group")
    pid_namespace: Literal["auto", "required", "off"] = Field(
        default="auto",
        description="each agent as PID 1 of its own PID namespace: when the worker can make one (auto), "
        "always (required: else it refuses to start), never (off)",
    )
    # -- staged dispatch (stage_settings.py): one claim, many stages ---------------------------------------
    stages: list[StageSettings] = Field(
        default_factory=list,
        description="ordered named stages (replace agent.command): implementers, then a reviewer...",
    )
    triage: TriageSettings | None = Field(default=None, description="a command choosing the stages (JSON on stdout)")
    min_confidence: float = Field(default=0.5, ge=0, le=1, description="a triage below this escalates (needs-human)")
    max_rounds: int = Field(default=3, ge=1, le=20, description="rounds of one attempt (a rejection starts the next)")

    @model_validator(mode="after")
    def _pipeline(self) -> AgentSettings:
        check_pipeline(self.stages, self.triage)
        return self

    @property
    def staged(self) -> bool:
        """A staged dispatch (``factory.agent.stage`` tasks), or the one ``agent.command`` as before."""
        return bool(self.stages or self.triage)

    def pipeline(self) -> list[StageSettings]:
        """The stages, in order (``agent.command`` as the one stage when only a triage is set)."""
        return list(self.stages) or [default_stage(self.command, self.timeout_s)]

    def stage(self, name: str) -> StageSettings | None:
        return next((s for s in self.pipeline() if s.name == name), None)

    @field_validator("command", mode="before")
    @classmethod
    def _argv(cls, v: Any) -> Any:
        v = _json_list(v, "strings (an argv)", ", not a shell string")
        if v and not v[0].strip():
            raise ValueError("argv[0] must not be empty")
        return v

    @field_validator("env_allowlist", mode="before")
    @classmethod
    def _env_names(cls, v: Any) -> Any:
        v = _json_list(v, "variable names")
        bad = [x for x in v if not _ENV_NAME.match(x)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not an environment variable name")
        return v

    @field_validator("user", "group", mode="before")
    @classmethod
    def _id(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:
            return v
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str) or not _ID.match(v):
            raise ValueError("must be a name or a number")
        root = v == "root" or (v.isdigit() and int(v) == 0)
        if info.field_name == "user":
            return "root" if root else v  # root only when written: agents then hold every credential of the worker
        if root:
            raise ValueError("must not be root (it could read every credential of the worker)")
        if info.data.get("user") is None:
            raise ValueError("needs agent.user (FACTORY_AGENT__USER): a group alone does not isolate an agent")
        if info.data.get("user") == "root":
            raise ValueError("needs an agent.user other than root (agents as root run as the worker itself)")
        return v
