#!/usr/bin/env bash
# Set up (a .venv with the project) and run the factory loop over examples/issues.jsonl:
# an embedded Redis (unless FACTORY_REDIS_URL is set), a loop worker, an agent worker, beat and Flower (127.0.0.1:5555).
# Ctrl-C stops everything cleanly. Usage: bash scripts/run-example.sh [factory-worker up options]
# FACTORY_EXAMPLE=pipeline runs the three-stage example instead of the single agent: triage -> implement ->
# review (examples/pipeline.toml, agents in examples/pipeline/), each stage its own factory.agent.stage task,
# in its own namespace (factory-pipeline): it runs even after the single example finished the same issues.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
setup_venv dashboard "${FACTORY_REDIS_URL:+have-redis}"
export FACTORY_SOURCE__PATH="${FACTORY_SOURCE__PATH:-examples/issues.jsonl}"
default_agent='["'"$PWD"'/.venv/bin/python", "examples/agent.py", "{id}"]'
export FACTORY_AGENT__COMMAND="${FACTORY_AGENT__COMMAND:-$default_agent}"
export FACTORY_LOOP__INTERVAL_S="${FACTORY_LOOP__INTERVAL_S:-3}"
export FACTORY_LOOP__STALE_AFTER_S="${FACTORY_LOOP__STALE_AFTER_S:-15}"
export FACTORY_DISPATCH__BACKOFF_BASE_S="${FACTORY_DISPATCH__BACKOFF_BASE_S:-4}"
export FACTORY_DISPATCH__BACKOFF_MAX_S="${FACTORY_DISPATCH__BACKOFF_MAX_S:-16}"
export FACTORY_AGENT__LOG_DIR="${FACTORY_AGENT__LOG_DIR:-.factory/logs}"
case "${FACTORY_EXAMPLE:-single}" in
  single) ;;
  # its own namespace: the single example's done issues (the ledger persists in .factory/) are not its own
  pipeline) export FACTORY_CONFIG="${FACTORY_CONFIG:-examples/pipeline.toml}"
            export FACTORY_NAMESPACE="${FACTORY_NAMESPACE:-factory-pipeline}" ;;
  *) echo "FACTORY_EXAMPLE must be 'single' or 'pipeline', not '${FACTORY_EXAMPLE}'" >&2; exit 2 ;;
esac
exec .venv/bin/factory-worker up "$@"
