"""agentwire_worker: the worker client of the agentwire gateway.

Publish agent-run events to ``POST /api/events`` (PROTOCOL.md sections 6, 6a, 6b) from
an out-of-process worker, with batching, per-run ordering, retries made safe by
idempotency keys, and a run helper mirroring the Rust ``RunHandle``; sync
(:class:`Publisher`) and asyncio (:class:`AsyncPublisher`). :func:`parse_inbound`
checks and parses the gateway's inbound webhook requests (``user_message``,
``cancel``); :class:`InboundStream` reads the same messages from the Redis inbound
stream of a cluster (``engine = "redis"``) with a consumer group.

    from agentwire_worker import Publisher
    with Publisher("http://127.0.0.1:8080", publish_key) as pub:
        with pub.run("u1", agent_name="data_agent", thread_id="t1") as run:
            run.agent_started({"message": "hi"})
            run.emit("text_delta", {"delta": "Hello"})
        # leaving the block sent agent_completed and waited for the run's events
"""

from ._async import AsyncPublisher, AsyncRun
from ._core import CRITICAL_TYPES, check_type
from ._sync import Publisher, Run, new_run_id
from .errors import (
    AgentwireError,
    InboundAuthError,
    InboundBodyError,
    InboundError,
    PublishError,
    PublisherClosedError,
    QueueFullError,
    RunEndedError,
    TooManyRunsError,
)
from .inbound import InboundMessage, parse_inbound
from .redis_inbound import Delivery, InboundStream, parse_entry

__version__ = "0.1.0"

__all__ = [
    "AgentwireError",
    "AsyncPublisher",
    "AsyncRun",
    "CRITICAL_TYPES",
    "Delivery",
    "InboundAuthError",
    "InboundBodyError",
    "InboundError",
    "InboundMessage",
    "InboundStream",
    "PublishError",
    "Publisher",
    "PublisherClosedError",
    "QueueFullError",
    "Run",
    "RunEndedError",
    "TooManyRunsError",
    "check_type",
    "new_run_id",
    "parse_entry",
    "parse_inbound",
]
