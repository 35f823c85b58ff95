"""worker/: the Celery edge, and the only room that imports Celery. The app (JSON only, namespaced queues),
the tasks (thin views over loop/ and dispatch/), a worker's and a beat's lifecycle (bootstep, signal receivers
that only set flags, presence), and the Redis broker transport.

May import: every room below it (dispatch, loop, context, writeback, chat, agents, sources, ledger, config).
"""
