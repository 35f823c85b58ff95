"""cli_output: the CLI's rendering of untrusted text (issue ids, titles, errors) without a server."""

from __future__ import annotations

import json


def test_markup_in_ids_neither_crashes_nor_styles_the_dispatches_table(monkeypatch):
    from factory_worker.cli import output as cli_output

    rows = [{"issue": "[/oops]", "state": "parked"}, {"issue": "[link=http://evil]x[/link]", "state": "done"}]
    with cli_output.console.capture() as cap:
        cli_output.table("t", rows, ["issue", "state"])
    out = cap.get()
    assert "[/oops]" in out and "[link=http://evil]x[/link]" in out and "\x1b]8;" not in out


def test_control_bytes_in_an_error_are_shown_never_sent_to_the_terminal():
    from factory_worker.cli import output as cli_output

    hostile = "bad\x1b]8;;http://evil\x1b\\click\x1b]8;;\x1b\\ \x1b[2J\x07\r"
    rows = [{"issue": "A-1", "last_error": hostile}]
    with cli_output.console.capture() as cap:
        cli_output.table("t", rows, ["issue", "last_error"])
    out = cap.get()
    assert "\x1b]8;" not in out and "\x1b[2J" not in out and "\x07" not in out and "\r" not in out
    assert "\\x1b]8;;http://evil" in out
    assert cli_output.printable("tab\tand\nnewline stay") == "tab\tand\nnewline stay"


def test_an_error_without_a_message_is_still_one_line(monkeypatch, capsys):
    """A redis-py timeout raised with no text names itself; it is never an IndexError traceback."""
    import redis

    from factory_worker.cli import commands as cli

    monkeypatch.setattr(cli.cli, "main", lambda **_: (_ for _ in ()).throw(redis.TimeoutError()))
    assert cli.main(["loop-status", "--json"]) == 2
    out, err = capsys.readouterr()
    assert err == "factory-worker: cannot reach Redis: TimeoutError\n"
    assert json.loads(out) == {"error": "cannot reach Redis: TimeoutError", "exit": 2}
