"""One error type: every client's error is an :class:`HttpError` with ``retry_after``, ``permanent``, ``status``."""

from __future__ import annotations

import pytest

from factory_worker.chat.slack import SlackError
from factory_worker.net import HttpError
from factory_worker.sources.linear_api import LinearError
from factory_worker.workspace.pulls import PullRequestError
from factory_worker.writeback.events import DeliveryError


@pytest.mark.parametrize("cls", [HttpError, DeliveryError, LinearError, SlackError, PullRequestError])
def test_every_clients_error_is_the_one_type(cls):
    exc = cls("POST /x: HTTP 429", retry_after=3.0, permanent=False, status=429)
    assert isinstance(exc, HttpError) and str(exc) == "POST /x: HTTP 429"
    assert (exc.retry_after, exc.permanent, exc.status) == (3.0, False, 429)
    bare = cls("no answer")
    assert (bare.retry_after, bare.permanent, bare.status) == (None, False, None)
