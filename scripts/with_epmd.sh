#!/usr/bin/env bash
# Runs a command with an epmd of its own: started on a free port on 127.0.0.1, named
# to the command's nodes through ERL_EPMD_PORT, and stopped (by its own pid)
# afterwards. Not the machine's epmd on 4369: another run on the same machine may
# stop that one under us, or we under it.
set -uo pipefail
epmd_pid=""
cleanup() {
    if [ -n "$epmd_pid" ]; then
        kill "$epmd_pid" 2>/dev/null
        wait "$epmd_pid" 2>/dev/null
    fi
}
trap cleanup EXIT
for _ in $(seq 20); do
    port=$((20000 + RANDOM % 30000))
    epmd -address 127.0.0.1 -port "$port" &
    epmd_pid=$!
    for _ in $(seq 50); do
        epmd -port "$port" -names >/dev/null 2>&1 && break
        kill -0 "$epmd_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$epmd_pid" 2>/dev/null && epmd -port "$port" -names >/dev/null 2>&1; then
        export ERL_EPMD_PORT=$port
        break
    fi
    # The port was taken: try another.
    kill "$epmd_pid" 2>/dev/null
    wait "$epmd_pid" 2>/dev/null
    epmd_pid=""
done
if [ -z "$epmd_pid" ]; then
    echo "with_epmd: could not start an epmd on a free port" >&2
    exit 1
fi
"$@"
