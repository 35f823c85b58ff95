"""The control CLI's entry point: ``python -m factory_worker.ctl`` / ``factory-worker``.

Every command has ``--json``. Errors (unreachable Redis, bad config, bad argument) are one line on stderr
and exit 2, never a traceback. Only Redis is needed, plus the broker for revoke and start-loop.

This module imports only the standard library (and hiredis) before it runs a command: the recovery commands
are taken first (:mod:`.cli.quick`: ``loop-status``, ``pause`` and ``resume`` answered whole, ``kill-loop``'s
kill written), from the few settings they use, wherever they are set; then the commands (:mod:`.cli`: click,
redis-py and the settings) are imported and run as usual.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code (0 ok, 1 refused or not live, 2 error)."""
    from factory_worker.cli.quick import kill_first, pause_first, status_first

    args = sys.argv[1:] if argv is None else list(argv)
    for first in (status_first, pause_first):
        answered = first(args)
        if answered is not None:
            return answered
    early = kill_first(args)
    from factory_worker.cli.commands import main as run

    return run(args, early_kill=early)


if __name__ == "__main__":
    sys.exit(main())
