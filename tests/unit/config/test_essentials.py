"""The recovery commands' settings (config/essentials.py) are the full loader's, from every source: the same
Redis, namespace and stale threshold whenever the full settings are valid, the same one-line error when one
of these is bad, and an answer whatever the other settings say."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from factory_worker.config import essentials
from factory_worker.config.settings import ConfigError, load_settings
from tests.unit.settings_env import clean_env, set_env  # noqa: F401  (clean_env: autouse)

GITHUB = {
    "FACTORY_SOURCE__KIND": "github",
    "FACTORY_SOURCE__GITHUB_REPO": "acme/widgets",
    "FACTORY_SOURCE__GITHUB_LABELS": '["agent"]',
}


def secret(path: Path, text: str, mode: int = 0o400) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def both(monkeypatch, env: dict[str, str]) -> tuple[object, object]:
    """(the full loader's answer, essentials'), each a tuple of the shared settings or the error's text."""
    set_env(monkeypatch, env)
    try:
        s = load_settings()
        full: object = (
            s.effective_redis_url,
            s.namespace,
            s.loop.stale_after_s,
            s.broker_url,
            s.tracker.write_back,
            s.dispatch.min_replica_acks,
        )
    except ConfigError as exc:
        full = str(exc)
    try:
        e = essentials.read(dict(os.environ), Path.cwd())
        early: object = (e.redis_url, e.namespace, e.stale_after_s, e.broker_url, e.write_back, e.min_replica_acks)
    except ConfigError as exc:
        early = str(exc)
    return full, early


def toml(clean_env: Path, text: str, name: str = "factory.toml", mode: int = 0o600) -> Path:
    path = clean_env / name
    path.write_text(text)
    path.chmod(mode)
    return path


VALID = [
    {},
    {"FACTORY_REDIS_URL": "redis://:pw@db.example:6400/3", "FACTORY_NAMESPACE": "ns-1"},
    {"factory_namespace": "lower", "Factory_Redis_Url": "redis://mixed:6379/1"},
    {"FACTORY_LOOP": '{"stale_after_s": 90, "interval_s": 5}'},
    {"FACTORY_LOOP": '{"stale_after_s": 90}', "FACTORY_LOOP__STALE_AFTER_S": "120"},
    {"FACTORY_LOOP__STALE_AFTER_S": " 75 "},
    {"FACTORY_REDIS_URL": "sentinel://:pw@s1:26379,s2/mymaster/2?sentinel_password=sp"},
    {"FACTORY_REDIS_URL": "unix:///run/redis.sock?db=1", "FACTORY_BROKER_URL": "redis://broker:6379/1"},
    {"FACTORY_REDIS_URL": "rediss://h:6380/0"},
    {**GITHUB, "FACTORY_TRACKER__WRITE_BACK": "YES", "FACTORY_DISPATCH__MIN_REPLICA_ACKS": "2"},
    {"FACTORY_DISPATCH": '{"min_replica_acks": 1}'},
    {"FACTORY_SLACK__BOT_TOKEN_FILE": "/run/secrets/slack"},  # names no setting: ignored by both
]


@pytest.mark.parametrize("env", VALID)
def test_the_same_settings_from_the_environment(env, monkeypatch):
    full, early = both(monkeypatch, env)
    assert isinstance(full, tuple), full
    assert early == full


def test_the_same_settings_from_files(monkeypatch, clean_env):
    url = secret(clean_env / "url", "redis://:s3cret@10.0.0.5:6379/4\n")
    ns = secret(clean_env / "ns", "from-file")
    full, early = both(monkeypatch, {"FACTORY_REDIS_URL_FILE": url, "factory_namespace_file": ns})
    assert isinstance(full, tuple) and full[:2] == ("redis://:s3cret@10.0.0.5:6379/4", "from-file")
    assert early == full


def test_the_same_settings_from_a_toml_file(monkeypatch, clean_env):
    toml(clean_env, 'Redis_Url = "redis://t:6379/2"\nnamespace = "from-toml"\n[loop]\nstale_after_s = 45\n')
    full, early = both(monkeypatch, {"FACTORY_DISPATCH__MIN_REPLICA_ACKS": "1"})
    assert isinstance(full, tuple) and full[:3] == ("redis://t:6379/2", "from-toml", 45.0)
    assert early == full
    # the environment over the file, leaf by leaf; FACTORY_CONFIG (relative to the working directory) over ./
    other = toml(clean_env, "[loop]\nstale_after_s = 80\n[tracker]\nwrite_back = true\n", name="other.toml")
    full, early = both(monkeypatch, {**GITHUB, "FACTORY_NAMESPACE": "env", "FACTORY_CONFIG": other.name})
    assert isinstance(full, tuple) and full[1:3] == ("env", 80.0) and full[4] is True
    assert early == full


