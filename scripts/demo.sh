#!/usr/bin/env bash
# Two nodes on loopback; a sends b's registered shell_proc messages with teleport
# (one of them 10 MiB), then calls a gen_server on b with teleport:gs_call.
exec "$(dirname "$0")/run_example.sh" teleport_demo demo_a
