#!/usr/bin/env bash
# Set up (a .venv with the project and its test extras), check the house (ruff, ruff format, the import
# contracts, mypy), and run the whole test suite. A failed check fails the run after the suite has run too.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
setup_venv test
checks=0
check() {
  echo "+ $*" >&2
  if ! "$@"; then
    echo "check failed: $*" >&2
    checks=1
  fi
}
check .venv/bin/ruff check --quiet .
check .venv/bin/ruff format --check --quiet .
check .venv/bin/lint-imports --no-cache
check .venv/bin/mypy
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
if [ "$rc" -eq 0 ] && [ "$checks" -ne 0 ]; then
  echo "the suite passed but a check failed (see above)" >&2
  exit 1
fi
exit "$rc"
