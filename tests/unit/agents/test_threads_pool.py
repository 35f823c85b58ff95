"""PDEATHSIG under the threads pool (issue 26): on Linux an agent's death signal is tied to the *thread* that
forked it, so the supervising thread must outlive its agent. Real processes, no worker."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from factory_worker.agents.process import launch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PDEATHSIG is Linux's")


def test_an_agent_dies_with_the_thread_that_started_it():
    """Why the supervisor spawns and waits in one thread: a thread that started an agent and ended takes it."""
    argv, extra = launch(["sleep", "30"])
    box: dict[str, subprocess.Popen] = {}

    def start_and_leave() -> None:
        box["p"] = subprocess.Popen(argv, **extra)
        # setpriv sets PDEATHSIG after the fork: a thread gone before that would have handed the agent to a
        # sibling thread (same process, so no getppid() check sees it). The supervisor waits for its agent.
        time.sleep(0.5)

    t = threading.Thread(target=start_and_leave)
    t.start()
    t.join()
    assert box["p"].wait(5) == -signal.SIGKILL


def test_an_agent_in_a_reused_pool_thread_runs_to_its_end_while_its_thread_waits():
    """Celery's threads pool (a ThreadPoolExecutor) keeps its threads: an agent started by a reused thread that
    waits for it lives its whole life, and one that is still running when the worker's thread ends dies."""

    def supervise(seconds: str) -> tuple[int, float]:
        argv, extra = launch(["sleep", seconds])
        t0 = time.monotonic()
        return subprocess.Popen(argv, **extra).wait(10), time.monotonic() - t0

    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(supervise, "0.1").result()
        second = pool.submit(supervise, "0.5").result()  # the same thread, reused
    assert first[0] == 0 and second[0] == 0
    assert second[1] >= 0.5
