#!/usr/bin/env bash
# Runs a command with an epmd available. If none is running, starts one for the
# command only and stops it (by its own pid) afterwards.
set -uo pipefail
epmd_pid=""
if ! epmd -names >/dev/null 2>&1; then
    epmd -address 127.0.0.1 &
    epmd_pid=$!
    for _ in $(seq 50); do epmd -names >/dev/null 2>&1 && break; sleep 0.1; done
fi
cleanup() { [ -n "$epmd_pid" ] && kill "$epmd_pid" 2>/dev/null; wait "$epmd_pid" 2>/dev/null; }
trap cleanup EXIT
"$@"
