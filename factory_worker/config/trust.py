"""Files the settings come from, and whether to trust them: standard library only, so the CLI's early path
(:mod:`factory_worker.config.essentials`) reads a config file or a ``*_FILE`` secret with the very checks the
full settings use (:mod:`.files` re-exports these).

* ``<NAME>_FILE`` (Docker / Kubernetes / systemd-credentials style): a secret is kept in a file and the
  variable names it; the file's text is the value, one trailing newline stripped (:func:`read_secret_file`,
  :func:`secret_from_env`). Setting both ``NAME`` and ``NAME_FILE`` is an error.
* Trust (:func:`check_trusted`): a config file or secret file that someone other than this worker's user could
  change is refused (group- or other-writable, or owned by another user than the worker's or root, unless it
  lies on a read-only mount); a file owned by ``agent.user`` is always refused (an agent could otherwise
  rewrite the worker's settings, e.g. point it at its own Redis). A ``*_FILE`` file must also not be readable
  by others (0400 or 0440/0640 for a group the agents are not in).

Every error is a one-line :class:`ConfigError` naming the variable.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

PREFIX, SUFFIX = "FACTORY_", "_FILE"


class ConfigError(Exception):
    """A setting is missing or invalid; the message is one line naming the field (or the variable)."""


ConfigError.__module__ = "factory_worker.config.files"  # its name where users met it (tracebacks, logs)


def _strip_newline(text: str) -> str:
    """The text without one trailing newline (``\\n`` or ``\\r\\n``), as ``echo secret > file`` leaves it."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def read_secret_file(var: str, path: str) -> str:
    """The contents of the file ``$var`` names, checked with :func:`check_trusted`, one newline stripped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"{var}={path}: cannot read it ({why})") from None
    check_trusted(Path(path), var, secret=True)
    return _strip_newline(text)


def secret_from_env(name: str, environ: os._Environ[str] | dict[str, str] | None = None) -> str | None:
    """``$name``, else the contents of the file ``$name_FILE`` names; None when neither is set (or empty)."""
    env = os.environ if environ is None else environ
    value, path = env.get(name), env.get(name + SUFFIX)
    if value and path:
        raise ConfigError(f"both {name} and {name}{SUFFIX} are set: set one of them")
    if path:
        return read_secret_file(name + SUFFIX, path) or None
    return value or None


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def agent_uid(user: str | None) -> int | None:
    """The uid ``agent.user`` names on this host (None: unset or unknown here)."""
    if user is None:
        return None
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def check_trusted(path: Path, what: str, agent: int | None = None, secret: bool = False) -> None:
    """Refuse (:class:`ConfigError`) a file someone other than this worker's user could change, or one the
    agents' user ``agent`` owns, or (``secret``) one others can read, even on a read-only mount. ``what``
    names it in the message (``FACTORY_CONFIG=...``)."""
    try:
        st, link = os.stat(path), os.lstat(path)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot stat {path} ({exc.strerror})") from None
    euid, path = os.geteuid(), Path(os.path.abspath(path))
    mode = stat.S_IMODE(st.st_mode)
    if agent is not None and agent != euid and agent in (st.st_uid, link.st_uid):
        raise ConfigError(
            f"{what}: {path} is owned by agent.user's uid {agent}: an agent could rewrite the "
            "worker's settings; make the worker's user own it"
        )
    if not _read_only_mount(path):
        for who in (st.st_uid, link.st_uid):
            if who not in (euid, 0):
                raise ConfigError(
                    f"{what}: {path} is owned by uid {who}, not by this worker's user (uid {euid}) "
                    "or root: another user could change it; chown it or mount it read-only"
                )
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(f"{what}: {path} is writable by its group or others (mode {mode:04o}); chmod go-w it")
    if secret and mode & stat.S_IROTH:
        raise ConfigError(
            f"{what}: {path} is readable by others (mode {mode:04o}): any local user or agent could "
            "read the secret; chmod 0400 it (Kubernetes: defaultMode 0400)"
        )
