"""Worker and beat signal receivers: they set flags or release by token; one thread does the acting.

- ``worker_ready`` starts the worker's liveness thread (publishes ``{ns}:worker:<node>`` with expiry).
- ``worker_shutting_down`` runs inside Celery's signal handler, so it only sets a flag; the liveness
  thread then writes this worker's shutdown deadline (now + soft-shutdown window) once. Agents running
  here poll it and, past the deadline, are terminated and their claims released as interrupted.
- ``task_revoked`` fires in the pool's parent: it releases the revoked agent task's claim through the
  task-id -> (issue, token) mapping in Redis, never a thread-local token.
- ``worker_process_init`` makes each pool process die with the worker (PR_SET_PDEATHSIG), so an agent
  never outlives the worker that started it, even when the worker is SIGKILLed.
- ``beat_init`` starts a thread publishing the beat's presence key (``doctor`` reports two live beats).
- ``worker_shutdown`` stops the thread and removes this worker's keys.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
from typing import Any

from celery import signals

from .redis_client import server_now_ms

log = logging.getLogger(__name__)


class _WorkerState:
    """Flags shared by the receivers and the liveness thread of one worker (main process)."""

    def __init__(self) -> None:
        self.node: str | None = None
        self.started_ms = 0
        self.shutdown_requested = False  # set from a signal handler: a plain bool, nothing else
        self.shutdown_written = False
        self.closing = False
        self.thread: threading.Thread | None = None


STATE = _WorkerState()


def _factory():
    from .tasks import factory

    return factory()


def publish_worker(node: str, shutting_down: bool = False) -> None:
    f = _factory()
    cfg = f.settings.worker
    f.r.set(f.keys.worker(node), json.dumps({
        "hostname": node, "host": socket.gethostname(), "pid": os.getpid(), "started_ms": STATE.started_ms,
        "updated_ms": server_now_ms(f.r), "shutting_down": shutting_down,
    }), px=int(cfg.heartbeat_ttl_s * 1000))


def write_shutdown_deadline(node: str) -> int:
    """Tell this worker's agents when the soft-shutdown window ends (ms, server clock)."""
    f = _factory()
    cfg = f.settings.worker
    window_ms = int(cfg.soft_shutdown_s * 1000)
    # leave the margin to release claims and for Celery to stop its pool (~2 s measured)
    deadline = server_now_ms(f.r) + max(0, window_ms - int(cfg.shutdown_margin_s * 1000))
    f.r.set(f.keys.worker_shutdown(node), deadline, px=window_ms + 60_000)
    running = f.r.scard(f.keys.agents)
    level = logging.WARNING if running else logging.INFO
    log.log(level, "warm shutdown: agents still running in %.1fs will be stopped and their claims released",
            (deadline - server_now_ms(f.r)) / 1000)
    return deadline


def _liveness_loop() -> None:
    f = _factory()
    interval = f.settings.worker.heartbeat_interval_s
    next_beat = 0.0
    while not STATE.closing:
        try:
            if STATE.shutdown_requested and not STATE.shutdown_written and STATE.node:
                write_shutdown_deadline(STATE.node)
                STATE.shutdown_written = True
                next_beat = 0.0
            if time.monotonic() >= next_beat and STATE.node:
                publish_worker(STATE.node, STATE.shutdown_requested)
                next_beat = time.monotonic() + interval
        except Exception:  # noqa: BLE001 - Redis down: keep trying, the key's TTL tells the truth
            log.warning("worker liveness: Redis write failed", exc_info=True)
            next_beat = time.monotonic() + min(interval, 1.0)
        time.sleep(0.1)


@signals.worker_ready.connect
def on_worker_ready(sender: Any = None, **_: Any) -> None:
    STATE.node = getattr(sender, "hostname", None) or socket.gethostname()
    STATE.started_ms = int(time.time() * 1000)
    STATE.thread = threading.Thread(target=_liveness_loop, name="factory-worker-liveness", daemon=True)
    STATE.thread.start()


@signals.worker_process_init.connect
def on_worker_process_init(**_: Any) -> None:
    """A pool process dies with its worker (even by SIGKILL), and so, through PDEATHSIG, do its agents."""
    from .agents.process import die_with_parent

    die_with_parent()


@signals.worker_shutting_down.connect
def on_worker_shutting_down(sig: Any = None, how: Any = None, exitcode: Any = None, **_: Any) -> None:
    STATE.shutdown_requested = True  # flag only: we are inside a signal handler


@signals.worker_shutdown.connect
def on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    STATE.closing = True
    if STATE.thread is not None:
        STATE.thread.join(timeout=2)
    if STATE.node:
        try:
            f = _factory()
            f.r.delete(f.keys.worker(STATE.node), f.keys.worker_shutdown(STATE.node))
        except Exception:  # noqa: BLE001
            log.warning("could not remove worker keys", exc_info=True)


def _beat_presence_loop() -> None:
    from .doctor import beat_ttl_s, clear_beat, publish_beat

    f = _factory()
    every = beat_ttl_s(f.settings) / 3
    next_beat = 0.0
    while not STATE.closing:
        if time.monotonic() >= next_beat:
            try:
                publish_beat(f)
            except Exception:  # noqa: BLE001 - Redis down: the key's TTL tells the truth
                log.warning("beat presence: Redis write failed", exc_info=True)
            next_beat = time.monotonic() + every
        time.sleep(0.2)
    try:
        clear_beat(f)
    except Exception:  # noqa: BLE001
        pass


@signals.beat_init.connect
def on_beat_init(sender: Any = None, **_: Any) -> None:
    """Publish this beat's presence (``{ns}:beat:<host/pid>``) so `doctor` can see two beats."""
    STATE.thread = threading.Thread(target=_beat_presence_loop, name="factory-beat-presence", daemon=True)
    STATE.thread.start()
    atexit.register(_stop_thread)


def _stop_thread() -> None:
    STATE.closing = True
    if STATE.thread is not None:
        STATE.thread.join(timeout=2)


@signals.task_revoked.connect
def on_task_revoked(request: Any = None, terminated: bool = False, **_: Any) -> None:
    """A revoked agent task (queued or terminated) frees its claim by token, without a backoff."""
    task = getattr(request, "task", None) or getattr(request, "name", None)
    task_id = getattr(request, "id", None)
    if task != "factory.agent.run" or not task_id:
        return
    from .dispatch import release_task_claim

    try:
        issue = release_task_claim(_factory(), task_id, reason="interrupted", only_if_queued=True)
        if issue:
            log.info("revoked agent task %s: claim on %s released", task_id, issue)
    except Exception:  # noqa: BLE001 - the lease TTL frees it anyway
        log.warning("could not release the claim of revoked task %s", task_id, exc_info=True)
