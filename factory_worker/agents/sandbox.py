"""What an agent is given: its own uid/gid, an allowlisted environment and a fresh working directory.

Issue text steers an agent, so an agent is treated as hostile: it must not reach the worker's credentials.

* **Identity** (``agent.user`` / ``agent.group``): the agent runs with that uid/gid and no supplementary
  groups (:func:`agent_identity`; started through ``setpriv --reuid --regid --clear-groups``, see
  :mod:`.process`). Then the worker's ``/proc/<pid>/environ``, its config file and env files (owned by the
  worker's user, 0600/0640) are out of its reach, and it cannot signal the worker. A worker that cannot
  switch users (not root and without CAP_SETUID, CAP_SETGID, CAP_KILL, CAP_CHOWN) refuses to start agents
  (:class:`~factory_worker.config.settings.ConfigError` naming agent.user): they never run as the worker instead.
  Unset, agents run as the worker's own user (``doctor`` warns), except that a root worker then refuses to run
  them: root agents only when ``agent.user = "root"`` is written.
* **Environment** (:func:`agent_env`): only the names in ``agent.env_allowlist`` that the worker has, plus
  ``FACTORY_ISSUE_ID``, ``FACTORY_ISSUE_JSON``, ``FACTORY_DISPATCH_TOKEN`` and ``HOME`` (the working
  directory unless HOME is listed). Nothing else: no ``FACTORY_*`` setting, no ``*_TOKEN``.
* **Working directory** (:func:`make_workdir`): ``<agent.workdir_root>/<dispatch>-<random>``, created 0700
  and owned by the agent's uid/gid, holding ``issue.json``; the root is created 0711 (the agents' uid can
  enter its own directory, not list the others). Removed after the run unless ``agent.keep_workdir``.

All agents of a worker share ``agent.user``: they can reach each other's processes (not the worker's).
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from factory_worker.config.settings import AgentSettings, ConfigError
from factory_worker.sources.base import Issue

log = logging.getLogger(__name__)

#: Linux capabilities a non-root worker needs to run agents as agent.user (and to stop and clean up after them).
NEEDED_CAPS = {"CAP_CHOWN": 0, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7}
ISSUE_FILE = "issue.json"
_SECRET_PARTS = {"TOKEN", "AUTH", "KEY", "CREDENTIAL", "CREDENTIALS", "COOKIE", "SESSION"}
_SECRET_WORDS = ("PASSWORD", "PASSWD", "SECRET", "PRIVATE_KEY", "API_KEY")
_WORKER_SETTINGS = ("FACTORY_REDIS_URL", "FACTORY_BROKER_URL", "FACTORY_CONFIG")


@dataclass(frozen=True)
class Identity:
    """The uid/gid agents run as (no supplementary groups)."""

    uid: int
    gid: int
    user: str  # agent.user as configured

    def __str__(self) -> str:
        return f"{self.user} (uid {self.uid}, gid {self.gid})"


def _bad(field: str, value: str, why: str) -> ConfigError:
    env = f"FACTORY_AGENT__{field.upper()}"
    return ConfigError(f"invalid setting agent.{field} ({env}={value}): {why}")


def resolve_identity(agent: AgentSettings) -> Identity | None:
    """agent.user / agent.group as numbers on this host; None when agent.user is unset."""
    if agent.user is None:
        return None
    if agent.user == "root":  # written on purpose (the settings map uid 0 to it): the worker's root itself
        return Identity(0, 0, "root")
    try:
        entry = pwd.getpwuid(int(agent.user)) if agent.user.isdigit() else pwd.getpwnam(agent.user)
    except KeyError:
        entry = None
        if not agent.user.isdigit():
            raise _bad("user", agent.user, "no such user on this host") from None
    uid = int(agent.user) if entry is None else entry.pw_uid
    if agent.group is not None:
        try:
            gid = int(agent.group) if agent.group.isdigit() else grp.getgrnam(agent.group).gr_gid
        except KeyError:
            raise _bad("group", agent.group, "no such group on this host") from None
    elif entry is not None:
        gid = entry.pw_gid
    else:
        raise _bad("user", agent.user, "uid not in the user database: set agent.group (FACTORY_AGENT__GROUP) too")
    if uid == 0 or gid == 0:
        raise _bad("user" if uid == 0 else "group", agent.user if uid == 0 else str(agent.group), "must not be root")
    return Identity(uid, gid, agent.user)


def missing_caps() -> list[str]:
    """The capabilities of :data:`NEEDED_CAPS` this process lacks (Linux; elsewhere: all unless root)."""
    try:
        status = Path("/proc/self/status").read_text()
        eff = int(next(x.split()[1] for x in status.splitlines() if x.startswith("CapEff:")), 16)
    except (OSError, StopIteration, ValueError):
        return [] if os.geteuid() == 0 else list(NEEDED_CAPS)
    return [name for name, bit in NEEDED_CAPS.items() if not eff >> bit & 1]


def agent_identity(agent: AgentSettings) -> Identity | None:
    """The identity to start agents with; None: the worker's own (agent.user unset, or the worker's uid and gid
    already). Raises :class:`ConfigError` naming agent.user when this worker cannot switch to it, and when it
    runs as root with agent.user unset: agents would run as root without anyone having chosen it."""
    ident = resolve_identity(agent)
    if ident is None and os.geteuid() == 0:
        raise ConfigError(
            "agent.user is unset and this worker runs as root: agents would run as root, with every "
            "credential of the worker; set FACTORY_AGENT__USER to an unprivileged user (e.g. nobody), "
            "or to root to run them as root anyway"
        )
    if ident is None or (ident.uid, ident.gid) == (os.geteuid(), os.getegid()):
        return None
    missing = missing_caps()
    if missing:
        raise _bad(
            "user",
            agent.user or "",
            f"this worker (uid {os.geteuid()}) cannot run agents as another user: "
            f"it lacks {', '.join(missing)} (run it as root, with them); agents never run as the worker "
            "instead",
        )
    return ident


def check_workdir_root(agent: AgentSettings, ident: Identity | None) -> Path:
    """Create ``agent.workdir_root`` (0711) if missing; it and its parents must be searchable by ``ident``."""
    root = Path(os.path.abspath(agent.workdir_root))
    if not root.is_dir():
        try:
            root.mkdir(parents=True, exist_ok=True)
            os.chmod(root, 0o711)
        except OSError as exc:
            raise _bad("workdir_root", str(agent.workdir_root), f"cannot create {root}: {exc.strerror}") from None
    if ident is not None:
        for folder in (root, *root.parents):
            st = folder.stat()
            bit = 0o100 if st.st_uid == ident.uid else 0o010 if st.st_gid == ident.gid else 0o001
            if not st.st_mode & bit:
                raise _bad(
                    "workdir_root",
                    str(agent.workdir_root),
                    f"{folder} is not searchable by agent.user {ident}: chmod o+x it, or choose another directory",
                )
    return root


def check_isolation(agent: AgentSettings) -> Identity | None:
    """Everything a worker that runs agents checks at startup: the identity and the working directory root."""
    ident = agent_identity(agent)
    check_workdir_root(agent, ident)
    return ident


def _fill(workdir: Path, issue: Issue, ident: Identity | None) -> Path:
    """Write ``issue.json`` (0600) into a new ``workdir`` and give both to ``ident``; returns the file."""
    issue_json = workdir / ISSUE_FILE
    fd = os.open(issue_json, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with open(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(issue.as_json_dict(), ensure_ascii=False, indent=2) + "\n")
        if ident is not None:
            os.fchown(fh.fileno(), ident.uid, ident.gid)
    if ident is not None:
        os.chown(workdir, ident.uid, ident.gid)  # the root is the worker's, 0711: nobody can swap it
    return issue_json


def make_workdir(
    agent: AgentSettings, dispatch_id: str, issue: Issue, ident: Identity | None, name: str
) -> tuple[Path, Path]:
    """A fresh directory for one dispatch holding ``issue.json``, owned by ``ident``: (directory, issue file)."""
    root = check_workdir_root(agent, ident)
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))  # 0700, a new name every time
    try:
        issue_json = _fill(workdir, issue, ident)
    except BaseException:
        remove_workdir(workdir, ident)
        raise
    log.debug("dispatch %s: working directory %s", dispatch_id, workdir)
    return workdir, issue_json


def remove_workdir(workdir: Path, ident: Identity | None) -> None:
    """Remove a dispatch's directory. A worker without CAP_DAC_OVERRIDE may not remove what the agent left
    (mode 000 directories): then its contents are removed as the agent's user first."""
    try:  # the common case, an agent that left only issue.json, in two syscalls (rmtree costs ~10x that)
        os.unlink(workdir / ISSUE_FILE)
        os.rmdir(workdir)
        return
    except OSError:
        pass  # it left more (or removed or replaced issue.json): the whole tree
    try:
        shutil.rmtree(workdir)
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        first = exc
    if ident is not None:
        from factory_worker.agents.process import as_user

        for argv in (["chmod", "-R", "u+rwx", "--", str(workdir)], ["find", str(workdir), "-mindepth", "1", "-delete"]):
            cmd, extra = as_user(argv, ident)
            subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False, **extra)
        try:
            os.rmdir(workdir)  # empty now; the root is the worker's
            return
        except OSError as exc:
            first = exc
    log.warning("could not remove the agent's directory %s: %s", workdir, first)


