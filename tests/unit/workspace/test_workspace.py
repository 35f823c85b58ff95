"""The workspace with real git: bare repositories as remotes (``file://``), agents that commit in their
worktrees, the fake GitHub for pull requests. No Celery, no Redis."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import httpx
import pytest

from factory_worker.workspace import PublishError, Unroutable, WorkspaceError
from factory_worker.workspace import git as gitmod
from tests.fake_github import FakeGitHub
from tests.git_support import (
    NOBODY,
    agent_commits,
    git,
    issue,
    make_remote,
    remote_branches,
    remote_files,
    remote_log,
    workspace,
)

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the agent as another uid")


@pytest.fixture
def open_dir():
    """A directory other users can traverse (pytest's tmp_path is 0700 under root)."""
    path = Path(tempfile.mkdtemp(prefix="fw-workspace-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def remote(tmp_path):
    path = tmp_path / "widgets.git"
    make_remote(path, {"README.md": "widgets\n", "src/app.py": "print('hi')\n"})
    return path


def test_each_issue_branch_holds_its_agents_commit(tmp_path, remote):
    ws = workspace(tmp_path, repo_url=f"file://{remote}", push=True)
    for n in range(4):
        i = issue(str(n), title=f"issue {n}")
        p = ws.prepare(i, 1)
        assert p.cwd.is_dir() and (p.cwd / "README.md").read_text() == "widgets\n"
        assert p.env["FACTORY_BRANCH"] == f"factory/{n}" and p.env["FACTORY_REPO_DIR"] == str(p.cwd)
        assert git("rev-parse", "HEAD", cwd=p.cwd) == p.base_sha == p.env["FACTORY_BASE_SHA"]
        agent_commits(p, {f"work{n}.txt": f"{n}\n"}, f"agent work {n}")
        out = ws.publish(p, i)
        ws.release(p)
        assert out.pushed and out.commits == 1 and out.new_commits == 1 and not out.no_changes
        assert out.head_sha == remote_branches(remote)[f"factory/{n}"]
    branches = remote_branches(remote)
    assert sorted(branches) == ["factory/0", "factory/1", "factory/2", "factory/3", "main"]
    for n in range(4):
        assert remote_log(remote, f"factory/{n}") == [f"agent work {n}"]
        assert f"work{n}.txt" in remote_files(remote, f"factory/{n}")
        assert not {f"work{m}.txt" for m in range(4) if m != n} & remote_files(remote, f"factory/{n}")


def test_two_worktrees_of_one_repository_never_see_each_others_files(tmp_path, remote):
    ws = workspace(tmp_path, repo_url=f"file://{remote}")
    a, b = ws.prepare(issue("A"), 1), ws.prepare(issue("B"), 1)
    assert a.cwd != b.cwd and a.mirror == b.mirror
    (a.cwd / "only-a.txt").write_text("a")
    (a.cwd / "README.md").write_text("changed by a")
    agent_commits(b, {"only-b.txt": "b"}, "b's work")
    assert not (b.cwd / "only-a.txt").exists() and (b.cwd / "README.md").read_text() == "widgets\n"
    assert not (a.cwd / "only-b.txt").exists()
    assert git("status", "--porcelain", cwd=b.cwd) == ""
    out_a = ws.publish(a, issue("A"))
    assert out_a.committed_leftovers and out_a.commits == 1
    assert git("show", "--stat", "--format=%an", out_a.head_sha, cwd=a.cwd).splitlines()[0] == "factory-worker"
    for p in (a, b):
        ws.release(p)


def test_routing_by_label_lands_in_the_other_repository(tmp_path, remote):
    docs = tmp_path / "docs.git"
    make_remote(docs, {"index.md": "docs\n"})
    ws = workspace(tmp_path, repo_url=f"file://{remote}", repos={"Docs": f"file://{docs}"}, push=True)
    i = issue("7", labels=("docs",))
    p = ws.prepare(i, 1)
    assert (p.cwd / "index.md").exists() and not (p.cwd / "README.md").exists()
    agent_commits(p, {"new.md": "x"}, "docs work")
    ws.publish(p, i)
    ws.release(p)
    assert "factory/7" in remote_branches(docs) and "factory/7" not in remote_branches(remote)


def test_an_issue_without_a_repository_is_refused_with_a_reason(tmp_path, remote):
    ws = workspace(tmp_path, repos={"docs": f"file://{remote}"})
    assert ws.route(issue("1")).url is None
    with pytest.raises(Unroutable) as exc:
        ws.prepare(issue("1", labels=("bug",)), 1)
    assert "workspace.repos (docs)" in exc.value.reason and not list((tmp_path / "ws").glob("mirrors/*.git"))


def test_an_unreachable_repository_is_one_clear_error(tmp_path):
    ws = workspace(tmp_path, repo_url=f"file://{tmp_path}/missing.git", network_timeout_s=20)
    with pytest.raises(WorkspaceError) as exc:
        ws.prepare(issue("1"), 1)
    text = str(exc.value)
    assert "\n" not in text and "clone of file://" in text and "missing.git" in text
    assert not list((tmp_path / "ws" / "mirrors").glob("*.git*"))  # no half clone left behind


def test_a_failing_push_then_a_retry_that_pushes_once(tmp_path, remote):
    hooks = remote / "hooks"
    (hooks / "pre-receive").write_text(f"#!/bin/sh\nif [ ! -e {tmp_path}/open ]; then echo closed >&2; exit 1; fi\n")
    (hooks / "post-receive").write_text(f"#!/bin/sh\ncat >> {tmp_path}/pushes\n")
    for h in ("pre-receive", "post-receive"):
        os.chmod(hooks / h, 0o755)
    ws = workspace(tmp_path, repo_url=f"file://{remote}", push=True)
    i = issue("9")
    p = ws.prepare(i, 1)
    agent_commits(p, {"one.txt": "1"}, "first attempt")
    with pytest.raises(PublishError) as exc:
        ws.publish(p, i)
    assert (
        exc.value.stage == "push" and "closed" in str(exc.value) and "the commits stay on factory/9" in str(exc.value)
    )
    ws.release(p)
    assert "factory/9" not in remote_branches(remote) and not (tmp_path / "pushes").exists()
    (tmp_path / "open").write_text("")
    retry = ws.prepare(i, 2)
    assert retry.continued == "local" and (retry.cwd / "one.txt").exists()  # the unpushed commit is kept
    agent_commits(retry, {"two.txt": "2"}, "second attempt")
    out = ws.publish(retry, i)
    ws.release(retry)
    assert out.pushed and out.commits == 2 and out.new_commits == 1
    assert remote_log(remote, "factory/9") == ["second attempt", "first attempt"]
    assert len((tmp_path / "pushes").read_text().splitlines()) == 1  # one push reached the remote


def test_a_retried_issue_continues_its_pushed_branch(tmp_path, remote):
    i = issue("5")
    first = workspace(tmp_path / "w1", repo_url=f"file://{remote}", push=True)  # another worker pushed it
    p = first.prepare(i, 1)
    agent_commits(p, {"a.txt": "a"}, "attempt 1")
    first.publish(p, i)
    first.release(p)
    other = workspace(tmp_path / "w2", repo_url=f"file://{remote}", push=True)
    q = other.prepare(i, 2)
    assert q.continued == "remote" and (q.cwd / "a.txt").read_text() == "a"
    agent_commits(q, {"b.txt": "b"}, "attempt 2")
    out = other.publish(q, i)
    other.release(q)
    assert out.new_commits == 1 and remote_log(remote, "factory/5") == ["attempt 2", "attempt 1"]


def test_no_changes(tmp_path, remote):
    ws = workspace(tmp_path, repo_url=f"file://{remote}", push=True)
    p = ws.prepare(issue("n"), 1)
    out = ws.publish(p, issue("n"))
    ws.release(p)
    assert out.no_changes and not out.pushed and out.failure is None and "factory/n" not in remote_branches(remote)
    strict = workspace(tmp_path, repo_url=f"file://{remote}", push=True, no_changes="fail")
    p = strict.prepare(issue("n"), 2)
    out = strict.publish(p, issue("n"))
    strict.release(p)
    assert out.failure == "no changes" and out.as_record()["no_changes"] is True


def test_the_result_file_is_read_and_a_bad_one_is_not_fatal(tmp_path, remote):
    ws = workspace(tmp_path, repo_url=f"file://{remote}")
    p = ws.prepare(issue("r"), 1)
    result = p.result_path
    assert result.parent == p.cwd.parent and not result.is_relative_to(p.cwd)  # not committed with the work
    result.write_text('{"summary": "s", "commit_message": "feat: the agent says", "cost_usd": 1.5, "tokens": 10}')
    (p.cwd / "left.txt").write_text("left")
    out = ws.publish(p, issue("r"))
    ws.release(p)
    assert out.result and out.result.tokens == 10 and out.as_record()["cost_usd"] == 1.5
    assert git(f"--git-dir={p.mirror}", "log", "-1", "--format=%s", out.head_sha) == "feat: the agent says"
    q = ws.prepare(issue("q"), 1)
    q.result_path.write_text("{broken")
    (q.cwd / "x.txt").write_text("x")
    out = ws.publish(q, issue("q"))
    ws.release(q)
    assert out.result is None and out.result_problem.startswith("FACTORY_RESULT: not JSON") and out.commits == 1


def test_nothing_is_left_after_release(tmp_path, remote):
    ws = workspace(tmp_path, repo_url=f"file://{remote}")
    ps = [ws.prepare(issue(f"i{n}"), 1) for n in range(3)]
    for p in ps:
        (p.cwd / "junk").mkdir()
        (p.cwd / "junk" / "f").write_text("x")
        ws.release(p)
        ws.release(p)  # twice is once
    trees = tmp_path / "ws" / "trees"
    assert sorted(x.name for x in trees.iterdir()) == []
    assert not list((ps[0].mirror / "worktrees").iterdir())
    assert git(f"--git-dir={ps[0].mirror}", "worktree", "list").count("\n") == 0  # the bare mirror alone


def test_a_kept_worktree_stays_and_the_next_attempt_still_runs(tmp_path, remote):
    ws = workspace(tmp_path, repo_url=f"file://{remote}", keep=True)
    p = ws.prepare(issue("k"), 1)
    ws.release(p)
    assert p.cwd.is_dir() and p.tree.kept_path.exists() and not p.tree.lock_path.exists()
    assert ws.reclaim() == []  # kept on purpose: never reclaimed
    q = ws.prepare(issue("k"), 2)
    assert q.cwd != p.cwd and git("rev-parse", "--abbrev-ref", "HEAD", cwd=q.cwd) == "factory/k"
    ws.release(q, keep=False)
    assert not q.cwd.exists() and p.cwd.exists()


def test_reclaim_touches_only_the_factorys_dead_worktrees(tmp_path, remote):
    ws = workspace(tmp_path, repo_url=f"file://{remote}")
    live = ws.prepare(issue("live"), 1)
    mine = tmp_path / "my-own-worktree"
    git(f"--git-dir={live.mirror}", "worktree", "add", "--quiet", str(mine), "refs/remotes/origin/main")
    other_process = workspace(tmp_path, repo_url=f"file://{remote}")  # another slot, same root
    assert other_process.reclaim() == []
    assert live.cwd.is_dir() and mine.is_dir() and (live.mirror / "worktrees" / "my-own-worktree").is_dir()
    ws.release(live)
    assert mine.is_dir()


def test_many_slots_share_one_cold_mirror(tmp_path, remote):
    ws = workspace(tmp_path, repo_url=f"file://{remote}")
    results, errors = [], []

    def slot(n: int) -> None:
        try:
            results.append(ws.prepare(issue(f"s{n}"), 1))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=slot, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 6
    assert [m.name for m in (tmp_path / "ws" / "mirrors").glob("*.git*")] == [results[0].mirror.name]
    assert len({p.cwd for p in results}) == 6
    for p in results:
        ws.release(p)


def test_git_argv_never_carries_issue_text(tmp_path, remote, monkeypatch):
    seen: list[tuple[list[str], dict[str, str]]] = []
    real = subprocess.Popen

    def spy(argv, *a, **kw):
        seen.append((list(argv), dict(kw.get("env") or {})))
        return real(argv, *a, **kw)

    monkeypatch.setattr(gitmod.subprocess, "Popen", spy)
    ws = workspace(tmp_path, repo_url=f"file://{remote}", push=True)
    i = issue("EVIL; rm -rf / #1", title="$(touch /tmp/pwned) `id`", body="--upload-pack=touch /tmp/x")
    p = ws.prepare(i, 1)
    (p.cwd / "f.txt").write_text("x")
    ws.publish(p, i)
    ws.release(p)
    assert seen
    for argv, env in seen:
        text = " ".join(argv)
        assert "EVIL; rm" not in text and "touch" not in text and "--upload-pack" not in text
        assert env.get("GIT_TERMINAL_PROMPT") == "0"
    assert any(p.branch in " ".join(argv) for argv, _ in seen) and " " not in p.branch


@as_root
def test_a_root_the_agent_cannot_reach_is_refused(tmp_path, remote):
    ws = workspace(tmp_path, repo_url=f"file://{remote}")
    with pytest.raises(WorkspaceError, match="is not searchable by uid 65534: chmod o"):
        ws.prepare(issue("u0"), 1, *NOBODY)


@as_root
def test_the_worktree_belongs_to_the_agent_who_can_commit_in_it(open_dir, remote):
    ws = workspace(open_dir, repo_url=f"file://{remote}", push=True)
    i = issue("u1")
    p = ws.prepare(i, 1, *NOBODY)
    for path in (p.cwd, p.cwd / "README.md", p.cwd / "src" / "app.py", p.tree.admin, p.tree.admin / "index"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == NOBODY, path
    assert p.cwd.stat().st_mode & 0o777 == 0o700
    assert p.mirror.stat().st_uid == 0 and (p.mirror / "config").stat().st_uid == 0  # not the agent's
    heads = p.mirror / "refs" / "heads"
    assert (heads / "factory").stat().st_mode & 0o020 and (heads / "factory").stat().st_gid == NOBODY[1]
    assert not heads.stat().st_mode & 0o022  # its own namespace only: refs/heads itself stays the worker's
    agent_commits(p, {"by-agent.txt": "x"}, "agent's own commit", owner=NOBODY)
    leftover = p.cwd / "left.txt"
    subprocess.run(
        ["sh", "-c", f"echo left > {leftover}"], user=NOBODY[0], group=NOBODY[1], extra_groups=[], check=True
    )
    subprocess.run(
        ["sh", "-c", f"echo '{{\"tokens\": 3}}' > {p.result_path}"],
        user=NOBODY[0],
        group=NOBODY[1],
        extra_groups=[],
        check=True,
    )
    out = ws.publish(p, i)
    assert out.committed_leftovers and out.commits == 2 and out.result and out.result.tokens == 3
    assert remote_log(remote, "factory/u1") == ["Do the thing", "agent's own commit"]
    head_object = p.mirror / "objects" / out.head_sha[:2] / out.head_sha[2:]
    assert head_object.stat().st_uid == NOBODY[0]  # the leftovers were committed by git running as the agent
    # the agent cannot write the mirror's config, hooks or the worker's objects
    for target in (
        p.mirror / "config",
        p.mirror / "hooks" / "pre-push",
        p.mirror / "refs" / "remotes" / "origin" / "main",
    ):
        r = subprocess.run(
            ["sh", "-c", f"echo x >> {target}"], user=NOBODY[0], group=NOBODY[1], extra_groups=[], capture_output=True
        )
        assert r.returncode != 0, target
    subprocess.run(["chmod", "000", str(p.cwd / "src")], user=NOBODY[0], group=NOBODY[1], extra_groups=[], check=True)
    ws.release(p)
    assert not p.cwd.exists() and not p.tree.admin.exists()


def test_pull_request_once_per_issue_through_publish(tmp_path, remote):
    with FakeGitHub("acme/widgets") as gh:
        gh.branches = lambda b: b in remote_branches(remote)
        gh.drop_every = 3
        client = httpx.Client(timeout=5)
        ws = workspace(
            tmp_path,
            environ={"GITHUB_TOKEN": "tok"},
            http=client,
            repo_url=f"file://{remote}",
            push=True,
            github_repo="acme/widgets",
            github_api_url=gh.url,
            source={"kind": "github", "github_repo": "acme/widgets", "github_labels": ["agent"]},
        )
        for attempt in (1, 2):
            for n in (11, 12, 13):
                i = issue(str(n), title=f"Issue {n}")
                p = ws.prepare(i, attempt)
                agent_commits(p, {f"f{n}-{attempt}.txt": "x"}, f"work {n}.{attempt}")
                p.result_path.write_text(f'{{"title": "PR {n} v{attempt}", "summary": "did {n}"}}')
                out = ws.publish(p, i)
                ws.release(p)
                assert out.pr_url and out.pr_number
        assert gh.dropped >= 2 and len(gh.pulls) == 3
        for n in (11, 12, 13):
            (pr,) = gh.open_pulls(f"factory/{n}")
            assert pr.title == f"PR {n} v2" and pr.base == "main"
            assert f"did {n}" in pr.body and f"Closes #{n}" in pr.body


def test_a_repository_cloned_empty_gets_its_default_branch_later(tmp_path):
    remote = tmp_path / "empty.git"
    git("init", "--quiet", "--bare", "--initial-branch=main", str(remote))
    ws = workspace(tmp_path, repo_url=f"file://{remote}")
    with pytest.raises(WorkspaceError, match="no default branch"):
        ws.prepare(issue("e"), 1)
    seed = tmp_path / "seed"
    git("clone", "--quiet", str(remote), str(seed))
    (seed / "f").write_text("x")
    git("add", "f", cwd=seed)
    git("commit", "--quiet", "-m", "first", cwd=seed)
    git("push", "--quiet", "origin", "HEAD:main", cwd=seed)
    p = ws.prepare(issue("e"), 2)
    assert (p.cwd / "f").exists() and p.base == "main"
    ws.release(p)


def test_a_live_dispatch_of_the_same_branch_is_refused(tmp_path, remote):
    ws = workspace(tmp_path, repo_url=f"file://{remote}")
    p = ws.prepare(issue("dup"), 1)
    with pytest.raises(WorkspaceError, match="in use by another worktree"):
        workspace(tmp_path, repo_url=f"file://{remote}").prepare(issue("dup"), 1)
    ws.release(p)
