"""Agent logs (agents/logs.py) through the real CommandAgent: private, capped, pruned."""

from __future__ import annotations

import os
import stat
import sys
import time

from factory_worker.agents.logs import prune
from tests.unit.agents.test_command import make_agent, run, script  # noqa: F401  (fixture)


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
