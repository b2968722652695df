#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into fuzz/corpus/<target>/ (named
seeds; libFuzzer's own finds are never written there, see tools/fuzz.sh). Re-run after
changing a seed; the files are committed. Crash inputs kept as regression seeds are
named crash-*/regress-* and are not touched by this script."""
import json, os, struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
TOKEN = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJmdXp6LXVzZXIiLCJleHAiOjQxMDI0NDQ4MDB9.tL2sQQ1IvmsC8FCWfYWifArCTBlJt2gBcq6trSK20oE"
EXPIRED = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJmdXp6LXVzZXIiLCJleHAiOjEwMDAwMDAwMDB9.SKnARrMmWavMEraTZk5lXmH1KPXdoXYNjkKObCorp6M"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def head(lines):
    return "\r\n".join(lines) + "\r\n\r\n"


def upgrade(target, extra=()):
    return head([f"GET {target} HTTP/1.1", "Host: gateway.test", "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Version: 13",
                 f"Sec-WebSocket-Key: {KEY}", *extra])


# http_head: byte 0 = setup flags (bit 0 structured, bit 1 query tokens off,
# bit 2 Origin allow-list https://app.example).
RAW, STRUCT, NO_QUERY, ORIGINS = 0, 1, 2, 4
h = {
    "upgrade-bearer": (RAW, upgrade("/ws", [f"Authorization: Bearer {TOKEN}"])),
    "upgrade-subprotocol": (RAW, upgrade("/ws", [f"Sec-WebSocket-Protocol: agentwire.v1, bearer.{TOKEN}"])),
    "upgrade-query-resume": (RAW, upgrade(f"/ws?mode=isolated&thread_id=t1&last_seq=3&epoch=9f2c41d0&user_id=fuzz-user&token={TOKEN}")),
    "upgrade-query-token-off": (NO_QUERY, upgrade(f"/ws?token={TOKEN}")),
    "upgrade-factory-origin": (ORIGINS, upgrade("/ws/factory", ["Origin: https://app.example", f"Authorization: Bearer {TOKEN}"])),
    "upgrade-bad-origin": (ORIGINS, upgrade("/websocket", ["Origin: https://evil.example", f"Authorization: Bearer {TOKEN}"])),
    "upgrade-expired": (RAW, upgrade("/ws", [f"Authorization: Bearer {EXPIRED}"])),
    "upgrade-user-mismatch": (RAW, upgrade("/ws/isolated?user_id=someone", [f"Authorization: Bearer {TOKEN}"])),
    "upgrade-version-8": (RAW, head(["GET /ws HTTP/1.1", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 8", f"Sec-WebSocket-Key: {KEY}"])),
    "health-then-upgrade": (RAW, head(["GET /health HTTP/1.1", "Host: x"]) + upgrade("/ws", [f"Authorization: Bearer {TOKEN}"])),
    "head-metrics-http10": (RAW, head(["HEAD /metrics HTTP/1.0", "Connection: keep-alive"]) + head(["GET http://h/ws/stats?x=%41 HTTP/1.1"])),
    "publish-post": (RAW, head(["POST /api/events HTTP/1.1", "Authorization: Bearer pk", "Content-Length: 2"]) + "{}"),
    "not-found": (RAW, head(["GET /nope?token=x HTTP/1.1"])),
    "method-not-allowed": (RAW, head(["PUT /ws HTTP/1.1"])),
    "chunked-and-length": (RAW, head(["GET /ws/config HTTP/1.1", "Transfer-Encoding: chunked", "Content-Length: 3"])),
    "structured-valid-upgrade": (STRUCT, bytes(64)),
    "structured-origins-no-query": (STRUCT | NO_QUERY | ORIGINS, bytes([0, 0, 0, 0x20, 1, 2, 0]) + bytes(40)),
}
for name, (flags, body) in h.items():
    if isinstance(body, str):
        body = body.encode()
    write("http_head", name, bytes([flags]) + body)

# client_message: one text frame each.
c = {
    "ping": {"type": "ping"},
    "user-message": {"type": "user_message", "thread_id": "t1", "text": "hello", "ref": "m-1"},
    "user-message-null-thread": {"type": "user_message", "thread_id": None, "text": "", "ref": {"k": [1, 2.5, None]}},
    "cancel": {"type": "cancel", "run_id": "r-9"},
    "refresh": {"type": "refresh", "token": TOKEN},
    "unknown-type": {"type": "subscribe", "run_id": "r-9"},
    "missing-field": {"type": "cancel"},
    "bad-thread": {"type": "user_message", "text": "x", "thread_id": 7},
    "thread-control": {"type": "user_message", "text": "x", "thread_id": "t\n\u0000\u0085"},
    "cancel-empty-run": {"type": "cancel", "run_id": ""},
}
for name, msg in c.items():
    write("client_message", name, json.dumps(msg, separators=(",", ":")))
write("client_message", "not-json", '{"type":"ping"')
write("client_message", "not-object", '["ping"]')
write("client_message", "escapes", '{"type":"user_message","text":"\\u00e9\\ud83d\\ude00\\n","ref":1e3}')


# frames: byte 0 = max_message_bytes pick (0: 64 KiB, 1: 1024, 2: 125, 3: 16),
# byte 1 = largest read, byte 2 = share already read with the upgrade (0..255).
def frame(opcode, payload, fin=True, mask=b"\x37\xfa\x21\x3d", length=None):
    n = len(payload) if length is None else length
    out = bytearray([(0x80 if fin else 0) | opcode])
    if n < 126:
        out.append(0x80 | n)
    elif n < 65536:
        out.append(0x80 | 126)
        out += struct.pack(">H", n)
    else:
        out.append(0x80 | 127)
        out += struct.pack(">Q", n)
    out += mask
    out += bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(out)


ping_msg = b'{"type":"ping"}'
f = {
    "text-ping": (0, 255, 0, frame(1, ping_msg)),
    "text-split-reads": (0, 3, 128, frame(1, ping_msg) + frame(1, b'{"type":"cancel","run_id":"r"}')),
    "ping-pong-close": (0, 255, 0, frame(9, b"hb") + frame(10, b"") + frame(8, struct.pack(">H", 1000) + b"bye")),
    "fragmented-text": (1, 255, 0, frame(1, b'{"type":', fin=False) + frame(9, b"") + frame(0, b'"ping"}')),
    "binary": (0, 255, 0, frame(2, b"\x00\x01\x02")),
    "over-limit": (3, 255, 0, frame(1, b"x" * 40)),
    "announced-huge": (0, 255, 0, frame(1, b"", length=1 << 40)),
    "announced-16bit": (2, 255, 0, frame(1, b"abc", length=60000)),
    "unmasked": (0, 255, 0, bytes([0x81, 0x02]) + b"hi"),
    "bad-utf8": (0, 255, 0, frame(1, b"\xc3\x28")),
    "close-1001": (2, 7, 255, frame(8, struct.pack(">H", 1001))),
    "ping-flood": (2, 255, 0, frame(9, b"p" * 125) * 8),
}
for name, (limit, chunk, split, body) in f.items():
    write("frames", name, bytes([limit, chunk, split]) + body)


# publish_body: request bodies.
ev = {"type": "agent_started", "user_id": "u1", "thread_id": "t1", "run_id": "r-9", "agent_name": "data_agent", "data": {"tool": "sql", "args": {}}}
p = {
    "single": ev,
    "batch": [ev,
              {"type": "tool_executing", "user_id": "u1", "thread_id": None, "run_id": "r-9", "agent_name": "data_agent", "data": [1, 2.50, "\u00e9"]},
              {"type": "text_delta", "user_id": "u2", "run_id": "r-10", "agent_name": "a"},
              {"type": "agent_completed", "user_id": "u1", "thread_id": "t1", "run_id": "r-9", "agent_name": "data_agent", "data": None}],
    "bad-index-1": [ev, {"type": "Bad Type", "user_id": "u", "run_id": "r", "agent_name": "a"}],
    "reserved-type": {"type": "connected", "user_id": "u", "run_id": "r", "agent_name": "a"},
    "empty-batch": [],
    "thread-control": [ev, dict(ev, thread_id="t\u001b[2J")],
}
for name, body in p.items():
    write("publish_body", name, json.dumps(body, separators=(",", ":"), ensure_ascii=False))
write("publish_body", "data-bytes-kept", '{"type":"agent_thinking","user_id":"u","run_id":"r","agent_name":"a","data":{"b":1.50, "a":"\\u00e9"}}')
write("publish_body", "not-json", "[1,")
