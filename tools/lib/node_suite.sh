# Shared by tools/test_js.sh and tools/test_browser.sh (sourced, not run): the steps of a
# node test suite against the gateway binary. The sourcing script sets ROOT, LOG (the
# TAP log), LIMIT_S (bound of the node run) and NAME (the prefix of its messages).

# fail MESSAGE: say why on stderr, end with the one-failure summary line.
fail() {
    echo "$NAME: $*" >&2
    echo "0 passed, 1 failed"
    exit 1
}

# node_prereqs: Node 20 or newer, and the gateway binary (AGENTWIRE_BIN, default
# target/release/agentwire), exported as an absolute AGENTWIRE_BIN.
node_prereqs() {
    command -v node >/dev/null || fail "node not found (Node 20 or newer is needed)"
    local major
    major=$(node -p 'process.versions.node.split(".")[0]')
    [ "$major" -ge 20 ] || fail "Node $major found, 20 or newer is needed"
    local bin=${AGENTWIRE_BIN:-$ROOT/target/release/agentwire}
    case $bin in /*) ;; *) bin=$ROOT/$bin ;; esac
    [ -x "$bin" ] || fail "no gateway binary at $bin (run cargo build --release, or set AGENTWIRE_BIN)"
    export AGENTWIRE_BIN=$bin
}

# node_suite PKGDIR TEST_PATH...: `npm ci` in PKGDIR when its node_modules is missing or
# older than package-lock.json (npm ci writes node_modules/.package-lock.json), then
# `node --test` over the paths (relative to ROOT) with TAP output in LOG. Prints
# `N passed, M failed` (cancelled tests count as failed; no summary is one failure);
# returns 0 only when M is 0.
node_suite() {
    local pkg=$1
    shift
    if [ ! -f "$pkg/node_modules/.package-lock.json" ] || [ "$pkg/package-lock.json" -nt "$pkg/node_modules/.package-lock.json" ]; then
        echo "$NAME: npm ci in ${pkg#"$ROOT"/}"
        (cd "$pkg" && npm ci --no-audit --no-fund) || fail "npm ci failed"
    fi
    local rc=0
    (cd "$ROOT" && timeout --kill-after=30 "$LIMIT_S" node --test --test-reporter=tap "$@") 2>&1 | tee "$LOG" || rc=$?
    local pass fails cancelled failed
    pass=$(awk '/^# pass [0-9]+$/{p=$3} END{print p}' "$LOG")
    fails=$(awk '/^# fail [0-9]+$/{f=$3} END{print f}' "$LOG")
    cancelled=$(awk '/^# cancelled [0-9]+$/{c=$3} END{print c+0}' "$LOG")
    if [ -z "$pass" ] || [ -z "$fails" ]; then
        echo "$NAME: no summary from node --test (exit code $rc)" >&2
        echo "0 passed, 1 failed"
        return 1
    fi
    failed=$((fails + cancelled))
    if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
    echo "$pass passed, $failed failed"
    [ "$failed" -eq 0 ]
}
