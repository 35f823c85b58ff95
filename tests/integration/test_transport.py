"""kombu work-around: a Redis restart must not make a worker exit (see factory_worker/transport.py)."""

from __future__ import annotations

import pytest
from kombu import Connection

from factory_worker.config.settings import load_settings
from factory_worker.worker.app import celery_config
from factory_worker.worker.transport import transport_for

pytestmark = pytest.mark.integration


def _closed_channel(conn: Connection):
    channel = conn.channel()
    channel.qos._delivered["tag-1"] = object()  # a message delivered but not acked
    channel.connection.client = None  # what a dropped broker connection leaves behind
    return channel


def test_restoring_unacked_on_a_closed_connection_is_skipped_not_fatal(redis_url):
    with Connection(redis_url, transport=transport_for(redis_url)) as conn:
        channel = _closed_channel(conn)
        assert channel.qos.restore_unacked() is None  # stock kombu: AttributeError -> worker exits
        channel.qos._delivered.clear()


def test_stock_kombu_still_has_the_bug_the_transport_works_around(redis_url):
    with Connection(redis_url) as conn:
        channel = _closed_channel(conn)
        with pytest.raises(AttributeError):
            channel.qos.restore_unacked()
        channel.qos._delivered.clear()


def test_the_transport_is_selected_in_config_with_a_version_guard():
    url = "redis://127.0.0.1:6379/0"
    assert (
        celery_config(load_settings(redis_url=url))["broker_transport"] == "factory_worker.worker.transport:Transport"
    )
    assert transport_for(url, (99, 0)) is None  # an untested kombu gets its own transport
    assert transport_for("sentinel://h:26379/0") == "factory_worker.worker.transport:SentinelTransport"
    assert transport_for("amqp://guest@h//") is None  # not ours: kombu's own
