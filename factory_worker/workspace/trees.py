"""A dispatch's worktree: made on its branch, given to the agent's uid/gid, removed after the run, and found
again (reclaimed) when the process that made it died.

Files of one dispatch, all in ``<workspace.root>/trees/`` (0711: an agent can enter its own worktree, not list
the others): ``<name>/`` (the worktree), ``<name>.lock`` (its :class:`~.locks.HeldLock`, with a note naming
the mirror and branch), ``<name>.result.json`` (``FACTORY_RESULT``), ``<name>.issue.json``
(``FACTORY_ISSUE_JSON``), ``<name>.home/`` (the agent's ``HOME``: what its tools write there, a CLI's config
or cache, is not in the worktree, so never committed), ``<name>.kept`` (kept on request). Its administrative directory is
``<mirror>/worktrees/<name>``.

**What the agent may write in the mirror** (when it runs as another uid): its own worktree and admin
directory (chowned to it), its branch's ref file and the directories of the branch namespace (group-writable
by its gid), and new loose objects (``objects/00``..``ff``, group-writable and sticky: it cannot delete or
replace the worker's objects). Not the mirror's config, hooks, packs, remote-tracking refs or
``worktrees/``: the worker's git, which only ever runs on the mirror, reads nothing an agent wrote as config.

**Reclaim** (:func:`reclaim`, under the mirror's lock): a worktree of ours whose lock file can be locked
(its process is gone: SIGKILL, OOM) and that was not kept is removed with its admin directory, its result file
and its lock. Only names :data:`~.names.TREE_NAME` produced, under ``trees/``: a worktree someone else made
from the mirror, or a live dispatch's, is never touched; ``git worktree prune`` is never run. A staged
attempt's worktree between two stages (its lock free, its note ``staged``) is removed only when the caller's
``keep`` does not claim it (the attempt is over, or was never recorded).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory_worker.workspace.git import Git
from factory_worker.workspace.locks import HeldLock, note, take_if_free
from factory_worker.workspace.names import TREE_NAME

log = logging.getLogger(__name__)

Owner = tuple[int, int]  # (uid, gid)
#: (worktree name, its lock's note) -> True to keep a staged attempt's worktree whose lock is free
Keep = Callable[[str, dict[str, Any]], bool]


@dataclass(frozen=True)
class Tree:
    """Where one dispatch's worktree and its companions live."""

    name: str
    path: Path
    admin: Path
    lock_path: Path
    result_path: Path
    kept_path: Path
    issue_path: Path
    home: Path

    @classmethod
    def at(cls, trees: Path, mirror: Path, name: str) -> Tree:
        return cls(
            name,
            trees / name,
            mirror / "worktrees" / name,
            trees / f"{name}.lock",
            trees / f"{name}.result.json",
            trees / f"{name}.kept",
            trees / f"{name}.issue.json",
            trees / f"{name}.home",
        )


def make_dir(path: Path, mode: int) -> None:
    """``path`` (and parents) exists with ``mode`` (the worker's)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)


def holders(mirror: Path, branch: str) -> list[Path]:
    """Admin directories of the mirror's worktrees that have ``branch`` checked out."""
    want = f"ref: refs/heads/{branch}"
    found = []
    for admin in sorted((mirror / "worktrees").glob("*")):
        try:
            if (admin / "HEAD").read_text().strip() == want:
                found.append(admin)
        except OSError:
            continue
    return found


def add(git: Git, mirror: Path, tree: Tree, branch: str, start: str) -> None:
    """``git worktree add -B branch <tree> <start>``: the branch (re)set to ``start``, checked out there."""
    args = ["worktree", "add", "--quiet", "-B", branch, str(tree.path), start]
    git.run(args, git_dir=mirror, what=f"worktree add {tree.name}")
    if not (tree.admin / "gitdir").is_file():
        raise RuntimeError(f"git made the worktree {tree.path} but not its admin directory {tree.admin}")


