"""When an agent task's broker message is acknowledged: on RabbitMQ, once the ledger has recorded its start.

On a Redis broker nothing here changes Celery: agent tasks are acknowledged when the pool accepts them
(``task_acks_late`` off) and the loop's sweep (``loop/sweep.py``) finds a message lost between the pop and
``begin`` by reading kombu's structures.

On RabbitMQ (``amqp://``, ``amqps://``) the agent tasks are late-acknowledged (``acks_late``, set per task by
``app.py``) and :class:`BeginAckRequest` acknowledges each delivery as soon as ``begin`` has answered (the
ledger recorded the start, or said this message runs nothing: a redelivered twin, a stale token):

* a consumer that dies before ``begin`` (SIGKILL, OOM, a lost connection) never acknowledged its delivery, so
  RabbitMQ hands the message to another consumer at once: no Redis list is read, nothing waits for a lease;
* a consumer that dies after ``begin`` acknowledged it, so nothing is redelivered; its claim's lease runs out
  and the gate grants the issue again (a redelivery would find its token begun and run nothing anyway);
* an agent that runs for hours holds no unacknowledged delivery, so RabbitMQ's ``consumer_timeout``
  (30 min by default) never closes the channel under it. While a slot runs an acknowledged agent the
  channel's prefetch is lowered by one (raised again when the task ends), so a full worker keeps at most one
  message reserved rather than one per slot (kombu keeps prefetch >= 1: 0 would mean unlimited).

The acknowledgement must come from the process holding the delivery. With an in-process pool (``-P threads``
or ``solo``, what agent workers run) that is the task's own process: the agent task calls :func:`started`
right after ``begin``. A prefork child cannot reach its parent's channel, so there the parent acknowledges
when the child accepts the task (Celery's early acknowledgement), which leaves the milliseconds between
accept and ``begin`` to the claim's queue lease should the child die in them.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import bootsteps
from celery.worker.request import Request

log = logging.getLogger(__name__)

#: Deliveries accepted by this process's pool and not acknowledged yet, by task id (in-process pools only).
_PENDING: dict[str, BeginAckRequest] = {}
_LOCK = threading.Lock()
#: The consumer's prefetch (kombu ``QoS``), set by :class:`PrefetchStep` when the worker's consumer starts.
_QOS: Any = None
#: Tasks running here whose delivery was acknowledged at their start (each lowers the prefetch by one).
_RUNNING = 0


class BeginAckRequest(Request):
    """A Celery request acknowledged at ``begin`` when its task is late-acknowledged (see the module doc)."""

    _begun_ack = False

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        if self.task.acks_late and not self.acknowledged:
            if pid == os.getpid():  # threads / solo: the task runs here and acknowledges at begin
                with _LOCK:
                    _PENDING[self.id] = self
            else:  # prefork: the child cannot reach this channel
                self._ack_started()
        super().on_accepted(pid, time_accepted)

    def _ack_started(self) -> None:
        global _RUNNING
        super().acknowledge()
        with _LOCK:
            self._begun_ack = True
            _RUNNING += 1
            if _QOS is not None:
                _QOS.decrement_eventually()

    def acknowledge(self) -> None:
        global _RUNNING
        with _LOCK:
            _PENDING.pop(self.id, None)
            if self._begun_ack:  # the task's end, after its start was acknowledged: give the slot back
                self._begun_ack = False
                _RUNNING -= 1
                if _QOS is not None:
                    _QOS.increment_eventually()
                return
        super().acknowledge()

    def reject(self, requeue: bool = False) -> Any:
        with _LOCK:
            _PENDING.pop(self.id, None)
        if self._begun_ack:
            self.acknowledge()
        return super().reject(requeue)


def started(task_id: str) -> None:
    """``begin`` answered for ``task_id``: acknowledge its delivery now if this process holds it (a
    late-acknowledged agent task in an in-process pool); otherwise nothing."""
    with _LOCK:
        req = _PENDING.pop(task_id, None)
    if req is not None and not req.acknowledged:
        req._ack_started()
        log.debug("agent task %s: delivery acknowledged at begin", task_id)


class PrefetchStep(bootsteps.StartStopStep):
    """Keeps the consumer's prefetch (``QoS``) where :class:`BeginAckRequest` can lower and raise it."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        """A (re)started consumer's prefetch starts from its full value: lower it for the tasks running."""
        global _QOS
        with _LOCK:
            _QOS = c.qos
            if _RUNNING:
                _QOS.decrement_eventually(_RUNNING)

    def stop(self, c: Any) -> None:
        global _QOS
        _QOS = None
