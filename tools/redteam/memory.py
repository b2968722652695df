#!/usr/bin/env python3
"""Red-team measurements of issue 9 rows F5-F7 (memory engine state), stdlib only.

Starts a gateway binary on a random loopback port, attacks it, and prints one JSON
object of figures: the gateway's RSS (from /proc/PID/status), its /ws/stats, the
`connected` frame size and how long it took, and another user's ping latency.

  python3 tools/redteam/memory.py --bin /work/v1/agentwire runs       # F5 before
  python3 tools/redteam/memory.py --bin target/release/agentwire runs # F5 after
  ... replay   (F6)   ... users   (F7)

  runs:   publish never-ending runs (agent_started, batches of 1000) to --users users
          until --runs runs were sent; RSS, the first user's connected frame (size,
          time), then every run times out together (--run-idle-timeout-ms) while
          another user pings: its worst pong time.
  replay: publish --events events of --event-kib KiB to --users users; RSS and kept
          bytes; then an online user's events older than replay_ttl_ms: resumed?
  users:  publish to distinct user ids for --seconds; RSS and users known, then again
          after replay_ttl_ms.
"""

import argparse
import base64
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time

SECRET = "redteam-memory-secret-0123456789abcdef"
KEY = "redteam-memory-publish-key-0123456789"


from common import hs256  # noqa: E402  (tools/redteam/common.py)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from gateway_proc import stop as stop_gateway  # noqa: E402  (tools/lib/gateway_proc.py)


def token(sub):
    return hs256({"sub": sub, "exp": int(time.time()) + 3600}, SECRET)


