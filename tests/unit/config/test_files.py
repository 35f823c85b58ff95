"""Settings from files: ``*_FILE`` secrets, the config file's trust check, and the isolation settings' errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from factory_worker.config.files import check_trusted
from factory_worker.config.settings import AgentSettings, ConfigError, SourceSettings, load_settings, secret_from_env
from factory_worker.sources.github import GitHubSource
from tests.unit.settings_env import clean_env, config_error, set_env  # noqa: F401 - clean_env is autouse

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to other users needs root")


def secret_file(tmp_path: Path, name: str, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, mode)
    return path


# -- *_FILE ------------------------------------------------------------------------------------------------
def test_settings_from_files_strip_one_trailing_newline(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORY_REDIS_URL_FILE", str(secret_file(tmp_path, "url", "redis://:pw@redis:6379/0\n")))
    monkeypatch.setenv("FACTORY_NAMESPACE_FILE", str(secret_file(tmp_path, "ns", "team-a\r\n")))
    monkeypatch.setenv("FACTORY_NOTIFY__WEBHOOK_URL_FILE", str(secret_file(tmp_path, "hook", "https://h/x\n\n")))
    monkeypatch.setenv("FACTORY_AGENT__USER_FILE", str(secret_file(tmp_path, "user", "nobody")))
    s = load_settings()
    assert s.redis_url == "redis://:pw@redis:6379/0" and s.namespace == "team-a"
    assert s.notify.webhook_url == "https://h/x\n"  # one newline only
    assert s.agent.user == "nobody" and s.agent.timeout_s == 600  # the rest of the section is untouched


def test_a_setting_and_its_file_together_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORY_REDIS_URL", "redis://a:6379/0")
    monkeypatch.setenv("FACTORY_REDIS_URL_FILE", str(secret_file(tmp_path, "url", "redis://b:6379/0")))
    assert config_error() == "both FACTORY_REDIS_URL and FACTORY_REDIS_URL_FILE are set: set one of them"


def test_a_missing_secret_file_names_its_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORY_BROKER_URL_FILE", str(tmp_path / "nope"))
    assert config_error() == f"FACTORY_BROKER_URL_FILE={tmp_path / 'nope'}: cannot read it (No such file or directory)"


def test_a_secret_file_others_can_write_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORY_REDIS_URL_FILE", str(secret_file(tmp_path, "url", "redis://r:6379/0", 0o622)))
    msg = config_error()
    assert msg.startswith("FACTORY_REDIS_URL_FILE:") and "writable by its group or others (mode 0622)" in msg


def test_a_secret_file_others_can_read_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORY_REDIS_URL_FILE", str(secret_file(tmp_path, "url", "redis://:pw@r:6379/0", 0o644)))
    msg = config_error()
    assert msg.startswith("FACTORY_REDIS_URL_FILE:") and "readable by others (mode 0644)" in msg and "pw" not in msg
    monkeypatch.setenv("GITHUB_TOKEN_FILE", str(secret_file(tmp_path, "tok", "ghp_x\n", 0o604)))
    with pytest.raises(ConfigError, match="readable by others"):
        secret_from_env("GITHUB_TOKEN")
    os.chmod(tmp_path / "tok", 0o400)
    assert secret_from_env("GITHUB_TOKEN") == "ghp_x"


def test_a_bad_value_from_a_file_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORY_REDIS_URL_FILE", str(secret_file(tmp_path, "url", "http://nope\n")))
    assert config_error().startswith("invalid setting redis_url (FACTORY_REDIS_URL):")


def test_file_variables_that_name_no_setting_are_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORY_AGENT_OUTPUT_FILE", "/nonexistent")  # an agent's own variable, not a setting
    monkeypatch.setenv("FACTORY_LOOP_FILE", "/nonexistent")  # a section, not a value
    assert load_settings().namespace == "factory"


def test_secret_from_env(tmp_path, monkeypatch):
    assert secret_from_env("GITHUB_TOKEN") is None
    monkeypatch.setenv("GITHUB_TOKEN_FILE", str(secret_file(tmp_path, "tok", "ghp_x\n")))
    assert secret_from_env("GITHUB_TOKEN") == "ghp_x"
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_y")
    with pytest.raises(ConfigError, match="both GITHUB_TOKEN and GITHUB_TOKEN_FILE are set"):
        secret_from_env("GITHUB_TOKEN")
    monkeypatch.delenv("GITHUB_TOKEN_FILE")
    assert secret_from_env("GITHUB_TOKEN") == "ghp_y"
    monkeypatch.setenv("EMPTY_TOKEN_FILE", str(secret_file(tmp_path, "empty", "\n")))
    assert secret_from_env("EMPTY_TOKEN") is None


def test_the_github_source_reads_its_token_from_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_GH_TOKEN_FILE", str(secret_file(tmp_path, "tok", "ghp_from_file\n")))
    src = GitHubSource.from_settings(
        SourceSettings(kind="github", github_repo="o/r", github_labels=["agent"], github_token_env="MY_GH_TOKEN")
    )
    assert src._headers["Authorization"] == "Bearer ghp_from_file"


# -- the config file's trust -------------------------------------------------------------------------------
def test_a_config_file_others_can_write_is_refused(tmp_path, monkeypatch):
    toml = tmp_path / "factory.toml"
    toml.write_text('namespace = "from-toml"\n')
    os.chmod(toml, 0o644)
    assert load_settings().namespace == "from-toml"
    os.chmod(toml, 0o664)
    assert config_error() == (
        f"config file ./factory.toml: {toml} is writable by its group or others (mode 0664); chmod go-w it"
    )
    explicit = secret_file(tmp_path, "other.toml", 'namespace = "x"\n', 0o646)
    monkeypatch.setenv("FACTORY_CONFIG", str(explicit))
    assert config_error().startswith(f"FACTORY_CONFIG={explicit}: ")


@needs_root
def test_a_config_file_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    toml = secret_file(tmp_path, "factory.toml", 'namespace = "x"\n', 0o644)
    os.chown(toml, 12345, 12345)
    assert "is owned by uid 12345, not by this worker's user (uid 0) or root" in config_error()


@needs_root
def test_a_config_file_the_agent_user_owns_is_refused_even_read_only(tmp_path, monkeypatch):
    toml = secret_file(tmp_path, "factory.toml", '[agent]\nuser = "nobody"\n', 0o400)
    os.chown(toml, 65534, 65534)
    assert "owned by agent.user's uid 65534: an agent could rewrite the worker's settings" in config_error()
    os.chown(toml, 0, 0)
    assert load_settings().agent.user == "nobody"


def test_check_trusted_through_a_symlink(tmp_path):
    target = secret_file(tmp_path, "real.toml", "", 0o600)
    link = tmp_path / "factory.toml"
    link.symlink_to(target)
    check_trusted(link, "x")  # both ours: fine
    os.chmod(target, 0o666)
    with pytest.raises(ConfigError, match="writable by its group or others"):
        check_trusted(link, "x")


# -- the isolation settings ---------------------------------------------------------------------------------
def test_isolation_defaults():
    a = load_settings().agent
    assert a.workdir_root == Path(".factory/work") and a.keep_workdir is False
    assert a.env_allowlist == ["PATH", "LANG", "LC_ALL", "TZ", "TMPDIR"] and a.user is None and a.group is None
    assert Path(a.command[1]).is_absolute()  # the agent runs elsewhere: the example agent's path is absolute


def test_isolation_settings_from_env(monkeypatch):
    monkeypatch.setenv("FACTORY_AGENT__ENV_ALLOWLIST", '["PATH", "MY_FLAG"]')
    monkeypatch.setenv("FACTORY_AGENT__USER", "nobody")
    monkeypatch.setenv("FACTORY_AGENT__GROUP", "65534")
    monkeypatch.setenv("FACTORY_AGENT__WORKDIR_ROOT", "/srv/agents")
    monkeypatch.setenv("FACTORY_AGENT__KEEP_WORKDIR", "true")
    a = load_settings().agent
    assert (a.env_allowlist, a.user, a.group, a.workdir_root, a.keep_workdir) == (
        ["PATH", "MY_FLAG"],
        "nobody",
        "65534",
        Path("/srv/agents"),
        True,
    )
    assert AgentSettings(user=1000, group=1000).user == "1000"  # TOML numbers


def test_agents_as_root_only_when_written(monkeypatch):
    """agent.user = root (or uid 0) is a choice one writes (issue 20: a root worker refuses agents without it)."""
    for value in ("root", "0"):
        set_env(monkeypatch, {"FACTORY_AGENT__USER": value})
        assert load_settings().agent.user == "root"
    assert load_settings(agent={"pid_namespace": "off"}).agent.pid_namespace == "off"
    assert AgentSettings().pid_namespace == "auto"


@pytest.mark.parametrize(
    "env,expected",
    [
        (
            {"FACTORY_AGENT__USER": "root", "FACTORY_AGENT__GROUP": "nogroup"},
            "invalid setting agent.group (FACTORY_AGENT__GROUP): needs an agent.user other than root",
        ),
        ({"FACTORY_AGENT__PID_NAMESPACE": "yes"}, "invalid setting agent.pid_namespace (FACTORY_AGENT__PID_NAMESPACE)"),
        (
            {"FACTORY_AGENT__USER": "a b"},
            "invalid setting agent.user (FACTORY_AGENT__USER): must be a name or a number",
        ),
        (
            {"FACTORY_AGENT__USER": "nobody", "FACTORY_AGENT__GROUP": "root"},
            "invalid setting agent.group (FACTORY_AGENT__GROUP): must not be root",
        ),
        ({"FACTORY_AGENT__GROUP": "nogroup"}, "invalid setting agent.group (FACTORY_AGENT__GROUP): needs agent.user"),
        (
            {"FACTORY_AGENT__ENV_ALLOWLIST": "PATH HOME"},
            "invalid setting agent.env_allowlist (FACTORY_AGENT__ENV_ALLOWLIST): must be a JSON list of variable names",
        ),
        (
            {"FACTORY_AGENT__ENV_ALLOWLIST": '["PATH", "A=B"]'},
            "invalid setting agent.env_allowlist (FACTORY_AGENT__ENV_ALLOWLIST): 'A=B' is not an environment variable name",
        ),
        (
            {"FACTORY_AGENT__KEEP_WORKDIR": "perhaps"},
            "invalid setting agent.keep_workdir (FACTORY_AGENT__KEEP_WORKDIR)",
        ),
    ],
)
def test_isolation_setting_errors_are_one_line_naming_the_field(monkeypatch, env, expected):
    set_env(monkeypatch, env)
    assert config_error().startswith(expected)
