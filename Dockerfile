# factory_worker image: the same image runs the worker, beat, Flower and the metrics exporter; the command
# chooses (see docker-compose.yml and deploy/k8s/). No ENTRYPOINT: `docker run IMAGE factory-worker doctor`.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what `pip install .` needs, plus the example agent/issues (the compose demo runs them).
WORKDIR /app
COPY pyproject.toml README.md beat_schedule.py ./
COPY factory_worker ./factory_worker
COPY examples ./examples
RUN pip install ".[dashboard]"

# Non-root. /data holds agent logs and output (a volume in compose/k8s); it is the working directory, so
# relative paths (.factory/...) land there and a ./factory.toml there is read.
RUN useradd --system --uid 10001 --user-group --home-dir /data --create-home --shell /usr/sbin/nologin factory
# The unprivileged user agent workers run agents as (FACTORY_AGENT__USER=factory-agent in compose and k8s):
# no home, no login, no access to the worker's environment or files.
RUN useradd --system --uid 10002 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
    factory-agent
USER 10001:10001
WORKDIR /data

# Default: a worker on both queues. Override the command for beat / flower / metrics.
CMD ["celery", "-A", "factory_worker", "worker", "-l", "INFO", "-Q", "factory.loop,factory.agents"]
