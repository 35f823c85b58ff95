"""The file issue source and load_source."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest

from factory_worker.config.settings import SourceSettings
from factory_worker.sources import FileSource, Issue, IssueSource, PollResult, SourceError, load_source

ROOT = Path(__file__).resolve().parents[3]


def jsonl(path: Path, *rows: object) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def ids(result: PollResult) -> list[str]:
    return [i.id for i in result.issues]


def test_jsonl_ready_filter_and_blank_lines(tmp_path):
    path = jsonl(
        tmp_path / "issues.jsonl",
        {"id": "A", "title": "a", "state": "ready", "labels": ["x"], "body": "b", "updated_at": "2024"},
        "",
        "   ",
        {"id": "B", "title": "b", "state": "blocked"},
        {"id": "C", "title": "c", "state": "todo", "extra": {"k": 1}},
    )
    src = FileSource(path, ["ready"])
    result = src.poll()
    assert ids(result) == ["A"] and result.errors == [] and result.seen == 3
    assert result.issues[0].labels == ["x"] and result.issues[0].body == "b"
    assert ids(FileSource(path, ["ready", "todo"]).poll()) == ["A", "C"]
    assert isinstance(src, IssueSource)


def test_json_array_and_issues_object(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"id": "1", "title": "t", "state": "ready"}]))
    (tmp_path / "b.json").write_text(json.dumps({"issues": [{"id": "2", "title": "t", "state": "ready"}]}))
    assert ids(FileSource(tmp_path / "a.json").poll()) == ["1"]
    assert ids(FileSource(tmp_path / "b.json").poll()) == ["2"]


def test_directory_sorted_non_recursive_other_extensions_ignored(tmp_path):
    jsonl(tmp_path / "b.jsonl", {"id": "B", "title": "b", "state": "ready"})
    jsonl(tmp_path / "a.jsonl", {"id": "A", "title": "a", "state": "ready"})
    (tmp_path / "c.json").write_text(json.dumps([{"id": "C", "title": "c", "state": "ready"}]))
    (tmp_path / "notes.txt").write_text("not json at all")
    (tmp_path / "sub").mkdir()
    jsonl(tmp_path / "sub" / "d.jsonl", {"id": "D", "title": "d", "state": "ready"})
    result = FileSource(tmp_path).poll()
    assert ids(result) == ["A", "B", "C"] and result.errors == []


def test_malformed_lines_reported_with_file_and_line_and_skipped(tmp_path, caplog):
    path = jsonl(
        tmp_path / "issues.jsonl",
        {"id": "A", "title": "a", "state": "ready"},
        "{not json",
        {"title": "no id", "state": "ready"},
        {"id": 7, "title": "int id", "state": "ready"},
        {"id": "L", "title": "bad labels", "state": "ready", "labels": "x"},
        "[1, 2]",
        {"id": "Z", "title": "z", "state": "ready"},
    )
    with caplog.at_level(logging.WARNING, logger="factory_worker.sources.file"):
        result = FileSource(path).poll()
    assert ids(result) == ["A", "Z"]
    assert [e.split(": ")[0] for e in result.errors] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    assert "invalid JSON" in result.errors[0]
    assert "id" in result.errors[1] and "required" in result.errors[1].lower()
    assert "labels" in result.errors[3] and "expected a JSON object" in result.errors[4]
    assert all("\n" not in e for e in result.errors)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 5


def test_json_items_reported_by_index(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"id": "1", "title": "t", "state": "ready"}, {"id": "2", "state": "ready"}, 3]))
    result = FileSource(path).poll()
    assert ids(result) == ["1"]
    assert result.errors[0].startswith(f"{path}: item 1: title")
    assert result.errors[1].startswith(f"{path}: item 2: expected a JSON object")
    path.write_text('[{"id": "1",\n oops]')
    bad = FileSource(path).poll()
    assert bad.issues == [] and bad.errors[0].startswith(f"{path}:2: invalid JSON")


def test_duplicates_first_wins_later_reported(tmp_path):
    jsonl(
        tmp_path / "a.jsonl",
        {"id": "X", "title": "first", "state": "ready"},
        {"id": "X", "title": "second", "state": "ready"},
    )
    jsonl(tmp_path / "b.jsonl", {"id": "X", "title": "third", "state": "done"})
    src = FileSource(tmp_path)
    result = src.poll()
    assert [i.title for i in result.issues] == ["first"]
    assert len(result.errors) == 2 and all("duplicate id 'X'" in e for e in result.errors)
    assert result.errors[0].startswith(f"{tmp_path / 'a.jsonl'}:2:")
    assert f"first at {tmp_path / 'a.jsonl'}:1" in result.errors[1]
    assert src.get("X").title == "first"


def test_missing_path_raises_source_error(tmp_path):
    with pytest.raises(SourceError) as err:
        FileSource(tmp_path / "nope.jsonl").poll()
    assert "nope.jsonl" in str(err.value) and "no such file" in str(err.value)
    assert "\n" not in str(err.value)


def test_get_any_state_and_unknown(tmp_path):
    path = jsonl(tmp_path / "i.jsonl", {"id": "A", "title": "a", "state": "done"})
    src = FileSource(path)
    assert src.get("A").state == "done" and src.get("B") is None


def test_file_changes_are_seen(tmp_path):
    path = jsonl(tmp_path / "i.jsonl", {"id": "A", "title": "a", "state": "ready"})
    src = FileSource(path)
    assert ids(src.poll()) == ["A"]
    jsonl(path, {"id": "B", "title": "b", "state": "ready"})  # same size, same second
    assert ids(src.poll()) == ["B"]
    old = time.time() - 10
    os.utime(path, (old, old))
    assert ids(src.poll()) == ["B"]
    jsonl(path, {"id": "C", "title": "c", "state": "ready"})
    assert ids(src.poll()) == ["C"]


def test_ten_thousand_issues_is_fast(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"I-{n}",
                    "title": f"issue {n}",
                    "state": "ready" if n % 2 else "done",
                    "labels": ["a", "b"],
                    "body": "x" * 100,
                }
            )
            + "\n"
            for n in range(10_000)
        )
    )
    old = time.time() - 10
    os.utime(path, (old, old))
    src = FileSource(path)
    t0 = time.perf_counter()
    first = src.poll()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = src.poll()
    warm = time.perf_counter() - t0
    assert len(first.issues) == len(again.issues) == 5000 and first.seen == 10_000
    assert cold < 2.0 and warm < 0.2, (cold, warm)


def test_issue_text_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = jsonl(
        tmp_path / "i.jsonl",
        {
            "id": "A",
            "title": f"$(touch {marker}); touch {marker}",
            "state": "ready",
            "body": f"`touch {marker}` __import__('os').system('touch {marker}')",
        },
    )
    assert FileSource(path).poll().issues[0].title.startswith("$(touch")
    assert not marker.exists()


def test_example_issues_file_is_valid():
    result = FileSource(ROOT / "examples" / "issues.jsonl").poll()
    assert result.errors == [] and result.seen == 12
    assert 8 <= len(result.issues) < 12
    assert any("always-fails" in i.labels for i in result.issues)


# -- load_source ------------------------------------------------------------------------------------

GOOD_MODULE = """
from factory_worker.sources import Issue, PollResult

