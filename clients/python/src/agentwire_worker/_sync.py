"""The thread-based :class:`Publisher` and its :class:`Run` helper.

One background sender thread builds batches (see ``_core.Core.take_batch``) after a
``batch_ms`` window and hands each to a small pool of ``max_in_flight`` threads that
POST it through one pooled, keep-alive ``httpx.Client``. Everything shared is guarded
by one condition variable; the HTTP calls happen outside it.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import httpx

from . import _core
from .errors import (
    AgentwireError,
    PublishError,
    PublisherClosedError,
    QueueFullError,
    RunEndedError,
)

log = logging.getLogger("agentwire_worker")


def events_url(url: str) -> str:
    """``http://host:port`` (or a URL already ending in /api/events) -> the publish URL."""
    url = url.rstrip("/")
    return url if url.endswith("/api/events") else url + "/api/events"


def new_run_id() -> str:
    """``r-`` and 16 random hex digits."""
    return "r-" + secrets.token_hex(8)


def retry_after(headers: Any) -> Optional[float]:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def raise_collected(errors: list[PublishError]) -> None:
    """flush()'s error: the first failure, with all of them in ``.errors``."""
    if not errors:
        return
    first = errors[0]
    first.errors = list(errors)  # type: ignore[attr-defined]
    raise first


class _Options:
    """Constructor arguments shared by both publishers (validated once)."""

    def __init__(
        self,
        url: str,
        publish_key: str,
        batch_ms: float,
        timeout_s: float,
        retries: int,
        max_in_flight: int,
        max_queue: int,
        max_batch_events: int,
        max_batch_bytes: int,
        backoff_ms: float,
        max_backoff_ms: float,
    ) -> None:
        if not isinstance(publish_key, str) or not publish_key:
            raise ValueError("publish_key must be a non-empty string")
        if batch_ms < 0 or timeout_s <= 0 or retries < 0 or max_in_flight < 1 or max_queue < 1:
            raise ValueError("batch_ms >= 0, timeout_s > 0, retries >= 0, max_in_flight >= 1, max_queue >= 1")
        if not 1 <= max_batch_events <= _core.MAX_BATCH_EVENTS:
            raise ValueError(f"max_batch_events must be within 1..{_core.MAX_BATCH_EVENTS}")
        if not 64 <= max_batch_bytes <= _core.MAX_PUBLISH_BYTES:
            raise ValueError(f"max_batch_bytes must be within 64..{_core.MAX_PUBLISH_BYTES}")
        self.url = events_url(url)
        self.headers = {
            "Authorization": f"Bearer {publish_key}",
            "Content-Type": "application/json",
        }
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.config = _core.Config(
            batch_s=batch_ms / 1000.0,
            max_events=max_batch_events,
            max_bytes=max_batch_bytes,
            retries=retries,
            backoff_s=backoff_ms / 1000.0,
            max_backoff_s=max_backoff_ms / 1000.0,
        )


