"""Flower tells what happened (issue 21, item 4), read from a real Flower over real worker subprocesses: a failed
agent's exception ends with its last output lines (escaped), an interrupted one is REVOKED (not SUCCESS), agent
tasks show the issue id, loop tasks stay off the Tasks page."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from factory_worker.ledger.core import Ledger
from factory_worker.ledger.keys import Keys
from tests.support import CeleryProc, ctl, settings_from, stack_env, wait_until, write_issues

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

AGENT = r"""
import os, sys, time
iid = os.environ["FACTORY_ISSUE_ID"]
if iid == "FL-bad":
    for n in range(30):
        print(f"step {n}")
    print("gcc: error: could not compile widget.c \x1b[31m<b>red</b>\x1b[0m")
    sys.exit(1)
if iid == "FL-slow":
    time.sleep(60)
print("all good")
"""
AUTH = "flower:secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> bytes:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    req.add_header("Authorization", "Basic " + base64.b64encode(AUTH.encode()).decode())
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.read()


def _tasks(port: int) -> dict[str, dict]:
    return json.loads(_get(port, "/api/tasks"))


def _by_issue(tasks: dict[str, dict], issue: str) -> dict | None:
    return next(
        (t for t in tasks.values() if t.get("name") == "factory.agent.run" and issue in (t.get("args") or "")), None
    )


def start_flower(env: dict[str, str], tmp_path: Path, procs: list) -> tuple[int, subprocess.Popen]:
    port = _free_port()
    log = open(tmp_path / "flower.log", "wb")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "factory_worker", "flower", f"--port={port}", "--address=127.0.0.1"],
        env={**env, "FLOWER_BASIC_AUTH": AUTH},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    procs.append(_Stop(flower))

    def up() -> bool:
        try:
            _tasks(port)
            return True
        except OSError:
            return False

    wait_until(up, 30, what="Flower up")
    return port, flower


class _Stop:
    """Lets the ``procs`` fixture end Flower like a CeleryProc."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def kill(self) -> int | None:
        self.proc.kill()
        return self.proc.wait(10)

    stop = kill


def test_flower_shows_failed_interrupted_and_done_agents(redis_url, real_redis, namespace, tmp_path, procs):
    (tmp_path / "flower_agent.py").write_text(AGENT)
    write_issues(
        tmp_path / "issues.jsonl",
        [{"id": i, "title": "t", "state": "ready"} for i in ("FL-ok", "FL-bad", "FL-slow")],
    )
    env = stack_env(
        redis_url,
        namespace,
        tmp_path,
        FACTORY_AGENT__COMMAND=json.dumps([sys.executable, str(tmp_path / "flower_agent.py")]),
        FACTORY_DISPATCH__BACKOFF_BASE_S="30",
        FACTORY_DISPATCH__BACKOFF_MAX_S="30",
    )
    port, _ = start_flower(env, tmp_path, procs)
    # the production layout: an agent worker, a loop worker (loop tasks in its pool) and beat
    procs.append(CeleryProc("worker", env, tmp_path, "agents", extra=["-c", "3"], queues=[f"{namespace}.agents"]))
    procs.append(CeleryProc("worker", env, tmp_path, "loop", extra=["-c", "1"], queues=[f"{namespace}.loop"]))
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    for p in procs[1:]:
        p.wait_ready()
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    wait_until(
        lambda: ledger.explain("FL-ok").state == "done" and ledger.explain("FL-bad").state == "backoff",
        30,
        what="one done, one backing off",
    )
    wait_until(lambda: ledger.explain("FL-slow").state == "in-flight", 10, what="the slow one running")
    res = ctl(env, "kill-loop", "--release-agents", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    wait_until(lambda: ledger.explain("FL-slow").state != "in-flight", 20, what="the slow one released")

    def settled() -> bool:
        tasks = _tasks(port)
        return all(
            (_by_issue(tasks, i) or {}).get("state") in ("SUCCESS", "FAILURE", "REVOKED")
            for i in ("FL-ok", "FL-bad", "FL-slow")
        )

    wait_until(settled, 20, what="Flower saw the three agent tasks end")
    tasks = _tasks(port)
    ok, bad, slow = (_by_issue(tasks, i) for i in ("FL-ok", "FL-bad", "FL-slow"))
    assert ok and bad and slow
    assert ok["state"] == "SUCCESS"
    assert bad["state"] == "FAILURE"
    exc = bad["exception"]
    # the agent's last lines end the text, its escape sequence shown escaped (Flower escapes the HTML itself)
    assert exc.rstrip("')\"").endswith("could not compile widget.c \\\\x1b[31m<b>red</b>\\\\x1b[0m"), exc
    assert "step 29" in exc and "step 19" not in exc  # the last ten lines only
    assert "\x1b" not in exc
    assert slow["state"] == "REVOKED", slow
    # the ledger: an interrupted agent's claim released with no attempt counted
    assert real_redis.hget(Keys(namespace).attempts, "FL-bad") and not real_redis.hget(
        Keys(namespace).attempts, "FL-slow"
    )
    # findable: the issue id first in the shown args; the loop's tasks are not on the page
    assert slow["args"].startswith("['FL-slow'")
    page = _get(port, "/tasks").decode()
    assert 'data-column="args"' in page, "the Tasks page shows the args (FLOWER_TASKS_COLUMNS)"
    assert "Task factory.loop.iteration[" in procs[2].log()  # they ran, in the loop worker's pool
    assert not [t for t in tasks.values() if (t.get("name") or "").startswith("factory.loop.")]