_WORKDIR_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,150}$")


def shared_workdir(agent: AgentSettings, name: str, issue: Issue, ident: Identity | None) -> tuple[Path, Path]:
    """A staged attempt's directory ``<root>/<name>``, shared by its stages (``FACTORY_WORKDIR``): made (0700,
    with ``issue.json``, owned by ``ident``) by the first stage that needs it, found again by later ones, and
    its feedback file beside it in the root: ``<root>/<name>.feedback`` (0640, the worker's; ``FACTORY_FEEDBACK``).
    Returns (directory, feedback file)."""
    if not _WORKDIR_NAME.match(name):
        raise ValueError(f"bad working directory name {name!r}")
    root = check_workdir_root(agent, ident)
    workdir = root / name
    try:
        os.mkdir(workdir, 0o700)
    except FileExistsError:
        if workdir.is_symlink() or not workdir.is_dir():
            raise ValueError(f"{workdir} is not a directory") from None
        return workdir, root / f"{name}.feedback"
    _fill(workdir, issue, ident)
    return workdir, root / f"{name}.feedback"


def write_feedback(path: Path, text: str, ident: Identity | None) -> None:
    """Replace the feedback file (empty before any rejection): the worker's, readable by the agent's group."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
    try:
        if ident is not None:
            os.fchown(fd, -1, ident.gid)
        os.write(fd, text.encode("utf-8", "replace"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remove_shared_workdir(agent: AgentSettings, name: str, ident: Identity | None) -> None:
    """Remove a staged attempt's directory and its feedback file (when the attempt ends)."""
    if not _WORKDIR_NAME.match(name or ""):
        return
    root = Path(os.path.abspath(agent.workdir_root))
    (root / f"{name}.feedback").unlink(missing_ok=True)
    if agent.keep_workdir:
        log.info("kept the attempt's directory %s", root / name)
        return
    remove_workdir(root / name, ident)


