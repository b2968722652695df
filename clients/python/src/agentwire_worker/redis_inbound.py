"""The gateway's Redis inbound stream (PROTOCOL.md section 9), worker side.

With ``engine = "redis"``, every node appends each client's ``user_message`` and
``cancel`` to the Redis stream ``<redis_prefix>:inbound`` as flat string fields
(``type``, ``user_id``, ``thread_id``, ``run_id``, ``text``, ``ref``,
``connection_id``, ``node_id``, ``ts``; an absent value is ``""``). Workers in any
number of processes share the work through one consumer group: each entry goes to one
consumer of the group, and stays pending until that consumer acknowledges it.

:class:`InboundStream` is that consumer::

    from agentwire_worker import InboundStream
    stream = InboundStream("redis://127.0.0.1:6379", group="agents")
    stream.ensure_group()                      # before the first message: see below
    for delivery in stream:                    # blocks; yields Delivery objects
        handle(delivery.message)               # an InboundMessage, as from the webhook
        stream.ack(delivery)

What it does for you:

* ``ensure_group()`` creates the group (``XGROUP CREATE ... $ MKSTREAM``; an existing
  group is kept). The gateway answers a ``user_message`` with ``no_agent`` when no
  in-process worker takes messages and the stream has no consumer group, so create
  the group before users write; entries appended while no worker runs wait in the group.
* Entries a consumer took and never acknowledged (it crashed) are taken over by
  another consumer once idle for ``claim_idle_ms`` (``XAUTOCLAIM``), so a message is
  handled at least once even when a worker dies mid-run. Make handling idempotent: a
  run's events published with the client's idempotency keys (``Publisher`` does) are
  routed once even when a run is replayed.
* An entry whose fields are not a valid message is acknowledged and reported through
  ``on_bad`` (default: logged), never retried forever.

Needs the ``redis`` package (``pip install "agentwire-worker[redis]"``).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from .errors import InboundBodyError
from .inbound import INBOUND_TYPES, InboundMessage

log = logging.getLogger("agentwire_worker.redis_inbound")

#: The stream's fields, as the gateway writes them.
FIELDS = ("type", "user_id", "thread_id", "run_id", "text", "ref", "connection_id", "node_id", "ts")


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to this consumer: its id (for :meth:`InboundStream.ack`),
    the parsed message, and whether it was taken over from a consumer that never
    acknowledged it (so it may have been handled in part before)."""

    id: str
    message: InboundMessage
    claimed: bool = False


def parse_entry(fields: dict) -> InboundMessage:
    """An :class:`InboundMessage` from a stream entry's fields (bytes or str keys and
    values). ``""`` means absent for the optional fields. Raises
    :class:`InboundBodyError` for an entry that is not a valid message."""
    f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
         for k, v in fields.items()}
    kind = f.get("type")
    if kind not in INBOUND_TYPES:
        raise InboundBodyError(f"type must be one of {INBOUND_TYPES}, not {kind!r:.40}")
    for name in ("user_id", "run_id"):
        if not f.get(name):
            raise InboundBodyError(f"{name} must be a non-empty string")
    ts_text = f.get("ts") or ""
    if ts_text and not ts_text.isdigit():
        raise InboundBodyError("ts must be milliseconds in decimal")

    def opt(name: str) -> Optional[str]:
        return f.get(name) or None

    return InboundMessage(
        type=kind,
        user_id=f["user_id"],
        thread_id=opt("thread_id"),
        run_id=f["run_id"],
        text=f.get("text", "") if kind == "user_message" else opt("text"),
        ref=opt("ref"),
        connection_id=opt("connection_id"),
        node_id=opt("node_id"),
        ts=int(ts_text) if ts_text else None,
    )


