#!/usr/bin/env bash
# The tests of clients/js (the browser and Node client) against the real gateway binary.
#
#   bash tools/test_js.sh
#
# Steps:
#   1. `npm ci` in clients/js when its node_modules is missing or older than
#      package-lock.json (devDependencies only, pinned: `ws`, `typescript`).
#   2. `node --test clients/js/test/` with AGENTWIRE_BIN (default
#      target/release/agentwire, which must exist: `cargo build --release`); every test
#      starts its own gateway on a random port in 20000-29999.
# The last line is `N passed, M failed` (from node's TAP summary; cancelled tests count
# as failed; a run that reports no summary is one failure). Exit 0 only when M is 0.
#
# Environment: AGENTWIRE_BIN (the gateway binary), AGENTWIRE_JS_TEST_TIMEOUT_S (default
# 600) bounds the whole node run. Needs Node 20 or newer and npm. The log is kept in
# target/test-logs/js.log.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
JS=$ROOT/clients/js
LOGDIR=$ROOT/target/test-logs
LOG=$LOGDIR/js.log
LIMIT_S=${AGENTWIRE_JS_TEST_TIMEOUT_S:-600}
mkdir -p "$LOGDIR"

fail() {
    echo "test_js: $*" >&2
    echo "0 passed, 1 failed"
    exit 1
}

command -v node >/dev/null || fail "node not found (Node 20 or newer is needed)"
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" -ge 20 ] || fail "Node $major found, 20 or newer is needed"

BIN=${AGENTWIRE_BIN:-$ROOT/target/release/agentwire}
case $BIN in /*) ;; *) BIN=$ROOT/$BIN ;; esac
[ -x "$BIN" ] || fail "no gateway binary at $BIN (run cargo build --release, or set AGENTWIRE_BIN)"
export AGENTWIRE_BIN=$BIN

# npm ci writes node_modules/.package-lock.json; reinstall when the lock file is newer.
if [ ! -f "$JS/node_modules/.package-lock.json" ] || [ "$JS/package-lock.json" -nt "$JS/node_modules/.package-lock.json" ]; then
    echo "test_js: npm ci in clients/js"
    (cd "$JS" && npm ci --no-audit --no-fund) || fail "npm ci failed"
fi

rc=0
(cd "$ROOT" && timeout --kill-after=30 "$LIMIT_S" node --test --test-reporter=tap clients/js/test/) 2>&1 | tee "$LOG" || rc=$?

pass=$(awk '/^# pass [0-9]+$/{p=$3} END{print p}' "$LOG")
fails=$(awk '/^# fail [0-9]+$/{f=$3} END{print f}' "$LOG")
cancelled=$(awk '/^# cancelled [0-9]+$/{c=$3} END{print c+0}' "$LOG")
if [ -z "$pass" ] || [ -z "$fails" ]; then
    echo "test_js: no summary from node --test (exit code $rc)" >&2
    echo "0 passed, 1 failed"
    exit 1
fi
failed=$((fails + cancelled))
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
echo "$pass passed, $failed failed"
[ "$failed" -eq 0 ]
