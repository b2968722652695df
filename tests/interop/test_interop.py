#!/usr/bin/env python3
"""Interop checks: agentwire against clients nobody on this project wrote.

Starts the RELEASE gateway binary as a subprocess on a free port

    agentwire serve --listen 127.0.0.1:PORT --jwt-secret S --publish-key K --demo-agent true

and drives it with the Python `websockets` sync client and tokens minted by PyJWT, the
way an outside user would (PROTOCOL.md is the contract). Checks:

    golden_header          Authorization: Bearer, `connected` frame, user_message -> ack
                           -> a full demo run (envelopes, seq, the five critical types)
    golden_subprotocol     the same with the token in Sec-WebSocket-Protocol
    golden_query           the same with ?token=
    isolation              20 users x 3 connections, interleaved publishes: every
                           connection gets exactly its user's events, in order
    refuse_*               401 / 404 / 403 refusals with their JSON error codes
    sigterm                close 1001 to an open client, exit 0 within the grace period
    no_tokens_in_log       no minted token, signature or secret in the gateway logs

Every wait has a deadline and every check runs under a timeout, inside a global budget:
a hanging gateway makes checks FAIL, it never stalls the run. Prints one `PASS name: ...`
or `FAIL name: reason` line per check and `N passed, M failed` alone on the last line;
exits 1 on any failure. Diagnostics (log paths, log tails) go to stderr.

    target/test-venv/bin/python tests/interop/test_interop.py [--bin PATH] [FILTER...]

The binary is --bin, else $AGENTWIRE_BIN, else target/release/agentwire of this repo.
RUST_LOG for the gateway defaults to `debug`, so the token scan covers verbose logging.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from typing import Any, Callable, NoReturn

try:
    import jwt  # PyJWT
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
    from websockets.sync.client import ClientConnection, connect
except ImportError as e:  # pragma: no cover - environment problem, not a check
    print(f"interop: missing Python package ({e}); run `bash tools/test.sh`, which "
          "installs tools/requirements-test.txt into target/test-venv", file=sys.stderr)
    print("0 passed, 1 failed")
    sys.exit(1)

HOST = "127.0.0.1"
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# The whole script, gateways included, stays under a minute: the checks share CHECKS_BUDGET_S,
# the final log scan gets up to FINAL_S more, then the gateways get a few seconds to stop.
CHECKS_BUDGET_S = 42.0
FINAL_S = 10.0
MIN_CHECK_S = 6.0  # a check is not started with less budget than this left
WAIT = 5.0  # default deadline for one expected frame or response
HEARTBEAT_MS = 30000  # PROTOCOL.md section 8 default
SHUTDOWN_GRACE_S = 5.0  # PROTOCOL.md section 8 default shutdown_grace_ms
CRITICAL = ("agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed")
ENVELOPE = ("type", "seq", "user_id", "thread_id", "run_id", "agent_name", "ts", "data")
JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class CheckFailed(AssertionError):
    """The gateway did not do what the contract says."""


def expect(cond: Any, msg: str) -> None:
    if not cond:
        raise CheckFailed(msg)


def short(value: Any, limit: int = 300) -> str:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="replace")
    text = value if isinstance(value, str) else repr(value)
    text = JWT_RE.sub("<jwt>", text.replace("\n", "\\n"))
    return text if len(text) <= limit else text[:limit] + "..."


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def now_ms() -> int:
    return int(time.time() * 1000)


def diag(msg: str) -> None:
    print(f"[interop] {msg}", file=sys.stderr, flush=True)


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end


# ---------------------------------------------------------------------------
# Tokens


_minted_lock = threading.Lock()
MINTED: list[str] = []


def _remember(token: str) -> str:
    with _minted_lock:
        MINTED.append(token)
    return token


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(secret: str, sub: str, ttl: int = 3600) -> str:
    """An HS256 token by PyJWT: sub, iat, exp = now + ttl."""
    now = int(time.time())
    return _remember(jwt.encode({"sub": sub, "iat": now, "exp": now + ttl}, secret, algorithm="HS256"))


def mint_alg_none(sub: str) -> str:
    """An unsigned `alg: none` token, built by hand (PyJWT is never asked to)."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = b64url(json.dumps({"sub": sub, "exp": int(time.time()) + 3600}, separators=(",", ":")).encode())
    return _remember(f"{header}.{claims}.")


