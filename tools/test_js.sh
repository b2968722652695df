#!/usr/bin/env bash
# The tests of clients/js (the browser and Node client) against the real gateway binary.
#
#   bash tools/test_js.sh
#
# Steps:
#   1. `npm ci` in clients/js when its node_modules is missing or older than
#      package-lock.json (devDependencies only, pinned: `ws`, `typescript`, and for the
#      AG-UI test `@ag-ui/core`, `@ag-ui/client` 1.0.0, `zod`, `rxjs`).
#   2. `node --test clients/js/test/` with AGENTWIRE_BIN (default
#      target/release/agentwire, which must exist: `cargo build --release`); every test
#      starts its own gateway on a random port in 20000-29999.
# The last line is `N passed, M failed` (from node's TAP summary; cancelled tests count
# as failed; a run that reports no summary is one failure). Exit 0 only when M is 0.
#
# Environment: AGENTWIRE_BIN (the gateway binary), AGENTWIRE_JS_TEST_TIMEOUT_S (default
# 600) bounds the whole node run. Needs Node 20 or newer and npm, and `redis-server`
# (test/agui_redis.test.mjs starts its own; tools/test.sh installs it before this step). The log is kept in
# target/test-logs/js.log.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
JS=$ROOT/clients/js
LOGDIR=$ROOT/target/test-logs
LOG=$LOGDIR/js.log
LIMIT_S=${AGENTWIRE_JS_TEST_TIMEOUT_S:-600}
mkdir -p "$LOGDIR"

NAME=test_js
# shellcheck source=lib/node_suite.sh
. "$ROOT/tools/lib/node_suite.sh"
node_prereqs
node_suite "$JS" clients/js/test/
