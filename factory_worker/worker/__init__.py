"""The Celery edge: the app, the tasks, worker and beat lifecycle, the broker transport."""
