#!/usr/bin/env bash
# Builds teleport as it was at the last commit of wire protocol 1 (before the protocol
# had versions), for test/wire_version_SUITE: a node of today's code must refuse it by
# name, both ways. Prints the directory of its ebin/ on success.
#
#   scripts/build_old_main.sh [commit]     (default: a21bce0)
#
# Needs the git history (a clone, not a copy of the files). The build is kept in
# _build/old_main/<commit> and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
commit=${1:-a21bce0}
dir=$PWD/_build/old_main/$commit
ebin=$dir/_build/default/lib/teleport/ebin
if [ -f "$dir/.built" ] && [ -d "$ebin" ]; then
    echo "$ebin"
    exit 0
fi
git rev-parse --verify --quiet "$commit^{commit}" >/dev/null || {
    echo "build_old_main: commit $commit is not in this repository's history" >&2
    exit 1
}
rm -rf "$dir"
mkdir -p "$dir"
git archive "$commit" | tar -x -C "$dir"
(cd "$dir" && rebar3 compile) >"$dir.log" 2>&1 || {
    tail -n 30 "$dir.log" >&2
    echo "build_old_main: building $commit failed (log: $dir.log)" >&2
    exit 1
}
touch "$dir/.built"
echo "$ebin"
