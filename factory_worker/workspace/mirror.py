"""A repository's mirror: one bare clone per repository URL under ``<workspace.root>/mirrors/``, cloned once,
fetched before each dispatch, shared by every slot of the worker (and by workers sharing the root).

Layout: ``<name>.git`` (:func:`.names.mirror_name`) and its lock ``<name>.lock`` (:func:`.locks.exclusive`,
held around the clone, a fetch, a worktree's creation and a reclaim). Not ``git clone --mirror``: a mirror's
fetch would overwrite and prune the local branches the dispatches' worktrees are on. The remote's branches
are remote-tracking refs (``+refs/heads/*:refs/remotes/origin/*``, fetched with ``--prune``), the issues'
branches are local ``refs/heads/...`` that only the factory writes, and ``refs/remotes/origin/HEAD`` is the
remote's default branch (``git remote set-head --auto`` at the clone).

A cold clone is built in ``<name>.git.tmp-<pid>-<random>`` and renamed into place, so a clone cut short
(SIGKILL, timeout) leaves no half mirror behind: the next holder of the lock deletes the leftover.
Fetches coalesce: a slot that waited for the lock while another slot's fetch *started* after it asked does
not fetch again. The config makes the mirror safe to share with worktrees that agents write to:
``gc.auto=0`` (no one's git repacks or prunes it behind the others' backs), ``gc.worktreePruneExpire=never``
(only the factory removes worktrees, and only its own), ``core.logAllRefUpdates=false`` (no shared reflogs).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from factory_worker.workspace.git import Credential, Git, GitError
from factory_worker.workspace.locks import exclusive
from factory_worker.workspace.names import mirror_name

log = logging.getLogger(__name__)

CONFIG = (
    ("remote.origin.fetch", "+refs/heads/*:refs/remotes/origin/*"),
    ("remote.origin.tagOpt", "--no-tags"),
    ("gc.auto", "0"),
    ("gc.worktreePruneExpire", "never"),
    ("core.logAllRefUpdates", "false"),
    ("maintenance.auto", "false"),
)
_STAMP = "factory-fetch-started"


class Mirror:
    """The mirror of ``url`` under ``mirrors`` (a directory the worker owns)."""

    def __init__(self, mirrors: Path, url: str, git: Git, credential: Credential | None, lock_timeout_s: float):
        self.url, self.git, self.credential = url, git, credential
        name = mirror_name(url)
        self.path = mirrors / name
        self.lock_path = mirrors / (name.removesuffix(".git") + ".lock")
        self.lock_timeout_s = lock_timeout_s

    @contextmanager
    def locked(self) -> Iterator[None]:
        with exclusive(self.lock_path, self.lock_timeout_s, f"the mirror of {self.url}"):
            yield

    def exists(self) -> bool:
        return (self.path / "HEAD").is_file()

    def update(self) -> bool:
        """Clone (when missing) or fetch, under the lock; True when this call cloned."""
        asked = time.time()
        with self.locked():
            if not self.exists():
                self._clone()
                return True
            self._fetch(asked)
            return False

    def _net(self, args: list[str], git_dir: Path, what: str) -> None:
        self.git.run(args, git_dir=git_dir, network=True, credential=self.credential, what=what)

    def _clone(self) -> None:
        for old in self.path.parent.glob(self.path.name + ".tmp-*"):  # a clone cut short, by a holder now gone
            shutil.rmtree(old, ignore_errors=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
        started = time.time()
        try:
            self.git.run(
                ["-c", "init.defaultBranch=factory-unused", "init", "--bare", "--quiet", str(tmp)], what="init"
            )
            self.git.run(["config", "remote.origin.url", self.url], git_dir=tmp, what="config")
            for key, value in CONFIG:
                self.git.run(["config", key, value], git_dir=tmp, what="config")
            self._net(["fetch", "--prune", "--quiet", "origin"], tmp, f"clone of {self.url}")
            try:  # an empty remote has no default branch: the base is then reported when it is needed
                self._net(["remote", "set-head", "origin", "--auto"], tmp, f"default branch of {self.url}")
            except GitError as exc:
                log.warning("%s", exc)
            (tmp / _STAMP).write_text(repr(started))
            os.rename(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("cloned %s into %s", self.url, self.path)

    def _fetch(self, asked: float) -> None:
        try:
            last = float((self.path / _STAMP).read_text())
        except (OSError, ValueError):
            last = 0.0
        if last >= asked:  # a fetch that started after we asked has just finished: it is fresh enough
            return
        started = time.time()
        self._net(["fetch", "--prune", "--quiet", "origin"], self.path, f"fetch of {self.url}")
        (self.path / _STAMP).write_text(repr(started))
        if self.git.rev(self.path, "refs/remotes/origin/HEAD") is None:  # cloned empty: it may have one now
            try:
                self._net(["remote", "set-head", "origin", "--auto"], self.path, f"default branch of {self.url}")
            except GitError as exc:
                log.warning("%s", exc)

    def base(self, base: str | None) -> tuple[str, str]:
        """(branch name, commit) to branch from: ``base`` as the remote's branch, else as a commit; None: the
        remote's default branch. :class:`GitError` when it names nothing."""
        if base is None:
            ref = self.git.run(
                ["symbolic-ref", "--quiet", "refs/remotes/origin/HEAD"], git_dir=self.path, check=False
            ).stdout.strip()
            name = ref.removeprefix("refs/remotes/origin/")
            sha = self.git.rev(self.path, ref) if ref else None
            if not ref or sha is None:
                raise GitError("default branch", 1, f"{self.url} has no default branch (empty?): set workspace.base")
            return name, sha
        sha = self.git.rev(self.path, f"refs/remotes/origin/{base}") or self.git.rev(self.path, base)
        if sha is None:
            raise GitError("base", 1, f"workspace.base {base!r} is neither a branch of {self.url} nor a commit")
        return base, sha

    def branch_start(self, branch: str, base_sha: str) -> tuple[str, str]:
        """Where an issue's ``branch`` starts, and from what: this worker's earlier attempt (``local``: unpushed
        commits), the pushed branch (``remote``), or the base (``base``). Both, diverged: the pushed one wins
        (someone else's commits are not dropped)."""
        local, remote = self.tip(f"refs/heads/{branch}"), self.tip(f"refs/remotes/origin/{branch}")
        if local and remote:
            if local == remote or self.is_ancestor(remote, local):
                return local, "local"
            if not self.is_ancestor(local, remote):
                log.warning(
                    "%s: this worker's %s and the remote's %s diverged: continuing the remote's",
                    branch,
                    local[:12],
                    remote[:12],
                )
            return remote, "remote"
        if local:
            return local, "local"
        if remote:
            return remote, "remote"
        return base_sha, "base"

    def tip(self, ref: str) -> str | None:
        return self.git.rev(self.path, ref)

    def is_ancestor(self, older: str, newer: str) -> bool:
        res = self.git.run(["merge-base", "--is-ancestor", older, newer], git_dir=self.path, check=False)
        return res.returncode == 0

    def count(self, since: str, head: str) -> int:
        """Commits reachable from ``head`` and not from ``since``."""
        return int(self.git.out(["rev-list", "--count", head, f"^{since}"], git_dir=self.path) or 0)
