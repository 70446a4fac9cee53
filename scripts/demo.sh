#!/usr/bin/env bash
# The main job until the ring benchmark lands: two nodes on loopback; a sends
# b's registered shell_proc messages with teleport (one of them 10 MiB), then
# calls a gen_server on b with teleport:gs_call. b prints what arrived.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
rebar3 compile >/dev/null
mkdir -p _build/examples
erlc -o _build/examples examples/teleport_demo.erl
scripts/with_epmd.sh erl -noshell -name demo_a@127.0.0.1 \
    -pa _build/default/lib/teleport/ebin -pa _build/examples \
    -eval 'teleport_demo:main(), halt().'
