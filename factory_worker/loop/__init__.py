"""loop/: the factory loop. The iteration (poll -> rules -> gate -> dispatch -> report) and the run around it,
loop control (the loop lease, run records, kill and pause flags, revoked task ids), what a kill is (:mod:`.kill`),
the heartbeat and its liveness, worker and beat presence (and a warm shutdown's times shared with the pool), the
sweep of what dead workers left, what ``loop-status`` reads (:mod:`.status`) and why the loop cannot make
progress (:mod:`.reasons`).

May import: context, writeback, chat, agents, sources, ledger, config. Never Celery (sending a task is a callable
handed in by worker/). :mod:`.kill`, :mod:`.heartbeat`, :mod:`.status` and :mod:`.reasons` stay standard library only: the CLI's
early path imports them.
"""
