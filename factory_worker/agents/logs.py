"""Agent logs: private (0600 files in 0700 directories), capped in size, pruned after a retention period.

An agent's stdout and stderr go through a pipe to a :class:`LogRelay` thread that writes at most
``agent.log_max_bytes`` to the dispatch's log file and then drains the rest (noting once that it did), so a
chatty or hostile agent can neither fill the disk nor block on a full pipe. :func:`prune` removes logs older
than ``agent.log_retention_s``; the runner calls it at most once per :data:`PRUNE_EVERY_S` per process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
PRUNE_EVERY_S = 3600.0
_last_prune = 0.0
_prune_lock = threading.Lock()


def open_log(path: Path) -> int:
    """An append-only fd of ``path`` (created 0600; its directory 0700; a symlink is refused). Another pool
    process's :func:`prune` may remove the directory, still empty, between the mkdir and the open: then the
    directory is made again."""
    for tries in range(3):
        _private_dirs(path.parent)
        try:
            return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            if tries == 2:
                raise
    raise AssertionError("unreachable")


def _private_dirs(folder: Path) -> None:
    """``folder`` and each missing parent made 0700 (``Path.mkdir(parents=True)`` gives the parents the default
    mode: a log root another user could list, naming every issue). One ``mkdir`` when only ``folder`` is new."""
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        return
    except FileNotFoundError:
        _private_dirs(folder.parent)
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass


class LogRelay:
    """Copies a pipe into a log fd up to ``cap`` bytes, then discards the rest (noted once)."""

    def __init__(self, pipe_fd: int, log_fd: int, cap: int, already: int = 0) -> None:
        self.pipe_fd, self.log_fd, self.cap = pipe_fd, log_fd, cap
        self.written, self.dropped = already, 0
        self.thread = threading.Thread(target=self._run, name="factory-agent-log", daemon=True)

    @property
    def started(self) -> bool:
        return self.thread.ident is not None

    def start(self) -> LogRelay:
        """Relay in the thread from now on (the supervisor starts it once an agent outlives a few ticks: the
        pipe's buffer holds a short agent's output until :meth:`finish`)."""
        if not self.started:
            self.thread.start()
        return self

    def _copy(self, chunk: bytes) -> None:
        room = self.cap - self.written
        if room > 0:
            os.write(self.log_fd, chunk[:room])
            self.written += min(room, len(chunk))
        if len(chunk) > max(room, 0):
            if not self.dropped:
                os.write(
                    self.log_fd,
                    f"\n# factory: log capped at {self.cap} bytes; the rest is "
                    "discarded (agent.log_max_bytes)\n".encode(),
                )
            self.dropped += len(chunk) - max(room, 0)

    def _run(self) -> None:
        try:
            while chunk := os.read(self.pipe_fd, CHUNK):
                self._copy(chunk)
        except OSError as exc:
            log.warning("agent log relay stopped: %s", exc)
        finally:
            os.close(self.pipe_fd)

    def _drain_here(self) -> bool:
        """Copy what the pipe holds without blocking; True when its end was reached (the pipe is closed)."""
        try:
            os.set_blocking(self.pipe_fd, False)
            while chunk := os.read(self.pipe_fd, CHUNK):
                self._copy(chunk)
        except BlockingIOError:  # a writer is still alive (a stray holder of the pipe): the thread waits for it
            os.set_blocking(self.pipe_fd, True)
            return False
        except OSError as exc:
            log.warning("agent log relay stopped: %s", exc)
        os.close(self.pipe_fd)
        return True

    def finish(self, timeout: float = 2.0) -> None:
        """After the agent's group is gone: copy the rest, then the log is complete. A short agent's output is
        copied here, with no thread; otherwise the thread is waited for, at most ``timeout`` (a stray holder
        of the pipe is not waited for long)."""
        if not self.started and self._drain_here():
            return
        self.start()
        self.thread.join(timeout)


def prune(log_dir: Path, retention_s: float, now: float | None = None, force: bool = False) -> int:
    """Remove agent logs older than ``retention_s`` under ``log_dir`` (and directories left empty); at
    most once per :data:`PRUNE_EVERY_S` per process unless ``force``. Returns how many files went."""
    global _last_prune
    if retention_s <= 0:
        return 0
    now = time.time() if now is None else now
    with _prune_lock:
        if not force and now - _last_prune < PRUNE_EVERY_S:
            return 0
        _last_prune = now
    removed = 0
    for folder, _dirs, files in os.walk(log_dir, topdown=False):
        for name in files:
            path = Path(folder) / name
            try:
                if name.endswith(".log") and now - path.lstat().st_mtime > retention_s:
                    path.unlink()
                    removed += 1
            except OSError:
                continue
        if Path(folder) != Path(log_dir):
            try:
                os.rmdir(folder)  # only when empty
            except OSError:
                pass
    if removed:
        log.info("pruned %d agent log(s) older than %gs under %s", removed, retention_s, log_dir)
    return removed
