"""dispatch/: the life of one dispatch on a worker: verify the claim, run the agent (one, or a staged pipeline
of them handed over through the ledger), settle the claim by token, refill the next dispatch; and the
pipeline's pure decisions (:mod:`.decisions`).

May import: loop, context, writeback, chat, agents, sources, ledger, config. Never Celery: worker/tasks.py
calls in here.
"""
