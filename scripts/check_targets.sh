#!/usr/bin/env bash
# Checks that the Rust crates still compile (cargo check and clippy -D warnings, all
# targets) for platforms other than Linux that Rustler supports: FreeBSD and macOS
# (x86_64 and Apple silicon). Installs each target's standard library with rustup if
# missing; a target whose library cannot be fetched is reported and skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
targets=(${TELEPORT_CHECK_TARGETS:-x86_64-unknown-freebsd x86_64-apple-darwin aarch64-apple-darwin})
failed=0
for t in "${targets[@]}"; do
    if ! rustup target list --installed 2>/dev/null | grep -qx "$t"; then
        if ! rustup target add "$t" >/dev/null 2>&1; then
            echo "== $t: skipped (rustup could not fetch its standard library)"
            continue
        fi
    fi
    echo "== cargo clippy --target $t"
    if ! cargo clippy --locked --workspace --all-targets --target "$t" \
            --target-dir target/check-other -- -D warnings; then
        failed=1
    fi
done
exit $failed
