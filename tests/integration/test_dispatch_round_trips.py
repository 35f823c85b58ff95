"""Redis round trips per dispatch on the worker, against a real redis-server (no Celery: the task sends are
recorded, as in ``benchmarks/dispatch_cpu_bench.py``).

A round trip is one write of commands to a connection (a pipeline is one): counted at redis-py's
``Connection.send_packed_command``. A single agent costs 4: ``begin``, the settle (its clean-up and the refill's
first backlog pop ride in it), the refill's claim and its ``queue_tasks``. A two-stage dispatch costs 9:
``begin``, the stage ``open`` and the hand-over's clean-up; per stage its ``start`` and its ``next`` or settle
(the clean-up riding in it); then the refill's claim and ``queue_tasks``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from redis.connection import Connection

from factory_worker.context import Context
from factory_worker.dispatch.job import Job
from factory_worker.dispatch.single import execute
from factory_worker.dispatch.staged import run_stage
from factory_worker.loop.iteration import dispatch_claims
from factory_worker.loop.presence import publish_slots
from factory_worker.sources import FileSource
from factory_worker.sources.base import Issue
from tests.support import AGENT_USER

pytestmark = [pytest.mark.integration]

N = 20


def _ctx(make_settings, redis_url: str, tmp_path: Path, staged: bool) -> tuple[Context, list[Issue]]:
    issues = [Issue(id=f"D-{i:03d}", title="t", state="ready") for i in range(N + 10)]
    path = tmp_path / "issues.jsonl"
    path.write_text("".join(i.model_dump_json() + "\n" for i in issues))
    agent: dict[str, Any] = {
        "command": ["true"],
        "log_dir": str(tmp_path / "l"),
        "workdir_root": str(tmp_path / "w"),
        **AGENT_USER,
    }
    if staged:
        agent["stages"] = [{"name": "implement", "command": ["true"]}, {"name": "review", "command": ["true"]}]
    s = make_settings(redis_url=redis_url, source={"path": str(path)}, dispatch={"max_in_flight": 4}, agent=agent)
    ctx = Context(s, source=FileSource(path))
    publish_slots(ctx, "bench", 4)
    ctx.redis.rpush(ctx.keys.backlog, *[i.model_dump_json() for i in issues[1:]])
    return ctx, issues


@pytest.mark.parametrize("staged,most", [(False, 4), (True, 9)])
def test_round_trips_per_dispatch(real_redis, redis_url, make_settings, tmp_path, monkeypatch, staged, most):
    ctx, issues = _ctx(make_settings, redis_url, tmp_path, staged)
    agents: list[tuple[str, Issue, Any]] = []
    stages: list[tuple[str, Issue, str, str, int]] = []

    def send(task_id: str, issue: Issue, claim: Any, run_id: str | None, producer: Any = None) -> None:
        agents.append((task_id, issue, claim))

    def send_stage(task_id: str, issue: Issue, token: str, stage: str, step: int, run_id: str | None) -> None:
        stages.append((task_id, issue, token, stage, step))

    first = ctx.ledger.claim([issues[0].id], fleet_slots=True)
    dispatch_claims(ctx, send, first.claims, {issues[0].id: issues[0]}, "r")

    def one() -> None:
        task_id, issue, claim = agents.pop(0)
        job = Job(ctx, task_id, issue.as_json_dict(), claim.token, "r", "h", send=send, send_stage=send_stage)
        res = execute(job)
        while stages:
            t, i, token, stage, step = stages.pop(0)
            res = run_stage(
                Job(ctx, t, i.as_json_dict(), token, "r", "h", send=send, send_stage=send_stage, stage=stage, step=step)
            )
        assert res["settled"] == "done" and agents, res  # done, and the freed slot refilled

    for _ in range(3):  # scripts loaded, connection made
        one()
    trips = [0]
    real = Connection.send_packed_command

    def counted(self: Connection, *args: Any, **kwargs: Any) -> None:
        trips[0] += 1
        real(self, *args, **kwargs)

    monkeypatch.setattr(Connection, "send_packed_command", counted)
    for _ in range(N):
        one()
    monkeypatch.undo()
    assert trips[0] / N <= most, f"{trips[0] / N} round trips per dispatch (at most {most})"
    assert json.loads(ctx.redis.lindex(ctx.keys.backlog, 0))["id"] == f"D-{N + 4:03d}"  # one refill each
