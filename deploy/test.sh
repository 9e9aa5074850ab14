#!/usr/bin/env bash
# The test command: prepares the machine (deploy/setup.sh), then lint, type check and
# every test. Extra arguments go to pytest, e.g. deploy/test.sh -k pool -x
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash deploy/setup.sh

# Containers of test installations (key prefix "it-") can only be left by an earlier
# run that was killed: no test of this run owns them, and they would hold memory.
leftovers=$(timeout 60 docker ps -a --filter label=imagefn.managed=1 \
  --format '{{.ID}} {{.Label "imagefn.installation"}}' | awk '$2 ~ /^it-/ {print $1}') || true
if [[ -n "$leftovers" ]]; then
  echo "==> removing containers left by an earlier test run: $(wc -w <<<"$leftovers")"
  # shellcheck disable=SC2086  # one id per word
  timeout 300 docker rm -f $leftovers >/dev/null || echo "warning: some could not be removed" >&2
fi

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
