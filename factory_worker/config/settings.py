"""Settings: pydantic-settings models, loading and validation.

Sources, highest priority first: ``FACTORY_*`` environment variables (nested with ``__``, e.g.
``FACTORY_DISPATCH__LEASE_TTL_S``) or ``FACTORY_*_FILE`` files holding a value (secrets: never both), then
an optional TOML file (``FACTORY_CONFIG``, else ``./factory.toml`` when present; refused when someone else
could change it), then the defaults below. A bad value raises :class:`ConfigError` whose message is one line
naming the field and its environment variable. Files and their trust: :mod:`.files` and :mod:`.trust`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from factory_worker.config import urls
from factory_worker.config.agent import DEFAULT_AGENT_ENV, AgentSettings  # noqa: F401 - this module's API too
from factory_worker.config.budget import BudgetSettings
from factory_worker.config.defaults import DEFAULT_STALE_AFTER_S, NAMESPACE_PATTERN
from factory_worker.config.essentials import Essentials

# ConfigError and secret_from_env (NAME or NAME_FILE, for the sources' tokens) are this module's API too.
from factory_worker.config.files import ConfigError, FileSecretsSource, agent_uid, check_trusted, secret_from_env  # noqa: F401
from factory_worker.config.leases import margin_s, stop_lead_s
from factory_worker.config.source import GITHUB_ASSOCIATIONS, SourceSettings  # noqa: F401 - this module's API too
from factory_worker.config.urls import DEFAULT_REDIS_URL
from factory_worker.config.webhooks import WebhookSettings
from factory_worker.config.workspace import NoChanges, WorkspaceSettings  # noqa: F401 - this module's API too

log = logging.getLogger(__name__)

#: Hard ceiling on iterations per run: a run is a bounded chain, never an endless one.
MAX_ITERATIONS_CEILING = 1000


class LoopSettings(BaseModel):
    """The bounded loop: how often beat kicks off a run and how long a run is."""

    interval_s: float = Field(default=10.0, gt=0, description="seconds between beat kickoffs")
    max_iterations: int = Field(default=3, ge=1, le=MAX_ITERATIONS_CEILING, description="iterations per run")
    stale_after_s: float = Field(default=DEFAULT_STALE_AFTER_S, gt=0, description="heartbeat older than this is stale")
    breaker_failures: int = Field(default=3, ge=1, description="consecutive failed iterations that stop a run")
    heartbeat_ttl_s: float = Field(default=120.0, gt=0, description="expiry of the heartbeat key")
    lease_ttl_s: float = Field(default=60.0, gt=0, description="loop lease TTL (renewed by every iteration)")
    run_retention_s: float = Field(default=3600.0, ge=10, description="how long a run record is kept after its start")
    iteration_spacing_s: float | None = Field(
        default=None, ge=0, description="pause between a run's iterations; default interval_s / max_iterations"
    )
    end_idle_runs: bool = Field(
        default=True,
        description="end a run at an iteration with nothing to dispatch and nothing waiting for room "
        "(fewer idle loop tasks; a newly ready issue then waits for the next kickoff)",
    )

    def spacing_s(self, iterations: int) -> float:
        """Seconds between two iterations of a run: by default a run's polls spread over one interval."""
        if self.iteration_spacing_s is not None:
            return self.iteration_spacing_s
        return self.interval_s / max(1, iterations)

    @model_validator(mode="after")
    def _stale_after_interval(self) -> LoopSettings:
        if self.stale_after_s <= self.interval_s:
            raise ValueError("stale_after_s must be greater than interval_s (an idle loop would look stale)")
        return self


class DispatchSettings(BaseModel):
    """The dispatch ledger: leases, the in-flight cap, attempts and backoff."""

    max_in_flight: int = Field(default=8, ge=1, description="cluster-wide cap on claimed issues")
    lease_ttl_s: float = Field(default=30.0, gt=0, description="claim lease, renewed while the agent runs")
    queue_lease_s: float | None = Field(
        default=None,
        gt=0,
        description="lease of a claim whose agent message waits in the broker (until begin); "
        "default: the broker visibility timeout + 60 s",
    )
    max_attempts: int = Field(default=3, ge=1, description="failed attempts before an issue is parked")
    backoff_base_s: float = Field(default=5.0, ge=0, description="first backoff window")
    backoff_max_s: float = Field(default=300.0, ge=0, description="largest backoff window")
    backoff_jitter: float = Field(default=0.1, ge=0, le=1, description="up to this fraction is added to a window")
    min_replica_acks: int = Field(
        default=0,
        ge=0,
        description="replicas that must acknowledge a claim, a begin and a "
        "settle (Redis WAIT) before it counts; 0: do not wait",
    )
    replica_ack_timeout_s: float = Field(default=1.0, gt=0, description="how long one WAIT for replica acks may block")
    concurrency: dict[str, int] = Field(
        default_factory=dict,
        description='concurrency keys: rule -> limit, e.g. {"label:repo:*": 2, "repo": 4}; the gate claims no '
        "issue whose key holds that many claims (fair between keys with waiting issues)",
    )

    @field_validator("concurrency")
    @classmethod
    def _concurrency(cls, v: dict[str, int]) -> dict[str, int]:
        for rule, limit in v.items():
            if not (rule == "repo" or (rule.startswith("label:") and len(rule) > len("label:"))):
                raise ValueError(f"{rule!r}: a rule is label:<prefix>* or repo")
            if isinstance(limit, bool) or limit < 1:
                raise ValueError(f"{rule!r}: the limit must be an integer >= 1")
        return v

    @model_validator(mode="after")
    def _backoff_order(self) -> DispatchSettings:
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s must be >= backoff_base_s")
        return self


