#!/usr/bin/env bash
# The test command of agentwire: everything a change must pass, from any directory.
#
#   bash tools/test.sh           Rust unit + integration + doc tests, then the release
#                                build and the Python interop checks against it
#   bash tools/test.sh --quick   Rust tests only (no release build, no interop, no
#                                conformance)
#
# Steps:
#   1. target/test-venv: a Python venv (python3 -m venv) holding the pinned packages of
#      tools/requirements-test.txt; reinstalled only when that file changes (also with
#      --quick: the TLS integration tests drive Python's websockets from it, through
#      AGENTWIRE_TEST_PYTHON).
#   1b. Debian packages the tests need, installed with apt-get when missing
#      (tools/lib/apt.sh): curl (the TLS integration tests, the README's snippets) and
#      redis-server (the Redis engine's tests).
#   2. cargo test --all-targets --no-fail-fast (unit, integration, bins, benches in test
#      mode), then cargo test --doc (--all-targets leaves doc tests out).
#   3. cargo build --release, then tests/interop/test_interop.py against
#      target/release/agentwire with the venv's python.
#   3a. tests/interop/test_metrics.py: /metrics through prometheus_client's parser
#      (histograms valid, run metrics move as runs happen, the Grafana dashboard's
#      metrics exist) against target/release/agentwire.
#   3b. tools/test_js.sh: the clients/js tests (node --test, `npm ci` of the pinned
#      devDependencies in clients/js) against target/release/agentwire.
#   3c. tools/test_browser.sh: the demo page in Debian's Chromium (installed with apt-get
#      when missing; playwright-core pinned in web/, `npm ci`) against
#      target/release/agentwire.
#   3d. tools/test_python.sh: the clients/python tests (pytest in target/pyclient-venv,
#      pinned requirements) against target/release/agentwire.
#   4. tools/autobahn.sh: the Autobahn|Testsuite cases (kosoku, pinned, in its own venv)
#      against the conformance build, compared with tests/autobahn/expected.json
#      (docs/CONFORMANCE.md).
# Every step runs even when an earlier one failed (except what depends on it), so one run
# shows all failures. The last line is `N passed, M failed`: Rust tests and interop
# checks summed, plus one failure per step that failed without reporting counts (a
# compile error, a timeout). Exit 0 only when M is 0.
#
# Environment: PYTHON (default python3) creates the venv; AGENTWIRE_CARGO_TEST_TIMEOUT_S,
# AGENTWIRE_BUILD_TIMEOUT_S, AGENTWIRE_CONFORMANCE_TIMEOUT_S (default 1200 each) and
# AGENTWIRE_INTEROP_TIMEOUT_S (default 120) and AGENTWIRE_CLIENTS_TIMEOUT_S (default 600, each client suite) bound the slow steps, so a hang fails instead of stalling CI. Logs of each step are
# kept in target/test-logs/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=$ROOT/target/test-venv
REQS=$ROOT/tools/requirements-test.txt
LOGDIR=$ROOT/target/test-logs
PYTHON=${PYTHON:-python3}
CARGO_TEST_TIMEOUT_S=${AGENTWIRE_CARGO_TEST_TIMEOUT_S:-1200}
INTEROP_TIMEOUT_S=${AGENTWIRE_INTEROP_TIMEOUT_S:-120}
BUILD_TIMEOUT_S=${AGENTWIRE_BUILD_TIMEOUT_S:-1200}
CONFORMANCE_TIMEOUT_S=${AGENTWIRE_CONFORMANCE_TIMEOUT_S:-1200}
CLIENTS_TIMEOUT_S=${AGENTWIRE_CLIENTS_TIMEOUT_S:-600}
export PYTHONUNBUFFERED=1

quick=0
for arg in "$@"; do
    case $arg in
        --quick) quick=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "tools/test.sh: unknown argument '$arg' (try --help)" >&2
            exit 2
            ;;
    esac
done

