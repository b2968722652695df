"""Checks that a server speaks the protocol subset the comparison relies on (run against
agentwire and every peer by tools/peers/smoke.sh; standard library only).

    python3 tools/peers/check_protocol.py --addr 127.0.0.1:PORT   (secrets from the
        environment: AGENTWIRE_JWT_SECRET, AGENTWIRE_PUBLISH_KEY)

Checked: /health 200; an upgrade with a bad token (Bearer or ?token=) and without one is
refused 401 `invalid_token`; a good token (Bearer, and ?token=) gets 101 and a first
`connected` frame with user_id, connection_id, epoch and last_seq; POST /api/events with
a bad key is 401, with a bad event 400 `bad_event` and its index (nothing accepted), one
event or an array 202 {"accepted":N}; each user's connections get that user's events
only, with seq 1, 2, ... and the envelope's fields in order, `data` unchanged. Every
read has a deadline. Exit 0 when all passed; prints `N passed, M failed`.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import secrets
import socket
import sys
import time

DEADLINE_S = 5.0
ENVELOPE = ["type", "seq", "user_id", "thread_id", "run_id", "agent_name", "ts", "data"]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(secret: str, sub: str, ttl: int = 3600) -> str:
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": sub, "exp": int(time.time()) + ttl}).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def read_response(sock: socket.socket):
    sock.settimeout(DEADLINE_S)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines and len(lines[0].split(" ")) > 1 else 0
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0") or 0)
    if status != 101:
        while len(rest) < length:
            chunk = sock.recv(4096)
            if not chunk:
                break
            rest += chunk
    return status, headers, rest


def http(addr, method, path, body=None, headers=None):
    host, port = addr
    with socket.create_connection((host, port), timeout=DEADLINE_S) as s:
        data = b"" if body is None else body.encode()
        req = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
        for k, v in (headers or {}).items():
            req += f"{k}: {v}\r\n"
        if body is not None:
            req += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        s.sendall(req.encode() + b"\r\n" + data)
        status, _, rest = read_response(s)
        return status, rest


class Ws:
    """A minimal client: upgrade, then read unmasked text frames."""

    def __init__(self, addr, token=None, query_token=None):
        self.sock = socket.create_connection(addr, timeout=DEADLINE_S)
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        path = "/ws" + (f"?token={query_token}" if query_token else "")
        req = (
            f"GET {path} HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        )
        if token:
            req += f"Authorization: Bearer {token}\r\n"
        self.sock.sendall(req.encode() + b"\r\n")
        self.status, self.headers, self.buf = read_response(self.sock)
        want = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        ).decode()
        self.accepted = self.status == 101 and self.headers.get("sec-websocket-accept") == want

    def frame(self, timeout=DEADLINE_S):
        """The next text frame as text; None when none came within `timeout`."""
        end = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 2:
                n = self.buf[1] & 0x7F
                at = 2
                if n == 126:
                    n, at = int.from_bytes(self.buf[2:4], "big"), 4
                elif n == 127:
                    n, at = int.from_bytes(self.buf[2:10], "big"), 10
                if len(self.buf) >= at + n:
                    op, payload = self.buf[0] & 0x0F, self.buf[at : at + n]
                    self.buf = self.buf[at + n :]
                    if op == 0x1:
                        return payload.decode()
                    continue
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            if not chunk:
                return None
            self.buf += chunk

    def close(self):
        self.sock.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--name", default="server")
    args = ap.parse_args()
    host, _, port = args.addr.rpartition(":")
    addr = (host, int(port))
    secret = os.environ["AGENTWIRE_JWT_SECRET"]
    key = os.environ["AGENTWIRE_PUBLISH_KEY"]
    results = []

    def check(name, ok, detail=""):
        results.append(ok)
        print(f"{'ok  ' if ok else 'FAIL'} {args.name}: {name}{'' if ok else ': ' + detail}")

    status, _ = http(addr, "GET", "/health")
    check("/health is 200", status == 200, f"got {status}")

    for label, ws in [
        ("bad Bearer token", Ws(addr, token=mint("wrong-secret-0123456789", "u"))),
        ("bad ?token=", Ws(addr, query_token=mint("wrong-secret-0123456789", "u"))),
        ("no token", Ws(addr)),
        ("expired token", Ws(addr, token=mint(secret, "u", ttl=-3600))),
    ]:
        check(f"{label} refused 401 invalid_token", ws.status == 401 and b"invalid_token" in ws.buf,
              f"got {ws.status} {ws.buf[:80]!r}")
        ws.close()

    tag = secrets.token_hex(3)
    ua, ub = f"chk{tag}-a", f"chk{tag}-b"
    a1 = Ws(addr, token=mint(secret, ua))
    a2 = Ws(addr, query_token=mint(secret, ua))
    b1 = Ws(addr, token=mint(secret, ub))
    for label, ws, user in [("Bearer", a1, ua), ("?token=", a2, ua), ("Bearer", b1, ub)]:
        check(f"good token ({label}) upgraded 101 with the right accept key", ws.accepted,
              f"got {ws.status}")
        first = ws.frame()
        try:
            hello = json.loads(first or "null") or {}
        except ValueError:
            hello = {}
        fields_ok = (
            hello.get("type") == "connected"
            and hello.get("user_id") == user
            and isinstance(hello.get("connection_id"), str)
            and isinstance(hello.get("epoch"), str)
            and hello.get("last_seq") == 0
        )
        check("first frame is connected (user_id, connection_id, epoch, last_seq 0)", fields_ok,
              f"got {first!r}")

    pk = {"Authorization": f"Bearer {key}"}
    ev = lambda u, i: {"type": "text_delta", "user_id": u, "run_id": "r1",
                       "agent_name": "check", "data": {"t_us": 1, "n": i, "note": "h\u00e9"}}
    status, body = http(addr, "POST", "/api/events", json.dumps(ev(ua, 0)),
                        {"Authorization": "Bearer wrong-key"})
    check("publish with a bad key is 401", status == 401, f"got {status}")
    bad = [ev(ua, 0), {"type": "Bad Type", "user_id": ua, "run_id": "r", "agent_name": "x"}]
    status, body = http(addr, "POST", "/api/events", json.dumps(bad), pk)
    check("a bad event is 400 bad_event with its index",
          status == 400 and json.loads(body or b"{}").get("index") == 1, f"got {status} {body!r}")
    status, body = http(addr, "POST", "/api/events", json.dumps(ev(ua, 0)), pk)
    check("one event: 202 accepted 1",
          status == 202 and json.loads(body or b"{}").get("accepted") == 1, f"got {status} {body!r}")
    status, body = http(addr, "POST", "/api/events",
                        json.dumps([ev(ub, 0), ev(ua, 1), ev(ua, 2)]), pk)
    check("an array: 202 accepted 3",
          status == 202 and json.loads(body or b"{}").get("accepted") == 3, f"got {status} {body!r}")

    for label, ws, user, want in [("a (Bearer)", a1, ua, [1, 2, 3]), ("a (?token=)", a2, ua, [1, 2, 3]),
                                  ("b", b1, ub, [1])]:
        got = []
        for _ in want:
            f = ws.frame()
            got.append(f)
        frames = [json.loads(f) if f else {} for f in got]
        seqs = [f.get("seq") for f in frames]
        check(f"user {label} got its events with seq {want}", seqs == want, f"got {got!r}")
        check(f"user {label}: envelope fields in order, user_id right, data unchanged",
              all(list(f.keys()) == ENVELOPE and f["user_id"] == user
                  and f["data"]["note"] == "h\u00e9" and f["thread_id"] is None for f in frames),
              f"got {got!r}")
        extra = ws.frame(timeout=0.3)
        check(f"user {label} got nothing else", extra is None, f"got {extra!r}")
    for ws in (a1, a2, b1):
        ws.close()

    passed = sum(results)
    failed = len(results) - passed
    print(f"{args.name}: {passed} passed, {failed} failed")
    sys.exit(0 if failed == 0 else 1)


if __name__ == "__main__":
    main()