class WorkerSettings(BaseModel):
    """Worker-side timings: soft shutdown window and the worker liveness key."""

    soft_shutdown_s: float = Field(default=20.0, ge=0, description="warm shutdown window for running agents")
    shutdown_margin_s: float = Field(
        default=2.5,
        ge=0,
        description="agents are stopped this long before the window ends (claims released, pool stopped)",
    )
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    heartbeat_ttl_s: float = Field(default=15.0, gt=0)
    visibility_timeout_s: float = Field(default=3600.0, gt=0, description="Redis broker visibility timeout")


class SlackSettings(BaseModel):
    """A Slack thread per dispatch (``slack.py``): opened when the agent starts, its end posted in it, human
    replies delivered to the running agent (``FACTORY_INBOX``). Off unless a channel is set."""

    channel: str | None = Field(default=None, description="channel id (C...) to open dispatch threads in; unset = off")
    token_env: str = Field(default="SLACK_BOT_TOKEN", description="name of the env var holding the bot token")
    api_url: str = Field(default="https://slack.com/api", description="Slack Web API base URL")
    poll_s: float = Field(default=5.0, gt=0, description="how often a thread is read for replies")
    poll_max_s: float = Field(default=60.0, gt=0, description="longest wait between reads after errors / Retry-After")
    timeout_s: float = Field(default=5.0, gt=0, description="HTTP timeout of one Slack call")


class NotifySettings(BaseModel):
    """Optional Slack-compatible webhook notifications (off unless a URL is set)."""

    webhook_url: str | None = None
    timeout_s: float = Field(default=2.0, gt=0)
    events: list[str] = Field(
        default_factory=lambda: ["dispatched", "done", "parked", "stale", "killed", "ledger-lost"]
    )


class TrackerSettings(BaseModel):
    """Write-back to the issue tracker through the outbox (``outbox.py``): labels and a comment per event."""

    write_back: bool = Field(
        default=False,
        description="report dispatched/done/backoff/parked/released/retried to the tracker (GitHub or Linear source)",
    )
    comments: bool = Field(default=True, description="also post a comment per event (labels are always set)")
    max_attempts: int = Field(default=8, ge=1, description="delivery attempts of one event before it is parked")
    backoff_base_s: float = Field(default=2.0, ge=0, description="first wait after a failed delivery")
    backoff_max_s: float = Field(default=300.0, ge=0, description="longest wait between deliveries")
    poll_s: float = Field(default=1.0, gt=0, description="how often each worker's sender looks for events")
    takeover_s: float = Field(
        default=30.0,
        gt=0,
        description="an event pending this long with another worker's sender is taken over (that worker presumed dead)",
    )
    timeout_s: float = Field(default=10.0, gt=0, description="HTTP timeout of one tracker request")


