"""kill-loop's early kill (quick.py): which commands and which settings it takes, with no Redis involved."""

from __future__ import annotations

from pathlib import Path

import pytest

from factory_worker.cli.quick import Target, is_kill, kill_first, plain_target, status_first


@pytest.mark.parametrize(
    "argv",
    [
        ["kill-loop"],
        ["kill-loop", "--json"],
        ["-v", "kill-loop", "--force"],
        ["kill-loop", "--release-agents", "--force", "--json"],
    ],
)
def test_a_kill_loop_command_is_taken(argv):
    assert is_kill(argv)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["loop-status"],
        ["kill-loop", "--help"],
        ["kill-loop", "-h"],
        ["kill-loop", "--forse"],
        ["kill-loop", "extra"],
        ["--json", "kill-loop"],
        ["pause"],
        ["explain", "kill-loop"],
    ],
)
def test_anything_else_is_left_to_the_full_cli(argv):
    assert not is_kill(argv)
    assert kill_first(argv, {}, Path("/nonexistent")) is None  # nothing is connected to or written


def test_plain_settings_are_read(tmp_path):
    t = plain_target(
        {
            "FACTORY_REDIS_URL": "redis://u%40x:p%3Aw@db.example:6400/3",
            "FACTORY_NAMESPACE": "ns-1",
            "FACTORY_LOOP__STALE_AFTER_S": "12.5",
            "FACTORY_SOURCE__PATH": "issues.jsonl",
        },
        tmp_path,
    )
    assert isinstance(t, Target)
    assert (t.host, t.port, t.db, t.username, t.password, t.stale_after_s) == (
        "db.example",
        6400,
        3,
        "u@x",
        "p:w",
        12.5,
    )
    assert t.keys.namespace == "ns-1"
    d = plain_target({}, tmp_path)  # the documented defaults
    assert (d.host, d.port, d.db, d.username, d.password, d.keys.namespace, d.stale_after_s) == (
        "127.0.0.1",
        6379,
        0,
        None,
        None,
        "factory",
        60.0,
    )
    assert plain_target({"FACTORY_REDIS_URL": "redis://:secret@h"}, tmp_path).password == "secret"


@pytest.mark.parametrize(
    "env",
    [
        {"FACTORY_CONFIG": "/etc/factory.toml"},
        {"FACTORY_REDIS_URL_FILE": "/run/secrets/url"},
        {"FACTORY_SLACK__BOT_TOKEN_FILE": "/run/secrets/slack"},  # any *_FILE: the full settings read files
        {"FACTORY_LOOP": '{"stale_after_s": 5}'},
        {"FACTORY_REDIS_URL": ""},
        {"FACTORY_REDIS_URL": "rediss://h:6380/0"},
        {"FACTORY_REDIS_URL": "sentinel://s1,s2/mymaster"},
        {"FACTORY_REDIS_URL": "unix:///run/redis.sock"},
        {"FACTORY_REDIS_URL": "redis://h:6379/0?socket_timeout=1"},
        {"FACTORY_REDIS_URL": "redis://h:notaport/0"},
        {"FACTORY_REDIS_URL": "redis://h/zero"},
        {"FACTORY_NAMESPACE": "bad namespace"},
        {"FACTORY_NAMESPACE": "x" * 65},
        {"FACTORY_LOOP__STALE_AFTER_S": "soon"},
        {"FACTORY_LOOP__STALE_AFTER_S": "0"},
        {"factory_namespace": "other"},  # the full loader reads names in any case: both must mean one loop
        {"Factory_Redis_Url": "redis://elsewhere:6379/0"},
        {"FACTORY_REDIS_URL": "REDIS://h/0"},  # the full loader refuses these: so does the early path
        {"FACTORY_REDIS_URL": " redis://h/0"},
        {"FACTORY_REDIS_URL": "redis://a..b:6379/0"},  # an unresolvable name: nothing connects, nothing raises
    ],
)
def test_settings_that_need_the_full_loader_write_nothing_early(env, tmp_path):
    if env.get("FACTORY_REDIS_URL") != "redis://a..b:6379/0":
        assert plain_target(env, tmp_path) is None
    assert kill_first(["kill-loop"], env, tmp_path) is None
    assert status_first(["loop-status"], env, tmp_path) is None


def test_a_config_file_in_the_working_directory_is_left_to_the_full_loader(tmp_path):
    (tmp_path / "factory.toml").write_text('namespace = "elsewhere"\n')
    assert plain_target({}, tmp_path) is None


def test_a_working_directory_that_is_gone_is_left_to_the_full_loader(tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert plain_target({}) is None and kill_first(["kill-loop"], {}) is None
