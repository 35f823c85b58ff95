"""The Celery app, configured from settings: JSON only, two namespaced queues, prefetch 1, events on; the
broker Redis or RabbitMQ (agent tasks acknowledged at ``begin`` there: :mod:`factory_worker.worker.acks`).

``celery -A factory_worker worker|beat|flower`` finds it as ``factory_worker.worker.app``. Importing this module
never exits: a bad setting is kept in :data:`CONFIG_ERROR` and the worker and beat entry points print it
as one line and exit 2 (see :func:`_refuse_bad_config`). The settings object is not stored in
``app.conf`` (Flower's Config tab and ``celery inspect conf`` show it): tasks get it from
:func:`factory_worker.context.current`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery import Celery, signals
from kombu import Exchange, Queue

import beat_schedule
from factory_worker.config.settings import ConfigError, Settings, load_settings
from factory_worker.config.urls import is_amqp
from factory_worker.ledger.keys import Keys
from factory_worker.worker import tasks  # noqa: F401  (registers the shared tasks)
from factory_worker.worker.acks import PrefetchStep
from factory_worker.worker.lane import LoopLane
from factory_worker.worker.lifecycle import WorkerPresence
from factory_worker.worker.transport import amqp_transport, broker_options, transport_for

log = logging.getLogger(__name__)


#: The agent tasks (late-acknowledged on RabbitMQ, at begin: :mod:`factory_worker.worker.acks`).
AGENT_TASKS = ("factory.agent.run", "factory.agent.stage")


def loop_queue(namespace: str) -> str:
    """The queue of the loop's tasks: :attr:`Keys.loop_queue`."""
    return Keys(namespace).loop_queue


def agent_queue(namespace: str) -> str:
    """The queue of agent tasks: :attr:`Keys.agent_queue`."""
    return Keys(namespace).agent_queue


def celery_config(settings: Settings) -> dict[str, object]:
    """The Celery settings for ``settings``; the one place a task's queue is chosen (``task_routes``)."""
    visibility = settings.worker.visibility_timeout_s
    loop_q, agent_q = loop_queue(settings.namespace), agent_queue(settings.namespace)
    broker, transport_options = broker_options(settings.effective_broker_url)
    amqp = is_amqp(broker)
    return {
        "broker_url": broker,
        "broker_transport": transport_for(broker) or amqp_transport(broker),
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_queues": [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in (loop_q, agent_q)],
        "task_default_queue": loop_q,
        "task_routes": {"factory.agent.*": {"queue": agent_q}, "factory.loop.*": {"queue": loop_q}},
        "worker_prefetch_multiplier": 1,
        # The ledger, not the broker, decides re-dispatch: a lost agent message is re-claimed after the
        # lease TTL; a redelivered one finds its token stale and does nothing.
        "task_acks_late": False,
        # RabbitMQ: an agent task's delivery is acknowledged once begin answered (worker/acks.py), so a
        # consumer that dies before begin has its message redelivered by RabbitMQ, and an agent running for
        # hours holds no delivery RabbitMQ's consumer_timeout would time out.
        "task_annotations": {name: {"acks_late": True} for name in AGENT_TASKS} if amqp else None,
        "broker_transport_options": (
            {"confirm_publish": True}  # a publish returns once RabbitMQ has the message
            if amqp
            else {"visibility_timeout": visibility, **transport_options}
        ),
        "worker_send_task_events": True,
        "task_send_sent_event": False,  # one message per dispatch, not two; Flower sees received/started
        # Bounds a *cold* shutdown (SIGQUIT, second Ctrl-C); a warm shutdown (SIGTERM) is bounded by the
        # agents' shutdown deadline (lifecycle.py), since Celery waits for running tasks without a limit.
        "worker_soft_shutdown_timeout": settings.worker.soft_shutdown_s,
        "worker_enable_soft_shutdown_on_idle": False,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "beat_schedule": beat_schedule.build(settings),
        "beat_scheduler": "factory_worker.worker.lifecycle:BeatScheduler",
        "timezone": "UTC",
    }


#: The columns of Flower's Tasks page (``celery -A factory_worker flower`` imports this module before Flower reads
#: its ``FLOWER_*`` environment; set ``FLOWER_TASKS_COLUMNS`` to choose others): Flower 2.x shows no args by
#: default, and the args are where an agent task shows its issue id.
FLOWER_TASKS_COLUMNS = "name,state,args,exception,received,runtime,worker,uuid"
os.environ.setdefault("FLOWER_TASKS_COLUMNS", FLOWER_TASKS_COLUMNS)

#: The configuration error found at import, if any (the entry points report it and exit 2).
CONFIG_ERROR: ConfigError | None = None


def create_app(settings: Settings | None = None) -> Celery:
    """The Celery app; never exits (a bad setting is recorded in :data:`CONFIG_ERROR`)."""
    global CONFIG_ERROR
    app = Celery("factory_worker", set_as_current=True)
    if settings is None:
        try:
            settings = load_settings()
        except ConfigError as exc:
            CONFIG_ERROR = exc
    if settings is not None:
        app.conf.update(celery_config(settings))
    app.steps["worker"].add(WorkerPresence)
    app.steps["worker"].add(LoopLane)  # a worker of both queues runs the loop outside its pool
    app.steps["consumer"].add(PrefetchStep)
    return app


def _refuse_bad_config(**_: Any) -> None:
    """Worker and beat start: a bad setting is one line on stderr and exit 2, not a traceback."""
    if CONFIG_ERROR is not None:
        print(f"factory_worker: {CONFIG_ERROR}", file=sys.__stderr__, flush=True)  # beat redirects sys.stderr
        sys.exit(2)


signals.celeryd_init.connect(_refuse_bad_config, weak=False)
signals.beat_init.connect(_refuse_bad_config, weak=False)

app = create_app()
