"""The Celery edge: no exit inside an import, one-line config errors at the entry points, no secret in conf."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import factory_worker
from tests.support import ROOT, factory_env

pytestmark = pytest.mark.integration

BAD = {"FACTORY_LOOP__MAX_ITERATIONS": "0"}


def _run(argv: list[str], env_extra: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env=factory_env(env_extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_importing_the_app_with_a_bad_setting_does_not_exit():
    res = _run(
        [sys.executable, "-c", "import factory_worker.worker.app as a; print(type(a.CONFIG_ERROR).__name__)"], BAD
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ConfigError"


@pytest.mark.parametrize("kind", ["worker", "beat"])
def test_worker_and_beat_print_a_bad_setting_as_one_line_and_exit_2(kind, tmp_path):
    argv = [sys.executable, "-m", "celery", "-A", "factory_worker", kind, "-l", "INFO"]
    if kind == "beat":
        argv += ["--schedule", str(tmp_path / "schedule")]
    res = _run(argv, BAD)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [line for line in res.stderr.splitlines() if line.startswith("factory_worker:")]
    assert len(lines) == 1 and "FACTORY_LOOP__MAX_ITERATIONS" in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_no_celery_or_flower_view_of_the_config_shows_the_redis_password():
    code = (
        "from factory_worker.worker.app import app\n"
        "conf = app.conf\n"
        "print('factory_settings' in conf)\n"
        "print(conf.humanize(with_defaults=False, censored=True))\n"  # what `celery inspect conf` / Flower show
        "print(repr(dict(conf.table(with_defaults=False, censored=True))))\n"
    )
    res = _run([sys.executable, "-c", code], {"FACTORY_REDIS_URL": "redis://:s3cret-pw@127.0.0.1:6399/0"})
    assert res.returncode == 0, res.stderr
    first, rest = res.stdout.split("\n", 1)
    assert first == "False"
    assert "s3cret-pw" not in rest and "broker_url" in rest


# every module outside the Celery edge (worker/), found by walking the package: the core and its views
CELERY_FREE = tuple(
    m.name.removeprefix("factory_worker.")
    for m in pkgutil.walk_packages(factory_worker.__path__, "factory_worker.")
    if not m.name.startswith("factory_worker.worker")
)


def test_the_core_imports_no_celery():
    """The Celery-free core of ARCHITECTURE ("The Celery edge") stays free of Celery and kombu."""
    code = (
        "import sys\nfor m in sys.argv[1:]:\n    __import__('factory_worker.' + m)\n"
        "print(sorted(n for n in ('celery', 'kombu') if n in sys.modules))"
    )
    res = _run([sys.executable, "-c", code, *CELERY_FREE], {})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
