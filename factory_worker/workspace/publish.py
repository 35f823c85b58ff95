"""Publishing a dispatch's work: commit what the agent left (as the agent), push the branch (as the worker),
open or update the issue's pull request.

* **Leftovers** (:func:`commit_leftovers`, ``workspace.commit_uncommitted``): git runs *as the agent's uid/gid*
  with a minimal environment (no credential, no global or system config, hooks off), its repository pinned
  to the dispatch's admin directory and the mirror (``GIT_DIR``, ``GIT_COMMON_DIR``, ``GIT_WORK_TREE``), so
  a ``.git`` the agent replaced is not followed and nothing it wrote is run with the worker's rights. The
  commit message is the result's ``commit_message`` (else the issue's title), given on stdin; author and
  committer are the factory (``workspace.commit_name`` / ``commit_email``). Only while the worktree is still on
  its branch.
* **Push** (:func:`push`): ``git push origin refs/heads/<b>:refs/heads/<b>`` from the mirror, never forced (a
  branch someone else moved is a failed attempt, not overwritten), with the worker's credential.
* **Pull request** (:func:`pull_request_text`, :mod:`.pulls`): title from the result or the issue, body with
  the summary and ``Closes #N`` for an issue of the GitHub source's repository.
"""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory_worker.workspace.git import Git

if TYPE_CHECKING:
    from factory_worker.config.settings import SourceSettings, WorkspaceSettings
    from factory_worker.sources.base import Issue
    from factory_worker.workspace.git import Credential
    from factory_worker.workspace.result import ResultFile
    from factory_worker.workspace.trees import Owner, Tree

log = logging.getLogger(__name__)

MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"
MAX_BODY_CHARS = 60_000


def identity_env(settings: WorkspaceSettings) -> dict[str, str]:
    name, email = settings.commit_name, settings.commit_email
    return {
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_COMMITTER_NAME": name,
        "GIT_COMMITTER_EMAIL": email,
    }


def agent_git_env(tree: Tree, mirror: Path, settings: WorkspaceSettings) -> tuple[dict[str, str], dict[str, str]]:
    """(the base environment, the additions) of git run as the agent on its worktree: nothing of the worker's."""
    base = {"PATH": MINIMAL_PATH}
    extra = {
        "GIT_DIR": str(tree.admin),
        "GIT_COMMON_DIR": str(mirror),
        "GIT_WORK_TREE": str(tree.path),
        "HOME": str(tree.path),
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_CONFIG_NOSYSTEM": "1",
        **identity_env(settings),
    }
    return base, extra


def commit_leftovers(
    git: Git, tree: Tree, mirror: Path, branch: str, owner: Owner | None, message: str, settings: WorkspaceSettings
) -> bool:
    """Commit every change the agent left in its worktree on ``branch``, as the agent; True when it did."""
    if not tree.path.is_dir():
        return False
    try:
        head = (tree.admin / "HEAD").read_text().strip()
    except OSError:
        return False
    if head != f"ref: refs/heads/{branch}":
        log.warning(
            "worktree %s is not on %s any more (%s): its uncommitted changes are not committed",
            tree.path,
            branch,
            head[:80],
        )
        return False
    environ, env = agent_git_env(tree, mirror, settings)

    def run(args: list[str], what: str, **more: Any) -> subprocess.CompletedProcess[str]:
        return git.run(args, environ=environ, env=env, user=owner, cwd=tree.path, what=f"{what} (as the agent)", **more)

    run(["add", "--all"], "add")
    if run(["diff", "--cached", "--quiet"], "diff", check=False).returncode == 0:
        return False  # nothing left uncommitted
    run(["commit", "--quiet", "--no-verify", "--no-gpg-sign", "-F", "-"], "commit", input=message)
    return True


def push(git: Git, mirror: Path, branch: str, credential: Credential | None) -> None:
    """Push ``branch`` to the remote (fast-forward only)."""
    ref = f"refs/heads/{branch}"
    git.run(
        ["push", "--porcelain", "origin", f"{ref}:{ref}"],
        git_dir=mirror,
        network=True,
        credential=credential,
        what=f"push of {branch}",
    )


def commit_message(result: ResultFile | None, issue: Issue) -> str:
    text = result.commit_message if result is not None and result.commit_message else None
    if not text or not text.strip():
        text = f"{_one_line(issue.title) or 'factory-worker'}\n\nfactory-worker: issue {_one_line(issue.id)}"
    return text.strip() + "\n"


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:limit]


def pull_request_text(
    result: ResultFile | None, issue: Issue, branch: str, pr_repo: str, source: SourceSettings | None
) -> tuple[str, str]:
    """(title, body) of the issue's pull request."""
    title = (result.title if result is not None and result.title else None) or _one_line(issue.title, 256)
    title = title or f"factory-worker: issue {_one_line(issue.id, 100)}"
    summary = result.summary.strip() if result is not None and result.summary else ""
    parts = [summary[:MAX_BODY_CHARS] or f"Work on issue {_one_line(issue.id, 100)} by factory-worker."]
    if source is not None and source.kind == "github" and source.github_repo and re.fullmatch(r"[0-9]{1,12}", issue.id):
        ref = f"#{issue.id}" if source.github_repo.lower() == pr_repo.lower() else f"{source.github_repo}#{issue.id}"
        parts.append(f"Closes {ref}")
    parts.append(f"<sub>factory-worker, branch `{branch}`</sub>")
    return title, "\n\n".join(parts)
