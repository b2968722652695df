"""Throughput of the inbound webhook (PROTOCOL.md section 6b; src/webhook/): how many
`user_message`s a second the gateway turns into POSTs to `inbound_url` and `ack`s.

    target/pyclient-venv/bin/python tools/webhook_bench.py [--bin target/release/agentwire]
        [--clients 10] [--messages 500] [--window 32]

Starts the gateway binary with --inbound-url pointing at an endpoint in this process
(stdlib ThreadingHTTPServer, HTTP/1.1 keep-alive, answers 204 at once, counts accepted
connections), opens --clients WebSocket connections (one user each) and has each send
--messages `user_message`s, at most --window unacked at a time. Prints messages/s
(first send to last ack), ack latency percentiles (send to ack, as the client sees it),
the endpoint's request and connection counts, and the gateway's webhook stats.

Needs websockets and PyJWT (target/pyclient-venv has both: bash tools/test_python.sh
makes it). The endpoint is Python, so it is likely the bottleneck: the figure is a floor
for the gateway's side, not its ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[1]
SECRET = "webhook-bench-secret-0123456789abcdef"
KEY = "webhook-bench-inbound-key-0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Endpoint(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests = 0
    connections = 0
    lock = threading.Lock()

    def setup(self) -> None:
        super().setup()
        with Endpoint.lock:
            Endpoint.connections += 1

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        with Endpoint.lock:
            Endpoint.requests += 1
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def client(port: int, user: str, n: int, window: int, lat: list, barrier: threading.Barrier) -> None:
    tok = jwt.encode({"sub": user, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    with connect(f"ws://127.0.0.1:{port}/ws", additional_headers={"Authorization": f"Bearer {tok}"},
                 open_timeout=10, max_size=None) as ws:
        json.loads(ws.recv(timeout=10))  # connected
        barrier.wait()
        sent: dict[str, float] = {}
        next_i = acked = 0
        while acked < n:
            while next_i < n and len(sent) < window:
                ref = f"{user}-{next_i}"
                sent[ref] = time.perf_counter()
                ws.send(json.dumps({"type": "user_message", "text": "bench", "ref": ref}))
                next_i += 1
            f = json.loads(ws.recv(timeout=30))
            if f["type"] == "ack":
                lat.append(time.perf_counter() - sent.pop(f["ref"]))
                acked += 1
            elif f["type"] == "error":
                raise SystemExit(f"{user}: {f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bin", default=str(ROOT / "target/release/agentwire"))
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--messages", type=int, default=500)
    p.add_argument("--window", type=int, default=32)
    a = p.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{server.server_address[1]}/inbound"
    port = free_port()
    gw = subprocess.Popen(
        [a.bin, "serve", "--listen", f"127.0.0.1:{port}", "--jwt-secret", SECRET,
         "--inbound-url", hook, "--inbound-key", KEY,
         # Nobody publishes in this bench, so every acked run stays pending: lift the
         # per-user bound on pending runs for the measurement.
         "--max-pending-runs-per-user", "1000000", "--max-connections-per-user", "1000"],
        env=dict(os.environ, RUST_LOG="warn"), stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("gateway did not start")
                time.sleep(0.05)
        lat: list[float] = []
        barrier = threading.Barrier(a.clients + 1)
        threads = [threading.Thread(target=client, args=(port, f"bench-{i}", a.messages, a.window, lat, barrier))
                   for i in range(a.clients)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        took = time.perf_counter() - t0
        total = a.clients * a.messages
        lat.sort()

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ws/stats", timeout=5) as r:
            stats = json.loads(r.read())
        print(f"{total} user_messages from {a.clients} clients (window {a.window}) in {took:.2f} s: "
              f"{total / took:.0f} messages/s acked")
        print(f"ack latency ms: p50 {pct(0.5):.2f}  p99 {pct(0.99):.2f}  max {lat[-1] * 1000:.2f}")
        print(f"endpoint: {Endpoint.requests} requests over {Endpoint.connections} TCP connections")
        print(f"gateway webhook stats: {json.dumps(stats['webhook'])}")
        print(f"gateway loop iteration us: {json.dumps(stats['loop']['iteration_us'])}")
    finally:
        gw.terminate()
        gw.wait(10)
        server.shutdown()


if __name__ == "__main__":
    main()
