"""The util-linux tools agents are started through, found once per process: ``setpriv`` (PDEATHSIG, uid/gid:
:mod:`.process`) and ``unshare`` (an agent's own ``/proc`` in its PID namespace: :mod:`.pidns`)."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys


@functools.cache
def util_linux(name: str, option: str) -> str | None:
    """The path of util-linux ``name`` when it is on PATH and its ``--help`` lists ``option`` (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    path = shutil.which(name)
    if path is None:
        return None
    try:
        helptext = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return path if option in helptext else None


def setpriv() -> str | None:
    """``setpriv`` with ``--pdeathsig``.

    Setting PDEATHSIG through ``setpriv`` lets Python start the agent with vfork: a ``preexec_fn`` forces a
    full fork, which costs ~6 ms in a worker-sized process against ~1.5 ms this way.
    """
    return util_linux("setpriv", "--pdeathsig")


def unshare() -> str | None:
    """``unshare`` with ``--mount-proc``."""
    return util_linux("unshare", "--mount-proc")
