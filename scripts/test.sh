#!/usr/bin/env bash
# Every test: Rust unit tests, EUnit, and the Common Test suites (peer nodes on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "== cargo test"
cargo test --locked --workspace --release

echo "== rebar3 eunit"
rebar3 eunit

echo "== rebar3 ct"
scripts/with_epmd.sh rebar3 ct --suite test/teleport_SUITE
