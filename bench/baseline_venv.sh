#!/bin/sh
# A second checkout and venv of an earlier commit, for bench/warm_path.py's baseline rows
# ("today's figure" measured in the same run as the code under test):
#
#   bench/baseline_venv.sh REV [DIR]      # default DIR: /tmp/imagefn-baseline-<commit>
#   .venv/bin/python bench/warm_path.py --baseline-src DIR/src --baseline-venv DIR/venv
#
# The source is a `git archive` export of REV (not a worktree: nothing in this checkout's
# git state changes); the venv gets that tree's own dependencies (editable install), so a
# dependency added or removed since REV does not leak into the figures.
set -eu
rev=${1:?usage: bench/baseline_venv.sh REV [DIR]}
repo=$(cd "$(dirname "$0")/.." && pwd)
commit=$(git -C "$repo" rev-parse --short "$rev^{commit}")
dir=${2:-/tmp/imagefn-baseline-$commit}
if [ -e "$dir/src" ]; then
  echo "$dir/src exists; remove it or give another DIR" >&2
  exit 1
fi
mkdir -p "$dir/src"
git -C "$repo" archive "$commit" | tar -x -C "$dir/src"
python3 -m venv "$dir/venv"
"$dir/venv/bin/pip" install -q --disable-pip-version-check -e "$dir/src[broker,objectstore]"
echo "baseline $commit ready: --baseline-src $dir/src --baseline-venv $dir/venv"
