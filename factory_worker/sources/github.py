"""The GitHub issue source (``FACTORY_SOURCE__KIND=github``): open issues of one repository via the REST API.

Polling: ``GET {api}/repos/{owner}/{name}/issues?state=open&labels=a,b&per_page=100``, following the
``Link: <...>; rel="next"`` header page by page (at most :data:`MAX_PAGES`; ``next`` links must stay on the
configured API origin, so the token is never sent elsewhere). Pull requests (items with a
``"pull_request"`` key) are skipped. The label filter is ``source.github_labels`` plus
``source.required_labels``; without either, settings validation refuses ``kind=github`` unless
``source.github_all_open_issues`` is true (on a public repository anyone can open an issue).

Ready-state mapping (GitHub only knows ``open``/``closed``): an issue is *ready* when it is open and
carries every filter label (case-insensitive, as on GitHub; none configured = every open issue).
A ready issue gets ``state = ready_states[0]`` (``"ready"`` by default), so the rest of the loop sees the
same states as with the file source; any other issue (only returned by :meth:`GitHubSource.get`) keeps
GitHub's own state, ``"open"`` or ``"closed"``. ``poll()`` returns only the ready issues; ``seen`` counts
every issue (not pull request) listed. Issue fields: ``id = str(number)``, ``title``, ``body`` (or ``""``),
``labels`` (names), ``updated_at``, ``url`` (``html_url``), ``author_association``. The eligibility rules
(``sources/rules.py``: excluded labels, title prefix, author associations...) are applied by the loop.

Conditional requests (:class:`~.github_http.PageCache`): the ETag and the payload of every page URL of
the latest poll are remembered; the next poll sends ``If-None-Match`` and a ``304 Not Modified`` reuses the
cached page (GitHub does not count 304s against the rate limit); pages a poll no longer visits are evicted.
Rate limits: a 403/429 with ``X-RateLimit-Remaining: 0`` or ``Retry-After`` (or any 429) records a
*retry-not-before* time (``Retry-After``, else ``X-RateLimit-Reset``, else 60 s; never more than
``source.github_max_retry_after_s``, see :func:`~.github_http.retry_wait_s`); until then
``poll()``/``get()`` raise :class:`SourceError` without calling the server, and the loop's breaker backs off.
A 2xx that reports ``X-RateLimit-Remaining: 0`` also sets it, so the next call does not earn a 403.

Errors: HTTP errors, connection errors, a non-JSON body or a page that is not a JSON array raise
:class:`SourceError` with one line (status, repo; the token never appears). A malformed item (not an
object, missing/mistyped ``number``, ``title``, ``labels`` or ``html_url``..., or whatever else fails on it) is
reported in ``PollResult.errors`` as ``github:<repo>#<index>: reason`` (index 0-based across pages) and
skipped: one item never ends the poll. :meth:`GitHubSource.get` of one raises :class:`MalformedIssue`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import ValidationError

from factory_worker.config.settings import secret_from_env
from factory_worker.sources.base import Issue, MalformedIssue, PollResult, SourceError
from factory_worker.sources.github_http import Page, PageCache, iso, origin, rate_limited, retry_wait_s

if TYPE_CHECKING:
    from factory_worker.config.settings import SourceSettings

log = logging.getLogger(__name__)

REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
PER_PAGE = 100
MAX_PAGES = 100
USER_AGENT = "factory-worker (+https://github.com/factory-worker)"


class GitHubSource:
    """Open issues of ``repo`` carrying ``labels``, as :class:`Issue` objects (see the module docstring)."""

    def __init__(
        self,
        api_url: str,
        repo: str,
        labels: Iterable[str] = (),
        token: str | None = None,
        ready_states: Iterable[str] = ("ready",),
        client: httpx.Client | None = None,
        *,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        max_retry_after_s: float = 300.0,
    ) -> None:
        if not REPO_RE.match(repo or ""):
            raise SourceError(f"github repo {repo!r}: expected 'owner/name'")
        if origin(api_url)[0] not in ("http", "https"):
            raise SourceError(f"github api url {api_url!r}: expected http(s)://...")
        self.api_url = api_url.rstrip("/")
        self.repo = repo
        self.labels = [lb for lb in labels if lb]
        self.ready_state = next(iter(ready_states), "ready")
        self._token = token or None
        self._clock = clock
        self._owns_client = client is None
        self._client = client or httpx.Client(timeout=timeout_s, follow_redirects=True)
        self._headers = {
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
            "User-Agent": USER_AGENT,
        }
        if self._token:
            self._headers["Authorization"] = f"Bearer {self._token}"
        #: ETag + payload per page URL, of the latest poll only
        self.page_cache = PageCache()
        self.max_retry_after_s = max_retry_after_s
        self._retry_not_before = 0.0
        self._lock = threading.Lock()
        #: HTTP requests actually sent, and how many were answered 304 (for metrics and tests)
        self.stats = {"requests": 0, "not_modified": 0}

    @classmethod
    def from_settings(cls, settings: SourceSettings) -> GitHubSource:
        """Build from :class:`SourceSettings`; the token is read from ``$<github_token_env>``."""
        repo = (settings.github_repo or "").strip()
        if not REPO_RE.match(repo):
            raise SourceError(
                f"source kind 'github' needs source.github_repo as 'owner/name' "
                f"(FACTORY_SOURCE__GITHUB_REPO), got {settings.github_repo!r}"
            )
        token = secret_from_env(settings.github_token_env)  # $NAME, else the file $NAME_FILE names
        labels: dict[str, str] = {}  # the API filters by github_labels and required_labels (any case)
        for label in [*settings.github_labels, *settings.required_labels]:
            labels.setdefault(label.casefold(), label)
        if not labels and not settings.github_all_open_issues:  # settings validation says so first
            raise SourceError(
                "source kind 'github' needs source.github_labels or source.required_labels, "
                "or source.github_all_open_issues=true"
            )
        log.info(
            "github source %s labels=%s token=%s",
            repo,
            list(labels.values()),
            "set" if token else f"unset (${settings.github_token_env})",
        )
        return cls(
            settings.github_api_url,
            repo,
            labels.values(),
            token,
            settings.ready_states,
            max_retry_after_s=settings.github_max_retry_after_s,
        )

    def __repr__(self) -> str:  # never shows the token
        return f"GitHubSource({self.api_url!r}, {self.repo!r}, labels={self.labels!r})"

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # -- HTTP -------------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def _fail(self, what: str) -> SourceError:
        return SourceError(self._scrub(f"GitHub {self.repo}: {what}"))

    def _check_rate_limit(self) -> None:
        now = self._clock()
        if now < self._retry_not_before:
            left = self._retry_not_before - now
            raise SourceError(
                f"GitHub rate limit: retry after {iso(self._retry_not_before)} (in {left:.0f}s, repo {self.repo})"
            )

    def _set_retry(self, headers: httpx.Headers, status: int) -> float:
        now = self._clock()
        self._retry_not_before = now + retry_wait_s(headers, now, self.max_retry_after_s)
        log.warning(
            "GitHub %s rate limit reached (HTTP %s): no requests until %s",
            self.repo,
            status,
            iso(self._retry_not_before),
        )
        return self._retry_not_before

    def _get(
        self, url: str, params: dict[str, Any] | None = None, *, allow_404: bool = False, cache: bool = True
    ) -> tuple[Any, str | None]:
        """GET one URL (conditionally when ``cache``); ``(payload, next_url)``, or ``(None, None)`` on 404/410."""
        self._check_rate_limit()
        req = self._client.build_request("GET", url, params=params, headers=self._headers)
        key = str(req.url)
        cached = self.page_cache.get(key) if cache else None
        if cached:
            req.headers["If-None-Match"] = cached.etag
        self.stats["requests"] += 1
        try:
            resp = self._client.send(req)
        except httpx.TimeoutException:
            raise self._fail(f"request timed out ({req.url.path})") from None
        except httpx.HTTPError as exc:
            detail = (str(exc).strip().splitlines() or [""])[0]
            raise self._fail(f"request failed ({type(exc).__name__}{': ' + detail if detail else ''})") from None
        status, headers = resp.status_code, resp.headers
        if status == 304 and cached:
            self.stats["not_modified"] += 1
            return cached.payload, cached.next_url
        if rate_limited(status, headers):
            until = self._set_retry(headers, status)
            raise SourceError(f"GitHub rate limit: retry after {iso(until)} (HTTP {status}, repo {self.repo})")
        if allow_404 and status in (404, 410):
            return None, None
        if status >= 300:
            hint = {401: " (bad or expired token?)", 404: " (no such repo, or no access)"}.get(status, "")
            raise self._fail(f"HTTP {status} from GET {resp.request.url.path}{hint}")
        try:
            payload = resp.json()
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
            ctype = headers.get("content-type", "?")
            raise self._fail(f"response is not JSON (HTTP {status}, content-type {ctype})") from None
        if headers.get("x-ratelimit-remaining") == "0":
            self._set_retry(headers, status)
        next_url = resp.links.get("next", {}).get("url")
        if next_url and origin(next_url) != origin(self.api_url):
            raise self._fail(f"pagination link leaves {origin(self.api_url)[1]}; refusing to follow it")
        etag = headers.get("etag")
        if etag and cache:
            self.page_cache.put(key, Page(etag, payload, next_url))
        else:
            self.page_cache.drop(key)
        return payload, next_url

    # -- mapping ----------------------------------------------------------------------------------

    def _has_labels(self, names: list[str]) -> bool:
        have = {n.lower() for n in names}
        return all(lb.lower() in have for lb in self.labels)

    def _to_issue(self, item: Any) -> Issue:
        """Map one API item; raise ValueError with a short reason when it is malformed."""
        if not isinstance(item, dict):
            raise ValueError(f"expected a JSON object, got {type(item).__name__}")
        number = item.get("number")
        if not isinstance(number, int) or isinstance(number, bool):
            raise ValueError("missing or non-integer 'number'")
        if not isinstance(item.get("title"), str):
            raise ValueError("missing or non-string 'title'")
        raw_labels = item.get("labels") or []
        if not isinstance(raw_labels, list):
            raise ValueError("'labels' is not a list")
        names = [_label_name(lb, n) for n, lb in enumerate(raw_labels)]
        for name in ("state", "html_url", "author_association"):
            if item.get(name) is not None and not isinstance(item.get(name), str):
                raise ValueError(f"'{name}' is not a string")
        gh_state = item.get("state") or "open"
        state = self.ready_state if gh_state == "open" and self._has_labels(names) else gh_state
        url, author = item.get("html_url"), item.get("author_association")
        try:
            return Issue(
                id=str(number),
                title=item["title"],
                state=state,
                body=item.get("body") or "",
                labels=names,
                updated_at=item.get("updated_at"),
                **{"url": url},  # an extra field (Issue allows extras): not in its signature
                author_association=author,
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"{'.'.join(map(str, first.get('loc', ()))) or 'item'}: {first.get('msg')}") from None

    # -- IssueSource --------------------------------------------------------------------------------

    def poll(self) -> PollResult:
        """The ready open issues (all pages); one ``github:<repo>#<index>: reason`` line per bad item."""
        with self._lock:
            result = PollResult()
            self.page_cache.begin_poll()
            complete = False
            try:
                self._walk_pages(result)
                complete = True
            finally:
                self.page_cache.end_poll(complete)
            for line in result.errors:
                log.warning("%s", line)
            return result

    def _walk_pages(self, result: PollResult) -> None:
        """Follow the ``next`` links (at most MAX_PAGES, never the same one twice) into ``result``."""
        first: dict[str, Any] = {"state": "open", "per_page": PER_PAGE}
        if self.labels:
            first["labels"] = ",".join(self.labels)
        params: dict[str, Any] | None = first
        url: str | None = f"{self.api_url}/repos/{self.repo}/issues"
        index, pages, visited = 0, 0, set()
        while url:
            if pages >= MAX_PAGES or url in visited:
                result.errors.append(f"github:{self.repo}: stopped after {pages} pages (pagination limit)")
                return
            visited.add(url)
            payload, url = self._get(url, params)
            params, pages = None, pages + 1
            if not isinstance(payload, list):
                raise self._fail(
                    f"unexpected payload on page {pages}: expected a JSON array, got {type(payload).__name__}"
                )
            for item in payload:
                where, index = f"github:{self.repo}#{index}", index + 1
                if isinstance(item, dict) and "pull_request" in item:
                    continue
                try:
                    issue = self._to_issue(item)
                except ValueError as exc:
                    result.errors.append(f"{where}: {exc}")
                    continue
                except Exception as exc:
                    result.errors.append(f"{where}: rejected: {type(exc).__name__}: {_first_line(exc)}")
                    continue
                result.seen += 1
                if issue.state == self.ready_state:
                    result.issues.append(issue)

    def get(self, issue_id: str) -> Issue | None:
        """One issue by number (``"42"``); None when it does not exist, is a pull request or id is not a number."""
        if not re.fullmatch(r"[0-9]{1,12}", str(issue_id)):
            return None
        with self._lock:
            payload, _ = self._get(
                f"{self.api_url}/repos/{self.repo}/issues/{int(issue_id)}", allow_404=True, cache=False
            )
        if payload is None or (isinstance(payload, dict) and "pull_request" in payload):
            return None
        try:
            return self._to_issue(payload)
        except Exception as exc:
            raise MalformedIssue(self._scrub(f"github:{self.repo}#{issue_id}: {_first_line(exc)}")) from None


def _label_name(label: Any, n: int) -> str:
    """A label as the API gives it: its name, or an object with a string ``name``; else ValueError."""
    name = label.get("name") if isinstance(label, dict) else label
    if not isinstance(name, str):
        raise ValueError(f"labels[{n}]: expected a name or an object with a string 'name'")
    return name


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
