#!/usr/bin/env bash
# The demo page's browser tests (PROTOCOL.md section 10.2) in Debian's Chromium, driven
# by playwright-core, against the real gateway binary.
#
#   bash tools/test_browser.sh
#
# Steps:
#   1. Chromium: when /usr/bin/chromium is missing, `apt-get install -y
#      --no-install-recommends chromium` (tools/lib/apt.sh: needs root; never
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

NAME=test_browser
# shellcheck source=lib/node_suite.sh
. "$ROOT/tools/lib/node_suite.sh"

# shellcheck source=lib/apt.sh
. "$ROOT/tools/lib/apt.sh"
if [ ! -x "$CHROMIUM" ]; then
    need_command chromium chromium
    [ -x "$CHROMIUM" ] || fail "chromium installed but $CHROMIUM is missing (set CHROMIUM_BIN)"
fi
export CHROMIUM_BIN=$CHROMIUM

node_prereqs
node_suite "$WEB" web/test/*.test.mjs
