"""The asyncio :class:`AsyncPublisher` and its :class:`AsyncRun` helper: the same
names and rules as the thread-based ``Publisher``, awaited.

One sender task builds batches after the ``batch_ms`` window and starts one task per
request (at most ``max_in_flight``) on a pooled, keep-alive ``httpx.AsyncClient``. A
publisher belongs to the event loop that first emits through it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any, Optional

import httpx

from . import _core
from ._sync import _Options, new_run_id, raise_collected, retry_after
from .errors import (
    AgentwireError,
    PublishError,
    PublisherClosedError,
    QueueFullError,
    RunEndedError,
)

log = logging.getLogger("agentwire_worker")


class AsyncRun:
    """One agent run, asyncio flavour: ``async with pub.run(...) as run:`` and
    ``await run.agent_started(...)``. Same rules as :class:`agentwire_worker.Run`."""

    def __init__(self, publisher: "AsyncPublisher", state: _core.RunState) -> None:
        self._pub = publisher
        self._state = state

    run_id = property(lambda self: self._state.run_id, doc="The run id (generated when None was given).")
    user_id = property(lambda self: self._state.user_id, doc="The user the events go to.")
    thread_id = property(lambda self: self._state.thread_id, doc="The thread, or None.")
    agent_name = property(lambda self: self._state.agent_name, doc="The agent's name.")
    cancelled = property(
        lambda self: self._state.cancelled,
        doc="True once a publish answer listed this run in ``cancelled``.",
    )
    ended = property(lambda self: self._state.ended, doc="True once agent_completed or agent_error was emitted.")
    error = property(lambda self: self._state.error, doc="The PublishError that failed this run, or None.")

    async def emit(self, event_type: str, data: Any = None) -> None:
        """Queue an event of any valid type (``^[a-z][a-z0-9_]{0,63}$``)."""
        await self._pub._emit(self._state, event_type, data)

    async def agent_started(self, data: Any = None) -> None:
        """``agent_started``."""
        await self._pub._emit(self._state, "agent_started", data)

    async def agent_thinking(self, data: Any = None) -> None:
        """``agent_thinking``."""
        await self._pub._emit(self._state, "agent_thinking", data)

    async def tool_executing(self, data: Any = None) -> None:
        """``tool_executing``."""
        await self._pub._emit(self._state, "tool_executing", data)

    async def tool_completed(self, data: Any = None) -> None:
        """``tool_completed``."""
        await self._pub._emit(self._state, "tool_completed", data)

    async def agent_completed(self, data: Any = None) -> None:
        """``agent_completed``: ends the run."""
        await self._pub._emit(self._state, "agent_completed", data)

    async def agent_error(self, data: Any = None) -> None:
        """``agent_error``: ends the run."""
        await self._pub._emit(self._state, "agent_error", data)

    async def wait(self, timeout: Optional[float] = None) -> None:
        """Until every event of this run queued so far is sent or failed; raises the
        run's PublishError, TimeoutError after ``timeout``."""
        await self._pub._wait_run(self._state, timeout)

    async def __aenter__(self) -> "AsyncRun":
        return self

    async def __aexit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        st = self._state
        if exc is None:
            if not st.ended:
                await self.agent_completed()
            await self.wait()
            return False
        if not st.ended and st.error is None:
            try:
                await self.agent_error({"reason": "exception", "error": str(exc)})
                await self.wait()
            except AgentwireError as e:
                log.error("run %r: the agent_error for %r could not be published: %s", st.run_id, exc, e)
        return False

    def __repr__(self) -> str:
        return f"<AsyncRun {self.run_id!r} user={self.user_id!r} ended={self.ended} cancelled={self.cancelled}>"


