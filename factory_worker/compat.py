"""Work-arounds for third-party bugs that would break factory_worker's guarantees. Applied by app.py.

kombu's Redis transport: when the broker connection drops (a Redis restart), Celery closes the consumer
connection; closing the channel restores its unacked messages through a client built from
``channel.connection.client``, which may already be gone. The resulting AttributeError is not a
connection error, so Celery treats it as unrecoverable and the worker exits (seen in our Redis-restart
chaos test, ~1 run in 5). Nothing needs restoring right then: those messages stay in kombu's unacked
hash and are restored by ``restore_visible`` after the visibility timeout, and the ledger re-dispatches
their issues after the lease TTL anyway. So the restore is skipped with a warning and the worker
reconnects.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)

_applied = False


def patch_kombu_restore_unacked() -> None:
    """Make ``kombu.transport.redis.QoS.restore_unacked`` skip a channel whose connection is gone."""
    global _applied
    if _applied:
        return
    from kombu.transport import redis as kredis

    original = kredis.QoS.restore_unacked

    @functools.wraps(original)
    def restore_unacked(self: Any, client: Any = None) -> Any:
        if client is None and getattr(self.channel.connection, "client", None) is None:
            log.warning("broker connection already closed: %d unacked message(s) will be restored by the "
                        "visibility timeout instead", len(self._delivered))
            return None
        return original(self, client)

    kredis.QoS.restore_unacked = restore_unacked
    _applied = True
