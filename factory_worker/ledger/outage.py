"""A Redis outage in the log: one line per kind of failure, not a traceback per attempt.

A thread that retries a Redis write every tick while Redis is gone (a worker's presence, an agent's lease
renewal and stop-flag reads, a settle) says once what failed (:meth:`FailureLog.failed`: the exception's class
and first line), stays quiet while the same kind repeats, and says once that it works again
(:meth:`FailureLog.ok`, with the count). A worker whose Redis vanished during its shutdown printed ~22 full
tracebacks from its presence thread alone (issue 21, item 6). Standard library only.
"""

from __future__ import annotations

import logging


class FailureLog:
    """The failures of one repeated Redis operation (``what``: how the log names it), logged to ``log``."""

    def __init__(self, what: str, log: logging.Logger) -> None:
        self.what = what
        self.log = log
        self.seen: set[str] = set()
        self.failures = 0

    def failed(self, exc: BaseException, doing: str = "retrying") -> None:
        """Another failure: logged (one line, no traceback) when its kind is new since the last success."""
        self.failures += 1
        kind = type(exc).__name__
        if kind not in self.seen:
            self.seen.add(kind)
            first = (str(exc).splitlines() or [""])[0]
            self.log.warning("%s failed (%s: %s); %s, not logged again", self.what, kind, first, doing)

    def ok(self) -> None:
        """The operation worked: after failures, say so once (and how many attempts failed)."""
        if self.failures:
            self.log.warning("%s works again (after %d failed attempt(s))", self.what, self.failures)
        self.seen.clear()
        self.failures = 0
