#!/usr/bin/env bash
# Compiles examples/MODULE.erl and runs MODULE:main() on a node named NODE@127.0.0.1.
# Usage: scripts/run_example.sh MODULE NODE
set -euo pipefail
cd "$(dirname "$0")/.."
module=$1 node=$2
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
rebar3 compile >/dev/null
mkdir -p _build/examples
erlc -o _build/examples "examples/$module.erl"
scripts/with_epmd.sh erl -noshell -name "$node@127.0.0.1" \
    -pa _build/default/lib/teleport/ebin -pa _build/examples \
    -eval "$module:main(), halt()."
