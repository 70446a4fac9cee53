#!/usr/bin/env bash
# The main job: the ring benchmark (6 peer nodes x 6 workers x 10 MiB, disterl
# and teleport in the same run). Figures go to stdout; see BENCHMARKS.md.
# Override with RING_NODES, RING_WORKERS, RING_PAYLOAD_BYTES, RING_ROUNDS,
# RING_POOL_SIZE or RING_POOL_SIZES=1,2,4,8 (a sweep).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
scripts/with_epmd.sh rebar3 ct --suite test/ring_SUITE --group full
