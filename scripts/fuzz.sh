#!/usr/bin/env bash
# Fuzzing, run like a benchmark: every cargo-fuzz target of teleport_net
# (native/teleport_net/fuzz: handshake, frames, etf_read) for a bounded time each,
# one after the other, then a summary (runs, runs/s, coverage, corpus, crashes).
#
#   scripts/fuzz.sh [seconds-per-target] [target...]     (default: 60 s, every target)
#
# Needs the nightly toolchain; installs cargo-fuzz from crates.io if it is missing.
# Each target starts from its committed corpus, seeds and regression inputs
# (fuzz/corpus, fuzz/seeds, fuzz/regressions) and writes what it finds to a working
# corpus under fuzz/target/ (not committed). FUZZ_UPDATE_CORPUS=1 merges that into
# fuzz/corpus/<target> and minimizes it (cargo fuzz cmin) so it can be committed.
# A crash leaves its input in fuzz/artifacts/<target>/ and makes the script fail;
# add it to fuzz/regressions/<target>/ (and tests/fuzz_corpus.rs) once fixed.
# Extra libFuzzer flags: FUZZ_FLAGS="-jobs=2 ...".
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(handshake frames etf_read)

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked

cd native/teleport_net
fuzz=fuzz
summary=()
failed=0
for target in "${targets[@]}"; do
    work="$fuzz/target/corpus/$target"
    log="$fuzz/target/$target.log"
    mkdir -p "$work" "$fuzz/corpus/$target" "$fuzz/regressions/$target" "$fuzz/artifacts/$target"
    echo "== $target: ${seconds}s"
    status=0
    # -a: debug assertions (integer overflow) on top of AddressSanitizer. -malloc_limit_mb:
    # no input of at most 4 KiB may make the parsers ask for 64 MiB at once.
    # shellcheck disable=SC2086
    cargo +nightly fuzz run -a "$target" "$work" "$fuzz/corpus/$target" "$fuzz/seeds/$target" \
        "$fuzz/regressions/$target" -- \
        -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=1024 -malloc_limit_mb=64 \
        -print_final_stats=1 ${FUZZ_FLAGS:-} >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    per_second=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9A-Za-z]*\).*/\1/p' <<<"$last")
    crashes=$(find "$fuzz/artifacts/$target" -type f | wc -l)
    if [ "$status" -ne 0 ]; then
        failed=1
        echo "!! $target failed (exit $status); the end of $log:"
        tail -40 "$log"
    fi
    summary+=("$(printf '%-10s %6ss %12s runs %8s/s  cov %6s  corpus %10s  artifacts %s' \
        "$target" "$seconds" "${runs:-?}" "${per_second:-?}" "${cov:-?}" "${corp:-?}" "$crashes")")
    if [ "${FUZZ_UPDATE_CORPUS:-0}" = 1 ]; then
        cp -n "$work"/* "$fuzz/corpus/$target/" 2>/dev/null || true
        # Edges only (no hit counters): keeps the committed corpus to tens or hundreds of files.
        cargo +nightly fuzz cmin -a "$target" "$fuzz/corpus/$target" -- -max_len=4096 -use_counters=0 \
            >"$fuzz/target/$target.cmin.log" 2>&1
        echo "   corpus/$target: $(find "$fuzz/corpus/$target" -type f | wc -l) files after cmin"
    fi
done

echo "== summary (machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
printf '%s\n' "${summary[@]}"
exit "$failed"
