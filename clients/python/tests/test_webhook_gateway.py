"""The whole loop with the real gateway's inbound webhook (PROTOCOL.md section 6b): the
gateway runs with ``--inbound-url`` pointing at examples/worker.py (its handler is
``parse_inbound`` in ``http.server``); a user's ``user_message`` goes to the worker as a
webhook request, the user gets the ``ack`` once the worker answered 200, and the run
the worker publishes back through ``Publisher`` arrives on the user's WebSocket, whole,
under the acked run id. A ``cancel`` goes the same way and ends the run with
``agent_error {"reason": "cancelled"}``. No Redis, no in-process worker."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import PUBLISH_KEY, Client, free_port

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "worker.py"
INBOUND_KEY = "pyclient-inbound-key-0123"


def frame(ws: Client, kind: str, timeout: float = 20.0) -> dict:
    """The next frame of type ``kind`` (events and other frames before it skipped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        f = json.loads(ws.ws.recv(timeout=left))
        if f["type"] == kind:
            return f
    raise AssertionError(f"no {kind} frame within {timeout} s")


def run_events(ws: Client, run_id: str, timeout: float = 30.0) -> list[dict]:
    """Events of ``run_id`` up to its end (agent_completed or agent_error)."""
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        f = json.loads(ws.ws.recv(timeout=left))
        if f.get("run_id") == run_id and "seq" in f:
            out.append(f)
            if f["type"] in ("agent_completed", "agent_error"):
                return out
    raise AssertionError(f"run {run_id} did not end within {timeout} s: {out[-3:]}")


def start_worker(gateway_url: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--gateway", gateway_url, "--publish-key", PUBLISH_KEY,
         "--inbound-key", INBOUND_KEY, "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert "worker listening" in (proc.stdout.readline() if proc.stdout else "")
    return proc


def test_a_message_goes_through_the_webhook_and_the_run_comes_back(gateway_factory):
    port = free_port()
    gw = gateway_factory("--inbound-url", f"http://127.0.0.1:{port}/inbound",
                         "--inbound-key", INBOUND_KEY, start=False)
    worker = start_worker(gw.url, port)
    try:
        gw.start()
        ws = Client(gw, "webhook-ada")
        ws.ws.send(json.dumps({"type": "user_message", "thread_id": "t1", "text": "What is agentwire?", "ref": "m1"}))
        ack = frame(ws, "ack")
        assert ack["ref"] == "m1" and ack["run_id"].startswith("r-")
        evs = run_events(ws, ack["run_id"])
        types = [e["type"] for e in evs]
        assert types[:6] == ["agent_started", "agent_thinking", "agent_thinking", "agent_thinking",
                             "tool_executing", "tool_completed"], types
        assert types[-1] == "agent_completed" and set(types[6:-1]) == {"text_delta"}, types
        assert all(e["thread_id"] == "t1" and e["agent_name"] == "python_agent" for e in evs)
        assert [e["seq"] for e in evs] == list(range(evs[0]["seq"], evs[0]["seq"] + len(evs)))
        assert "What is agentwire?" in evs[-1]["data"]["answer"]

        # A cancel goes to the worker too: cancel_requested after its 200, then the run
        # ends as cancelled.
        ws.ws.send(json.dumps({"type": "user_message", "text": "a long one", "ref": "m2"}))
        run_id = frame(ws, "ack")["run_id"]
        ws.ws.send(json.dumps({"type": "cancel", "run_id": run_id}))
        assert frame(ws, "cancel_requested")["run_id"] == run_id
        end = run_events(ws, run_id)[-1]
        assert end["type"] == "agent_error" and end["data"] == {"reason": "cancelled"}, end

        hook = gw.stats()["webhook"]
        assert hook["sent"] == 3 and hook["ok"] == 3 and hook["failed_total"] == 0, hook
        ws.close()
    finally:
        worker.terminate()
        worker.wait(10)


def test_a_worker_that_is_down_gives_no_agent(gateway_factory):
    port = free_port()  # nothing listens there
    gw = gateway_factory("--inbound-url", f"http://127.0.0.1:{port}/inbound", "--inbound-key", INBOUND_KEY)
    ws = Client(gw, "webhook-bo")
    ws.ws.send(json.dumps({"type": "user_message", "text": "hello?", "ref": "m1"}))
    err = frame(ws, "error")
    assert err["code"] == "no_agent" and err["ref"] == "m1", err
    ws.close()
