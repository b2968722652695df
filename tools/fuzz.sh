#!/usr/bin/env bash
# Fuzzing of agentwire on stable Rust: cargo-fuzz (pinned) with `--sanitizer none`.
# Targets and what each asserts: docs/FUZZING.md.
#
#   bash tools/fuzz.sh replay                every target over its committed seed corpus
#                                            (fuzz/corpus/T), once per input: fails if
#                                            any seed, old crash included, fails again
#   bash tools/fuzz.sh short [SECONDS]       every target for SECONDS (default 20),
#                                            starting from its corpus
#   bash tools/fuzz.sh long TARGET [SECONDS] one target for SECONDS (default 600)
#   bash tools/fuzz.sh ci                    install, build, replay, short 10: the CI stage
#   bash tools/fuzz.sh install               install cargo-fuzz $VERSION if missing
#   bash tools/fuzz.sh list                  the target names
#
# New inputs found by short/long runs go to fuzz/work/T (not committed; add a useful
# one to fuzz/corpus/T by hand, or merge with `-merge=1`); crash inputs go to
# fuzz/artifacts/T/ and the run fails. Logs: fuzz/work/logs/. Each run is bounded by
# `timeout`, so a hang fails instead of stalling CI. The last line is
# `fuzz: N passed, M failed` (one count per target and mode).
#
# Environment: AGENTWIRE_FUZZ_BUILD_TIMEOUT_S (default 1800) bounds the build.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VERSION=0.13.2
TARGETS=(http_head client_message frames publish_body)
WORK=fuzz/work
BUILD_TIMEOUT_S=${AGENTWIRE_FUZZ_BUILD_TIMEOUT_S:-1800}
export CARGO_TERM_COLOR=never

passed=0
failed=0
failures=()

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

install() {
    if cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $VERSION"; then
        return 0
    fi
    echo "fuzz: installing cargo-fuzz $VERSION"
    local t0=$SECONDS
    cargo install --locked --quiet "cargo-fuzz@$VERSION"
    echo "fuzz: cargo-fuzz installed in $((SECONDS - t0))s"
}

build() {
    local t0=$SECONDS
    echo "fuzz: building every target (release, debug assertions, no sanitizer)"
    timeout --kill-after=30 "$BUILD_TIMEOUT_S" cargo fuzz build --sanitizer none
    echo "fuzz: built in $((SECONDS - t0))s"
}

# Per-target libFuzzer options: the largest input (http_head reaches the 16 KiB head
# limit) and the dictionary of protocol words, when there is one.
target_args() {
    local t=$1
    case $t in
        http_head) echo -n "-max_len=20000 " ;;
        frames) echo -n "-max_len=8192 " ;;
        *) echo -n "-max_len=4096 " ;;
    esac
    if [ -f "fuzz/dicts/$t.dict" ]; then
        echo -n "-dict=fuzz/dicts/$t.dict"
    fi
}

check_target() {
    local t
    for t in "${TARGETS[@]}"; do
        [ "$t" = "$1" ] && return 0
    done
    echo "fuzz: unknown target '$1' (targets: ${TARGETS[*]})" >&2
    exit 2
}

# record NAME RC LOG: count the result, print the libFuzzer summary lines.
record() {
    local name=$1 rc=$2 log=$3 execs
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
    [ -n "$execs" ] || execs=$(grep -o '^Done [0-9]* runs' "$log" | grep -o '[0-9]*' | tail -1 || true)
    local cov
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]* corp: [0-9]*/[0-9a-zA-Z]*' "$log" | tail -1 || true)
    if [ "$rc" -eq 0 ]; then
        passed=$((passed + 1))
        echo "fuzz: ok: $name: ${execs:-?} executions; $cov"
    else
        failed=$((failed + 1))
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            echo "fuzz: $name timed out" | tee -a "$log"
        fi
        failures+=("$name (exit $rc; log $log)")
        echo "fuzz: FAILED: $name (exit $rc); the end of $log:"
        tail -n 40 "$log"
        ls fuzz/artifacts/*/ 2>/dev/null | sed 's/^/fuzz: artifact: /' || true
    fi
}

# run NAME LIMIT_S LOG ARGS...: one `cargo fuzz run`, output kept in LOG.
run() {
    local name=$1 limit=$2 log=$3
    shift 3
    local rc=0
    timeout --kill-after=30 "$limit" cargo fuzz run --sanitizer none "$@" >"$log" 2>&1 || rc=$?
    record "$name" "$rc" "$log"
}

replay() {
    local t
    for t in "${TARGETS[@]}"; do
        run "replay $t" 600 "$WORK/logs/replay-$t.log" \
            "$t" "fuzz/corpus/$t" -- -runs=0 -print_final_stats=1
    done
}

fuzz_for() {
    local t=$1 seconds=$2 mode=$3
    mkdir -p "$WORK/$t"
    # The first corpus directory receives new inputs: the scratch one, so the committed
    # seeds stay as they are.
    # shellcheck disable=SC2046
    run "$mode $t ${seconds}s" $((seconds + 300)) "$WORK/logs/$mode-$t.log" \
        "$t" "$WORK/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        $(target_args "$t")
}

short() {
    local seconds=${1:-20} t
    for t in "${TARGETS[@]}"; do
        fuzz_for "$t" "$seconds" short
    done
}

finish() {
    if [ "${#failures[@]}" -gt 0 ]; then
        printf 'fuzz: failed: %s\n' "${failures[@]}"
    fi
    echo "fuzz: $passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}

cmd=${1:-}
[ $# -gt 0 ] && shift
mkdir -p "$WORK/logs"
case $cmd in
    install) install ;;
    list) printf '%s\n' "${TARGETS[@]}" ;;
    replay)
        install
        replay
        finish
        ;;
    short)
        install
        short "${1:-20}"
        finish
        ;;
    long)
        [ $# -ge 1 ] || {
            usage >&2
            exit 2
        }
        check_target "$1"
        install
        fuzz_for "$1" "${2:-600}" long
        finish
        ;;
    ci)
        t0=$SECONDS
        install
        build
        replay
        short 10
        echo "fuzz: ci took $((SECONDS - t0))s"
        finish
        ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
esac
