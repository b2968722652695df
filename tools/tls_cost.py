#!/usr/bin/env python3
"""The gateway's CPU per delivered frame, plain and over TLS, side by side.

Starts `target/release/agentwire serve` (plain, or with --tls CERT KEY), opens --conns
WebSocket sessions (one user each) with Python's asyncio `websockets`, publishes
--events events per user through the publish API (batches of up to 1,000, over the same
scheme as the sessions), waits until every session received all of its events, and
prints the gateway's CPU time (user + system, from /proc/PID/stat) over that window
divided by the frames delivered. The clients are slow (Python); the figure is the
gateway's own CPU per frame, which does not depend on how fast the clients read.

    python3 tools/tls_cost.py --conns 50 --events 2000
    python3 tools/tls_cost.py --conns 50 --events 2000 --tls /tmp/c.pem /tmp/k.pem

CERT must list IP 127.0.0.1 in its subjectAltName (see tools/idle_hold.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request

import jwt
from websockets.asyncio.client import connect

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from gateway_proc import free_port, stop, wait_healthy  # noqa: E402  (tools/lib/gateway_proc.py)



def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


async def receive(ws, want: int, got: list, i: int) -> None:
    while got[i] < want:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if msg.get("type") == "agent_thinking":
            got[i] += 1


def publish(base: str, key: str, events: list, ctx) -> None:
    body = json.dumps(events).encode()
    req = urllib.request.Request(f"{base}/api/events", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
        if r.status != 202:
            raise RuntimeError(f"publish answered {r.status}")


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--events", type=int, default=2000, help="events per user")
    ap.add_argument("--payload", type=int, default=100, help="bytes of data per event")
    ap.add_argument("--binary", default="target/release/agentwire")
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    args = ap.parse_args()

    secret = "tls-cost-" + os.urandom(16).hex()
    key = "tls-cost-key-" + os.urandom(8).hex()
    port = free_port()
    cmd = [args.binary, "serve", "--listen", f"127.0.0.1:{port}", "--jwt-secret", secret,
           "--publish-key", key, "--demo-agent", "false", "--replay-events", "0"]
    ctx = None
    scheme, ws_scheme = "http", "ws"
    if args.tls:
        cmd += ["--tls-cert-file", args.tls[0], "--tls-key-file", args.tls[1]]
        ctx = ssl.create_default_context(cafile=args.tls[0])
        scheme, ws_scheme = "https", "wss"
    base = f"{scheme}://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RUST_LOG": "warn"})
    try:
        if not wait_healthy(base, ctx):
            print("gateway did not start", file=sys.stderr)
            return 1
        users = [f"cost-{i}" for i in range(args.conns)]
        socks = []
        for u in users:
            tok = jwt.encode({"sub": u, "exp": int(time.time()) + 3600}, secret, algorithm="HS256")
            ws = await connect(f"{ws_scheme}://127.0.0.1:{port}/ws", ssl=ctx, compression=None,
                               additional_headers={"Authorization": f"Bearer {tok}"},
                               ping_interval=None, max_queue=None)
            json.loads(await ws.recv())  # connected
            socks.append(ws)
        got = [0] * len(socks)
        receivers = [asyncio.create_task(receive(ws, args.events, got, i)) for i, ws in enumerate(socks)]
        data = {"t": "x" * args.payload}
        batches = []
        batch = []
        for n in range(args.events):
            for u in users:
                batch.append({"type": "agent_thinking", "user_id": u, "run_id": f"r-{n // 500}",
                              "agent_name": "cost", "data": data})
                if len(batch) == 1000:
                    batches.append(batch)
                    batch = []
        if batch:
            batches.append(batch)
        cpu0, t0 = cpu_s(proc.pid), time.monotonic()
        loop = asyncio.get_running_loop()
        for b in batches:
            await loop.run_in_executor(None, publish, base, key, b, ctx)
        await asyncio.gather(*receivers)
        cpu1, t1 = cpu_s(proc.pid), time.monotonic()
        frames = sum(got)
        print(f"{'TLS' if args.tls else 'plain'}: {frames} frames to {len(socks)} sessions in "
              f"{t1 - t0:.1f} s; gateway CPU {cpu1 - cpu0:.2f} s = "
              f"{(cpu1 - cpu0) / frames * 1e6:.2f} us per frame (publish parsing and routing included)")
        for ws in socks:
            ws.transport.abort()
        return 0
    finally:
        stop(proc, 10)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
