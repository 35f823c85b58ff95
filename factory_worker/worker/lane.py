"""The loop lane: a worker that consumes both queues runs the loop's tasks outside its pool.

Why (issue 21): with the loop's tasks in the pool, ``celery -A factory_worker worker -c 1`` (the one-line command
on a 1-CPU host) gives its one process to an agent and the loop waits the agent's whole run: its heartbeat goes
stale and no issue is dispatched until the agent ends. Keeping one process for the loop would leave a ``-c 1``
worker with no agent slot. So :class:`LoopLane`, a worker bootstep, takes ``<ns>.loop`` off the worker's own
consumer when the worker consumes ``<ns>.agents`` too, and consumes it in one thread of the worker's main process
with its own broker connection, running each loop task through Celery's own tracer (its signals, its chain:
the next iteration or ``finish`` is sent as from the pool). Loop tasks are short (a poll, a gate, a few sends),
one run at a time (the loop lease), so one thread is enough; every pool process is an agent slot
(:func:`factory_worker.worker.lifecycle.agent_slots`). A loop-only worker (``-Q <ns>.loop``) runs them in its
pool as before. A countdown (``eta``) is held here, unacknowledged, until due: a worker that dies holding one
gives it back through the broker's visibility timeout. The worker's revoke list is honoured before a task runs.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from datetime import datetime
from typing import Any

from celery import bootsteps
from celery.app.trace import build_tracer

from factory_worker.context import current

log = logging.getLogger(__name__)

#: loop messages held at once (countdowns waiting included): far more than a run ever has in flight
PREFETCH = 8
#: the longest the thread waits on the broker before it looks at its countdowns and its stop flag again (s)
POLL_S = 0.5


def lane_queue(worker: Any) -> str | None:
    """The loop queue when ``worker`` consumes it and the agent queue (then the lane runs it), else None."""
    try:
        keys = current().keys
    except Exception:  # a bad configuration: the worker's own check refuses to start
        return None
    consumed = set(worker.app.amqp.queues.consume_from)
    return keys.loop_queue if {keys.loop_queue, keys.agent_queue} <= consumed else None


class LoopLane(bootsteps.StartStopStep):
    """Worker bootstep: the loop queue consumed by one thread of the main process (see the module doc)."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.queue = lane_queue(parent)
        self.thread: LaneThread | None = None
        if self.queue is not None:  # before the consumer starts: it never takes a loop message
            queues = parent.app.amqp.queues
            queues.select([name for name in queues.consume_from if name != self.queue])

    def start(self, parent: Any) -> None:
        if self.queue is not None:
            self.thread = LaneThread(parent.app, self.queue, getattr(parent, "hostname", None) or "")
            self.thread.start()
            log.info("loop lane: %s is consumed outside the pool (every pool process is an agent slot)", self.queue)

    def stop(self, parent: Any) -> None:
        if self.thread is not None:
            self.thread.stop()


class LaneThread(threading.Thread):
    """Consumes one queue and runs its tasks in this thread, one at a time, through Celery's tracer."""

    def __init__(self, app: Any, queue: str, hostname: str) -> None:
        super().__init__(name="factory-loop-lane", daemon=True)
        self.app, self.queue_name, self.hostname = app, queue, hostname
        self.closing = threading.Event()
        self.held: list[tuple[float, int, Any, Any]] = []  # (due, seq, body, message): countdowns
        self._seq = itertools.count()
        self._tracers: dict[str, Any] = {}

    def stop(self, timeout: float = 5.0) -> None:
        self.closing.set()
        self.join(timeout)

    def run(self) -> None:
        failing = False
        while not self.closing.is_set():
            try:
                self._consume()
                failing = False
            except Exception as exc:
                if not failing:  # one line per outage, not one per retry
                    log.warning("loop lane: broker connection failed (%s: %s); retrying", type(exc).__name__, exc)
                failing = True
                self.held.clear()  # unacknowledged: the broker gives them back
                self.closing.wait(1.0)

    def _consume(self) -> None:
        queue = self.app.amqp.queues[self.queue_name]
        with self.app.connection_for_read() as conn:
            with conn.Consumer([queue], callbacks=[self._on_message], accept=["json"], prefetch_count=PREFETCH):
                while not self.closing.is_set():
                    self._run_due()
                    try:
                        conn.drain_events(timeout=self._wait_s())
                    except TimeoutError:
                        pass

    def _wait_s(self) -> float:
        if not self.held:
            return POLL_S
        return min(POLL_S, max(0.01, self.held[0][0] - time.time()))

    def _run_due(self) -> None:
        while self.held and self.held[0][0] <= time.time() and not self.closing.is_set():
            _, _, body, message = heapq.heappop(self.held)
            self._execute(body, message)

    def _on_message(self, body: Any, message: Any) -> None:
        due = _eta(message.headers.get("eta"))
        if due is not None and due > time.time():
            heapq.heappush(self.held, (due, next(self._seq), body, message))
            return
        self._execute(body, message)

    def _execute(self, body: Any, message: Any) -> None:
        from celery.worker import state

        headers = message.headers
        task_id, name = headers.get("id"), headers.get("task")
        message.ack()  # as the pool does (task_acks_late is off): the loop's records decide what runs again
        task = self.app.tasks.get(name)
        if task is None or not task_id:
            log.error("loop lane: discarded a message of unknown task %r (id %r)", name, task_id)
            return
        if task_id in state.revoked:
            log.info("loop lane: task %s[%s] was revoked; not run", name, task_id)
            return
        args, kwargs, embed = body
        request = {
            **headers,
            "args": args,
            "kwargs": kwargs,
            "hostname": self.hostname,
            "is_eager": False,
            "delivery_info": {"routing_key": message.delivery_info.get("routing_key"), "exchange": ""},
            **(embed or {}),
        }
        tracer = self._tracers.get(name)
        if tracer is None:
            tracer = self._tracers[name] = build_tracer(name, task, hostname=self.hostname, app=self.app)
        try:
            tracer(task_id, args, kwargs, request)  # logs, signals, the chain's next task; never raises
        except Exception:
            log.exception("loop lane: task %s[%s] could not be traced", name, task_id)


def _eta(value: Any) -> float | None:
    """A message's ``eta`` header (ISO 8601) as a Unix time; None when absent or unreadable (run it now)."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None
