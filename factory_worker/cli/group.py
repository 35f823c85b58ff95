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
from factory_worker.config.settings import Settings, load_settings
from factory_worker.context import Context


def load() -> Settings:
    return load_settings()


def open_context() -> Context:
    ctx = Context(load())
    ctx.redis.ping()  # fail fast (exit 2) when Redis is unreachable
    return ctx


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
