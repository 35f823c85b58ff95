#!/usr/bin/env bash
# Set up (a .venv with the project) and run the factory loop over examples/issues.jsonl:
# an embedded Redis (unless FACTORY_REDIS_URL is set), a loop worker, an agent worker, beat and Flower (127.0.0.1:5555).
# Ctrl-C stops everything cleanly. Usage: bash scripts/run-example.sh [factory-worker up options]
# FACTORY_EXAMPLE=pipeline runs the three-stage example instead of the single agent: triage -> implement ->
# review (examples/pipeline.toml, agents in examples/pipeline/), each stage its own factory.agent.stage task,
# in its own namespace (factory-pipeline): it runs even after the single example finished the same issues.
# FACTORY_EXAMPLE=repo runs a coding agent on a git repository (no network): a local bare repository is the
# remote (.factory/example-remote.git, made on the first run), each issue gets a worktree on its branch
# factory/<id>, its agent (examples/repo/agent.py) commits a note, and the factory pushes the branch; in its own
# namespace (factory-repo). See the branches: git --git-dir=.factory/example-remote.git log --all --oneline
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
setup_venv dashboard "${FACTORY_REDIS_URL:+have-redis}"
export FACTORY_SOURCE__PATH="${FACTORY_SOURCE__PATH:-examples/issues.jsonl}"
default_agent='["'"$PWD"'/.venv/bin/python", "examples/agent.py", "{id}"]'
if [ "${FACTORY_EXAMPLE:-single}" = repo ]; then
  default_agent='["'"$PWD"'/.venv/bin/python", "examples/repo/agent.py"]'
fi
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
  # its own namespace too; the remote is a local bare repository (no network), pushed to by the factory only
  repo) export FACTORY_NAMESPACE="${FACTORY_NAMESPACE:-factory-repo}"
        remote_url="$(.venv/bin/python examples/repo/make_remote.py .factory/example-remote.git)"
        export FACTORY_WORKSPACE__REPO_URL="${FACTORY_WORKSPACE__REPO_URL:-$remote_url}"
        export FACTORY_WORKSPACE__PUSH="${FACTORY_WORKSPACE__PUSH:-true}"
        export FACTORY_WORKSPACE__ROOT="${FACTORY_WORKSPACE__ROOT:-.factory/workspace}" ;;
  *) echo "FACTORY_EXAMPLE must be 'single', 'pipeline' or 'repo', not '${FACTORY_EXAMPLE}'" >&2; exit 2 ;;
esac
exec .venv/bin/factory-worker up "$@"
