"""examples/worker.py against the real gateway. `--once` publishes a whole run. The
webhook mode is driven by this test POSTing what the gateway's inbound sender
(PROTOCOL.md section 6b) POSTs, with the requests' edge cases (bad key, bad body); the
runs it publishes go through the real gateway to the user's WebSocket. The gateway's
own webhook drives the same worker in test_webhook_gateway.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import PUBLISH_KEY, free_port

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "worker.py"


def test_once_publishes_a_whole_run(gateway, client_factory):
    ws = client_factory("olga")
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--gateway", gateway.url, "--publish-key", PUBLISH_KEY, "--once", "olga"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    evs = ws.events(7)
    types = [e["type"] for e in evs]
    assert types[:6] == ["agent_started", "agent_thinking", "agent_thinking", "agent_thinking",
                         "tool_executing", "tool_completed"]
    rest = ws.events(12)
    assert all(e["type"] == "text_delta" for e in [evs[6]] + rest[:-1]) and rest[-1]["type"] == "agent_completed"
    assert f"published run {evs[0]['run_id']}" in out.stdout


def post(url: str, doc: dict, key: str) -> int:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_webhook_mode_answers_messages_and_cancels(gateway, client_factory):
    ws = client_factory("pia")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--gateway", gateway.url, "--publish-key", PUBLISH_KEY,
         "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert "worker listening" in proc.stdout.readline()
        url = f"http://127.0.0.1:{port}/inbound"
        msg = {"type": "user_message", "user_id": "pia", "thread_id": "t1", "run_id": "r-web-1",
               "text": "hello", "ref": "m1", "connection_id": "c1", "node_id": "n1", "ts": int(time.time() * 1000)}
        assert post(url, msg, "wrong-key-wrong") == 401
        assert post(url, {"type": "nope"}, PUBLISH_KEY) == 400
        assert post(url, msg, PUBLISH_KEY) == 200
        evs = ws.events(2)
        assert [(e["type"], e["run_id"], e["thread_id"]) for e in evs] == [
            ("agent_started", "r-web-1", "t1"), ("agent_thinking", "r-web-1", "t1")]
        assert post(url, {**msg, "type": "cancel", "text": None}, PUBLISH_KEY) == 200
        deadline = time.monotonic() + 10
        last = None
        while time.monotonic() < deadline:
            last = ws.events(1)[0]
            if last["type"] in ("agent_completed", "agent_error"):
                break
        assert last is not None and last["type"] == "agent_error" and last["data"] == {"reason": "cancelled"}
    finally:
        proc.terminate()
        proc.wait(10)
