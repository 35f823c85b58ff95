"""Git's ref-name rules (``git check-ref-format``) and git URLs, in Python: the workspace settings validate
their branch template and repository URLs with them, and ``workspace/names.py`` makes an issue id safe for a
branch. Standard library only.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

#: Characters ``check-ref-format`` refuses anywhere (rule 4, 5, 10), plus the control characters.
_FORBIDDEN = set(" ~^:?*[\\") | {chr(c) for c in range(0x20)} | {"\x7f"}
#: Schemes a repository URL may use (``http`` only to a loopback host: a token never travels in clear text).
GIT_SCHEMES = ("https", "http", "ssh", "git", "file")
_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_SCP = re.compile(r"^(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9.-]+:(?!//)[^\s]+$")  # git@github.com:acme/widgets.git


def ref_problem(ref: str) -> str | None:
    """Why ``ref`` (a full name such as ``refs/heads/factory/42``) is not a valid git ref name, or None.

    The rules of ``git check-ref-format`` (its manual, rules 1-10), and what ``git branch`` adds for a
    branch: no ``-`` at the start of the branch name."""
    if not ref or ref == "@":
        return "is empty or '@'"
    if bad := sorted({c for c in ref if c in _FORBIDDEN}):
        return f"contains {', '.join(repr(c) for c in bad)}"
    if ".." in ref or "@{" in ref:
        return "contains '..' or '@{'"
    if ref.startswith("/") or ref.endswith("/") or "//" in ref:
        return "starts or ends with '/' or has '//'"
    if ref.endswith("."):
        return "ends with '.'"
    for part in ref.split("/"):
        if part.startswith(".") or part.endswith(".lock"):
            return f"has a component {part!r} starting with '.' or ending with '.lock'"
    if ref.startswith("refs/heads/") and ref[len("refs/heads/") :].startswith("-"):
        return "names a branch starting with '-'"
    if len(ref.encode()) > 240:
        return "is longer than 240 bytes"
    return None


def url_problem(url: str) -> str | None:
    """Why ``url`` is not a repository URL factory_worker clones from, or None. Accepted: ``https://``,
    ``ssh://``, ``git://``, ``file://``, ``http://`` to a loopback host, scp-style ``git@host:path`` and an
    absolute path; never a password in the URL (it would show in process lists and logs: the token goes in
    the variable ``workspace.token_env`` names), never a ``<transport>::`` helper (``ext::`` runs commands)."""
    if not url or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "must be one URL without spaces or control characters"
    if url.startswith("-"):
        return "must not start with '-'"
    if "::" in url.split("/", 1)[0]:
        return "must not use a '<transport>::' remote helper"
    if url.startswith("/"):
        return None
    if "://" not in url:
        return None if _SCP.match(url) else "must be a URL (https://, ssh://, file://...), git@host:path or a path"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in GIT_SCHEMES:
        return f"scheme {parts.scheme!r} is not one of {', '.join(GIT_SCHEMES)}"
    if parts.password is not None:
        return "must not hold a password or token (set it in the variable workspace.token_env names)"
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        return "http:// only to a loopback host (a token must not travel in clear text); use https://"
    if parts.scheme != "file" and not parts.hostname:
        return "has no host"
    return None


def owner_repo(url: str) -> str | None:
    """``owner/name`` of a GitHub-style URL (``https://host/owner/name(.git)``, ``ssh://git@host/owner/name.git``,
    ``git@host:owner/name.git``); None for a local path or ``file://`` URL, or another path shape."""
    if url.startswith("/") or url.startswith("file:"):
        return None
    if "://" in url:
        path = urlsplit(url).path
    elif _SCP.match(url):
        path = url.split(":", 1)[1]
    else:
        return None
    parts = [p for p in path.strip("/").split("/") if p]
    if len(parts) != 2:
        return None
    owner, name = parts[0], parts[1].removesuffix(".git")
    ok = re.compile(r"^[A-Za-z0-9_.-]+$")
    return f"{owner}/{name}" if ok.match(owner) and ok.match(name) and name else None
