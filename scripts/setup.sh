#!/usr/bin/env bash
# Installs what teleport needs to build and test, if it is missing: Erlang/OTP from
# the distribution's Debian packages (bookworm: 25, trixie: 27, sid: 29; teleport
# supports 25 and later), rebar3, and Elixir (for phoenix_pubsub's suites). A Rust
# toolchain is assumed.
set -euo pipefail

need_pkgs=()
command -v erl >/dev/null 2>&1 || need_pkgs+=(erlang-nox)
command -v erlc >/dev/null 2>&1 || need_pkgs+=(erlang-dev)
command -v rebar3 >/dev/null 2>&1 || need_pkgs+=(rebar3)
command -v dialyzer >/dev/null 2>&1 || need_pkgs+=(erlang-dialyzer)
[ -d /usr/lib/erlang/lib ] && ls -d /usr/lib/erlang/lib/common_test-* >/dev/null 2>&1 || need_pkgs+=(erlang-common-test)
ls -d /usr/lib/erlang/lib/eunit-* >/dev/null 2>&1 || need_pkgs+=(erlang-eunit)
ls -d /usr/lib/erlang/lib/tools-* >/dev/null 2>&1 || need_pkgs+=(erlang-tools)
# phoenix_pubsub's suites run with teleport's adapter under Debian's Elixir (scripts/pubsub_test.sh).
command -v elixir >/dev/null 2>&1 || need_pkgs+=(elixir)
# tls_SUITE makes its test certificates with the openssl command (skipped without).
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)

if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "setup: installing ${need_pkgs[*]}"
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: apt-get not found; install Erlang/OTP 25 or later (erl, erlc, common_test, dialyzer, eunit, tools) and rebar3 yourself" >&2
        exit 1
    fi
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found; install a stable Rust toolchain (https://rustup.rs) and retry" >&2
    exit 1
fi

otp=$(erl -noshell -eval 'io:format("~s", [erlang:system_info(otp_release)]), halt().')
if [ "$otp" -lt 25 ]; then
    echo "setup: Erlang/OTP $otp found; teleport needs OTP 25 or later" >&2
    exit 1
fi
