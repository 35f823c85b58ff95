"""The workspace of one worker: :class:`Workspace` (``route`` / ``prepare`` / ``publish`` / ``release`` /
``reclaim``); what it hands the dispatch is in :mod:`.types`.

Thread-safe: one ``Workspace`` serves every slot of a worker process; what slots share on disk is held by
file locks (:mod:`.locks`), so pool processes and workers sharing ``workspace.root`` are safe too.
"""

from __future__ import annotations

import logging
import os
import pwd
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from factory_worker.config.settings import NoChanges, secret_from_env
from factory_worker.workspace import publish as pub
from factory_worker.workspace import trees
from factory_worker.workspace.git import Credential, Git, GitError, write_askpass
from factory_worker.workspace.locks import HeldLock, LockTimeout, exclusive
from factory_worker.workspace.mirror import Mirror
from factory_worker.workspace.names import TREE_NAME, branch_for, tree_name
from factory_worker.workspace.pulls import PullRequestError, PullRequests
from factory_worker.workspace.result import ResultFile, make_result_file, read_result
from factory_worker.workspace.types import Prepared, Published, PublishError, Unroutable, WorkspaceError

if TYPE_CHECKING:
    from factory_worker.config.settings import Settings, SourceSettings, WorkspaceSettings
    from factory_worker.config.workspace import Route
    from factory_worker.sources.base import Issue

log = logging.getLogger(__name__)