def detach(admin: Path, sha: str | None) -> bool:
    """Point a kept worktree's HEAD at ``sha`` instead of its branch (its files stay as they are), so that
    the branch can be checked out again; False when it cannot be written."""
    if sha is None:
        return False
    tmp = admin / f"HEAD.factory-{os.getpid()}"
    try:
        tmp.write_text(sha + "\n")
        os.replace(tmp, admin / "HEAD")
        return True
    except OSError as exc:
        log.warning("could not detach the kept worktree %s: %s", admin, exc)
        tmp.unlink(missing_ok=True)
        return False


def give(mirror: Path, tree: Tree, branch: str, owner: Owner | None) -> None:
    """Hand the fresh worktree to ``owner`` (no agent has run in it yet, so walking it is safe): the work tree
    (0700) and its admin directory chowned; the branch's ref and namespace and the loose-object directories
    writable by the owner's group."""
    os.chmod(tree.path, 0o700)
    if owner is None or owner == (os.geteuid(), os.getegid()):
        return
    uid, gid = owner
    for top in (tree.path, tree.admin):
        os.lchown(top, uid, gid)
        for here, dirs, files in os.walk(top):
            for entry in (*dirs, *files):
                os.lchown(os.path.join(here, entry), uid, gid)
    heads = mirror / "refs" / "heads"
    ref = heads / branch
    folder = ref.parent  # the namespace directories (refs/heads/factory/), not refs/heads itself unless the
    _share(folder, gid, 0o2775)  # template has no prefix: the agent updates its ref with a lock file beside it
    while folder != heads and folder.parent != heads:
        folder = folder.parent
        _share(folder, gid, 0o2775)
    if ref.is_file():
        os.lchown(ref, uid, gid)
    objects = mirror / "objects"
    for n in range(256):
        sub = objects / f"{n:02x}"
        sub.mkdir(exist_ok=True)
        _share(sub, gid, 0o3775)


def _share(folder: Path, gid: int, mode: int) -> None:
    st = folder.stat()
    if st.st_gid != gid:
        os.chown(folder, -1, gid)
    if st.st_mode & 0o7777 != mode:
        os.chmod(folder, mode)


def remove(tree: Tree, owner: Owner | None) -> None:
    """Remove the worktree, its admin directory and result file (the lock is the caller's, last)."""
    for path in (tree.path, tree.admin, tree.home):
        _rmtree(path, owner)
    tree.result_path.unlink(missing_ok=True)
    tree.issue_path.unlink(missing_ok=True)
    tree.kept_path.unlink(missing_ok=True)


def attach(trees: Path, mirror: Path, name: str, branch: str) -> tuple[Tree, HeldLock, dict[str, Any]] | None:
    """The worktree ``name`` a staged attempt's earlier stage made and handed over, its lock taken by this
    process, and its lock's note (base, base_sha, start_sha); None when there is none (a lock file missing too:
    the leftover is removed, the caller makes a new one). RuntimeError when it is in use, or not ``branch``'s."""
    tree = Tree.at(trees, mirror, name)
    if not tree.path.is_dir():
        return None
    lock = HeldLock.take(tree.lock_path)
    if lock is None:
        if tree.lock_path.exists():
            raise RuntimeError(f"the worktree {name} is in use by another dispatch")
        remove(tree, owner_of(tree.path))  # no lock, so no note to continue from: made again
        return None
    try:
        held = note(tree.lock_path)
        head = (tree.admin / "HEAD").read_text().strip() if tree.admin.is_dir() else ""
        if held.get("mirror") != str(mirror) or held.get("branch") != branch:
            raise RuntimeError(f"the worktree {name} is not {branch}'s of this mirror")
        if head != f"ref: refs/heads/{branch}" or not all(held.get(k) for k in ("base", "base_sha", "start_sha")):
            raise RuntimeError(f"the worktree {name} is not on {branch} any more")
    except BaseException:
        lock.release(unlink=False)
        raise
    return tree, lock, held


