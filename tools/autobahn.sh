#!/usr/bin/env bash
# Autobahn|Testsuite conformance of the gateway's WebSocket layer (docs/CONFORMANCE.md).
#
#   bash tools/autobahn.sh            run, compare with tests/autobahn/expected.json
#   bash tools/autobahn.sh --update   run, rewrite the expected file (refused unless
#                                     every case is OK / NON-STRICT / INFORMATIONAL)
#
# Steps:
#   1. target/autobahn-venv: a venv with kosoku==0.1.0 (the Autobahn case set driven
#      natively; Python >= 3.10), reinstalled only when the version differs.
#   2. cargo build --release --features conformance into target/conformance (the
#      default release binary in target/release is left alone): adds the authenticated
#      echo route GET /conformance/echo. Then the route's own integration tests in that
#      build (tests/integration/conformance_route.rs: echo, fragments, 1009 at the
#      production limit, 401 without a valid token), reusing the release dependencies.
#   3. Two gateway profiles, one after the other, each on 127.0.0.1:<ephemeral>, with a
#      random HS256 secret and a token from `agentwire token --sub autobahn`:
#        production  the default limits (max_message_bytes 64 KiB, max_pending_bytes
#                    1 MiB): cases 1-7 and 10 (9.*, 12.*, 13.* excluded);
#        large       --max-message-bytes 16777216 --max-pending-bytes 67108864: 9.*
#                    (messages up to 16 MiB).
#        tls         the production profile over TLS (tls_cert_file / tls_key_file, a
#                    certificate made with openssl for this run): cases 1-7 and 10.
#                    kosoku has no TLS (its URL parser answers "TLS support not
#                    compiled in" for wss://), so it drives tools/tls_relay.py, which
#                    carries every byte unchanged over its own TLS connection per
#                    client connection (Python's ssl) to the gateway.
#      kosoku -p 2 runs the cases; 12.* and 13.* (permessage-deflate) are never run: the
#      gateway does not negotiate compression.
#   4. tests/autobahn/compare.py: per-case summary (target/autobahn/summary.json), the
#      tally, and a field-by-field diff against the expected file; the tls profile the
#      same against tests/autobahn/expected-tls.json (target/autobahn/summary-tls.json). Any case not OK /
#      NON-STRICT / INFORMATIONAL (close OK / INFORMATIONAL), or any difference, fails.
# Full reports (HTML + JSON per case) stay in target/autobahn/<profile>/, gateway logs
# in target/autobahn/<profile>.gateway.log. The last line is `autobahn: N passed, M
# failed` (cases, both comparisons). Exit 0 only when the runs match the expected files.
#
# Environment: PYTHON (default python3) creates the venv; AGENTWIRE_BUILD_TIMEOUT_S
# (default 1200) and AGENTWIRE_AUTOBAHN_TIMEOUT_S (default 600 per profile) bound the
# slow steps.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
KOSOKU_VERSION=0.1.0
PYTHON=${PYTHON:-python3}
VENV=target/autobahn-venv
TARGET_DIR=target/conformance
BIN=$TARGET_DIR/release/agentwire
OUT=target/autobahn
EXPECTED=tests/autobahn/expected.json
EXPECTED_TLS=tests/autobahn/expected-tls.json
BUILD_TIMEOUT_S=${AGENTWIRE_BUILD_TIMEOUT_S:-1200}
RUN_TIMEOUT_S=${AGENTWIRE_AUTOBAHN_TIMEOUT_S:-600}

update=0
for arg in "$@"; do
    case $arg in
        --update) update=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "tools/autobahn.sh: unknown argument '$arg' (try --help)" >&2
            exit 2
            ;;
    esac
done

started=$SECONDS
log() { printf 'autobahn [%3ds]: %s\n' "$((SECONDS - started))" "$*"; }

# 1. kosoku, pinned.
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "autobahn: kosoku needs Python >= 3.10; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
    exit 1
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys
sys.exit(m.version('kosoku') != '$KOSOKU_VERSION')" 2>/dev/null; then
    log "installing kosoku==$KOSOKU_VERSION into $VENV"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "kosoku==$KOSOKU_VERSION"
fi

# 2. The conformance build, in its own target dir. Warnings are errors: CI's clippy
# stage only sees the default build, so this is where feature-gated code is checked.
export RUSTFLAGS="${RUSTFLAGS:-} -D warnings"
log "cargo build --release --features conformance --target-dir $TARGET_DIR"
timeout "$BUILD_TIMEOUT_S" cargo build --release --locked --quiet --features conformance \
    --target-dir "$TARGET_DIR" --bin agentwire
log "cargo test --release --features conformance --test integration conformance_route"
timeout "$BUILD_TIMEOUT_S" cargo test --release --locked --quiet --features conformance \
    --target-dir "$TARGET_DIR" --test integration conformance_route

# 3. The profiles.
AGENTWIRE_JWT_SECRET=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
export AGENTWIRE_JWT_SECRET
gateway_pid=
relay_pid=
stop_gateway() {
    if [ -n "$relay_pid" ]; then
        kill -TERM "$relay_pid" 2>/dev/null || true
        wait "$relay_pid" 2>/dev/null || true
        relay_pid=
    fi
    if [ -n "$gateway_pid" ]; then
        kill -TERM "$gateway_pid" 2>/dev/null || true
        wait "$gateway_pid" 2>/dev/null || true
        gateway_pid=
    fi
}
trap stop_gateway EXIT
mkdir -p "$OUT"
rm -f "$OUT/summary.json"

