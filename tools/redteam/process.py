#!/usr/bin/env python3
"""Issue 9, process-level rows: measure a gateway binary before/after (stdlib only).

    python3 tools/redteam/process.py BINARY [f8|f9|f10|f12|shutdown|all]

BINARY is the v1 release binary (/work/v1/agentwire) or this branch's
(target/release/agentwire). Each attack starts its own gateway on a random port in
20000-29999 and prints one JSON line of figures:

  f8        stderr is a pipe nobody reads: 1,000 refused upgrades, then 3,000 sessions
            that open and go; how many were answered, /health latency after, log lines
            dropped (stats), the "dropped" line once the pipe is read again.
  f9        100 sessions that never read (SO_RCVBUF 4 KiB) while 16 KiB events flow
            to them for 10 s: kernel TCP memory (/proc/net/sockstat), gateway RSS,
            unsent output, 1013 closes, the budgets in /ws/stats. Run twice on the new
            binary: defaults, then --max-pending-total-bytes 33554432.
  f10       SIGHUP: is the process alive, is the session still open.
  f12       a token with exp 2^63: accepted? (new binary: --jwt-max-lifetime-s 86400)
  shutdown  SIGTERM with a run in progress: frames the user gets before the 1001.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

SECRET = "redteam-process-secret-0123456789"
KEY = "redteam-process-publish-key-0123456789"


from common import hs256  # noqa: E402  (tools/redteam/common.py)


def token(sub: str, exp=None, iat=None) -> str:
    claims = {"sub": sub, "exp": exp if exp is not None else int(time.time()) + 3600}
    if iat is not None:
        claims["iat"] = iat
    return hs256(claims, SECRET)


class Gateway:
    def __init__(self, binary, extra=(), stderr=None, rust_log="info"):
        self.port = random.randint(20000, 29999)
        self.addr = ("127.0.0.1", self.port)
        args = [binary, "serve", "--listen", f"127.0.0.1:{self.port}", "--jwt-secret", SECRET,
                "--publish-key", KEY, "--demo-agent", "false",
                "--max-connections-per-user", "10000", *extra]
        env = dict(os.environ, RUST_LOG=rust_log)
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=stderr if stderr is not None else subprocess.DEVNULL,
                                     env=env)
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.http("GET", "/health", timeout=1)[0] == 200:
                return
            time.sleep(0.05)
        raise SystemExit(f"{binary} did not start")

    def http(self, method, path, body=b"", headers=(), timeout=5.0):
        try:
            s = socket.create_connection(self.addr, timeout=timeout)
            s.settimeout(timeout)
            head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            for h in headers:
                head += h + "\r\n"
            if body:
                head += f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n"
            s.sendall(head.encode() + b"\r\n" + body)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            s.close()
            status = int(data.split(b" ", 2)[1])
            return status, data.split(b"\r\n\r\n", 1)[1]
        except (OSError, ValueError, IndexError):
            return None, b""

    def stats(self):
        status, body = self.http("GET", "/ws/stats")
        return json.loads(body) if status == 200 else None

    def publish(self, events):
        return self.http("POST", "/api/events", json.dumps(events).encode(),
                         [f"Authorization: Bearer {KEY}"])[0]

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def upgrade(addr, tok, rcvbuf=None, timeout=3.0):
    """A raw WebSocket upgrade; returns (socket, status line) or (None, error)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    try:
        s.connect(addr)
        s.sendall((f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                   f"Authorization: Bearer {tok}\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(1)
            if not chunk:
                break
            head += chunk
        return s, head.split(b"\r\n", 1)[0].decode(errors="replace")
    except OSError as e:
        s.close()
        return None, str(e)


def frames(s, until_close=True, timeout=10.0):
    """Read server frames (unmasked): yields (opcode, payload) until close or timeout."""
    s.settimeout(timeout)
    buf = b""

    def need(n):
        nonlocal buf
        while len(buf) < n:
            chunk = s.recv(65536)
            if not chunk:
                raise EOFError
            buf += chunk
        out, buf = buf[:n], buf[n:]
        return out

    while True:
        try:
            b0, b1 = need(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(need(2), "big")
            elif n == 127:
                n = int.from_bytes(need(8), "big")
            payload = need(n)
        except (EOFError, OSError):
            yield (None, b"")
            return
        yield (b0 & 0x0F, payload)
        if b0 & 0x0F == 8 and until_close:
            return


def sockstat_tcp_mem_kib():
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("mem") + 1]) * 4
    return 0


def f8(binary):
    gw = Gateway(binary, stderr=subprocess.PIPE)  # never read until the end
    bad = token("f8") + "x"
    answered_refusals = 0
    t0 = time.time()
    for _ in range(1000):
        s, status = upgrade(gw.addr, bad)
        if s:
            s.close()
        if not status.startswith("HTTP/1.1 401"):
            break
        answered_refusals += 1
    answered_sessions = 0
    if answered_refusals == 1000:
        good = token("f8")
        for _ in range(3000):
            s, status = upgrade(gw.addr, good)
            if s:
                s.close()
            if not status.startswith("HTTP/1.1 101"):
                break
            answered_sessions += 1
    attack_s = time.time() - t0
    t = time.time()
    health = gw.http("GET", "/health", timeout=5)[0]
    health_ms = (time.time() - t) * 1000
    st = gw.stats() or {}
    dropped = st.get("log", {}).get("lines_dropped")
    # The log shipper comes back: read the pipe for 3 s.
    os.set_blocking(gw.proc.stderr.fileno(), False)
    text = b""
    end = time.time() + 3
    while time.time() < end:
        try:
            chunk = gw.proc.stderr.read(65536)
        except BlockingIOError:
            chunk = None
        if chunk:
            text += chunk
        else:
            time.sleep(0.05)
    lines = text.decode(errors="replace").splitlines()
    gw.stop()
    return {"row": "F8", "refusals_answered": answered_refusals, "sessions_answered": answered_sessions,
            "attack_s": round(attack_s, 2), "health_status": health, "health_ms": round(health_ms, 1),
            "log_lines_dropped_stat": dropped,
            "refusal_lines_written": sum("refused status=401" in l for l in lines),
            "dropped_line": next((l for l in lines if "log lines dropped" in l), None)}


def f9(binary, extra=()):
    gw = Gateway(binary, extra=extra)
    mem0 = sockstat_tcp_mem_kib()
    rss0 = gw.rss_kib()
    user = "f9-victim"
    socks = []
    for _ in range(100):
        s, status = upgrade(gw.addr, token(user), rcvbuf=4096)
        assert status.startswith("HTTP/1.1 101"), status
        socks.append(s)
    blob = "x" * 16384
    peak_mem = peak_rss = peak_pending = 0
    end = time.time() + 10
    n = 0
    first_run = {"type": "agent_started", "user_id": user, "run_id": "r-f9", "agent_name": "a", "data": {}}
    gw.publish([first_run])
    while time.time() < end:
        batch = [{"type": "agent_thinking", "user_id": user, "run_id": "r-f9", "agent_name": "a",
                  "data": {"i": n + i, "blob": blob}} for i in range(50)]
        gw.publish(batch)
        n += 50
        st = gw.stats() or {}
        peak_pending = max(peak_pending, st.get("bytes", {}).get("pending_out", 0))
        peak_mem = max(peak_mem, sockstat_tcp_mem_kib())
        peak_rss = max(peak_rss, gw.rss_kib())
        time.sleep(0.1)
    st = gw.stats() or {}
    closed = st.get("connections", {}).get("closed_by_reason", {})
    out = {"row": "F9", "extra": list(extra), "sessions": 100, "events": n,
           "kernel_tcp_mem_mib": [round(mem0 / 1024, 1), round(peak_mem / 1024, 1)],
           "rss_mib": [round(rss0 / 1024, 1), round(peak_rss / 1024, 1)],
           "peak_pending_out_mib": round(peak_pending / 2**20, 1),
           "closed_1013_slow": closed.get("slow_consumer", 0),
           "closed_1013_total_budget": closed.get("pending_total_budget", 0),
           "open_after": st.get("connections", {}).get("open"),
           "budgets": st.get("budgets")}
    for s in socks:
        s.close()
    gw.stop()
    return out


def f10(binary):
    gw = Gateway(binary)
    s, status = upgrade(gw.addr, token("f10"))
    gw.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    alive = gw.proc.poll() is None
    # The session: EOF means it was dropped (the connected frame may still be unread).
    s.settimeout(0.5)
    session_open = True
    try:
        while True:
            if not s.recv(65536):
                session_open = False
                break
    except socket.timeout:
        pass
    except OSError:
        session_open = False
    health = gw.http("GET", "/health", timeout=2)[0] if alive else None
    gw.stop()
    return {"row": "F10", "alive_after_sighup": alive, "session_open": session_open,
            "health": health, "exit": gw.proc.returncode}


def f12(binary, extra=()):
    gw = Gateway(binary, extra=extra)
    s, status = upgrade(gw.addr, token("f12", exp=2**63))
    if s:
        s.close()
    gw.stop()
    return {"row": "F12", "extra": list(extra), "exp_2^63_upgrade": status}


def shutdown(binary):
    gw = Gateway(binary)
    s, status = upgrade(gw.addr, token("sd"))
    gw.publish([{"type": "agent_started", "user_id": "sd", "thread_id": "t1", "run_id": "r-sd",
                 "agent_name": "a", "data": {}}])
    time.sleep(0.3)
    gw.proc.send_signal(signal.SIGTERM)
    got = []
    for op, payload in frames(s, timeout=8):
        if op == 1:
            got.append(json.loads(payload).get("type"))
        elif op == 8:
            got.append(f"close {int.from_bytes(payload[:2], 'big')}")
        elif op is None:
            got.append("EOF")
    gw.proc.wait(timeout=10)
    return {"row": "shutdown", "frames": got}


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    binary = sys.argv[1]
    which = sys.argv[2] if len(sys.argv) > 2 else "all"
    new = "--jwt-max-lifetime-s" in subprocess.run([binary, "--help"], capture_output=True,
                                                    text=True).stdout
    runs = {
        "f8": lambda: [f8(binary)],
        "f9": lambda: [f9(binary)] + ([f9(binary, ("--max-pending-total-bytes", "33554432"))] if new else []),
        "f10": lambda: [f10(binary)],
        "f12": lambda: [f12(binary)] + ([f12(binary, ("--jwt-max-lifetime-s", "86400"))] if new else []),
        "shutdown": lambda: [shutdown(binary)],
    }
    for name, run in runs.items():
        if which in (name, "all"):
            for result in run():
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
