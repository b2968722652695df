#!/usr/bin/env bash
# The node's delivery cost, memory vs Redis engine (docs/BENCHMARKS.md, "The node's
# delivery cost under the Redis engine"): runs `loadgen fanout` (10,002 connections,
# gateway pinned to CPU 0, load to CPU 1), and over a window once the connections are
# up reads the node's `/ws/stats` twice (loop iterations, events delivered, bytes out)
# and counts the node's syscalls and context switches with `perf stat` (per thread).
# Prints per second and per delivered event: loop iterations, writev calls, frames
# per writev, epoll_wait calls, context switches, and the node's CPU.
#
# Usage: tools/delivery_cost.sh SERVER RATE [OUT_DIR] [-- extra loadgen fanout options]
#   SERVER: agentwire (memory engine, --driver publish) or redis1.
# Environment: DURATION_S (20), SETTLE_S (9), SAMPLE_S (5), GATEWAY_BIN; RECORD=1 also
# records the node with `perf record -g` over the window and prints the share of its
# samples in waking the readers (`sock_def_readable`, `try_to_wake_up`) and `writev`.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVER=$1 RATE=$2
OUT=${3:-target/delivery-cost/$SERVER-$RATE}
shift 2; shift || true
[ "${1:-}" = "--" ] && shift
DURATION_S=${DURATION_S:-20}
SETTLE_S=${SETTLE_S:-9}
SAMPLE_S=${SAMPLE_S:-5}
BIN=${GATEWAY_BIN:-target/release/agentwire}
mkdir -p "$OUT"
extra=()
[ "$SERVER" = agentwire ] && extra=(--driver publish)
target/release/loadgen fanout --server "$SERVER" "${extra[@]}" --gateway-bin "$BIN" \
    --users 3334 --conns-per-user 3 --rate "$RATE" --duration-s "$DURATION_S" \
    --publishers 4 --pin-gateway 0 --pin-load 1 --rt-prio 50 "$@" >"$OUT/loadgen.txt" 2>&1 &
LG=$!
GW=
for _ in $(seq 1 300); do
    GW=$(pgrep -P "$LG" -f "$(basename "$BIN") serve" | head -1 || true)
    ADDR=
    [ -n "$GW" ] && ADDR=$(ss -ltnpH | awk -v p="pid=$GW," '$0 ~ p { print $4; exit }')
    [ -n "$ADDR" ] && break
    sleep 0.1
done
[ -n "$ADDR" ] || { echo "no node under loadgen; see $OUT/loadgen.txt" >&2; wait "$LG"; exit 1; }
sleep "$SETTLE_S"
stats() { curl -s --max-time 5 "http://$ADDR/ws/stats"; }
stats >"$OUT/stats0.json"
W0=$(date +%s.%N)
T0=$(awk '{print $14+$15}' "/proc/$GW/stat")
threads() { for t in /proc/"$GW"/task/*; do echo "$(cat "$t/comm") $(awk '{print $14+$15}' "$t/stat")"; done; }
threads >"$OUT/threads0.txt"
if [ -n "${RECORD:-}" ]; then
    perf record -g -F 999 -p "$GW" -o "$OUT/node.perf.data" -- sleep "$SAMPLE_S" >/dev/null 2>&1 &
    REC=$!
fi
perf stat --per-thread -e 'syscalls:sys_enter_writev,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_write,syscalls:sys_enter_futex,sched:sched_wakeup,context-switches' \
    -p "$GW" -o "$OUT/perfstat.txt" -- sleep "$SAMPLE_S" >/dev/null 2>&1
[ -n "${RECORD:-}" ] && wait "$REC"
T1=$(awk '{print $14+$15}' "/proc/$GW/stat")
threads >"$OUT/threads1.txt"
stats >"$OUT/stats1.json"
W1=$(date +%s.%N)
wait "$LG" || true
HZ=$(getconf CLK_TCK)
python3 - "$OUT" "$W0" "$W1" "$SAMPLE_S" "$((T1 - T0))" "$HZ" <<'PY'
import json, sys, re, collections
out, w0, w1, sample, ticks, hz = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
# /ws/stats and the CPU times span the window (secs); perf stat the SAMPLE_S inside it.
secs = w1 - w0
a = json.load(open(f"{out}/stats0.json")); b = json.load(open(f"{out}/stats1.json"))
def get(d, path):
    for k in path.split("."): d = d.get(k, {}) if isinstance(d, dict) else {}
    return d if isinstance(d, (int, float)) else 0
it = get(b, "loop.iterations") - get(a, "loop.iterations")
busy = get(b, "loop.busy_us") - get(a, "loop.busy_us")
ev = get(b, "events.delivered") - get(a, "events.delivered")
threads = collections.defaultdict(lambda: collections.Counter())
for line in open(f"{out}/perfstat.txt"):
    m = re.match(r"\s*(\S+?)-(\d+)\s+([\d,]+)\s+(\S+)", line)
    if m:
        threads[m.group(1)][m.group(4).split(":")[-1]] += int(m.group(3).replace(",", ""))
tot = collections.Counter()
for c in threads.values(): tot.update(c)
lg = open(f"{out}/loadgen.txt").read()
for l in lg.splitlines():
    if re.match(r"^  (offered|delivered|checks|latency|cpu|cluster)", l): print(l)
print(f"window {secs:.1f} s: frames delivered {ev/secs:,.0f}/s, loop iterations {it/secs:,.0f}/s, node CPU {ticks/hz/secs*100:.0f} %")
if ev:
    ev3 = ev / 3  # 3 connections per user: events = frames / 3
    print(f"  per event (3 frames): node CPU {ticks/hz/ev3*1e6:.1f} us, loop busy {busy/ev3:.1f} us, iterations {it/ev3:.3f}")
    evp = ev3 * sample / secs  # events within perf stat's SAMPLE_S (assumed even)
    for t, c in sorted(threads.items(), key=lambda kv: -sum(kv[1].values())):
        parts = ", ".join(f"{k} {v/evp:.3f}" for k, v in sorted(c.items()) if v)
        print(f"  {t}: per event: {parts}")
    def ticks_of(f):
        d = collections.Counter()
        for l in open(f):
            name, t = l.rsplit(" ", 1); d[name] += int(t)
        return d
    t0, t1 = ticks_of(f"{out}/threads0.txt"), ticks_of(f"{out}/threads1.txt")
    print("  CPU per event by thread: " + ", ".join(f"{n} {(t1[n]-t0[n])/hz/ev3*1e6:.1f} us" for n in sorted(t1, key=lambda n: t0[n]-t1[n]) if t1[n]-t0[n] > 0))
    wv = tot['sys_enter_writev']
    if wv: print(f"  frames per writev {ev*sample/secs/wv:.2f}, writev per iteration {wv/max(it*sample/secs,1):.1f}")
PY
if [ -n "${RECORD:-}" ]; then
    echo "  share of the node's samples (with callees):"
    perf report -i "$OUT/node.perf.data" --children --sort sym --stdio -g none 2>/dev/null \
        | grep -E '\] (sock_def_readable|try_to_wake_up|__x64_sys_writev|do_writev|ep_poll_callback)$' \
        | awk '{ printf "    %-22s %s\n", $NF, $1 }'
fi
