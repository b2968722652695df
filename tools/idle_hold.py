#!/usr/bin/env python3
"""Hold N idle authenticated WebSocket connections to a gateway and report its memory.

Starts `target/release/agentwire serve` (or uses --pid/--port of a running one), opens N
connections for U users (tokens minted with PyJWT), waits for every `connected` frame,
then samples the gateway's VmRSS from /proc and prints the time to open them and the
resident memory per connection (RSS after minus RSS before, divided by N).

    python3 tools/idle_hold.py --conns 10000 --users 3400

With --tls CERT KEY the gateway serves TLS (tls_cert_file / tls_key_file) and the clients
connect with wss:// trusting CERT (its subjectAltName must list IP 127.0.0.1), so the
figure is the memory of an idle TLS connection, measured the same way:

    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout /tmp/k.pem -out /tmp/c.pem -days 1 -subj /CN=localhost \
        -addext subjectAltName=DNS:localhost,IP:127.0.0.1
    python3 tools/idle_hold.py --conns 10000 --users 10000 --tls /tmp/c.pem /tmp/k.pem
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import ssl
import subprocess
import sys
import time
import urllib.request

import jwt
from websockets.asyncio.client import connect

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from gateway_proc import free_port, stop, wait_healthy  # noqa: E402  (tools/lib/gateway_proc.py)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def open_one(url: str, token: str, sem: asyncio.Semaphore, held: list, failures: list,
                   tls: ssl.SSLContext | None = None) -> None:
    async with sem:
        try:
            ws = await connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                               ping_interval=None, open_timeout=30, compression=None,
                               max_queue=4, ssl=tls)
            first = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if first.get("type") != "connected":
                failures.append(f"first frame {first.get('type')}")
            held.append(ws)
        except Exception as e:  # noqa: BLE001 - counted and reported
            failures.append(repr(e))


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--users", type=int, default=0, help="default: conns/3 (3 connections per user)")
    ap.add_argument("--hold-s", type=float, default=3.0, help="seconds to hold before sampling")
    ap.add_argument("--binary", default="target/release/agentwire")
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--json", action="store_true", help="print a JSON record too")
    ap.add_argument("--time-v", action="store_true",
                    help="run the gateway under /usr/bin/time -v and report its maximum RSS too")
    ap.add_argument("--gateway-arg", action="append", default=[],
                    help="extra argument for `agentwire serve` (repeatable), e.g. --gateway-arg=--heartbeat-interval-ms=1000")
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"),
                    help="serve TLS with this certificate and key; clients use wss:// and trust CERT")
    args = ap.parse_args()
    tls = None
    scheme, ws_scheme = "http", "ws"
    if args.tls:
        tls = ssl.create_default_context(cafile=args.tls[0])
        scheme, ws_scheme = "https", "wss"
        args.gateway_arg += ["--tls-cert-file", args.tls[0], "--tls-key-file", args.tls[1]]
    users = args.users or max(1, (args.conns + 2) // 3)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    secret = "idle-hold-" + os.urandom(16).hex()
    port = free_port()
    log = open("/tmp/agentwire-idle-hold.log", "w")
    cmd = [args.binary, "serve", "--listen", f"127.0.0.1:{port}", "--jwt-secret", secret,
           "--max-connections", str(args.conns + 10), "--demo-agent", "false", *args.gateway_arg]
    if args.time_v:
        cmd = ["/usr/bin/time", "-v", *cmd]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn"},
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)))
    try:
        if not wait_healthy(f"{scheme}://127.0.0.1:{port}", tls):
            print("gateway did not start", file=sys.stderr)
            return 1
        gw_pid = proc.pid
        if args.time_v:  # the gateway is /usr/bin/time's child
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                gw_pid = int(f.read().split()[0])
        before = rss_kib(gw_pid)
        tokens = [jwt.encode({"sub": f"idle-{u}", "exp": int(time.time()) + 3600}, secret, algorithm="HS256")
                  for u in range(users)]
        url = f"{ws_scheme}://127.0.0.1:{port}/ws"
        held: list = []
        failures: list = []
        sem = asyncio.Semaphore(args.concurrency)
        t0 = time.monotonic()
        await asyncio.gather(*(open_one(url, tokens[i % users], sem, held, failures, tls) for i in range(args.conns)))
        open_s = time.monotonic() - t0
        await asyncio.sleep(args.hold_s)
        after = rss_kib(gw_pid)
        stats = json.loads(urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/ws/stats", timeout=5, context=tls).read())
        t_stats = time.monotonic()
        await asyncio.sleep(args.hold_s)
        stats2 = json.loads(urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/ws/stats", timeout=5, context=tls).read())
        window_us = (time.monotonic() - t_stats) * 1e6
        timer_us = stats2["timers"]["handling_us"] - stats["timers"]["handling_us"]
        busy_us = stats2["loop"]["busy_us"] - stats["loop"]["busy_us"]
        fired = stats2["timers"]["fired"] - stats["timers"]["fired"]
        per_conn = (after - before) * 1024 / max(1, len(held))
        record = {
            "connections": len(held), "users": users, "failed": len(failures),
            "open_s": round(open_s, 2), "conns_per_s": round(len(held) / open_s, 1) if open_s else None,
            "rss_before_kib": before, "rss_after_kib": after,
            "bytes_per_connection": round(per_conn),
            "gateway_open": stats["connections"]["open"],
            "timers_armed": stats2["timers"]["armed"],
            "timers_fired_per_s": round(fired / (window_us / 1e6), 1),
            "timer_handling_share": round(timer_us / window_us, 5),
            "loop_busy_share": round(busy_us / window_us, 5),
        }
        print(f"held {len(held)} idle connections ({users} users, {len(failures)} failed) "
              f"opened in {open_s:.2f} s ({record['conns_per_s']} conn/s)")
        print(f"gateway RSS {before} KiB -> {after} KiB: {per_conn:.0f} bytes per connection; "
              f"/ws/stats connections.open = {record['gateway_open']}")
        print(f"over {window_us / 1e6:.1f} s: {record['timers_fired_per_s']} timers fired/s, "
              f"{record['timers_armed']} armed; timer handling {timer_us / 1000:.1f} ms "
              f"({record['timer_handling_share'] * 100:.3f} % of wall time), loop busy "
              f"{record['loop_busy_share'] * 100:.3f} %")
        if failures:
            print("first failures:", failures[:3])
        if args.json:
            print(json.dumps(record))
        for ws in held:
            ws.transport.abort()
        return 0 if not failures else 1
    finally:
        stop(proc, 10, pid=gw_pid if args.time_v else None)
        if args.time_v:
            log.flush()
            for line in open("/tmp/agentwire-idle-hold.log"):
                if "Maximum resident set size" in line or "Elapsed (wall clock)" in line or "Exit status" in line:
                    print("/usr/bin/time -v:", line.strip())


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
