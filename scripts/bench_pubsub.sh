#!/usr/bin/env bash
# Phoenix.PubSub broadcasts to 4 nodes with the default adapter and with teleport's, in
# the same run (test/phoenix_pubsub/bench.exs says what it measures). Runs in the copy of
# phoenix_pubsub made by scripts/pubsub_prepare.sh. PUBSUB_BENCH_RUNS (default 3) runs.
#
#   scripts/bench_pubsub.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
scripts/setup.sh || exit 1
dest=$(scripts/pubsub_prepare.sh) || exit 1
cd "$dest" || exit 1
MIX_ENV=test TELEPORT_LIB=$ROOT/_build/default/lib/teleport \
    exec "$ROOT/scripts/with_epmd.sh" mix run --no-start -e 'Application.ensure_all_started(:phoenix_pubsub)' \
    -r "$ROOT/test/phoenix_pubsub/bench.exs"
