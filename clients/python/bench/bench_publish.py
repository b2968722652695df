"""Publish-path benchmark: events/s and emit-to-receive latency through
agentwire_worker (sync threads and asyncio tasks) at 1, 10 and 100 concurrent runs,
against a baseline posting one event per request (httpx.Client with keep-alive, one
thread per run: what a hand-written worker does).

    python clients/python/bench/bench_publish.py [--bin target/release/agentwire] [--events 20000]

It starts the real gateway on a free port, connects one WebSocket of the user, and
times each event from the emit call (the event's data carries time.time()) to its
arrival on the WebSocket. Every run is bounded (a deadline per configuration). Prints
one table row per configuration: | client | runs | events received/expected |
events/s | p50 ms | p99 ms | HTTP requests |. Without --pace-ms every run emits as
fast as it can (throughput; the latency then is mostly queueing behind the gateway);
with --pace-ms 10 each run emits 100 events/s (latency at a steady rate). Needs the test venv (httpx, websockets, PyJWT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import jwt
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from agentwire_worker import AsyncPublisher, Publisher  # noqa: E402

SECRET = "bench-secret-0123456789abcdef0123"
KEY = "bench-publish-key-0123"
USER = "bench"
PACE_S = 0.0  # --pace-ms: sleep between a run's emits (0: as fast as possible)


def free_port() -> int:
    while True:
        port = random.randint(20000, 29999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


class Receiver(threading.Thread):
    """Reads the user's events; records (arrival - emit) per event."""

    def __init__(self, ws_url: str, expected: int) -> None:
        super().__init__(daemon=True)
        tok = jwt.encode({"sub": USER, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
        self.ws = connect(ws_url, additional_headers={"Authorization": f"Bearer {tok}"}, max_size=None)
        self.ws.recv(timeout=5)  # connected
        self.expected = expected
        self.latencies: list[float] = []
        self.last = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        try:
            while len(self.latencies) < self.expected:
                frame = json.loads(self.ws.recv(timeout=60))
                now = time.time()
                t = frame.get("data", {}).get("t") if isinstance(frame.get("data"), dict) else None
                if t is not None:
                    self.latencies.append(now - t)
                    self.last = now
        except Exception as e:  # noqa: BLE001
            print(f"receiver stopped: {e!r}", file=sys.stderr)
        finally:
            self.done.set()
            self.ws.close()


def sync_client(url: str, runs: int, per_run: int, k0: int) -> dict:
    with Publisher(url, KEY) as pub:
        def work(k: int) -> None:
            with pub.run(USER, agent_name="bench", run_id=f"s{k0}-{k}") as run:
                for i in range(per_run):
                    run.emit("text_delta", {"i": i, "t": time.time()})
                    if PACE_S:
                        time.sleep(PACE_S)
                run.agent_completed({"t": time.time()})
        ts = [threading.Thread(target=work, args=(k,)) for k in range(runs)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return pub.stats


def async_client(url: str, runs: int, per_run: int, k0: int) -> dict:
    async def main() -> dict:
        async with AsyncPublisher(url, KEY) as pub:
            async def work(k: int) -> None:
                async with pub.run(USER, agent_name="bench", run_id=f"a{k0}-{k}") as run:
                    for i in range(per_run):
                        await run.emit("text_delta", {"i": i, "t": time.time()})
                        if PACE_S:
                            await asyncio.sleep(PACE_S)
                        elif i % 16 == 0:
                            await asyncio.sleep(0)
                    await run.agent_completed({"t": time.time()})
            await asyncio.gather(*(work(k) for k in range(runs)))
            return pub.stats
    return asyncio.run(main())


def baseline(url: str, runs: int, per_run: int, k0: int) -> dict:
    """One event per request, one thread per run, keep-alive pooled client."""
    n = [0]
    lock = threading.Lock()
    with httpx.Client(limits=httpx.Limits(max_connections=runs)) as client:
        def work(k: int) -> None:
            rid = f"b{k0}-{k}"
            for i in range(per_run + 1):
                ev = {"type": "text_delta" if i < per_run else "agent_completed", "user_id": USER,
                      "run_id": rid, "agent_name": "bench", "data": {"i": i, "t": time.time()}}
                r = client.post(url + "/api/events", json=ev, headers={"Authorization": f"Bearer {KEY}"})
                r.raise_for_status()
                if PACE_S:
                    time.sleep(PACE_S)
                with lock:
                    n[0] += 1
        ts = [threading.Thread(target=work, args=(k,)) for k in range(runs)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    return {"requests": n[0]}


def measure(name, fn, gw_url, ws_url, runs, total, k0) -> dict:
    per_run = max(1, total // runs)
    expected = runs * (per_run + 1)  # + agent_completed (carries t too)
    rx = Receiver(ws_url, expected)
    rx.start()
    t0 = time.time()
    stats = fn(gw_url, runs, per_run, k0)
    rx.done.wait(120)
    got = len(rx.latencies)
    elapsed = (rx.last or time.time()) - t0
    lat = sorted(rx.latencies)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    return {"client": name, "runs": runs, "events": got, "expected": expected,
            "events_per_s": got / elapsed if elapsed > 0 else 0, "p50_ms": p(0.50), "p99_ms": p(0.99),
            "requests": stats.get("requests")}


def main() -> None:
    ap = argparse.ArgumentParser()
    root = Path(__file__).resolve().parents[3]
    ap.add_argument("--bin", default=os.environ.get("AGENTWIRE_BIN", str(root / "target/release/agentwire")))
    ap.add_argument("--events", type=int, default=20000, help="events per configuration")
    ap.add_argument("--runs", default="1,10,100")
    ap.add_argument("--pace-ms", type=float, default=0.0, help="sleep between a run's emits (latency at a steady rate)")
    a = ap.parse_args()
    global PACE_S
    PACE_S = a.pace_ms / 1000.0
    port = free_port()
    gw = subprocess.Popen([a.bin, "serve", "--listen", f"127.0.0.1:{port}", "--jwt-secret", SECRET,
                           "--publish-key", KEY, "--max-pending-bytes", str(64 << 20),
                           "--replay-events", "100000"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.02)
        rows = []
        k0 = 0
        for runs in [int(x) for x in a.runs.split(",")]:
            for name, fn in (("agentwire_worker sync", sync_client), ("agentwire_worker asyncio", async_client),
                             ("one event per request", baseline)):
                k0 += 1
                rows.append(measure(name, fn, url, f"ws://127.0.0.1:{port}/ws", runs, a.events, k0))
                r = rows[-1]
                print(f"| {r['client']} | {r['runs']} | {r['events']}/{r['expected']} | {r['events_per_s']:.0f} | "
                      f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['requests']} |", flush=True)
        print()
        for runs in sorted({r["runs"] for r in rows}):
            base = next(r for r in rows if r["runs"] == runs and r["client"] == "one event per request")
            for r in rows:
                if r["runs"] == runs and r is not base and base["events_per_s"]:
                    print(f"{runs} runs: {r['client']} = {r['events_per_s'] / base['events_per_s']:.1f}x the baseline's events/s")
    finally:
        gw.terminate()
        gw.wait(10)


if __name__ == "__main__":
    main()
