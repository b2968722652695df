#!/usr/bin/env bash
# Comparison-peer smoke test for CI: sets up the peers (tools/peers/setup.sh: pinned
# builds and installs), then for agentwire and each peer (tokio, node, bun, python):
# - tools/peers/check_protocol.py: the protocol subset the comparison relies on (401s,
#   connected frame, publish answers, per-user routing and seq, envelope);
# - one tiny fanout through the publish driver (20 users x 3, 200 events/s, 2 s),
#   asserting completeness and order (`--strict`); the same through the tokio peer's
#   in-process emitter mode;
# and one tiny `loadgen compare` over all of them and the kernel floor (loadgen's
# `--server floor`), which must produce a ratio for every peer and a ratio to the floor
# for every server. Timings are printed, never asserted.
#
#   bash tools/peers/smoke.sh              set up (build/install) and run
#   SMOKE_NO_BUILD=1 bash ...              use what is already built and installed
#
# Each step runs under a timeout; logs in target/peers-smoke/. Ends with
# `peers smoke: N passed, M failed`; exits 0 only when M is 0.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
LOGDIR=target/peers-smoke
mkdir -p "$LOGDIR"
start=$SECONDS

if [[ -z "${SMOKE_NO_BUILD:-}" ]]; then
    echo "peers smoke: building agentwire and loadgen (release)"
    cargo build --release --locked --quiet -p agentwire --bin agentwire
    cargo build --release --locked --quiet -p loadgen
    bash tools/peers/setup.sh
fi
LOADGEN=target/release/loadgen
echo "peers smoke: set up in $((SECONDS - start)) s"

passed=0
failed=0
failures=()

ok() { passed=$((passed + 1)); echo "ok   $1"; }
fail() {
    failed=$((failed + 1))
    failures+=("$1")
    echo "FAIL $1"
    sed 's/^/    | /' "$2" | grep -v '^    | JSON' | tail -30
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# check_protocol NAME CMD...: start the server (CMD --listen ADDR) on a free port, run
# the protocol checks against it, stop it.
check_protocol() (
    local name=$1 port pid rc=0
    shift
    port=$(free_port)
    export AGENTWIRE_JWT_SECRET="smoke-secret-$RANDOM$RANDOM-0123456789"
    export AGENTWIRE_PUBLISH_KEY="pk-smoke-$RANDOM$RANDOM"
    "$@" --listen "127.0.0.1:$port" >"$LOGDIR/server-$name.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    timeout 60 python3 tools/peers/check_protocol.py --addr "127.0.0.1:$port" --name "$name" \
        >"$LOGDIR/protocol-$name.log" 2>&1 || rc=$?
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return "$rc"
)

run_check() {
    local name=$1
    shift
    if check_protocol "$name" "$@"; then
        ok "protocol-$name: $(tail -1 "$LOGDIR/protocol-$name.log")"
    else
        fail "protocol-$name" "$LOGDIR/protocol-$name.log"
    fi
}

run_check agentwire target/release/agentwire serve --demo-agent false
run_check tokio target/release/peer-tokio
run_check node node tools/peers/node/server.js
run_check bun target/peer-bun tools/peers/bun/server.js
run_check python target/peers-venv/bin/python tools/peers/python/server.py

for server in tokio node bun python; do
    log="$LOGDIR/fanout-$server.log"
    t0=$SECONDS
    if timeout 90 "$LOADGEN" fanout --server "$server" --users 20 --conns-per-user 3 --rate 200 \
        --duration-s 2 --strict --quiet >"$log" 2>&1; then
        ok "fanout-$server ($((SECONDS - t0)) s): $(grep -m1 -E '^  checks' "$log" | sed 's/^ *//')"
    else
        fail "fanout-$server (exit $?)" "$log"
    fi
done

# The tokio peer's in-process emitter mode (the bench_gateway line protocol).
log="$LOGDIR/fanout-tokio-emitter.log"
t0=$SECONDS
if timeout 90 "$LOADGEN" fanout --server tokio --driver emitter --users 20 --conns-per-user 3 \
    --rate 200 --duration-s 2 --strict --quiet >"$log" 2>&1; then
    ok "fanout-tokio-emitter ($((SECONDS - t0)) s): $(grep -m1 -E '^  checks' "$log" | sed 's/^ *//')"
else
    fail "fanout-tokio-emitter (exit $?)" "$log"
fi

log="$LOGDIR/compare.log"
json="$LOGDIR/compare.json"
t0=$SECONDS
rm -f "$json"
if timeout 150 "$LOADGEN" compare --servers agentwire,tokio,node,bun,python,floor --json "$json" \
    fanout --users 20 --conns-per-user 3 --rate 200 --duration-s 1 --strict >"$log" 2>&1 \
    && python3 - "$json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
assert [r["exit"] for r in c["runs"]] == [0] * 6, c["runs"]
for peer in ("tokio", "node", "bun", "python"):
    r = c["ratios"][peer]
    assert isinstance(r["p99"], float) and isinstance(r["bytes_per_conn"], float), (peer, r)
for server in ("agentwire", "tokio", "node", "bun", "python"):
    r = c["floor_ratios"][server]
    # CPU per event may be n/a at this tiny rate (a 10 ms tick of CPU time or none).
    assert isinstance(r["rate"], float) and "cpu_per_event" in r, (server, r)
PY
then
    ok "compare ($((SECONDS - t0)) s): 5 servers and the floor, ratios for every peer and to the floor"
    sed -n '/^loadgen compare: fanout/,/^JSON/p' "$log" | grep -v '^JSON'
else
    fail "compare" "$log"
fi

echo "peers smoke: $passed passed, $failed failed ($((SECONDS - start)) s)"
if ((failed > 0)); then
    echo "peers smoke: failed: ${failures[*]} (logs in $LOGDIR)" >&2
    exit 1
fi
