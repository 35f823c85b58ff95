"""cli/: the control CLI (``factory-worker`` / ``python -m factory_worker.ctl``), a thin view over the core.
The click group and what commands share (:mod:`.group`), the loop's commands (:mod:`.commands`) and the
ledger's (:mod:`.ledger`), what they print (:mod:`.output`, :mod:`.text`), and the recovery commands' early path
(:mod:`.quick`, on :mod:`.resp`'s hiredis socket: ``loop-status``, ``pause`` and ``resume`` answered and
``kill-loop``'s kill written before anything heavy is imported, from their own settings alone; standard library
and hiredis only).

May import: every room (ops, worker lazily for revoke and start-loop).
"""