def exp_of(token: str) -> int:
    return jwt.decode(token, options={"verify_signature": False})["exp"]


# ---------------------------------------------------------------------------
# The gateway process


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the interop script dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort, atexit and stop() cover the rest
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Gateway:
    """One gateway process on a free port, its log in a temp file. Start it from the
    main thread only (PR_SET_PDEATHSIG follows the spawning thread)."""

    def __init__(self, binary: str, name: str, log_dir: str):
        self.binary = binary
        self.name = name
        self.secret = "s-" + secrets.token_urlsafe(32)
        self.publish_key = "pk-" + secrets.token_urlsafe(24)
        self.log_path = os.path.join(log_dir, f"gateway-{name}.log")
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None

    def start(self, timeout: float = 10.0) -> "Gateway":
        last = ""
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.port = free_port()
            env = dict(os.environ)
            env["RUST_LOG"] = os.environ.get("AGENTWIRE_INTEROP_RUST_LOG", "debug")
            args = [self.binary, "serve", "--listen", f"{HOST}:{self.port}",
                    "--jwt-secret", self.secret, "--publish-key", self.publish_key,
                    "--demo-agent", "true"]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, env=env,
                                             preexec_fn=_die_with_parent)
            d = Deadline(timeout)
            while not d.expired() and self.proc.poll() is None:
                try:
                    status, _body = self.request("GET", "/health", timeout=0.5)
                    if status == 200:
                        return self
                except OSError:
                    pass
                time.sleep(0.05)
            if self.proc.poll() is None:
                self.stop(3.0)
                raise RuntimeError(f"gateway {self.name} did not answer GET /health 200 within "
                                   f"{timeout:.0f}s; log tail: {short(self.log_tail(), 600)}")
            last = self.log_tail()
            if "in use" not in last.lower():
                break
        raise RuntimeError(f"gateway {self.name} exited with {self.proc.returncode if self.proc else '?'} "
                           f"before answering /health; log tail: {short(last, 600)}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 8.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                diag(f"gateway {self.name} ignored SIGTERM for {timeout:.0f}s; killing it")
                self.proc.kill()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        self.exit_code = self.proc.returncode
        return self.exit_code

    def log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 2000) -> str:
        return self.log_text()[-n:]

    # -- HTTP ------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None, timeout: float = WAIT) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def publish(self, events: list[dict]) -> None:
        body = json.dumps(events).encode()
        status, raw = self.request("POST", "/api/events", body=body, timeout=10.0, headers={
            "Authorization": f"Bearer {self.publish_key}", "Content-Type": "application/json"})
        expect(status == 202, f"POST /api/events of {len(events)} events: expected 202, got {status} {short(raw)}")
        answer = parse_json(raw, "publish answer")
        expect(answer.get("accepted") == len(events),
               f"POST /api/events: expected {{'accepted': {len(events)}}}, got {short(answer)}")

    # -- WebSocket -------------------------------------------------------------

    def url(self, path: str = "/ws", query: dict | None = None) -> str:
        q = "?" + urllib.parse.urlencode(query) if query else ""
        return f"ws://{HOST}:{self.port}{path}{q}"

    def open(self, token: str | None, via: str = "header", path: str = "/ws",
             query: dict | None = None) -> ClientConnection:
        """A websockets connection; the token in the header, the subprotocol or the query.
        Raises InvalidStatus for an HTTP refusal, CheckFailed for any other failure."""
        try:
            return self._open(token, via, path, query)
        except InvalidStatus:
            raise
        except (InvalidHandshake, OSError, TimeoutError, EOFError) as e:
            raise CheckFailed(f"could not open a WebSocket to {path}: {type(e).__name__}: {e}") from None

    def _open(self, token: str | None, via: str, path: str, query: dict | None) -> ClientConnection:
        query = dict(query or {})
        headers = None
        protos = None
        if token is not None:
            if via == "header":
                headers = [("Authorization", f"Bearer {token}")]
            elif via == "subprotocol":
                protos = ["agentwire.v1", f"bearer.{token}"]
            elif via == "query":
                query["token"] = token
            else:
                raise ValueError(via)
        return connect(self.url(path, query), additional_headers=headers, subprotocols=protos,
                       open_timeout=WAIT, close_timeout=3, max_size=2**22)


