"""factory_worker's broker transports: for Redis kombu's, with one bug worked around; for RabbitMQ
(``amqp://``, ``amqps://``) kombu's py-amqp transport as it is. Selected by ``app.py`` (``broker_transport``),
never patched into kombu globally.

The bug (kombu's Redis transport, seen up to 5.7; upstream: celery/kombu#582 and #970, the same
``AttributeError: 'NoneType' object has no attribute 'hostname'`` on a connection that is already gone):
when the broker connection drops (a Redis restart), Celery closes the consumer connection; closing the
channel restores its unacked messages through a client built from ``channel.connection.client``, which may
already be ``None``. The AttributeError is not a connection error, so Celery treats it as unrecoverable and
the worker exits (our Redis-restart chaos test saw it ~1 run in 5). Nothing needs restoring right then:
the messages stay in kombu's unacked hash and come back through ``restore_visible`` after the visibility
timeout, and the ledger re-dispatches their issues after the lease anyway. So :class:`QoS` skips that
restore with a warning and the worker reconnects.

Version guard: the subclass is used for the kombu versions it was tested against (:data:`TESTED_UP_TO`);
on a newer kombu :func:`transport_for` returns ``None`` (stock transport) and logs why, so an upstream fix
or a changed ``QoS`` is never papered over.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import kombu
from kombu.transport import redis as kredis

from factory_worker.config.urls import parse_sentinel_url

log = logging.getLogger(__name__)

#: Newest kombu (major, minor) this work-around was checked against.
TESTED_UP_TO = (5, 7)
#: Broker URL schemes served by this module's transports.
SCHEMES = ("redis", "sentinel")
#: RabbitMQ: kombu's py-amqp transports (TLS for ``amqps``).
AMQP_TRANSPORTS = {"amqp": "kombu.transport.pyamqp:Transport", "amqps": "kombu.transport.pyamqp:SSLTransport"}


class QoS(kredis.QoS):
    """kombu's Redis QoS, except that restoring unacked messages on a closed connection is skipped."""

    def restore_unacked(self, client: Any = None) -> Any:
        if client is None and getattr(self.channel.connection, "client", None) is None:
            log.warning(
                "broker connection already closed: %d unacked message(s) will be restored by the "
                "visibility timeout instead",
                len(self._delivered),
            )
            return None
        return super().restore_unacked(client)


class Channel(kredis.Channel):
    QoS = QoS


class Transport(kredis.Transport):
    Channel = Channel


class SentinelChannel(kredis.SentinelChannel):
    QoS = QoS


class SentinelTransport(kredis.SentinelTransport):
    Channel = SentinelChannel


def broker_options(broker_url: str) -> tuple[str, dict[str, object]]:
    """kombu's broker URL and extra transport options for ``broker_url``: a factory_worker
    ``sentinel://hosts/<master>/<db>`` URL becomes kombu's ``sentinel://h1:p1/db;sentinel://h2:p2/db`` with
    the master's name (and the sentinels' password) as transport options; any other URL is kept."""
    if not broker_url.startswith("sentinel://"):
        return broker_url, {}
    target = parse_sentinel_url(broker_url)
    return target.kombu_url(), target.transport_options()


def amqp_transport(broker_url: str) -> str | None:
    """kombu's py-amqp transport for a RabbitMQ URL (``amqp://``; TLS for ``amqps://``), named rather than left
    to kombu's scheme aliases; None for any other URL."""
    return AMQP_TRANSPORTS.get(urlsplit(broker_url).scheme)


def transport_for(broker_url: str, version: tuple[int, ...] | None = None) -> str | None:
    """The ``broker_transport`` setting for ``broker_url``: this module's transport, or None (stock)."""
    scheme = urlsplit(broker_url).scheme
    if scheme not in SCHEMES:
        return None
    v = tuple(version or kombu.VERSION[:2])
    if v[:2] > TESTED_UP_TO:
        log.warning(
            "kombu %s is newer than the %s the broker work-around was tested with: using kombu's "
            "own Redis transport (see factory_worker/transport.py)",
            ".".join(map(str, v)),
            ".".join(map(str, TESTED_UP_TO)),
        )
        return None
    return f"{__name__}:{'SentinelTransport' if scheme == 'sentinel' else 'Transport'}"
