#!/usr/bin/env bash
# Load-generator smoke test for CI: every loadgen scenario at small scale (about 200
# connections, 1-2 s, low rates; also against the kernel floor), asserting delivery only: no handshake failure, no
# connection closed early, lost=0, duplicates=0, out-of-order=0 (`--strict`). Timings
# are printed, never asserted (CI machines are noisy). A last run checks the checker:
# evictions must be reported as losses.
#
#   bash tools/loadgen/smoke.sh          build (release) and run every scenario
#   SMOKE_NO_BUILD=1 bash ...             use the binaries already in target/release
#
# The soak runs for 60 s (6 cycles of 10 s; RSS back to its plateau, descriptors and
# timers back to their baseline after every cycle) and the start-up time of
# `agentwire serve` is measured (5 starts; printed, not asserted).
#
# Each scenario runs under a 90 s timeout (the soak: 150 s); its full output goes to
# target/loadgen-smoke/<name>.log and is printed when it fails. Ends with
# `loadgen smoke: N passed, M failed`; exits 0 only when M is 0.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
LOGDIR=target/loadgen-smoke
mkdir -p "$LOGDIR"
start=$SECONDS

if [[ -z "${SMOKE_NO_BUILD:-}" ]]; then
    echo "loadgen smoke: building (release): agentwire, examples/bench_gateway, loadgen"
    cargo build --release --locked -p agentwire --bin agentwire --example bench_gateway
    cargo build --release --locked -p loadgen
fi
LOADGEN=target/release/loadgen

passed=0
failed=0
failures=()

# One check's verdict: `pass NAME WHAT` counts and prints it; `fail NAME WHAT LOG LINES`
# counts it, prints why and the last LINES lines of its LOG (the JSON report left out).
pass() {
    passed=$((passed + 1))
    echo "ok   $1: $2"
}
fail() {
    failed=$((failed + 1))
    failures+=("$1")
    echo "FAIL $1: $2"
    sed 's/^/    | /' "$3" | grep -v '^    | JSON' | tail -"$4"
}

# loadgen's own unit tests (the soak's verdicts, duration parsing, reports).
log="$LOGDIR/unit.log"
if cargo test --release --locked -p loadgen >"$log" 2>&1; then
    pass unit "$(grep -m1 '^test result' "$log")"
else
    fail unit "cargo test --release -p loadgen" "$log" 30
fi

run() {
    local name=$1
    shift
    local log="$LOGDIR/$name.log"
    local t0=$SECONDS
    if timeout "${SMOKE_TIMEOUT:-90}" "$LOADGEN" "$@" --strict --quiet >"$log" 2>&1; then
        pass "$name ($((SECONDS - t0)) s)" "$(grep -m1 -E '^  (checks|delivered)' "$log" | sed 's/^ *//')"
    else
        local rc=$?
        fail "$name" "exit $rc after $((SECONDS - t0)) s: $LOADGEN $* --strict" "$log" 40
    fi
}

run idle idle --conns 200 --hold-s 1
run fanout-emitter fanout --users 67 --conns-per-user 3 --rate 600 --duration-s 2
run fanout-publish fanout --driver publish --users 67 --conns-per-user 3 --rate 600 --duration-s 2
run burst burst --users 4 --conns-per-user 1 --events 20000
run burst-publish burst --driver publish --users 4 --conns-per-user 1 --events 20000
run storm storm --conns 150 --rate 300 --duration-s 2 --concurrency 8 --churn-users 200
run ramp ramp --users 67 --conns-per-user 3 --start-rate 300 --factor 2 --max-rate 1200 --step-s 1 --bound 60s
# The Redis engine (needs redis-server: tools/test.sh installs it): two nodes on one
# redis-server started for the run, connections spread over both, publishes through both.
run fanout-redis2 fanout --server redis2 --users 67 --conns-per-user 3 --rate 600 --duration-s 2
run ramp-redis1 ramp --server redis1 --users 67 --conns-per-user 3 --start-rate 300 --factor 2 --max-rate 600 --step-s 1 --bound 60s
# The kernel floor (src/floor.rs): the same frames with no gateway logic, checked the
# same way (every frame, in order), then a tiny ramp comparison with agentwire that must
# give agentwire's rate and CPU per event as a ratio to the floor.
run fanout-floor fanout --server floor --users 67 --conns-per-user 3 --rate 600 --duration-s 2
run burst-floor burst --server floor --users 4 --conns-per-user 1 --events 20000
log="$LOGDIR/compare-floor.log"
json="$LOGDIR/compare-floor.json"
t0=$SECONDS
rm -f "$json"
if timeout 120 "$LOADGEN" compare --servers agentwire,floor --json "$json" ramp --users 67 \
    --conns-per-user 3 --start-rate 300 --factor 2 --max-rate 1200 --step-s 1 --bound 60s \
    --strict >"$log" 2>&1 && python3 - "$json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