def parse_json(raw: bytes | str, what: str) -> dict:
    try:
        v = json.loads(raw)
    except ValueError:
        raise CheckFailed(f"{what} is not JSON: {short(raw)}") from None
    expect(isinstance(v, dict), f"{what} is not a JSON object: {short(v)}")
    return v


def recv_json(ws: ClientConnection, timeout: float, what: str) -> dict:
    """The next frame as a JSON object; CheckFailed on timeout, close or bad frame."""
    try:
        msg = ws.recv(timeout=max(0.0, timeout))
    except TimeoutError:
        raise CheckFailed(f"no {what} within {timeout:.1f}s") from None
    except ConnectionClosed as e:
        code = e.rcvd.code if e.rcvd else None
        raise CheckFailed(f"connection closed (close code {code}) while waiting for {what}") from None
    expect(isinstance(msg, str), f"{what}: got a binary frame {short(msg)}; events are text frames")
    return parse_json(msg, what)


def quiet(ws: ClientConnection, seconds: float) -> dict | None:
    """The first frame arriving within `seconds`, or None."""
    try:
        msg = ws.recv(timeout=seconds)
    except (TimeoutError, ConnectionClosed):
        return None
    return {"frame": msg}


# ---------------------------------------------------------------------------
# Checks


class Ctx:
    def __init__(self, gw: Gateway, term_gw: Gateway):
        self.gw = gw
        self.term_gw = term_gw
        self.tag = secrets.token_hex(3)
        self._n = 0
        self._lock = threading.Lock()
        self.rng = random.Random(int(os.environ.get("AGENTWIRE_SEED", random.randrange(1 << 30))))

    def user(self, prefix: str) -> str:
        with self._lock:
            self._n += 1
            return f"{prefix}-{self.tag}-{self._n}"


def check_connected(frame: dict, sub: str, token: str) -> None:
    """PROTOCOL.md section 3: the first frame of a new user's main connection."""
    expect(frame.get("type") == "connected", f"first frame is not 'connected': {short(frame)}")
    want: dict[str, Any] = {"user_id": sub, "mode": "main", "thread_id": None, "last_seq": 0,
                            "resumed": None, "heartbeat_interval_ms": HEARTBEAT_MS,
                            "token_exp": exp_of(token), "active_runs": []}
    for key, value in want.items():
        expect(key in frame, f"'connected' lacks {key!r}: {short(frame)}")
        got = frame[key]
        same = got == value and type(got) is type(value)
        expect(same, f"'connected'.{key}: expected {value!r}, got {got!r}")
    for key in ("connection_id", "epoch"):
        expect(isinstance(frame.get(key), str) and frame[key],
               f"'connected'.{key}: expected a non-empty string, got {short(frame.get(key))}")


def check_envelope(ev: dict, sub: str, what: str) -> None:
    """PROTOCOL.md section 2: every field of an event envelope, with its type."""
    missing = [k for k in ENVELOPE if k not in ev]
    expect(not missing, f"{what} lacks {missing}: {short(ev)}")
    expect(isinstance(ev["type"], str), f"{what}.type is not a string: {short(ev)}")
    expect(is_int(ev["seq"]), f"{what}.seq is not an integer: {short(ev)}")
    expect(ev["user_id"] == sub, f"{what}.user_id: expected {sub!r}, got {ev['user_id']!r}")
    expect(isinstance(ev["run_id"], str) and ev["run_id"], f"{what}.run_id is not a non-empty string: {short(ev)}")
    expect(isinstance(ev["agent_name"], str) and ev["agent_name"], f"{what}.agent_name is not a non-empty string: {short(ev)}")
    expect(is_int(ev["ts"]), f"{what}.ts is not an integer: {short(ev)}")
    skew = abs(ev["ts"] - now_ms())
    expect(skew < 60_000, f"{what}.ts {ev['ts']} is {skew} ms away from now {now_ms()} (expected ms since the epoch)")


