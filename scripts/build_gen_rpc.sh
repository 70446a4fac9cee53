#!/usr/bin/env bash
# Builds gen_rpc and its one dependency, snabbkaffe, from unmodified sources (by
# default ../shared/peers beside the checkout; TELEPORT_PEERS_DIR to say where),
# with plain erlc as their README says, into _build/peers/<app>/ebin, and prints
# that directory's parent. Tests and benchmarks that run teleport_rpc beside
# gen_rpc add both ebin directories to the peers' code paths
# (TELEPORT_GEN_RPC_DIR); without them they say so and skip that part.
# Nothing of gen_rpc is copied into teleport.
set -euo pipefail
cd "$(dirname "$0")/.."
peers=${TELEPORT_PEERS_DIR:-$(cd .. && pwd)/shared/peers}
out=$PWD/_build/peers
if [ ! -f "$peers/gen_rpc/src/gen_rpc.erl" ] || [ ! -f "$peers/snabbkaffe/src/snabbkaffe.erl" ]; then
    echo "build_gen_rpc: no gen_rpc and snabbkaffe sources in $peers (TELEPORT_PEERS_DIR)" >&2
    exit 1
fi
build() { # app, include dirs..., then source dirs after --
    local app=$1; shift
    local incs=() srcs=()
    while [ "$1" != "--" ]; do incs+=(-I "$1"); shift; done
    shift
    srcs=("$@")
    mkdir -p "$out/$app/ebin"
    erlc -W0 -o "$out/$app/ebin" "${incs[@]}" "${srcs[@]}"
    # The .app from .app.src with a version string and its modules listed.
    local mods
    mods=$(cd "$out/$app/ebin" && ls *.beam | sed 's/\.beam$//' | paste -sd, -)
    erl -noshell -eval "
        {ok, [{application, App, Props}]} = file:consult(\"$peers/$app/src/$app.app.src\"),
        Props1 = lists:keystore(vsn, 1, Props, {vsn, \"peers\"}),
        Props2 = lists:keystore(modules, 1, Props1, {modules, [$mods]}),
        ok = file:write_file(\"$out/$app/ebin/$app.app\",
                             io_lib:format(\"~p.~n\", [{application, App, Props2}])),
        halt()."
}
build snabbkaffe "$peers" "$peers/snabbkaffe/include" -- "$peers"/snabbkaffe/src/*.erl
build gen_rpc "$peers" "$peers/gen_rpc" "$peers/gen_rpc/include" "$peers/snabbkaffe/include" "$peers/gen_rpc/src" -- \
    "$peers"/gen_rpc/src/*.erl "$peers"/gen_rpc/src/driver/*.erl "$peers"/gen_rpc/src/supervisor/*.erl
echo "$out"
