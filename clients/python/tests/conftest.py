"""Fixtures: the REAL gateway binary (AGENTWIRE_BIN, default target/release/agentwire)
on a free port in 20000-29999, and a WebSocket client of a user (websockets' sync
client, token minted with PyJWT HS256) to see what the gateway delivers.

Every test has a timeout (pytest-timeout, 60 s by default in pyproject.toml); every
wait here has its own deadline too.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

import jwt
import pytest
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[3]
JWT_SECRET = "pyclient-test-secret-0123456789abcdef"
PUBLISH_KEY = "pyclient-publish-key-0123"


def binary() -> str:
    b = os.environ.get("AGENTWIRE_BIN", str(ROOT / "target/release/agentwire"))
    if not os.path.isabs(b):
        b = str(ROOT / b)
    if not os.access(b, os.X_OK):
        pytest.fail(f"no gateway binary at {b} (cargo build --release, or set AGENTWIRE_BIN)")
    return b


def free_port() -> int:
    for _ in range(200):
        port = random.randint(20000, 29999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-29999")


class Gateway:
    """One gateway process; ``start()`` may be called late (port chosen up front)."""

    def __init__(self, tmp: Path, *flags: str, port: Optional[int] = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        self.flags = list(flags)
        self.log = tmp / f"gateway-{self.port}.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 10.0) -> "Gateway":
        cmd = [
            binary(), "serve",
            "--listen", f"127.0.0.1:{self.port}",
            "--jwt-secret", JWT_SECRET,
            "--publish-key", PUBLISH_KEY,
            *self.flags,
        ]
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"gateway did not answer /health within {timeout} s")

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/ws/stats", timeout=5) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def token(user: str, ttl_s: int = 600) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + ttl_s}, JWT_SECRET, algorithm="HS256")


class Client:
    """A user's WebSocket: ``connected`` (the first frame) and ``events(n)``."""

    def __init__(self, gw: Gateway, user: str, query: str = "") -> None:
        self.ws = connect(gw.ws_url + (f"?{query}" if query else ""),
                          additional_headers={"Authorization": f"Bearer {token(user)}"},
                          open_timeout=5, max_size=None)
        self.connected = json.loads(self.ws.recv(timeout=5))
        assert self.connected["type"] == "connected", self.connected
        self.held: list[dict] = []  # events read while waiting for another frame

    def frame(self, kind: str, timeout: float = 20.0) -> dict:
        """The next frame of type `kind` (ack, pong, ...) or an ``error``, whichever comes
        first; events read meanwhile are kept for ``events``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            frame = json.loads(self.ws.recv(timeout=left))
            if "seq" in frame:
                self.held.append(frame)
            elif frame.get("type") in (kind, "error"):
                return frame
        raise AssertionError(f"no {kind} frame within {timeout} s")

    def events(self, n: int, timeout: float = 20.0) -> list[dict]:
        """The next n events (gateway frames other than events are skipped)."""
        out: list[dict] = self.held[:n]
        del self.held[:n]
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"got {len(out)} of {n} events: {out[-3:]}")
            frame = json.loads(self.ws.recv(timeout=left))
            if "seq" in frame:
                out.append(frame)
        return out

    def quiet(self, wait: float = 0.3) -> list[dict]:
        """Events arriving within `wait` seconds (to check nothing more came)."""
        out = []
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                frame = json.loads(self.ws.recv(timeout=left))
            except TimeoutError:
                break
            if "seq" in frame:
                out.append(frame)
        return out

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def gateway_factory(tmp_path):
    started: list[Gateway] = []

    def make(*flags: str, port: Optional[int] = None, start: bool = True) -> Gateway:
        gw = Gateway(tmp_path, *flags, port=port)
        started.append(gw)
        return gw.start() if start else gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture
def gateway(gateway_factory) -> Gateway:
    return gateway_factory()


@pytest.fixture
def client_factory(gateway):
    clients: list[Client] = []

    def make(user: str, gw: Optional[Gateway] = None, query: str = "") -> Client:
        c = Client(gw or gateway, user, query)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


class RequestLog:
    """Wraps httpx's transport to record each POST attempt: its events, and the runs in
    flight, to check that no two requests carrying one run are ever in flight at once.
    Connection failures count as attempts too (``attempts``)."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.bodies: list[list[dict]] = []
        self.raw: list[bytes] = []
        self.in_flight: dict[tuple, int] = {}
        self.overlaps: list[tuple] = []
        self.max_parallel = 0
        self.parallel = 0
        self.statuses: list[Any] = []
        self.local_addrs: list[Any] = []  # the client side of each answered request's TCP connection

    def start(self, request: Any) -> set:
        body = json.loads(request.content)
        runs = {(e["user_id"], e["run_id"]) for e in body}
        with self.lock:
            self.bodies.append(body)
            self.raw.append(request.content)
            for r in runs:
                if self.in_flight.get(r):
                    self.overlaps.append(r)
                self.in_flight[r] = self.in_flight.get(r, 0) + 1
            self.parallel += 1
            self.max_parallel = max(self.max_parallel, self.parallel)
        return runs

    def done(self, runs: set, status: Any) -> None:
        with self.lock:
            for r in runs:
                self.in_flight[r] -= 1
            self.parallel -= 1
            self.statuses.append(status)

    def client(self) -> Any:
        import httpx

        log = self

        class Transport(httpx.HTTPTransport):
            def handle_request(self, request):
                runs = log.start(request)
                status: Any = "error"
                try:
                    resp = super().handle_request(request)
                    status = resp.status_code
                    log.local_addrs.append(resp.extensions["network_stream"].get_extra_info("client_addr"))
                    return resp
                finally:
                    log.done(runs, status)

        return httpx.Client(transport=Transport(), timeout=10)

    def async_client(self) -> Any:
        import httpx

        log = self

        class Transport(httpx.AsyncHTTPTransport):
            async def handle_async_request(self, request):
                runs = log.start(request)
                status: Any = "error"
                try:
                    resp = await super().handle_async_request(request)
                    status = resp.status_code
                    return resp
                finally:
                    log.done(runs, status)

        return httpx.AsyncClient(transport=Transport(), timeout=10)
