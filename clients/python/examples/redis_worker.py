"""An out-of-process agent worker for a gateway cluster (``engine = "redis"``).

Every gateway node appends its clients' ``user_message`` and ``cancel`` to the Redis
stream ``<redis_prefix>:inbound`` (PROTOCOL.md section 9). This worker reads it in the
consumer group ``agents`` (start as many copies as you like: each message goes to one of
them), answers each message with the demo agent of ``worker.py`` (a whole run published
through the publish API of any node), and stops a run when its cancel arrives:

    pip install "./clients/python[redis]"
    python clients/python/examples/redis_worker.py --gateway http://127.0.0.1:8080 \\
        --publish-key KEY --redis redis://127.0.0.1:6379

A message is acknowledged once its run ended. A message left unacknowledged by a worker
that died is taken over by another after ``--claim-idle-ms``; that worker ends the run
with ``agent_error {"reason": "worker_lost"}`` instead of starting it again (part of it
may already be on the user's screen).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import worker  # noqa: E402 - the demo agent of the webhook example

from agentwire_worker import Delivery, InboundStream, Publisher  # noqa: E402

log = logging.getLogger("redis_worker")


def handle(stream: InboundStream, pub: Publisher, d: Delivery, cancels: set) -> None:
    """Answer one delivery in a thread of its own; acknowledge it when the run ended."""
    m = d.message
    try:
        if d.claimed:
            with pub.run(m.user_id, agent_name="python_agent", thread_id=m.thread_id, run_id=m.run_id) as run:
                run.agent_error({"reason": "worker_lost"})
        else:
            worker.answer(pub, m.user_id, m.thread_id, m.run_id, m.text or "", cancels)
    except Exception:  # noqa: BLE001 - the run already ended with agent_error
        log.exception("run %s failed", m.run_id)
    finally:
        cancels.discard(m.run_id)
        stream.ack(d)


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gateway", default="http://127.0.0.1:8080", help="publish API of any node")
    p.add_argument("--publish-key", required=True)
    p.add_argument("--redis", default="redis://127.0.0.1:6379", help="the gateways' redis_url")
    p.add_argument("--prefix", default="agentwire", help="the gateways' redis_prefix")
    p.add_argument("--group", default="agents")
    p.add_argument("--claim-idle-ms", type=int, default=60_000)
    p.add_argument("--step-s", type=float, default=worker.STEP_S, help="pause between the demo agent's steps")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    worker.STEP_S = a.step_s
    stream = InboundStream(a.redis, prefix=a.prefix, group=a.group, claim_idle_ms=a.claim_idle_ms, block_ms=1000)
    stream.ensure_group()
    cancels: set = set()
    with Publisher(a.gateway, a.publish_key) as pub:
        print(f"worker reading {stream.stream} as {stream.consumer} in group {a.group}, "
              f"publishing to {pub.url}", flush=True)
        try:
            for d in stream:
                if d.message.type == "cancel":
                    cancels.add(d.message.run_id)
                    stream.ack(d)
                    continue
                threading.Thread(target=handle, args=(stream, pub, d, cancels), daemon=True).start()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
