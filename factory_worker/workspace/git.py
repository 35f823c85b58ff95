"""Running git: an argv list (never a shell), a timeout that kills git's whole process group, no prompt, and a
credential that reaches only the git process that needs it.

* ``GIT_TERMINAL_PROMPT=0`` and no inherited askpass: a git that wants a password it was not given fails at
  once instead of hanging; ``LC_ALL=C`` keeps its messages parseable; the inherited ``GIT_*`` variables that
  would point it at another repository are dropped, and so is the variable holding the token.
* Every call runs against the worker's own bare mirror (``--git-dir``), whose config and hooks only the worker
  can change; a worktree the agent wrote to is never the repository the worker's git runs in (see
  :mod:`.publish` for how the agent's leftovers are committed: as the agent).
* **The credential** (:class:`Credential`): for an ``https`` remote the token is put in the environment of that
  one git process (``FACTORY_GIT_PASSWORD``), and ``GIT_ASKPASS`` names a fixed helper script that prints it
  when git asks. It is never in argv, never in a URL, never in a file, and never in an agent's environment;
  ``-c credential.helper=`` empties the worker's own helpers so that none of them stores it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Inherited variables that would make git use another repository, identity or prompt than the one we give it.
_DROP = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_CEILING_DIRECTORIES",
    "GIT_CONFIG_PARAMETERS",
    "GIT_CONFIG_COUNT",
    "GIT_ASKPASS",
    "SSH_ASKPASS",
    "GIT_EDITOR",
    "GIT_PAGER",
    "GIT_EXEC_PATH",
    "GIT_TRACE",
    "GIT_TRACE_CURL",
    "GIT_TRACE_PACKET",
    "GIT_REDACT_COOKIES",
)
#: What every call of the worker's git starts with: no hooks, no external transports.
HARDEN = ("-c", "core.hooksPath=/dev/null", "-c", "protocol.ext.allow=never", "-c", "core.fsmonitor=false")
ASKPASS_HELPER = f"""#!{sys.executable} -I
# factory_worker's GIT_ASKPASS: git asks for the user name, then the password (the token), as argv[1].
import os, sys
ask = sys.argv[1].lower() if len(sys.argv) > 1 else ""
print(os.environ.get("FACTORY_GIT_USERNAME" if ask.startswith("username") else "FACTORY_GIT_PASSWORD", ""))
"""


class GitError(Exception):
    """A git command failed: ``what`` it was, its exit status and the last lines of its stderr (which never
    hold the token: it is not in any URL git could print)."""

    def __init__(self, what: str, returncode: int | None, stderr: str = "") -> None:
        self.what, self.returncode = what, returncode
        tail = " | ".join(line.strip() for line in stderr.strip().splitlines()[-3:] if line.strip())
        status = "timed out" if returncode is None else f"exit {returncode}"
        super().__init__(f"git {what}: {status}" + (f": {tail[:400]}" if tail else ""))


@dataclass(frozen=True)
class Credential:
    """The token git sends (as ``username``'s password) to an ``https`` remote, through ``askpass``."""

    username: str
    token: str
    askpass: Path

    def env(self) -> dict[str, str]:
        return {
            "GIT_ASKPASS": str(self.askpass),
            "FACTORY_GIT_USERNAME": self.username,
            "FACTORY_GIT_PASSWORD": self.token,
        }

    def __repr__(self) -> str:  # never the token
        return f"Credential(username={self.username!r}, token=<hidden>)"


def write_askpass(root: Path) -> Path:
    """The askpass helper (``<root>/askpass``, 0700, the worker's): fixed text, the token is not in it."""
    path = root / "askpass"
    try:
        if path.read_text() == ASKPASS_HELPER and not path.is_symlink():
            return path
    except OSError:
        pass
    tmp = root / f".askpass.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o700)
    with open(fd, "w") as fh:
        fh.write(ASKPASS_HELPER)
    os.replace(tmp, path)
    return path


def git_binary() -> str:
    found = shutil.which("git")
    if found is None:
        raise GitError("--version", 127, "git is not installed (not on PATH)")
    return found


def base_env(environ: Mapping[str, str], drop: Sequence[str] = ()) -> dict[str, str]:
    """The worker's environment for its own git: without :data:`_DROP`, ``drop`` (the token variable and its
    ``_FILE``) and factory_worker's settings; no prompt, C locale."""
    gone = {*_DROP, *drop, *(f"{d}_FILE" for d in drop)}
    env = {k: v for k, v in environ.items() if k not in gone and not k.startswith("FACTORY_")}
    env.update(GIT_TERMINAL_PROMPT="0", LC_ALL="C")
    return env


@dataclass(frozen=True)
class Git:
    """Runs ``git`` with the worker's environment minus what :func:`base_env` drops."""

    timeout_s: float
    network_timeout_s: float
    drop_env: tuple[str, ...] = ()

    def run(
        self,
        args: Sequence[str],
        *,
        git_dir: Path | None = None,
        network: bool = False,
        credential: Credential | None = None,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        check: bool = True,
        what: str | None = None,
        cwd: Path | None = None,
        user: tuple[int, int] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``git [--git-dir=DIR] ARGS``; raises :class:`GitError` on failure (``check``) or timeout. ``environ``
        replaces the worker's environment as the base (the agent-side commit gives a minimal one); ``user``
        runs git as that (uid, gid) with no supplementary groups."""
        argv = [git_binary(), *HARDEN]
        if network:
            argv += ["-c", "credential.helper="]
        if git_dir is not None:
            argv.append(f"--git-dir={git_dir}")
        argv += list(args)
        full = base_env(os.environ if environ is None else environ, self.drop_env)
        if credential is not None:
            full.update(credential.env())
        full.update(env or {})
        label = what or (args[0] if args else "git")
        timeout = self.network_timeout_s if network else self.timeout_s
        uid: int | None = None
        gid: int | None = None
        groups: list[int] | None = None
        if user is not None and user != (os.geteuid(), os.getegid()):
            uid, gid, groups = user[0], user[1], []
        proc = subprocess.Popen(  # an argv list, no shell
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full,
            cwd=cwd,
            start_new_session=True,  # a timeout kills git and its helpers (remote-https, askpass) together
            umask=0o022,  # what the worker's git writes into a mirror stays readable by the agents' worktrees
            user=uid,
            group=gid,
            extra_groups=groups,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise GitError(label, None, f"no answer within {timeout:g}s") from None
        except BaseException:
            _kill_group(proc)
            raise
        result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise GitError(label, proc.returncode, err)
        return result

    def out(self, args: Sequence[str], **kw: object) -> str:
        """The stripped stdout of a successful call."""
        return self.run(args, **kw).stdout.strip()  # type: ignore[arg-type]

    def rev(self, git_dir: Path, ref: str) -> str | None:
        """The commit ``ref`` names, or None when it names none."""
        args = ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"]
        res = self.run(args, git_dir=git_dir, check=False)
        if res.returncode != 0:
            return None
        return res.stdout.strip() or None


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.kill()
    proc.communicate()
