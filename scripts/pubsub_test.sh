#!/usr/bin/env bash
# phoenix_pubsub v2.2.0's own test suites, unchanged, with teleport's adapter
# (teleport_pubsub): its suite for third-party adapters (test/shared/pubsub_test.exs,
# :test_adapter set to teleport_pubsub), the clustered tests (distributed_pubsub_test.exs,
# the Phoenix.Tracker tests) with every node on teleport_pubsub, and teleport's own checks
# of the adapter (test/phoenix_pubsub/*_test.exs). The copy of phoenix_pubsub it runs in
# is made by scripts/pubsub_prepare.sh. Prints SKIPPED and why, and exits 0, where
# phoenix_pubsub or a working elixir is missing.
#
#   scripts/with_epmd.sh scripts/pubsub_test.sh [mix test arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
dest=$(scripts/pubsub_prepare.sh)
case $? in
    0) ;;
    2) echo "pubsub_test: SKIPPED (see above)"; exit 0 ;;
    *) exit 1 ;;
esac
cd "$dest" || exit 1
# Two tests of test/shared/pubsub_test.exs read Registry's own ETS layout, which Elixir
# changed after 1.18 (1.20 stores {{:duplicate, :pid}, N, _}): they fail with the default
# adapter too there. Excluded, saying so, where the layout is not the one they expect.
excluded=()
if ! layout=$(elixir -e '{:ok, _} = Registry.start_link(keys: :duplicate, name: R, partitions: 2)
        case :ets.lookup_element(R, -2, 2) do
          {:duplicate, 2, _} -> :ok
          other -> IO.puts(inspect(other)); System.halt(1)
        end' 2>&1); then
    for t in "PubSub pool size can be configured separately from the Registry partitions" \
             "Registry partitions are configured with the same pool size as PubSub if not specified"; do
        excluded+=(--exclude "test:test $t")
        echo "pubsub_test: excluded \"$t\": Registry's layout here is $layout (the test expects {:duplicate, N, _}; it fails with the default adapter too)"
    done
fi
# test_helper.exs puts teleport's ebin in the code path (mix prunes what ERL_LIBS adds).
# Every node the suites start is on loopback, as is epmd (with_epmd.sh's, if any).
MIX_ENV=test TELEPORT_LIB=$ROOT/_build/default/lib/teleport exec mix test "${excluded[@]}" "$@"
