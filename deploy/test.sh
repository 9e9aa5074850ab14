#!/usr/bin/env bash
# The test command: prepares the machine (deploy/setup.sh), then lint, type check and
# every test. Extra arguments go to pytest, e.g. deploy/test.sh -k pool -x
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash deploy/setup.sh

failed=()
run() {
  echo "==> $*"
  "$@" || failed+=("$1")
}
run .venv/bin/ruff check .
run .venv/bin/mypy
run .venv/bin/pytest -q -ra tests "$@"

if ((${#failed[@]})); then
  echo "==> FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "==> all checks passed"
