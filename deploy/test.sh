#!/usr/bin/env bash
# The test command: prepares the machine (deploy/setup.sh), then lint, type check and
# every test. Extra arguments go to pytest, e.g. deploy/test.sh -k pool -x
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash deploy/setup.sh

failed=()
run() {  # run NAME COMMAND...: on failure, NAME is listed at the end
  local name="$1"
  shift
  echo "==> $*"
  "$@" || failed+=("$name")
}
run ruff .venv/bin/ruff check .
run mypy .venv/bin/mypy
# The whole run is bounded as well as each test (pytest-timeout, pyproject.toml): past
# the limit pytest gets SIGINT, stops, and prints where it was and what failed so far.
PYTEST_LIMIT_MIN="${IMAGEFN_TEST_LIMIT_MIN:-70}"
run pytest timeout --signal=INT --kill-after=60 "${PYTEST_LIMIT_MIN}m" .venv/bin/pytest -q -ra tests "$@"

if ((${#failed[@]})); then
  echo "==> FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "==> all checks passed"
