#!/usr/bin/env python3
"""A worker anywhere: reads users' messages from the Redis inbound stream of agentwire
nodes (engine = "redis") with a consumer group, and answers each with a run through the
publish API of any node. Standard library only (a minimal RESP client below).

    python3 examples/redis_worker.py --redis 127.0.0.1:6379 \
        --gateway http://127.0.0.1:8080 --publish-key "$PUBLISH_KEY"

Stream fields (docs/CLUSTER.md, "The inbound stream"): type (user_message | cancel),
user_id, thread_id ("" when null), run_id, text, ref, connection_id, node_id, ts.
Every event is published with an idempotency key (<run_id>:<n>), so a retry after a 503
stores it once. A message is acknowledged (XACK) once its run was published.
"""

import argparse
import json
import socket
import sys
import time
import urllib.error
import urllib.request


class Redis:
    """Just enough RESP2 for XGROUP, XREADGROUP and XACK."""

    def __init__(self, host, port, timeout=10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def call(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))
        return self._reply()

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n).decode()
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RuntimeError("unexpected RESP reply %r" % line)


def publish(gateway, key, events):
    """POST /api/events; retried on 503 (the same idempotency keys: stored once)."""
    body = json.dumps(events).encode()
    for attempt in range(20):
        req = urllib.request.Request(
            gateway + "/api/events",
            data=body,
            headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            if e.code != 503:
                raise
        time.sleep(min(0.05 * 2 ** attempt, 2.0))
    raise RuntimeError("publish kept failing with 503")


def answer(gateway, key, msg):
    """A small run for one user_message: started, thinking, completed."""
    run, user = msg["run_id"], msg["user_id"]
    thread = msg["thread_id"] or None

    def event(n, kind, data):
        return {"type": kind, "user_id": user, "thread_id": thread, "run_id": run,
                "agent_name": "redis_worker", "data": data,
                "idempotency_key": "%s:%d" % (run, n)}

    publish(gateway, key, [
        event(0, "agent_started", {"message": msg["text"]}),
        event(1, "agent_thinking", {"step": 1, "thought": "Reading the question"}),
        event(2, "agent_completed", {"answer": "You said: " + msg["text"]}),
    ])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--redis", default="127.0.0.1:6379", help="host:port")
    p.add_argument("--prefix", default="agentwire", help="redis_prefix of the nodes")
    p.add_argument("--gateway", default="http://127.0.0.1:8080", help="any node")
    p.add_argument("--publish-key", required=True)
    p.add_argument("--group", default="workers")
    p.add_argument("--consumer", default="w1")
    args = p.parse_args()
    host, port = args.redis.rsplit(":", 1)
    r = Redis(host, int(port))
    stream = args.prefix + ":inbound"
    try:
        r.call("XGROUP", "CREATE", stream, args.group, "$", "MKSTREAM")
    except RuntimeError as e:
        if "BUSYGROUP" not in str(e):
            raise
    print("redis_worker: reading %s as %s/%s" % (stream, args.group, args.consumer), flush=True)
    while True:
        reply = r.call("XREADGROUP", "GROUP", args.group, args.consumer, "COUNT", 10,
                       "BLOCK", 1000, "STREAMS", stream, ">")
        for _name, entries in reply or []:
            for entry_id, flat in entries:
                msg = dict(zip(flat[0::2], flat[1::2]))
                if msg.get("type") == "user_message":
                    answer(args.gateway, args.publish_key, msg)
                elif msg.get("type") == "cancel":
                    print("redis_worker: cancel of %s (runs here finish at once)"
                          % msg.get("run_id"), flush=True)
                r.call("XACK", stream, args.group, entry_id)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
