"""An out-of-process agent worker for agentwire, standard library + agentwire_worker only.

It plays the gateway's built-in demo agent from another process:

* an HTTP endpoint (``http.server``) receives the gateway's inbound webhook
  (PROTOCOL.md section 6b: ``inbound_url`` pointing here): each ``user_message`` starts
  a run in a thread, each ``cancel`` stops one;
* each run is published whole through ``Publisher``: agent_started, three
  agent_thinking steps, a tool call (tool_executing / tool_completed), the answer
  streamed as text_delta, agent_completed; a cancelled run ends with
  ``agent_error {"reason": "cancelled"}``. Cancels arrive both as webhook requests and
  in publish answers (``run.cancelled``).

Run it (the gateway needs ``--publish-key``, and ``--inbound-url`` pointing here)::

    python examples/worker.py --gateway http://127.0.0.1:8080 --publish-key KEY \\
        --listen 127.0.0.1:9000          # inbound_url = http://127.0.0.1:9000/inbound

Or, without the webhook, publish one whole run for a user and exit::

    python examples/worker.py --gateway http://127.0.0.1:8080 --publish-key KEY --once alice
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from agentwire_worker import InboundAuthError, InboundError, Publisher, parse_inbound

STEP_S = 0.3
MAX_BODY = 1 << 20
log = logging.getLogger("worker")


def answer(pub: Publisher, user_id: str, thread_id: Optional[str], run_id: Optional[str],
           text: str, cancels: set) -> str:
    """Publish one whole run answering ``text``; returns its run id."""
    query = text[:200]
    with pub.run(user_id, agent_name="python_agent", thread_id=thread_id, run_id=run_id) as run:

        def cancelled() -> bool:
            return run.cancelled or run.run_id in cancels

        run.agent_started({"message": query})
        for i, step in enumerate(["Reading the question", "Choosing a tool", "Planning the search"]):
            time.sleep(STEP_S)
            if cancelled():
                run.agent_error({"reason": "cancelled"})
                return run.run_id
            run.agent_thinking({"step": i + 1, "thought": step})
        run.tool_executing({"tool": "web_search", "args": {"query": query}})
        time.sleep(2 * STEP_S)
        if cancelled():
            run.agent_error({"reason": "cancelled"})
            return run.run_id
        run.tool_completed({"tool": "web_search", "result": {"hits": 3, "top": f"An article about {query}"}})
        reply = f'Here is what I found about "{query}": three sources agree.'
        for word in reply.split(" "):
            time.sleep(0.015)
            run.emit("text_delta", {"delta": word + " "})
        run.agent_completed({"answer": reply})
        return run.run_id


def make_handler(pub: Publisher, key: str, cancels: set):
    class Inbound(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the gateway's sender expects

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if self.path != "/inbound" or length > MAX_BODY:
                return self.reply(404 if self.path != "/inbound" else 413, {"error": "refused"})
            body = self.rfile.read(length)
            try:
                msg = parse_inbound(body, self.headers, key)
            except InboundAuthError as e:
                return self.reply(401, {"error": str(e)})
            except InboundError as e:
                return self.reply(400, {"error": str(e)})
            if msg.type == "cancel":
                cancels.add(msg.run_id)
            else:
                threading.Thread(
                    target=self.run_safely, args=(msg.user_id, msg.thread_id, msg.run_id, msg.text or ""),
                    daemon=True,
                ).start()
            # 2xx = the gateway sends the client its ack (or cancel_requested).
            self.reply(200, {"ok": True})

        def run_safely(self, user_id, thread_id, run_id, text) -> None:
            try:
                answer(pub, user_id, thread_id, run_id, text, cancels)
            except Exception:  # noqa: BLE001 - the run already ended with agent_error
                log.exception("run %s failed", run_id)

        def reply(self, status: int, doc: dict) -> None:
            out = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, fmt: str, *args) -> None:
            log.debug(fmt, *args)

    return Inbound


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gateway", default="http://127.0.0.1:8080")
    p.add_argument("--publish-key", required=True)
    p.add_argument("--inbound-key", help="the gateway's inbound_key (default: the publish key)")
    p.add_argument("--listen", default="127.0.0.1:9000", help="where the webhook listens")
    p.add_argument("--once", metavar="USER", help="publish one whole run for USER and exit")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with Publisher(a.gateway, a.publish_key) as pub:
        if a.once:
            run_id = answer(pub, a.once, None, None, "What is agentwire?", set())
            print(f"published run {run_id} for {a.once}", flush=True)
            return
        host, _, port = a.listen.rpartition(":")
        server = ThreadingHTTPServer((host, int(port)), make_handler(pub, a.inbound_key or a.publish_key, set()))
        print(f"worker listening on http://{a.listen}/inbound, publishing to {pub.url}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


if __name__ == "__main__":
    main()
