"""The GitHub source's bounds against the local fake: label filter, author association, a page cache that
does not grow, and rate-limit waits that never exceed ``source.github_max_retry_after_s``."""

from __future__ import annotations

import email.utils

import pytest

from factory_worker.config.settings import SourceSettings
from factory_worker.sources import SourceError
from factory_worker.sources.github import GitHubSource
from factory_worker.sources.github_http import retry_wait_s
from tests.unit.github_fake import TOKEN, Clock, Reply, Req, gh, item, source  # noqa: F401 (gh: the fixture)


def from_settings(gh, **kw) -> GitHubSource:
    kw.setdefault("github_labels", ["agent"])
    return GitHubSource.from_settings(SourceSettings(kind="github", github_repo="o/r", github_api_url=gh.url, **kw))


# -- labels and author association ---------------------------------------------------------------------------
def test_required_labels_join_the_api_filter_once_whatever_their_case(gh):
    gh.route = lambda req: Reply(200, [item(1, labels=("agent", "Factory")), item(2, labels=("agent",))])
    src = from_settings(gh, required_labels=["factory", "AGENT"])
    result = src.poll()
    assert gh.requests[0].query["labels"] == ["agent,factory"]
    assert [i.id for i in result.issues] == ["1"] and result.seen == 2  # #2 lacks "factory": not ready


def test_required_labels_alone_are_a_label_filter(gh):
    gh.route = lambda req: Reply(200, [])
    from_settings(gh, github_labels=[], required_labels=["factory"]).poll()
    assert gh.requests[0].query["labels"] == ["factory"]


def test_all_open_issues_only_by_explicit_opt_in(gh):
    gh.route = lambda req: Reply(200, [item(1, labels=())])
    src = from_settings(gh, github_labels=[], github_all_open_issues=True)
    assert [i.id for i in src.poll().issues] == ["1"] and "labels" not in gh.requests[0].query
    settings = SourceSettings(kind="github", github_repo="o/r", github_api_url=gh.url, github_labels=["a"])
    settings.github_labels = []  # mutated after validation: the source itself still refuses
    with pytest.raises(SourceError, match="github_all_open_issues"):
        GitHubSource.from_settings(settings)


def test_author_association_is_mapped_by_poll_and_get(gh):
    items = [
        item(1, author_association="OWNER"),
        item(2, author_association="NONE"),
        item(3),
        item(4, author_association=["not", "a", "string"]),
    ]
    gh.route = lambda req: Reply(200, items if req.path.endswith("/issues") else items[1])
    src = source(gh)
    polled = src.poll()
    assert [i.author_association for i in polled.issues] == ["OWNER", "NONE", None]
    assert polled.errors == ["github:o/r#3: 'author_association' is not a string"]  # a wrong type: skipped
    assert src.get("2").author_association == "NONE"


# -- the page cache -------------------------------------------------------------------------------------------
def cursor_pages(gh, polls: dict[str, int], pages: int = 3):
    """A route whose page links carry a new cursor every poll (as a server may), each page with an ETag."""

    def route(req: Req) -> Reply:
        page = int(req.query.get("page", ["1"])[0])
        if page == 1:
            polls["n"] += 1
        cursor = req.query.get("after", [str(polls["n"])])[0]
        etag = f'"p{page}-{cursor}"'
        if req.headers.get("if-none-match") == etag:
            return Reply(304, headers={"ETag": etag})
        link = {}
        if page < pages:
            link["Link"] = f'<{gh.url}/repos/o/r/issues?page={page + 1}&after={cursor}>; rel="next"'
        return Reply(200, [item(page)], {"ETag": etag, **link})

    return route


def test_page_cache_keeps_only_the_latest_polls_pages_over_100_polls(gh):
    polls = {"n": 0}
    gh.route = cursor_pages(gh, polls)
    src = source(gh)
    sizes = []
    for _ in range(100):
        assert [i.id for i in src.poll().issues] == ["1", "2", "3"]
        sizes.append(len(src.page_cache))
    urls = {(r.path, tuple(sorted((k, tuple(v)) for k, v in r.query.items()))) for r in gh.requests}
    assert len(urls) == 1 + 2 * 100  # distinct page URLs seen: what a cache without eviction would hold
    assert max(sizes) <= 3 and sizes[-1] == 3


