"""cli/: the control CLI (``factory-worker`` / ``python -m factory_worker.ctl``), a thin view over the core.
The click group and what commands share (:mod:`.group`), the loop's commands (:mod:`.commands`) and the
ledger's (:mod:`.ledger`), what they print (:mod:`.output`, :mod:`.text`), and the early path (:mod:`.quick`:
``loop-status`` answered and ``kill-loop``'s kill written before anything heavy is imported; standard library
and hiredis only).

May import: every room (ops, worker lazily for revoke and start-loop).
"""
