#!/usr/bin/env bash
# The benchmarks with TLS on both transports, side by side in one run each:
# disterl over inet_tls_dist (TLS 1.3, mutual certificates) against teleport with its
# `tls' setting (the same CA and certificates), and teleport with TLS against teleport
# without (disterl over TLS in both runs, as the common yardstick).
#
#   scripts/bench_tls.sh            # ring (10 rounds), then small messages and latency
#   BENCH_TLS_CASES=ring scripts/bench_tls.sh
#
# Every node of a run (the Common Test node and its peers) gets the same ERL_FLAGS, so
# disterl is TLS everywhere. Figures go to stdout; see BENCHMARKS.md ("TLS").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
command -v openssl >/dev/null || { echo "bench_tls.sh needs openssl" >&2; exit 1; }

dir=$(mktemp -d /tmp/teleport-bench-tls.XXXXXX)
trap 'rm -rf "$dir"' EXIT
# A CA and one certificate for 127.0.0.1 that every node shares (all run on this host).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=teleport bench CA" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
# DNS:127.0.0.1 too: OTP's host name check matches a node's IP host as a DNS name.
printf 'subjectAltName=IP:127.0.0.1,DNS:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n' >"$dir/node.ext"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=node \
    -keyout "$dir/node.key" -out "$dir/node.csr" 2>/dev/null
openssl x509 -req -in "$dir/node.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -days 2 -extfile "$dir/node.ext" -out "$dir/node.pem" 2>/dev/null

opts="{certfile,\"$dir/node.pem\"},{keyfile,\"$dir/node.key\"},{cacertfile,\"$dir/ca.pem\"},{verify,verify_peer},{versions,['tlsv1.3']}"
cat >"$dir/ssl_dist.conf" <<CONF
[{server, [$opts, {fail_if_no_peer_cert, true}]},
 {client, [$opts]}].
CONF
export ERL_FLAGS="-proto_dist inet_tls -ssl_dist_optfile $dir/ssl_dist.conf"
# teleport's tls setting from the same files, on every benchmark node.
export TELEPORT_BENCH_TLS_DIR="$dir"

cases=${BENCH_TLS_CASES:-ring,small_messages,latency}
if [[ ",$cases," == *",ring,"* ]]; then
    echo "== ring: disterl over TLS vs teleport over TLS"
    RING_TLS=on RING_ROUNDS=${RING_ROUNDS:-10} scripts/with_epmd.sh \
        rebar3 ct --name benchtls@127.0.0.1 --suite test/ring_SUITE --group full \
        | grep -ao "ring nodes=.*" | sort -u || true
    echo "== ring: disterl over TLS vs teleport without TLS"
    RING_TLS=off RING_ROUNDS=${RING_ROUNDS:-10} scripts/with_epmd.sh \
        rebar3 ct --name benchtls@127.0.0.1 --suite test/ring_SUITE --group full \
        | grep -ao "ring nodes=.*" | sort -u || true
fi
other=$(tr ',' '\n' <<<"$cases" | grep -v '^ring$' | paste -sd, || true)
if [ -n "$other" ]; then
    echo "== $other: disterl over TLS vs teleport over TLS"
    BENCH_TLS=on scripts/with_epmd.sh \
        rebar3 ct --name benchtls@127.0.0.1 --suite test/bench_SUITE --group full --case "$other" \
        | grep -aoE "bench (small_messages|latency|head_of_line) .*" || true
fi
