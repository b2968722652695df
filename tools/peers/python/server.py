"""peer-python: a comparison peer for agentwire, written the way a Python team would on
asyncio: the `websockets` library's protocol engine for the WebSocket, PyJWT for HS256,
a dict from user id to that user's connections, and a direct (non-blocking) write to
each recipient's transport.

Why websockets' sans-I/O `ServerProtocol` on asyncio streams instead of
`websockets.asyncio.server.serve`: the publish API shares the WebSocket port, and
websockets' own server refuses every request that is not a GET. The engine is the same
one its asyncio server runs on; the HTTP front (health, publish, upgrade routing) is a
few lines here.

It speaks the subset of agentwire's protocol (docs/PROTOCOL.md) that the load generator
uses, and nothing more:
- GET /ws upgrade with a JWT (HS256) from `Authorization: Bearer` or `?token=`; 401
  `invalid_token` before the upgrade otherwise;
- first frame `connected` (connection_id, user_id, mode, thread_id, epoch, last_seq,
  resumed), then the user's events as
  {"type","seq","user_id","thread_id","run_id","agent_name","ts","data"} with a per-user
  seq from 1;
- POST /api/events with `Authorization: Bearer <publish_key>`: one event or an array of
  at most 1000; 202 {"accepted":N}, 400 bad_event with the index, 401, 413;
- GET /health.
Not implemented: resume/replay, runs, heartbeats, client messages, limits. A connection
with more than 1 MiB unsent is closed with 1013 (agentwire's slow-consumer rule).

Settings: --listen HOST:PORT (default 127.0.0.1:8080), AGENTWIRE_JWT_SECRET (or
--jwt-secret), AGENTWIRE_PUBLISH_KEY (or --publish-key). Stops on SIGTERM / SIGINT.
"""

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import socket
import sys
import time
from urllib.parse import parse_qs, urlsplit

import jwt
from websockets.frames import CloseCode, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
MAX_BATCH = 1000
MAX_PENDING = 1024 * 1024
MAX_MESSAGE = 64 * 1024
TYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
DUMPS = json.JSONEncoder(separators=(",", ":")).encode

REASONS = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    411: "Length Required",
    413: "Payload Too Large",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
}


class User:
    __slots__ = ("seq", "conns")

    def __init__(self):
        self.seq = 0
        self.conns = set()


class Conn:
    """An open WebSocket: the protocol engine and the transport it writes to."""

    __slots__ = ("protocol", "writer")

    def __init__(self, protocol, writer):
        self.protocol = protocol
        self.writer = writer

    def flush(self):
        for chunk in self.protocol.data_to_send():
            if chunk:
                self.writer.write(chunk)
            elif self.writer.can_write_eof():
                self.writer.write_eof()

    def send(self, frame: bytes) -> bool:
        """Queue one text frame; False when the connection is closing or too slow."""
        if self.protocol.state is not State.OPEN:
            return False
        if self.writer.transport.get_write_buffer_size() > MAX_PENDING:
            self.protocol.send_close(CloseCode.TRY_AGAIN_LATER, "slow consumer")
            self.flush()
            return False
        self.protocol.send_text(frame)
        self.flush()
        return True


class Hub:
    def __init__(self, secret: str, publish_key):
        self.secret = secret
        self.publish_key = publish_key
        self.users = {}
        self.epoch = secrets.token_hex(4)
        self.next_conn = 1

    def user(self, uid: str) -> User:
        u = self.users.get(uid)
        if u is None:
            u = self.users[uid] = User()
        return u

    def verify(self, token):
        try:
            claims = jwt.decode(
                token or "",
                self.secret,
                algorithms=["HS256"],
                leeway=5,
                options={"require": ["exp", "sub"]},
            )
        except jwt.PyJWTError:
            return None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub.encode()) > 128:
            return None
        return sub

    def route(self, events):
        ts = int(time.time() * 1000)
        for e in events:
            u = self.user(e["user_id"])
            u.seq += 1
            frame = DUMPS(
                {
                    "type": e["type"],
                    "seq": u.seq,
                    "user_id": e["user_id"],
                    "thread_id": e.get("thread_id"),
                    "run_id": e["run_id"],
                    "agent_name": e["agent_name"],
                    "ts": ts,
                    "data": e.get("data", {}),
                }
            ).encode()
            for c in list(u.conns):
                if not c.send(frame):
                    u.conns.discard(c)


def check_event(e):
    if not isinstance(e, dict):
        return "not an object"
    t = e.get("type")
    if not isinstance(t, str) or not TYPE_RE.fullmatch(t):
        return "type must match ^[a-z][a-z0-9_]{0,63}$"
    uid = e.get("user_id")
    if not isinstance(uid, str) or not uid or len(uid.encode()) > 128:
        return "user_id must be 1-128 bytes"
    tid = e.get("thread_id")
    if tid is not None and not isinstance(tid, str):
        return "thread_id must be a string or null"
    for k in ("run_id", "agent_name"):
        v = e.get(k)
        if not isinstance(v, str) or not v:
            return f"{k} must be a non-empty string"
    return None


def response(status: int, body, close: bool = False) -> bytes:
    text = DUMPS(body).encode()
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(text)}\r\n"
    )
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + text