class Settings(BaseSettings):
    """All of factory_worker's settings."""

    model_config = SettingsConfigDict(
        env_prefix="FACTORY_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    redis_url: str | None = Field(default=None, description="the ledger's Redis; default redis://127.0.0.1:6379/0")
    broker_url: str | None = Field(
        default=None, description="Celery broker: Redis (defaults to redis_url) or RabbitMQ (amqp://, amqps://)"
    )
    namespace: str = Field(default="factory", min_length=1, max_length=64, pattern=NAMESPACE_PATTERN.pattern)
    loop: LoopSettings = Field(default_factory=LoopSettings)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    source: SourceSettings = Field(default_factory=SourceSettings)
    agent: AgentSettings = Field(default_factory=AgentSettings)
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    tracker: TrackerSettings = Field(default_factory=TrackerSettings)
    slack: SlackSettings = Field(default_factory=SlackSettings)
    webhooks: WebhookSettings = Field(default_factory=lambda: WebhookSettings.model_validate({}))
    workspace: WorkspaceSettings = Field(default_factory=lambda: WorkspaceSettings.model_validate({}))

    @field_validator("redis_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        return urls.validate(v)

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, v: str | None) -> str | None:
        return v if v is None else urls.validate_broker(v)

    @model_validator(mode="after")
    def _agent_dies_before_its_lease(self) -> Settings:
        """Without a renew an agent is stopped at lease - margin - term_grace after the last renew sent, so
        it is gone (SIGKILL included) before its claim can expire; that must leave more than one renew
        interval (lease / 3), or every agent would be stopped before its first renew."""
        lease, grace = self.dispatch.lease_ttl_s, self.agent.term_grace_s
        if stop_lead_s(lease, grace) <= lease / 3:
            need = (grace + margin_s(lease)) * 1.5
            raise ValueError(
                f"dispatch.lease_ttl_s (FACTORY_DISPATCH__LEASE_TTL_S={lease:g}) is too short for agent.term_grace_s "
                f"(FACTORY_AGENT__TERM_GRACE_S={grace:g}): an agent without renewals must be stopped and killed "
                f"before its lease ends; raise the lease above {need:g}s or lower the grace"
            )
        return self

    @model_validator(mode="after")
    def _write_back_needs_a_tracker(self) -> Settings:
        if self.tracker.write_back and self.source.kind not in ("github", "linear"):
            raise ValueError(
                f"tracker.write_back (FACTORY_TRACKER__WRITE_BACK) needs a tracker source, but "
                f"source.kind (FACTORY_SOURCE__KIND) is {self.source.kind!r}; use github or linear"
            )
        if self.source.linear.poll_working_state is None:  # write-back moves issues out of the ready states
            self.source.linear.poll_working_state = self.tracker.write_back
        return self

    @model_validator(mode="after")
    def _workspace_defaults(self) -> Settings:
        self.workspace.resolve(self.source)  # the token variable, API and repository default to the source's
        return self

    @model_validator(mode="after")
    def _queue_lease_default(self) -> Settings:
        if self.dispatch.queue_lease_s is None:  # outlive a message the broker may redeliver after this
            self.dispatch.queue_lease_s = self.worker.visibility_timeout_s + 60.0
        return self

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.effective_redis_url

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, FileSecretsSource(settings_cls)]
        toml = config_file()
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)


class _Given(Settings):
    """Settings from the arguments alone: no environment, file or TOML source (:func:`recovery_settings`)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def recovery_settings(e: Essentials) -> Settings:
    """Settings made of the recovery commands' own (``e``) and the defaults, for ``kill-loop`` when another
    setting is invalid: the kill, the revoke (when ``broker_url`` is valid) and the release of agents need no
    more (nothing is notified: the notifier's settings are the defaults)."""
    stale = e.stale_after_s
    return _Given(
        redis_url=e.redis_url,
        broker_url=e.broker_url,
        namespace=e.namespace,
        loop=LoopSettings(stale_after_s=stale, interval_s=min(LoopSettings().interval_s, stale / 2)),
        dispatch=DispatchSettings(min_replica_acks=e.min_replica_acks),
    )


def config_file() -> Path | None:
    """The TOML file to read: ``$FACTORY_CONFIG`` (must exist) or ``./factory.toml`` when present."""
    explicit = os.environ.get("FACTORY_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"FACTORY_CONFIG={explicit}: no such file")
        return path
    default = Path("factory.toml")
    return default if default.is_file() else None


def _env_name(loc: tuple[Any, ...]) -> str:
    return "FACTORY_" + "__".join(str(p).upper() for p in loc if not isinstance(p, int))


def format_validation_error(exc: ValidationError) -> str:
    """One line: the first bad field, its env var, the reason (and how many more problems there are)."""
    errors = exc.errors()
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    field = ".".join(str(p) for p in loc) or "settings"
    msg = first.get("msg", "invalid").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "unknown setting"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if not loc or msg.startswith(f"{field}."):  # a rule across settings: its message names the fields itself
        return f"invalid settings: {msg}{more}"
    return f"invalid setting {field} ({_env_name(loc)}): {msg}{more}"


def load_settings(**overrides: Any) -> Settings:
    """Load and validate settings; raise :class:`ConfigError` with a one-line message when invalid.

    Settings may come from ``FACTORY_<SETTING>_FILE`` files; the config file is refused when someone other
    than this worker's user (or root) could change it, or ``agent.user`` owns it (:mod:`.files` and :mod:`.trust`)."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    except (OSError, ValueError) as exc:  # unreadable / malformed TOML
        where = config_file() or "settings"
        raise ConfigError(f"cannot read configuration {where}: {exc}".splitlines()[0]) from None
    toml = config_file()
    if toml is not None:
        what = f"FACTORY_CONFIG={toml}" if os.environ.get("FACTORY_CONFIG") else f"config file ./{toml}"
        check_trusted(toml, what, agent_uid(settings.agent.user))
    return settings
