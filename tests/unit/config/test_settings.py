"""Settings: environment variables, TOML files, and one-line errors that name the bad field."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from factory_worker.config.settings import MAX_ITERATIONS_CEILING, ConfigError, Settings, load_settings
from tests.unit.settings_env import clean_env, config_error, set_env  # noqa: F401 - clean_env is autouse


# -- defaults and environment ----------------------------------------------------------------------------
def test_defaults():
    s = load_settings()
    assert isinstance(s, Settings)
    assert s.namespace == "factory"
    assert s.effective_redis_url == "redis://127.0.0.1:6379/0"
    assert s.effective_broker_url == s.effective_redis_url
    assert s.dispatch.lease_ttl_s == 30.0 and s.dispatch.max_in_flight == 8
    assert s.source.kind == "file" and s.source.ready_states == ["ready"]
    assert s.agent.command[0] == sys.executable  # the interpreter running factory_worker, not a PATH guess


def test_environment_variables_are_read(monkeypatch):
    env = {
        "FACTORY_REDIS_URL": "redis://example:6380/2",
        "FACTORY_NAMESPACE": "team-a",
        "FACTORY_LOOP__INTERVAL_S": "2.5",
        "FACTORY_LOOP__MAX_ITERATIONS": "7",
        "FACTORY_LOOP__STALE_AFTER_S": "30",
        "FACTORY_DISPATCH__MAX_IN_FLIGHT": "16",
        "FACTORY_DISPATCH__LEASE_TTL_S": "12.5",
        "FACTORY_DISPATCH__MAX_ATTEMPTS": "5",
        "FACTORY_DISPATCH__BACKOFF_BASE_S": "1",
        "FACTORY_DISPATCH__BACKOFF_MAX_S": "60",
        "FACTORY_SOURCE__KIND": "file",
        "FACTORY_SOURCE__PATH": "/srv/issues",
        "FACTORY_AGENT__TIMEOUT_S": "90",
        "FACTORY_AGENT__LOG_DIR": "/var/log/factory",
    }
    set_env(monkeypatch, env)
    s = load_settings()
    assert s.redis_url == "redis://example:6380/2" and s.effective_broker_url == "redis://example:6380/2"
    assert s.namespace == "team-a"
    assert (s.loop.interval_s, s.loop.max_iterations, s.loop.stale_after_s) == (2.5, 7, 30.0)
    d = s.dispatch
    assert (d.max_in_flight, d.lease_ttl_s, d.max_attempts, d.backoff_base_s, d.backoff_max_s) == (
        16,
        12.5,
        5,
        1.0,
        60.0,
    )
    assert s.source.kind == "file" and s.source.path == Path("/srv/issues")
    assert s.agent.timeout_s == 90.0 and s.agent.log_dir == Path("/var/log/factory")


def test_agent_command_json_list_from_env(monkeypatch):
    monkeypatch.setenv("FACTORY_AGENT__COMMAND", '["codex", "exec", "--issue", "{id}", "title: {title}"]')
    assert load_settings().agent.command == ["codex", "exec", "--issue", "{id}", "title: {title}"]


SHELL_STRINGS = ["python agent.py {id}", "rm -rf / ; echo {title}", "{id}"]


@pytest.mark.parametrize("value", SHELL_STRINGS)
def test_agent_command_shell_string_is_rejected_naming_the_field(monkeypatch, value):
    monkeypatch.setenv("FACTORY_AGENT__COMMAND", value)
    text = config_error()
    assert "agent.command" in text and "FACTORY_AGENT__COMMAND" in text
    assert "JSON list" in text


@pytest.mark.parametrize("value", SHELL_STRINGS)
def test_agent_command_shell_string_in_toml_names_the_field(tmp_path, value):
    (tmp_path / "factory.toml").write_text(f"[agent]\ncommand = {json.dumps(value)}\n")
    text = config_error()
    assert "agent.command" in text and "FACTORY_AGENT__COMMAND" in text and "JSON list" in text


@pytest.mark.parametrize("value", ['"just a string"', "[1, 2]", "[]", '[""]', '{"a": 1}'])
def test_agent_command_must_be_a_nonempty_argv(value):
    text = config_error(agent={"command": value})
    assert "agent.command" in text and "FACTORY_AGENT__COMMAND" in text


def test_agent_command_list_is_accepted_directly():
    assert load_settings(agent={"command": ["true"]}).agent.command == ["true"]


# -- TOML ------------------------------------------------------------------------------------------------
TOML = """
namespace = "from-toml"
redis_url = "redis://toml-host:6379/0"

