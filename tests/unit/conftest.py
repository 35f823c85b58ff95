"""Fixtures of the unit tests of the loop, the agent task, loop control and operations."""

from __future__ import annotations

import pytest

from factory_worker.context import Context
from factory_worker.loop.presence import publish_slots
from factory_worker.sources import FileSource
from tests.support import write_issues


@pytest.fixture
def issues_file(tmp_path):
    p = tmp_path / "issues.jsonl"
    write_issues(
        p,
        [{"id": f"I-{n}", "title": f"t{n}", "state": "ready"} for n in range(5)]
        + [{"id": "B-1", "title": "b", "state": "blocked"}],
    )
    return p


@pytest.fixture
def ctx(fake_redis, make_settings, issues_file):
    s = make_settings(
        source={"path": str(issues_file)}, dispatch={"max_in_flight": 3, "lease_ttl_s": 10, "queue_lease_s": 10}
    )
    ctx = Context(s, fake_redis, FileSource(issues_file))
    publish_slots(ctx, "agents@test", 100)  # a live agent worker with room: the cap is what binds here
    return ctx
