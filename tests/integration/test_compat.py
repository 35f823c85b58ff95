"""kombu work-around: a Redis restart must not make a worker exit (see factory_worker/compat.py)."""

from __future__ import annotations

import pytest
from kombu import Connection

from factory_worker.compat import patch_kombu_restore_unacked

pytestmark = pytest.mark.integration


def test_restoring_unacked_on_a_closed_connection_is_skipped_not_fatal(redis_url):
    patch_kombu_restore_unacked()
    with Connection(redis_url) as conn:
        channel = conn.channel()
        channel.qos._delivered["tag-1"] = object()  # a message delivered but not acked
        channel.connection.client = None  # what a dropped broker connection leaves behind
        assert channel.qos.restore_unacked() is None  # unpatched: AttributeError -> worker exits
        channel.qos._delivered.clear()
