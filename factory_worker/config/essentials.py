"""The few settings the recovery commands use (``loop-status``, ``kill-loop``, ``pause``, ``resume``), read from
every source the full settings read, and nothing else. Standard library only.

An operator reaches for these commands when something is broken, perhaps a setting: so they read only what
they use and work whatever the other settings say (issue 21). :func:`read` takes each of them from where
:func:`factory_worker.config.settings.load_settings` would, in the same order: ``FACTORY_*`` environment
variables (any case, nested with ``__`` or as a JSON object: ``FACTORY_LOOP='{"stale_after_s": 90}'``), then
``FACTORY_<SETTING>_FILE`` (the file's text, trust-checked), then the TOML file (``FACTORY_CONFIG``, else
``./factory.toml``; refused when someone else could change it), then the defaults. A bad value of one of
*these* is a one-line :class:`~factory_worker.config.trust.ConfigError` naming it, as the full loader says it;
any other setting is never looked at. ``tests/unit/config/test_essentials.py`` holds both readers to the same
answer.

- ``redis_url``, ``namespace``, ``loop.stale_after_s``: what the commands need (an error when invalid);
- ``broker_url``, ``tracker.write_back``, ``dispatch.min_replica_acks``: what they show or check beside it
  (``loop-status``'s kickoffs waiting, outbox, replica acknowledgements; ``kill-loop``'s revoke); an invalid
  one is left out (its default) and said in :attr:`Essentials.problems`.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory_worker.config import urls
from factory_worker.config.defaults import DEFAULT_STALE_AFTER_S, NAMESPACE_PATTERN
from factory_worker.config.trust import PREFIX, SUFFIX, ConfigError, agent_uid, check_trusted, read_secret_file

_MISSING = object()
_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


@dataclass(frozen=True)
class Essentials:
    """The recovery commands' settings (see the module docstring)."""

    redis_url: str
    namespace: str = "factory"
    stale_after_s: float = DEFAULT_STALE_AFTER_S
    broker_url: str | None = None
    write_back: bool = False
    min_replica_acks: int = 0
    #: one line per optional setting left at its default because its value is invalid
    problems: tuple[str, ...] = field(default=())

    @property
    def broker_is_ledger(self) -> bool:
        """Whether the broker is the ledger's Redis (``broker_url`` unset or the same URL): its queues are
        lists there, which ``loop-status`` counts."""
        return self.broker_url is None or self.broker_url == self.redis_url


def env_name(path: tuple[str, ...]) -> str:
    return PREFIX + "__".join(p.upper() for p in path)


class _Sources:
    """The three places a setting may come from, searched leaf by leaf in the full loader's order."""

    def __init__(self, environ: Mapping[str, str], cwd: Path) -> None:
        self.environ = environ
        self.env = {k.lower(): v for k, v in environ.items()}  # pydantic-settings: any case, the last one wins
        self.cwd = cwd
        self.toml_path, self.toml = self._toml()

    def _toml(self) -> tuple[Path | None, dict[str, Any]]:
        explicit = self.environ.get("FACTORY_CONFIG")
        if explicit:
            path = Path(explicit) if os.path.isabs(explicit) else self.cwd / explicit
            if not path.is_file():
                raise ConfigError(f"FACTORY_CONFIG={explicit}: no such file")
        else:
            path = self.cwd / "factory.toml"
            if not path.is_file():
                return None, {}
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
            raise ConfigError(f"cannot read configuration {path}: {exc}".splitlines()[0]) from None
        return path, _lower_keys(data)

    def check_toml(self, agent_user: str | None) -> None:
        """The full loader's trust check of the TOML file (after reading, with the effective ``agent.user``)."""
        if self.toml_path is None:
            return
        explicit = self.environ.get("FACTORY_CONFIG")
        what = f"FACTORY_CONFIG={explicit}" if explicit else "config file ./factory.toml"
        check_trusted(self.toml_path, what, agent_uid(agent_user))

    def get(self, path: tuple[str, ...]) -> Any:
        """The raw value of the setting at ``path`` (a str from the environment or a file, anything from the
        TOML file), or ``_MISSING``."""
        secret = self._file(path)  # read (and checked) even when the environment wins, as the full loader does
        name = "factory_" + "__".join(path)
        if name in self.env:
            return self.env[name]
        if len(path) > 1 and "factory_" + path[0] in self.env:  # the group as a JSON object
            try:
                group = json.loads(self.env["factory_" + path[0]])
            except ValueError:
                raise ConfigError(
                    f'cannot read configuration settings: error parsing value for field "{path[0]}" '
                    f"from source {env_name(path[:1])}"
                ) from None
            got = _lookup(_lower_keys(group), path[1:])
            if got is not _MISSING:
                return got
        if secret is not _MISSING:
            return secret
        return _lookup(self.toml, path)

    def _file(self, path: tuple[str, ...]) -> Any:
        found: Any = _MISSING
        want = "factory_" + "__".join(path)
        for var, file in self.environ.items():
            if var.upper().endswith(SUFFIX) and var[: -len(SUFFIX)].lower() == want and file:
                plain = var[: -len(SUFFIX)]
                if self.environ.get(plain):
                    raise ConfigError(f"both {plain} and {var} are set: set one of them")
                found = read_secret_file(var, file)
        return found