def make_home(tree: Tree, owner: Owner | None) -> None:
    """The agent's ``HOME`` beside its worktree: 0700, the agent's."""
    os.mkdir(tree.home, 0o700)
    if owner is not None and owner != (os.geteuid(), os.getegid()):
        os.chown(tree.home, *owner)


def write_issue(tree: Tree, issue: dict[str, Any], owner: Owner | None) -> None:
    """The issue as JSON beside the worktree (``FACTORY_ISSUE_JSON``; not in it: ``git add -A`` would commit
    it): the worker's, 0640 with the agent's group (0600 when the agent is the worker's own user)."""
    fd = os.open(tree.issue_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "w", encoding="utf-8") as fh:
        if owner is not None and owner != (os.geteuid(), os.getegid()):
            os.fchown(fh.fileno(), -1, owner[1])
            os.fchmod(fh.fileno(), 0o640)
        fh.write(json.dumps(issue, ensure_ascii=False, indent=2) + "\n")


def _rmtree(path: Path, owner: Owner | None) -> None:
    """Remove a tree the agent owned. A worker without CAP_DAC_OVERRIDE cannot remove what an agent made
    unwritable (mode 000 directories): its contents are then removed as the agent first, as ``agents/`` does."""
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        first = exc
    if owner is not None:
        for argv in (["chmod", "-R", "u+rwx", "--", str(path)], ["rm", "-rf", "--", str(path)]):
            subprocess.run(  # a fixed argv on our own path
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=120,
                check=False,
                user=owner[0],
                group=owner[1],
                extra_groups=[],
            )
        try:
            shutil.rmtree(path)  # what is left is the top directory, in the worker's parent
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            first = exc
    log.warning("could not remove %s: %s", path, first)


def owner_of(path: Path) -> Owner | None:
    """Who owns ``path`` when it is not the worker (an agent's worktree), else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return None if st.st_uid == os.geteuid() else (st.st_uid, st.st_gid)


def reclaim(mirror: Path, trees: Path, keep: Keep | None = None) -> list[str]:
    """Remove this mirror's worktrees whose dispatch is gone (see the module); the names removed. The caller
    holds the mirror's lock. ``keep``: asked about a staged attempt's worktree whose lock is free."""
    gone: list[str] = []
    names = set()
    for admin in sorted((mirror / "worktrees").glob("*")):
        try:
            work = Path((admin / "gitdir").read_text().strip()).parent
        except OSError:
            continue
        if work.parent == trees and TREE_NAME.match(work.name) and work.name == admin.name:
            names.add(work.name)
    for lock in sorted(trees.glob("*.lock")):
        name = lock.name.removesuffix(".lock")
        if TREE_NAME.match(name) and note(lock).get("mirror") == str(mirror):
            names.add(name)
    for name in sorted(names):
        tree = Tree.at(trees, mirror, name)
        if tree.kept_path.exists():
            continue
        fd = take_if_free(tree.lock_path)
        if fd is None and tree.lock_path.exists():
            continue  # a live dispatch holds it
        if fd is not None and keep is not None and (held := note(tree.lock_path)).get("staged"):
            if _kept(keep, name, held):  # between two stages of a live attempt
                os.close(fd)
                continue
        try:
            remove(tree, owner_of(tree.path))
            tree.lock_path.unlink(missing_ok=True)
        finally:
            if fd is not None:
                os.close(fd)
        gone.append(name)
        log.info("reclaimed the worktree %s left by a dispatch that is gone", tree.path)
    for tmp in trees.glob(".*.lock.*.tmp"):  # a lock file never renamed into place
        fd = take_if_free(tmp)
        if fd is not None:
            tmp.unlink(missing_ok=True)
            os.close(fd)
    return gone


def _kept(keep: Keep, name: str, held: dict[str, Any]) -> bool:
    try:
        return bool(keep(name, held))
    except Exception as exc:  # cannot tell (Redis down): keep it, a later reclaim decides
        log.warning("could not tell whether the staged worktree %s is still in use (%s): kept", name, exc)
        return True