def golden(ctx: Ctx, via: str) -> str:
    gw = ctx.gw
    sub = ctx.user(f"golden-{via}")
    token = mint(gw.secret, sub)
    try:
        ws = gw.open(token, via=via)
    except InvalidStatus as e:
        r = e.response
        raise CheckFailed(f"upgrade refused: HTTP {r.status_code} {short(bytes(r.body))}") from None
    with ws:
        if via == "subprotocol":
            expect(ws.subprotocol == "agentwire.v1",
                   f"negotiated subprotocol: expected 'agentwire.v1', got {ws.subprotocol!r}")
        connected = recv_json(ws, WAIT, "the 'connected' frame")
        check_connected(connected, sub, token)
        ref = f"ref-{via}-{secrets.token_hex(2)}"
        ws.send(json.dumps({"type": "user_message", "thread_id": "t1", "text": "what is agentwire?", "ref": ref}))
        ack = recv_json(ws, WAIT, "the ack of user_message")
        expect(ack.get("type") == "ack", f"expected the 'ack' of user_message first, got {short(ack)}")
        expect(ack.get("ref") == ref, f"ack.ref: expected {ref!r}, got {short(ack.get('ref'))}")
        run_id = ack.get("run_id")
        expect(isinstance(run_id, str) and run_id, f"ack.run_id is not a non-empty string: {short(ack)}")

        types: list[str] = []
        seq = connected["last_seq"]
        d = Deadline(8.0)  # the demo run takes about 1.3 s
        while True:
            ev = recv_json(ws, d.remaining(), f"event #{len(types) + 1} of run {run_id} "
                           f"(so far: {','.join(types) or 'none'})")
            what = f"event #{len(types) + 1} ({ev.get('type')})"
            check_envelope(ev, sub, what)
            expect(ev["thread_id"] == "t1", f"{what}.thread_id: expected 't1', got {ev['thread_id']!r}")
            expect(ev["run_id"] == run_id, f"{what}.run_id: expected the ack's {run_id!r}, got {ev['run_id']!r}")
            expect(ev["seq"] == seq + 1, f"{what}.seq: expected {seq + 1} (contiguous from last_seq "
                   f"{connected['last_seq']}), got {ev['seq']}")
            seq = ev["seq"]
            expect(ev["type"] != "agent_error", f"the run failed: {short(ev)}")
            if not types:
                expect(ev["type"] == "agent_started", f"first event of the run: expected agent_started, got {ev['type']!r}")
            types.append(ev["type"])
            if ev["type"] == "agent_completed":
                break
        missing = [t for t in CRITICAL if t not in types]
        expect(not missing, f"run lacks critical events {missing}; got {types}")
        order = [types.index("agent_thinking"), types.index("tool_executing"), types.index("tool_completed")]
        expect(order == sorted(order), f"events out of emission order: {types}")
        extra = quiet(ws, 0.3)
        expect(extra is None, f"unexpected frame after agent_completed: {short(extra)}")
    counts = {t: types.count(t) for t in dict.fromkeys(types)}
    return f"{len(types)} events, seq {connected['last_seq'] + 1}..{seq}, " + ", ".join(f"{t} x{n}" for t, n in counts.items())


def check_golden_header(ctx: Ctx) -> str:
    return golden(ctx, "header")


def check_golden_subprotocol(ctx: Ctx) -> str:
    return golden(ctx, "subprotocol")


def check_golden_query(ctx: Ctx) -> str:
    return golden(ctx, "query")


