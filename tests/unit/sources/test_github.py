"""The GitHub issue source against a local HTTP server (no network)."""

from __future__ import annotations

import logging

import pytest

from factory_worker.config.settings import SourceSettings
from factory_worker.sources import IssueSource, SourceError, load_source
from factory_worker.sources.github import GitHubSource
from tests.unit.github_fake import TOKEN, Clock, Reply, Req, gh, item, source  # noqa: F401 (gh: the fixture)


def test_pagination_three_pages_prs_skipped_labels_in_query(gh):
    pages = {
        "1": [item(1), item(2, pull_request={"url": "x"}), item(3)],
        "2": [item(4), item(5, pull_request={})],
        "3": [item(6, labels=("agent", "Bug"))],
    }

    def route(req: Req) -> Reply:
        assert req.path == "/repos/o/r/issues"
        page = req.query.get("page", ["1"])[0]
        headers = {}
        if page != "3":
            nxt = f"{gh.url}/repos/o/r/issues?state=open&labels=agent&per_page=100&page={int(page) + 1}"
            headers["Link"] = f'<{nxt}>; rel="next", <{gh.url}/repos/o/r/issues?page=3>; rel="last"'
        return Reply(200, pages[page], headers)

    gh.route = route
    src = source(gh)
    result = src.poll()
    assert [i.id for i in result.issues] == ["1", "3", "4", "6"]
    assert result.errors == [] and result.seen == 4 and gh.hits == 3
    first = gh.requests[0]
    assert first.query == {"state": ["open"], "labels": ["agent"], "per_page": ["100"]}
    assert first.headers["accept"] == "application/vnd.github+json"
    assert first.headers["user-agent"].startswith("factory-worker")
    issue = result.issues[-1]
    assert issue.state == "ready" and issue.title == "issue 6" and issue.body == ""
    assert issue.labels == ["agent", "Bug"] and issue.updated_at == "2024-05-01T00:00:00Z"
    assert issue.model_dump()["url"] == "https://github.com/o/r/issues/6"
    assert isinstance(src, IssueSource)


def test_several_labels_joined_and_checked_client_side(gh):
    gh.route = lambda req: Reply(200, [item(1, labels=("a", "B")), item(2, labels=("a",))])
    result = source(gh, labels=["a", "b"], ready_states=["todo", "ready"]).poll()
    assert gh.requests[0].query["labels"] == ["a,b"]
    # the server ignored the filter: #2 lacks "b", so it is seen but not ready; labels match case-insensitively
    assert [(i.id, i.state) for i in result.issues] == [("1", "todo")] and result.seen == 2


def test_no_labels_means_every_open_issue_and_no_token_no_auth_header(gh):
    gh.route = lambda req: Reply(200, [item(1, labels=())])
    result = source(gh, labels=[], token=None).poll()
    assert [i.id for i in result.issues] == ["1"]
    assert "labels" not in gh.requests[0].query and "authorization" not in gh.requests[0].headers


def test_etag_304_reuses_cached_issues(gh):
    def route(req: Req) -> Reply:
        if req.headers.get("if-none-match") == '"v1"':
            return Reply(304, headers={"ETag": '"v1"'})
        return Reply(200, [item(1), item(2)], {"ETag": '"v1"'})

    gh.route = route
    src = source(gh)
    first = src.poll()
    second = src.poll()
    assert gh.hits == 2 and "if-none-match" not in gh.requests[0].headers
    assert gh.requests[1].headers["if-none-match"] == '"v1"'
    assert [i.id for i in second.issues] == [i.id for i in first.issues] == ["1", "2"]
    assert src.stats == {"requests": 2, "not_modified": 1}


def test_etag_per_page_with_pagination(gh):
    def route(req: Req) -> Reply:
        page = req.query.get("page", ["1"])[0]
        etag = f'"p{page}"'
        if req.headers.get("if-none-match") == etag:
            return Reply(304)
        link = {"Link": f'<{gh.url}/repos/o/r/issues?page=2>; rel="next"'} if page == "1" else {}
        return Reply(200, [item(int(page))], {"ETag": etag, **link})

    gh.route = route
    src = source(gh)
    assert [i.id for i in src.poll().issues] == ["1", "2"]
    assert [i.id for i in src.poll().issues] == ["1", "2"]
    assert gh.hits == 4 and src.stats["not_modified"] == 2


