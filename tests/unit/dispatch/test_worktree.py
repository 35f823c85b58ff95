"""The dispatch with a workspace, without Celery (fakeredis[lua], real git, bare repositories as remotes): the
agent runs in its worktree with the workspace's environment and no credential, the work is published on exit 0
(a push failure is a failed attempt, its retry pushes), the result is recorded with the settle and shown, an
issue without a repository is ruled out, and a staged attempt's stages share one worktree."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from factory_worker.agents import CommandAgent
from factory_worker.context import Context
from factory_worker.dispatch.job import Job
from factory_worker.dispatch.single import execute
from factory_worker.dispatch.staged import run_inline
from factory_worker.ops.metrics import render
from factory_worker.ops.operations import explain
from factory_worker.sources import FileSource
from factory_worker.sources.base import Issue
from factory_worker.sources.rules import Rules
from tests.git_support import git, make_remote, remote_branches, remote_files, remote_log
from tests.support import AGENT_USER, write_issues

SECRET = "ghp_NotForAgents0123456789"
STAGE_AGENT = str(Path(__file__).resolve().parents[2] / "stage_agent.py")

#: what a coding agent does: records its cwd, environment and what it sees, then by argv[2]: "commit" (writes
#: <id>.txt and commits it; nothing when it is there already: a retry continues the branch), "leave" (writes
#: it and leaves it uncommitted), "nothing"; it always writes a result file.
AGENT = r"""
import json, os, pathlib, subprocess, sys
out, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
issue = json.load(open(os.environ["FACTORY_ISSUE_JSON"]))
cwd = pathlib.Path.cwd()
with open(out / "runs.jsonl", "a") as fh:
    fh.write(json.dumps({"issue": issue["id"], "cwd": str(cwd), "env": dict(os.environ),
                         "files": sorted(p.name for p in cwd.iterdir())}) + "\n")
pathlib.Path(os.environ["HOME"], ".toolrc").write_text("a tool's config")
mine = cwd / (issue["id"] + ".txt")
if mode in ("commit", "leave") and not mine.exists():
    mine.write_text(issue["title"] + "\n")
    if mode == "commit":
        git = ["git", "-c", "user.name=agent", "-c", "user.email=agent@example.com"]
        subprocess.run(git + ["add", "-A"], check=True)
        subprocess.run(git + ["commit", "-q", "-m", "agent: " + issue["id"]], check=True)
result = {"summary": "did " + issue["id"], "title": "Fix " + issue["id"], "commit_message": "factory: " + issue["id"],
          "cost_usd": 0.25, "tokens": 100}
