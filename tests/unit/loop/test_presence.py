"""A warm shutdown's times reach the worker's pool processes without Redis (loop/presence.LocalShutdown), and a
Redis outage is one log line per kind of failure (ledger/outage.FailureLog)."""

from __future__ import annotations

import logging
import os
import time

from factory_worker.ledger.outage import FailureLog
from factory_worker.loop.presence import LocalShutdown


def test_a_forked_process_sees_the_shutdown_its_parent_begins_later():
    shared = LocalShutdown()  # made before the fork, as the worker's import makes SHUTDOWN before its pool forks
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the pool process: waits for the parent's shutdown, then reports what it read
        os.close(read)
        deadline = time.monotonic() + 10
        while shared.agents_stop_at() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.write(write, f"{shared.agents_stop_at()} {shared.window_end()}".encode())
        os._exit(0)
    os.close(write)
    assert shared.agents_stop_at() is None and shared.window_end() is None
    now = time.monotonic()
    shared.begin(20.0, 2.5, now=now)
    seen = os.read(read, 200).decode().split()
    os.waitpid(pid, 0)
    assert [float(x) for x in seen] == [now + 17.5, now + 20.0]  # one monotonic clock for the host's processes
    shared.clear()
    assert shared.window_end() is None


def test_one_line_per_kind_of_failure_and_one_when_it_works_again(caplog):
    log = logging.getLogger("test.outage")
    failures = FailureLog("worker presence: Redis write", log)
    with caplog.at_level(logging.WARNING, logger="test.outage"):
        for _ in range(20):
            failures.failed(ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.\nmore"))
        failures.failed(TimeoutError("Timeout reading from socket"))
        failures.failed(ConnectionError("again"))
        failures.ok()
        failures.ok()
        failures.failed(ConnectionError("later"))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "worker presence: Redis write failed (ConnectionError: Error 111 connecting to 127.0.0.1:6379. Connection "
        "refused.); retrying, not logged again",
        "worker presence: Redis write failed (TimeoutError: Timeout reading from socket); retrying, not logged again",
        "worker presence: Redis write works again (after 22 failed attempt(s))",
        "worker presence: Redis write failed (ConnectionError: later); retrying, not logged again",
    ]
    assert not any(r.exc_info for r in caplog.records)  # never a traceback
