"""Branch names: valid for git whatever the id, readable when the id is, and never shared by two ids."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factory_worker.config.gitrefs import owner_repo, ref_problem, url_problem
from factory_worker.workspace.names import TREE_NAME, branch_for, mirror_name, safe_component, tree_name


def git_accepts(ref: str) -> bool:
    """``git check-ref-format`` itself, and ``git branch``'s extra rule (no leading '-')."""
    ok = subprocess.run(["git", "check-ref-format", ref], capture_output=True).returncode == 0
    return ok and not ref.removeprefix("refs/heads/").startswith("-")


@pytest.mark.parametrize("issue_id", ["42", "ENG-123", "gh_7", "a.b", "v1.2.3"])
def test_a_safe_id_is_kept_as_it_is(issue_id):
    assert branch_for("factory/{id}", issue_id) == f"factory/{issue_id}"


@pytest.mark.parametrize(
    "issue_id",
    [
        "a b",
        "a/b",
        "../../etc",
        ".hidden",
        "x.lock",
        "x.",
        "@",
        "a@{1}",
        "-rf",
        "ünïcödé",
        "tab\there",
        "a..b",
        "a~1^2:3?*[x]\\",
        "😀",
        "x" * 256,
        "refs/heads/main",
        "HEAD",
    ],
)
def test_any_id_gives_a_branch_git_accepts(issue_id):
    branch = branch_for("factory/{id}", issue_id)
    assert git_accepts("refs/heads/" + branch), branch
    assert ref_problem("refs/heads/" + branch) is None
    assert "/" not in branch.removeprefix("factory/")  # one component: 'a' and 'a/b' cannot collide as file/dir


@pytest.mark.parametrize(
    "a, b",
    [
        ("a b", "a-b"),
        ("a/b", "a-b"),
        ("a/b", "a b"),
        ("x", "x-" + safe_component("x y")[-12:]),  # an id that spells another id's hashed form
        ("x y", "x-" + safe_component("x y")[-12:]),
        ("A", "a"),
        ("x" * 100, "x" * 101),
        (".x", "x"),
    ],
)
def test_two_distinct_ids_never_share_a_branch(a, b):
    assert branch_for("factory/{id}", a) != branch_for("factory/{id}", b)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_branches_are_valid_for_every_text(issue_id):
    assert ref_problem("refs/heads/" + branch_for("factory/{id}", issue_id)) is None


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="ab /.-_x@{}~", min_size=1, max_size=12), st.text(alphabet="ab /.-_x@{}~", min_size=1, max_size=12)
)
def test_branches_are_injective(a, b):
    if a != b:
        assert safe_component(a) != safe_component(b)


def test_our_check_agrees_with_git():
    for ref in [
        "refs/heads/ok",
        "refs/heads/a..b",
        "refs/heads/.a",
        "refs/heads/a.lock",
        "refs/heads/a/",
        "refs/heads/a b",
    ]:
        assert (ref_problem(ref) is None) == git_accepts(ref), ref


def test_mirror_and_tree_names():
    assert mirror_name("https://github.com/acme/widgets.git").startswith("widgets-")
    assert mirror_name("https://github.com/acme/widgets.git") != mirror_name("https://github.com/other/widgets.git")
    name = tree_name("factory/42", 3)
    assert TREE_NAME.match(name) and name.startswith("factory-42-a3-")
    assert tree_name("factory/42", 3) != name  # a random part: never reused


@pytest.mark.parametrize(
    "url",
    [
        "https://github.com/acme/w.git",
        "ssh://git@host/acme/w.git",
        "git@github.com:acme/w.git",
        "file:///srv/w.git",
        "/srv/w.git",
        "http://127.0.0.1:8080/w.git",
    ],
)
def test_accepted_urls(url):
    assert url_problem(url) is None


@pytest.mark.parametrize(
    "url, why",
    [
        ("https://x:ghp_secret@github.com/acme/w.git", "password"),
        ("ext::sh -c touch% /tmp/pwned", "spaces"),
        ("ext::ssh-evil", "transport"),
        ("fd::17", "transport"),
        ("-uhttps://x", "'-'"),
        ("http://github.com/acme/w.git", "loopback"),
        ("ftp://host/w.git", "scheme"),
        ("https://github.com/a b", "spaces"),
        ("relative/path", "URL"),
    ],
)
def test_refused_urls(url, why):
    assert why in (url_problem(url) or "")


def test_owner_repo_from_urls():
    assert owner_repo("https://github.com/acme/widgets.git") == "acme/widgets"
    assert owner_repo("git@github.com:acme/widgets.git") == "acme/widgets"
    assert owner_repo("ssh://git@github.com/acme/widgets") == "acme/widgets"
    assert owner_repo("file:///srv/acme/widgets.git") is None
    assert owner_repo("https://gitlab.example/group/sub/widgets.git") is None