class InboundStream:
    """A consumer of the gateway's inbound stream in consumer group ``group``.

    ``client`` may be given instead of ``url`` (a ``redis.Redis``). ``consumer`` names
    this process in the group (default: host name and pid). ``block_ms``: how long one
    read waits for new entries; ``count``: entries per read; ``claim_idle_ms``: how
    long an entry may stay unacknowledged by another consumer before this one takes it
    over.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379",
        *,
        prefix: str = "agentwire",
        group: str = "agents",
        consumer: Optional[str] = None,
        block_ms: int = 5000,
        count: int = 16,
        claim_idle_ms: int = 60_000,
        client: Any = None,
        on_bad: Optional[Callable[[str, dict, Exception], None]] = None,
    ) -> None:
        if client is None:
            try:
                import redis
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError('InboundStream needs the redis package: pip install "agentwire-worker[redis]"') from e
            client = redis.Redis.from_url(url, socket_timeout=(block_ms / 1000) + 5)
        if block_ms < 0 or count < 1 or claim_idle_ms < 1:
            raise ValueError("block_ms >= 0, count >= 1 and claim_idle_ms >= 1 are needed")
        self.redis = client
        self.stream = f"{prefix}:inbound"
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.block_ms = block_ms
        self.count = count
        self.claim_idle_ms = claim_idle_ms
        self.on_bad = on_bad or self._log_bad
        self._claim_cursor = "0-0"
        self._closed = False

    def ensure_group(self) -> bool:
        """Create the consumer group at the stream's end (and the stream if missing).
        True when it was created, False when it existed."""
        import redis

        try:
            self.redis.xgroup_create(self.stream, self.group, id="$", mkstream=True)
            return True
        except redis.ResponseError as e:
            if "BUSYGROUP" in str(e):
                return False
            raise

    def read(self, block_ms: Optional[int] = None) -> list[Delivery]:
        """The next entries for this consumer: first entries abandoned by other
        consumers (idle for ``claim_idle_ms``), else new ones, waiting up to
        ``block_ms`` (default: the stream's). Empty when none came."""
        out = self._claim()
        if out:
            return out
        got = self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=self.count,
            block=self.block_ms if block_ms is None else block_ms,
        )
        for _stream, entries in got or []:
            out.extend(self._parsed(entries, claimed=False))
        return out

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge a handled entry: the group never hands it out again."""
        self.redis.xack(self.stream, self.group, delivery.id)

    def __iter__(self) -> Iterator[Delivery]:
        """Read forever (until :meth:`close`); acknowledging is the caller's."""
        while not self._closed:
            yield from self.read()

    def serve(self, handler: Callable[[InboundMessage], None]) -> None:
        """Call ``handler`` for every message until :meth:`close`, acknowledging each
        once the handler returned. A handler that raises leaves its entry pending, so
        another consumer (or this one, after ``claim_idle_ms``) takes it over."""
        for delivery in self:
            try:
                handler(delivery.message)
            except Exception:  # noqa: BLE001 - logged; the entry stays pending
                log.exception("handler failed for %s; left pending for a retry", delivery.id)
                continue
            self.ack(delivery)

    def close(self) -> None:
        """Stop :meth:`serve` / iteration after the read in progress."""
        self._closed = True

    # ------------------------------------------------------------------ internals

    def _claim(self) -> list[Delivery]:
        got = self.redis.xautoclaim(
            self.stream, self.group, self.consumer, self.claim_idle_ms,
            start_id=self._claim_cursor, count=self.count,
        )
        # [next cursor, entries, (Redis 7) deleted ids]
        cursor, entries = got[0], got[1]
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
        return self._parsed(entries, claimed=True)

    def _parsed(self, entries, claimed: bool) -> list[Delivery]:
        out = []
        for entry_id, fields in entries:
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            if fields is None:  # deleted from the stream while pending
                self.redis.xack(self.stream, self.group, entry_id)
                continue
            try:
                out.append(Delivery(entry_id, parse_entry(fields), claimed))
            except InboundBodyError as e:
                self.redis.xack(self.stream, self.group, entry_id)
                self.on_bad(entry_id, fields, e)
        return out

    @staticmethod
    def _log_bad(entry_id: str, fields: dict, err: Exception) -> None:
        log.warning("inbound entry %s is not a valid message (%s): acknowledged and skipped", entry_id, err)
