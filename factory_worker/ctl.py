"""The control CLI's entry point: ``python -m factory_worker.ctl`` / ``factory-worker``.

Every command has ``--json``. Errors (unreachable Redis, bad config, bad argument) are one line on stderr
and exit 2, never a traceback. Only Redis is needed, plus the broker for revoke and start-loop.

This module imports only the standard library before it runs a command: when the settings are plain
(:mod:`.quick`), ``loop-status`` is answered whole and ``kill-loop`` writes its kill first; then the
commands (:mod:`.cli`: click, redis-py and the settings) are imported and run as usual.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code (0 ok, 1 refused or not live, 2 error)."""
    from factory_worker.cli.quick import kill_first, status_first

    args = sys.argv[1:] if argv is None else list(argv)
    answered = status_first(args)
    if answered is not None:
        return answered
    early = kill_first(args)
    from factory_worker.cli.commands import main as run

    return run(args, early_kill=early)


if __name__ == "__main__":
    sys.exit(main())
