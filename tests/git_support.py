"""Real git for the workspace tests: bare repositories as remotes (``file://``), an agent that commits in its
worktree (as its own uid when the test runs as root), and what a remote's branches hold."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from factory_worker.config.settings import load_settings
from factory_worker.sources.base import Issue
from factory_worker.workspace import Prepared, Workspace

NOBODY = (65534, 65534)
GIT_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "seed",
    "GIT_AUTHOR_EMAIL": "seed@example.com",
    "GIT_COMMITTER_NAME": "seed",
    "GIT_COMMITTER_EMAIL": "seed@example.com",
    "HOME": "/nonexistent",
}


def git(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, user: tuple[int, int] | None = None
) -> str:
    kw: dict = {}
    if user is not None and user != (os.geteuid(), os.getegid()):
        kw = {"user": user[0], "group": user[1], "extra_groups": []}
    res = subprocess.run(
        ["git", *args], cwd=cwd, env={**GIT_ENV, **(env or {})}, capture_output=True, text=True, timeout=60, **kw
    )
    if res.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {res.returncode}: {res.stderr.strip()}")
    return res.stdout.strip()


def make_remote(path: Path, files: dict[str, str] | None = None, branch: str = "main") -> str:
    """A bare repository at ``path`` with one commit of ``files`` on ``branch``; its ``file://`` URL."""
    git("init", "--quiet", "--bare", f"--initial-branch={branch}", str(path))
    seed = path.with_name(path.name + ".seed")
    git("init", "--quiet", f"--initial-branch={branch}", str(seed))
    for name, text in (files or {"README.md": "hello\n"}).items():
        (seed / name).parent.mkdir(parents=True, exist_ok=True)
        (seed / name).write_text(text)
    git("add", "--all", cwd=seed)
    git("commit", "--quiet", "-m", "initial", cwd=seed)
    git("push", "--quiet", str(path), f"{branch}:{branch}", cwd=seed)
    return f"file://{path}"


def remote_branches(remote: Path) -> dict[str, str]:
    out = git(f"--git-dir={remote}", "for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads")
    return dict(line.split(" ", 1) for line in out.splitlines() if line)


def remote_log(remote: Path, branch: str) -> list[str]:
    """Subjects of ``branch``'s commits beyond ``main``, newest first."""
    return git(f"--git-dir={remote}", "log", "--format=%s", branch, "^main").splitlines()


def remote_files(remote: Path, branch: str) -> set[str]:
    return set(git(f"--git-dir={remote}", "ls-tree", "-r", "--name-only", branch).splitlines())


def agent_commits(p: Prepared, files: dict[str, str], message: str, owner: tuple[int, int] | None = None) -> None:
    """What a coding agent does: write files in its cwd and commit them on its branch (as ``owner``)."""
    for name, text in files.items():
        path = p.cwd / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if owner is not None:
            os.chown(path, *owner)
    env = {"GIT_AUTHOR_NAME": "agent", "GIT_COMMITTER_NAME": "agent", "HOME": str(p.cwd), **p.env}
    git("add", "--all", cwd=p.cwd, env=env, user=owner)
    git("commit", "--quiet", "-m", message, cwd=p.cwd, env=env, user=owner)


def workspace(tmp_path: Path, environ: dict[str, str] | None = None, http=None, **ws) -> Workspace:
    """A Workspace under ``tmp_path/ws`` with these ``workspace.*`` settings."""
    ws.setdefault("root", str(tmp_path / "ws"))
    source = ws.pop("source", None) or {}
    keep = ws.pop("keep", False)
    settings = load_settings(
        workspace=ws,
        source=source,
        agent={"log_dir": str(tmp_path / "logs"), "command": ["true"], "keep_workdir": keep},
    )
    return Workspace.from_settings(settings, environ=environ, http=http)


def issue(issue_id: str, title: str = "Do the thing", labels: tuple[str, ...] = (), body: str = "") -> Issue:
    return Issue(id=issue_id, title=title, state="ready", labels=list(labels), body=body)
