"""loop/: the factory loop. The iteration (poll -> rules -> gate -> dispatch -> report) and the run around it,
loop control (the loop lease, run records, kill and pause flags, revoked task ids), what a kill is (:mod:`.kill`),
the heartbeat and its liveness, worker and beat presence, the sweep of what dead workers left, and what
``loop-status`` reads (:mod:`.status`).

May import: context, writeback, chat, agents, sources, ledger, config. Never Celery (sending a task is a callable
handed in by worker/). :mod:`.kill`, :mod:`.heartbeat` and :mod:`.status` stay standard library only: the CLI's
early path imports them.
"""
