#!/usr/bin/env python3
"""Red-team measurements of agentwire's HTTP front door (issue 9: F1, F2, F11, fd limit).

Starts the given binary on a random port in 20000-29999, runs one attack, prints the
figures as JSON (gateway RSS from /proc/PID/status, another client's /health latency,
what the attacker saw), then stops the gateway. Python 3.11 stdlib only.

    tools/redteam/front_door.py --bin /work/v1/agentwire f1 --seconds 8
    tools/redteam/front_door.py --bin target/release/agentwire f1 --seconds 10
    tools/redteam/front_door.py --bin BIN f2-nokey --conns 300
    tools/redteam/front_door.py --bin BIN f2-idle --nofile 256 --idle 400
    tools/redteam/front_door.py --bin BIN f11 --seconds 2
    tools/redteam/front_door.py --bin BIN fdlimit --nofile 64 --seconds 20
"""

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

SECRET = "redteam-secret-0123456789abcdef"
PUBLISH_KEY = "redteam-publish-key-0123456789"


from common import b64url as b64, hs256, rss_kib  # noqa: E402  (tools/redteam/common.py)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from gateway_proc import stop as stop_gateway  # noqa: E402  (tools/lib/gateway_proc.py)


class Gateway:
    def __init__(self, binary, extra=(), nofile=None):
        self.port = random.randint(20000, 29999)
        args = [binary, "serve", "--listen", f"127.0.0.1:{self.port}", "--jwt-secret", SECRET,
                "--publish-key", PUBLISH_KEY, "--demo-agent", "false", *extra]
        if nofile:
            cmd = ["sh", "-c", f"ulimit -n {nofile} && exec \"$@\"", "sh", *args]
        else:
            cmd = args
        self.stderr_lines = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env={**os.environ, "RUST_LOG": "info"}, text=True)
        self.ready = threading.Event()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if not self.ready.wait(10):
            raise SystemExit("gateway did not start: " + "\n".join(self.stderr_lines))

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line.rstrip())
            if "listening on" in line:
                self.ready.set()

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        stop_gateway(self.proc, 10)


def request(port, raw, timeout=10.0):
    """Send raw bytes on a new connection; return (status, body bytes, seconds)."""
    t = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = None
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                if head.startswith(b"HTTP/1.1 101") or (length is not None and len(body) >= length):
                    break
    dt = time.monotonic() - t
    if not data.startswith(b"HTTP/1."):
        return None, data, dt
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2], dt


def get(port, path, timeout=10.0):
    return request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(), timeout)


def stats(port):
    status, body, _ = get(port, "/ws/stats")
    return json.loads(body) if status == 200 else {}


def token(sub):
    return hs256({"sub": sub, "exp": int(time.time()) + 3600}, SECRET)


def upgrade_raw(sub):
    return (f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token(sub)}\r\n\r\n").encode()


def health_prober(port, stop, out):
    """Another client: GET /health every 100 ms; keeps the worst latency."""
    while not stop.is_set():
        try:
            status, _, dt = get(port, "/health", timeout=15)
            out.append(dt if status == 200 else 15.0)
        except OSError:
            out.append(15.0)
        time.sleep(0.1)


