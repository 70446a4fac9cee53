#!/usr/bin/env bash
# Every test and check: Rust format/lint/unit and loopback tests, EUnit, xref,
# dialyzer, and the Common Test suites (peer nodes on loopback; the ring suite
# runs its short variant here, the full one is scripts/bench.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets --release -- -D warnings
echo "== cargo test"
cargo test --locked --workspace --release

echo "== rebar3 eunit"
rebar3 eunit
echo "== rebar3 xref"
rebar3 xref
echo "== rebar3 dialyzer"
rebar3 dialyzer

echo "== rebar3 ct"
scripts/with_epmd.sh rebar3 ct