mkdir -p "$LOGDIR"
rm -f "$LOGDIR"/*.log
passed=0
failed=0
failures=()
summary=()

step() { printf '\n==> %s\n' "$*"; }

# Add the counts of cargo's "test result:" lines in log $2 for step $1; a failed command
# ($3 = its exit code) whose log holds no failing test result counts as one failure.
count_cargo() {
    local name=$1 log=$2 rc=$3 p f
    read -r p f < <(awk '/^test result: /{for(i=1;i<NF;i++){if($(i+1)~/^passed/)p+=$i; if($(i+1)~/^failed/)f+=$i}} END{print p+0, f+0}' "$log")
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        f=1
        failures+=("$name: exit code $rc without a failing test (compile error, crash or timeout), see above")
    elif [ "$f" -ne 0 ]; then
        failures+=("$name: $f failed")
    fi
    passed=$((passed + p))
    failed=$((failed + f))
    summary+=("$name: $p passed, $f failed")
}

# count_summary NAME LOG RC DETAIL: add the counts of the last line of LOG, which a suite
# ends with `[PREFIX: ]N passed, M failed`; a missing line, or a failing exit code RC with
# no failure counted, is one failure. DETAIL goes into the failure list.
count_summary() {
    local name=$1 log=$2 rc=$3 detail=$4 last p f
    last=$(tail -n 1 "$log")
    if [[ $last =~ ^([a-z]+:\ )?([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
        p=${BASH_REMATCH[2]}
        f=${BASH_REMATCH[3]}
        if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
    else
        p=0
        f=1
    fi
    passed=$((passed + p))
    failed=$((failed + f))
    summary+=("$name: $p passed, $f failed")
    if [ "$f" -ne 0 ]; then
        failures+=("$name: exit code $rc; $detail")
    fi
}

# run_logged LOG LIMIT_S CMD...: run CMD under `timeout LIMIT_S`, its output shown and
# kept in LOG; sets rc (124 on timeout). timeout puts CMD in its own process group and
# kills all of it (a hung test binary too); Ctrl-C or SIGTERM here kills that group.
child=""
tailer=""
run_logged() {
    local log=$1 limit=$2
    shift 2
    : >"$log"
    timeout --kill-after=30 "$limit" "$@" >"$log" 2>&1 &
    child=$!
    tail -n +1 -f --pid="$child" "$log" &
    tailer=$!
    rc=0
    wait "$child" || rc=$?
    wait "$tailer" || true
    child=""
    tailer=""
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "tools/test.sh: '$*' timed out after ${limit}s" | tee -a "$log"
    fi
}
on_signal() {
    [ -n "$child" ] && kill -TERM -- "-$child" 2>/dev/null
    [ -n "$tailer" ] && kill "$tailer" 2>/dev/null
    echo "tools/test.sh: interrupted" >&2
    exit 130
}
trap on_signal INT TERM

# A step that could not run for want of `needs`: counted as failed, named in the summary.
not_run() {
    local name=$1 needs=$2 broken=$3
    echo "skipped: needs $needs"
    failed=$((failed + 1))
    failures+=("$name: not run ($broken failed)")
    summary+=("$name: not run")
}

# client_suite NAME WHAT SCRIPT LOGNAME: run SCRIPT against the release build (needs it),
# its output in target/test-logs/LOGNAME-step.log, its counts added to the summary.
client_suite() {
    local name=$1 what=$2 script=$3 logname=$4
    step "$name: $what against target/release/agentwire"
    if [ "$build_rc" -ne 0 ]; then
        not_run "$name" "the release build" "release build"
        return
    fi
    run_logged "$LOGDIR/$logname-step.log" "$CLIENTS_TIMEOUT_S" \
        env AGENTWIRE_BIN="$ROOT/target/release/agentwire" bash "$script"
    count_summary "$name" "$LOGDIR/$logname-step.log" "$rc" "see $LOGDIR/$logname.log"
}

# A Python suite of tests/interop/ against the release build, in the venv: it prints a
# `FAIL ...` line for each failed check and ends with its counts.
interop_suite() {
    local name=$1 script=$2
    step "$name: $script against target/release/agentwire"
    if [ "$build_rc" -ne 0 ] || [ "$venv_ok" -ne 1 ]; then
        not_run "$name" "the release build and the venv" "release build or venv"
        return
    fi
    run_logged "$LOGDIR/$name.log" "$INTEROP_TIMEOUT_S" \
        "$VENV/bin/python" "$script" --bin "$ROOT/target/release/agentwire"
    count_summary "$name" "$LOGDIR/$name.log" "$rc" \
        "$(grep -c '^FAIL ' "$LOGDIR/$name.log" || true) FAIL line(s) above"
}

# 1. Python venv for the interop checks and the TLS integration tests.
venv_ok=0
step "Python test venv ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then
    rm -rf "$VENV"
    if ! "$PYTHON" -m venv "$VENV"; then
        # A Python without ensurepip (Debian without python3-venv): virtualenv, from
        # PyPI, brings its own pip.
        rm -rf "$VENV"
        echo "tools/test.sh: '$PYTHON -m venv' failed; trying virtualenv from PyPI" >&2
        if ! { "$PYTHON" -m pip install --quiet --user --disable-pip-version-check virtualenv &&
            "$PYTHON" -m virtualenv --quiet "$VENV"; }; then
            rm -rf "$VENV"
            echo "tools/test.sh: cannot create $VENV (on Debian/Ubuntu: apt-get install python3-venv)" >&2
        fi
    fi
fi
if [ -x "$VENV/bin/python" ]; then
    want=$(sha256sum "$REQS" | cut -d' ' -f1)
    have=$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)
    if [ "$want" = "$have" ] && "$VENV/bin/python" -c 'import jwt, websockets, prometheus_client' 2>/dev/null; then
        echo "up to date with tools/requirements-test.txt"
        venv_ok=1
    elif "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$REQS"; then
        echo "$want" >"$VENV/.requirements.sha256"
        venv_ok=1
    fi
fi
if [ "$venv_ok" -eq 1 ]; then
    export AGENTWIRE_TEST_PYTHON="$VENV/bin/python"
    echo "$("$VENV/bin/python" --version 2>&1): $("$VENV/bin/python" -m pip freeze --disable-pip-version-check 2>/dev/null | tr '\n' ' ')"
else
    failed=$((failed + 1))
    failures+=("python venv: could not create $VENV or install tools/requirements-test.txt")
    summary+=("python venv: FAILED")
fi

# 1b. Debian packages (tools/lib/apt.sh: apt-get when missing, one update per run):
# curl for tests/integration/tls.rs and the README's snippets, redis-server for the Redis
# engine's tests (src/engine/redis, tests/integration/cluster*.rs, clients/python and
# clients/js/test/agui_redis.test.mjs start their own on free ports). A package that cannot be installed is one failure.
step "Debian packages: curl, redis-server"
# shellcheck source=lib/apt.sh
. "$ROOT/tools/lib/apt.sh"
for pair in curl:curl redis-server:redis-server; do
    cmd=${pair%%:*} pkg=${pair#*:}
    if (fail() { echo "tools/test.sh: $*" >&2; exit 1; }; need_command "$cmd" "$pkg"); then
        echo "$cmd: $(command -v "$cmd")"
    else
        failed=$((failed + 1))
        failures+=("$pkg: missing and not installed (apt-get install $pkg)")
        summary+=("$pkg: missing")
    fi
done

# 2. Rust tests: unit, integration, bins, benches in test mode; then doc tests.
step "cargo test --all-targets --no-fail-fast"
run_logged "$LOGDIR/cargo-test.log" "$CARGO_TEST_TIMEOUT_S" cargo test --all-targets --no-fail-fast
count_cargo "cargo test --all-targets" "$LOGDIR/cargo-test.log" "$rc"

step "cargo test --doc"
run_logged "$LOGDIR/cargo-doctest.log" "$CARGO_TEST_TIMEOUT_S" cargo test --doc --no-fail-fast
count_cargo "cargo test --doc" "$LOGDIR/cargo-doctest.log" "$rc"

# 3. Release build and interop checks against it.
if [ "$quick" -eq 0 ]; then
    step "cargo build --release"
    run_logged "$LOGDIR/cargo-build-release.log" "$BUILD_TIMEOUT_S" cargo build --release
    build_rc=$rc
    if [ "$build_rc" -ne 0 ]; then
        failed=$((failed + 1))
        failures+=("cargo build --release: exit code $build_rc")
        summary+=("cargo build --release: FAILED")
    fi

    interop_suite interop tests/interop/test_interop.py
    interop_suite metrics tests/interop/test_metrics.py

    # The client suites: each script ends with `N passed, M failed` and keeps its own log.
    client_suite "clients/js" "node --test (tools/test_js.sh)" tools/test_js.sh js
    client_suite "demo page" "Chromium (tools/test_browser.sh)" tools/test_browser.sh browser
    client_suite "clients/python" "pytest (tools/test_python.sh)" tools/test_python.sh python
fi

# 4. WebSocket conformance (Autobahn|Testsuite) against the conformance build.
if [ "$quick" -eq 0 ]; then
    step "conformance: tools/autobahn.sh (Autobahn|Testsuite via kosoku)"
    run_logged "$LOGDIR/autobahn.log" "$CONFORMANCE_TIMEOUT_S" bash tools/autobahn.sh
    count_summary conformance "$LOGDIR/autobahn.log" "$rc" "see $LOGDIR/autobahn.log"
fi

step "summary"
grep -hE '^ *Running |^ *Doc-tests |^test result: ' "$LOGDIR/cargo-test.log" "$LOGDIR/cargo-doctest.log" || true
[ "$quick" -eq 0 ] && [ -f "$LOGDIR/interop.log" ] && grep -E '^(PASS|FAIL) ' "$LOGDIR/interop.log" | cut -c1-160 || true
[ "$quick" -eq 0 ] && [ -f "$LOGDIR/metrics.log" ] && grep -E '^(PASS|FAIL) ' "$LOGDIR/metrics.log" | cut -c1-160 || true
echo
printf '%s\n' "${summary[@]}"
if [ "${#failures[@]}" -gt 0 ]; then
    echo "failures:"
    printf '  %s\n' "${failures[@]}"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
