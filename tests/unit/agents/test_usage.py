"""The agent's usage lines (``FACTORY_USAGE``, issue 24): parsing, reading while it runs, the stall clock and
a budget's stop, through the real command agent (real subprocesses)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from factory_worker.agents import Dispatch
from factory_worker.agents.usage import LINE_MAX, Usage, UsageFile, parse_line
from tests.unit.agents.test_command import dispatch, make_agent, run, script  # noqa: F401 - the fixture


@pytest.mark.parametrize(
    "raw, want",
    [
        (b'{"cost_usd": 0.25, "tokens": 10}', Usage(0.25, 10, 1, 0)),
        (b'{"cost_usd": 1}', Usage(1.0, 0, 1, 0)),
        (b'{"tokens": 7}', Usage(0.0, 7, 1, 0)),
        (b"{}", Usage(0.0, 0, 1, 0)),
    ],
)
def test_a_valid_line_is_a_delta(raw, want):
    assert parse_line(raw) == want


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b'{"cost_usd": -0.1}',
        b'{"cost_usd": NaN}',
        b'{"cost_usd": Infinity}',
        b'{"cost_usd": 1e999}',
        b'{"cost_usd": "1"}',
        b'{"cost_usd": true}',
        b'{"tokens": 1.5}',
        b'{"tokens": -3}',
        b'{"tokens": false}',
        b"\xff\xfe",
    ],
)
def test_a_malformed_line_is_refused(raw):
    assert parse_line(raw) is None


def test_the_file_is_read_as_it_grows_a_partial_line_waits_for_its_newline(tmp_path):
    path = tmp_path / "usage.jsonl"
    reader = UsageFile(path)
    assert reader.read() == []  # not there yet
    path.write_bytes(b'{"cost_usd": 0.5}\n{"tokens": 3}\ngarbage\n{"cost_')
    got = reader.read()
    assert got == [Usage(0.5, 0, 1, 0), Usage(0.0, 3, 1, 0), Usage(malformed=1)]
    with open(path, "ab") as fh:
        fh.write(b'usd": 0.25}\n')
    assert reader.read() == [Usage(0.25, 0, 1, 0)]
    assert reader.read() == []
    total = Usage()
    for u in got:
        total.add(u)
    assert total.as_dict() == {"cost_usd": 0.5, "tokens": 3, "lines": 2, "malformed": 1}


def test_an_endless_line_is_malformed_not_kept(tmp_path):
    path = tmp_path / "usage.jsonl"
    path.write_bytes(b"x" * (LINE_MAX + 10))
    reader = UsageFile(path)
    assert reader.read() == [Usage(malformed=1)]
    assert reader._partial == b""


def test_a_link_or_a_fifo_is_never_read(tmp_path):
    target = tmp_path / "secret"
    target.write_text('{"cost_usd": 5}\n')
    link = tmp_path / "usage.jsonl"
    link.symlink_to(target)
    assert UsageFile(link).read() == []
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert UsageFile(fifo).read() == []  # and it does not block


def test_an_agent_silent_past_stall_s_is_a_failed_attempt_one_that_prints_runs_on(tmp_path, script):
    silent = script("import time; time.sleep(20)", "silent.py")
    began = time.monotonic()
    res = run(make_agent(tmp_path, [sys.executable, str(silent)], stall_s=0.6, term_grace_s=1))
    assert res.outcome == "failed" and res.error.startswith("stalled: no output for 0.6 s"), res
    assert time.monotonic() - began < 3
    talks = script("import time\nfor n in range(12):\n    print(n, flush=True); time.sleep(0.1)\n", "talks.py")
    assert run(make_agent(tmp_path, [sys.executable, str(talks)], stall_s=0.6)).outcome == "ok"  # 1.2 s > 0.6


def test_usage_lines_keep_a_quiet_agent_alive_and_are_summed_per_attempt(tmp_path, script):
    body = (
        "import json, os, time\n"
        "for n in range(8):\n"
        "    open(os.environ['FACTORY_USAGE'], 'a').write(json.dumps({'cost_usd': 0.1, 'tokens': 5}) + '\\n')\n"
        "    time.sleep(0.15)\n"
        "open(os.environ['FACTORY_USAGE'], 'a').write('oops\\n')\n"
    )
    path = script(body, "quiet.py")
    res = run(make_agent(tmp_path, [sys.executable, str(path)], stall_s=0.6))
    assert res.outcome == "ok", res  # 1.2 s without a byte of output, but a usage line every 0.15 s
    assert res.usage == {"cost_usd": 0.8, "tokens": 40, "lines": 8, "malformed": 1}
    assert not list((tmp_path / "work").glob("usage-*")), "the usage file outlived its dispatch"


def test_a_report_that_says_stop_stops_the_agent_within_a_second(tmp_path, script):
    body = (
        "import json, os, time\n"
        "for n in range(40):\n"
        "    open(os.environ['FACTORY_USAGE'], 'a').write(json.dumps({'cost_usd': 0.3}) + '\\n')\n"
        "    print('line', n, time.time(), flush=True)\n"
        "    time.sleep(0.2)\n"
    )
    path = script(body, "spends.py")
    seen: list[tuple[float, float]] = []

    def report(delta, wall_s):
        seen.append((delta.cost_usd, time.time()))
        if sum(c for c, _ in seen) >= 1.0:
            return "budget", "needs-human: budget: test"
        return None

    d: Dispatch = dispatch()
    d.report = report
    res = run(make_agent(tmp_path, [sys.executable, str(path)], term_grace_s=1), d)
    assert (res.outcome, res.error) == ("budget", "needs-human: budget: test")
    reported = [c for c, _ in seen if c]
    assert reported == [0.3] * 4, seen  # nothing reported past the crossing line
    log_lines = [ln for ln in Path(res.log_path).read_text().splitlines() if ln.startswith("line ")]
    assert len(log_lines) <= 6, log_lines  # stopped within ~1 s (a line every 0.2 s) of the 4th
    assert res.usage is not None and res.usage["lines"] >= 4
    json.dumps(res.usage)


def test_the_wall_time_is_reported_while_it_runs_and_summed_to_its_duration(tmp_path, script):
    path = script("import time\nfor n in range(8):\n    print(n, flush=True); time.sleep(0.2)\n", "runs.py")
    walls: list[float] = []
    d: Dispatch = dispatch()
    d.report = lambda delta, wall_s: walls.append(wall_s)
    res = run(make_agent(tmp_path, [sys.executable, str(path)]), d)
    assert res.outcome == "ok" and len(walls) >= 2, walls  # once a second, and the rest at the end
    assert sum(walls) == pytest.approx(res.duration_s, abs=0.3), (walls, res.duration_s)