def make_inbox(agent: AgentSettings, dispatch_id: str, ident: Identity | None, name: str) -> Path:
    """The file a dispatch's human replies are appended to (``FACTORY_INBOX``): beside the dispatch's
    directory in the worker's root (0711), owned by the worker (which appends to it), 0600 whatever the umask,
    or 0640 with the agent's group when agents run as their own user (``agent.user``: the agent must read it);
    the caller removes it when the dispatch ends (the watcher never creates it: ``slack.Conversation``)."""
    root = check_workdir_root(agent, ident)
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", dispatch_id)[-40:]
    path = root / f"inbox-{re.sub(r'[^A-Za-z0-9_-]', '_', name)[:40]}-{safe}.jsonl"
    mode = 0o600 if ident is None else 0o640
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        if ident is not None:
            os.fchown(fd, -1, ident.gid)
        os.fchmod(fd, mode)  # the mode asked for, not what a umask (UMask=0077, or 000) made of it
    finally:
        os.close(fd)
    return path


def make_usage_file(agent: AgentSettings, dispatch_id: str, ident: Identity | None) -> Path:
    """The file a dispatch's agent appends its usage lines to (``FACTORY_USAGE``): beside the dispatch's
    directory in the worker's root (0711), owned by the worker (which reads it: the agent cannot swap it for a
    link), 0600, or 0620 with the agent's group when agents run as their own user; the caller removes it."""
    root = check_workdir_root(agent, ident)
    path = root / f"usage-{re.sub(r'[^A-Za-z0-9_-]', '_', dispatch_id)[-60:]}.jsonl"
    mode = 0o600 if ident is None else 0o620
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        if ident is not None:
            os.fchown(fd, -1, ident.gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return path


def agent_env(
    agent: AgentSettings, environ: Mapping[str, str], workdir: Path, issue_json: Path, issue_id: str, token: str
) -> dict[str, str]:
    """An agent's whole environment: the allowlisted variables the worker has, HOME, the issue and dispatch."""
    env = {name: environ[name] for name in agent.env_allowlist if name in environ}
    env.setdefault("HOME", str(workdir))
    env.update(FACTORY_ISSUE_ID=issue_id, FACTORY_ISSUE_JSON=str(issue_json), FACTORY_DISPATCH_TOKEN=str(token))
    return env


def secret_like(name: str, value: str | None = None) -> bool:
    """Does a variable look like a credential? (``*TOKEN*``, ``*PASSWORD*``, ``*SECRET*``, ``*AUTH*``, ``*KEY*``,
    factory_worker's own settings, a ``*_URL`` holding a password.)"""
    upper = name.upper()
    if any(word in upper for word in _SECRET_WORDS) or _SECRET_PARTS & set(upper.split("_")):
        return True
    if upper in _WORKER_SETTINGS or (upper.startswith("FACTORY_") and ("__" in upper or upper.endswith("_FILE"))):
        return True
    if upper.endswith("_URL") and value:
        try:
            return urlsplit(value).password is not None
        except ValueError:
            return True
    return False


def running_as(ident: Identity | None) -> str:
    """For logs: who agents run as."""
    return str(ident) if ident is not None else f"the worker's own user (uid {os.geteuid()})"
