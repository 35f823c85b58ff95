"""The control CLI's click group and what every command shares: ``--json``, the settings, a Context.

The commands register on :data:`cli` from :mod:`.commands` (the loop's) and :mod:`.ledger` (the ledger's);
:func:`factory_worker.cli.commands.main` runs it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from factory_worker import __version__
from factory_worker.config import essentials
from factory_worker.config.essentials import Essentials
from factory_worker.config.settings import ConfigError, Settings, load_settings, recovery_settings
from factory_worker.context import Context


def load() -> Settings:
    return load_settings()


def open_context() -> Context:
    ctx = Context(load())
    ctx.redis.ping()  # fail fast (exit 2) when Redis is unreachable
    return ctx


def recovery_context() -> tuple[Context, Essentials, str | None]:
    """For the recovery commands (``loop-status``, ``kill-loop``, ``pause``, ``resume``): a Context of the full
    settings when they are valid, else of their own settings alone (:func:`recovery_settings`), their own
    settings, and the error of the full settings if any. Their own (Redis URL, namespace, stale threshold) must
    be valid: else :class:`ConfigError`, exit 2, as for every command."""
    e = essentials.read()
    try:
        settings, problem = load(), None
    except ConfigError as exc:
        settings, problem = recovery_settings(e), str(exc)
    ctx = Context(settings)
    ctx.redis.ping()
    return ctx, e, problem


def tasks_for(ctx: Context) -> Any:
    """The Celery tasks module, bound to the configured app and to ``ctx`` (for commands that send)."""
    from factory_worker.context import set_current
    from factory_worker.worker import app as _app  # configures the Celery app the shared tasks bind to
    from factory_worker.worker import tasks

    _app.app.set_default()  # Celery's current app is per thread: a thread that sends (webhooks) finds it too
    set_current(ctx)
    return tasks


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Settings come from FACTORY_* variables (FACTORY_REDIS_URL, FACTORY_NAMESPACE, ...) or "
    "factory.toml. Every command but `up` takes --json. Errors: one line on stderr, exit 2.",
)
@click.version_option(__version__, prog_name="factory-worker")
@click.option("-v", "--verbose", is_flag=True, help="log at INFO")
def cli(verbose: bool) -> None:
    """Control a factory_worker loop (needs only Redis; the broker for revoke and start-loop)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )


json_opt = click.option("--json", "as_json", is_flag=True, help="print JSON")