def f1(gw, args):
    """One socket pipelines GET /metrics and never reads."""
    rss0 = rss_kib(gw.pid)
    stop = threading.Event()
    lat = []
    prober = threading.Thread(target=health_prober, args=(gw.port, stop, lat))
    prober.start()
    s = socket.create_connection(("127.0.0.1", gw.port))
    s.settimeout(0.2)
    batch = (args.path and f"GET {args.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()) * 1000
    sent = 0
    peak = rss0
    closed_by_gateway = False
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        try:
            sent += s.send(batch)
        except socket.timeout:
            pass
        except OSError:
            closed_by_gateway = True
            time.sleep(0.05)
        peak = max(peak, rss_kib(gw.pid))
    rss_attack = rss_kib(gw.pid)
    s.close()
    time.sleep(3)
    stop.set()
    prober.join()
    return {"attack": "f1", "path": args.path, "seconds": args.seconds, "bytes_sent": sent,
            "requests_sent": sent // len(batch) * 1000, "closed_by_gateway": closed_by_gateway,
            "rss_kib_before": rss0, "rss_kib_peak": peak, "rss_kib_end_of_attack": rss_attack,
            "rss_kib_3s_after_leaving": rss_kib(gw.pid),
            "health_max_s": round(max(lat or [0]), 3), "health_probes": len(lat)}


def f2_nokey(gw, args):
    """Connections announce a 1 MiB publish without Authorization, send all but one byte."""
    rss0 = rss_kib(gw.pid)
    head = (b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1048576\r\n\r\n")
    body = b" " * (1048576 - 1)
    socks, answered_401, t0 = [], 0, time.monotonic()
    for _ in range(args.conns):
        s = socket.create_connection(("127.0.0.1", gw.port))
        s.settimeout(2)
        s.sendall(head)
        try:
            s.sendall(body)
        except OSError:
            pass
        socks.append(s)
    elapsed = time.monotonic() - t0
    rss1 = rss_kib(gw.pid)
    for s in socks:
        try:
            s.settimeout(0.05)
            if s.recv(64).startswith(b"HTTP/1.1 401"):
                answered_401 += 1
        except OSError:
            pass
    st = stats(gw.port)
    for s in socks:
        s.close()
    return {"attack": "f2-nokey", "conns": args.conns, "seconds": round(elapsed, 2),
            "rss_kib_before": rss0, "rss_kib_after": rss1,
            "rss_growth_mib": round((rss1 - rss0) / 1024, 1), "answered_401": answered_401,
            "connections_open": st.get("connections", {}).get("open"),
            "http": st.get("http"), "publish": st.get("publish")}


def f2_idle(gw, args):
    """Idle sockets that never send a request, then legitimate upgrades."""
    idle = []
    for _ in range(args.idle):
        try:
            idle.append(socket.create_connection(("127.0.0.1", gw.port), timeout=2))
        except OSError:
            break
    time.sleep(0.5)
    ok = 0
    for i in range(3):
        try:
            status, _, _ = request(gw.port, upgrade_raw(f"legit-{i}"), timeout=3)
            ok += status == 101
        except OSError:
            pass
    st = stats(gw.port)
    for s in idle:
        s.close()
    return {"attack": "f2-idle", "nofile": args.nofile, "idle_opened": len(idle),
            "legit_upgrades_ok": f"{ok} of 3", "http": st.get("http")}


def f11(gw, args):
    """Wrong publish-key guesses on one keep-alive connection."""
    s = socket.create_connection(("127.0.0.1", gw.port))
    s.settimeout(2)
    guesses = answered = 0
    closed_after = None
    tail = b""
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        req = (f"POST /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer guess-{guesses}\r\n"
               f"Content-Length: 2\r\n\r\n[]").encode()
        try:
            s.sendall(req * 50)
            guesses += 50
            while answered < guesses and time.monotonic() < end:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionResetError
                window = tail + chunk
                answered += window.count(b"HTTP/1.1 401")
                tail = window[-15:].replace(b"HTTP/1.1 401", b"")
        except OSError:
            closed_after = answered
            break
    st = stats(gw.port)
    return {"attack": "f11", "seconds": args.seconds, "guesses_sent": guesses,
            "answered_401": answered, "guesses_per_s": round(answered / args.seconds),
            "connection_closed_after_answers": closed_after, "publish_stats": st.get("publish"),
            "log_lines_about_key": sum("publish key" in l for l in gw.stderr_lines)}


def fdlimit(gw, args):
    """Hold connections past `ulimit -n`, count warnings, see what new clients get."""
    held, statuses = [], {}
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.seconds:
        try:
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=1)
            s.settimeout(1)
            s.sendall(upgrade_raw(f"fd-{len(held)}"))
            data = s.recv(4096)
            code = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1") else "eof"
        except socket.timeout:
            code = "timeout"
        except OSError as e:
            code = type(e).__name__
        statuses[code] = statuses.get(code, 0) + 1
        held.append(s)
        if len(held) > 4 * args.nofile:
            time.sleep(0.05)
    health = None
    for s in held[:20]:
        s.close()
    time.sleep(0.3)
    try:
        status, body, _ = get(gw.port, "/health", timeout=3)
        health = json.loads(body) if status else None
    except (OSError, ValueError):
        pass
    for s in held:
        s.close()
    warn = sum("accept failed" in l for l in gw.stderr_lines)
    return {"attack": "fdlimit", "nofile": args.nofile, "seconds": args.seconds,
            "clients": len(held), "answers": statuses, "accept_failed_lines": warn,
            "health_after": health,
            "start_warning": [l for l in gw.stderr_lines if "open-file limit" in l][:1]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True)
    sub = p.add_subparsers(dest="attack", required=True)
    a = sub.add_parser("f1")
    a.add_argument("--seconds", type=float, default=10)
    a.add_argument("--path", default="/metrics")
    a = sub.add_parser("f2-nokey")
    a.add_argument("--conns", type=int, default=300)
    a = sub.add_parser("f2-idle")
    a.add_argument("--nofile", type=int, default=256)
    a.add_argument("--idle", type=int, default=400)
    a = sub.add_parser("f11")
    a.add_argument("--seconds", type=float, default=2)
    a = sub.add_parser("fdlimit")
    a.add_argument("--nofile", type=int, default=64)
    a.add_argument("--seconds", type=float, default=20)
    args = p.parse_args()
    nofile = getattr(args, "nofile", None)
    extra = ["--max-connections", "10"] if args.attack == "f2-nokey" else []
    gw = Gateway(args.bin, extra, nofile)
    try:
        fn = {"f1": f1, "f2-nokey": f2_nokey, "f2-idle": f2_idle, "f11": f11, "fdlimit": fdlimit}
        result = fn[args.attack](gw, args)
        result["bin"] = args.bin
        print(json.dumps(result, indent=1))
    finally:
        gw.stop()


if __name__ == "__main__":
    sys.exit(main())
