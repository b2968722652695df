"""The I/O-free heart of the publishers, shared by the sync and asyncio variants.

* :func:`encode_event` validates and serializes one event (on the caller's thread, so
  a later change to ``data`` never changes what is sent).
* :class:`RunState` is one run's queue and fate (sent, failed, cancelled).
* :class:`Core` holds every queued event and builds batches: at most ``max_events``
  events and ``max_bytes`` bytes of body, taking from each run a prefix of its queue,
  and never a run that has a request in flight (so one run's events are sent in order,
  one request at a time; different runs go in parallel).
* :func:`send_plan` is the life of one batch as a generator: it yields :class:`Post`,
  :class:`Sleep`, :class:`Deliver` and :class:`Fail` actions and receives the answers
  of the posts, so the retry, split and refusal rules are written once. The drivers
  (``_sync.py``, ``_async.py``) only perform the actions.

The core has no lock: the sync driver calls it under its condition's lock, the async
driver from its event loop only.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Generator, Iterable, Optional, Union

from .errors import PublishError, TooManyRunsError

TYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
#: Frame types the gateway sends itself; a worker may not emit them.
RESERVED_TYPES = frozenset(
    {"connected", "pong", "ack", "error", "refreshed", "cancel_requested"}
)
CRITICAL_TYPES = (
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "agent_completed",
    "agent_error",
)
ENDING_TYPES = frozenset({"agent_completed", "agent_error"})
MAX_USER_ID_BYTES = 128
MAX_NAME_BYTES = 256
MAX_IDEMPOTENCY_KEY_BYTES = 128
#: The gateway's limits on one publish request (PROTOCOL.md section 6).
MAX_BATCH_EVENTS = 1000
MAX_PUBLISH_BYTES = 1_048_576
#: Answers worth retrying: the gateway (or a proxy before it) is not available now.
RETRY_STATUSES = frozenset({502, 503, 504})


def check_type(event_type: str) -> str:
    """Raise ValueError unless ``event_type`` may be published."""
    if not isinstance(event_type, str) or not TYPE_RE.fullmatch(event_type):
        raise ValueError(
            f"event type {event_type!r} is not valid (expected ^[a-z][a-z0-9_]{{0,63}}$)"
        )
    if event_type in RESERVED_TYPES:
        raise ValueError(f"event type {event_type!r} is reserved for gateway frames")
    return event_type


def _check_name(name: str, value: Any, limit: int, *, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if not isinstance(value, str) or not value or len(value.encode()) > limit:
        extra = "None or " if nullable else ""
        raise ValueError(f"{name} must be {extra}a non-empty string of at most {limit} bytes, not {value!r:.80}")


def check_run_fields(
    user_id: str, run_id: str, agent_name: str, thread_id: Optional[str]
) -> None:
    """Raise ValueError for identifiers the gateway would refuse."""
    _check_name("user_id", user_id, MAX_USER_ID_BYTES)
    _check_name("run_id", run_id, MAX_NAME_BYTES)
    if not isinstance(agent_name, str) or len(agent_name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"agent_name must be a string of at most {MAX_NAME_BYTES} bytes")
    _check_name("thread_id", thread_id, MAX_NAME_BYTES, nullable=True)


def idempotency_key(run_id: str, nonce: str, n: int) -> str:
    """The key of the n-th event of one run handle: ``run_id:nonce:n`` (the nonce is
    random per handle, so two handles of one run id, in one process or two, never share
    a key), or a digest of the run id in its place when that would pass the gateway's
    128 bytes."""
    key = f"{run_id}:{nonce}:{n}"
    if len(key.encode()) <= MAX_IDEMPOTENCY_KEY_BYTES:
        return key
    return f"{hashlib.sha256(run_id.encode()).hexdigest()}:{nonce}:{n}"


@dataclass(eq=False)
class Event:
    """One serialized event, queued or in a request."""

    state: "RunState"
    type: str
    body: bytes  # the JSON object, ready to be joined into the request's array
    t: float = 0.0  # time.monotonic() when queued


@dataclass(eq=False)
class RunState:
    """One run's events on their way and what became of them."""

    user_id: str
    run_id: str
    agent_name: str
    thread_id: Optional[str]
    counter: int = 0  # events created (the idempotency key's n)
    nonce: str = field(default_factory=lambda: secrets.token_hex(4))  # the key's handle part
    queue: deque = field(default_factory=deque)  # events not yet in a request
    in_flight: bool = False
    enqueued: int = 0
    resolved: int = 0  # events sent or failed (always a prefix of the run's events)
    ended: bool = False  # agent_completed / agent_error was emitted
    cancelled: bool = False
    error: Optional[PublishError] = None
    surfaced: bool = False  # the error was raised to the worker already

    @property
    def key(self) -> tuple:
        return (self.user_id, self.run_id)

    def encode(self, event_type: str, data_json: bytes) -> Event:
        """The next event of this run around already serialized data (does not queue
        it). Call with the type checked and under the driver's lock: it takes the next
        idempotency key."""
        n = self.counter + 1
        head = json.dumps(
            {
                "type": event_type,
                "user_id": self.user_id,
                "thread_id": self.thread_id,
                "run_id": self.run_id,
                "agent_name": self.agent_name,
                "idempotency_key": idempotency_key(self.run_id, self.nonce, n),
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()
        body = head[:-1] + b',"data":' + data_json + b"}"
        if len(body) + 2 > MAX_PUBLISH_BYTES:
            raise ValueError(
                f"event of {len(body)} bytes is larger than a publish request may be ({MAX_PUBLISH_BYTES} bytes)"
            )
        self.counter = n
        return Event(self, event_type, body)


def dump_data(data: Any) -> bytes:
    """Serialize an event's data (None is sent as {}); TypeError when not JSON."""
    try:
        return json.dumps(
            {} if data is None else data, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
    except (TypeError, ValueError) as e:
        raise TypeError(f"event data is not JSON-serializable: {e}") from e


@dataclass
class Config:
    batch_s: float
    max_events: int
    max_bytes: int
    retries: int
    backoff_s: float
    max_backoff_s: float

    def backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        """Delay before retry number ``attempt`` (from 0): exponential, with jitter in
        [d/2, d]; a ``Retry-After`` (bounded by max_backoff_s) wins when larger."""
        d = min(self.max_backoff_s, self.backoff_s * (2 ** attempt))
        delay = d / 2 + random.random() * d / 2
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff_s))
        return delay


class Core:
    """Every queued event, the runs ready to send, the batch builder."""

    def __init__(self, config: Config, max_queue: int) -> None:
        self.config = config
        self.max_queue = max_queue
        self.pending = 0  # events queued, not yet in a request
        self.ready: "OrderedDict[tuple, RunState]" = OrderedDict()  # runs with queued events, not in flight
        self.unsurfaced: dict[int, PublishError] = {}  # failures no run has raised yet: flush() raises them
        self.active: dict[int, RunState] = {}  # runs with events not yet resolved
        self.stats = {
            "requests": 0,
            "retries": 0,
            "batches": 0,
            "events_enqueued": 0,
            "events_sent": 0,
            "events_failed": 0,
        }

    # ------------------------------------------------------------ queueing

    def enqueue(self, ev: Event) -> None:
        st = ev.state
        st.queue.append(ev)
        st.enqueued += 1
        self.active[id(st)] = st
        self.pending += 1
        self.stats["events_enqueued"] += 1
        if ev.type in ENDING_TYPES:
            st.ended = True
        if not st.in_flight and st.key not in self.ready:
            self.ready[st.key] = st

    def oldest_ready(self) -> Optional[float]:
        """When the oldest run ready to send queued its first waiting event."""
        for st in self.ready.values():
            return st.queue[0].t if st.queue else None
        return None

    def flush_targets(self) -> list[tuple[RunState, int]]:
        """What a flush waits for: each active run's count of events queued so far."""
        return [(st, st.enqueued) for st in self.active.values()]

    def has_sendable(self) -> bool:
        return bool(self.ready)

    def take_batch(self) -> list[Event]:
        """Up to max_events events and max_bytes of body, a prefix of each ready run's
        queue, oldest runs first; the runs taken are marked in flight."""
        batch: list[Event] = []
        size = 2  # the brackets
        full = False
        taken: list[RunState] = []
        for key in list(self.ready.keys()):
            st = self.ready[key]
            took = False
            while st.queue:
                ev = st.queue[0]
                extra = len(ev.body) + (1 if batch else 0)
                if len(batch) >= self.config.max_events or size + extra > self.config.max_bytes:
                    full = True
                    break
                st.queue.popleft()
                batch.append(ev)
                size += extra
                took = True
            if took:
                taken.append(st)
            if full:
                break
        for st in taken:
            st.in_flight = True
            del self.ready[st.key]
        self.pending -= len(batch)
        if batch:
            self.stats["batches"] += 1
        return batch

    def batch_done(self, batch: Iterable[Event]) -> None:
        """The request(s) of a batch are over: its runs may send again."""
        for st in {id(ev.state): ev.state for ev in batch}.values():
            st.in_flight = False
            if st.queue:
                self.ready[st.key] = st

    # ------------------------------------------------------------ outcomes

    def deliver(self, events: list[Event], cancelled: list[str]) -> None:
        self.stats["events_sent"] += len(events)
        for ev in events:
            ev.state.resolved += 1
            if ev.state.resolved >= ev.state.enqueued:
                self.active.pop(id(ev.state), None)
        if cancelled:
            ids = set(cancelled)
            for ev in events:
                if ev.state.run_id in ids:
                    ev.state.cancelled = True

    def fail(self, events: list[Event], error: PublishError) -> None:
        """These events failed: their runs fail, with their queued events too."""
        per_run: dict[int, tuple[RunState, int]] = {}
        for ev in events:
            st, n = per_run.get(id(ev.state), (ev.state, 0))
            per_run[id(ev.state)] = (st, n + 1)
        for st, n in per_run.values():
            self._fail_run(st, n, error)

    def _fail_run(self, st: RunState, n: int, error: Exception) -> None:
        """n of the run's events in a request failed; its queued ones fail too."""
        dropped = len(st.queue)
        st.queue.clear()
        self.pending -= dropped
        self.ready.pop(st.key, None)
        st.resolved += n + dropped
        if st.resolved >= st.enqueued:
            self.active.pop(id(st), None)
        self.stats["events_failed"] += n + dropped
        if st.error is None:
            if isinstance(error, PublishError):
                st.error = error.for_run(st.user_id, st.run_id, n + dropped)
            else:
                st.error = PublishError(str(error), run_id=st.run_id, user_id=st.user_id, events=n + dropped)
            self.unsurfaced[id(st.error)] = st.error

    def fail_queued(self, error: Exception) -> None:
        """Fail every event not yet in a request (the publisher is closing)."""
        for st in list(self.ready.values()):
            self._fail_run(st, 0, error)

    def surface(self, st: RunState) -> PublishError:
        """The run's error, now raised by the run itself (flush() will not)."""
        assert st.error is not None
        self.unsurfaced.pop(id(st.error), None)
        return st.error

    def take_unsurfaced(self) -> list[PublishError]:
        errs = list(self.unsurfaced.values())
        self.unsurfaced.clear()
        return errs


# ---------------------------------------------------------------- one batch's life


@dataclass
class Post:
    body: bytes
    events: int


@dataclass
class Sleep:
    seconds: float


@dataclass
class Deliver:
    events: list
    cancelled: list


@dataclass
class Fail:
    events: list
    error: PublishError


@dataclass
class Answer:
    """What a driver sends back into the plan for a Post."""

    status: int
    body: bytes
    retry_after: Optional[float] = None


Action = Union[Post, Sleep, Deliver, Fail]


def encode_batch(events: list[Event]) -> bytes:
    return b"[" + b",".join(ev.body for ev in events) + b"]"


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def error_from_answer(ans: Answer) -> PublishError:
    doc = _json(ans.body)
    code = doc.get("error") if isinstance(doc, dict) else None
    message = doc.get("message") if isinstance(doc, dict) else None
    index = doc.get("index") if isinstance(doc, dict) else None
    if not isinstance(index, int) or isinstance(index, bool):
        index = None
    if not isinstance(message, str):
        message = ans.body[:200].decode("utf-8", "replace") or f"HTTP {ans.status}"
    cls = TooManyRunsError if ans.status == 429 and code == "too_many_runs" else PublishError
    return cls(message, status=ans.status, code=code if isinstance(code, str) else None, index=index, body=doc)


def parse_cancelled(body: bytes) -> list[str]:
    """The ``cancelled`` run ids of a 202 answer (PROTOCOL.md section 6b); [] when the
    field is absent (gateways before it) or malformed."""
    doc = _json(body)
    if not isinstance(doc, dict):
        return []
    ids = doc.get("cancelled")
    if not isinstance(ids, list):
        return []
    return [x for x in ids if isinstance(x, str)]


def retryable(result: Union[Answer, BaseException]) -> bool:
    """503-like answers and transport failures (refused, reset, timeouts)."""
    if isinstance(result, Answer):
        return result.status in RETRY_STATUSES
    import httpx

    return isinstance(result, (httpx.TransportError,)) and not isinstance(
        result, httpx.UnsupportedProtocol
    )


def transport_error(result: Union[Answer, BaseException], attempts: int) -> PublishError:
    if isinstance(result, Answer):
        err = error_from_answer(result)
        err.message = f"{err.message} (after {attempts} attempts)"
        return err
    err = PublishError(
        f"{type(result).__name__}: {result} (after {attempts} attempts)"
    )
    err.__cause__ = result
    return err


def send_plan(batch: list[Event], config: Config) -> Generator[Action, Any, None]:
    """One batch from first request to final outcome.

    Segments are sent one after the other (so each run's events stay in order):
    * 2xx: delivered; ``cancelled`` (if any) marks runs cancelled.
    * 502/503/504 or a transport error: retried with backoff, at most
      ``config.retries`` times, the same body (so the same idempotency keys); then the
      segment fails.
    * 413 with more than one event: split in halves, sent in order.
    * 400/429 naming an ``index``: that event's run fails (429 too_many_runs:
      :class:`TooManyRunsError`); the others, refused only because they shared the
      request, are sent again without it (not counted as a retry).
    * any other answer (401 invalid_key, 404, ...): the whole segment fails.
    A run that failed in a segment has its events in later segments failed too.
    """
    segments: deque = deque([batch])
    failed: dict[int, PublishError] = {}
    while segments:
        seg: list[Event] = segments.popleft()
        lost = [ev for ev in seg if id(ev.state) in failed]
        if lost:
            for st_id in {id(ev.state) for ev in lost}:
                yield Fail([ev for ev in lost if id(ev.state) == st_id], failed[st_id])
            seg = [ev for ev in seg if id(ev.state) not in failed]
        if not seg:
            continue
        body = encode_batch(seg)
        attempt = 0
        while True:
            result = yield Post(body, len(seg))
            if not retryable(result):
                break
            if attempt >= config.retries:
                err = transport_error(result, attempt + 1)
                for ev in seg:
                    failed[id(ev.state)] = err
                yield Fail(seg, err)
                result = None
                break
            retry_after = result.retry_after if isinstance(result, Answer) else None
            yield Sleep(config.backoff(attempt, retry_after))
            attempt += 1
        if result is None:
            continue
        if isinstance(result, BaseException):
            err = PublishError(f"{type(result).__name__}: {result}")
            err.__cause__ = result
            for ev in seg:
                failed[id(ev.state)] = err
            yield Fail(seg, err)
            continue
        if 200 <= result.status < 300:
            yield Deliver(seg, parse_cancelled(result.body))
            continue
        if result.status == 413 and len(seg) > 1:
            mid = len(seg) // 2
            segments.appendleft(seg[mid:])
            segments.appendleft(seg[:mid])
            continue
        err = error_from_answer(result)
        if result.status in (400, 429) and err.index is not None and 0 <= err.index < len(seg):
            bad = seg[err.index].state
            failed[id(bad)] = err
            yield Fail([ev for ev in seg if ev.state is bad], err)
            rest = [ev for ev in seg if ev.state is not bad]
            if rest:
                segments.appendleft(rest)
            continue
        for ev in seg:
            failed[id(ev.state)] = err
        yield Fail(seg, err)