def _lower_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k).lower(): _lower_keys(v) for k, v in value.items()}
    return value


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def _bad(path: tuple[str, ...], why: str) -> ConfigError:
    return ConfigError(f"invalid setting {'.'.join(path)} ({env_name(path)}): {why}")


def _text(path: tuple[str, ...], raw: Any) -> str:
    if not isinstance(raw, str):
        raise _bad(path, "Input should be a valid string")
    return raw


def _url(path: tuple[str, ...], raw: Any) -> str:
    text = _text(path, raw)
    try:
        return urls.validate(text)
    except ValueError as exc:
        raise _bad(path, str(exc).splitlines()[0]) from None


def _float(path: tuple[str, ...], raw: Any) -> float:
    if isinstance(raw, str):
        try:
            value = float(raw)
        except ValueError:
            raise _bad(path, "Input should be a valid number, unable to parse string as a number") from None
    elif isinstance(raw, (int, float)):
        value = float(raw)
    else:
        raise _bad(path, "Input should be a valid number")
    if not value > 0:
        raise _bad(path, "Input should be greater than 0")
    return value


def _bool(path: tuple[str, ...], raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    word = str(raw).strip().lower() if isinstance(raw, (str, int)) else None
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise _bad(path, "Input should be a valid boolean")


def _count(path: tuple[str, ...], raw: Any) -> int:
    try:
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            raise ValueError
        value = int(raw.strip()) if isinstance(raw, str) else raw
    except ValueError:
        raise _bad(path, "Input should be a valid integer") from None
    if value < 0:
        raise _bad(path, "Input should be greater than or equal to 0")
    return value


def read(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Essentials:
    """The recovery commands' settings; :class:`ConfigError` (one line) when one they need is invalid."""
    src = _Sources(os.environ if environ is None else environ, cwd or Path.cwd())
    raw_url = src.get(("redis_url",))
    redis_url = urls.DEFAULT_REDIS_URL if raw_url is _MISSING else _url(("redis_url",), raw_url)
    raw_ns = src.get(("namespace",))
    namespace = "factory" if raw_ns is _MISSING else _text(("namespace",), raw_ns)
    if not namespace:
        raise _bad(("namespace",), "String should have at least 1 character")
    if len(namespace) > 64:
        raise _bad(("namespace",), "String should have at most 64 characters")
    if not NAMESPACE_PATTERN.fullmatch(namespace):
        raise _bad(("namespace",), f"String should match pattern '{NAMESPACE_PATTERN.pattern}'")
    raw_stale = src.get(("loop", "stale_after_s"))
    stale = DEFAULT_STALE_AFTER_S if raw_stale is _MISSING else _float(("loop", "stale_after_s"), raw_stale)
    problems: list[str] = []

    def optional(path: tuple[str, ...], parse: Any, default: Any) -> Any:
        try:
            raw = src.get(path)
            return default if raw is _MISSING else parse(path, raw)
        except ConfigError as exc:
            problems.append(str(exc))
            return default

    broker = optional(("broker_url",), _url, None)
    write_back = optional(("tracker", "write_back"), _bool, False)
    acks = optional(("dispatch", "min_replica_acks"), _count, 0)
    user = optional(("agent", "user"), _text, None)
    src.check_toml(user)
    return Essentials(redis_url, namespace, stale, broker, write_back, acks, tuple(problems))
