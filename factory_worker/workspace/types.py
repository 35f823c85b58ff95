"""What the workspace hands the dispatch: :class:`Prepared` (a worktree ready for its agent) and
:class:`Published` (what became of the work), and its errors (each message one line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory_worker.workspace.locks import HeldLock
from factory_worker.workspace.result import ResultFile
from factory_worker.workspace.trees import Owner, Tree


class WorkspaceError(Exception):
    """The workspace could not be made or published; the message is one line (shown as the attempt's error)."""


class Unroutable(WorkspaceError):
    """No repository for this issue (``reason``, from the settings only): rule it out, do not retry it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PublishError(WorkspaceError):
    """Pushing or the pull request failed (``stage``: ``push`` / ``pull-request``): a failed attempt, retried
    with backoff; the branch keeps its commits in the mirror, and the next attempt continues it."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage


@dataclass
class Prepared:
    """One dispatch's worktree, ready for its agent: run it in :attr:`cwd` with :attr:`env` added."""

    issue_id: str
    url: str
    branch: str
    base: str  # the base branch (or commit) name
    base_sha: str
    start_sha: str  # where the branch was when the agent got it (a continued branch: its earlier commits)
    #: "base" (a new branch), "local" (this worker's earlier attempt), "remote" (the pushed branch), "attempt"
    #: (the worktree an earlier stage of this staged attempt made)
    continued: str
    attempt: int
    tree: Tree
    mirror: Path
    owner: Owner | None
    lock: HeldLock = field(repr=False)
    released: bool = False

    @property
    def cwd(self) -> Path:
        return self.tree.path

    @property
    def result_path(self) -> Path:
        return self.tree.result_path

    @property
    def home(self) -> Path:
        """A ``HOME`` for the agent beside the worktree (what its tools write there is never committed)."""
        return self.tree.home

    @property
    def env(self) -> dict[str, str]:
        """What the agent's environment gains (never a credential); ``FACTORY_ISSUE_JSON`` is beside the
        worktree, not in it."""
        return {
            "FACTORY_REPO_DIR": str(self.tree.path),
            "FACTORY_BRANCH": self.branch,
            "FACTORY_BASE_SHA": self.base_sha,
            "FACTORY_RESULT": str(self.tree.result_path),
            "FACTORY_ISSUE_JSON": str(self.tree.issue_path),
        }


@dataclass(frozen=True)
class Published:
    """What became of a dispatch's work (its record in the ledger: :meth:`as_record`)."""

    branch: str
    base_sha: str
    head_sha: str | None
    commits: int  # beyond the base
    new_commits: int  # made in this attempt (beyond where the branch started)
    committed_leftovers: bool
    pushed: bool
    pr_url: str | None = None
    pr_number: int | None = None
    result: ResultFile | None = None
    result_problem: str | None = None
    no_changes_fail: bool = False

    @property
    def no_changes(self) -> bool:
        return self.commits == 0

    @property
    def failure(self) -> str | None:
        """Why this counts as a failed attempt (``workspace.no_changes=fail`` and nothing changed), or None."""
        return "no changes" if self.no_changes and self.no_changes_fail else None

    def as_record(self) -> dict[str, Any]:
        r = self.result
        return {
            "branch": self.branch,
            "head_sha": self.head_sha,
            "commits": self.commits,
            "pushed": self.pushed,
            "pr_url": self.pr_url,
            "no_changes": self.no_changes,
            "summary": r.summary if r else None,
            "cost_usd": r.cost_usd if r else None,
            "tokens": r.tokens if r else None,
            "result_problem": self.result_problem,
        }