@pytest.mark.parametrize(
    "env",
    [
        {"FACTORY_REDIS_URL": ""},
        {"FACTORY_REDIS_URL": "http://localhost:6379"},
        {"FACTORY_REDIS_URL": "redis://h/0?protocol=3"},
        {"FACTORY_NAMESPACE": "bad namespace"},
        {"FACTORY_NAMESPACE": ""},
        {"FACTORY_NAMESPACE": "x" * 65},
        {"FACTORY_LOOP__STALE_AFTER_S": "soon"},
        {"FACTORY_LOOP__STALE_AFTER_S": "-1"},
        {"FACTORY_CONFIG": "/etc/no-such-factory.toml"},
        {"FACTORY_REDIS_URL_FILE": "/run/secrets/no-such-url"},
    ],
)
def test_a_bad_value_of_its_own_is_the_same_one_line_error(env, monkeypatch):
    full, early = both(monkeypatch, env)
    assert isinstance(early, str) and "\n" not in early
    assert early == full


def test_a_secret_file_or_config_file_others_could_change_is_refused_by_both(monkeypatch, clean_env):
    url = secret(clean_env / "url", "redis://h:6379/0", mode=0o404)  # readable by others
    full, early = both(monkeypatch, {"FACTORY_REDIS_URL_FILE": url})
    assert isinstance(early, str) and early == full and "readable by others" in early
    monkeypatch.delenv("FACTORY_REDIS_URL_FILE")
    both_set = secret(clean_env / "url2", "redis://h:6379/0")
    full, early = both(monkeypatch, {"FACTORY_REDIS_URL": "redis://x/0", "FACTORY_REDIS_URL_FILE": both_set})
    assert isinstance(early, str) and early == full and "set one of them" in early
    monkeypatch.delenv("FACTORY_REDIS_URL_FILE")
    monkeypatch.delenv("FACTORY_REDIS_URL")
    toml(clean_env, 'namespace = "n"\n', mode=0o666)
    full, early = both(monkeypatch, {})
    assert isinstance(early, str) and early == full and "writable by its group or others" in early


@pytest.mark.parametrize(
    "env",
    [
        {"FACTORY_AGENT__COMMAND": "rm -rf / ; echo"},
        {"FACTORY_DISPATCH__LEASE_TTL_S": "-1"},
        {"FACTORY_LOOP__INTERVAL_S": "abc"},
        {"FACTORY_LOOP__STALE_AFTER_S": "5"},  # not above the default interval (10 s): the loop's rule, not ours
        {"FACTORY_SOURCE__KIND": "github", "FACTORY_SOURCE__GITHUB_REPO": "o/r"},  # no label filter
        {"FACTORY_BROKER_URL": "ftp://nope"},
        {"FACTORY_TRACKER__WRITE_BACK": "maybe"},
    ],
)
def test_any_other_bad_setting_leaves_the_recovery_commands_their_own(env, monkeypatch):
    full, early = both(monkeypatch, {"FACTORY_NAMESPACE": "ops", **env})
    assert isinstance(full, str)  # every other command refuses it (exit 2)
    assert isinstance(early, tuple) and early[1] == "ops"
    e = essentials.read(dict(os.environ), Path.cwd())
    if "FACTORY_BROKER_URL" in env or "FACTORY_TRACKER__WRITE_BACK" in env:
        assert len(e.problems) == 1 and ("broker_url" in e.problems[0] or "write_back" in e.problems[0])
        assert (e.broker_url, e.write_back) == (None, False)  # left at their defaults


def test_the_broker_is_the_ledger_unless_another_is_set():
    assert essentials.Essentials("redis://h/0").broker_is_ledger
    assert essentials.Essentials("redis://h/0", broker_url="redis://h/0").broker_is_ledger
    assert not essentials.Essentials("redis://h/0", broker_url="redis://other/0").broker_is_ledger
