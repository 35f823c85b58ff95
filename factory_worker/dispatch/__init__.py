"""dispatch/: the life of one dispatch on a worker, the same for a single agent and for each stage of a staged pipeline.

Owns: the dispatch value (``job.py``: :class:`~factory_worker.dispatch.job.Job`), one step's run (``steps.py``:
what the agent gets, its Slack side, renew and stop checks), the one lifecycle (``lifecycle.py``: run, decide,
finish by token with the task's bookkeeping and the refill), the claim writes by token (``claims.py``: settle,
release), the pipeline's pure decisions (``decisions.py``), a dispatch's worktree when the workspace is on
(``worktree.py``: prepared before the agent, published after the exit 0 that completes the dispatch, released
always, its result for the ledger), and the entry points of the two agent tasks (``single.py``:
``factory.agent.run``'s begin; ``staged.py``: the hand-over and ``factory.agent.stage``'s start).
Imports ``single -> staged -> lifecycle -> claims / worktree -> steps -> job``, never back.

May import: the rooms below it (``loop``, ``context``, ``workspace``, ``writeback``, ``chat``, ``agents``,
``sources``, ``ledger``, ``config``); never Celery (the ``worker`` edge sends the tasks through the callables a Job carries).
"""