assert [r["exit"] for r in c["runs"]] == [0, 0], c["runs"]
r = c["floor_ratios"]["agentwire"]
assert isinstance(r["rate"], float) and r["common_rate"] is not None, r
PY
then
    pass "compare-floor ($((SECONDS - t0)) s)" "$(grep -m1 -A1 'against the kernel floor' "$log" | tail -1 | sed 's/^ *//')"
else
    fail compare-floor "$LOADGEN compare --servers agentwire,floor ramp ..." "$log" 30
fi
# A short soak: replay_ttl_ms=10000 so the kept events reach their steady amount within
# the two warm-up cycles.
SMOKE_TIMEOUT=150 run soak soak --duration 60s --cycle-s 10 --warmup-cycles 2 --conns 150 \
    --rate 300 --concurrency 8 --churn-users 500 --gateway-set replay_ttl_ms=10000

# Resume cost and the resume storm (src/resume.rs, src/resume_storm.rs; both check
# every seq once and in order themselves and exit 1 otherwise; they take no --strict).
run_own() {
    local name=$1 pattern=$2
    shift 2
    local log="$LOGDIR/$name.log"
    local t0=$SECONDS
    if timeout "${SMOKE_TIMEOUT:-90}" "$LOADGEN" "$@" --quiet >"$log" 2>&1; then
        pass "$name ($((SECONDS - t0)) s)" "$(grep -m1 -E "$pattern" "$log" | sed 's/^ *//')"
    else
        local rc=$?
        fail "$name" "exit $rc after $((SECONDS - t0)) s: $LOADGEN $*" "$log" 40
    fi
}
# 200 missed events, 5 rounds each on the memory engine, one Redis node, two nodes
# (away from node 0, back on node 1).
run_own resume '^  redis2 ' resume --events 200 --repeat 5
# 3 nodes; node 0 holds 300 clients and is killed; 60 others on the survivors.
run_own resume-storm 'converged' resume-storm --conns 300 --others 60 --storm-rate 300 \
    --other-rate 200 --before-s 2 --after-s 2 --converge-timeout-s 20
# The storm's checker: with replay_events=1 Redis keeps about one stream node (~100
# events) per user; the killed node's 10 clients (200 events/s each) stay away for up to
# 3 s, their resume answers resumed:false, and the run must exit 1.
log="$LOGDIR/resume-storm-detects-loss.log"
set +e
timeout 90 "$LOADGEN" resume-storm --conns 10 --others 10 --storm-rate 2000 --other-rate 50 \
    --before-s 1 --after-s 1 --converge-timeout-s 10 --reconnect-jitter-ms 3000 \
    --gateway-set replay_events=1 --quiet >"$log" 2>&1
rc=$?
set -e
if [[ $rc -eq 1 ]] && grep -q 'resumed=Some(false)' "$log"; then
    pass resume-storm-detects-loss "resumed:false reported, exit 1"
else
    fail resume-storm-detects-loss "expected exit 1 with resumed=Some(false), got exit $rc" "$log" 20
fi

log="$LOGDIR/startup.log"
if timeout 90 "$LOADGEN" startup --runs 5 >"$log" 2>&1; then
    pass startup "$(grep -m1 '^  median' "$log" | sed 's/^ *//')"
else
    fail startup "$LOADGEN startup --runs 5" "$log" 20
fi

# The checker itself: with a per-user limit of 2 and 3 connections per user, every
# user's oldest connection is evicted (4002) and misses the events after it; the run
# must report them and exit 1 (a missed target), not 0.
log="$LOGDIR/checker-detects-loss.log"
set +e
timeout 90 "$LOADGEN" fanout --users 20 --conns-per-user 3 --rate 200 --duration-s 1 \
    --gateway-set max_connections_per_user=2 --strict --quiet >"$log" 2>&1
rc=$?
set -e
if [[ $rc -eq 1 ]] && grep -q '^FAIL closed' "$log" && grep -q '^FAIL lost' "$log"; then
    pass checker-detects-loss "evictions reported as closed and lost, exit 1"
else
    fail checker-detects-loss "expected exit 1 with FAIL closed and FAIL lost, got exit $rc" "$log" 20
fi

echo "loadgen smoke: $passed passed, $failed failed ($((SECONDS - start)) s)"
if ((failed > 0)); then
    echo "loadgen smoke: failed: ${failures[*]} (logs in $LOGDIR)" >&2
    exit 1
fi
