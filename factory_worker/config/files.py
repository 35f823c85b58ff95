"""Settings that come from files, as a pydantic-settings source: ``FACTORY_<SETTING>_FILE`` sets any scalar
setting (``FACTORY_REDIS_URL_FILE``, ``FACTORY_BROKER_URL_FILE``, ``FACTORY_NOTIFY__WEBHOOK_URL_FILE``, ...)
from the file's text (:class:`FileSecretsSource`). Reading such a file and the trust checks of every file the
settings come from are :mod:`.trust` (standard library only, shared with the CLI's early path) and exported
here too, as is :class:`ConfigError` (exported by :mod:`factory_worker.config.settings` as well).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pydantic import BaseModel
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from factory_worker.config.trust import (  # noqa: F401 - this module's API too
    PREFIX,
    SUFFIX,
    ConfigError,
    agent_uid,
    check_trusted,
    read_secret_file,
    secret_from_env,
)

log = logging.getLogger(__name__)


def setting_path(settings_cls: type[BaseSettings], var: str) -> tuple[str, ...] | None:
    """``FACTORY_AGENT__USER`` -> ``("agent", "user")``; None when ``var`` names no setting."""
    if not var.upper().startswith(PREFIX):
        return None
    parts = var[len(PREFIX) :].lower().split("__")
    fields: dict[str, Any] = settings_cls.model_fields
    for i, part in enumerate(parts):
        field = fields.get(part)
        if field is None:
            return None
        kind = field.annotation
        if i == len(parts) - 1:
            return tuple(parts) if not (isinstance(kind, type) and issubclass(kind, BaseModel)) else None
        if not (isinstance(kind, type) and issubclass(kind, BaseModel)):
            return None
        fields = kind.model_fields
    return None


def file_settings(settings_cls: type[BaseSettings]) -> list[tuple[str, str, tuple[str, ...]]]:
    """``(FACTORY_X_FILE, path, setting path)`` of every ``*_FILE`` variable that names a setting."""
    found = []
    for var, path in os.environ.items():
        if var.upper().startswith(PREFIX) and var.upper().endswith(SUFFIX) and path:
            loc = setting_path(settings_cls, var[: -len(SUFFIX)])
            if loc is not None:
                found.append((var, path, loc))
    return found


class FileSecretsSource(PydanticBaseSettingsSource):
    """A pydantic-settings source: ``FACTORY_<SETTING>_FILE`` -> the setting, read from that file."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # unused: see __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for var, path, loc in file_settings(self.settings_cls):
            plain = var[: -len(SUFFIX)]
            if os.environ.get(plain):
                raise ConfigError(f"both {plain} and {var} are set: set one of them")
            node = values
            for part in loc[:-1]:
                node = node.setdefault(part, {})
            node[loc[-1]] = read_secret_file(var, path)
        return values
