"""Agent logs (agents/logs.py) through the real CommandAgent: private, capped, pruned."""

from __future__ import annotations

import os
import stat
import sys
import time

import pytest

from factory_worker.agents import Dispatch
from factory_worker.agents.logs import prune
from factory_worker.sources import Issue
from tests.unit.agents.test_command import make_agent, marks, pidns, run, script, survivors, wait_none  # noqa: F401  (fixtures: marks, pidns, script)


def test_a_log_is_private_and_capped_and_a_flood_does_not_block_the_agent(tmp_path, script):
    path = script("""
        import sys
        sys.stdout.write("x" * 2_000_000)  # far past the cap: the agent must not block on a full pipe
        sys.stdout.flush()
        print("the end", file=sys.stderr)
    """)
    res = run(make_agent(tmp_path, [sys.executable, str(path)], log_max_bytes=4096))
    assert res.outcome == "ok"
    log = res.log_path
    assert stat.S_IMODE(log.stat().st_mode) == 0o600 and stat.S_IMODE(log.parent.stat().st_mode) == 0o700
    text = log.read_text()
    assert len(text) < 4096 + 1000  # header + cap + the note + the exit line
    assert "log capped at 4096 bytes" in text and "the end" not in text


def test_a_small_log_is_kept_whole(tmp_path, script):
    path = script('print("hello from the agent")')
    res = run(make_agent(tmp_path, [sys.executable, str(path)]))
    assert res.outcome == "ok" and "hello from the agent" in res.log_path.read_text()
    assert "capped" not in res.log_path.read_text()


def test_old_logs_are_pruned_and_recent_ones_kept(tmp_path):
    old, new = tmp_path / "I-1" / "a.log", tmp_path / "I-2" / "b.log"
    for p in (old, new):
        p.parent.mkdir(parents=True)
        p.write_text("x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert prune(tmp_path, 600, force=True) == 1
    assert not old.exists() and not old.parent.exists() and new.exists()
    assert prune(tmp_path, 0, force=True) == 0  # 0: kept forever


def test_open_log_survives_a_concurrent_prune_of_its_directory(tmp_path, monkeypatch):
    """Another pool process's prune may remove the (still empty) directory between mkdir and open."""
    import os as _os

    from factory_worker.agents import logs as logs_mod

    real_open, calls = _os.open, []

    def racing_open(path, *a, **kw):
        calls.append(path)
        if len(calls) == 1:
            _os.rmdir(_os.path.dirname(path))  # pruned right after the mkdir
        return real_open(path, *a, **kw)

    monkeypatch.setattr(logs_mod.os, "open", racing_open)
    fd = logs_mod.open_log(tmp_path / "logs" / "EX-2" / "a.log")
    _os.close(fd)
    assert len(calls) == 2 and (tmp_path / "logs" / "EX-2" / "a.log").exists()


def test_the_log_root_made_for_the_first_log_is_private_too(tmp_path):
    """Every directory open_log makes is 0700: the log root, too (its entries name issues)."""
    import os as _os
    import stat

    from factory_worker.agents.logs import open_log

    old = _os.umask(0o022)
    try:
        _os.close(open_log(tmp_path / "factory" / "logs" / "EX-1" / "a.log"))
    finally:
        _os.umask(old)
    for d in ("factory", "factory/logs", "factory/logs/EX-1"):
        assert stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o700, d


@pytest.mark.parametrize("a_runs_s", [0, 0.3])  # A's output copied at its end, or by a relay thread
def test_a_writer_an_agent_left_behind_reaches_no_later_log_or_file(tmp_path, pidns, marks, a_runs_s):
    """Issue 20: A's agent leaves a process holding its output pipe (A ends once it left A's process group:
    the file "left"), which starts writing 1 s later. Nothing it writes reaches B's log (the next file the
    worker opened, which got A's log's fd number back) or any file the worker opens after: A's relay closed
    the pipe from the reading side when A ended (so the writer gets EPIPE and dies of it), and its fds were
    never closed while its thread could still use them. In a namespace of its own the writer does not even
    outlive A. (The old code: FORGED in B's log, both ways.)"""
    writer = f'touch "$0"; sleep 1; while :; do echo FORGED; sleep 0.1; done # {marks[0]}'
    a_agent = f'setsid -f sh -c "$0" "$1"; while [ ! -e "$1" ]; do :; done; sleep {a_runs_s}; echo A ends'
    a = run(make_agent(tmp_path, ["sh", "-c", a_agent, writer, str(tmp_path / "left")], pid_namespace=pidns))
    assert a.outcome == "ok" and "A ends" in a.log_path.read_text()
    if pidns != "off":
        assert not survivors(marks[0])  # ended with A's namespace
    b_issue = Dispatch(issue=Issue(id="EX-2", title="b", state="ready"), token="18", dispatch_id="task-456")
    b = run(
        make_agent(
            tmp_path, [sys.executable, "-c", "import time; print('B runs'); time.sleep(2.5)"], pid_namespace=pidns
        ),
        b_issue,
    )
    opened = [tmp_path / f"later-{n}" for n in range(8)]
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) for p in opened]
    try:
        time.sleep(0.5)  # the writer, if it lived, writes 5 more lines meanwhile
    finally:
        for fd in fds:
            os.close(fd)
    assert b.outcome == "ok" and "B runs" in b.log_path.read_text()
    for path in (b.log_path, *opened, a.log_path):
        assert "FORGED" not in path.read_text().splitlines(), path  # (its argv, in A's header, names it)
    assert wait_none(marks[0], 1.0), "the writer got no EPIPE: the pipe was still open for reading"