class Workspace:
    """Repositories, worktrees and publishing for one worker (see the room's docstring)."""

    def __init__(
        self,
        settings: WorkspaceSettings,
        *,
        keep: bool = False,
        source: SourceSettings | None = None,
        environ: Mapping[str, str] | None = None,
        http: httpx.Client | None = None,
        keep_staged: trees.Keep | None = None,
    ) -> None:
        """``keep_staged(name, note)``: is the staged attempt whose worktree this is still live (its stages
        share it, so between two of them nobody holds its lock)? Without it such a worktree is reclaimed like
        any other whose lock is free."""
        self.settings, self.keep, self.source, self.http = settings, keep, source, http
        self.keep_staged = keep_staged
        self.environ = os.environ if environ is None else environ
        self.root = Path(os.path.abspath(settings.root))
        self.mirrors_dir, self.trees_dir = self.root / "mirrors", self.root / "trees"
        drop = (settings.token_env,) if settings.token_env else ()
        self.git = Git(settings.git_timeout_s, settings.network_timeout_s, drop)
        self._lock = threading.Lock()
        self._mirrors: dict[str, Mirror] = {}
        self._reclaimed: set[str] = set()
        self._ready = False

    @classmethod
    def from_settings(cls, settings: Settings, **kw: Any) -> Workspace:
        """The worker's workspace: ``workspace.*``, worktrees kept with ``agent.keep_workdir``."""
        return cls(settings.workspace, keep=settings.agent.keep_workdir, source=settings.source, **kw)

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def route(self, issue: Issue) -> Route:
        return self.settings.route(issue.labels)

    def branch(self, issue: Issue) -> str:
        return branch_for(self.settings.branch, issue.id)

    def tree_name(self, issue: Issue, attempt: int) -> str:
        """A fresh worktree name for ``issue``: what a staged attempt records, so that its stages find it."""
        return tree_name(self.branch(issue), attempt)

    # -- prepare -------------------------------------------------------------------------------------------
    def prepare(
        self, issue: Issue, attempt: int, uid: int | None = None, gid: int | None = None, name: str | None = None
    ) -> Prepared:
        """A worktree of the issue's repository on its branch, owned by ``uid``/``gid`` (None: the worker's).
        ``name`` (:meth:`tree_name`): a staged attempt's worktree, made by its first stage and found again by
        the next ones (each :meth:`release` d with ``hand_over``) on this root. :class:`Unroutable` when the
        issue has no repository; :class:`WorkspaceError` otherwise (one line)."""
        route = self.route(issue)
        if route.url is None:
            raise Unroutable(route.reason)
        if name is not None and not TREE_NAME.match(name):
            raise WorkspaceError(f"bad worktree name {name!r}")
        owner = _owner(uid, gid)
        branch = self.branch(issue)
        try:
            self._dirs(owner)
            mirror = self._mirror(route.url)
            if name is None or not (self.trees_dir / name).is_dir() or not mirror.exists():
                mirror.update()  # a later stage of an attempt works on: nothing to fetch
            with mirror.locked():
                if mirror.url not in self._reclaimed:  # once per process: what a dead process of this worker left
                    trees.reclaim(mirror.path, self.trees_dir, self.keep_staged)
                    self._reclaimed.add(mirror.url)
                found = self._attach(mirror, issue.id, branch, attempt, name, owner) if name else None
                return found or self._add(mirror, issue, branch, attempt, owner, name)
        except (GitError, LockTimeout, OSError, RuntimeError) as exc:
            raise WorkspaceError(f"workspace of {route.url} ({branch}): {_line(exc)}") from None

    def _add(
        self, mirror: Mirror, issue: Issue, branch: str, attempt: int, owner: trees.Owner | None, name: str | None
    ) -> Prepared:
        base, base_sha = mirror.base(self.settings.base)
        start, how = mirror.branch_start(branch, base_sha)
        self._free(mirror, branch)
        tree = trees.Tree.at(self.trees_dir, mirror.path, name or tree_name(branch, attempt))
        about: dict[str, Any] = {
            "issue": issue.id,
            "base": base,
            "base_sha": base_sha,
            "start_sha": start,
            "continued": how,
        }
        if name:  # a staged attempt's: kept between its stages while the attempt is live (``keep_staged``)
            about["staged"] = True
        lock = HeldLock(tree.lock_path, {"mirror": str(mirror.path), "branch": branch, "at": time.time(), **about})
        try:
            trees.add(self.git, mirror.path, tree, branch, start)
            trees.give(mirror.path, tree, branch, owner)
            make_result_file(tree.result_path, owner[1] if owner else None)
            trees.write_issue(tree, issue.as_json_dict(), owner)
            trees.make_home(tree, owner)
        except BaseException:
            trees.remove(tree, owner)
            lock.release()
            raise
        log.info("worktree %s on %s (from %s %s) for issue %r", tree.path, branch, how, start[:12], issue.id)
        return Prepared(
            issue.id, mirror.url, branch, base, base_sha, start, how, attempt, tree, mirror.path, owner, lock
        )

    def _attach(
        self, mirror: Mirror, issue_id: str, branch: str, attempt: int, name: str, owner: trees.Owner | None
    ) -> Prepared | None:
        """The worktree ``name`` an earlier stage of this attempt made and handed over, locked for this stage;
        None when there is none on this root (then a new one is made on the branch, as for a first stage)."""
        found = trees.attach(self.trees_dir, mirror.path, name, branch)
        if found is None:
            return None
        tree, lock, held = found
        log.info("worktree %s on %s: the next stage of the attempt for issue %r", tree.path, branch, issue_id)
        base, base_sha, start = (str(held[k]) for k in ("base", "base_sha", "start_sha"))
        return Prepared(
            issue_id, mirror.url, branch, base, base_sha, start, "attempt", attempt, tree, mirror.path, owner, lock
        )

    def _free(self, mirror: Mirror, branch: str) -> None:
        """Make sure no other worktree holds ``branch``: an orphan's is reclaimed, a kept one is detached from
        it; a live dispatch's or a foreign one is an error."""
        if not trees.holders(mirror.path, branch):
            return
        trees.reclaim(mirror.path, self.trees_dir, self.keep_staged)
        tip = mirror.tip(f"refs/heads/{branch}")
        for admin in trees.holders(mirror.path, branch):
            if (self.trees_dir / f"{admin.name}.kept").exists() and trees.detach(admin, tip):
                continue
            raise WorkspaceError(
                f"branch {branch} is in use by another worktree ({admin.name}): a live dispatch's, or one the "
                "factory did not make"
            )

    def _dirs(self, owner: trees.Owner | None) -> None:
        with self._lock:
            if not self._ready:
                for folder in (self.root, self.mirrors_dir, self.trees_dir):
                    trees.make_dir(folder, 0o711)
                self._ready = True
        if owner is not None:
            _searchable(self.trees_dir, owner)

    def _mirror(self, url: str) -> Mirror:
        with self._lock:
            mirror = self._mirrors.get(url)
            if mirror is None:
                lock_s = self.settings.network_timeout_s + 60
                mirror = self._mirrors[url] = Mirror(self.mirrors_dir, url, self.git, None, lock_s)
        mirror.credential = self._credential(url)  # read every time: a rotated token (or _FILE) is picked up
        return mirror

    def _token(self) -> str | None:
        name = self.settings.token_env
        return secret_from_env(name, dict(self.environ)) if name else None

    def _credential(self, url: str) -> Credential | None:
        if not url.startswith(("https://", "http://")):
            return None  # ssh: the worker's own key; file: none
        token = self._token()
        if not token:
            return None
        return Credential(self.settings.token_username, token, write_askpass(self.root))

    # -- publish -------------------------------------------------------------------------------------------
    def publish(self, prepared: Prepared, issue: Issue) -> Published:
        """After the agent exited 0: commit its leftovers, and when the branch has commits beyond the base push
        it and make sure of its pull request. :class:`PublishError` (push / pull-request) is a failed attempt."""
        s = self.settings
        result, problem = read_result(prepared.result_path, s.result_max_bytes)
        if problem:
            log.warning("issue %r: %s", prepared.issue_id, problem)
        mirror = self._mirror(prepared.url)
        leftovers = False
        if s.commit_uncommitted:
            try:
                msg = pub.commit_message(result, issue)
                leftovers = pub.commit_leftovers(
                    self.git, prepared.tree, prepared.mirror, prepared.branch, prepared.owner, msg, s
                )
            except (GitError, OSError) as exc:
                log.warning(
                    "issue %r: the agent's uncommitted changes were not committed: %s", prepared.issue_id, _line(exc)
                )
        out = self._outcome(mirror, prepared, result, problem, leftovers)
        if not out.commits or out.head_sha is None:
            return out
        if s.push:
            try:
                pub.push(self.git, prepared.mirror, prepared.branch, self._credential(prepared.url))
            except GitError as exc:
                raise PublishError("push", f"{_line(exc)} (the commits stay on {prepared.branch})") from None
        if s.push and s.pull_requests:
            pr_url, pr_number = self._pull_request(prepared, issue, result)
            return replace(out, pushed=True, pr_url=pr_url, pr_number=pr_number)
        return replace(out, pushed=s.push)

    def outcome(self, prepared: Prepared) -> Published:
        """What a run that is not published (it failed) left: its result file and the branch's head; nothing is
        committed or pushed. Never raises (what cannot be read is None / 0)."""
        result, problem = read_result(prepared.result_path, self.settings.result_max_bytes)
        try:
            return self._outcome(self._mirror(prepared.url), prepared, result, problem, False)
        except (GitError, OSError) as exc:
            log.warning("issue %r: the branch %s could not be read: %s", prepared.issue_id, prepared.branch, _line(exc))
            return Published(prepared.branch, prepared.base_sha, None, 0, 0, False, False, result=result)

    def _outcome(
        self, mirror: Mirror, prepared: Prepared, result: ResultFile | None, problem: str | None, leftovers: bool
    ) -> Published:
        head = mirror.tip(f"refs/heads/{prepared.branch}")
        return Published(
            prepared.branch,
            prepared.base_sha,
            head,
            mirror.count(prepared.base_sha, head) if head else 0,
            mirror.count(prepared.start_sha, head) if head else 0,
            leftovers,
            False,
            result=result,
            result_problem=problem,
            no_changes_fail=self.settings.no_changes == NoChanges.FAIL,
        )

    def _pull_request(
        self, prepared: Prepared, issue: Issue, result: ResultFile | None
    ) -> tuple[str | None, int | None]:
        s = self.settings
        repo = s.github_repo_for(prepared.url)
        if repo is None or not s.github_api_url:
            raise PublishError("pull-request", f"no GitHub repository for {prepared.url}")
        title, body = pub.pull_request_text(result, issue, prepared.branch, repo, self.source)
        prs = PullRequests(s.github_api_url, repo, self._token(), timeout_s=s.git_timeout_s, client=self.http)
        try:
            pr = prs.ensure(prepared.branch, prepared.base, title, body, draft=s.draft)
        except PullRequestError as exc:
            raise PublishError("pull-request", _line(exc)) from None
        finally:
            if self.http is None:
                prs.client.close()
        return pr.url, pr.number

    # -- release and reclaim -------------------------------------------------------------------------------
    def release(self, prepared: Prepared, keep: bool | None = None, hand_over: bool = False) -> None:
        """Remove the worktree after the run (``keep``, default ``agent.keep_workdir``: leave it, marked kept,
        never reclaimed). ``hand_over``: a stage of a staged attempt ended and the attempt goes on (or resumes
        after a release): the worktree stays as it is for the next stage, its lock is dropped. Never raises;
        twice is once."""
        if prepared.released:
            return
        prepared.released = True
        if hand_over:
            prepared.lock.release(unlink=False)
            log.info("worktree %s (%s) handed over to the attempt's next stage", prepared.tree.path, prepared.branch)
            return
        keep = self.keep if keep is None else keep
        try:
            if keep:  # detached, so that the issue's next attempt can check its branch out
                prepared.tree.kept_path.write_text(prepared.branch + "\n")
                trees.detach(prepared.tree.admin, self.git.rev(prepared.mirror, f"refs/heads/{prepared.branch}"))
                log.info("kept the worktree %s (%s)", prepared.tree.path, prepared.branch)
            else:
                trees.remove(prepared.tree, prepared.owner)
        except OSError as exc:
            log.warning("could not release the worktree %s: %s", prepared.tree.path, exc)
        finally:
            prepared.lock.release()

    def reclaim(self) -> list[str]:
        """Remove the worktrees that dispatches gone (SIGKILLed, OOM-killed) left in every mirror under the
        root; call it when a worker starts (it is also done on each mirror's first use by a process)."""
        gone: list[str] = []
        if not self.mirrors_dir.is_dir():
            return gone
        for path in sorted(self.mirrors_dir.glob("*.git")):
            lock = path.with_name(path.name.removesuffix(".git") + ".lock")
            try:
                with exclusive(lock, self.settings.network_timeout_s + 60, f"the mirror {path.name}"):
                    gone += trees.reclaim(path, self.trees_dir, self.keep_staged)
            except (LockTimeout, OSError) as exc:
                log.warning("reclaim of %s: %s", path, exc)
        return gone


def _owner(uid: int | None, gid: int | None) -> trees.Owner | None:
    if uid is None:
        return None
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            raise WorkspaceError(f"uid {uid} has no entry in the user database: give its gid too") from None
    return (uid, gid)


def _searchable(folder: Path, owner: trees.Owner) -> None:
    """``folder`` and its parents must let ``owner`` through (x), or the agent cannot reach its worktree."""
    uid, gid = owner
    for f in (folder, *folder.parents):
        st = f.stat()
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit and uid != 0:
            raise WorkspaceError(
                f"workspace.root: {f} is not searchable by uid {uid}: chmod o+x it, or choose another root"
            )


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__
