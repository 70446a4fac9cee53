#!/usr/bin/env bash
# Runs the whole test command (scripts/test.sh) under each supported Erlang/OTP release
# on this Debian machine, then the mixed-release suite (this host's release <-> each
# other one), and prints pass/fail and time per release.
#
#   scripts/otp_matrix.sh [25] [27] [29]      (default: all three)
#
#   25  on the host (Debian bookworm's Erlang, installed by scripts/setup.sh), in this
#       checkout.
#   27  in a Debian trixie root file system, 29 in a Debian sid one: built once with
#       debootstrap and apt-get from Debian's packages, cached under
#       $TELEPORT_OTP_CACHE (default /var/cache/teleport-otp/<suite>; a stamp file marks
#       one complete, so an interrupted build is redone; delete the directory to
#       rebuild it). The checkout is copied (git ls-files, uncommitted changes
#       included) to /build/teleport-<hash of the checkout's path> inside, where its
#       _build and target stay between runs, apart from every other release's and
#       checkout's. Runs that use the same root file system wait for each other. The host's Rust toolchain is mounted
#       read-only; /proc, /dev, /sys and a fresh /run are mounted; all of it is
#       unmounted on exit, failed or not.
#   mixed  for each of 27 and 29 that ran: test/mixed_release_SUITE on the host with
#       TELEPORT_PEER_ERL naming a wrapper that runs that release's erl in its root
#       file system (same network: loopback, the host's epmd).
#
# TELEPORT_MATRIX_CMD="..." runs that command in each release's copy instead of the
# test command, and skips the mixed runs: e.g. one suite under OTP 29,
#   TELEPORT_MATRIX_CMD="scripts/setup.sh && scripts/with_epmd.sh rebar3 ct --suite test/term_sweep_SUITE" \
#       scripts/otp_matrix.sh 29
#
# Needs root for chroot releases (debootstrap, mount, chroot); installs debootstrap if
# missing. Logs: _build/otp_matrix/<release>.log. Exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
CACHE=${TELEPORT_OTP_CACHE:-/var/cache/teleport-otp}
MIRROR=${TELEPORT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOGS=$ROOT/_build/otp_matrix
PKGS="erlang-nox erlang-dev erlang-common-test erlang-dialyzer erlang-eunit erlang-tools rebar3
gcc libc6-dev git ca-certificates procps iproute2 openssl elixir"
PKGS=$(echo $PKGS)
CARGO_SRC=${CARGO_HOME:-$HOME/.cargo}
RUSTUP_SRC=${RUSTUP_HOME:-$HOME/.rustup}
# Inside a root file system.
RUST_AT=/opt/teleport-rust
# One copy per checkout (other checkouts on the machine may run the matrix too).
TREE_AT=/build/teleport-$(printf '%s' "$ROOT" | sha1sum | cut -c1-10)
CARGO_HOME_AT=/var/cache/teleport-cargo

suite_of() {
    case $1 in
        27) echo trixie ;;
        29) echo sid ;;
        *) return 1 ;;
    esac
}

log() { echo "otp_matrix: $*"; }

