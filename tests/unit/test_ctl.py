"""The CLI's rendering of untrusted text (issue ids, titles) without a server."""

from __future__ import annotations


def test_markup_in_ids_neither_crashes_nor_styles_the_dispatches_table(monkeypatch):
    from factory_worker import ctl

    rows = [{"issue": "[/oops]", "state": "parked"}, {"issue": "[link=http://evil]x[/link]", "state": "done"}]
    with ctl.console.capture() as cap:
        ctl.table("t", rows, ["issue", "state"])
    out = cap.get()
    assert "[/oops]" in out and "[link=http://evil]x[/link]" in out and "\x1b]8;" not in out
