"""The beat schedule of factory_worker, read by the Celery app (``factory_worker.worker.app``).

One entry: ``factory.loop.kickoff`` every ``FACTORY_LOOP__INTERVAL_S`` seconds. Run exactly one beat;
a second one is harmless (kickoffs SKIP while a run is live) but doubles the kickoff traffic.
"""

from __future__ import annotations

from typing import Any


def build(settings: Any) -> dict[str, dict[str, Any]]:
    interval = float(settings.loop.interval_s)
    return {
        "factory-loop-kickoff": {
            "task": "factory.loop.kickoff",
            "schedule": interval,
            "kwargs": {"by": "beat"},
            # A kickoff older than one interval is useless: the next one is already due.
            # (its queue comes from the app's task_routes, like every task's)
            "options": {"expires": max(1.0, interval)},
        }
    }