def test_changed_etag_refreshes(gh):
    version = {"v": 1}

    def route(req: Req) -> Reply:
        etag = f'"v{version["v"]}"'
        if req.headers.get("if-none-match") == etag:
            return Reply(304)
        return Reply(200, [item(n) for n in range(1, version["v"] + 1)], {"ETag": etag})

    gh.route = route
    src = source(gh)
    assert len(src.poll().issues) == 1
    version["v"] = 2
    assert len(src.poll().issues) == 2


def test_rate_limit_403_remaining_zero_uses_reset(gh):
    clock = Clock()
    reset = int(clock.t) + 120
    gh.route = lambda req: Reply(
        403, {"message": "API rate limit exceeded"}, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)}
    )
    src = source(gh, clock=clock)
    with pytest.raises(SourceError, match="GitHub rate limit: retry after"):
        src.poll()
    assert gh.hits == 1
    clock.t += 60
    with pytest.raises(SourceError, match="GitHub rate limit"):
        src.poll()
    with pytest.raises(SourceError, match="GitHub rate limit"):
        src.get("1")
    assert gh.hits == 1  # nothing sent while waiting
    clock.t = reset + 1
    gh.route = lambda req: Reply(200, [item(1)])
    assert [i.id for i in src.poll().issues] == ["1"] and gh.hits == 2


def test_rate_limit_429_retry_after(gh):
    clock = Clock()
    gh.route = lambda req: Reply(429, {"message": "slow down"}, {"Retry-After": "30"})
    src = source(gh, clock=clock)
    with pytest.raises(SourceError, match="rate limit") as err:
        src.poll()
    assert TOKEN not in str(err.value)
    clock.t += 29
    with pytest.raises(SourceError, match="rate limit"):
        src.poll()
    assert gh.hits == 1
    clock.t += 2
    gh.route = lambda req: Reply(200, [])
    assert src.poll().issues == [] and gh.hits == 2


def test_secondary_rate_limit_403_retry_after_real_clock(gh):
    gh.route = lambda req: Reply(403, {"message": "secondary rate limit"}, {"Retry-After": "0.2"})
    src = source(gh)
    with pytest.raises(SourceError, match="rate limit"):
        src.poll()
    with pytest.raises(SourceError, match="rate limit"):
        src.poll()
    assert gh.hits == 1
    import time

    time.sleep(0.25)
    gh.route = lambda req: Reply(200, [item(1)])
    assert len(src.poll().issues) == 1 and gh.hits == 2


def test_remaining_zero_on_success_defers_next_call(gh):
    clock = Clock()
    gh.route = lambda req: Reply(
        200, [item(1)], {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(clock.t) + 10)}
    )
    src = source(gh, clock=clock)
    assert len(src.poll().issues) == 1
    with pytest.raises(SourceError, match="rate limit"):
        src.poll()
    assert gh.hits == 1


def test_plain_403_is_not_rate_limit(gh):
    gh.route = lambda req: Reply(403, {"message": "Forbidden"})
    src = source(gh)
    for _ in range(2):
        with pytest.raises(SourceError, match="HTTP 403") as err:
            src.poll()
        assert "o/r" in str(err.value) and "rate limit" not in str(err.value)
    assert gh.hits == 2


@pytest.mark.parametrize("status", [401, 404, 500, 502])
def test_http_errors_one_line_without_token(gh, status, caplog):
    gh.route = lambda req: Reply(status, {"message": f"boom {TOKEN}"})
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SourceError) as err:
        source(gh).poll()
    msg = str(err.value)
    assert f"HTTP {status}" in msg and "o/r" in msg and "\n" not in msg
    assert TOKEN not in msg and TOKEN not in caplog.text
    assert gh.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


def test_connection_refused(gh):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = GitHubSource(f"http://127.0.0.1:{port}", "o/r", token=TOKEN)
    with pytest.raises(SourceError, match="request failed") as err:
        src.poll()
    assert "o/r" in str(err.value) and TOKEN not in str(err.value) and "\n" not in str(err.value)


def test_non_json_body_is_source_error(gh):
    gh.route = lambda req: Reply(200, b"<html>maintenance</html>")
    with pytest.raises(SourceError, match="not JSON"):
        source(gh).poll()


def test_payload_not_a_list_is_source_error(gh):
    gh.route = lambda req: Reply(200, {"message": "weird"})
    with pytest.raises(SourceError, match="expected a JSON array"):
        source(gh).poll()