class Run:
    """One agent run (mirrors the Rust ``RunHandle``): one method per critical event
    and :meth:`emit` for the others. Use it as a context manager: leaving the block
    without an end sends ``agent_completed``; an exception sends
    ``agent_error {"reason": "exception", "error": str(e)}`` and propagates.

    Emits only queue the event (they block only while the publisher's queue is full);
    a publish failure of this run is raised by its next method call and at the end of
    the ``with`` block (which waits until the run's events are sent).
    """

    def __init__(self, publisher: "Publisher", state: _core.RunState) -> None:
        self._pub = publisher
        self._state = state

    run_id = property(lambda self: self._state.run_id, doc="The run id (generated when None was given).")
    user_id = property(lambda self: self._state.user_id, doc="The user the events go to.")
    thread_id = property(lambda self: self._state.thread_id, doc="The thread, or None.")
    agent_name = property(lambda self: self._state.agent_name, doc="The agent's name.")
    cancelled = property(
        lambda self: self._state.cancelled,
        doc="True once a publish answer listed this run in ``cancelled`` (a user asked to cancel it).",
    )
    ended = property(lambda self: self._state.ended, doc="True once agent_completed or agent_error was emitted.")
    error = property(lambda self: self._state.error, doc="The PublishError that failed this run, or None.")

    def emit(self, event_type: str, data: Any = None) -> None:
        """Queue an event of any valid type (``^[a-z][a-z0-9_]{0,63}$``, e.g.
        ``text_delta``). ``data`` (default ``{}``) must be JSON-serializable.
        Raises ValueError (bad type), TypeError (data), RunEndedError, the run's
        PublishError, QueueFullError, PublisherClosedError."""
        self._pub._emit(self._state, event_type, data)

    def agent_started(self, data: Any = None) -> None:
        """``agent_started``."""
        self._pub._emit(self._state, "agent_started", data)

    def agent_thinking(self, data: Any = None) -> None:
        """``agent_thinking``."""
        self._pub._emit(self._state, "agent_thinking", data)

    def tool_executing(self, data: Any = None) -> None:
        """``tool_executing``."""
        self._pub._emit(self._state, "tool_executing", data)

    def tool_completed(self, data: Any = None) -> None:
        """``tool_completed``."""
        self._pub._emit(self._state, "tool_completed", data)

    def agent_completed(self, data: Any = None) -> None:
        """``agent_completed``: ends the run."""
        self._pub._emit(self._state, "agent_completed", data)

    def agent_error(self, data: Any = None) -> None:
        """``agent_error``: ends the run."""
        self._pub._emit(self._state, "agent_error", data)

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until every event of this run queued so far is sent (or failed);
        raise the run's PublishError if it failed, TimeoutError after ``timeout``."""
        self._pub._wait_run(self._state, timeout)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        st = self._state
        if exc is None:
            if not st.ended:
                self.agent_completed()
            self.wait()
            return False
        if not st.ended and st.error is None:
            try:
                self.agent_error({"reason": "exception", "error": str(exc)})
                self.wait()
            except AgentwireError as e:
                log.error("run %r: the agent_error for %r could not be published: %s", st.run_id, exc, e)
        return False

    def __repr__(self) -> str:
        return f"<Run {self.run_id!r} user={self.user_id!r} ended={self.ended} cancelled={self.cancelled}>"


