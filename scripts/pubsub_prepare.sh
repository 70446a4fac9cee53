#!/usr/bin/env bash
# Prepares phoenix_pubsub v2.2.0 to run with teleport's adapter (for scripts/pubsub_test.sh
# and scripts/bench_pubsub.sh) and prints the folder, or prints why not on stderr and exits
# 2 (missing phoenix_pubsub or a working elixir) or 1 (a failure).
#
# phoenix_pubsub comes from the peer projects beside the checkout ($TELEPORT_PEERS, default
# ../shared/peers), copied to _build/phoenix_pubsub and configured there, the original left
# as it is: mix.exs without its ex_doc dependency (hex cannot be reached), teleport's
# test_helper.exs (the original's, with teleport's adapter) and test files
# (test/phoenix_pubsub/). teleport is compiled (rebar3 compile) first; TELEPORT_LIB names it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
PEERS=${TELEPORT_PEERS:-$ROOT/../shared/peers}
SRC=$PEERS/phoenix_pubsub
DEST=$ROOT/_build/phoenix_pubsub

unavailable() {
    echo "$*" >&2
    exit 2
}
[ -f "$SRC/mix.exs" ] || unavailable "no phoenix_pubsub at $SRC (set TELEPORT_PEERS to the peer projects' folder)"
command -v mix >/dev/null 2>&1 || unavailable "no mix on PATH (scripts/setup.sh installs Debian's elixir)"
elixir_out=$(elixir -e 'IO.puts(System.version())' 2>&1) ||
    unavailable "this release's elixir does not run: $elixir_out"
echo "pubsub: Elixir $elixir_out on Erlang/OTP $(erl -noshell -eval 'io:format("~s", [erlang:system_info(otp_release)]), halt().')" >&2

rebar3 compile >/dev/null

# A fresh copy, keeping mix's build of it between runs.
mkdir -p "$DEST"
find "$DEST" -mindepth 1 -maxdepth 1 ! -name _build -exec rm -rf {} +
tar -C "$SRC" --exclude=./_build --exclude=./deps -cf - . | tar -C "$DEST" -xf -
sed -i '/{:ex_doc,/d' "$DEST/mix.exs"
if grep -q ex_doc "$DEST/mix.exs"; then
    echo "could not remove ex_doc from $DEST/mix.exs" >&2
    exit 1
fi
cp test/phoenix_pubsub/test_helper.exs "$DEST/test/test_helper.exs"
mkdir -p "$DEST/test/teleport"
cp test/phoenix_pubsub/*_test.exs "$DEST/test/teleport/"
echo "$DEST"
