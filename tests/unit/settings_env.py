"""What the settings tests share: a clean environment (autouse where imported) and one-line error capture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from factory_worker.config.settings import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No FACTORY_* variable, no GITHUB_TOKEN and no ./factory.toml unless a test sets one."""
    for name in [n for n in os.environ if n.startswith(("FACTORY_", "GITHUB_TOKEN"))]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Set every variable of ``env`` for this test."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def config_error(**overrides) -> str:
    """The ConfigError ``load_settings(**overrides)`` raises: one line, no surrounding blanks."""
    with pytest.raises(ConfigError) as exc:
        load_settings(**overrides)
    text = str(exc.value)
    assert "\n" not in text and text.strip() == text and text
    return text
