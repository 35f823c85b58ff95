"""RabbitMQ as the broker (issue 26): a real RabbitMQ on 127.0.0.1:5672, a vhost of the test run's own
(tests/conftest.py ``amqp_broker``), real workers. The chaos tests (test_chaos.py) run on it too (``STACKS``);
these check what only RabbitMQ's semantics give: an agent task's delivery is acknowledged at begin."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from factory_worker.context import Context
from factory_worker.ledger.keys import Keys
from factory_worker.ops.embedded import free_port
from tests.conftest import roomy_fleet
from tests.delay_proxy import DelayProxy
from tests.rabbit import queue_counts
from tests.support import STACK, CeleryProc, ctl, read_events, settings_from, stack_env, wait_until, write_issues

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

AMQP_POOLS = pytest.mark.parametrize("stack", ["threads+amqp", "prefork+amqp"], indirect=True)


def starts(tmp_path, issue=None):
    return [
        e for e in read_events(tmp_path / "out") if e["event"] == "start" and (issue is None or e["issue"] == issue)
    ]


@AMQP_POOLS
def test_running_agents_hold_no_unacknowledged_delivery(stack, redis_url, real_redis, namespace, tmp_path, procs):
    """Agents running for as long as they like leave nothing unacknowledged: RabbitMQ's consumer_timeout
    (30 min by default) has no delivery to time out, and the channel stays open."""
    write_issues(
        tmp_path / "issues.jsonl",
        [{"id": f"U-{n}", "title": "t", "state": "ready", "labels": ["slow"]} for n in range(2)],
    )
    env = stack_env(redis_url, namespace, tmp_path)
    w1 = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "2"], queues=[Keys(namespace).agent_queue])
    procs.append(w1)
    w1.wait_ready()
    assert ctl(env, "run-once", "--json").returncode == 0
    wait_until(lambda: len(starts(tmp_path)) == 2, 20, what="both agents started")
    wait_until(
        lambda: queue_counts(STACK.broker_url, Keys(namespace).agent_queue) == (0, 0), 10, what="no unacked delivery"
    )
    assert "consumer_timeout" not in w1.log() and "PRECONDITION_FAILED" not in w1.log()


@AMQP_POOLS
def test_a_message_a_killed_worker_held_runs_at_once_on_another(
    stack, redis_url, real_redis, namespace, tmp_path, procs
):
    """w1 (one slot) runs one agent and holds the next message reserved; SIGKILLed, that message goes back to
    RabbitMQ (never acknowledged) and starts on w2 at once: no Redis list is read, no lease waited for (the
    queue lease is an hour), and it starts once."""
    issues = [{"id": f"R-{n}", "title": "t", "state": "ready", "labels": ["slow-once"]} for n in range(2)]
    write_issues(tmp_path / "issues.jsonl", issues)
    env = stack_env(redis_url, namespace, tmp_path, FACTORY_DISPATCH__LEASE_TTL_S="60")
    keys = Keys(namespace)
    roomy_fleet(real_redis, keys)  # room for both claims while only w1 consumes
    w1 = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "1"], queues=[keys.agent_queue])
    procs.append(w1)
    w1.wait_ready()
    assert ctl(env, "run-once", "--json").returncode == 0
    first = wait_until(lambda: starts(tmp_path), 20, what="w1's agent start")[0]
    wait_until(lambda: queue_counts(STACK.broker_url, keys.agent_queue) == (0, 1), 10, what="w1 holds the next")
    held = next(i["id"] for i in issues if i["id"] != first["issue"])

    w1.kill()
    w2 = CeleryProc("worker", env, tmp_path, "w2", extra=["-c", "1"], queues=[keys.agent_queue])
    procs.append(w2)
    w2.wait_ready()
    wait_until(lambda: starts(tmp_path, held), 15, what=f"{held} started on w2")
    ctx = Context(settings_from(env), real_redis)
    assert ctx.ledger.explain(first["issue"]).state == "in-flight"  # begun on w1: its lease decides, not a redelivery
    assert len(starts(tmp_path, held)) == 1
    assert len(starts(tmp_path, first["issue"])) == 1


@pytest.mark.parametrize("stack", ["threads+amqp"], indirect=True)
def test_a_worker_killed_before_begin_answered_leaves_its_message_to_rabbitmq(
    stack, redis_server, real_redis, namespace, tmp_path, procs
):
    """The delivery is acknowledged once the ledger recorded the start, not when the pool accepted the task:
    w1 reaches the ledger through a proxy that holds its commands, so its begin never lands; the message stays
    unacknowledged, w1 is SIGKILLed, and RabbitMQ hands it to w2, which starts the agent at once (the claim's
    queue lease, an hour, is never waited for). (A prefork child cannot acknowledge: its parent does at accept,
    see worker/acks.py.)"""
    write_issues(tmp_path / "issues.jsonl", [{"id": "B-1", "title": "t", "state": "ready"}])
    proxy = DelayProxy("127.0.0.1", redis_server.port, delay_s=0).start()
    try:
        env = stack_env(redis_server.url, namespace, tmp_path)
        proxied = {**env, "FACTORY_REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0"}
        keys = Keys(namespace)
        w1 = CeleryProc("worker", proxied, tmp_path, "w1", extra=["-c", "1"], queues=[keys.agent_queue])
        procs.append(w1)
        w1.wait_ready()
        proxy.hold()
        assert ctl(env, "run-once", "--json").returncode == 0
        wait_until(lambda: "factory.agent.run" in w1.log(), 10, what="w1 received the task")
        time.sleep(1.0)
        assert queue_counts(STACK.broker_url, keys.agent_queue) == (0, 1)  # accepted, begin pending: unacked
        assert not starts(tmp_path)
        w1.kill()
    finally:
        proxy.stop()  # what w1 sent is dropped with its connection
    w2 = CeleryProc("worker", env, tmp_path, "w2", extra=["-c", "1"], queues=[keys.agent_queue])
    procs.append(w2)
    w2.wait_ready()
    ctx = Context(settings_from(env), real_redis)
    wait_until(lambda: ctx.ledger.explain("B-1").state == "done", 20, what="B-1 done on w2")
    assert [e["issue"] for e in starts(tmp_path)] == ["B-1"]


@pytest.mark.parametrize("stack", ["threads+amqp"], indirect=True)
def test_flower_shows_agent_tasks_through_rabbitmq(stack, redis_url, real_redis, namespace, tmp_path, procs):
    """Flower, on the RabbitMQ broker, sees the agent task from the worker's events: received, then SUCCESS."""
    pytest.importorskip("flower")
    write_issues(tmp_path / "issues.jsonl", [{"id": "FL-1", "title": "t", "state": "ready"}])
    env = stack_env(redis_url, namespace, tmp_path)
    w1 = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "2"])
    procs.append(w1)
    w1.wait_ready()
    port = free_port()
    flower_env = {**env, "FLOWER_UNAUTHENTICATED_API": "true"}
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "factory_worker", "flower", "--address=127.0.0.1", f"--port={port}"],
        env=flower_env,
        stdout=open(tmp_path / "flower.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def tasks() -> dict:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tasks", timeout=2) as resp:
                    return json.load(resp)
            except OSError:
                return {}

        wait_until(lambda: tasks() is not None and _flower_up(port), 30, what="flower up")
        time.sleep(2.0)  # flower's event consumer connects
        assert ctl(env, "run-once", "--json").returncode == 0
        seen = wait_until(
            lambda: [
                t for t in tasks().values() if t.get("name") == "factory.agent.run" and t.get("state") == "SUCCESS"
            ],
            30,
            what="the agent task's SUCCESS in Flower",
        )
        assert "FL-1" in seen[0]["args"]
    finally:
        os.killpg(flower.pid, signal.SIGKILL)
        flower.wait(10)


def _flower_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False
