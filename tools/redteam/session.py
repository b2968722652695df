#!/usr/bin/env python3
"""Red-team floods on an open WebSocket session (issue 9, rows F3 and F4).

Starts a gateway binary (the v1 release for "before", target/release/agentwire for
"after") on a random port in 20000-29999, pinned to CPU 0, runs one attack from a
separate process pinned to CPU 1, and meanwhile measures another user's event latency
(events published through POST /api/events every 10 ms, stamped at publish time) and
samples /ws/stats and the gateway's RSS once a second. Python 3.11 stdlib only.

Attacks (--attack):
  none          baseline: only the victim's events
  ping          one connection floods {"type":"ping"} (and drains its pongs)
  refresh       one connection floods refresh with forged tokens (--alg HS256, ES256 or
                RS256; ES256/RS256 generate a key pair with openssl; --rsa-bits for RS256);
                when closed (1008 after the fix) it reconnects and goes on
  bad           one connection floods text that is not JSON (reconnects after 1008)
  cancel        one connection floods cancel of unknown run ids
  fragments     one connection floods empty continuation frames of a never-ending text
                message
  user_message  one user sends --count user_message of --text-bytes each to the demo
                agent (runs take ~1 s); reports acks / busy / too_large, RSS growth, and
                whether another user's user_message is then acked

Examples:
  python3 tools/redteam/session.py --binary /work/v1/agentwire --attack ping --seconds 20
  python3 tools/redteam/session.py --binary target/release/agentwire --attack refresh \\
      --alg ES256 --seconds 10
  python3 tools/redteam/session.py --binary target/release/agentwire \\
      --attack user_message --count 4500 --text-bytes 65000
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

SECRET = "redteam-session-secret-0123456789abcdef"
PUBLISH_KEY = "redteam-session-publish-key-0123456789"


# ------------------------------------------------------------------ tokens

from common import b64url, rss_kib  # noqa: E402  (tools/redteam/common.py)
from common import hs256 as _hs256  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from gateway_proc import stop as stop_gateway  # noqa: E402  (tools/lib/gateway_proc.py)


def hs256(claims: dict, secret: str = SECRET) -> str:
    return _hs256(claims, secret)


def forged(alg: str, sub: str, sig_bytes: int) -> str:
    """A token of `alg` with a random signature: costs the gateway a verification."""
    head = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64url(json.dumps({"sub": sub, "exp": int(time.time()) + 3600}).encode())
    return f"{head}.{body}.{b64url(os.urandom(sig_bytes))}"


# --------------------------------------------------------------- WebSocket

def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 4096 else \
        (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")
    return head + mask + masked


class Ws:
    """A blocking client WebSocket with a frame parser (server frames are unmasked)."""

    def __init__(self, port: int, token: str, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n")
        self.sock.sendall(req.encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during upgrade")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace"))

    def next_frame(self):
        """(opcode, payload) or None at EOF."""
        while True:
            f = self._parse()
            if f is not None:
                return f
            try:
                chunk = self.sock.recv(262144)
            except (ConnectionError, OSError):
                return None
            if not chunk:
                return None
            self.buf += chunk

    def _parse(self):
        b = self.buf
        if len(b) < 2:
            return None
        n = b[1] & 0x7F
        at = 2
        if n == 126:
            if len(b) < 4:
                return None
            n = struct.unpack(">H", b[2:4])[0]
            at = 4
        elif n == 127:
            if len(b) < 10:
                return None
            n = struct.unpack(">Q", b[2:10])[0]
            at = 10
        if len(b) < at + n:
            return None
        self.buf = b[at + n:]
        return b[0] & 0x0F, b[at:at + n]

    def next_json(self):
        while True:
            f = self.next_frame()
            if f is None:
                return None
            op, payload = f
            if op == 1:
                return json.loads(payload)
            if op == 8:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 0
                return {"type": "__close__", "code": code}

    def send_json(self, v: dict) -> None:
        self.sock.sendall(frame(1, json.dumps(v).encode()))


# ----------------------------------------------------------------- gateway

def get_json(port: int, path: str, timeout: float = 5.0):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return json.loads(r.read())


def start_gateway(binary: str, port: int, alg: str, keydir: str, rsa_bits: int):
    args = ["taskset", "-c", "0", binary, "--listen", f"127.0.0.1:{port}",
            "--publish-key", PUBLISH_KEY, "--demo-agent", "true"]
    if alg == "HS256":
        args += ["--jwt-secret", SECRET]
    else:
        priv = os.path.join(keydir, "key.pem")
        pub = os.path.join(keydir, "pub.pem")
        if os.path.exists(priv):
            pass  # --keydir reuse (RSA-8192 takes a while to generate)
        elif alg == "ES256":
            subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                            "-out", priv], check=True, capture_output=True)
        else:
            subprocess.run(["openssl", "genrsa", "-out", priv, str(rsa_bits)], check=True,
                           capture_output=True)
        subprocess.run(["openssl", "pkey", "-in", priv, "-pubout", "-out", pub], check=True,
                       capture_output=True)
        args += ["--jwt-algorithm", alg, "--jwt-public-key-file", pub]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            get_json(port, "/health", 1)
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("gateway did not start")


def sign_token(binary: str, alg: str, keydir: str, sub: str) -> str:
    if alg == "HS256":
        return hs256({"sub": sub, "exp": int(time.time()) + 3600})
    priv = os.path.join(keydir, "key.pem")
    head = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64url(json.dumps({"sub": sub, "exp": int(time.time()) + 3600}).encode())
    data = f"{head}.{body}".encode()
    sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", priv], input=data,
                         check=True, capture_output=True).stdout
    if alg == "ES256":
        sig = der_to_raw(sig)
    return f"{head}.{body}.{b64url(sig)}"


def der_to_raw(der: bytes) -> bytes:
    """ECDSA DER (SEQUENCE of two INTEGERs) to the JWS r||s form."""
    at = 2 if der[1] < 0x80 else 3
    out = b""
    for _ in range(2):
        assert der[at] == 2
        n = der[at + 1]
        v = der[at + 2:at + 2 + n].lstrip(b"\0")
        out += v.rjust(32, b"\0")
        at += 2 + n
    return out


# ----------------------------------------------------------------- attacks

def drain(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            if not sock.recv(262144):
                return
        except socket.timeout:
            continue
        except OSError:
            return


def attacker(kind: str, port: int, token: str, alg: str, seconds: float, out) -> None:
    os.sched_setaffinity(0, {1})
    end = time.time() + seconds
    sent = 0
    closes = 0
    codes: dict = {}
    if kind == "refresh":
        sig_bytes = {"HS256": 32, "ES256": 64}.get(alg, 1024)
        payload = frame(1, json.dumps({"type": "refresh",
                                       "token": forged(alg, "attacker", sig_bytes)}).encode())
    elif kind == "ping":
        payload = frame(1, b'{"type":"ping"}')
    elif kind == "bad":
        payload = frame(1, b"this is not json")
    elif kind == "cancel":
        payload = frame(1, b'{"type":"cancel","run_id":"r-0000000000000000"}')
    elif kind == "fragments":
        payload = frame(0, b"", fin=False)
    else:
        raise SystemExit(f"unknown attack {kind}")
    per_batch = max(1, min(256, 32768 // len(payload)))
    batch = payload * per_batch
    while time.time() < end:
        try:
            ws = Ws(port, token)
        except (OSError, ConnectionError) as e:
            codes["connect_error"] = codes.get("connect_error", 0) + 1
            time.sleep(0.01)
            continue
        stop = threading.Event()
        if kind in ("refresh", "bad"):
            # Read answers to count codes; stop at the close.
            def reader():
                nonlocal closes
                while True:
                    v = ws.next_json()
                    if v is None:
                        break
                    if v.get("type") == "__close__":
                        codes[f"close_{v['code']}"] = codes.get(f"close_{v['code']}", 0) + 1
                        closes += 1
                        break
                    c = v.get("code") or v.get("type")
                    codes[c] = codes.get(c, 0) + 1
                stop.set()
            t = threading.Thread(target=reader, daemon=True)
        else:
            t = threading.Thread(target=drain, args=(ws.sock, stop), daemon=True)
        t.start()
        if kind == "fragments":
            ws.sock.sendall(frame(1, b"{", fin=False))
        try:
            while time.time() < end and not stop.is_set():
                ws.sock.sendall(batch)
                sent += per_batch
        except OSError:
            pass
        stop.set()
        try:
            ws.sock.close()
        except OSError:
            pass
        t.join(1)
    out.put({"sent": sent, "closes": closes, "codes": codes})


def victim(port: int, token: str, seconds: float, result: dict) -> None:
    """Publish an event to user `victim` every 10 ms; record each one's delay."""
    ws = Ws(port, token)
    first = ws.next_json()
    assert first and first["type"] == "connected", first
    delays = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            v = ws.next_json()
            if v is None:
                return
            if v.get("type") == "text_delta":
                delays.append(time.time() * 1000 - v["data"]["t"])

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    conn = socket.create_connection(("127.0.0.1", port))
    end = time.time() + seconds
    n = 0
    while time.time() < end:
        ev = [{"type": "text_delta", "user_id": "victim", "run_id": "r-victim",
               "agent_name": "probe", "data": {"t": time.time() * 1000, "n": n}}]
        body = json.dumps(ev).encode()
        conn.sendall((f"POST /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PUBLISH_KEY}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
        resp = b""
        while b"\r\n\r\n" not in resp:
            resp += conn.recv(65536)
        head, _, rest = resp.partition(b"\r\n\r\n")
        length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
        while len(rest) < length:
            rest += conn.recv(65536)
        n += 1
        time.sleep(0.01)
    time.sleep(0.3)
    stop.set()
    delays.sort()
    result["victim_events"] = len(delays)
    if delays:
        result["victim_p50_ms"] = round(delays[len(delays) // 2], 2)
        result["victim_p99_ms"] = round(delays[min(len(delays) - 1, len(delays) * 99 // 100)], 2)
        result["victim_max_ms"] = round(delays[-1], 2)


def user_message_attack(port: int, token: str, victim_token: str, count: int, text_bytes: int,
                        pid: int, result: dict) -> None:
    rss0 = rss_kib(pid)
    ws = Ws(port, token)
    assert ws.next_json()["type"] == "connected"
    text = "x" * text_bytes
    started = time.time()
    answers: dict = {}
    got = 0
    peak = rss0
    done = threading.Event()

    def reader():
        nonlocal got
        while got < count:
            v = ws.next_json()
            if v is None:
                break
            if v.get("type") == "__close__":
                answers[f"close_{v['code']}"] = 1
                break
            if v.get("type") == "ack" or v.get("type") == "error":
                c = v.get("code") or "ack"
                answers[c] = answers.get(c, 0) + 1
                got += 1
        done.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    for i in range(count):
        try:
            ws.sock.sendall(frame(1, json.dumps({"type": "user_message", "text": text,
                                                 "ref": f"a{i}"}).encode()))
        except OSError:
            break
        if i % 100 == 0:
            peak = max(peak, rss_kib(pid))
    while not done.wait(0.05):
        peak = max(peak, rss_kib(pid))
        if time.time() - started > 60:
            break
    took = time.time() - started
    peak = max(peak, rss_kib(pid))
    stats = get_json(port, "/ws/stats")
    other = Ws(port, victim_token)
    assert other.next_json()["type"] == "connected"
    victim_answers = []
    for i in range(6):
        other.send_json({"type": "user_message", "text": "hello", "ref": f"v{i}"})
    while len(victim_answers) < 6:
        v = other.next_json()
        if v is None:
            break
        if v.get("type") in ("ack", "error"):
            victim_answers.append(v.get("code") or "ack")
    result.update({
        "attacker_answers": answers,
        "answered_in_s": round(took, 2),
        "rss_before_mib": round(rss0 / 1024, 1),
        "rss_peak_mib": round(peak / 1024, 1),
        "rss_growth_mib": round((peak - rss0) / 1024, 1),
        "active_runs": stats.get("runs", {}).get("active"),
        "inbound_held": stats.get("inbound"),
        "victim_user_message_answers": victim_answers,
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--attack", default="ping",
                    choices=["none", "ping", "refresh", "bad", "cancel", "fragments", "user_message"])
    ap.add_argument("--seconds", type=float, default=12)
    ap.add_argument("--alg", default="HS256", choices=["HS256", "ES256", "RS256"])
    ap.add_argument("--rsa-bits", type=int, default=2048)
    ap.add_argument("--connections", type=int, default=1, help="attacker connections (same user)")
    ap.add_argument("--count", type=int, default=4500)
    ap.add_argument("--text-bytes", type=int, default=65000)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--keydir", help="reuse (or keep) the key pair in this directory")
    a = ap.parse_args()
    port = a.port or random.randint(20000, 29999)
    keydir = a.keydir or tempfile.mkdtemp(prefix="rt-session-")
    os.makedirs(keydir, exist_ok=True)
    proc = start_gateway(a.binary, port, a.alg, keydir, a.rsa_bits)
    result: dict = {"binary": a.binary, "attack": a.attack, "alg": a.alg, "seconds": a.seconds}
    try:
        atk_token = sign_token(a.binary, a.alg, keydir, "attacker")
        vic_token = sign_token(a.binary, a.alg, keydir, "victim")
        os.sched_setaffinity(0, {1})
        if a.attack == "user_message":
            user_message_attack(port, atk_token, vic_token, a.count, a.text_bytes, proc.pid, result)
        else:
            q = mp.Queue()
            procs = []
            if a.attack != "none":
                for _ in range(a.connections):
                    p = mp.Process(target=attacker, args=(a.attack, port, atk_token, a.alg, a.seconds, q))
                    p.start()
                    procs.append(p)
            samples = []
            vt = threading.Thread(target=victim, args=(port, vic_token, a.seconds, result))
            vt.start()
            t0 = time.time()
            while vt.is_alive():
                time.sleep(1)
                try:
                    s = get_json(port, "/ws/stats", 10)
                except OSError:
                    continue
                samples.append({
                    "t": round(time.time() - t0, 1),
                    "rss_mib": round(rss_kib(proc.pid) / 1024, 1),
                    "loop_p99_us": s["loop"]["iteration_us"]["p99"],
                    "loop_max_us": s["loop"]["iteration_us"]["max"],
                    "max_per_iteration": s.get("client_messages", {}).get("max_per_iteration"),
                    "client_messages": s.get("client_messages", {}).get("total"),
                })
            vt.join()
            atk = [q.get(timeout=30) for _ in procs]
            for p in procs:
                p.join(5)
            result["attacker"] = atk
            result["samples"] = samples
            final = get_json(port, "/ws/stats")
            result["final_client_messages"] = final.get("client_messages")
            result["final_loop_us"] = final["loop"]["iteration_us"]
            try:
                result["cpu_s"] = sum(int(x) for x in open(f"/proc/{proc.pid}/stat").read().split()[13:15]) / os.sysconf("SC_CLK_TCK")
            except OSError:
                pass
    finally:
        stop_gateway(proc, 5)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
