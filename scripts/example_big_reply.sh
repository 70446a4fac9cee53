#!/usr/bin/env bash
# A gen_server on another node answering teleport:gs_call with 50 MiB replies.
exec "$(dirname "$0")/run_example.sh" teleport_big_reply big_reply_a
