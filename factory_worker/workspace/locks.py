"""File locks (``flock``): the kernel releases them when their holder dies, SIGKILL included, so a lock here is
never left owned by a process that is gone, and "is its holder alive?" is one non-blocking try.

* :func:`exclusive`: a mirror's lock, held around a clone, a fetch, a worktree's creation and a reclaim.
  Threads, pool processes and workers on one host that share ``workspace.root`` exclude each other (each
  call opens its own file description). Local disks only: ``flock`` over NFS is not to be trusted.
* :class:`HeldLock`: a dispatch's worktree lock, held from ``prepare`` to ``release``. It is created locked
  (written under a temporary name, locked, then renamed into place), so a visible lock file whose lock can
  be taken belongs to a dead process: that is how the reclaim tells an orphan from a live worktree. A staged
  attempt's worktree outlives its stage tasks: each stage takes the existing lock (:meth:`HeldLock.take`)
  for its run and drops it at the hand-over, keeping the file (the reclaim asks whether such an attempt is
  still live before it removes its worktree).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class LockTimeout(Exception):
    """A lock was not free within its timeout."""


@contextmanager
def exclusive(path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600) for the block; :class:`LockTimeout` when it
    stays taken for ``timeout_s``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline, pause = time.monotonic() + timeout_s, 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"{what} stayed locked for {timeout_s:g}s ({path})") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.2)
        yield
    finally:
        os.close(fd)  # releases the lock


class HeldLock:
    """A lock file created already locked by this process, with a small JSON note (what it guards)."""

    def __init__(self, path: Path, note: dict[str, Any]) -> None:
        self.path = path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: nobody else holds it
            os.write(fd, json.dumps({**note, "pid": os.getpid()}).encode())
            os.rename(tmp, path)  # visible only once locked
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self._fd: int | None = fd

    @classmethod
    def take(cls, path: Path) -> HeldLock | None:
        """The existing lock file ``path``, locked by this process; None when another holds it (or it is
        missing)."""
        fd = take_if_free(path)
        if fd is None:
            return None
        lock = cls.__new__(cls)
        lock.path, lock._fd = path, fd
        return lock

    def release(self, unlink: bool = True) -> None:
        """Remove the lock file (what it guarded is gone, or kept on purpose) and drop the lock."""
        if self._fd is None:
            return
        if unlink:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def take_if_free(path: Path) -> int | None:
    """An fd holding ``path``'s lock when nobody holds it (its holder is gone), else None (alive, or no such
    file). The caller closes the fd (which releases it) after cleaning up."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def note(path: Path) -> dict[str, Any]:
    """The JSON note of a lock file ({} when unreadable)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