class Custom:
    def __init__(self, settings):
        self.settings = settings
    def poll(self):
        return PollResult(issues=[Issue(id="c", title="t", state="ready")])
    def get(self, issue_id):
        return None

class NotASource:
    def __init__(self, settings):
        pass

class Exploding:
    def __init__(self, settings):
        raise RuntimeError("boom\\nsecond line")
"""


@pytest.fixture
def tmp_module(tmp_path, monkeypatch):
    (tmp_path / "fw_custom_source_mod.py").write_text(GOOD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fw_custom_source_mod"
    sys.modules.pop("fw_custom_source_mod", None)


def test_load_source_file(tmp_path):
    path = jsonl(tmp_path / "i.jsonl", {"id": "A", "title": "a", "state": "go"})
    src = load_source(SourceSettings(kind="file", path=path, ready_states=["go"]))
    assert isinstance(src, FileSource) and ids(src.poll()) == ["A"]


def test_load_source_module_class(tmp_module):
    settings = SourceSettings(kind=f"{tmp_module}:Custom")
    src = load_source(settings)
    assert src.settings is settings and ids(src.poll()) == ["c"]


@pytest.mark.parametrize(
    "kind, words",
    [
        ("fw_no_such_module_xyz:Thing", "cannot import"),
        ("{mod}:Missing", "no attribute"),
        ("{mod}:NotASource", "does not implement IssueSource"),
        ("{mod}:Exploding", "RuntimeError: boom"),
    ],
)
def test_load_source_bad_module_class(tmp_module, kind, words):
    with pytest.raises(SourceError) as err:
        load_source(SourceSettings(kind=kind.format(mod=tmp_module)))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_load_source_github_is_lazy(monkeypatch):
    import types

    calls = []

    class FakeGitHub:
        @classmethod
        def from_settings(cls, settings):
            calls.append(settings)
            return FileSource("/nonexistent")

    monkeypatch.setitem(sys.modules, "factory_worker.sources.github", types.SimpleNamespace(GitHubSource=FakeGitHub))
    settings = SourceSettings(kind="github", github_repo="o/r", github_labels=["agent"])
    assert isinstance(load_source(settings), FileSource) and calls == [settings]


def test_load_source_github_import_failure(monkeypatch):
    monkeypatch.setitem(sys.modules, "factory_worker.sources.github", None)  # import raises ImportError
    with pytest.raises(SourceError, match="github"):
        load_source(SourceSettings(kind="github", github_repo="o/r", github_labels=["agent"]))


def test_issue_reexported():
    assert Issue(id="a", title="t", state="ready").labels == []


def test_an_id_with_control_characters_is_rejected(tmp_path):
    from factory_worker.sources import FileSource

    p = tmp_path / "i.jsonl"
    p.write_text(
        '{"id": "A-1\\nINFO forged log line", "title": "t", "state": "ready"}\n'
        '{"id": "A-2", "title": "t", "state": "ready"}\n'
    )
    res = FileSource(p).poll()
    assert [i.id for i in res.issues] == ["A-2"]
    assert len(res.errors) == 1 and ":1:" in res.errors[0]