[dispatch]
lease_ttl_s = 45
max_in_flight = 3

[agent]
command = ["bash", "-c", "echo {id}"]
"""


def test_toml_from_factory_config(monkeypatch, tmp_path):
    path = tmp_path / "elsewhere" / "conf.toml"
    path.parent.mkdir()
    path.write_text(TOML)
    monkeypatch.setenv("FACTORY_CONFIG", str(path))
    s = load_settings()
    assert s.namespace == "from-toml" and s.redis_url == "redis://toml-host:6379/0"
    assert (s.dispatch.lease_ttl_s, s.dispatch.max_in_flight) == (45.0, 3)
    assert s.agent.command == ["bash", "-c", "echo {id}"]
    assert s.dispatch.max_attempts == 3  # untouched fields keep their defaults


def test_toml_from_factory_toml_in_the_working_directory(tmp_path):
    (tmp_path / "factory.toml").write_text(TOML)
    s = load_settings()
    assert s.namespace == "from-toml" and s.dispatch.lease_ttl_s == 45.0


def test_environment_overrides_toml(monkeypatch, tmp_path):
    (tmp_path / "factory.toml").write_text(TOML)
    monkeypatch.setenv("FACTORY_DISPATCH__LEASE_TTL_S", "9")
    s = load_settings()
    assert s.dispatch.lease_ttl_s == 9.0
    assert s.dispatch.max_in_flight == 3  # the rest of the TOML section still applies


def test_factory_config_pointing_nowhere_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTORY_CONFIG", str(tmp_path / "missing.toml"))
    text = config_error()
    assert "FACTORY_CONFIG" in text and "missing.toml" in text


def test_malformed_toml_is_one_line(tmp_path):
    (tmp_path / "factory.toml").write_text("[dispatch\nlease_ttl_s = = 3\n")
    text = config_error()
    assert "configuration" in text


def test_bad_value_in_toml_names_the_field(tmp_path):
    (tmp_path / "factory.toml").write_text("[dispatch]\nlease_ttl_s = -1\n")
    text = config_error()
    assert "dispatch.lease_ttl_s" in text and "FACTORY_DISPATCH__LEASE_TTL_S" in text


def test_unknown_top_level_setting_in_toml(tmp_path):
    (tmp_path / "factory.toml").write_text("bogus_setting = 1\n")
    text = config_error()
    assert "bogus_setting" in text and "unknown setting" in text


# -- validation errors -----------------------------------------------------------------------------------
BAD_ENV = [
    ("FACTORY_DISPATCH__LEASE_TTL_S", "0", "dispatch.lease_ttl_s"),
    ("FACTORY_DISPATCH__LEASE_TTL_S", "soon", "dispatch.lease_ttl_s"),
    ("FACTORY_DISPATCH__MAX_IN_FLIGHT", "0", "dispatch.max_in_flight"),
    ("FACTORY_DISPATCH__MAX_ATTEMPTS", "-2", "dispatch.max_attempts"),
    ("FACTORY_DISPATCH__BACKOFF_BASE_S", "-1", "dispatch.backoff_base_s"),
    ("FACTORY_LOOP__INTERVAL_S", "0", "loop.interval_s"),
    ("FACTORY_LOOP__MAX_ITERATIONS", "0", "loop.max_iterations"),
    ("FACTORY_LOOP__MAX_ITERATIONS", "many", "loop.max_iterations"),
    ("FACTORY_AGENT__TIMEOUT_S", "-5", "agent.timeout_s"),
    ("FACTORY_REDIS_URL", "http://localhost:6379", "redis_url"),
    ("FACTORY_NAMESPACE", "has space", "namespace"),
    ("FACTORY_SOURCE__KIND", "jira", "source.kind"),
]


@pytest.mark.parametrize(("env", "value", "field"), BAD_ENV)
def test_bad_env_value_is_one_line_naming_the_field(monkeypatch, env, value, field):
    monkeypatch.setenv(env, value)
    text = config_error()
    assert field in text and env in text
    assert text.startswith("invalid setting ")


def test_lease_ttl_error_message_example(monkeypatch):
    monkeypatch.setenv("FACTORY_DISPATCH__LEASE_TTL_S", "-3")
    text = config_error()
    assert text.startswith("invalid setting dispatch.lease_ttl_s (FACTORY_DISPATCH__LEASE_TTL_S): ")
    assert "greater than 0" in text


def test_several_problems_still_one_line(monkeypatch):
    monkeypatch.setenv("FACTORY_DISPATCH__LEASE_TTL_S", "0")
    monkeypatch.setenv("FACTORY_LOOP__INTERVAL_S", "0")
    text = config_error()
    assert "(and 1 more)" in text


def test_max_iterations_ceiling():
    assert load_settings(loop={"max_iterations": MAX_ITERATIONS_CEILING}).loop.max_iterations == (
        MAX_ITERATIONS_CEILING
    )
    text = config_error(loop={"max_iterations": MAX_ITERATIONS_CEILING + 1})
    assert "loop.max_iterations" in text and "FACTORY_LOOP__MAX_ITERATIONS" in text
    assert str(MAX_ITERATIONS_CEILING) in text


def test_max_iterations_ceiling_from_env(monkeypatch):
    monkeypatch.setenv("FACTORY_LOOP__MAX_ITERATIONS", str(10**9))
    assert "loop.max_iterations" in config_error()


def test_backoff_max_below_base_is_rejected():
    text = config_error(dispatch={"backoff_base_s": 10, "backoff_max_s": 5})
    assert "dispatch" in text and "FACTORY_DISPATCH" in text
    assert "backoff_max_s must be >= backoff_base_s" in text
    assert load_settings(dispatch={"backoff_base_s": 10, "backoff_max_s": 10}).dispatch.backoff_max_s == 10


def test_backoff_max_below_base_from_env(monkeypatch):
    monkeypatch.setenv("FACTORY_DISPATCH__BACKOFF_BASE_S", "30")
    monkeypatch.setenv("FACTORY_DISPATCH__BACKOFF_MAX_S", "10")
    assert "backoff_max_s must be >= backoff_base_s" in config_error()


def test_stale_after_must_exceed_the_interval():
    text = config_error(loop={"interval_s": 60, "stale_after_s": 30})
    assert "loop" in text and "stale_after_s" in text


def test_jitter_bounds():
    assert "dispatch.backoff_jitter" in config_error(dispatch={"backoff_jitter": 1.5})
    assert load_settings(dispatch={"backoff_jitter": 0}).dispatch.backoff_jitter == 0


def test_config_error_has_no_traceback_chain():
    with pytest.raises(ConfigError) as exc:
        load_settings(dispatch={"lease_ttl_s": 0})
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_a_lease_too_short_for_the_agents_term_grace_is_rejected_naming_both_fields():
    """Issue 9: an agent without renewals must be gone (SIGKILL included) before its lease can end."""
    with pytest.raises(ConfigError) as err:
        load_settings(dispatch={"lease_ttl_s": 3}, agent={"term_grace_s": 5})
    msg = str(err.value)
    assert "\n" not in msg and "FACTORY_DISPATCH__LEASE_TTL_S" in msg and "FACTORY_AGENT__TERM_GRACE_S" in msg
    assert load_settings(dispatch={"lease_ttl_s": 3}, agent={"term_grace_s": 1}).dispatch.lease_ttl_s == 3
