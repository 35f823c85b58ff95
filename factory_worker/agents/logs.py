"""Agent logs: private (0600 files in 0700 directories), capped in size, pruned after a retention period.

An agent's stdout and stderr go through a pipe to a :class:`LogRelay` thread that writes at most
``agent.log_max_bytes`` to the dispatch's log file and then drains the rest (noting once that it did), so a
chatty or hostile agent can neither fill the disk nor block on a full pipe. The relay owns the pipe and the
log's fd, and is cut off when the agent ends: nothing written later, by a process the agent left behind,
reaches this log or any other file. :func:`prune` removes logs older
than ``agent.log_retention_s``; the runner calls it at most once per :data:`PRUNE_EVERY_S` per process.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
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
    """Copies an agent's output pipe into its log fd up to ``cap`` bytes, then discards the rest (noted once).

    The relay owns the pipe and the log fd from its construction on: they are closed by the relay's thread
    once it started, else by :meth:`finish` / :meth:`close` in the calling thread, never by one thread while
    another may still use them (a closed number is the next file's, and a late write would land there).
    :meth:`finish` cuts the relay off when the agent's group is gone: what the pipe holds is copied, then its
    read end is closed, so a process that escaped the agent and still holds the write end gets EPIPE.
    """

    def __init__(self, log_fd: int, cap: int, header: bytes = b"") -> None:
        self.log_fd, self.cap = log_fd, cap
        self.written, self.dropped = 0, 0
        #: when the agent's output was last seen (monotonic; the supervisor's stall clock, ``agent.stall_s``)
        self.last_output = time.monotonic()
        self.pipe_fd = self.write_fd = self._wake = self._waker = -1
        try:
            self.pipe_fd, self.write_fd = os.pipe()  # close-on-exec: Popen dups the write end to the agent's 1, 2
            if header:
                self.note(header)
                self.written = len(header)
        except BaseException:
            self.close()
            raise
        self._done = False
        self.thread = threading.Thread(target=self._run, name="factory-agent-log", daemon=True)

    @property
    def started(self) -> bool:
        return self.thread.ident is not None

    def note(self, data: bytes) -> None:
        """Write the worker's own line to the log (before the thread starts: it is the fd's only user then)."""
        os.write(self.log_fd, data)

    def spawned(self) -> None:
        """The agent was started (or could not be): the worker's copy of the write end goes."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def start(self) -> LogRelay:
        """Relay in the thread from now on (the supervisor starts it once an agent outlives a few ticks: the
        pipe's buffer holds a short agent's output until :meth:`finish`)."""
        if not self.started and not self._done:
            self._wake, self._waker = os.pipe()  # the thread polls (and closes) the one, finish() the other
            self.thread.start()
        return self

    def _copy(self, chunk: bytes) -> None:
        self.last_output = time.monotonic()
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
            poller = select.poll()
            poller.register(self.pipe_fd, select.POLLIN)
            poller.register(self._wake, select.POLLIN)
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self._wake in ready:  # cut off by finish(): the rest that is there, then no more
                    self._drain()
                    break
                chunk = os.read(self.pipe_fd, CHUNK)  # readable or hung up: does not block
                if not chunk:
                    break
                self._copy(chunk)
        except OSError as exc:
            log.warning("agent log relay stopped: %s", exc)
        finally:
            self._close_fds()

    def _drain(self) -> None:
        """Copy what the pipe holds now, without blocking (at most a pipe's size: a writer that keeps it full
        does not keep the relay)."""
        left = _pipe_size(self.pipe_fd)
        try:
            os.set_blocking(self.pipe_fd, False)
            while left > 0 and (chunk := os.read(self.pipe_fd, min(CHUNK, left))):
                self._copy(chunk)
                left -= len(chunk)
        except BlockingIOError:
            pass
        except OSError as exc:
            log.warning("agent log relay stopped: %s", exc)

    def finish(self, timeout: float = 2.0) -> None:
        """After the agent's group is gone: copy what the pipe holds, close it from the reading side (a stray
        writer gets EPIPE) and the log. A short agent's output is copied here, with no thread; a started
        thread is woken to do it and waited for, at most ``timeout`` (it closes both itself, however late)."""
        if self._done:
            return
        if not self.started:
            self._done = True
            self._drain()
            self._close_fds()
            return
        self._done = True
        try:
            if self.thread.is_alive():
                os.write(self._waker, b"x")
        except BrokenPipeError:  # the thread has just ended by itself (the pipe ended)
            pass
        finally:
            os.close(self._waker)
            self._waker = -1
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("agent log relay still copying after %gs: it closes the log when done", timeout)

    def close(self) -> None:
        """The agent never started: close everything (the thread never ran)."""
        self._done = True
        self.spawned()
        self._close_fds()

    def _close_fds(self) -> None:
        for name in ("pipe_fd", "log_fd", "_wake"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)


def _pipe_size(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    except (AttributeError, OSError):
        return 1 << 20


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


#: what a failed agent task's exception text ends with (:func:`last_lines`): its output's last lines, capped
TAIL_LINES = 10
TAIL_LINE_CHARS = 300
TAIL_CHARS = 2000


def last_lines(output: str, lines: int = TAIL_LINES, line_chars: int = TAIL_LINE_CHARS, cap: int = TAIL_CHARS) -> str:
    """The last ``lines`` non-blank lines of an agent's ``output`` as untrusted text: every control or
    non-printable character (an ANSI escape, a carriage return, a NUL) shown as its ``\\x..`` / ``\\u....``
    escape, each line cut at ``line_chars``, the whole at most ``cap`` characters (older lines go first)."""
    kept: list[str] = []
    total = 0
    for raw in reversed([ln for ln in output.splitlines() if ln.strip()][-lines:]):
        line = _escape(raw)
        if len(line) > line_chars:
            line = line[: line_chars - 1] + "…"
        if total + len(line) + 1 > cap:
            break
        kept.append(line)
        total += len(line) + 1
    return "\n".join(reversed(kept))


def _escape(line: str) -> str:
    return "".join(ch if ch.isprintable() or ch == "\t" else repr(ch)[1:-1] for ch in line)
