"""``workspace.*`` (``FACTORY_WORKSPACE__*``): the repository an issue is worked in, its branch, and how the
work is published (push, pull request). Unset ``repo_url`` and ``repos``: no workspace (agents get an empty
directory, as before). Re-exported by :mod:`factory_worker.config.settings`; the room that uses them is
``factory_worker/workspace/``.

Routing (:meth:`WorkspaceSettings.route`) lives here, beside the settings it reads, so that whoever decides
whether an issue can run (the eligibility rules, ``explain``) and the workspace itself give the same answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, field_validator

from factory_worker.config.gitrefs import owner_repo, ref_problem, url_problem

if TYPE_CHECKING:
    from factory_worker.config.source import SourceSettings

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REPO = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
DEFAULT_API_URL = "https://api.github.com"


class NoChanges(StrEnum):
    """What an agent that exits 0 without changing anything counts as (``workspace.no_changes``)."""

    DONE = "done"  # done, with "no changes" in the record
    FAIL = "fail"  # a failed attempt ("no changes"), retried with backoff


@dataclass(frozen=True)
class Route:
    """Where an issue is worked: ``url`` (and the ``workspace.repos`` label that chose it), or no repository
    and ``reason`` (built from the settings only, never from the issue's text)."""

    url: str | None
    label: str | None = None
    reason: str = ""


class WorkspaceSettings(BaseModel):
    """A git worktree per dispatch (``workspace/``): which repository, which branch, what is published."""

    repo_url: str | None = Field(None, description="the repository issues are worked in (any git URL)")
    repos: dict[str, str] = Field(
        default_factory=dict, description="label -> repository URL: an issue with the label is worked there"
    )
    base: str | None = Field(None, description="the branch (or commit) to branch from; default the remote's HEAD")
    branch: str = Field("factory/{id}", description="an issue's branch; {id} is the id made safe for a ref")
    push: bool = Field(False, description="push an issue's branch when its agent exits 0 with commits")
    token_env: str | None = Field(
        None, description="env var holding the push and API token (also <NAME>_FILE); default source.github_token_env"
    )
    token_username: str = Field("x-access-token", min_length=1, description="the user name git sends with the token")
    github_repo: str | None = Field(None, description="owner/name pull requests go to; default from the URL")
    github_api_url: str | None = Field(None, description="GitHub REST API; default source.github_api_url")
    pull_requests: bool | None = Field(
        None, description="open one pull request per issue; default on with push and a GitHub repository"
    )
    draft: bool = Field(False, description="open pull requests as drafts")
    no_changes: NoChanges = Field(NoChanges.DONE, description="an agent that exits 0 and changes nothing: done|fail")
    commit_uncommitted: bool = Field(True, description="commit what the agent left uncommitted (as the agent)")
    root: Path = Field(Path(".factory/workspace"), description="mirrors/ and trees/ live here (a local disk)")
    commit_name: str = Field("factory-worker", min_length=1, max_length=100)
    commit_email: str = Field("factory-worker@localhost", min_length=3, max_length=200)
    git_timeout_s: float = Field(60.0, gt=0, description="limit of one local git command")
    network_timeout_s: float = Field(600.0, gt=0, description="limit of one clone, fetch or push")
    result_max_bytes: int = Field(256 * 1024, ge=1024, le=16 * 1024 * 1024, description="FACTORY_RESULT size cap")

    @property
    def enabled(self) -> bool:
        return bool(self.repo_url or self.repos)

    def route(self, labels: list[str]) -> Route:
        """The repository of an issue carrying ``labels``: a ``repos`` label (any case) wins over ``repo_url``.
        Labels that route to different repositories, or no label and no ``repo_url``: no repository."""
        by_label = {k.casefold(): (k, v) for k, v in self.repos.items()}
        hits = {by_label[x.casefold()] for x in labels if isinstance(x, str) and x.casefold() in by_label}
        urls = {url for _, url in hits}
        if len(urls) > 1:
            names = ", ".join(sorted(k for k, _ in hits))
            return Route(None, reason=f"labels {names} route to different repositories (workspace.repos)")
        if hits:
            label, url = min(hits)
            return Route(url, label)
        if self.repo_url:
            return Route(self.repo_url)
        known = ", ".join(sorted(self.repos)) or "-"
        return Route(
            None,
            reason=f"no repository: none of the labels of workspace.repos ({known}) and no workspace.repo_url "
            "(FACTORY_WORKSPACE__REPO_URL)",
        )

    def github_repo_for(self, url: str) -> str | None:
        """``owner/name`` a pull request for work in ``url`` goes to: ``github_repo`` for ``repo_url``, else the
        owner/name in the URL, else ``github_repo``."""
        if url == self.repo_url and self.github_repo:
            return self.github_repo
        return owner_repo(url) or self.github_repo

    def resolve(self, source: SourceSettings) -> None:
        """Fill the defaults that come from the source (the token variable, the API, the repository) and check
        what needs the whole picture; ValueError names the settings."""
        if self.token_env is None:
            self.token_env = source.github_token_env
        if self.github_api_url is None:
            self.github_api_url = source.github_api_url
        if self.github_repo is None and source.kind == "github" and source.github_repo:
            self.github_repo = source.github_repo
        if self.pull_requests is None:
            self.pull_requests = (
                self.push and self.enabled and (source.kind == "github" or self.github_repo is not None)
            )
        if not self.pull_requests:
            return
        if not self.push:
            raise ValueError(
                "workspace.pull_requests (FACTORY_WORKSPACE__PULL_REQUESTS) needs workspace.push "
                "(FACTORY_WORKSPACE__PUSH=true): a pull request is opened for the pushed branch"
            )
        for url in [self.repo_url, *self.repos.values()]:
            if url and self.github_repo_for(url) is None:
                raise ValueError(
                    f"workspace.pull_requests: no GitHub repository for {url}: set workspace.github_repo "
                    "(FACTORY_WORKSPACE__GITHUB_REPO) or use the repository's GitHub URL"
                )

    @field_validator("repo_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and (why := url_problem(v)):
            raise ValueError(why)
        return v

    @field_validator("repos")
    @classmethod
    def _repos(cls, v: dict[str, str]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for label, url in v.items():
            if not isinstance(label, str) or not label.strip():
                raise ValueError("a label must be a non-empty string")
            if why := url_problem(url):
                raise ValueError(f"label {label!r}: {url!r} {why}")
            other = seen.setdefault(label.strip().casefold(), url)
            if other != url:
                raise ValueError(f"label {label!r} appears twice (labels compare in any case) with different URLs")
        return {k.strip(): u for k, u in v.items()}

    @field_validator("base")
    @classmethod
    def _base(cls, v: str | None) -> str | None:
        if v is not None and not _SHA.match(v) and (why := ref_problem("refs/heads/" + v)):
            raise ValueError(f"must be a branch name or a full commit id: it {why}")
        return v

    @field_validator("branch")
    @classmethod
    def _branch(cls, v: str) -> str:
        if v.count("{id}") != 1 or v.replace("{id}", "").count("{") or v.replace("{id}", "").count("}"):
            raise ValueError("must contain {id} exactly once and no other braces, e.g. factory/{id}")
        if why := ref_problem("refs/heads/" + v.replace("{id}", "x")):
            raise ValueError(f"is not a valid branch name: it {why}")
        return v

    @field_validator("token_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError(f"{v!r} is not an environment variable name")
        return v

    @field_validator("github_repo")
    @classmethod
    def _repo(cls, v: str | None) -> str | None:
        if v is not None and not _REPO.match(v):
            raise ValueError("must be owner/name")
        return v

    @field_validator("github_api_url")
    @classmethod
    def _api(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("https://", "http://")):
            raise ValueError("must be an https:// URL")
        if v is not None and (why := url_problem(v)):
            raise ValueError(why)
        return v

    @field_validator("token_username", "commit_name", "commit_email")
    @classmethod
    def _text(cls, v: Any) -> Any:
        if isinstance(v, str) and any(ord(c) < 0x20 or c in "<>" for c in v):
            raise ValueError("must not contain control characters or '<' '>'")
        return v
