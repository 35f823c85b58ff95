"""ops/: operating a deployment. The operator actions behind the CLI (status, kill, start, pause, explain),
the ledger's invariant audit, ``doctor``, the Prometheus metrics, the dev stack (``up``) and an embedded
``redis-server``.

May import: worker (lazily: the dev stack starts the app, doctor reads the transport's options) and every room
below it.
"""
