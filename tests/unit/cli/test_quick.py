"""The recovery commands' early path (quick.py): which commands it takes, and where it connects, with no Redis
involved. That it reads the very settings the full loader reads: tests/unit/config/test_essentials.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from factory_worker.cli.quick import is_kill, is_status, kill_first, pause_first, status_first, target
from factory_worker.cli.resp import Endpoint, Unsupported


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


@pytest.mark.parametrize("argv", [["loop-status", "--help"], ["pause", "now"], ["resume", "-h"], ["dispatches"]])
def test_other_forms_of_the_answered_commands_are_the_full_clis(argv):
    assert not is_status(argv)
    assert status_first(argv, {}, Path("/nonexistent")) is None
    assert pause_first(argv, {}, Path("/nonexistent")) is None


def test_settings_are_read_and_the_url_parsed_as_redis_py_does(tmp_path):
    e = target(
        {
            "FACTORY_REDIS_URL": "redis://u%40x:p%3Aw@db.example:6400/3",
            "FACTORY_NAMESPACE": "ns-1",
            "FACTORY_LOOP__STALE_AFTER_S": "12.5",
            "FACTORY_SOURCE__PATH": "issues.jsonl",
        },
        tmp_path,
    )
    assert (e.namespace, e.stale_after_s) == ("ns-1", 12.5)
    at = Endpoint.parse(e.redis_url)
    assert (at.address, at.username, at.password, at.db) == (("db.example", 6400), "u@x", "p:w", 3)
    d = target({}, tmp_path)  # the documented defaults
    at = Endpoint.parse(d.redis_url)
    assert (at.address, at.db, at.username, at.password, d.namespace, d.stale_after_s) == (
        ("127.0.0.1", 6379),
        0,
        None,
        None,
        "factory",
        60.0,
    )
    assert Endpoint.parse("redis://:secret@h").password == "secret"
    assert Endpoint.parse("redis://h/0?password=q&db=4") == Endpoint(("h", 6379), None, "q", 4)
    assert Endpoint.parse("redis://:p@h/0?password=q").password == "p"  # the userinfo's wins, as in redis-py
    assert Endpoint.parse("redis://h/zero").db == 0  # redis-py ignores a path that is not a number
    assert Endpoint.parse("unix://:pw@/run/redis.sock?db=2") == Endpoint("/run/redis.sock", None, "pw", 2)


@pytest.mark.parametrize(
    "url", ["rediss://h:6380/0", "redis://h:6379/0?ssl_cert_reqs=none", "redis://h/0?retry_on_error=x"]
)
def test_url_forms_left_to_redis_py(url):
    with pytest.raises(Unsupported):
        Endpoint.parse(url)
    env = {"FACTORY_REDIS_URL": url}
    assert kill_first(["kill-loop"], env, Path("/nonexistent")) is None  # the full command connects
    assert status_first(["loop-status"], env, Path("/nonexistent")) is None


@pytest.mark.parametrize(
    "env",
    [
        {"FACTORY_CONFIG": "/etc/no-such-factory.toml"},
        {"FACTORY_REDIS_URL_FILE": "/run/secrets/no-such-url"},
        {"FACTORY_REDIS_URL": ""},
        {"FACTORY_REDIS_URL": "redis://h:notaport/0"},
        {"FACTORY_REDIS_URL": "REDIS://h/0"},
        {"FACTORY_REDIS_URL": " redis://h/0"},
        {"FACTORY_NAMESPACE": "bad namespace"},
        {"FACTORY_NAMESPACE": "x" * 65},
        {"FACTORY_LOOP__STALE_AFTER_S": "soon"},
        {"FACTORY_LOOP__STALE_AFTER_S": "0"},
        {"FACTORY_LOOP": "{not json"},
        {"factory_namespace": "bad namespace"},
        {"FACTORY_REDIS_URL": "redis://a..b:6379/0"},  # an unresolvable name: nothing connects, nothing raises
    ],
)
def test_a_bad_setting_of_its_own_writes_nothing_early(env, tmp_path):
    if env.get("FACTORY_REDIS_URL") != "redis://a..b:6379/0":
        assert target(env, tmp_path) is None  # the full command says which setting: exit 2
    assert kill_first(["kill-loop"], env, tmp_path) is None
    assert status_first(["loop-status"], env, tmp_path) is None
    assert pause_first(["pause"], env, tmp_path) is None


def test_a_config_file_in_the_working_directory_is_read(tmp_path):
    (tmp_path / "factory.toml").write_text('namespace = "elsewhere"\n[loop]\nstale_after_s = 30\n')
    (tmp_path / "factory.toml").chmod(0o600)
    e = target({}, tmp_path)
    assert (e.namespace, e.stale_after_s) == ("elsewhere", 30.0)


def test_a_working_directory_that_is_gone_is_left_to_the_full_loader(tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert target({}) is None and kill_first(["kill-loop"], {}) is None
