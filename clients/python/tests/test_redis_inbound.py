"""InboundStream against a real redis-server: the consumer group, reading, acknowledging,
taking over what a dead consumer left pending, bad entries, and the example worker
answering a message through the real gateway.

The entries are appended here as the gateway's Redis engine writes them (PROTOCOL.md
section 9: flat string fields, "" for an absent value), so the worker side is tested on
its own; the cluster tests of the gateway check that the engine writes exactly these."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentwire_worker import InboundBodyError, InboundStream, parse_entry
from conftest import PUBLISH_KEY, Client
from redis_support import redis_server  # noqa: F401 - the fixture

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "redis_worker.py"


def entry(**over) -> dict:
    e = {"type": "user_message", "user_id": "ana", "thread_id": "t1", "run_id": "r-1", "text": "hello",
         "ref": "m1", "connection_id": "c00000001", "node_id": "node-a", "ts": str(int(time.time() * 1000))}
    e.update(over)
    return e


def test_parse_entry_maps_empty_strings_to_none():
    m = parse_entry({b"type": b"cancel", b"user_id": b"ana", b"thread_id": b"", b"run_id": b"r-9",
                     b"text": b"", b"ref": b"", b"connection_id": b"c1", b"node_id": b"n", b"ts": b"17"})
    assert (m.type, m.user_id, m.thread_id, m.run_id, m.text, m.ref, m.ts) == ("cancel", "ana", None, "r-9", None, None, 17)
    assert parse_entry(entry(text="")).text == "", "a user_message keeps its (empty) text"
    for bad in (entry(type="other"), entry(user_id=""), entry(run_id=""), entry(ts="soon")):
        with pytest.raises(InboundBodyError):
            parse_entry(bad)


def test_group_read_ack(redis_server):
    s = InboundStream(redis_server.url, prefix="aw", group="g", block_ms=100)
    assert s.ensure_group() is True
    assert s.ensure_group() is False, "an existing group is kept"
    r = redis_server.client
    ids = [r.xadd("aw:inbound", entry(run_id=f"r-{i}", ref=f"m{i}")) for i in range(3)]
    got = s.read()
    assert [d.message.run_id for d in got] == ["r-0", "r-1", "r-2"]
    assert [d.id for d in got] == [i.decode() for i in ids]
    assert not any(d.claimed for d in got)
    assert got[0].message.thread_id == "t1" and got[0].message.node_id == "node-a"
    assert r.xpending("aw:inbound", "g")["pending"] == 3
    for d in got:
        s.ack(d)
    assert r.xpending("aw:inbound", "g")["pending"] == 0
    assert s.read() == [], "nothing new"


def test_two_consumers_share_the_work(redis_server):
    a = InboundStream(redis_server.url, group="g", consumer="a", block_ms=100, count=2)
    b = InboundStream(redis_server.url, group="g", consumer="b", block_ms=100, count=2)
    a.ensure_group()
    for i in range(4):
        redis_server.client.xadd("agentwire:inbound", entry(run_id=f"r-{i}"))
    got_a, got_b = a.read(), b.read()
    assert len(got_a) == 2 and len(got_b) == 2
    assert {d.message.run_id for d in got_a + got_b} == {"r-0", "r-1", "r-2", "r-3"}, "each entry to one consumer"


def test_a_dead_consumers_entries_are_taken_over(redis_server):
    dead = InboundStream(redis_server.url, group="g", consumer="dead", block_ms=100)
    dead.ensure_group()
    redis_server.client.xadd("agentwire:inbound", entry(run_id="r-lost"))
    assert [d.message.run_id for d in dead.read()] == ["r-lost"]  # taken, never acknowledged
    alive = InboundStream(redis_server.url, group="g", consumer="alive", block_ms=100, claim_idle_ms=200)
    assert alive.read() == [], "not idle long enough yet"
    time.sleep(0.3)
    got = alive.read()
    assert [(d.message.run_id, d.claimed) for d in got] == [("r-lost", True)]
    alive.ack(got[0])
    assert redis_server.client.xpending("agentwire:inbound", "g")["pending"] == 0


def test_bad_entries_are_acknowledged_and_reported(redis_server):
    bad = []
    s = InboundStream(redis_server.url, group="g", block_ms=100, on_bad=lambda i, f, e: bad.append((i, str(e))))
    s.ensure_group()
    r = redis_server.client
    r.xadd("agentwire:inbound", entry(type="bogus"))
    r.xadd("agentwire:inbound", entry(run_id="r-good"))
    got = s.read()
    assert [d.message.run_id for d in got] == ["r-good"]
    assert len(bad) == 1 and "type must be one of" in bad[0][1]
    assert r.xpending("agentwire:inbound", "g")["pending"] == 1, "only the good one waits for its ack"


def test_serve_leaves_a_failed_message_pending(redis_server):
    s = InboundStream(redis_server.url, group="g", block_ms=50, claim_idle_ms=100)
    s.ensure_group()
    redis_server.client.xadd("agentwire:inbound", entry(run_id="r-flaky"))
    calls = []

    def handler(msg):
        calls.append(msg.run_id)
        if len(calls) == 1:
            raise RuntimeError("the first try fails")
        s.close()

    s.serve(handler)  # the first call raises, the entry is taken over after 100 ms and succeeds
    assert calls == ["r-flaky", "r-flaky"]
    assert redis_server.client.xpending("agentwire:inbound", "g")["pending"] == 0


def test_example_worker_answers_from_the_stream(gateway, client_factory, redis_server):
    ws = client_factory("rosa")
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--gateway", gateway.url, "--publish-key", PUBLISH_KEY,
         "--redis", redis_server.url, "--step-s", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert "reading agentwire:inbound" in proc.stdout.readline()
        r = redis_server.client
        r.xadd("agentwire:inbound", entry(user_id="rosa", run_id="r-stream-1", text="What is Redis?"))
        evs = ws.events(6)
        assert [e["type"] for e in evs[:6]] == ["agent_started", "agent_thinking", "agent_thinking",
                                                "agent_thinking", "tool_executing", "tool_completed"]
        assert {e["run_id"] for e in evs} == {"r-stream-1"}
        while evs[-1]["type"] not in ("agent_completed", "agent_error"):
            evs += ws.events(1)
        assert evs[-1]["type"] == "agent_completed"
        assert "What is Redis?" in evs[-1]["data"]["answer"]
        # A cancel in the stream stops the next run.
        r.xadd("agentwire:inbound", entry(user_id="rosa", run_id="r-stream-2", text="A long one"))
        first = ws.events(1)[0]
        assert (first["type"], first["run_id"]) == ("agent_started", "r-stream-2")
        r.xadd("agentwire:inbound", entry(type="cancel", user_id="rosa", run_id="r-stream-2", text=""))
        rest = ws.events(1)
        while rest[-1]["type"] not in ("agent_completed", "agent_error"):
            rest += ws.events(1)
        assert rest[-1]["type"] == "agent_error" and rest[-1]["data"]["reason"] == "cancelled"
        deadline = time.monotonic() + 5
        while r.xpending("agentwire:inbound", "agents")["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.xpending("agentwire:inbound", "agents")["pending"] == 0, "every entry acknowledged"
    finally:
        proc.terminate()
        proc.wait(10)


def test_golden_path_with_the_agent_outside_a_two_node_cluster(gateway_factory, redis_server):
    """Issue 11's golden path: two gateway nodes on one Redis (engine = "redis"), the
    user on node 0 asks; the example worker reads the message from the inbound stream
    the gateway wrote, answers through node 1's publish API, and the user sees the
    whole run; a cancel sent to node 0 stops the next run."""
    cluster = ("--engine", "redis", "--redis-url", redis_server.url, "--redis-prefix", "gw")
    n0 = gateway_factory(*cluster, "--node-id", "n0")
    n1 = gateway_factory(*cluster, "--node-id", "n1")
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--gateway", n1.url, "--publish-key", PUBLISH_KEY,
         "--redis", redis_server.url, "--prefix", "gw", "--step-s", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert "reading gw:inbound" in proc.stdout.readline()  # the group exists from here
        ws = Client(n0, "lena")
        assert ws.connected["node_id"] == "n0"
        # A node learns that the stream has a consumer group within a housekeeping tick
        # (1 s); until then a message with no in-process worker gets no_agent.
        deadline = time.monotonic() + 10
        while True:
            ws.ws.send(json.dumps({"type": "user_message", "thread_id": "t1", "text": "What is a stream?", "ref": "q1"}))
            ack = ws.frame("ack")
            if ack["type"] == "ack" or time.monotonic() > deadline:
                break
            assert ack["code"] == "no_agent", ack
            time.sleep(0.1)
        assert (ack["type"], ack["ref"]) == ("ack", "q1"), ack
        evs = ws.events(1)
        while evs[-1]["type"] not in ("agent_completed", "agent_error"):
            evs += ws.events(1)
        assert {e["run_id"] for e in evs} == {ack["run_id"]}
        assert [e["type"] for e in evs[:6]] == ["agent_started", "agent_thinking", "agent_thinking",
                                                "agent_thinking", "tool_executing", "tool_completed"]
        assert evs[-1]["type"] == "agent_completed" and "What is a stream?" in evs[-1]["data"]["answer"]
        assert [e["seq"] for e in evs] == list(range(evs[0]["seq"], evs[0]["seq"] + len(evs)))
        # Cancel the next run from node 0: the worker hears it through the stream.
        ws.ws.send(json.dumps({"type": "user_message", "thread_id": "t1", "text": "A long one", "ref": "q2"}))
        ack = ws.frame("ack")
        assert ack["type"] == "ack", ack
        run_id = ack["run_id"]
        assert ws.events(1)[0]["type"] == "agent_started"
        ws.ws.send(json.dumps({"type": "cancel", "run_id": run_id}))
        rest = ws.events(1)
        while rest[-1]["type"] not in ("agent_completed", "agent_error"):
            rest += ws.events(1)
        assert rest[-1]["type"] == "agent_error" and rest[-1]["data"]["reason"] == "cancelled", rest[-1]
        ws.close()
    finally:
        proc.terminate()
        proc.wait(10)
