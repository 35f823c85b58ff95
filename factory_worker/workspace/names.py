"""Names the workspace gives things: an issue's branch, a mirror's directory, a dispatch's worktree.

**Branches** (:func:`branch_for`): the template (``workspace.branch``, default ``factory/{id}``) with the id
made safe for one ref-name component (``git check-ref-format``'s rules, ASCII letters, digits and ``._-``
only, no ``/`` so that ``a`` and ``a/b`` can never collide as a file and a directory). An id kept as it is
stays readable (``factory/42``, ``factory/ENG-7``). An id that had to change, was cut short, or already looks
like a changed one (ends in ``-`` and 12 hex digits) gets ``-<12 hex of its SHA-256>`` appended: two distinct
ids then map to one branch only if their 48-bit hashes collide.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from factory_worker.config.gitrefs import ref_problem

MAX_ID_CHARS = 64
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_LOOKS_HASHED = re.compile(r"-[0-9a-f]{12}$")


def _digest(text: str, n: int = 12) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def safe_component(issue_id: str) -> str:
    """``issue_id`` as one ref-name component, injective up to a 48-bit hash collision (see the module)."""
    s = _SAFE.sub("-", issue_id)
    while ".." in s:
        s = s.replace("..", ".")
    s = s.lstrip(".-")
    s = s[:MAX_ID_CHARS]
    while s.endswith((".", ".lock")):
        s = s.removesuffix(".lock").rstrip(".")
    if s != issue_id or not s or _LOOKS_HASHED.search(s):
        s = f"{s}-{_digest(issue_id)}" if s else _digest(issue_id)
    return s


def branch_for(template: str, issue_id: str) -> str:
    """The branch of ``issue_id``: ``template`` with ``{id}`` replaced by :func:`safe_component`."""
    name = template.replace("{id}", safe_component(issue_id))
    why = ref_problem("refs/heads/" + name)
    if why:  # the settings checked the template; this holds whatever the id
        raise ValueError(f"branch {name!r} {why}")
    return name


def mirror_name(url: str) -> str:
    """The directory of ``url``'s mirror: its last path component (made safe) and a hash of the URL."""
    tail = re.split(r"[/:]", url.rstrip("/"))[-1].removesuffix(".git")
    tail = _SAFE.sub("-", tail).strip(".-")[:40] or "repo"
    return f"{tail}-{_digest(url)}.git"


def tree_name(branch: str, attempt: int) -> str:
    """A dispatch's worktree name: the branch (flattened, cut), the attempt and a random part."""
    flat = _SAFE.sub("-", branch.replace("/", "-")).strip(".-")[:80] or "tree"
    return f"{flat}-a{max(0, attempt)}-{secrets.token_hex(4)}"


#: What :func:`tree_name` produces (the reclaim only ever touches such names).
TREE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,80}-a\d+-[0-9a-f]{8}$")
