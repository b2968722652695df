"""The ``cancelled`` list of publish answers (PROTOCOL.md section 6b).

The gateway sends ``cancelled`` (tested against it in test_publisher.py); this ONE field is also tested
against a local stub HTTP server (stdlib http.server) that answers 202 with it. The
real gateway's answers without the field are covered by test_publisher.py (runs stay
``cancelled == False``). Everything else is tested against the real gateway."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agentwire_worker import AsyncPublisher, Publisher


class Stub(BaseHTTPRequestHandler):
    cancel: set = set()
    bodies: list = []

    def do_POST(self):  # noqa: N802
        n = int(self.headers["Content-Length"])
        events = json.loads(self.rfile.read(n))
        type(self).bodies.append(events)
        ids = sorted({e["run_id"] for e in events} & type(self).cancel)
        out = json.dumps({"accepted": len(events), "cancelled": ids}).encode()
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    Stub.cancel = {"r-cancel-me"}
    Stub.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_cancelled_runs_are_flagged(stub):
    with Publisher(stub, "stub-key-0123456789") as pub:
        victim = pub.run("u1", agent_name="a", run_id="r-cancel-me")
        other = pub.run("u1", agent_name="a", run_id="r-keep")
        victim.agent_started()
        other.agent_started()
        assert not victim.cancelled
        pub.flush()
        assert victim.cancelled and not other.cancelled
        victim.agent_error({"reason": "cancelled"})
        other.agent_completed()
    assert sum(len(b) for b in Stub.bodies) == 4


def test_cancelled_runs_are_flagged_async(stub):
    async def main():
        async with AsyncPublisher(stub, "stub-key-0123456789") as pub:
            async with pub.run("u1", agent_name="a", run_id="r-cancel-me") as run:
                await run.agent_started()
                await run.wait()
                assert run.cancelled
                await run.agent_error({"reason": "cancelled"})

    asyncio.run(asyncio.wait_for(main(), 20))
