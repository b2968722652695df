#!/usr/bin/env bash
# The tests of clients/python (the Python worker client, agentwire_worker) against the
# real gateway binary.
#
#   bash tools/test_python.sh [PYTEST ARGS...]
#
# Steps:
#   1. target/pyclient-venv: a venv (python3 -m venv) with clients/python installed in
#      editable mode and clients/python/requirements-test.txt (exact pins: pytest,
#      pytest-timeout, httpx, websockets, PyJWT, redis). Reinstalled when the requirements or
#      pyproject.toml are newer than the venv's stamp.
#   2. pytest clients/python/tests with AGENTWIRE_BIN (default target/release/agentwire,
#      which must exist: `cargo build --release`); every test starts its own gateway on
#      a random free port in 20000-29999 and has a timeout (pytest-timeout, 60 s).
# The last line is `N passed, M failed` (from pytest's summary; errors count as failed;
# a run that reports no summary is one failure). Exit 0 only when M is 0.
#
# Environment: PYTHON (default python3) creates the venv; AGENTWIRE_BIN (the gateway
# binary); AGENTWIRE_PY_TEST_TIMEOUT_S (default 600) bounds the whole pytest run. The log
# is kept in target/test-logs/python.log.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PKG=$ROOT/clients/python
VENV=$ROOT/target/pyclient-venv
STAMP=$VENV/.installed
LOGDIR=$ROOT/target/test-logs
LOG=$LOGDIR/python.log
LIMIT_S=${AGENTWIRE_PY_TEST_TIMEOUT_S:-600}
PYTHON=${PYTHON:-python3}
mkdir -p "$LOGDIR"

fail() {
    echo "test_python: $*" >&2
    echo "0 passed, 1 failed"
    exit 1
}

# The README's snippets (tests/test_root_readme.py) run node and curl; InboundStream's
# tests start a real redis-server (Debian's package) on a free port.
# shellcheck source=lib/apt.sh
. "$ROOT/tools/lib/apt.sh"
need_command curl curl
need_command redis-server redis-server

command -v "$PYTHON" >/dev/null || fail "$PYTHON not found (Python 3.10 or newer is needed)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || fail "$("$PYTHON" --version 2>&1) found, 3.10 or newer is needed"

BIN=${AGENTWIRE_BIN:-$ROOT/target/release/agentwire}
case $BIN in /*) ;; *) BIN=$ROOT/$BIN ;; esac
[ -x "$BIN" ] || fail "no gateway binary at $BIN (run cargo build --release, or set AGENTWIRE_BIN)"
export AGENTWIRE_BIN=$BIN

if [ ! -x "$VENV/bin/python" ]; then
    echo "test_python: creating $VENV"
    "$PYTHON" -m venv "$VENV" || fail "cannot create $VENV (on Debian/Ubuntu: apt-get install python3-venv)"
fi
if [ ! -f "$STAMP" ] || [ "$PKG/requirements-test.txt" -nt "$STAMP" ] || [ "$PKG/pyproject.toml" -nt "$STAMP" ]; then
    echo "test_python: installing clients/python (editable) and its pinned test requirements"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        -r "$PKG/requirements-test.txt" -e "$PKG" || fail "pip install failed"
    touch "$STAMP"
fi

rc=0
(cd "$PKG" && timeout --kill-after=30 "$LIMIT_S" "$VENV/bin/python" -m pytest -p no:cacheprovider -q -rfE "$@") 2>&1 | tee "$LOG" || rc=$?

# pytest's summary line: "3 failed, 45 passed, 1 skipped, 2 errors in 9.1s" (with -q),
# or the same between "=" rules.
summary=$(grep -E '^(=+ )?([0-9]+ [a-z]+(, )?)+ in [0-9.]+s|no tests ran' "$LOG" | tail -1 || true)
if [ -z "$summary" ]; then
    echo "test_python: no summary from pytest (exit code $rc)" >&2
    echo "0 passed, 1 failed"
    exit 1
fi
count() { { echo "$summary" | grep -oE "[0-9]+ $1" || true; } | awk '{s+=$1} END{print s+0}'; }
pass=$(count passed)
failed=$(( $(count failed) + $(count 'errors?') ))
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
if [ "$pass" -eq 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi  # no test ran
echo "$pass passed, $failed failed"
[ "$failed" -eq 0 ]
