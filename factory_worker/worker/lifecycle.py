"""Celery's side of a worker's and a beat's life: a bootstep, a beat scheduler, and signal receivers.

Signal receivers only set flags, release by token or (at a worker's start) refuse to start; the threads
here do the acting.

- :class:`WorkerPresence`, a worker bootstep, runs one thread from worker start to shutdown that publishes the
  worker's presence and, once a warm shutdown was requested, writes its shutdown deadline once (see
  :mod:`factory_worker.loop.presence`); an agent worker with a workspace also reclaims, once at its start, the
  worktrees its SIGKILLed predecessor on this root left (``Workspace.reclaim``, in a thread of its own: it may
  wait for a mirror's lock). ``worker_shutting_down`` runs inside Celery's signal handler, so it only
  sets :attr:`WorkerPresence.shutdown_requested`. Agents running here poll the deadline and, past it, are
  terminated and their claims released as interrupted.
- :class:`BeatScheduler`, Celery's ``PersistentScheduler`` that also keeps the beat's presence key fresh on
  its ticks (as redbeat keeps its lock from its scheduler), so ``doctor`` can see two live beats.
- ``task_revoked`` fires in the pool's parent: it releases the revoked agent task's claim through the
  task-id -> (issue, token) mapping in Redis, never a thread-local token.
- ``celeryd_init`` refuses to start a worker that would run agents but cannot isolate them as configured
  (``agent.user`` it cannot switch to, or unset on a root worker; ``agent.pid_namespace = required`` where
  no PID namespace can be made): agents never run as the worker, or as root, by accident. It notes (one
  warning at start) when agents get no PID namespace of their own.
- ``worker_process_init`` makes each pool process die with the worker (PR_SET_PDEATHSIG), so an agent
  never outlives the worker that started it, even when the worker is SIGKILLed.

All of them take their context from :func:`factory_worker.context.current` and survive a Redis blip: the
presence keys' expiry tells the truth.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from celery import bootsteps, signals
from celery.beat import PersistentScheduler

from factory_worker.context import current
from factory_worker.ledger.outage import FailureLog
from factory_worker.loop.presence import (
    SHUTDOWN,
    WorkerFacts,
    beat_ttl_s,
    clear_beat,
    clear_worker,
    publish_beat,
    publish_slots,
    publish_worker,
    write_shutdown_deadline,
)
from factory_worker.worker.lane import LoopLane

log = logging.getLogger(__name__)

AGENT_TASKS = frozenset({"factory.agent.run", "factory.agent.stage"})


def busy() -> tuple[int, int]:
    """This worker's processes running agents now, and loop tasks it holds waiting for a free process
    (``celery.worker.state``: the requests of this, the worker's main process)."""
    from celery.worker import state

    for _ in range(3):  # the consumer thread changes these sets as we copy them
        try:
            active, reserved = list(state.active_requests), list(state.reserved_requests)
            break
        except RuntimeError:
            continue
    else:
        return 0, 0
    running = {r.id for r in active}
    agents = sum(1 for r in active if getattr(r, "name", None) in AGENT_TASKS)
    waiting = sum(
        1 for r in reserved if r.id not in running and str(getattr(r, "name", "")).startswith("factory.loop.")
    )
    return agents, waiting


def agent_slots(worker: Any) -> int:
    """How many agents ``worker`` can run at once: its concurrency if it consumes the agent queue (one
    process kept for the loop's short tasks when it consumes the loop queue too), else 0."""
    keys = current().keys
    try:
        consumed = set(worker.app.amqp.queues.consume_from)
    except Exception:
        consumed = {keys.agent_queue, keys.loop_queue}
    if keys.agent_queue not in consumed:
        return 0
    c = int(getattr(worker, "concurrency", None) or 1)
    return max(1, c - 1) if keys.loop_queue in consumed else c


class WorkerPresence(bootsteps.StartStopStep):
    """Worker bootstep: a liveness thread from start to stop; the shutdown deadline once asked to stop.

    It starts after the pool (``requires``), so the pool's processes are forked before the thread runs; a
    process forked later (a replaced child) builds its own context (``context._forget_in_child``)."""

    requires = ("celery.worker.components:Pool",)

    #: set from Celery's signal handler (``worker_shutting_down``): a plain bool, nothing else
    shutdown_requested = False
    #: the step of this process's worker, closed by ``worker_shutdown``
    running: WorkerPresence | None = None
    #: who this worker's agents run as (checked at ``celeryd_init``; None: it runs no agents)
    agents_as: str | None = None
    #: why they get no PID namespace of their own, when they do not (one warning at start)
    agents_uncontained: str | None = None
    #: the soft-shutdown window and its margin (``worker.*``), read at start for the signal receiver
    window: tuple[float, float] = (0.0, 0.0)
    #: the longest the worker's goodbye (threads joined, its keys removed) may wait on Redis at the end
    GOODBYE_S = 1.5

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.node = getattr(parent, "hostname", None) or socket.gethostname()
        self.started_ms = int(time.time() * 1000)
        self.closing = threading.Event()
        self.thread: threading.Thread | None = None
        self.outbox_thread: threading.Thread | None = None
        self.reclaim_thread: threading.Thread | None = None
        self.slots = 0
        self.queues: tuple[str, ...] = ()
        self.concurrency = 0
        self.lane: LoopLane | None = None

    def start(self, parent: Any) -> None:
        WorkerPresence.running = self
        self.slots = agent_slots(parent)
        try:
            self.queues = tuple(sorted(parent.app.amqp.queues.consume_from))
        except Exception:
            self.queues = ()
        self.concurrency = int(getattr(parent, "concurrency", None) or 1)
        self.lane = next((step for step in getattr(parent, "steps", []) if isinstance(step, LoopLane)), None)
        cfg = current().settings.worker
        WorkerPresence.window = (cfg.soft_shutdown_s, cfg.shutdown_margin_s)
        if self.slots and WorkerPresence.agents_as:
            log.info("%s", WorkerPresence.agents_as)
            if WorkerPresence.agents_uncontained:
                log.warning("%s", WorkerPresence.agents_uncontained)
        self.thread = threading.Thread(target=self._run, name="factory-worker-presence", daemon=True)
        self.thread.start()
        ctx = current()
        if self.slots and ctx.settings.workspace.enabled:  # what a killed worker on this root left
            self.reclaim_thread = threading.Thread(target=_reclaim, name="factory-workspace-reclaim", daemon=True)
            self.reclaim_thread.start()
        if ctx.settings.tracker.write_back:  # this worker also delivers the tracker outbox
            from factory_worker.writeback.outbox import run_sender

            self.outbox_thread = threading.Thread(
                target=run_sender,
                name="factory-outbox",
                daemon=True,
                args=(ctx, f"{self.node}/{os.getpid()}", self.closing),
            )
            self.outbox_thread.start()

    def finish(self) -> None:
        """End the thread and remove this worker's keys (from ``worker_shutdown``: after the pool stopped).

        Not a bootstep ``stop``: the worker blueprint may stop this step before the pool has waited for its
        running agents, and the thread must live on to write the shutdown deadline they poll.
        """
        log.info("worker shutdown: the pool has stopped; removing this worker's keys")
        self.closing.set()
        until = time.monotonic() + self.GOODBYE_S  # Redis may be gone: never wait past the window on it
        for thread in (self.thread, self.outbox_thread):
            if thread is not None:
                thread.join(timeout=max(0.0, until - time.monotonic()))
        goodbye = threading.Thread(target=self._clear, name="factory-worker-goodbye", daemon=True)
        goodbye.start()
        goodbye.join(timeout=max(0.1, until - time.monotonic()))
        if goodbye.is_alive():
            log.warning(
                "worker keys not removed within %.1fs (Redis unreachable?): they expire by their TTL", self.GOODBYE_S
            )

    def _clear(self) -> None:
        try:
            clear_worker(current(), self.node)
        except Exception as exc:
            log.warning("could not remove worker keys (%s: %s): they expire by their TTL", type(exc).__name__, exc)

    def facts(self) -> WorkerFacts:
        """What this worker consumes and how busy it is: its consumer's queues and, unless its loop lane's thread
        died, the loop queue the lane took off the consumer (a dead lane consumes nothing: loop-status says that
        no worker consumes the loop queue)."""
        agents, waiting = busy()
        lane = self.lane
        # the lane's thread starts with its step (maybe after this one): until then it is about to consume
        on_lane = lane is not None and lane.queue is not None and (lane.thread is None or lane.thread.is_alive())
        queues = (
            tuple(sorted({*self.queues, lane.queue})) if on_lane and lane is not None and lane.queue else self.queues
        )
        return WorkerFacts(queues, self.concurrency, agents, waiting, on_lane)

    def _run(self) -> None:
        ctx = current()
        cfg = ctx.settings.worker
        interval = cfg.heartbeat_interval_s
        next_beat, deadline_written, shutdown_begun = 0.0, False, False
        failures = FailureLog("worker presence: Redis write", log)
        while not self.closing.is_set():
            if WorkerPresence.shutdown_requested and not shutdown_begun:
                if SHUTDOWN.window_end() is None:  # the receiver has written it (without Redis) unless a test
                    SHUTDOWN.begin(cfg.soft_shutdown_s, cfg.shutdown_margin_s)
                shutdown_begun = True
            try:
                if WorkerPresence.shutdown_requested and not deadline_written:
                    write_shutdown_deadline(ctx, self.node)
                    deadline_written, next_beat = True, 0.0
                if time.monotonic() >= next_beat:
                    stopping = WorkerPresence.shutdown_requested
                    publish_worker(ctx, self.node, self.started_ms, stopping, self.facts())
                    # a worker shutting down starts nothing new: its slots leave the fleet at once
                    publish_slots(ctx, self.node, 0 if stopping else self.slots)
                    next_beat = time.monotonic() + interval
                    failures.ok()
            except Exception as exc:
                failures.failed(exc)
                next_beat = time.monotonic() + min(interval, 1.0)
            self.closing.wait(0.1)


def _reclaim() -> None:
    try:
        gone = current().workspace.reclaim()
    except Exception:
        log.warning("workspace: the reclaim at start failed", exc_info=True)
        return
    if gone:
        log.info("workspace: reclaimed %d worktree(s) left by dispatches that are gone: %s", len(gone), gone)


class BeatScheduler(PersistentScheduler):
    """Celery's persistent scheduler that also keeps this beat's presence key fresh (every TTL/3)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._next_presence = 0.0
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        delay = super().tick(*args, **kwargs)
        now = time.monotonic()
        if now >= self._next_presence:
            try:
                ctx = current()
                publish_beat(ctx)
                every = beat_ttl_s(ctx) / 3
            except Exception:
                log.warning("beat presence: Redis write failed", exc_info=True)
                every = 1.0
            self._next_presence = now + every
        return min(delay, max(0.1, self._next_presence - now))

    def close(self) -> None:
        try:
            clear_beat(current())
        except Exception:
            pass
        super().close()


@signals.celeryd_init.connect
def refuse_agents_without_isolation(options: dict[str, Any] | None = None, **_: Any) -> None:
    """A worker that consumes the agent queue but cannot run agents as ``agent.user`` (or reach its working
    directory root) exits 2 with one line naming the setting (:func:`factory_worker.agents.sandbox.check_isolation`).
    A bad configuration is left to ``app``'s own check; a loop-only worker never runs agents."""
    import sys

    from celery.utils.text import str_to_list

    from factory_worker.agents.pidns import describe, use_namespace
    from factory_worker.agents.sandbox import check_isolation, running_as
    from factory_worker.config.settings import ConfigError
    from factory_worker.ledger.keys import Keys

    try:
        settings = current().settings
    except ConfigError:
        return
    queue, opts = Keys(settings.namespace).agent_queue, options or {}
    included, excluded = str_to_list(opts.get("queues") or []), str_to_list(opts.get("exclude_queues") or [])
    if (included and queue not in included) or queue in excluded:
        return
    try:
        ident = check_isolation(settings.agent)
        use_namespace(settings.agent)  # agent.pid_namespace = required and none can be made: refused
    except (ConfigError, OSError) as exc:
        print(f"factory_worker: {exc}", file=sys.__stderr__, flush=True)
        sys.exit(2)
    contained, WorkerPresence.agents_uncontained = describe(settings.agent)
    where = (
        f"git worktrees under {settings.workspace.root}/trees"
        if settings.workspace.enabled
        else f"fresh directories under {settings.agent.workdir_root}"
    )
    WorkerPresence.agents_as = (
        f"agents run as {running_as(ident)} in {where}, {contained}"  # logged once logging is set up
    )


@signals.worker_process_init.connect
def on_worker_process_init(**_: Any) -> None:
    """A pool process dies with its worker (even by SIGKILL), and so, through PDEATHSIG, do its agents."""
    from factory_worker.agents.process import die_with_parent

    die_with_parent()


@signals.worker_shutting_down.connect
def on_worker_shutting_down(sig: Any = None, how: Any = None, exitcode: Any = None, **_: Any) -> None:
    """Flags only (we are inside a signal handler): the request, and once its times in the shared mapping the
    pool processes read (no Redis, no lock: a later signal moves nothing)."""
    WorkerPresence.shutdown_requested = True
    window, margin = WorkerPresence.window
    if window and SHUTDOWN.window_end() is None:
        SHUTDOWN.begin(window, margin)


@signals.worker_shutdown.connect
def on_worker_shutdown(**_: Any) -> None:
    if WorkerPresence.running is not None:
        WorkerPresence.running.finish()


@signals.task_revoked.connect
def on_task_revoked(request: Any = None, terminated: bool = False, **_: Any) -> None:
    """A revoked agent task (queued or terminated) frees its claim by token, without a backoff."""
    task = getattr(request, "task", None) or getattr(request, "name", None)
    task_id = getattr(request, "id", None)
    if task not in ("factory.agent.run", "factory.agent.stage") or not task_id:
        return
    from factory_worker.dispatch.claims import release_task_claim

    try:
        issue = release_task_claim(current(), task_id, reason="interrupted", only_if_queued=True)
        if issue:
            log.info("revoked agent task %s: claim on %s released", task_id, issue)
    except Exception:
        log.warning("could not release the claim of revoked task %s", task_id, exc_info=True)
