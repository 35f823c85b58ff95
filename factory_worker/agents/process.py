"""Process plumbing for agents: die-with-parent (PDEATHSIG via setpriv or prctl), uid/gid, the argv of an agent in its
own PID namespace (:mod:`.pidns`), exit waits, groups, an init's SIGTERM disposition.

Linux-first: PDEATHSIG ties an agent's life to the thread that started it; a pidfd reports its exit at
once without reaping it, so its process group id cannot be reused before the group is signalled.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from factory_worker.agents import tools
from factory_worker.agents.pidns import wrap

if TYPE_CHECKING:
    from factory_worker.agents.sandbox import Identity

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved in the parent so the forked child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError) as exc:
        log.warning("prctl unavailable (%s): agents will not die with their worker", exc)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


def launch(argv: list[str], ident: Identity | None = None, pidns: bool = False) -> tuple[list[str], dict[str, Any]]:
    """The argv to exec and the extra ``Popen`` arguments that make the agent die with its supervisor
    (PDEATHSIG) and, with ``ident``, run as that uid/gid with no supplementary groups.

    ``argv[0]`` is resolved here, on the worker's PATH and from the worker's cwd, to an absolute path: the
    agent runs in its own directory and with its own environment, and runs exactly the program checked.
    ``setpriv`` changes the ids before it sets PDEATHSIG (a uid change clears it); without ``setpriv``,
    ``subprocess`` changes them before the ``preexec_fn`` sets it.

    ``pidns`` (the caller forks it into a new PID namespace, :mod:`.pidns`; needs ``setpriv``): ``setpriv
    --pdeathsig`` first (the init dies with its supervisor from its first exec on), then ``unshare
    --mount-proc`` (its own /proc, as root), then ``setpriv`` again for the ids (and PDEATHSIG once more).
    """
    found = shutil.which(argv[0])
    if found is None:
        raise FileNotFoundError(2, "No such file or directory (or not executable)", argv[0])
    argv = [os.path.abspath(found), *argv[1:]]
    setpriv = tools.setpriv()
    if pidns:
        if setpriv is None:
            raise FileNotFoundError(
                2, "no util-linux setpriv with --pdeathsig (an agent's PID namespace needs it)", "setpriv"
            )
        if ident is not None:
            argv = [
                setpriv,
                f"--reuid={ident.uid}",
                f"--regid={ident.gid}",
                "--clear-groups",
                "--pdeathsig",
                "KILL",
                "--",
                *argv,
            ]
        return [setpriv, "--pdeathsig", "KILL", "--", *wrap(argv)], {}
    if setpriv is not None:
        ids = [f"--reuid={ident.uid}", f"--regid={ident.gid}", "--clear-groups"] if ident is not None else []
        return [setpriv, *ids, "--pdeathsig", "KILL", "--", *argv], {}
    extra: dict[str, Any] = {"preexec_fn": _preexec()}
    if ident is not None:
        extra.update(user=ident.uid, group=ident.gid, extra_groups=[])
    return argv, extra


def as_user(argv: list[str], ident: Identity) -> tuple[list[str], dict[str, Any]]:
    """The argv and ``Popen`` arguments that run a helper command as ``ident`` (no PDEATHSIG needed)."""
    setpriv = tools.setpriv()
    if setpriv is not None:
        return [setpriv, f"--reuid={ident.uid}", f"--regid={ident.gid}", "--clear-groups", "--", *argv], {}
    return argv, {"user": ident.uid, "group": ident.gid, "extra_groups": []}


def _preexec() -> Callable[[], None] | None:
    """A preexec_fn setting PR_SET_PDEATHSIG(SIGKILL); closes the race where the parent died first."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent, sigkill = os.getpid(), int(signal.SIGKILL)

    def child() -> None:
        prctl(PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: die now, as PDEATHSIG would have
            os.kill(os.getpid(), sigkill)

    return child


def die_with_parent() -> bool:
    """Make the calling process get SIGKILL when its parent dies (Linux); returns whether it is set."""
    prctl = _prctl()
    if prctl is None:
        return False
    parent = os.getppid()
    prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # parent already gone
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def pidfd_of(proc: subprocess.Popen) -> int | None:
    """A pidfd for ``proc`` (Linux >= 5.3), opened once and closed with the process object."""
    fd = getattr(proc, "_factory_pidfd", None)
    if fd is None and hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(proc.pid)
        except OSError:
            fd = -1
        proc._factory_pidfd = fd  # type: ignore[attr-defined]
        if fd >= 0:
            weakref.finalize(proc, os.close, fd)
    return fd if fd is not None and fd >= 0 else None


def exit_state(proc: subprocess.Popen) -> str:
    """``running``, ``exited`` (a zombie, not reaped: its pid/pgid stay reserved) or ``lost``."""
    if proc.returncode is not None:
        return "exited"
    if not hasattr(os, "waitid"):
        return "running" if proc.poll() is None else "exited"
    try:
        found = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped by someone else: the exit status is gone
        return "lost"
    return "running" if found is None else "exited"


def live_member(pgid: int, but: int | None = None) -> bool:
    """Is any non-zombie process in group ``pgid`` (other than ``but``)? (Linux /proc; elsewhere assume yes.)"""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit() or entry == str(but):
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()  # state ppid pgrp ...
        if len(fields) >= 3 and fields[2] == str(pgid).encode() and fields[0] not in (b"Z", b"X"):
            return True
    return False


def group_alive(pgid: int) -> bool:
    """Does process group ``pgid`` still have a running (non-zombie) member?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return live_member(pgid) if sys.platform.startswith("linux") else True


def term_is_default(pid: int) -> bool:
    """Does ``pid`` neither catch nor ignore SIGTERM? (Linux /proc; False when unknown.) A PID namespace's init
    never gets a signal it has no handler for, so SIGTERM's default action, ending it, never happens."""
    bit = 1 << (signal.SIGTERM - 1)
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            masks = {
                k: int(v, 16) for k, _, v in (line.partition(b":\t") for line in fh) if k in (b"SigIgn", b"SigCgt")
            }
    except (OSError, ValueError):
        return False
    return len(masks) == 2 and not (masks[b"SigIgn"] | masks[b"SigCgt"]) & bit


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
