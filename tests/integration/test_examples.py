"""The examples as ``scripts/run-example.sh`` starts them (``factory-worker up`` with its settings), on a real
Redis, worker and beat: the three-stage pipeline (``FACTORY_EXAMPLE=pipeline``) runs every stage as written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from factory_worker.context import Context
from tests.support import ROOT, factory_env, settings_from, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.timeout(180)]


def test_the_pipeline_example_triages_implements_reviews_and_escalates(redis_url, real_redis, namespace, tmp_path):
    """What run-example.sh exports for FACTORY_EXAMPLE=pipeline (FACTORY_CONFIG=examples/pipeline.toml, the
    example issues), in a copy of examples/ so the paths are the worker's: EX-2 is implemented twice (the
    review rejects once), EX-1 (docs) is not reviewed, EX-8 (security) is escalated to a human with no
    attempt counted, and the blocked and done examples are never dispatched."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = factory_env(
        {
            "FACTORY_REDIS_URL": redis_url,
            "FACTORY_NAMESPACE": namespace,
            "FACTORY_CONFIG": str(tmp_path / "examples" / "pipeline.toml"),
            "FACTORY_SOURCE__PATH": str(tmp_path / "examples" / "issues.jsonl"),
            "FACTORY_AGENT__LOG_DIR": str(tmp_path / "logs"),
            "FACTORY_AGENT__WORKDIR_ROOT": str(tmp_path / "work"),
            "FACTORY_LOOP__INTERVAL_S": "1",
            "FACTORY_WORKER__SOFT_SHUTDOWN_S": "2",
            "FACTORY_AGENT__ENV_ALLOWLIST": json.dumps(["PATH", "LANG", "FACTORY_AGENT_SLEEP_S"]),
            "FACTORY_AGENT_SLEEP_S": "0",
        }
    )
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "factory_worker.ctl", "up", "--no-flower"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ctx = Context(settings_from(env), real_redis)
    try:

        def settled() -> bool:
            done = dict(ctx.ledger.done_markers())
            return {"EX-1", "EX-2"} <= set(done) and ctx.ledger.explain("EX-8").state == "parked"

        wait_until(lambda: settled() or proc.poll() is not None, 90, what="the example issues settled")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        explained = ctx.ledger.explain("EX-8")
        assert "needs-human" in explained.text and explained.detail.get("attempts") == 0
        for never in ("EX-5", "EX-6"):  # blocked / already done in the source
            assert ctx.redis.hget(ctx.keys.fences, never) is None
        runs = {d.name: len(list(d.glob("stage-*.log"))) for d in (tmp_path / "logs").iterdir()}  # one per stage run
        assert runs["EX-2"] == 5  # triage, implement, review (rejects), implement, review
        assert runs["EX-1"] == 2 and runs["EX-8"] == 1  # docs: no review; security: triage only, escalated
        assert "EX-5" not in runs and "EX-6" not in runs
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(60)
    assert code == 0, log_path.read_text()[-3000:]


def test_the_repository_example_pushes_one_branch_per_issue(redis_url, real_redis, namespace, tmp_path):
    """What run-example.sh exports for FACTORY_EXAMPLE=repo, with no network: examples/repo/make_remote.py makes
    the local bare remote, each ready issue's agent (examples/repo/agent.py) commits its note in a worktree,
    the factory pushes each branch; the always-failing one and those not ready push nothing."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    remote = tmp_path / ".factory" / "example-remote.git"
    url = subprocess.run(
        [sys.executable, "examples/repo/make_remote.py", str(remote)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert url == f"file://{remote}"
    env = factory_env(
        {
            "FACTORY_REDIS_URL": redis_url,
            "FACTORY_NAMESPACE": namespace,
            "FACTORY_SOURCE__PATH": str(tmp_path / "examples" / "issues.jsonl"),
            "FACTORY_AGENT__COMMAND": json.dumps([sys.executable, "examples/repo/agent.py"]),
            "FACTORY_AGENT__LOG_DIR": str(tmp_path / "logs"),
            "FACTORY_AGENT__WORKDIR_ROOT": str(tmp_path / "work"),
            "FACTORY_WORKSPACE__REPO_URL": url,
            "FACTORY_WORKSPACE__PUSH": "true",
            "FACTORY_WORKSPACE__ROOT": str(tmp_path / ".factory" / "workspace"),
            "FACTORY_LOOP__INTERVAL_S": "1",
            "FACTORY_WORKER__SOFT_SHUTDOWN_S": "2",
        }
    )
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "factory_worker.ctl", "up", "--no-flower"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ctx = Context(settings_from(env), real_redis)
    ready = [f"EX-{n}" for n in (1, 2, 3, 4, 8, 9, 10, 11, 12)]
    try:
        wait_until(
            lambda: set(ready) <= set(dict(ctx.ledger.done_markers())) or proc.poll() is not None,
            90,
            what="the example issues done",
        )
        assert proc.poll() is None, log_path.read_text()[-3000:]
        branches = git_out(remote, "for-each-ref", "--format=%(refname:short)", "refs/heads").split()
        assert sorted(branches) == sorted(["main", *(f"factory/{i}" for i in ready)])
        for issue in ready:
            assert git_out(remote, "log", "--format=%s", f"factory/{issue}", "^main").splitlines() == [
                f"Add a note for {issue}"
            ]
        note = git_out(remote, "show", "factory/EX-8:notes/EX-8.md")
        assert note.startswith("# $(touch /tmp/pwned); touch /tmp/pwned2")  # the title, as data
        assert ctx.ledger.result("EX-1")["pushed"] is True
        assert ctx.ledger.explain("EX-7").state in ("backoff", "parked")  # it exits 1: nothing pushed
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(60)
    assert code == 0, log_path.read_text()[-3000:]
    assert not list((tmp_path / ".factory" / "workspace" / "trees").iterdir())


def git_out(remote, *args: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={remote}", *args], capture_output=True, text=True, check=True
    ).stdout.strip()