class AsyncPublisher:
    """asyncio publisher: the arguments and semantics of
    :class:`agentwire_worker.Publisher`; ``flush``, ``close`` and the run methods are
    awaited. ``client`` may be an ``httpx.AsyncClient`` of your own."""

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
        client: Optional[httpx.AsyncClient] = None,
    ) -> None:
        self._opt = _Options(
            url, publish_key, batch_ms, timeout_s, retries, max_in_flight, max_queue,
            max_batch_events, max_batch_bytes, backoff_ms, max_backoff_ms,
        )
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight),
        )
        self._core = _core.Core(self._opt.config, max_queue)
        self._cond = asyncio.Condition()
        self._runs: "weakref.WeakValueDictionary[tuple, _core.RunState]" = weakref.WeakValueDictionary()
        self._inflight = 0
        self._flushing = 0
        self._idle = False
        self._closing = False
        self._closed = False
        self._abort = asyncio.Event()
        self._sender: Optional[asyncio.Task] = None
        self._tasks: set = set()

    @property
    def url(self) -> str:
        """The publish endpoint."""
        return self._opt.url

    @property
    def stats(self) -> dict:
        """Counters, as :attr:`Publisher.stats`."""
        return dict(self._core.stats)

    def run(
        self,
        user_id: str,
        *,
        agent_name: str,
        thread_id: Optional[str] = None,
        run_id: Optional[str] = None,
    ) -> AsyncRun:
        """An :class:`AsyncRun` (not awaited: ``async with pub.run(...) as run``)."""
        if run_id is None:
            run_id = new_run_id()
        _core.check_run_fields(user_id, run_id, agent_name, thread_id)
        self._check_open()
        old = self._runs.get((user_id, run_id))
        if old is not None and not old.ended and old.error is None:
            raise ValueError(f"run {run_id!r} of user {user_id!r} is already open in this publisher")
        st = _core.RunState(user_id, run_id, agent_name, thread_id)
        self._runs[(user_id, run_id)] = st
        return AsyncRun(self, st)

    async def flush(self, timeout: Optional[float] = None) -> None:
        """Until every event queued before the call is sent or failed; raises as
        :meth:`Publisher.flush`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        targets = self._core.flush_targets()
        await self._wait_for(lambda: all(st.resolved >= n for st, n in targets), deadline)
        raise_collected(self._core.take_unsurfaced())

    async def close(self, timeout: Optional[float] = None) -> None:
        """Send what is queued, then stop the tasks and the HTTP client; raises as
        flush()."""
        if self._closed:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        self._closing = True
        try:
            targets = self._core.flush_targets()
            try:
                await self._wait_for(lambda: all(st.resolved >= n for st, n in targets), deadline)
            except TimeoutError:
                self._abort.set()
                raise
            raise_collected(self._core.take_unsurfaced())
        finally:
            self._closed = True
            self._abort.set()
            self._core.fail_queued(PublisherClosedError("the publisher was closed before the events could be sent"))
            await self._notify()
            if self._sender is not None:
                await self._sender
                self._sender = None
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            if self._own_client:
                await self._client.aclose()

    async def __aenter__(self) -> "AsyncPublisher":
        return self

    async def __aexit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        if exc is None:
            await self.close()
        else:
            try:
                await self.close()
            except AgentwireError as e:
                log.error("publisher closed after %r with a publish error: %s", exc, e)
        return False

    # ------------------------------------------------------------ emitting

    def _check_open(self) -> None:
        if self._closing:
            raise PublisherClosedError("the publisher is closed")

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def _emit(self, st: _core.RunState, event_type: str, data: Any) -> None:
        _core.check_type(event_type)
        data_json = _core.dump_data(data)
        self._check_open()
        if st.error is not None:
            raise self._core.surface(st)
        if st.ended:
            raise RunEndedError(f"run {st.run_id!r} already ended; {event_type} not sent")
        if self._core.pending >= self._core.max_queue:
            deadline = time.monotonic() + self._opt.timeout_s
            try:
                await self._wait_for(lambda: self._core.pending < self._core.max_queue or self._closing, deadline)
            except TimeoutError:
                raise QueueFullError(
                    f"{self._core.pending} events waiting for {self._opt.timeout_s} s; {event_type} not sent",
                    run_id=st.run_id, user_id=st.user_id,
                ) from None
            self._check_open()
            if st.error is not None or st.ended:
                return await self._emit(st, event_type, data)
        ev = st.encode(event_type, data_json)
        ev.t = time.monotonic()
        self._core.enqueue(ev)
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_loop())
        if self._idle or self._core.pending == self._opt.config.max_events:
            await self._notify()

    async def _wait_run(self, st: _core.RunState, timeout: Optional[float]) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        target = st.enqueued
        await self._wait_for(lambda: st.resolved >= target, deadline)
        if st.error is not None:
            raise self._core.surface(st)

    async def _wait_for(self, pred: Any, deadline: Optional[float]) -> None:
        if pred():
            return
        self._flushing += 1
        try:
            async with self._cond:
                self._cond.notify_all()
                while not pred():
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError("agentwire_worker: timed out waiting for events to be sent")
                    try:
                        await asyncio.wait_for(self._cond.wait(), left)
                    except asyncio.TimeoutError:
                        pass
        finally:
            self._flushing -= 1

    # ------------------------------------------------------------ sending

    async def _send_loop(self) -> None:
        core, cfg, cond = self._core, self._opt.config, self._cond
        async with cond:
            while True:
                while not (core.has_sendable() and self._inflight < self._opt.max_in_flight):
                    if self._abort.is_set():
                        return
                    self._idle = not core.has_sendable()  # else a finished request wakes us
                    await cond.wait()
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
                        try:
                            await asyncio.wait_for(cond.wait(), end - time.monotonic())
                        except asyncio.TimeoutError:
                            pass
                if self._abort.is_set():
                    return
                while core.has_sendable() and self._inflight < self._opt.max_in_flight:
                    batch = core.take_batch()
                    if not batch:
                        break
                    self._inflight += 1
                    task = asyncio.get_running_loop().create_task(self._send_batch(batch))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                if self._flushing:
                    cond.notify_all()  # emitters waiting for queue space

    async def _send_batch(self, batch: list) -> None:
        core = self._core
        resolved: set = set()
        plan = _core.send_plan(batch, self._opt.config)
        try:
            action = next(plan)
            while True:
                if isinstance(action, _core.Post):
                    core.stats["requests"] += 1
                    answer: Any
                    try:
                        r = await self._client.post(self._opt.url, content=action.body, headers=self._opt.headers)
                        answer = _core.Answer(r.status_code, r.content, retry_after(r.headers))
                    except Exception as e:  # noqa: BLE001 - the plan classifies it
                        answer = e
                    action = plan.send(answer)
                elif isinstance(action, _core.Sleep):
                    core.stats["retries"] += 1
                    try:
                        await asyncio.wait_for(self._abort.wait(), action.seconds)
                        aborted = True
                    except asyncio.TimeoutError:
                        aborted = False
                    if aborted:
                        err = PublishError("the publisher was closed before the events could be sent")
                        core.fail([ev for ev in batch if id(ev) not in resolved], err)
                        return
                    action = next(plan)
                else:
                    if isinstance(action, _core.Deliver):
                        core.deliver(action.events, action.cancelled)
                    else:
                        core.fail(action.events, action.error)
                    resolved.update(id(ev) for ev in action.events)
                    await self._notify()
                    action = next(plan)
        except StopIteration:
            pass
        except BaseException as e:
            log.exception("agentwire_worker: sending a batch failed")
            err = PublishError(f"internal error while sending: {e!r}")
            core.fail([ev for ev in batch if id(ev) not in resolved], err)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            core.batch_done(batch)
            self._inflight -= 1
            try:
                await self._notify()
            except BaseException:  # noqa: BLE001 - cancelled while closing
                pass
