"""An agent's own PID namespace: it runs as PID 1 of a namespace with its own ``/proc`` (``agent.pid_namespace``).

When the namespace's init ends, the kernel kills every process left in it, and none of them can leave it
(``setsid``, double forks, daemons included): whatever an agent started ends with it, also when its worker is
SIGKILLed (the agent's PDEATHSIG ends the init). With its own ``/proc`` it cannot list the worker's processes.

How: the supervising thread calls ``unshare(CLONE_NEWPID)`` for itself just before it starts the agent, so
the one child it forks is PID 1 of a new namespace, and sets its own children's namespace back right after
(``setns``); the thread's other processes and the worker's other threads are untouched. The agent is still
the worker's own child, so its exit status (a signal included), its pidfd and its process group are exactly
what they were. Its argv starts with ``unshare --mount-proc`` (util-linux, like ``setpriv``): a mount
namespace of its own with a fresh ``/proc`` of the new PID namespace, then exec of the rest; ``setpriv``
switches the uid/gid after it (:func:`.process.launch`). Needs CAP_SYS_ADMIN (a root worker has it).

An init gets only the signals it has a handler for (SIGKILL from the worker always works): see
:meth:`.command.CommandAgent.stop_group` for how a stop allows for that.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

from factory_worker.agents.tools import setpriv, unshare
from factory_worker.config.settings import AgentSettings, ConfigError

log = logging.getLogger(__name__)

CLONE_NEWPID = 0x20000000
MODES = ("auto", "required", "off")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare.argtypes, libc.setns.argtypes = [ctypes.c_int], [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


def wrap(argv: list[str]) -> list[str]:
    """``argv`` run by the namespace's init after it mounted its own ``/proc``."""
    path = unshare()
    if path is None:
        raise FileNotFoundError(2, "no util-linux unshare with --mount-proc", "unshare")
    return [path, "--mount-proc", "--", *argv]


@contextlib.contextmanager
def new_namespace() -> Iterator[None]:
    """The next process this thread forks is PID 1 of a new PID namespace; on leaving, this thread's children
    are in its own namespace again. OSError (EPERM without CAP_SYS_ADMIN) when none can be made."""
    libc = _libc()
    if libc is None:
        raise OSError(38, "PID namespaces are Linux-only")
    own = os.open("/proc/thread-self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)  # the thread's own: never changes
    try:
        if libc.unshare(CLONE_NEWPID) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWPID): {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWPID) != 0:  # with CAP_SYS_ADMIN, back to one's own never fails
                err = ctypes.get_errno()
                log.error(
                    "cannot leave the agent's PID namespace (%s): this thread's next processes fail", os.strerror(err)
                )
    finally:
        os.close(own)


@functools.cache
def unavailable() -> str | None:
    """Why agents cannot get their own PID namespace on this host, as this process (None: they can). Tried
    once per process for real: a namespace, ``unshare --mount-proc`` in it, ``true``."""
    if not sys.platform.startswith("linux"):
        return "PID namespaces are Linux-only"
    if setpriv() is None:
        return "no util-linux setpriv with --pdeathsig on PATH"
    true = shutil.which("true")
    if unshare() is None or true is None:
        return "no util-linux unshare with --mount-proc on PATH"
    try:
        with new_namespace():
            proc = subprocess.run(wrap([true]), stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    except OSError as exc:
        why = "needs CAP_SYS_ADMIN (root has it; a container's root usually not)" if exc.errno == 1 else exc.strerror
        return f"unshare(CLONE_NEWPID) failed: {why}"
    except subprocess.SubprocessError as exc:
        return f"unshare --mount-proc failed: {exc}"
    if proc.returncode != 0:
        said = (proc.stderr.decode("utf-8", "replace").strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return f"unshare --mount-proc failed: {said}"
    return None


def use_namespace(agent: AgentSettings) -> bool:
    """Do this process's agents get their own PID namespace? ``auto``: when one can be made; ``required``:
    always (else :class:`ConfigError` naming agent.pid_namespace); ``off``: never."""
    if agent.pid_namespace == "off":
        return False
    why = unavailable()
    if why is not None and agent.pid_namespace == "required":
        raise ConfigError(
            f"invalid setting agent.pid_namespace (FACTORY_AGENT__PID_NAMESPACE=required): agents "
            f"cannot get their own PID namespace here: {why}"
        )
    return why is None


def describe(agent: AgentSettings) -> tuple[str, str | None]:
    """For a worker's start and ``doctor``: (what agents get, a warning or None)."""
    if agent.pid_namespace == "off":
        return (
            "no PID namespace of their own (agent.pid_namespace = off)",
            "agent.pid_namespace is off: processes an agent leaves behind outlive it (and a SIGKILLed "
            "worker) and can see the worker's processes; unset FACTORY_AGENT__PID_NAMESPACE",
        )
    why = unavailable()
    if why is None:
        return "each as PID 1 of its own PID namespace (own /proc)", None
    return (
        "no PID namespace of their own",
        f"agents cannot get their own PID namespace here ({why}): processes "
        "an agent leaves behind outlive it (and a SIGKILLed worker) and can see the worker's processes; run "
        "agent workers as root or with CAP_SYS_ADMIN (FACTORY_AGENT__PID_NAMESPACE)",
    )
