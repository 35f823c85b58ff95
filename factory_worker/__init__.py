"""factory_worker: a distributed factory loop on Celery + Redis.

``celery -A factory_worker worker|beat|flower`` finds the Celery app here as ``factory_worker.worker.app``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: importing the ledger must not build a Celery app
    if name in ("app", "celery"):
        from factory_worker.worker.app import app

        return app
    raise AttributeError(name)
