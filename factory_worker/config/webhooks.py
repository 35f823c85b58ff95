"""The settings of the webhook receiver (``webhooks.*``, ``FACTORY_WEBHOOKS__*``): one signing secret per
service (an endpoint without its secret is not served), the limits every request is held to, the dedupe
window, the work queue, and who may give comment commands. Re-exported by :mod:`.settings`.

The secrets are :class:`~pydantic.SecretStr` (a repr, a log line or an error never shows them) and, like any
scalar setting, may be read from a file: ``FACTORY_WEBHOOKS__GITHUB_SECRET_FILE`` (:mod:`.files`). Pass them
in the environment or a file, never on a command line.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, SecretStr, field_validator

from factory_worker.config.source import GITHUB_ASSOCIATIONS

#: Who may give ``/factory stop`` and ``/factory retry`` on GitHub by default (``author_association``).
DEFAULT_COMMAND_ASSOCIATIONS = ("OWNER", "MEMBER", "COLLABORATOR")
#: ``author_association`` values that mean "anyone with an account": never allowed to command.
EVERYONE = ("NONE", "FIRST_TIMER", "FIRST_TIME_CONTRIBUTOR", "MANNEQUIN")


class WebhookSettings(BaseModel):
    """``factory-worker webhooks --serve``: signed GitHub, Linear and Slack deliveries; and whether the agents'
    ``FACTORY_INBOX`` receives tracker comments (a worker setting too: the worker relays them)."""

    github_secret: SecretStr | None = Field(
        None, description="GitHub webhook secret (X-Hub-Signature-256); unset: /webhooks/github answers 404"
    )
    linear_secret: SecretStr | None = Field(
        None, description="Linear webhook signing secret (Linear-Signature); unset: /webhooks/linear answers 404"
    )
    slack_signing_secret: SecretStr | None = Field(
        None, description="Slack app signing secret (X-Slack-Signature v0); unset: /webhooks/slack answers 404"
    )
    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, le=25 * 1024 * 1024, description="a larger request is refused (413) before it is read"
    )
    linear_max_age_s: float = Field(60.0, gt=0, le=3600, description="Linear's webhookTimestamp must be this fresh")
    slack_max_age_s: float = Field(300.0, gt=0, le=3600, description="X-Slack-Request-Timestamp must be this fresh")
    dedupe_ttl_s: int = Field(
        3 * 24 * 3600, ge=60, description="a delivery id is remembered this long (GitHub redelivers for 3 days)"
    )
    queue_size: int = Field(1000, ge=1, le=100_000, description="deliveries waiting for the worker thread; full: 503")
    read_timeout_s: float = Field(5.0, gt=0, le=60, description="a request's body must arrive within this")
    command_associations: list[str] = Field(
        default_factory=lambda: list(DEFAULT_COMMAND_ASSOCIATIONS),
        description="GitHub author_association values that may give /factory stop and /factory retry",
    )
    inbox: bool | None = Field(
        None,
        description="append tracker comments to the running agent's FACTORY_INBOX (the worker relays them); "
        "default: when github_secret or linear_secret is set",
    )

    @field_validator("command_associations", mode="before")
    @classmethod
    def _associations(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        names = [x.strip().upper() if isinstance(x, str) else x for x in v if not isinstance(x, str) or x.strip()]
        if bad := [x for x in names if x not in GITHUB_ASSOCIATIONS]:
            raise ValueError(f"unknown value {bad[0]!r}: expected some of {', '.join(GITHUB_ASSOCIATIONS)}")
        if anyone := [x for x in names if x in EVERYONE]:
            raise ValueError(f"{anyone[0]!r} would let anyone with an account stop or retry agents")
        return names

    @property
    def relays_comments(self) -> bool:
        """Whether a dispatch gets a ``FACTORY_INBOX`` fed with tracker comments."""
        if self.inbox is not None:
            return self.inbox
        return self.secret("github") is not None or self.secret("linear") is not None

    def secret(self, service: str) -> bytes | None:
        """The signing secret of ``service`` (``github``, ``linear``, ``slack``) as bytes; None when unset or empty."""
        value = {"github": self.github_secret, "linear": self.linear_secret, "slack": self.slack_signing_secret}.get(
            service
        )
        raw = value.get_secret_value() if value is not None else ""
        return raw.encode("utf-8") if raw else None