def check_isolation(ctx: Ctx) -> str:
    """20 users x 3 connections; interleaved publishes; each connection gets exactly its
    own user's events, in order, seq contiguous (PROTOCOL.md sections 2, 3, 6)."""
    gw = ctx.gw
    n_users, per_user, n_events, batch = 20, 3, 50, 250
    users = [ctx.user("iso") for _ in range(n_users)]
    conns: list[tuple[str, ClientConnection]] = []
    try:
        for _round in range(per_user):
            for u in users:
                token = mint(gw.secret, u)
                try:
                    ws = gw.open(token)
                except InvalidStatus as e:
                    raise CheckFailed(f"connection {len(conns) + 1} of 60 ({u}) refused: HTTP "
                                      f"{e.response.status_code} {short(bytes(e.response.body))}") from None
                conns.append((u, ws))
                check_connected(recv_json(ws, WAIT, f"'connected' of connection {len(conns)} ({u})"), u, token)

        # Interleave: round n carries event n of every user, users shuffled per round.
        events: list[dict] = []
        for n in range(n_events):
            order = list(users)
            ctx.rng.shuffle(order)
            for u in order:
                events.append({"type": "agent_completed" if n == n_events - 1 else "iso_tick",
                               "user_id": u, "thread_id": "t-iso", "run_id": f"run-{u}",
                               "agent_name": "interop_publisher", "data": {"user": u, "n": n}})
        for i in range(0, len(events), batch):
            gw.publish(events[i:i + batch])

        d = Deadline(10.0)
        errors: list[str] = []
        for idx, (u, ws) in enumerate(conns):
            seq = 0
            for n in range(n_events):
                what = f"conn {idx + 1} ({u}) event n={n}"
                try:
                    ev = recv_json(ws, d.remaining(), what)
                    check_envelope(ev, u, what)
                    expect(ev["data"] == {"user": u, "n": n},
                           f"{what}: expected data {{'user': {u!r}, 'n': {n}}}, got {short(ev['data'])}")
                    expect(ev["seq"] == seq + 1, f"{what}: expected seq {seq + 1}, got {ev['seq']}")
                    seq = ev["seq"]
                except CheckFailed as e:
                    errors.append(str(e))
                    break
            if len(errors) >= 5:
                break
        expect(not errors, "; ".join(errors[:5]))
        time.sleep(0.3)
        for idx, (u, ws) in enumerate(conns):
            extra = quiet(ws, 0.0)
            expect(extra is None, f"conn {idx + 1} ({u}) got an extra frame: {short(extra)}")
    finally:
        for _u, ws in conns:
            ws.close()
    return (f"{len(conns)} connections of {n_users} users each got exactly their {n_events} events "
            f"of {len(events)} published in {(len(events) + batch - 1) // batch} batches")


def refusal(gw: Gateway, token: str | None, path: str = "/ws", query: dict | None = None) -> tuple[int, dict]:
    """An upgrade that must be refused: its status and JSON body."""
    try:
        ws = gw.open(token, path=path, query=query)
    except InvalidStatus as e:
        r = e.response
        return r.status_code, parse_json(bytes(r.body), f"body of the HTTP {r.status_code} refusal")
    first = quiet(ws, 0.3)
    ws.close()
    raise CheckFailed(f"upgrade was accepted (first frame {short(first)}); expected a refusal")


def expect_refusal(got: tuple[int, dict], status: int, code: str) -> str:
    st, body = got
    expect(st == status and body.get("error") == code,
           f"expected HTTP {status} error {code!r}, got HTTP {st} {short(body)}")
    expect(isinstance(body.get("message"), str), f"refusal body lacks a 'message' string: {short(body)}")
    return f"HTTP {st} {body['error']}"


def check_refuse_no_token(ctx: Ctx) -> str:
    return expect_refusal(refusal(ctx.gw, None), 401, "invalid_token")


def check_refuse_wrong_secret(ctx: Ctx) -> str:
    token = mint("wrong-" + ctx.gw.secret, ctx.user("wrongkey"))
    return expect_refusal(refusal(ctx.gw, token), 401, "invalid_token")


def check_refuse_alg_none(ctx: Ctx) -> str:
    return expect_refusal(refusal(ctx.gw, mint_alg_none(ctx.user("algnone"))), 401, "invalid_token")


def check_refuse_unknown_path(ctx: Ctx) -> str:
    gw = ctx.gw
    upgrade = expect_refusal(refusal(gw, mint(gw.secret, ctx.user("nopath")), path="/no-such-path"), 404, "not_found")
    status, raw = gw.request("GET", "/no-such-path")
    body = parse_json(raw, f"body of GET /no-such-path (HTTP {status})")
    expect_refusal((status, body), 404, "not_found")
    return f"upgrade: {upgrade}; plain GET: HTTP {status} {body['error']}"


