#!/bin/sh
# rebar3's pre-compile hook: builds the NIF with cargo and puts it in priv/ (see
# copy_nif.sh). teleport's own test runs (the test profile, with teleport the top-level
# project) get a build with the test-hooks feature, in a target directory of its own:
# fault injection and the NIFs only tests call (debug_drop_events/1,
# encode_measured/1), which every other build, a dependent project's tests included,
# leaves out.
set -eu
features=""
target=target
case "${REBAR_BUILD_DIR:-}" in
    */_build/test | */_build/*+test | */_build/test+*)
        if [ "$(cd "${REBAR_ROOT_DIR:-.}" && pwd -P)" = "$(pwd -P)" ]; then
            features="--features test-hooks"
            target=target/test-hooks
        fi
        ;;
esac
# shellcheck disable=SC2086 # $features is empty or two words
cargo build --release --locked -p teleport_nif $features --target-dir "$target"
sh scripts/copy_nif.sh "$target"
