"""The ``source.*`` settings: eligibility rules, factory labels, GitHub's safe defaults; one-line errors."""

from __future__ import annotations

import pytest

from factory_worker.config.settings import ConfigError, load_settings
from tests.unit.settings_env import (
    clean_env,  # noqa: F401 - autouse
    set_env,
)
from tests.unit.settings_env import config_error as settings_error


def config_error(**source) -> str:
    """The one-line error of ``source`` settings."""
    return settings_error(source=source)


def test_defaults():
    s = load_settings().source
    assert (s.required_labels, s.excluded_labels, s.title_prefix, s.id_pattern, s.author_associations) == (
        [],
        [],
        "",
        None,
        [],
    )
    assert (s.done_label, s.parked_label, s.working_label) == ("factory:done", "factory:parked", "factory:working")
    assert s.github_all_open_issues is False and s.github_max_retry_after_s == 300.0


def test_environment_variables(monkeypatch):
    env = {
        "FACTORY_SOURCE__REQUIRED_LABELS": '["factory", " ok "]',
        "FACTORY_SOURCE__EXCLUDED_LABELS": '["wontfix", ""]',
        "FACTORY_SOURCE__TITLE_PREFIX": "[factory]",
        "FACTORY_SOURCE__ID_PATTERN": r"EX-\d+",
        "FACTORY_SOURCE__AUTHOR_ASSOCIATIONS": '["owner", "MEMBER"]',
        "FACTORY_SOURCE__DONE_LABEL": "bot:done",
        "FACTORY_SOURCE__PARKED_LABEL": "bot:parked",
        "FACTORY_SOURCE__WORKING_LABEL": "bot:working",
        "FACTORY_SOURCE__GITHUB_MAX_RETRY_AFTER_S": "90",
    }
    set_env(monkeypatch, env)
    s = load_settings().source
    assert s.required_labels == ["factory", "ok"] and s.excluded_labels == ["wontfix"]
    assert s.title_prefix == "[factory]" and s.id_pattern == r"EX-\d+"
    assert s.author_associations == ["OWNER", "MEMBER"]
    assert (s.done_label, s.parked_label, s.working_label) == ("bot:done", "bot:parked", "bot:working")
    assert s.github_max_retry_after_s == 90


def test_id_pattern_must_compile():
    text = config_error(id_pattern="EX-(\\d+")
    assert text.startswith(
        "invalid setting source.id_pattern (FACTORY_SOURCE__ID_PATTERN): not a valid regular expression: missing )"
    )


def test_unknown_author_association():
    text = config_error(author_associations=["OWNER", "MEMBERS"])
    assert "source.author_associations (FACTORY_SOURCE__AUTHOR_ASSOCIATIONS)" in text and "'MEMBERS'" in text


@pytest.mark.parametrize(
    "source, field",
    [
        ({"required_labels": ["agent"], "excluded_labels": ["Agent"]}, "excluded_labels"),
        ({"required_labels": ["factory:done"]}, "done_label"),
        ({"required_labels": ["x"], "parked_label": "X"}, "parked_label"),
    ],
)
def test_a_required_label_that_excludes_everything_is_refused(source, field):
    text = config_error(**source)
    assert text.startswith(f"invalid setting source.{field} (FACTORY_SOURCE__{field.upper()}): ")
    assert "source.required_labels (FACTORY_SOURCE__REQUIRED_LABELS)" in text


def test_github_without_a_label_filter_is_refused():
    text = config_error(kind="github", github_repo="o/r")
    for name in (
        "source.github_labels (FACTORY_SOURCE__GITHUB_LABELS)",
        "source.required_labels (FACTORY_SOURCE__REQUIRED_LABELS)",
        "FACTORY_SOURCE__GITHUB_ALL_OPEN_ISSUES",
        "source.github_all_open_issues=true",
    ):
        assert name in text, (name, text)


def test_github_without_a_label_filter_is_refused_from_the_environment(monkeypatch):
    monkeypatch.setenv("FACTORY_SOURCE__KIND", "github")
    monkeypatch.setenv("FACTORY_SOURCE__GITHUB_LABELS", "[]")
    with pytest.raises(ConfigError, match="needs a label filter"):
        load_settings()
    monkeypatch.setenv("FACTORY_SOURCE__GITHUB_LABELS", '["  "]')  # a blank label is no filter
    with pytest.raises(ConfigError, match="needs a label filter"):
        load_settings()


@pytest.mark.parametrize(
    "source",
    [
        {"github_labels": ["agent"]},
        {"required_labels": ["factory"]},
        {"github_all_open_issues": True},
    ],
)
def test_github_with_a_label_filter_or_the_explicit_opt_in(source):
    assert load_settings(source={"kind": "github", "github_repo": "o/r", **source}).source.kind == "github"


def test_the_file_source_needs_no_label_filter():
    assert load_settings(source={"kind": "file"}).source.required_labels == []


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-5", "86401", "soon"])
def test_max_retry_after_is_a_finite_positive_bound(value):
    assert "source.github_max_retry_after_s (FACTORY_SOURCE__GITHUB_MAX_RETRY_AFTER_S)" in config_error(
        github_max_retry_after_s=value
    )