def test_malformed_items_reported_and_skipped(gh):
    bad_number = item(1)
    del bad_number["number"]
    bad_title = item(2)
    bad_title["title"] = None
    bad_labels = item(5)
    bad_labels["labels"] = "agent"
    gh.route = lambda req: Reply(200, [bad_number, item(3), "junk", bad_title, bad_labels])
    result = source(gh).poll()
    assert [i.id for i in result.issues] == ["3"] and result.seen == 1
    assert result.errors == [
        "github:o/r#0: missing or non-integer 'number'",
        "github:o/r#2: expected a JSON object, got str",
        "github:o/r#3: missing or non-string 'title'",
        "github:o/r#4: 'labels' is not a list",
    ]


def test_foreign_next_link_is_refused(gh):
    gh.route = lambda req: Reply(200, [item(1)], {"Link": '<https://evil.example/steal?page=2>; rel="next"'})
    with pytest.raises(SourceError, match="refusing"):
        source(gh).poll()
    assert gh.hits == 1


def test_pagination_loop_is_bounded(gh):
    gh.route = lambda req: Reply(200, [item(1)], {"Link": f'<{gh.url}/repos/o/r/issues?page=1>; rel="next"'})
    result = source(gh).poll()
    assert gh.hits == 2 and any("pagination" in e for e in result.errors)


def test_get(gh):
    def route(req: Req) -> Reply:
        n = req.path.rsplit("/", 1)[-1]
        if req.path.startswith("/repos/o/r/issues/") and n in ("7", "8", "9"):
            extra = {"state": "closed"} if n == "8" else {"pull_request": {}} if n == "9" else {}
            return Reply(200, item(int(n), title="<b>hi</b>", **extra))
        return Reply(404, {"message": "Not Found"})

    gh.route = route
    src = source(gh)
    issue = src.get("7")
    assert issue is not None and issue.id == "7" and issue.state == "ready" and issue.title == "<b>hi</b>"
    assert src.get("8").state == "closed"
    assert src.get("9") is None  # a pull request
    assert src.get("404") is None
    assert src.get("../etc") is None and src.get("") is None
    assert [r.path for r in gh.requests] == [
        "/repos/o/r/issues/7",
        "/repos/o/r/issues/8",
        "/repos/o/r/issues/9",
        "/repos/o/r/issues/404",
    ]
    assert gh.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


def test_get_open_without_labels_is_open(gh):
    gh.route = lambda req: Reply(200, item(3, labels=("other",)))
    assert source(gh).get("3").state == "open"


def test_get_server_error(gh):
    gh.route = lambda req: Reply(500, {})
    with pytest.raises(SourceError, match="HTTP 500"):
        source(gh).get("3")


def test_from_settings_and_load_source(gh, monkeypatch, caplog):
    monkeypatch.setenv("MY_GH_TOKEN", TOKEN)
    gh.route = lambda req: Reply(200, [item(1, labels=("agent", "x"))])
    settings = SourceSettings(
        kind="github",
        github_repo="o/r",
        github_labels=["agent", "x"],
        github_api_url=gh.url + "/",
        github_token_env="MY_GH_TOKEN",
    )
    caplog.set_level(logging.DEBUG)
    src = load_source(settings)
    assert isinstance(src, GitHubSource) and TOKEN not in repr(src)
    assert [i.id for i in src.poll().issues] == ["1"]
    assert gh.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert gh.requests[0].path == "/repos/o/r/issues" and gh.requests[0].query["labels"] == ["agent,x"]
    assert TOKEN not in caplog.text


def test_from_settings_without_token(gh, monkeypatch):
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    gh.route = lambda req: Reply(200, [])
    src = load_source(
        SourceSettings(kind="github", github_repo="o/r", github_api_url=gh.url, github_all_open_issues=True)
    )
    assert src.poll().issues == [] and "authorization" not in gh.requests[0].headers


@pytest.mark.parametrize("repo", [None, "", "justname", "o/r/x", "o r/x", "/r", "o/"])
def test_from_settings_bad_repo(repo):
    with pytest.raises(SourceError, match="owner/name"):
        load_source(SourceSettings(kind="github", github_repo=repo, github_labels=["agent"]))


def test_a_slow_github_times_out_in_one_line_and_the_next_poll_works(gh):
    import time

    def slow(req: Req) -> Reply:
        time.sleep(0.6)
        return Reply(200, [item(1)])

    gh.route = slow
    src = source(gh, timeout_s=0.2)
    with pytest.raises(SourceError, match="timed out") as err:
        src.poll()
    assert "\n" not in str(err.value) and TOKEN not in str(err.value)
    gh.route = lambda req: Reply(200, [item(1)])
    assert [i.id for i in src.poll().issues] == ["1"]
