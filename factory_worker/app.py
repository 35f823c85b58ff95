"""The Celery app, configured from settings: JSON only, two queues, prefetch 1, events on.

``celery -A factory_worker worker|beat|flower`` finds it as ``factory_worker.app``. A bad setting stops
the process with one line naming the field (exit 2), not a traceback.
"""

from __future__ import annotations

import logging
import sys

from celery import Celery
from kombu import Exchange, Queue

import beat_schedule

from .compat import patch_kombu_restore_unacked
from .config import ConfigError, Settings, load_settings

log = logging.getLogger(__name__)

LOOP_QUEUE = "factory.loop"
AGENT_QUEUE = "factory.agents"


def celery_config(settings: Settings) -> dict[str, object]:
    visibility = settings.worker.visibility_timeout_s
    return {
        "broker_url": settings.effective_broker_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_queues": [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in (LOOP_QUEUE, AGENT_QUEUE)],
        "task_default_queue": LOOP_QUEUE,
        "task_routes": {"factory.agent.*": {"queue": AGENT_QUEUE}, "factory.loop.*": {"queue": LOOP_QUEUE}},
        "worker_prefetch_multiplier": 1,
        # The ledger, not the broker, decides re-dispatch: a lost agent message is re-claimed after the
        # lease TTL; a redelivered one finds its token stale and does nothing.
        "task_acks_late": False,
        "broker_transport_options": {"visibility_timeout": visibility},
        "worker_send_task_events": True,
        "task_send_sent_event": False,  # one message per dispatch, not two; Flower sees received/started
        # Bounds a *cold* shutdown (SIGQUIT, second Ctrl-C); a warm shutdown (SIGTERM) is bounded by the
        # agents' shutdown deadline (signals.py), since Celery waits for running tasks without a limit.
        "worker_soft_shutdown_timeout": settings.worker.soft_shutdown_s,
        "worker_enable_soft_shutdown_on_idle": False,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "beat_schedule": beat_schedule.build(settings),
        "timezone": "UTC",
    }


def create_app(settings: Settings | None = None) -> Celery:
    patch_kombu_restore_unacked()
    if settings is None:
        try:
            settings = load_settings()
        except ConfigError as exc:
            print(f"factory_worker: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    app = Celery("factory_worker", set_as_current=True)
    app.conf.update(celery_config(settings))
    app.conf.factory_settings = settings
    return app


app = create_app()

from . import signals, tasks  # noqa: E402,F401  (register the tasks and signal receivers)
