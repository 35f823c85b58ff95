"""The inbox file every channel writes to: one line per message for any reader, never re-created once gone."""

from __future__ import annotations

import json

from factory_worker.chat.inbox import InboxSource, append, entry

SEPARATORS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def test_a_tracker_comment_with_every_line_separator_is_one_ascii_line(tmp_path):
    inbox = tmp_path / "inbox.jsonl"
    inbox.touch()
    text = "ok" + "".join(f"{c}forged" for c in SEPARATORS) + "\ud800"  # a lone surrogate too
    assert append(inbox, [entry(InboxSource.GITHUB, "1", "octo", text), entry(InboxSource.LINEAR, "2", "u", "b")])
    raw = inbox.read_bytes()
    assert raw.isascii()
    lines = raw.decode().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["source"] == "github" and json.loads(lines[1])["text"] == "b"


def test_an_inbox_the_dispatch_removed_is_never_made_again(tmp_path):
    inbox = tmp_path / "inbox.jsonl"
    assert append(inbox, [entry(InboxSource.GITHUB, "1", "octo", "late")]) is False
    assert not inbox.exists()
