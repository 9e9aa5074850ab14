#!/usr/bin/env bash
# Make (or update) the venv arq_peer.py runs in, and print its python.
#
# arq pins redis-py < 6 and kombu 5.7 (celery[redis], in the project's `bench` extra) needs
# redis-py >= 6.4, so arq cannot go into the project's .venv without downgrading the redis-py
# the platform is tested with. It gets a venv of its own, outside the checkout.
# Keep the requirements in step with `bench-arq` in pyproject.toml.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${ARQ_PEER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/imagefn/bench-arq-venv}"
# The same interpreter as the project's venv, so both peers run on one Python version.
base="$("$here/../../.venv/bin/python" -c 'import sys; print(sys._base_executable)' 2>/dev/null \
  || command -v python3)"
if [ ! -x "$venv/bin/python" ]; then
  "$base" -m venv "$venv" >&2
fi
"$venv/bin/pip" install -q 'arq>=0.26' 'aiohttp>=3.9' >&2
echo "$venv/bin/python"
