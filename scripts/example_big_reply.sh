#!/usr/bin/env bash
# Example: a gen_server on another node answering teleport:gs_call with 50 MiB replies.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
rebar3 compile >/dev/null
mkdir -p _build/examples
erlc -o _build/examples examples/teleport_big_reply.erl
scripts/with_epmd.sh erl -noshell -name big_reply_a@127.0.0.1 \
    -pa _build/default/lib/teleport/ebin -pa _build/examples \
    -eval 'teleport_big_reply:main(), halt().'