def error(status: int, code: str, message: str, close: bool = False, **extra) -> bytes:
    return response(status, {"error": code, "message": message, **extra}, close)


def parse_head(raw: bytes):
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        k, sep, v = line.partition(":")
        if not sep:
            return None
        headers[k.strip().lower()] = v.strip()
    return parts[0], parts[1], headers


async def handle(hub: Hub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                writer.write(error(431, "headers_too_large", "request head too large", True))
                return
            except asyncio.IncompleteReadError:
                return
            parsed = parse_head(raw)
            if parsed is None:
                writer.write(error(400, "bad_request", "malformed request", True))
                return
            method, target, headers = parsed
            url = urlsplit(target)
            if method == "GET" and url.path in ("/health", "/ws/health"):
                writer.write(response(200, {"status": "healthy"}))
            elif method == "GET" and url.path == "/ws":
                await upgrade(hub, raw, url, headers, reader, writer)
                return
            elif method == "POST" and url.path == "/api/events":
                length = headers.get("content-length")
                if length is None or not length.isdigit():
                    writer.write(error(411, "bad_request", "Content-Length required", True))
                    return
                if int(length) > MAX_BODY:
                    writer.write(error(413, "payload_too_large", "body over 1 MiB", True))
                    return
                body = await reader.readexactly(int(length))
                writer.write(publish(hub, headers, body))
            else:
                writer.write(error(404, "not_found", "unknown path"))
            if headers.get("connection", "").lower() == "close":
                return
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def publish(hub: Hub, headers, body: bytes) -> bytes:
    if hub.publish_key is None:
        return error(404, "not_found", "publishing is off")
    if headers.get("authorization") != f"Bearer {hub.publish_key}":
        return error(401, "invalid_key", "bad publish key")
    try:
        parsed = json.loads(body)
    except ValueError as e:
        return error(400, "bad_event", str(e), index=0)
    events = parsed if isinstance(parsed, list) else [parsed]
    if len(events) > MAX_BATCH:
        return error(413, "payload_too_large", "more than 1000 events")
    for i, e in enumerate(events):
        why = check_event(e)
        if why:
            return error(400, "bad_event", why, index=i)
    hub.route(events)
    return response(202, {"accepted": len(events)})


async def upgrade(hub, raw, url, headers, reader, writer):
    auth = headers.get("authorization", "")
    if auth.startswith("Bearer "):
        token = auth[7:].strip()
    else:
        token = (parse_qs(url.query).get("token") or [None])[0]
    sub = hub.verify(token)
    if sub is None:
        writer.write(error(401, "invalid_token", "missing or invalid token", True))
        return
    protocol = ServerProtocol(max_size=MAX_MESSAGE)
    protocol.receive_data(raw)
    events = protocol.events_received()
    if not events:
        writer.write(error(400, "bad_request", "not a WebSocket upgrade", True))
        return
    protocol.send_response(protocol.accept(events[0]))
    conn = Conn(protocol, writer)
    conn.flush()
    if protocol.state is not State.OPEN:
        return
    user = hub.user(sub)
    conn_id = f"c{hub.next_conn:08x}"
    hub.next_conn += 1
    # No await between reading last_seq and joining the user's set: the first event
    # this connection gets is last_seq + 1.
    hello = {
        "type": "connected",
        "connection_id": conn_id,
        "user_id": sub,
        "mode": "main",
        "thread_id": None,
        "epoch": hub.epoch,
        "last_seq": user.seq,
        "resumed": None,
    }
    conn.send(DUMPS(hello).encode())
    user.conns.add(conn)
    try:
        while protocol.state is not State.CLOSED:
            data = await reader.read(65536)
            if not data:
                protocol.receive_eof()
            else:
                protocol.receive_data(data)
            for frame in protocol.events_received():
                # Pings and closes are answered by the engine; client messages are not
                # part of this peer's protocol subset.
                if frame.opcode is Opcode.CLOSE:
                    break
            conn.flush()
            if not data or protocol.close_expected():
                break
    finally:
        user.conns.discard(conn)


async def main():
    ap = argparse.ArgumentParser(description="agentwire comparison peer: Python websockets")
    ap.add_argument("--listen", default="127.0.0.1:8080")
    ap.add_argument("--jwt-secret", default=os.environ.get("AGENTWIRE_JWT_SECRET"))
    ap.add_argument("--publish-key", default=os.environ.get("AGENTWIRE_PUBLISH_KEY"))
    args = ap.parse_args()
    if not args.jwt_secret:
        print("peer-python: AGENTWIRE_JWT_SECRET (or --jwt-secret) is required", file=sys.stderr)
        sys.exit(2)
    host, _, port = args.listen.rpartition(":")
    hub = Hub(args.jwt_secret, args.publish_key)
    server = await asyncio.start_server(
        lambda r, w: handle(hub, r, w), host, int(port), limit=MAX_HEAD, backlog=4096
    )
    print(f"peer-python: listening on {args.listen}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    server.close()
    for u in hub.users.values():
        for c in list(u.conns):
            if c.protocol.state is State.OPEN:
                c.protocol.send_close(CloseCode.GOING_AWAY, "going away")
                c.flush()


if __name__ == "__main__":
    asyncio.run(main())
