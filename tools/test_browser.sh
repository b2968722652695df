#!/usr/bin/env bash
# The demo page's browser tests (PROTOCOL.md section 10.2) in Debian's Chromium, driven
# by playwright-core, against the real gateway binary.
#
#   bash tools/test_browser.sh
#
# Steps:
#   1. Chromium: when /usr/bin/chromium is missing, one `apt-get update` then
#      `apt-get install -y --no-install-recommends chromium` (needs root; never
#      `npx playwright install`, which downloads a browser).
#   2. `npm ci` in web/ when its node_modules is missing or older than
#      package-lock.json (devDependencies only, pinned: playwright-core).
#   3. `node --test web/test/*.test.mjs` with AGENTWIRE_BIN (default
#      target/release/agentwire, which must exist: `cargo build --release`); the tests
#      start their own gateways on random ports in 20000-29999 and write screenshots of
#      a finished run to target/screenshots/.
# The last line is `N passed, M failed` (from node's TAP summary; cancelled tests count
# as failed; a run that reports no summary is one failure). Exit 0 only when M is 0.
#
# Environment: AGENTWIRE_BIN (the gateway binary), CHROMIUM_BIN (default
# /usr/bin/chromium), AGENTWIRE_BROWSER_TEST_TIMEOUT_S (default 600) bounds the whole
# node run. Needs Node 20 or newer and npm. The log is kept in
# target/test-logs/browser.log.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
WEB=$ROOT/web
LOGDIR=$ROOT/target/test-logs
LOG=$LOGDIR/browser.log
LIMIT_S=${AGENTWIRE_BROWSER_TEST_TIMEOUT_S:-600}
CHROMIUM=${CHROMIUM_BIN:-/usr/bin/chromium}
mkdir -p "$LOGDIR"

fail() {
    echo "test_browser: $*" >&2
    echo "0 passed, 1 failed"
    exit 1
}

if [ ! -x "$CHROMIUM" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        fail "no Chromium at $CHROMIUM and not root: install it with 'sudo apt-get install -y --no-install-recommends chromium' (or set CHROMIUM_BIN)"
    fi
    command -v apt-get >/dev/null || fail "no Chromium at $CHROMIUM and no apt-get to install it (set CHROMIUM_BIN)"
    echo "test_browser: installing chromium with apt-get"
    apt-get update -qq || fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium \
        || fail "apt-get install chromium failed"
    [ -x "$CHROMIUM" ] || fail "chromium installed but $CHROMIUM is missing (set CHROMIUM_BIN)"
fi
export CHROMIUM_BIN=$CHROMIUM

command -v node >/dev/null || fail "node not found (Node 20 or newer is needed)"
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" -ge 20 ] || fail "Node $major found, 20 or newer is needed"

BIN=${AGENTWIRE_BIN:-$ROOT/target/release/agentwire}
case $BIN in /*) ;; *) BIN=$ROOT/$BIN ;; esac
[ -x "$BIN" ] || fail "no gateway binary at $BIN (run cargo build --release, or set AGENTWIRE_BIN)"
export AGENTWIRE_BIN=$BIN

# npm ci writes node_modules/.package-lock.json; reinstall when the lock file is newer.
if [ ! -f "$WEB/node_modules/.package-lock.json" ] || [ "$WEB/package-lock.json" -nt "$WEB/node_modules/.package-lock.json" ]; then
    echo "test_browser: npm ci in web"
    (cd "$WEB" && npm ci --no-audit --no-fund) || fail "npm ci failed"
fi

rc=0
(cd "$ROOT" && timeout --kill-after=30 "$LIMIT_S" node --test --test-reporter=tap web/test/*.test.mjs) 2>&1 | tee "$LOG" || rc=$?

pass=$(awk '/^# pass [0-9]+$/{p=$3} END{print p}' "$LOG")
fails=$(awk '/^# fail [0-9]+$/{f=$3} END{print f}' "$LOG")
cancelled=$(awk '/^# cancelled [0-9]+$/{c=$3} END{print c+0}' "$LOG")
if [ -z "$pass" ] || [ -z "$fails" ]; then
    echo "test_browser: no summary from node --test (exit code $rc)" >&2
    echo "0 passed, 1 failed"
    exit 1
fi
failed=$((fails + cancelled))
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
echo "$pass passed, $failed failed"
[ "$failed" -eq 0 ]