open(os.environ["FACTORY_RESULT"], "w").write(json.dumps(result))
"""


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture
def remote(tmp_path):
    path = tmp_path / "widgets.git"
    return path, make_remote(path)


def ws_ctx(fake_redis, make_settings, tmp_path, workspace: dict, issues: list[dict] | None = None, **more) -> Context:
    path = tmp_path / "issues.jsonl"
    write_issues(path, issues or [{"id": "I-1", "title": "one", "state": "ready"}])
    workspace.setdefault("root", str(tmp_path / "ws"))
    s = make_settings(
        source={"path": str(path)},
        dispatch={"max_in_flight": 5, "lease_ttl_s": 10, "queue_lease_s": 10, "backoff_base_s": 1},
        workspace=workspace,
        **more,
    )
    ctx = Context(s, fake_redis, FileSource(path))
    from factory_worker.loop.presence import publish_slots

    publish_slots(ctx, "agents@test", 100)
    return ctx


def runner(ctx: Context, tmp_path: Path, out: Path, mode: str) -> CommandAgent:
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    cfg = ctx.settings.agent.model_copy(update={"command": [sys.executable, str(agent), str(out), mode]})
    return CommandAgent(cfg, 0.5)


def dispatch(ctx: Context, issue: dict, run: CommandAgent, task: str = "task-1") -> dict:
    claim = ctx.ledger.claim([issue["id"]]).claims[0]
    return execute(Job(ctx, task, issue, claim.token, runner=run))


def runs(out: Path) -> list[dict]:
    p = out / "runs.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def test_the_agent_works_in_its_worktree_and_the_factory_pushes(
    fake_redis, make_settings, tmp_path, out, remote, monkeypatch
):
    monkeypatch.setenv("GITHUB_TOKEN", SECRET)  # the worker's credential
    path, url = remote
    ctx = ws_ctx(fake_redis, make_settings, tmp_path, {"repo_url": url, "push": True})
    ctx.ledger.outbox = "1"
    issue = {"id": "I-1", "title": "one", "state": "ready"}
    res = dispatch(ctx, issue, runner(ctx, tmp_path, out, "commit"))
    assert res["settled"] == "done", res
    (run,) = runs(out)
    env, cwd = run["env"], Path(run["cwd"])
    assert env["FACTORY_REPO_DIR"] == str(cwd) and env["FACTORY_BRANCH"] == "factory/I-1"
    assert cwd.parent == tmp_path / "ws" / "trees"
    assert run["files"] == [".git", "README.md"]  # the checkout, and nothing of the factory's
    assert Path(env["FACTORY_ISSUE_JSON"]).parent == cwd.parent  # beside the worktree, not in it
    assert Path(env["FACTORY_RESULT"]).parent == cwd.parent
    assert Path(env["HOME"]).parent == cwd.parent  # a home of its own, not the worktree
    assert SECRET not in json.dumps(env) and "GITHUB_TOKEN" not in env
    assert env["FACTORY_BASE_SHA"] == git(f"--git-dir={path}", "rev-parse", "main")
    assert remote_log(path, "factory/I-1") == ["agent: I-1"]  # exactly its agent's commit
    assert not cwd.exists() and not list((tmp_path / "ws" / "trees").iterdir())  # released
    assert res["workspace"]["pushed"] and res["workspace"]["branch"] == "factory/I-1"
    record = ctx.ledger.result("I-1")
    assert record is not None
    head = remote_branches(path)["factory/I-1"]
    assert record["branch"] == "factory/I-1" and record["head_sha"] == head and record["pushed"] is True
    assert record["summary"] == "did I-1" and record["cost_usd"] == 0.25 and record["tokens"] == 100
    counters = ctx.ledger.counters()
    assert counters["result_cost_microusd"] == 250_000 and counters["result_tokens"] == 100
    metrics = render(ctx)  # the metrics sum them
    assert "factory_agent_cost_usd_total 0.25" in metrics and "factory_agent_tokens_total 100.0" in metrics
    assert "result_cost_microusd" not in metrics
    e = ctx.ledger.explain("I-1")
    assert e.state == "done" and e.detail["result"]["head_sha"] == head and "branch factory/I-1" in e.text
    assert ctx.ledger.entries("done")[0]["result"]["summary"] == "did I-1"  # dispatches --json
    done = [f for _, f in ctx.redis.xrange(ctx.keys.outbox) if f["event"] == "done"]
    assert done and done[0]["summary"] == "did I-1" and done[0]["branch"] == "factory/I-1"


def test_leftovers_are_committed_and_no_changes_is_done_or_failed(fake_redis, make_settings, tmp_path, out, remote):
    path, url = remote
    ctx = ws_ctx(
        fake_redis,
        make_settings,
        tmp_path,
        {"repo_url": url, "push": True},
        [{"id": "I-1", "title": "one", "state": "ready"}, {"id": "I-2", "title": "two", "state": "ready"}],
    )
    assert (
        dispatch(ctx, {"id": "I-1", "title": "one", "state": "ready"}, runner(ctx, tmp_path, out, "leave"))["settled"]
        == "done"
    )
    assert remote_log(path, "factory/I-1") == ["factory: I-1"]  # the result's commit_message
    assert remote_files(path, "factory/I-1") == {"README.md", "I-1.txt"}  # not what it wrote to its HOME
    res = dispatch(ctx, {"id": "I-2", "title": "two", "state": "ready"}, runner(ctx, tmp_path, out, "nothing"))
    assert res["settled"] == "done" and res["workspace"]["no_changes"] is True
    assert ctx.ledger.result("I-2")["no_changes"] is True and "no changes" in ctx.ledger.explain("I-2").text
    assert "factory/I-2" not in remote_branches(path)
    strict = ws_ctx(
        fake_redis,
        make_settings,
        tmp_path,
        {"repo_url": url, "push": True, "no_changes": "fail", "root": str(tmp_path / "ws2")},
        [{"id": "I-3", "title": "three", "state": "ready"}],
        namespace="strict",
    )
    res = dispatch(strict, {"id": "I-3", "title": "three", "state": "ready"}, runner(strict, tmp_path, out, "nothing"))
    assert res["settled"] == "backoff" and res["error"] == "no changes"


def test_a_failed_push_is_a_failed_attempt_and_the_retry_pushes_once(
    fake_redis, make_settings, tmp_path, out, remote, clock
):
    path, url = remote
    hook = path / "hooks" / "pre-receive"  # refuses the first push, accepts the next ones; logs every push
    hook.write_text(
        "#!/bin/sh\n"
        f'echo push >> "{tmp_path}/pushes"\n'
        f'if [ ! -e "{tmp_path}/refused" ]; then touch "{tmp_path}/refused"; echo "no, not now" >&2; exit 1; fi\n'
    )
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    ctx = ws_ctx(fake_redis, make_settings, tmp_path, {"repo_url": url, "push": True})
    issue = {"id": "I-1", "title": "one", "state": "ready"}
    run = runner(ctx, tmp_path, out, "commit")
    res = dispatch(ctx, issue, run)
    assert res["settled"] == "backoff" and res["error"].startswith("publish failed: push: ")
    assert "factory/I-1" in res["error"]  # the commits stay on the branch
    e = ctx.ledger.explain("I-1")
    assert e.state == "backoff" and "publish failed" in e.detail["last_error"]
    assert "factory/I-1" not in remote_branches(path)
    clock.advance(5)  # past the backoff window
    res = dispatch(ctx, issue, run, "task-2")
    assert res["settled"] == "done", res
    assert remote_log(path, "factory/I-1") == ["agent: I-1"]  # the first attempt's commit, continued
    assert (tmp_path / "pushes").read_text().count("push") == 2  # the refused one, and one that went
    assert [r["files"] for r in runs(out)][1] == [".git", "I-1.txt", "README.md"]  # it continued the branch


def test_an_issue_without_a_repository_is_ruled_out_and_explained(fake_redis, make_settings, tmp_path, out, remote):
    _, url = remote
    issues = [
        {"id": "I-1", "title": "one", "state": "ready", "labels": ["widgets"]},
        {"id": "I-2", "title": "two", "state": "ready"},
    ]
    ctx = ws_ctx(fake_redis, make_settings, tmp_path, {"repos": {"widgets": url}}, issues)
    rules = Rules.from_settings(ctx.settings.source, ctx.settings.workspace)
    screened = rules.screen([Issue.model_validate(i) for i in issues])
    assert [i.id for i in screened.issues] == ["I-1"]
    (reason,) = screened.ruled_out
    assert reason.startswith("out of scope: no repository") and "workspace.repos (widgets)" in reason
    e = explain(ctx, "I-2")
    assert e.state == "out-of-scope" and "no repository" in e.text
    assert Rules.from_settings(ctx.settings.source).check(Issue.model_validate(issues[1])) is None  # no workspace
    res = dispatch(ctx, issues[1], runner(ctx, tmp_path, out, "commit"))  # dispatched all the same: never runs
    assert res["settled"] == "backoff" and res["error"].startswith("no repository for this issue: ")
    assert not runs(out)


def test_stages_of_an_attempt_share_one_worktree(fake_redis, make_settings, tmp_path, out, remote, monkeypatch):
    monkeypatch.setenv("AGENT_OUT", str(out))
    path, url = remote
    stages = [
        {"name": "implement", "command": [sys.executable, STAGE_AGENT, "implement", "{id}"]},
        {"name": "review", "command": [sys.executable, STAGE_AGENT, "review", "{id}"], "back_to": "implement"},
    ]
    agent = {
        "log_dir": str(tmp_path / "logs"),
        **AGENT_USER,
        "workdir_root": str(tmp_path / "work"),
        "command": ["true"],
        "stages": stages,
        "env_allowlist": ["PATH", "AGENT_OUT"],
    }
    ctx = ws_ctx(fake_redis, make_settings, tmp_path, {"repo_url": url, "push": True}, agent=agent)
    claim = ctx.ledger.claim(["I-1"]).claims[0]
    assert ctx.ledger.begin("I-1", claim.token) == "started"
    issue = Issue(id="I-1", title="one", state="ready", labels=["reject-once"])
    results = run_inline(ctx, issue, claim.token)
    assert [r["settled"] for r in results] == ["next", "next", "next", "done"]
    recs = [json.loads(x) for x in (out / "stages.jsonl").read_text().splitlines()]
    cwds = {r["cwd"] for r in recs}
    assert len(cwds) == 1 and {r["workdir"] for r in recs} == cwds  # one worktree, FACTORY_WORKDIR too
    assert Path(cwds.pop()).parent == tmp_path / "ws" / "trees"
    assert [r["work"] for r in recs if r["event"] == "read"] == ["round 1\n", "round 1\nround 2\n"]
    assert remote_files(path, "factory/I-1") == {"README.md", "work.txt"}  # the leftovers, committed
    assert remote_log(path, "factory/I-1") == ["one"]  # the issue's title (no result file)
    assert not list((tmp_path / "ws" / "trees").iterdir())  # removed when the attempt ended
    assert ctx.ledger.result("I-1")["pushed"] is True


def test_a_handed_over_worktree_is_kept_by_the_reclaim_while_its_attempt_lives(
    fake_redis, make_settings, tmp_path, remote
):
    _, url = remote
    ctx = ws_ctx(fake_redis, make_settings, tmp_path, {"repo_url": url})
    ws = ctx.workspace
    issue = Issue(id="I-1", title="one", state="ready")
    name = ws.tree_name(issue, 1)
    first = ws.prepare(issue, 1, name=name)
    (first.cwd / "wip.txt").write_text("half done")
    ws.release(first, hand_over=True)
    ctx.redis.hset(ctx.keys.stages("I-1"), "workdir", name)  # the attempt's progress names it
    assert ws.reclaim() == [] and first.cwd.is_dir()
    again = ws.prepare(issue, 1, name=name)  # the next stage
    assert again.cwd == first.cwd and (again.cwd / "wip.txt").read_text() == "half done"
    assert again.continued == "attempt" and again.base_sha == first.base_sha
    ws.release(again, hand_over=True)
    ctx.redis.delete(ctx.keys.stages("I-1"))  # the attempt ended elsewhere
    assert ws.reclaim() == [name] and not first.cwd.exists()
    assert sorted(os.listdir(tmp_path / "ws" / "trees")) == []
