#!/bin/sh
# Called by scripts/build_nif.sh (rebar3's pre-compile hook): puts the NIF cargo
# built into priv/libteleport_nif.so, the name teleport_nif:load/0 asks
# erlang:load_nif/2 for (on macOS too, where cargo names it .dylib but the VM loads
# <name>.so). Copy then rename: overwriting the
# loaded .so in place would crash any VM still running the old one (the rename gives
# the new file a new inode). Usage: scripts/copy_nif.sh [target-dir] (default target).
set -eu
dir=${1:-target}/release
for name in libteleport_nif.so libteleport_nif.dylib; do
    if [ -f "$dir/$name" ]; then
        mkdir -p priv
        cp "$dir/$name" priv/.libteleport_nif.so.new
        mv -f priv/.libteleport_nif.so.new priv/libteleport_nif.so
        exit 0
    fi
done
echo "copy_nif: no libteleport_nif.so or libteleport_nif.dylib in $dir (did cargo build fail?)" >&2
exit 1