# run_profile NAME KOSOKU_SELECTION... -- GATEWAY_FLAGS...
run_profile() {
    local name=$1 dir=$OUT/$1 gwlog=$OUT/$1.gateway.log addr= rc=0 t0=$SECONDS
    shift
    local -a selection=()
    while [ "$1" != "--" ]; do
        selection+=("$1")
        shift
    done
    shift
    rm -rf "$dir"
    mkdir -p "$dir"
    RUST_LOG=info "$BIN" serve --listen 127.0.0.1:0 --demo-agent false "$@" >"$gwlog" 2>&1 &
    gateway_pid=$!
    for _ in $(seq 100); do
        addr=$(sed -n 's/.* listening on \([0-9.]*:[0-9]*\) .*/\1/p' "$gwlog" | head -n 1)
        [ -n "$addr" ] && break
        if ! kill -0 "$gateway_pid" 2>/dev/null; then break; fi
        sleep 0.1
    done
    if [ -z "$addr" ]; then
        echo "autobahn: the $name gateway did not start; its log:" >&2
        cat "$gwlog" >&2
        return 1
    fi
    local token
    token=$("$BIN" token --sub autobahn --ttl-s 3600)
    if [ -n "${RELAY_CAFILE:-}" ]; then
        # TLS gateway: kosoku speaks plain TCP to the relay, the relay TLS to $addr.
        "$VENV/bin/python" tools/tls_relay.py --upstream "$addr" --cafile "$RELAY_CAFILE" \
            >"$OUT/$name.relay.log" 2>&1 &
        relay_pid=$!
        local relay=
        for _ in $(seq 100); do
            relay=$(sed -n 's/^relay listening on \([0-9.]*:[0-9]*\)$/\1/p' "$OUT/$name.relay.log" | head -n 1)
            [ -n "$relay" ] && break
            sleep 0.1
        done
        if [ -z "$relay" ]; then
            echo "autobahn: the TLS relay did not start; its log:" >&2
            cat "$OUT/$name.relay.log" >&2
            return 1
        fi
        log "profile $name: TLS gateway on $addr behind the relay on $relay"
        addr=$relay
    fi
    log "profile $name: gateway on $addr ($*), kosoku -p 2 ${selection[*]}"
    timeout "$RUN_TIMEOUT_S" "$VENV/bin/kosoku" -p 2 "${selection[@]}" -o "$dir" \
        "ws://$addr/conformance/echo?token=$token" >"$dir.kosoku.log" 2>&1 || rc=$?
    # kosoku exits 1 when a case did not pass; compare.py judges that. Anything else
    # (a timeout, a crash) leaves no trustworthy report.
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ]; then
        echo "autobahn: kosoku ($name) exited $rc; tail of its log:" >&2
        tail -n 20 "$dir.kosoku.log" >&2
        return 1
    fi
    if ! kill -0 "$gateway_pid" 2>/dev/null; then
        echo "autobahn: the $name gateway died during the run; tail of its log:" >&2
        tail -n 20 "$gwlog" >&2
        return 1
    fi
    if [ -n "$relay_pid" ]; then
        kill -TERM "$relay_pid" 2>/dev/null || true
        wait "$relay_pid" 2>/dev/null || true
        relay_pid=
    fi
    kill -TERM "$gateway_pid"
    rc=0
    wait "$gateway_pid" || rc=$?
    gateway_pid=
    if [ "$rc" -ne 0 ]; then
        echo "autobahn: the $name gateway exited $rc after SIGTERM (expected 0)" >&2
        return 1
    fi
    log "profile $name: done in $((SECONDS - t0))s"
}

run_profile production -x '9.*' -x '12.*' -x '13.*' --
run_profile large -i '9.*' -- \
    --max-message-bytes 16777216 --max-pending-bytes 67108864
# The certificate of the tls profile: made for this run (openssl, Debian's package).
command -v openssl >/dev/null || { echo "autobahn: openssl is needed for the tls profile (apt-get install openssl)" >&2; exit 1; }
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -keyout "$OUT/tls-key.pem" -out "$OUT/tls-cert.pem" -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null
RELAY_CAFILE=$OUT/tls-cert.pem run_profile tls -x '9.*' -x '12.*' -x '13.*' -- \
    --tls-cert-file "$OUT/tls-cert.pem" --tls-key-file "$OUT/tls-key.pem"

# 4. Compare: the plain profiles with expected.json, the tls profile with
# expected-tls.json (the same case ids), then one line for both.
args=("$EXPECTED" "production=$OUT/production" "large=$OUT/large")
tls_args=("$EXPECTED_TLS" "tls=$OUT/tls")
[ "$update" -eq 1 ] && args=(--update "${args[@]}") && tls_args=(--update "${tls_args[@]}")
log "the profiles ran in $((SECONDS - started))s; comparing"
rc_plain=0
"$VENV/bin/python" tests/autobahn/compare.py "${args[@]}" | tee "$OUT/compare.log" || rc_plain=$?
rc_tls=0
"$VENV/bin/python" tests/autobahn/compare.py "${tls_args[@]}" | tee "$OUT/compare-tls.log" || rc_tls=$?
passed=0
failed=0
for f in "$OUT/compare.log" "$OUT/compare-tls.log"; do
    last=$(tail -n 1 "$f")
    if [[ $last =~ ^autobahn:\ ([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
        passed=$((passed + BASH_REMATCH[1]))
        failed=$((failed + BASH_REMATCH[2]))
    elif [[ $last =~ ^autobahn:\ wrote ]]; then
        :
    else
        failed=$((failed + 1))
    fi
done
if [ "$rc_plain" -ne 0 ] || [ "$rc_tls" -ne 0 ]; then
    [ "$failed" -eq 0 ] && failed=1
fi
echo "autobahn: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
