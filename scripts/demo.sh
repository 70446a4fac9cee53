#!/usr/bin/env bash
# The main job until the ring benchmark lands: two nodes on loopback, b sends
# a:shell messages with teleport (one of them 10 MiB), then calls a gen_server on a.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
rebar3 compile >/dev/null
scripts/with_epmd.sh erl -noshell -name demo@127.0.0.1 -pa _build/default/lib/teleport/ebin \
    -eval 'teleport_demo:main(), halt().'