# Every mount point under a root file system, deepest first (what the tests mounted
# inside too, e.g. ip netns's /run/netns).
mounts_under() {
    awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

mounted_roots=()
unmount_root() {
    local dir=$1 m kept=() pass
    # Several passes: a mount point can be stacked (mounted on twice).
    for pass in 1 2 3 4 5; do
        [ -n "$(mounts_under "$dir")" ] || break
        for m in $(mounts_under "$dir"); do
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
        done
    done
    for m in $(mounts_under "$dir"); do log "could not unmount $m"; done
    for m in "${mounted_roots[@]}"; do [ "$m" = "$dir" ] || kept+=("$m"); done
    mounted_roots=("${kept[@]}")
}
unmount_all() {
    local dir
    for dir in "${mounted_roots[@]}"; do unmount_root "$dir"; done
}

on_exit() {
    [ -n "${epmd_pid:-}" ] && kill "$epmd_pid" 2>/dev/null
    unmount_all
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# Mounts what building and testing need inside $1 (undone by unmount_all).
mount_root() {
    local dir=$1
    mounted_roots+=("$dir")
    # / of the chroot a mount point of its own: `ip netns exec` and `ip -n` make /
    # a slave mount in their private namespace, which fails on a plain directory
    # ("mount --make-rslave /: Invalid argument"); reliability_SUITE's netns group
    # needs them.
    mount --bind "$dir" "$dir"
    mount -t proc proc "$dir/proc"
    mount --rbind /dev "$dir/dev"
    mount --make-rslave "$dir/dev"
    mount -t sysfs sysfs "$dir/sys"
    # Fresh per run: ip netns keeps its namespaces' mount points in /run/netns.
    mount -t tmpfs -o mode=755 tmpfs "$dir/run"
    mkdir -p "$dir$RUST_AT/cargo" "$dir$RUST_AT/rustup"
    if [ -d "$CARGO_SRC/bin" ] && [ -d "$RUSTUP_SRC" ]; then
        mount --bind "$CARGO_SRC" "$dir$RUST_AT/cargo"
        mount -o remount,bind,ro "$dir$RUST_AT/cargo"
        mount --bind "$RUSTUP_SRC" "$dir$RUST_AT/rustup"
        mount -o remount,bind,ro "$dir$RUST_AT/rustup"
    fi
}

# Waits until no other run (of this or another checkout) uses root file system $1's
# suite, and keeps it for this run: the lock goes when this script exits, after its
# EXIT trap has unmounted everything.
declare -A locked
lock_root() {
    local suite=$1 fd
    [ -z "${locked[$suite]:-}" ] || return 0
    mkdir -p "$CACHE"
    exec {fd}>"$CACHE/.$suite.lock"
    if ! flock -n "$fd"; then
        log "waiting for another run using the $suite root file system"
        flock "$fd"
    fi
    locked[$suite]=$fd
}

# Runs a command in root file system $1 with a clean environment.
in_root() {
    local dir=$1
    shift
    chroot "$dir" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
        PATH="$RUST_AT/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        RUSTUP_HOME="$RUST_AT/rustup" CARGO_HOME="$CARGO_HOME_AT" CARGO_NET_OFFLINE=true \
        "$@"
}

# Builds (or completes) the root file system of a suite.
ensure_root() {
    local suite=$1 dir=$CACHE/$1 stamp=$CACHE/$1/.teleport-rootfs-complete
    lock_root "$suite"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$PKGS" ]; then
        return 0
    fi
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
            || { log "could not install debootstrap"; return 1; }
    fi
    local start=$SECONDS
    if [ ! -f "$stamp" ]; then
        log "building the $suite root file system in $dir (debootstrap)"
        rm -rf "$dir"
        mkdir -p "$dir"
        debootstrap --variant=minbase "$suite" "$dir" "$MIRROR" >"$LOGS/debootstrap-$suite.log" 2>&1 || {
            tail -n 20 "$LOGS/debootstrap-$suite.log"
            log "debootstrap $suite failed (log: $LOGS/debootstrap-$suite.log)"
            return 1
        }
    fi
    cp /etc/resolv.conf "$dir/etc/resolv.conf"
    mount_root "$dir"
    log "installing Erlang and build tools in $suite"
    # sid's index may be past its Valid-Until date. A proxy the host's apt is told of by
    # the usual variables is passed on.
    local proxy=()
    for v in http_proxy https_proxy no_proxy; do
        [ -n "${!v:-}" ] && proxy+=("$v=${!v}")
    done
    { in_root "$dir" env "${proxy[@]}" apt-get -o Acquire::Check-Valid-Until=false update -qq &&
        in_root "$dir" env "${proxy[@]}" DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends $PKGS &&
        in_root "$dir" apt-get clean; } >"$LOGS/apt-$suite.log" 2>&1
    local rc=$?
    unmount_root "$dir"
    if [ $rc -ne 0 ]; then
        tail -n 30 "$LOGS/apt-$suite.log"
        log "apt-get in $suite failed (log: $LOGS/apt-$suite.log)"
        return 1
    fi
    echo "$PKGS" >"$stamp"
    log "$suite root file system ready in $((SECONDS - start)) s"
}

# Copies the checkout (tracked and untracked files, not ignored ones) to $1, keeping
# the _build and target already there.
copy_tree() {
    local dest=$1
    mkdir -p "$dest"
    find "$dest" -mindepth 1 -maxdepth 1 ! -name _build ! -name target -exec rm -rf {} +
    if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
            tar -C "$ROOT" --null -T - -cf - | tar -C "$dest" -xf -
    else
        tar -C "$ROOT" --exclude=./_build --exclude=./target -cf - . | tar -C "$dest" -xf -
    fi
}

# A wrapper that runs release $1's erl in its root file system, with its build of
# teleport (and the test modules) in the code path: TELEPORT_PEER_ERL for the
# mixed-release suite.
write_peer_erl() {
    local rel=$1 dir=$CACHE/$(suite_of "$1") wrapper=$LOGS/erl-otp$1
    cat >"$wrapper" <<EOF
#!/bin/sh
# Erlang/OTP $rel's erl, in $dir (written by scripts/otp_matrix.sh).
exec chroot "$dir" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin \\
    ERL_EPMD_PORT="\${ERL_EPMD_PORT:-4369}" \\
    erl -pa $TREE_AT/_build/test/lib/teleport/ebin -pa $TREE_AT/_build/test/lib/teleport/test "\$@"
EOF
    chmod +x "$wrapper"
    echo "$wrapper"
}

run_step() {
    local name=$1
    shift
    order+=("$name")
    local start=$SECONDS
    log "== $name: $*"
    # Not in a pipeline: run in this shell, so the mounts it makes are known to on_exit.
    "$@" > >(tee "$LOGS/$name.log") 2>&1
    local rc=$?
    wait $! 2>/dev/null
    seconds[$name]=$((SECONDS - start))
    if [ "$rc" -eq 0 ]; then result[$name]=pass; else result[$name]="FAIL (exit $rc, log $LOGS/$name.log)"; fi
    # Common Test's count (skips included: a suite skipped for a reason of the
    # environment shows here).
    local counts
    counts=$(grep -aoE "(Failed [0-9]+ tests\. )?(Skipped [0-9]+ \([0-9]+, [0-9]+\) tests\. )?Passed [0-9]+ tests\.|All [0-9]+ tests passed\." \
        "$LOGS/$name.log" | tail -n 1)
    [ -z "$counts" ] || result[$name]="${result[$name]}; CT: $counts"
    log "== $name: ${result[$name]} in ${seconds[$name]} s"
}

run_host() {
    "$ROOT/scripts/test.sh"
}

run_chroot() {
    local rel=$1 suite dir
    suite=$(suite_of "$rel")
    dir=$CACHE/$suite
    ensure_root "$suite" || return 1
    mount_root "$dir"
    copy_tree "$dir$TREE_AT"
    # rebar3 keeps test modules whose source is gone: start the test build afresh.
    rm -rf "$dir$TREE_AT/_build/test/lib/teleport/test"
    # Crates are fetched by the host's cargo (with the host's network settings) into
    # the root file system's cargo home; the build inside runs offline.
    mkdir -p "$dir$CARGO_HOME_AT"
    CARGO_HOME="$dir$CARGO_HOME_AT" PATH="$CARGO_SRC/bin:$PATH" \
        cargo fetch --locked --manifest-path "$ROOT/Cargo.toml" || return 1
    copy_peers "$dir$TREE_AT/_build/peers"
    in_root "$dir" bash -c "cd $TREE_AT && export TELEPORT_PEERS=$TREE_AT/_build/peers && ${TELEPORT_MATRIX_CMD:-scripts/test.sh}"
}

# The peer projects the tests run against (phoenix_pubsub, telemetry), from beside the
# checkout ($TELEPORT_PEERS), copied afresh to $1; the tests say they skipped without them.
copy_peers() {
    local dest=$1 src=${TELEPORT_PEERS:-$ROOT/../shared/peers} p
    rm -rf "$dest"
    mkdir -p "$dest"
    for p in phoenix_pubsub telemetry; do
        [ -d "$src/$p" ] && tar -C "$src" --exclude="./$p/_build" -cf - "./$p" | tar -C "$dest" -xf -
    done
    return 0
}

run_mixed() {
    local rel=$1 wrapper
    wrapper=$(write_peer_erl "$rel")
    if [ ! -d "$CACHE/$(suite_of "$rel")$TREE_AT/_build/test/lib/teleport/ebin" ]; then
        echo "no OTP $rel build of teleport (its test run did not get that far)" >&2
        return 1
    fi
    "$ROOT/scripts/setup.sh" || return 1
    TELEPORT_PEER_ERL=$wrapper TELEPORT_PEER_RELEASE=$rel \
        "$ROOT/scripts/with_epmd.sh" rebar3 ct --suite test/mixed_release_SUITE
}

main() {
    releases=("$@")
    [ ${#releases[@]} -gt 0 ] || releases=(25 27 29)
    for rel in "${releases[@]}"; do
        case $rel in
            25) ;;
            27 | 29) need_root=1 ;;
            *) echo "otp_matrix: unknown release $rel (supported: 25 27 29)" >&2; return 2 ;;
        esac
    done
    if [ -n "${need_root:-}" ] && [ "$(id -u)" -ne 0 ]; then
        echo "otp_matrix: releases 27 and 29 run in chroots: run as root" >&2
        return 2
    fi
    mkdir -p "$LOGS"

    declare -A result seconds
    order=()

    total_start=$SECONDS
    chroot_ran=()
    for rel in "${releases[@]}"; do
        if [ "$rel" = 25 ]; then
            run_step otp25 run_host
        else
            run_step "otp$rel" run_chroot "$rel"
            chroot_ran+=("$rel")
        fi
    done
    # The chroots stay mounted for the peers of the mixed-release runs.
    host=$(erl -noshell -eval 'io:format("~s", [erlang:system_info(otp_release)]), halt().' 2>/dev/null || echo host)
    [ -n "${TELEPORT_MATRIX_CMD:-}" ] && chroot_ran=()
    for rel in "${chroot_ran[@]}"; do
        run_step "mixed_${host}_${rel}" run_mixed "$rel"
    done
    unmount_all

    echo
    echo "Erlang/OTP matrix (total $((SECONDS - total_start)) s):"
    failed=0
    for name in "${order[@]}"; do
        printf '  %-14s %-6s s  %s\n' "$name" "${seconds[$name]}" "${result[$name]}"
        [[ "${result[$name]}" == pass* ]] || failed=1
    done
    return $failed
}

# One line: bash has read all of it before main runs (editing the file meanwhile is safe).
main "$@"; exit $?