def check_refuse_user_id_mismatch(ctx: Ctx) -> str:
    gw = ctx.gw
    sub = ctx.user("mismatch")
    got = refusal(gw, mint(gw.secret, sub), query={"user_id": sub + "-other"})
    return expect_refusal(got, 403, "forbidden")


def check_sigterm(ctx: Ctx) -> str:
    """PROTOCOL.md section 7: SIGTERM -> close 1001 to clients, exit 0 within the grace."""
    gw = ctx.term_gw
    expect(gw.alive(), f"the sigterm gateway is not running (exit {gw.proc.returncode if gw.proc else '?'})")
    sub = ctx.user("term")
    token = mint(gw.secret, sub)
    ws = gw.open(token)
    try:
        check_connected(recv_json(ws, WAIT, "the 'connected' frame"), sub, token)
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        limit = SHUTDOWN_GRACE_S + 2.0
        try:
            frame = ws.recv(timeout=limit)
            raise CheckFailed(f"expected close 1001 after SIGTERM, got a frame first: {short(frame)}")
        except TimeoutError:
            raise CheckFailed(f"no close frame within {limit:.0f}s of SIGTERM") from None
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd else None
            expect(code == 1001, f"close code after SIGTERM: expected 1001, got "
                   f"{code if code is not None else 'no close frame (connection dropped)'}")
        t_close = time.monotonic() - t0
    finally:
        ws.close()
    try:
        rc = gw.proc.wait(timeout=max(0.0, SHUTDOWN_GRACE_S + 2.0 - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"gateway still running {SHUTDOWN_GRACE_S + 2.0:.0f}s after SIGTERM "
                          f"(shutdown_grace_ms is {SHUTDOWN_GRACE_S * 1000:.0f})") from None
    t_exit = time.monotonic() - t0
    gw.exit_code = rc
    expect(rc == 0, f"exit code after SIGTERM: expected 0, got {rc}")
    return f"close 1001 after {t_close * 1000:.0f} ms, exit 0 after {t_exit * 1000:.0f} ms"


def check_no_tokens_in_log(ctx: Ctx) -> str:
    """PROTOCOL.md section 3: tokens (and secrets) are never written to logs. Runs last:
    stops the gateways first so their logs are complete."""
    for g in (ctx.gw, ctx.term_gw):
        rc = g.stop(4.0)
        if rc not in (0, None):
            diag(f"gateway {g.name} exited with {rc}")
    with _minted_lock:
        tokens = list(dict.fromkeys(MINTED))
    expect(tokens, "no token was minted; nothing to look for")
    leaks: list[str] = []
    scanned = 0
    for g in (ctx.gw, ctx.term_gw):
        text = g.log_text()
        scanned += len(text)
        for t in tokens:
            sig = t.rsplit(".", 1)[-1]
            if t in text:
                leaks.append(f"{os.path.basename(g.log_path)} contains a whole token (sub {short(jwt.decode(t, options={'verify_signature': False}).get('sub'))})")
            elif len(sig) >= 16 and sig in text:
                leaks.append(f"{os.path.basename(g.log_path)} contains a token's signature")
        for label, secret in (("jwt secret", g.secret), ("publish key", g.publish_key)):
            if secret in text:
                leaks.append(f"{os.path.basename(g.log_path)} contains the {label}")
    expect(not leaks, "; ".join(dict.fromkeys(leaks)))
    return f"{len(tokens)} tokens and 2 secrets looked for in {scanned} bytes of 2 gateway logs: none found"


# (check, timeout in seconds); each check's own deadlines fit inside its timeout.
CHECKS: list[tuple[Callable[[Ctx], str], float]] = [
    (check_golden_header, 15.0),
    (check_golden_subprotocol, 15.0),
    (check_golden_query, 15.0),
    (check_isolation, 20.0),
    (check_refuse_no_token, 6.0),
    (check_refuse_wrong_secret, 6.0),
    (check_refuse_alg_none, 6.0),
    (check_refuse_unknown_path, 12.0),
    (check_refuse_user_id_mismatch, 6.0),
    (check_sigterm, 14.0),
    (check_no_tokens_in_log, FINAL_S),  # last: it stops the gateways
]


# ---------------------------------------------------------------------------
# Runner


def run_one(fn: Callable[[Ctx], str], ctx: Ctx, timeout: float) -> tuple[bool, str]:
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["detail"] = fn(ctx)
            result["ok"] = True
        except CheckFailed as e:
            result["ok"], result["detail"] = False, str(e)
        except Exception as e:  # noqa: BLE001 - report, never crash the run
            result["ok"], result["detail"] = False, f"unexpected {type(e).__name__}: {e}"

    t = threading.Thread(target=target, name=fn.__name__, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return False, f"did not finish within {timeout:.0f}s (hang)"
    return bool(result.get("ok")), short(str(result.get("detail") or "ok"), 800)


# What both suites' main() do (this one and test_metrics.py): the command line, a failed
# setup, the totals line that tools/test.sh counts.

def suite_args(doc: str) -> argparse.Namespace:
    """`--bin` and the check-name filters; a missing binary is a failed setup (exit 1)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--bin", default=os.environ.get("AGENTWIRE_BIN") or os.path.join(REPO, "target", "release", "agentwire"))
    ap.add_argument("filters", nargs="*", help="run only checks whose name contains one of these")
    args = ap.parse_args()
    if not (os.path.isfile(args.bin) and os.access(args.bin, os.X_OK)):
        print(f"FAIL setup: gateway binary {args.bin} not found (run `cargo build --release`)")
        print("0 passed, 1 failed")
        sys.exit(1)
    return args


def setup_failed(e: BaseException) -> NoReturn:
    """A gateway did not start (the caller has stopped the gateways): one FAIL, exit 1."""
    print(f"FAIL setup: {short(str(e), 1000)}")
    print("0 passed, 1 failed")
    sys.stdout.flush()
    os._exit(1)


def finish(passed: int, failed: int, gateways: list[Gateway], note: str | None = None) -> NoReturn:
    """The totals line and the exit code; on a failure, each gateway's last log lines
    first (on stderr, with `note` after them)."""
    if failed:
        for g in gateways:
            tail = g.log_text().splitlines()[-25:]
            diag(f"last lines of {g.log_path}:")
            for line in tail:
                print(f"    {short(line, 400)}", file=sys.stderr)
    if note is not None:
        diag(note)
    sys.stderr.flush()
    print(f"{passed} passed, {failed} failed", flush=True)
    os._exit(0 if failed == 0 else 1)


def main() -> None:
    args = suite_args(__doc__)
    t_start = time.monotonic()

    def name_of(fn: Callable) -> str:
        return fn.__name__.removeprefix("check_")

    selected = [(fn, t) for fn, t in CHECKS
                if not args.filters or any(f in name_of(fn) for f in args.filters)]

    log_dir = tempfile.mkdtemp(prefix="agentwire-interop-")
    diag(f"binary {args.bin}; gateway logs in {log_dir}")
    gw = Gateway(args.bin, "main", log_dir)
    term_gw = Gateway(args.bin, "sigterm", log_dir)

    def stop_all(*_a: Any) -> None:
        for g in (gw, term_gw):
            try:
                g.stop(3.0)
            except Exception:  # noqa: BLE001
                pass

    def on_signal(signum: int, _frame: Any) -> None:
        stop_all()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    try:
        gw.start()
        term_gw.start()
    except (RuntimeError, OSError) as e:
        stop_all()
        setup_failed(e)

    ctx = Ctx(gw, term_gw)
    budget = Deadline(CHECKS_BUDGET_S)
    passed = failed = 0
    for fn, timeout in selected:
        name = name_of(fn)
        if fn is not check_no_tokens_in_log:
            timeout = min(timeout, budget.remaining())
        if timeout < MIN_CHECK_S and fn is not check_no_tokens_in_log:
            ok, detail = False, f"not run: the checks' {CHECKS_BUDGET_S:.0f}s budget is spent"
        else:
            t0 = time.monotonic()
            ok, detail = run_one(fn, ctx, timeout)
            diag(f"{name} took {time.monotonic() - t0:.2f}s")
        print(f"PASS {name}: {detail}" if ok else f"FAIL {name}: {detail}", flush=True)
        passed += ok
        failed += not ok
    stop_all()
    finish(passed, failed, [gw, term_gw], f"finished in {time.monotonic() - t_start:.1f}s")


if __name__ == "__main__":
    main()