class Gateway:
    def __init__(self, binary, settings):
        self.port = random.randint(20000, 29999)
        args = [binary, "--listen", f"127.0.0.1:{self.port}", "--jwt-secret", SECRET,
                "--publish-key", KEY, "--demo-agent", "false"]
        for k, v in settings.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                self.get("/health")
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("gateway did not start")

    def stop(self):
        stop_gateway(self.proc, 10)

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
        return None

    def request(self, raw, timeout=60):
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(raw)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def get(self, path):
        return self.request(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                            .encode(), timeout=5)

    def stats(self):
        return json.loads(self.get("/ws/stats")[1])

    def publish(self, events):
        body = json.dumps(events).encode()
        head = (f"POST /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        status, answer = self.request(head + body)
        return status, answer


class Ws:
    """A minimal WebSocket client: the upgrade, unmasked server frames, masked sends."""

    def __init__(self, gw, user, query=""):
        self.s = socket.create_connection(("127.0.0.1", gw.port), timeout=120)
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall((f"GET /ws{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token(user)}"
                        "\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise OSError("closed during upgrade")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise OSError(head.split(b"\r\n")[0].decode())

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.s.recv(1 << 20)
            if not chunk:
                raise OSError("closed")
            self.buf += chunk

    def frame(self):
        self._need(2)
        op, ln = self.buf[0] & 0x0F, self.buf[1] & 0x7F
        at = 2
        if ln == 126:
            self._need(4)
            ln, at = struct.unpack(">H", self.buf[2:4])[0], 4
        elif ln == 127:
            self._need(10)
            ln, at = struct.unpack(">Q", self.buf[2:10])[0], 10
        self._need(at + ln)
        payload, self.buf = self.buf[at:at + ln], self.buf[at + ln:]
        return op, payload

    def text(self):
        while True:
            op, payload = self.frame()
            if op == 1:
                return payload
            if op == 8:
                raise OSError(f"close {payload[:2].hex()}")

    def send(self, obj):
        data = json.dumps(obj).encode()
        mask = os.urandom(4)
        head = bytes([0x81])
        if len(data) < 126:
            head += bytes([0x80 | len(data)])
        else:
            head += bytes([0x80 | 126]) + struct.pack(">H", len(data))
        self.s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


def ev(kind, user, run, data=None):
    return {"type": kind, "user_id": user, "run_id": run, "agent_name": "rt",
            "data": data or {}}


def loop_max(s):
    return s.get("loop", {}).get("iteration_us", {}).get("max")


def attack_runs(gw, a):
    t0 = time.time()
    sent = refused = 0
    while sent < a.runs:
        batch = [ev("agent_started", f"rt-u{(sent + i) % a.users}", f"run-{sent + i}")
                 for i in range(min(a.batch, a.runs - sent))]
        status, _ = gw.publish(batch)
        if status == 429:
            refused += len(batch)
        elif status != 202:
            raise SystemExit(f"publish answered {status}")
        sent += len(batch)
    took = time.time() - t0
    s = gw.stats()
    out = {"runs_sent": sent, "runs_refused": refused, "publish_s": round(took, 2),
           "runs_active": s["runs"]["active"], "rss_mib": gw.rss_mib()}
    t1 = time.time()
    w = Ws(gw, "rt-u0")
    connected = w.text()
    out["connected_bytes"] = len(connected)
    out["connected_s"] = round(time.time() - t1, 3)
    out["connected_runs_listed"] = len(json.loads(connected).get("active_runs", []))
    out["loop_max_us_after_connect"] = loop_max(gw.stats())
    w.s.close()
    # Every run times out together: another user's pong time meanwhile (no stats
    # request in the window, so every stall is seen by the pings).
    other = Ws(gw, "rt-other")
    other.text()
    worst = 0.0
    deadline = t0 + a.run_idle_timeout_ms / 1000 + 4
    while time.time() < deadline:
        t = time.time()
        other.send({"type": "ping"})
        while json.loads(other.text()).get("type") != "pong":
            pass
        worst = max(worst, time.time() - t)
        time.sleep(0.02)
    out["other_user_worst_pong_ms"] = round(worst * 1000, 1)
    out["runs_active_end"] = gw.stats()["runs"]["active"]
    out["loop_max_us"] = loop_max(gw.stats())
    return out


def attack_replay(gw, a):
    blob = "b" * (a.event_kib * 1024 - 200)
    online = Ws(gw, "rt-online")
    epoch = json.loads(online.text())["epoch"]
    gw.publish([ev("agent_completed", "rt-online", "r-online")])
    online.text()
    t0 = time.time()
    for i in range(a.events):
        status, _ = gw.publish([ev("agent_completed", f"rt-u{i % a.users}", f"r{i}",
                                   {"blob": blob})])
        if status != 202:
            raise SystemExit(f"publish answered {status}")
    s = gw.stats()
    out = {"events": a.events, "event_kib": a.event_kib, "users": a.users,
           "publish_s": round(time.time() - t0, 2), "rss_mib": gw.rss_mib(),
           "replay": s.get("replay"), "budgets": s.get("budgets")}
    time.sleep(a.replay_ttl_ms / 1000 + 2.5)
    again = Ws(gw, "rt-online", f"?last_seq=0&epoch={epoch}")
    out["online_user_resumed_after_ttl"] = json.loads(again.text())["resumed"]
    out["rss_mib_after_ttl"] = gw.rss_mib()
    return out


def attack_users(gw, a):
    t0 = time.time()
    n = 0
    while time.time() - t0 < a.seconds:
        gw.publish([ev("agent_completed", f"rt-{n + i}", "r") for i in range(1000)])
        n += 1000
    s = gw.stats()
    out = {"user_ids": n, "ids_per_s": round(n / (time.time() - t0)),
           "rss_mib": gw.rss_mib(), "users_known": s["users"]["known"],
           "budgets": s.get("budgets"), "loop_max_us": loop_max(s),
           "loop_p99_us": s["loop"]["iteration_us"]["p99"]}
    time.sleep(a.replay_ttl_ms / 1000 + 2.5)
    s = gw.stats()
    out["users_known_after_ttl"] = s["users"]["known"]
    out["rss_mib_after_ttl"] = gw.rss_mib()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True)
    p.add_argument("attack", choices=["runs", "replay", "users"])
    p.add_argument("--runs", type=int, default=200_000)
    p.add_argument("--users", type=int, default=1)
    p.add_argument("--batch", type=int, default=1000, help="events per publish (runs)")
    p.add_argument("--events", type=int, default=300)
    p.add_argument("--event-kib", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--run-idle-timeout-ms", type=int, default=20_000)
    p.add_argument("--replay-ttl-ms", type=int, default=5_000)
    p.add_argument("--set", action="append", default=[],
                   help="extra setting NAME=VALUE for the gateway")
    a = p.parse_args()
    settings = {"run_idle_timeout_ms": a.run_idle_timeout_ms,
                "replay_ttl_ms": a.replay_ttl_ms,
                "max_publish_bytes": 8 << 20}
    for kv in a.set:
        k, _, v = kv.partition("=")
        settings[k] = v
    gw = Gateway(a.bin, settings)
    try:
        out = {"bin": a.bin, "attack": a.attack, "rss_mib_start": gw.rss_mib()}
        out.update({"runs": attack_runs, "replay": attack_replay,
                    "users": attack_users}[a.attack](gw, a))
    finally:
        gw.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
