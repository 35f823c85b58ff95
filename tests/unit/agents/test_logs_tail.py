"""A failed agent task's exception ends with its output's last lines (issue 21, item 4): escaped and capped."""

from factory_worker.agents.logs import last_lines


def test_the_last_lines_escaped_and_capped():
    out = "".join(f"line {n}\n" for n in range(30)) + "\n\nred \x1b[31m<b>x</b>\x00 end\n"
    tail = last_lines(out, lines=3)
    assert tail.splitlines() == ["line 28", "line 29", "red \\x1b[31m<b>x</b>\\x00 end"]
    assert "\x1b" not in tail and "\x00" not in tail


def test_a_long_line_is_cut_and_the_whole_keeps_its_newest_lines():
    tail = last_lines("old\n" + "y" * 1000 + "\nnew\n", lines=10, line_chars=50, cap=56)
    assert tail.splitlines() == ["y" * 49 + "…", "new"]
    assert len(tail) <= 56
    assert last_lines("") == ""
