"""The ``workspace.*`` settings: the names users set, defaults from the source, routing, one-line errors."""

from __future__ import annotations

import pytest

from factory_worker.config.settings import NoChanges, load_settings
from tests.unit.settings_env import (
    clean_env,  # noqa: F401 - autouse
    set_env,
)
from tests.unit.settings_env import config_error as settings_error


def config_error(**workspace) -> str:
    return settings_error(workspace=workspace)


def test_off_by_default():
    w = load_settings().workspace
    assert not w.enabled and w.branch == "factory/{id}" and w.push is False and w.pull_requests is False
    assert w.no_changes == NoChanges.DONE and w.token_env == "GITHUB_TOKEN"
    assert w.github_api_url == "https://api.github.com"


def test_environment_variables(monkeypatch):
    set_env(
        monkeypatch,
        {
            "FACTORY_WORKSPACE__REPO_URL": "https://github.com/acme/widgets.git",
            "FACTORY_WORKSPACE__REPOS": '{"docs": "git@github.com:acme/docs.git", "infra": "file:///srv/infra.git"}',
            "FACTORY_WORKSPACE__BASE": "develop",
            "FACTORY_WORKSPACE__BRANCH": "bot/{id}",
            "FACTORY_WORKSPACE__PUSH": "true",
            "FACTORY_WORKSPACE__TOKEN_ENV": "PUSH_TOKEN",
            "FACTORY_WORKSPACE__GITHUB_REPO": "acme/widgets",
            "FACTORY_WORKSPACE__GITHUB_API_URL": "https://ghe.example/api/v3",
            "FACTORY_WORKSPACE__NO_CHANGES": "fail",
        },
    )
    w = load_settings().workspace
    assert w.enabled and w.repo_url == "https://github.com/acme/widgets.git"
    assert w.repos == {"docs": "git@github.com:acme/docs.git", "infra": "file:///srv/infra.git"}
    assert (w.base, w.branch, w.push, w.token_env) == ("develop", "bot/{id}", True, "PUSH_TOKEN")
    assert (w.github_repo, w.github_api_url, w.no_changes) == ("acme/widgets", "https://ghe.example/api/v3", "fail")
    assert w.pull_requests is True  # push + a GitHub repository
    assert w.github_repo_for("git@github.com:acme/docs.git") == "acme/docs"
    assert w.github_repo_for("file:///srv/infra.git") == "acme/widgets"


def test_defaults_come_from_a_github_source():
    s = load_settings(
        source={
            "kind": "github",
            "github_repo": "acme/widgets",
            "github_labels": ["agent"],
            "github_api_url": "http://127.0.0.1:9/api",
            "github_token_env": "GH_BOT",
        },
        workspace={"repo_url": "file:///srv/widgets.git", "push": True},
    ).workspace
    assert (s.token_env, s.github_api_url, s.github_repo, s.pull_requests) == (
        "GH_BOT",
        "http://127.0.0.1:9/api",
        "acme/widgets",
        True,
    )


def test_routing_by_label():
    w = load_settings(
        workspace={
            "repo_url": "file:///srv/main.git",
            "repos": {"Docs": "file:///srv/docs.git", "web": "file:///srv/web.git"},
        }
    ).workspace
    assert w.route(["bug"]).url == "file:///srv/main.git"
    assert w.route(["docs"]).url == "file:///srv/docs.git" and w.route(["DOCS"]).label == "Docs"
    split = w.route(["docs", "web"])
    assert split.url is None and "route to different repositories" in split.reason
    only_labels = load_settings(workspace={"repos": {"docs": "file:///srv/docs.git"}}).workspace
    nowhere = only_labels.route(["bug"])
    assert nowhere.url is None and "FACTORY_WORKSPACE__REPO_URL" in nowhere.reason and "docs" in nowhere.reason


@pytest.mark.parametrize(
    "workspace, expected",
    [
        (
            {"repo_url": "https://bot:ghp_x@github.com/a/b.git"},
            "invalid setting workspace.repo_url (FACTORY_WORKSPACE__REPO_URL): must not hold a password",
        ),
        ({"repo_url": "ext::sh"}, "invalid setting workspace.repo_url (FACTORY_WORKSPACE__REPO_URL): must not use"),
        (
            {"repos": {"x": "http://example.com/r.git"}},
            "invalid setting workspace.repos (FACTORY_WORKSPACE__REPOS): label 'x'",
        ),
        ({"branch": "factory/id"}, "invalid setting workspace.branch (FACTORY_WORKSPACE__BRANCH): must contain {id}"),
        (
            {"branch": "factory/{id}.lock"},
            "invalid setting workspace.branch (FACTORY_WORKSPACE__BRANCH): is not a valid",
        ),
        ({"branch": "{id}/{x}"}, "invalid setting workspace.branch (FACTORY_WORKSPACE__BRANCH): must contain {id}"),
        ({"base": "a..b"}, "invalid setting workspace.base (FACTORY_WORKSPACE__BASE): must be a branch name"),
        ({"token_env": "NOT A NAME"}, "invalid setting workspace.token_env (FACTORY_WORKSPACE__TOKEN_ENV)"),
        (
            {"github_repo": "nope"},
            "invalid setting workspace.github_repo (FACTORY_WORKSPACE__GITHUB_REPO): must be owner/name",
        ),
        ({"no_changes": "maybe"}, "invalid setting workspace.no_changes (FACTORY_WORKSPACE__NO_CHANGES)"),
        (
            {"repo_url": "file:///srv/x.git", "pull_requests": True},
            "invalid settings: workspace.pull_requests (FACTORY_WORKSPACE__PULL_REQUESTS) needs workspace.push",
        ),
        (
            {"repo_url": "file:///srv/x.git", "push": True, "pull_requests": True},
            "invalid settings: workspace.pull_requests: no GitHub repository for file:///srv/x.git",
        ),
    ],
)
def test_bad_values_are_one_line_naming_the_field(workspace, expected):
    assert config_error(**workspace).startswith(expected)


def test_push_without_a_github_repository_opens_no_pull_request():
    w = load_settings(workspace={"repo_url": "file:///srv/x.git", "push": True}).workspace
    assert w.push and w.pull_requests is False
