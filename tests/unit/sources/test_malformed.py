"""Per-item containment (issue 20, item 3): a node or item of the wrong shape, at any level, is one skipped
issue with its reason, for the Linear, GitHub and file sources alike; only a malformed page is a source error;
``get`` of such an issue raises MalformedIssue and ``explain`` says so. Against the local fakes of Linear's
GraphQL API and GitHub's REST API; properties with hypothesis over node shapes."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factory_worker.context import Context
from factory_worker.loop.iteration import iterate
from factory_worker.loop.presence import publish_slots
from factory_worker.ops.operations import explain
from factory_worker.sources import FileSource, MalformedIssue, PollResult, SourceError
from factory_worker.sources.linear import LinearSource
from factory_worker.sources.linear_api import LinearAPI
from tests.fake_linear import FakeLinear
from tests.unit.github_fake import Reply, gh, item  # noqa: F401 (gh: the fixture)
from tests.unit.github_fake import source as gh_source

TOKEN = "lin_api_test"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

#: any JSON value (what a reply can hold where an object, a string or a list is expected)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8,
)


@pytest.fixture
def linear():
    with FakeLinear(TOKEN) as fake:
        fake.add("ENG-1", "good one")
        fake.add("ENG-2", "the tampered one", labels=("agent",), project="P")
        fake.add("ENG-3", "good three")
        yield fake


def linear_source(linear: FakeLinear) -> LinearSource:
    from factory_worker.config.linear import LinearSettings

    cfg = LinearSettings(team="ENG", api_url=linear.url)
    return LinearSource(cfg, ["ready"], api=LinearAPI(cfg.api_url, TOKEN, 5))


def _set(node: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    """``node`` with the value at ``path`` replaced (or deleted); the whole node when ``path`` is empty."""
    if not path:
        return value
    node = copy.deepcopy(node)
    target = node
    for step in path[:-1]:
        target = target[step]
    if delete and isinstance(target, dict):
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    return node


#: every place of a Linear node the source reads
LINEAR_PATHS = [
    (),
    ("state",),
    ("state", "name"),
    ("state", "type"),
    ("labels",),
    ("labels", "nodes"),
    ("labels", "nodes", 0),
    ("labels", "nodes", 0, "name"),
    ("team",),
    ("team", "key"),
    ("project",),
    ("project", "name"),
    ("identifier",),
    ("title",),
    ("description",),
    ("url",),
    ("updatedAt",),
    ("id",),
]


@pytest.mark.parametrize(
    "path, value, why",
    [
        (("state",), "Todo", "state: expected an object, got a string"),  # the finding: AttributeError before
        (("state",), None, "state: expected an object, got null"),
        (("state", "name"), 7, "state.name: expected a string, got a number"),
        (("labels",), "agent", "labels: expected an object, got a string"),
        (("labels", "nodes"), {"name": "agent"}, "labels.nodes: expected a list, got an object"),
        (("labels", "nodes", 0), "agent", "labels.nodes[0]: expected an object, got a string"),
        (("labels", "nodes", 0, "name"), ["agent"], "labels.nodes[0].name: expected a string, got a list"),
        (("team",), "ENG", "team: expected an object, got a string"),
        (("project",), ["P"], "project: expected an object, got a list"),
        (("identifier",), 12, "identifier: expected a string, got a number"),
        (("title",), None, "title: expected a string, got null"),
        (("description",), {"text": "x"}, "description: expected a string, got an object"),
        (("url",), 1.5, "url: expected a string, got a number"),
        ((), "ENG-2", "expected an object, got a string"),
    ],
)
def test_a_linear_node_of_the_wrong_shape_is_one_skipped_issue_with_its_reason(linear, path, value, why):
    linear.tamper["ENG-2"] = lambda node: _set(node, path, value)
    src = linear_source(linear)
    polled = src.poll()
    assert [i.id for i in polled.issues] == ["ENG-1", "ENG-3"]  # the others are dispatched as before
    assert len(polled.errors) == 1 and polled.errors[0].startswith("linear:ENG#1"), polled.errors
    assert why in polled.errors[0] and polled.seen == 3
    if path:  # a node that is not even an object has no identifier to ask for
        with pytest.raises(MalformedIssue, match="expected"):
            src.get("ENG-2")


@FUZZ
@given(path=st.sampled_from(LINEAR_PATHS), value=JSON, delete=st.booleans())
def test_no_linear_node_shape_escapes_the_poll(linear, path, value, delete):
    linear.tamper["ENG-2"] = lambda node: _set(node, path, value, delete)
    src = linear_source(linear)
    polled = src.poll()  # whatever the node holds: never an exception
    ids = [i.id for i in polled.issues]
    assert ids[0] == "ENG-1" and ids[-1] == "ENG-3" and len(ids) <= 3
    assert all(e.startswith("linear:ENG#1") for e in polled.errors) and len(polled.errors) <= 1
    try:
        got = src.get("ENG-2")
    except MalformedIssue:
        got = "malformed"
    if path:  # get and poll agree: malformed for both, or an issue for both
        assert (got == "malformed") == bool(polled.errors), (got, polled.errors)


@pytest.mark.parametrize(
    "page",
    [
        {"nodes": [], "pageInfo": "end"},
        {"nodes": [], "pageInfo": {"hasNextPage": "yes", "endCursor": "1"}},
        {"nodes": [], "pageInfo": {"hasNextPage": True, "endCursor": 100}},
        {"nodes": {"0": {}}, "pageInfo": {}},
    ],
)
def test_a_malformed_linear_page_is_a_source_error_for_that_poll(linear, page):
    linear.tamper_page = lambda _: page
    with pytest.raises(SourceError, match="linear Issues"):
        linear_source(linear).poll()


@pytest.mark.parametrize("errors", ["boom", {"message": "x"}, [{"message": "x", "extensions": "RATELIMITED"}], [7]])
def test_a_linear_error_reply_of_any_shape_is_one_source_error(linear, errors):
    linear.tamper_page = None
    linear.route = lambda handler: (200, {"errors": errors}, {})
    with pytest.raises(SourceError, match="linear Issues"):
        linear_source(linear).poll()


# -- GitHub ---------------------------------------------------------------------------------------------------

#: every place of a GitHub item the source reads
GITHUB_PATHS = [
    (),
    ("number",),
    ("title",),
    ("state",),
    ("body",),
    ("labels",),
    ("labels", 0),
    ("labels", 0, "name"),
    ("updated_at",),
    ("html_url",),
    ("author_association",),
]


@pytest.mark.parametrize(
    "path, value, why",
    [
        (("labels", 0), 5, "labels[0]: expected a name or an object"),
        (("labels", 0, "name"), None, "labels[0]: expected a name or an object"),
        (("html_url",), {"href": "x"}, "'html_url' is not a string"),
        (("state",), ["open"], "'state' is not a string"),
        (("author_association",), 3, "'author_association' is not a string"),
    ],
)
def test_a_github_item_of_the_wrong_shape_is_one_skipped_issue_with_its_reason(gh, path, value, why):
    bad = _set(item(2, author_association="MEMBER"), path, value)
    gh.route = lambda req: Reply(200, [item(1), bad, item(3)] if req.path.endswith("/issues") else bad)
    src = gh_source(gh)
    polled = src.poll()
    assert [i.id for i in polled.issues] == ["1", "3"]
    assert len(polled.errors) == 1 and polled.errors[0].startswith(f"github:o/r#1: {why}"), polled.errors
    with pytest.raises(MalformedIssue, match="github:o/r#2"):
        src.get("2")


@FUZZ
@given(path=st.sampled_from(GITHUB_PATHS), value=JSON, delete=st.booleans())
def test_no_github_item_shape_escapes_the_poll(gh, path, value, delete):
    bad = _set(item(2), path, value, delete)
    gh.route = lambda req: Reply(200, [item(1), bad, item(3)])
    polled = gh_source(gh).poll()
    ids = [i.id for i in polled.issues]
    assert ids[0] == "1" and ids[-1] == "3" and len(ids) <= 3
    assert all(e.startswith("github:o/r#1: ") for e in polled.errors) and len(polled.errors) <= 1


def test_a_github_page_nested_deeper_than_the_parser_is_a_source_error(gh):
    gh.route = lambda req: Reply(200, b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(SourceError, match="not JSON"):  # was a RecursionError out of the poll
        gh_source(gh).poll()


# -- the file source --------------------------------------------------------------------------------------------

LINE = st.one_of(
    JSON.map(json.dumps),
    st.text(max_size=30),
    st.fixed_dictionaries(
        {"id": st.text(min_size=1, max_size=8), "title": JSON, "state": JSON},
        optional={"labels": JSON, "body": JSON, "updated_at": JSON},
    ).map(json.dumps),
)


@FUZZ
@given(lines=st.lists(LINE, max_size=6))
def test_no_file_line_escapes_the_poll(tmp_path, lines):
    path = tmp_path / "issues.jsonl"
    good = [
        json.dumps({"id": "G-1", "title": "g", "state": "ready"}),
        json.dumps({"id": "G-2", "title": "g", "state": "ready"}),
    ]
    path.write_text("\n".join([good[0], *[x.replace("\n", " ") for x in lines], good[1]]) + "\n")
    polled = FileSource(path).poll()
    assert {"G-1", "G-2"} <= {i.id for i in polled.issues}


def test_get_of_an_id_known_only_from_a_malformed_line_says_why(tmp_path):
    path = tmp_path / "issues.jsonl"
    path.write_text('{"id": "F-1", "title": 5, "state": "ready"}\n{"id": "F-2", "title": "ok", "state": "ready"}\n')
    src = FileSource(path)
    with pytest.raises(MalformedIssue, match=r"issues.jsonl:1: title"):
        src.get("F-1")
    assert src.get("F-2").title == "ok" and src.get("F-3") is None


# -- the loop and explain ---------------------------------------------------------------------------------------


class Broken:
    """A custom source (``module:Class``) with a bug: its poll raises AttributeError."""

    def poll(self) -> PollResult:
        return {}.get("x").get("y")  # type: ignore[union-attr]

    def get(self, issue_id: str):
        return None


def test_a_poll_raising_anything_is_one_source_error_line(fake_redis, make_settings):
    ctx = Context(make_settings(), fake_redis, Broken())
    with pytest.raises(SourceError, match="^source poll failed: AttributeError: 'NoneType' object"):
        iterate(ctx, None, dry_run=True)


def test_a_malformed_linear_node_is_skipped_in_the_report_and_explained(fake_redis, make_settings, linear):
    linear.tamper["ENG-2"] = lambda node: {**node, "state": "Todo"}
    ctx = Context(make_settings(), fake_redis, linear_source(linear))
    publish_slots(ctx, "agents@test", 10)
    report = iterate(ctx, None, dry_run=True)  # was: AttributeError out of the poll, nothing dispatched
    assert [d["issue"] for d in report.dispatches] == ["ENG-1", "ENG-3"]
    assert report.skipped == [
        {
            "issue": "linear:ENG#1 (ENG-2)",
            "reason": "source: linear:ENG#1 (ENG-2): state: expected an object, got a string; skipped",
        }
    ]
    e = explain(ctx, "ENG-2")
    assert e.state == "malformed" and "state: expected an object, got a string" in e.text
    assert explain(ctx, "ENG-1").state == "claimable"