class Publisher:
    """Publishes events to ``POST /api/events`` of an agentwire gateway.

    ``Publisher(url, publish_key, batch_ms=5, timeout_s=10, retries=8)``: ``url`` is
    the gateway's base URL (``http://127.0.0.1:8080``). Events emitted within
    ``batch_ms`` go in one request (at most ``max_batch_events`` = 1000 events and
    ``max_batch_bytes`` = 1 MiB of body); one run's events are sent in order, never in
    two requests at once; up to ``max_in_flight`` requests (of different runs) at once.
    ``timeout_s`` bounds each HTTP request; 502/503/504, refused connections and
    timeouts are retried up to ``retries`` times with exponential backoff
    (``backoff_ms`` doubling up to ``max_backoff_ms``, with jitter, at least any
    ``Retry-After``); 4xx answers never are. Thread-safe.
    """

    def __init__(
        self,
        url: str,
        publish_key: str,
        *,
        batch_ms: float = 5.0,
        timeout_s: float = 10.0,
        retries: int = 8,
        max_in_flight: int = 4,
        max_queue: int = 100_000,
        max_batch_events: int = _core.MAX_BATCH_EVENTS,
        max_batch_bytes: int = _core.MAX_PUBLISH_BYTES,
        backoff_ms: float = 100.0,
        max_backoff_ms: float = 5000.0,
        client: Optional[httpx.Client] = None,
    ) -> None:
        self._opt = _Options(
            url, publish_key, batch_ms, timeout_s, retries, max_in_flight, max_queue,
            max_batch_events, max_batch_bytes, backoff_ms, max_backoff_ms,
        )
        self._own_client = client is None
        self._client = client or httpx.Client(
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight),
        )
        self._core = _core.Core(self._opt.config, max_queue)
        self._cond = threading.Condition()
        self._runs: "weakref.WeakValueDictionary[tuple, _core.RunState]" = weakref.WeakValueDictionary()
        self._inflight = 0  # requests (batches) being sent
        self._flushing = 0  # flush()/wait() calls waiting: no batch window
        self._idle = False  # the sender waits for work: wake it on the next emit
        self._closing = False
        self._abort = threading.Event()  # close() gave up: stop sleeping between retries
        self._sender: Optional[threading.Thread] = None
        self._pool: Optional[ThreadPoolExecutor] = None

    # ------------------------------------------------------------ public API

    @property
    def url(self) -> str:
        """The publish endpoint."""
        return self._opt.url

    @property
    def stats(self) -> dict:
        """Counters: requests (HTTP attempts), retries, batches, events_enqueued,
        events_sent, events_failed."""
        with self._cond:
            return dict(self._core.stats)

    def run(
        self,
        user_id: str,
        *,
        agent_name: str,
        thread_id: Optional[str] = None,
        run_id: Optional[str] = None,
    ) -> Run:
        """A :class:`Run` of ``user_id``; ``run_id`` None generates ``r-`` + 16 hex.
        Raises ValueError for identifiers the gateway would refuse, or when a run with
        this id of this user is still open in this publisher."""
        if run_id is None:
            run_id = new_run_id()
        _core.check_run_fields(user_id, run_id, agent_name, thread_id)
        with self._cond:
            self._check_open()
            old = self._runs.get((user_id, run_id))
            if old is not None and not old.ended and old.error is None:
                raise ValueError(f"run {run_id!r} of user {user_id!r} is already open in this publisher")
            st = _core.RunState(user_id, run_id, agent_name, thread_id)
            self._runs[(user_id, run_id)] = st
        return Run(self, st)

    def flush(self, timeout: Optional[float] = None) -> None:
        """Block until every event queued before the call is sent or failed. Raises the
        first PublishError not already raised by its run (all of them in
        ``err.errors``) and TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            targets = self._core.flush_targets()
            self._wait_for(lambda: all(st.resolved >= n for st, n in targets), deadline)
            raise_collected(self._core.take_unsurfaced())

    def close(self, timeout: Optional[float] = None) -> None:
        """Send what is queued (as flush()), then stop the threads and the HTTP client.
        After ``timeout`` seconds, retries are abandoned and what is left fails.
        Raises like flush(); the resources are released in any case."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._closing and self._sender is None:
                return
            self._closing = True
            self._cond.notify_all()
        try:
            with self._cond:
                targets = self._core.flush_targets()
                try:
                    self._wait_for(lambda: all(st.resolved >= n for st, n in targets), deadline)
                except TimeoutError:
                    self._abort.set()
                    raise
                raise_collected(self._core.take_unsurfaced())
        finally:
            self._abort.set()
            with self._cond:
                self._core.fail_queued(PublisherClosedError("the publisher was closed before the events could be sent"))
                self._cond.notify_all()
                sender, pool = self._sender, self._pool
                self._sender = None
            if sender is not None:
                sender.join()
            if pool is not None:
                pool.shutdown(wait=True)
            if self._own_client:
                self._client.close()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        if exc is None:
            self.close()
        else:
            try:
                self.close()
            except AgentwireError as e:
                log.error("publisher closed after %r with a publish error: %s", exc, e)
        return False

    # ------------------------------------------------------------ emitting

    def _check_open(self) -> None:
        if self._closing:
            raise PublisherClosedError("the publisher is closed")

    def _emit(self, st: _core.RunState, event_type: str, data: Any) -> None:
        _core.check_type(event_type)
        data_json = _core.dump_data(data)
        with self._cond:
            self._check_open()
            if st.error is not None:
                raise self._core.surface(st)
            if st.ended:
                raise RunEndedError(f"run {st.run_id!r} already ended; {event_type} not sent")
            if self._core.pending >= self._core.max_queue:
                deadline = time.monotonic() + self._opt.timeout_s
                try:
                    self._wait_for(lambda: self._core.pending < self._core.max_queue or self._closing, deadline)
                except TimeoutError:
                    raise QueueFullError(
                        f"{self._core.pending} events waiting for {self._opt.timeout_s} s; {event_type} not sent",
                        run_id=st.run_id, user_id=st.user_id,
                    ) from None
                self._check_open()
            ev = st.encode(event_type, data_json)
            ev.t = time.monotonic()
            self._core.enqueue(ev)
            self._ensure_threads()
            if self._idle or self._core.pending == self._opt.config.max_events:
                self._cond.notify_all()

    def _wait_run(self, st: _core.RunState, timeout: Optional[float]) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = st.enqueued
            self._wait_for(lambda: st.resolved >= target, deadline)
            if st.error is not None:
                raise self._core.surface(st)

    def _wait_for(self, pred: Any, deadline: Optional[float]) -> None:
        """Wait (holding the condition) until pred(); no batch window meanwhile."""
        if pred():
            return
        self._flushing += 1
        self._cond.notify_all()
        try:
            while not pred():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("agentwire_worker: timed out waiting for events to be sent")
                self._cond.wait(left)
        finally:
            self._flushing -= 1

    # ------------------------------------------------------------ sending

    def _ensure_threads(self) -> None:
        if self._sender is None and not self._abort.is_set():
            self._pool = ThreadPoolExecutor(self._opt.max_in_flight, thread_name_prefix="agentwire-post")
            self._sender = threading.Thread(target=self._send_loop, name="agentwire-sender", daemon=True)
            self._sender.start()

    def _send_loop(self) -> None:
        core, cfg, cond = self._core, self._opt.config, self._cond
        with cond:
            while True:
                while not (core.has_sendable() and self._inflight < self._opt.max_in_flight):
                    if self._abort.is_set():
                        return
                    self._idle = not core.has_sendable()  # else a finished request wakes us
                    cond.wait()
                    self._idle = False
                oldest = core.oldest_ready()
                if cfg.batch_s > 0 and oldest is not None:
                    end = oldest + cfg.batch_s
                    while (
                        not self._flushing
                        and not self._closing
                        and core.pending < cfg.max_events
                        and time.monotonic() < end
                    ):
                        cond.wait(end - time.monotonic())
                if self._abort.is_set():
                    return
                while core.has_sendable() and self._inflight < self._opt.max_in_flight:
                    batch = core.take_batch()
                    if not batch:
                        break
                    self._inflight += 1
                    assert self._pool is not None
                    self._pool.submit(self._send_batch, batch)
                if self._flushing:
                    cond.notify_all()  # emitters waiting for queue space

    def _send_batch(self, batch: list) -> None:
        core, cond = self._core, self._cond
        resolved: set = set()
        plan = _core.send_plan(batch, self._opt.config)
        try:
            action = next(plan)
            while True:
                if isinstance(action, _core.Post):
                    with cond:
                        core.stats["requests"] += 1
                    answer: Any
                    try:
                        r = self._client.post(self._opt.url, content=action.body, headers=self._opt.headers)
                        answer = _core.Answer(r.status_code, r.content, retry_after(r.headers))
                    except Exception as e:  # noqa: BLE001 - the plan classifies it
                        answer = e
                    action = plan.send(answer)
                elif isinstance(action, _core.Sleep):
                    with cond:
                        core.stats["retries"] += 1
                    if self._abort.wait(action.seconds):
                        err = PublishError("the publisher was closed before the events could be sent")
                        with cond:
                            core.fail([ev for ev in batch if id(ev) not in resolved], err)
                            cond.notify_all()
                        return
                    action = next(plan)
                else:
                    with cond:
                        if isinstance(action, _core.Deliver):
                            core.deliver(action.events, action.cancelled)
                        else:
                            core.fail(action.events, action.error)
                        resolved.update(id(ev) for ev in action.events)
                        cond.notify_all()
                    action = next(plan)
        except StopIteration:
            pass
        except BaseException as e:  # a bug must not leave waiters hanging
            log.exception("agentwire_worker: sending a batch failed")
            err = PublishError(f"internal error while sending: {e!r}")
            with cond:
                core.fail([ev for ev in batch if id(ev) not in resolved], err)
        finally:
            with cond:
                core.batch_done(batch)
                self._inflight -= 1
                cond.notify_all()
