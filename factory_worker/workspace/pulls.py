"""One pull request per issue, through GitHub's REST API (``/repos/{owner}/{repo}/pulls``), exactly once as
seen on GitHub however many answers are lost.

:meth:`PullRequests.ensure` always **finds before it creates**: ``GET .../pulls?head={owner}:{branch}&state=open``;
an open pull request of the branch is updated (``PATCH .../pulls/{number}``, only when its title or body
differ); none is created (``POST .../pulls`` -> 201). A lost answer (timeout, connection reset, a 5xx, a
worker SIGKILLed between GitHub's 201 and reading it) is retried from the *find*, so the request GitHub did
apply is found, not repeated; a 422 to the create (GitHub: "A pull request already exists") is a find again.
Between two tries :data:`BACKOFF`, never sooner than GitHub asked (a rate limit, ``github_http.rate_limited``:
``github_http.retry_wait_s``; any other answer's ``Retry-After``), at most :data:`MAX_WAIT_S`. Another 4xx is
permanent. The token is sent to the configured API origin only (redirects are not followed) and never logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from factory_worker.net import Backoff, HttpError, retry_after_s
from factory_worker.sources.github_http import rate_limited, retry_wait_s

log = logging.getLogger(__name__)

USER_AGENT = "factory-worker workspace"
RETRY_STATUS = (429, 500, 502, 503, 504)
#: The longest wait between two tries (a rate limit's included): a publish runs inside a dispatch.
MAX_WAIT_S = 30.0
BACKOFF = Backoff(0.25, MAX_WAIT_S)


class PullRequestError(HttpError):
    """The pull request could not be made sure of; ``permanent`` when retrying cannot help (4xx)."""


@dataclass(frozen=True)
class PullRequest:
    number: int
    url: str  # html_url
    created: bool  # by this call
    updated: bool


class PullRequests:
    """Pull requests of one repository ``owner/name`` at ``api_url``."""

    def __init__(
        self,
        api_url: str,
        repo: str,
        token: str | None,
        timeout_s: float = 10.0,
        tries: int = 5,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.repo, self.owner = repo, repo.split("/", 1)[0]
        self.base = api_url.rstrip("/") + f"/repos/{repo}/pulls"
        headers = {
            "Accept": "application/vnd.github+json",
            "User-Agent": USER_AGENT,
            "X-GitHub-Api-Version": "2022-11-28",
        }
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.client = client or httpx.Client(timeout=timeout_s, follow_redirects=False)
        self.headers, self.tries, self.sleep = headers, max(1, tries), sleep

    def _call(self, method: str, url: str, **kw: Any) -> httpx.Response:
        return self.client.request(method, url, headers=self.headers, **kw)

    def find(self, branch: str) -> dict[str, Any] | None:
        """The open pull request whose head is ``branch`` of this repository, or None."""
        params = {"head": f"{self.owner}:{branch}", "state": "open", "per_page": "100"}
        res = self._call("GET", self.base, params=params)
        _check(res, "list pull requests")
        items = res.json()
        if not isinstance(items, list):
            raise PullRequestError("list pull requests: not a list")
        for pr in items:
            head = pr.get("head") if isinstance(pr, dict) else None
            if isinstance(head, dict) and head.get("ref") == branch and pr.get("state") == "open":
                return pr
        return None

    def ensure(self, branch: str, base: str, title: str, body: str, draft: bool = False) -> PullRequest:
        """Make sure one open pull request of ``branch`` into ``base`` exists with this title and body."""
        last: Exception | None = None
        for attempt in range(self.tries):
            if attempt:
                self.sleep(BACKOFF.wait_s(attempt, getattr(last, "retry_after", None)))
            try:
                pr = self.find(branch)
                if pr is not None:
                    return self._update(pr, title, body)
                res = self._call(
                    "POST", self.base, json={"title": title, "head": branch, "base": base, "body": body, "draft": draft}
                )
                if res.status_code == 422:  # "A pull request already exists": its answer was lost; find it
                    last = PullRequestError(f"create: 422 {_message(res)}")
                    continue
                _check(res, "create pull request")
                made = res.json()
                log.info("opened pull request %s for %s", made.get("html_url"), branch)
                return PullRequest(int(made["number"]), str(made["html_url"]), True, False)
            except PullRequestError as exc:
                if exc.permanent:
                    raise
                last = exc
            except (httpx.TransportError, ValueError, KeyError, TypeError) as exc:  # lost or garbled answers
                last = exc
        raise PullRequestError(f"pull request for {branch}: gave up after {self.tries} tries: {_short(last)}")

    def _update(self, pr: dict[str, Any], title: str, body: str) -> PullRequest:
        number, url = int(pr["number"]), str(pr["html_url"])
        change = {k: v for k, v in (("title", title), ("body", body)) if pr.get(k) != v}
        if change:
            res = self._call("PATCH", f"{self.base}/{number}", json=change)
            _check(res, "update pull request")
        return PullRequest(number, url, False, bool(change))


def _check(res: httpx.Response, what: str) -> None:
    if res.status_code < 300:
        return
    status, limited = res.status_code, rate_limited(res.status_code, res.headers)
    permanent = 400 <= status < 500 and status not in RETRY_STATUS and not limited
    now = time.time()  # a rate limit's wait (60 s when it says none), else any Retry-After (a 503's)
    wait = retry_wait_s(res.headers, now, MAX_WAIT_S) if limited else retry_after_s(res.headers, now, MAX_WAIT_S)
    raise PullRequestError(f"{what}: {status} {_message(res)}", wait, permanent, status)


def _message(res: httpx.Response) -> str:
    try:
        data = res.json()
    except ValueError:
        return res.reason_phrase
    if not isinstance(data, dict):
        return res.reason_phrase
    errors = data.get("errors")
    errors = errors if isinstance(errors, list) else []
    details = "; ".join(str(e.get("message") or e.get("code")) for e in errors if isinstance(e, dict))
    return (str(data.get("message") or res.reason_phrase) + (f" ({details})" if details else ""))[:300]


def _short(exc: Exception | None) -> str:
    if exc is None:
        return "no answer"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
