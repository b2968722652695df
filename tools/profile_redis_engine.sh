#!/usr/bin/env bash
# Where the Redis engine's CPU goes (docs/BENCHMARKS.md, "Where the Redis engine's CPU
# goes"): runs `loadgen fanout --server redis1` against a redis-server started here
# (pinned to CPU 0 with SCHED_FIFO like the node, so `INFO commandstats` can be read),
# then, once the connections are up, records the node with `perf record -g` and reads
# redis-server's per-command times (script-inner commands included) over the same
# window. Prints loadgen's summary, the commandstats per event and the node's top
# threads and symbols.
#
# Usage: tools/profile_redis_engine.sh [OUT_DIR] [-- extra loadgen fanout options]
# Needs: target/release/{agentwire,loadgen} (cargo build --release -p agentwire --bin
# agentwire && cargo build --release -p loadgen), redis-server, redis-cli, perf,
# taskset, chrt (root for SCHED_FIFO). Environment: RATE (20000), DURATION_S (25),
# SETTLE_S (12: seconds before sampling), SAMPLE_S (6), GATEWAY_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/profile-redis-engine}
shift || true
[ "${1:-}" = "--" ] && shift
RATE=${RATE:-20000}
DURATION_S=${DURATION_S:-25}
SETTLE_S=${SETTLE_S:-12}
SAMPLE_S=${SAMPLE_S:-6}
BIN=${GATEWAY_BIN:-target/release/agentwire}
mkdir -p "$OUT"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

taskset -c 0 chrt -f 50 redis-server --port "$PORT" --bind 127.0.0.1 --save '' \
    --appendonly no >"$OUT/redis.log" 2>&1 &
RS=$!
trap 'redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || kill "$RS" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    redis-cli -p "$PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
done

target/release/loadgen fanout --server redis1 --redis-url "redis://127.0.0.1:$PORT" \
    --gateway-bin "$BIN" --users 3334 --conns-per-user 3 --rate "$RATE" \
    --duration-s "$DURATION_S" --publishers 4 --pin-gateway 0 --pin-load 1 --rt-prio 50 \
    "$@" >"$OUT/loadgen.txt" 2>&1 &
LG=$!

# The node: the agentwire process whose parent is this loadgen.
GW=
for _ in $(seq 1 200); do
    GW=$(pgrep -P "$LG" -f "$(basename "$BIN")" | head -1 || true)
    [ -n "$GW" ] && break
    sleep 0.1
done
if [ -z "$GW" ]; then
    echo "no agentwire node under loadgen (pid $LG); see $OUT/loadgen.txt" >&2
    wait "$LG" || true
    exit 1
fi
sleep "$SETTLE_S"
redis-cli -p "$PORT" CONFIG RESETSTAT >/dev/null
perf record -g -F 999 -p "$GW" -o "$OUT/node.perf.data" -- sleep "$SAMPLE_S" >/dev/null 2>&1
redis-cli -p "$PORT" INFO commandstats >"$OUT/commandstats.txt"
wait "$LG" || true

echo "== loadgen"
grep -E '^  (offered|delivered|checks|latency|cpu|cluster)' "$OUT/loadgen.txt" || true
echo "== redis-server over ${SAMPLE_S} s (usec per call; per event: divided by the EVALSHA calls)"
awk -F'[:,=]' '/^cmdstat_/ { name=substr($1, 9); calls[name]=$3; usec[name]=$5 }
    END {
        ev = calls["evalsha"]; if (ev == 0) { print "no EVALSHA calls"; exit }
        for (n in calls) if (usec[n] / ev >= 0.05)
            printf "  %-22s %8.2f calls/event %8.2f usec/event\n", n, calls[n] / ev, usec[n] / ev
    }' "$OUT/commandstats.txt" | sort -k4 -rn
echo "== node threads (share of samples)"
perf report -i "$OUT/node.perf.data" --no-children --sort comm --stdio -g none 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | head -5
echo "== node symbols, with callees (top 25)"
perf report -i "$OUT/node.perf.data" --children --sort comm,sym --stdio -g none 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | head -25
echo "(perf data and logs in $OUT)"
