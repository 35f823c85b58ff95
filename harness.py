"""Plumbing shared by the test suite (``tests/support.py``) and the benchmarks (``benchmarks/_harness.py``):
waiting for a condition, whether a pid is alive, running the control CLI. Not part of the shipped package.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent


def wait_until(
    pred: Callable[[], object],
    timeout: float,
    what: str = "condition",
    interval: float = 0.1,
    error: type[Exception] = AssertionError,
) -> Any:
    """Poll ``pred`` every ``interval`` s until it returns something true (returned); ``error`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise error(f"timed out after {timeout:g}s waiting for {what}")


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def run_ctl(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m factory_worker.ctl ARGS`` with ``env``, from the repository root; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "factory_worker.ctl", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
