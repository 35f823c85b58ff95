"""The agent's result file: every field optional, size-capped, validated; a bad one is reported, not fatal."""

from __future__ import annotations

import json
import os

import pytest

from factory_worker.workspace.result import ResultFile, make_result_file, read_result


def write(path, data) -> None:
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())


def test_a_full_result(tmp_path):
    p = tmp_path / "r.json"
    write(
        p,
        {
            "summary": "did it",
            "title": "Fix\tthe\nbug",
            "commit_message": "fix: x\n\nbody",
            "cost_usd": 0.25,
            "tokens": 1200,
            "extra": 1,
        },
    )
    result, problem = read_result(p, 4096)
    assert problem is None
    assert result == ResultFile(
        summary="did it", title="Fix the bug", commit_message="fix: x\n\nbody", cost_usd=0.25, tokens=1200
    )


@pytest.mark.parametrize("data", [b"", b"  \n", None])
def test_no_result_is_no_problem(tmp_path, data):
    p = tmp_path / "r.json"
    if data is not None:
        write(p, data)
    assert read_result(p, 4096) == (None, None)


@pytest.mark.parametrize(
    "data, says",
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"\xff\xfe", "not JSON"),
        ({"tokens": "many"}, "tokens"),
        ({"tokens": -1}, "tokens"),
        ({"tokens": True}, "tokens"),
        ({"cost_usd": "NaN"}, "cost_usd"),
        ({"summary": 5}, "summary"),
        ({"title": "x" * 300}, "title"),
        ({"commit_message": "a\u0000b"}, "NUL"),
        (b'{"summary": "\\ud800"}', "summary"),
    ],
)
def test_a_bad_result_is_reported_in_one_line(tmp_path, data, says):
    p = tmp_path / "r.json"
    write(p, data)
    result, problem = read_result(p, 4096)
    assert result is None and problem and says in problem and "\n" not in problem
    assert problem.startswith("FACTORY_RESULT: ")


def test_size_cap(tmp_path):
    p = tmp_path / "r.json"
    write(p, {"summary": "x" * 5000})
    assert read_result(p, 4096) == (None, "FACTORY_RESULT: larger than 4096 bytes")


def test_a_link_or_a_fifo_is_not_followed(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text('{"summary": "worker secret"}')
    link = tmp_path / "r.json"
    link.symlink_to(secret)
    result, problem = read_result(link, 4096)
    assert result is None and "cannot open" in problem
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert read_result(fifo, 4096) == (None, "FACTORY_RESULT: not a regular file")


def test_the_file_made_for_the_agent(tmp_path):
    p = tmp_path / "r.json"
    make_result_file(p, None)
    assert oct(p.stat().st_mode & 0o777) == "0o600" and p.read_bytes() == b""
    q = tmp_path / "q.json"
    make_result_file(q, os.getegid())
    assert q.stat().st_mode & 0o777 == 0o660 and q.stat().st_uid == os.geteuid()