def test_a_poll_cut_short_keeps_the_last_complete_polls_pages_and_no_more(gh):
    polls = {"n": 0}
    ok = cursor_pages(gh, polls)
    src = source(gh)
    for _ in range(20):
        gh.route = ok
        src.poll()
        failing = {"left": 2}

        def cut(req: Req, failing: dict[str, int] = failing) -> Reply:
            failing["left"] -= 1
            return ok(req) if failing["left"] >= 0 else Reply(500, {})

        gh.route = cut
        with pytest.raises(SourceError, match="HTTP 500"):
            src.poll()
        assert len(src.page_cache) <= 2 * 3
    gh.route = ok
    src.poll()
    assert len(src.page_cache) == 3


def test_a_rate_limited_poll_keeps_the_etags_for_the_next_one(gh):
    clock = Clock()
    gh.route = lambda req: Reply(
        200, [item(1)], {"ETag": '"v1"', "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(clock.t) + 30)}
    )
    src = source(gh, clock=clock)
    src.poll()
    with pytest.raises(SourceError, match="rate limit"):
        src.poll()  # refused before any request
    assert len(src.page_cache) == 1
    clock.t += 31
    gh.route = lambda req: Reply(304, headers={"ETag": '"v1"'})
    assert [i.id for i in src.poll().issues] == ["1"]
    assert gh.requests[-1].headers["if-none-match"] == '"v1"'


# -- Retry-After ----------------------------------------------------------------------------------------------
NOW = 1_700_000_000.0


def http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


@pytest.mark.parametrize(
    "headers, wait",
    [
        ({"retry-after": "30"}, 30),
        ({"retry-after": "0"}, 0),
        ({"retry-after": "inf"}, 300),
        ({"retry-after": "Infinity"}, 300),
        ({"retry-after": "1e999"}, 300),
        ({"retry-after": "99999999999999999999"}, 300),
        ({"retry-after": "-5"}, 60),  # not a delay: the default applies
        ({"retry-after": "-inf"}, 60),
        ({"retry-after": "nan"}, 60),
        ({"retry-after": "soon"}, 60),
        ({"retry-after": "-5", "x-ratelimit-reset": str(int(NOW) + 42)}, 42),  # ...or the next header
        ({"retry-after": http_date(NOW + 120)}, 120),
        ({"retry-after": http_date(NOW + 10 * 86400)}, 300),
        ({"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}, 300),
        ({"retry-after": http_date(NOW - 600)}, 0),
        ({"retry-after": "Mon, 32 Foo 2024 25:61:00 GMT"}, 60),
        ({"x-ratelimit-reset": str(int(NOW) + 10**12)}, 300),
        ({"x-ratelimit-reset": "inf"}, 300),
        ({"x-ratelimit-reset": "nan"}, 60),
        ({"x-ratelimit-reset": str(int(NOW) - 5)}, 0),
        ({}, 60),
    ],
)
def test_retry_wait_is_within_zero_and_the_cap(headers, wait):
    assert retry_wait_s(headers, NOW, cap=300.0) == pytest.approx(wait, abs=1)


def test_the_default_wait_is_capped_too():
    assert retry_wait_s({}, NOW, cap=5.0) == 5.0


@pytest.mark.parametrize("retry_after", ["inf", "1e12", "-1", "nonsense", "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_no_reply_disables_the_source_beyond_the_cap(gh, retry_after):
    clock = Clock(NOW)
    gh.route = lambda req: Reply(429, {"message": "slow down"}, {"Retry-After": retry_after})
    src = source(gh, clock=clock, max_retry_after_s=120.0)
    with pytest.raises(SourceError, match="rate limit") as err:
        src.poll()
    assert TOKEN not in str(err.value) and "\n" not in str(err.value)
    clock.t += 59
    with pytest.raises(SourceError, match="rate limit"):
        src.get("1")
    assert gh.hits == 1  # nothing sent while waiting
    clock.t = NOW + 120.5
    gh.route = lambda req: Reply(200, [item(1)])
    assert [i.id for i in src.poll().issues] == ["1"] and gh.hits == 2  # back, without a restart


def test_max_retry_after_comes_from_settings(gh):
    clock = Clock(NOW)
    src = from_settings(gh, github_max_retry_after_s=10)
    src._clock = clock  # the settings path builds its own clock; the test drives time by hand
    gh.route = lambda req: Reply(
        403, {"message": "rate"}, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(NOW) + 3600)}
    )
    with pytest.raises(SourceError, match="rate limit"):
        src.poll()
    clock.t = NOW + 10.5
    gh.route = lambda req: Reply(200, [])
    assert src.poll().issues == [] and gh.hits == 2
