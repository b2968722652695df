"""AsyncPublisher against the real gateway: a whole run, concurrent runs in order,
the exception path, retries on a late gateway, 429, the type rule. Each test body runs
in asyncio.run with its own asyncio.wait_for deadline (besides pytest-timeout)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agentwire_worker import AsyncPublisher, PublishError, RunEndedError, TooManyRunsError
from conftest import PUBLISH_KEY, Client, RequestLog


def run_async(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_async_whole_run_and_exception(gateway, client_factory):
    ws = client_factory("ana")

    async def main():
        async with AsyncPublisher(gateway.url, PUBLISH_KEY) as pub:
            async with pub.run("ana", agent_name="data_agent", thread_id="t9") as run:
                await run.agent_started({"message": "q"})
                await run.agent_thinking({"thought": "t"})
                await run.tool_executing({"tool": "sql", "args": {}})
                await run.tool_completed({"tool": "sql", "result": 1})
                await run.emit("text_delta", {"delta": "one"})
            with pytest.raises(RunEndedError):
                await run.emit("text_delta", {"delta": "late"})
            with pytest.raises(ZeroDivisionError):
                async with pub.run("ana", agent_name="data_agent") as bad:
                    await bad.agent_started()
                    1 / 0
            with pytest.raises(ValueError):
                await bad.emit("Not-A-Type")
            return run.run_id, bad.run_id

    rid, bad_rid = run_async(main())
    evs = ws.events(8)
    assert [(e["run_id"], e["type"]) for e in evs] == [
        (rid, "agent_started"), (rid, "agent_thinking"), (rid, "tool_executing"),
        (rid, "tool_completed"), (rid, "text_delta"), (rid, "agent_completed"),
        (bad_rid, "agent_started"), (bad_rid, "agent_error"),
    ]
    assert evs[0]["thread_id"] == "t9" and evs[0]["agent_name"] == "data_agent"
    assert evs[-1]["data"] == {"reason": "exception", "error": "division by zero"}
    seqs = [e["seq"] for e in evs]
    assert seqs == list(range(seqs[0], seqs[0] + 8))


def test_async_concurrent_runs_keep_their_order_and_batch(gateway, client_factory):
    ws = client_factory("ben")
    log = RequestLog()
    per_run, runs = 400, 10

    async def one(pub, k):
        async with pub.run("ben", agent_name="a", run_id=f"ar-{k}") as run:
            await run.agent_started()
            for i in range(per_run):
                await run.emit("text_delta", {"i": i})
                if i % 40 == 0:
                    await asyncio.sleep(0)  # interleave the runs

    async def main():
        client = log.async_client()
        try:
            async with AsyncPublisher(gateway.url, PUBLISH_KEY, batch_ms=2, client=client) as pub:
                await asyncio.gather(*(one(pub, k) for k in range(runs)))
                return pub.stats
        finally:
            await client.aclose()

    stats = run_async(main())
    total = runs * (per_run + 2)
    evs = ws.events(total)
    by_run: dict = {}
    for e in evs:
        by_run.setdefault(e["run_id"], []).append(e)
    assert len(by_run) == runs
    for rid, got in by_run.items():
        assert got[0]["type"] == "agent_started" and got[-1]["type"] == "agent_completed"
        assert [e["data"]["i"] for e in got[1:-1]] == list(range(per_run)), rid
    assert log.overlaps == []
    assert stats["requests"] == len(log.bodies) < total / 20
    assert gateway.stats()["events"]["published"] == total


def test_async_retries_until_a_late_gateway_answers(gateway_factory):
    gw = gateway_factory(start=False)
    starter = threading.Timer(0.3, gw.start)
    starter.start()

    async def main():
        async with AsyncPublisher(gw.url, PUBLISH_KEY, backoff_ms=50, retries=10) as pub:
            async with pub.run("cat", agent_name="a") as run:
                await run.agent_started()
            return pub.stats

    try:
        stats = run_async(main())
    finally:
        starter.join()
    assert stats["retries"] >= 1 and stats["events_sent"] == 2
    c = Client(gw, "cat")
    assert c.connected["last_seq"] == 2  # each event routed once
    c.close()


def test_async_no_retry_on_401_and_429_surfaced(gateway_factory):
    gw = gateway_factory("--max-active-runs-per-user", "1")

    async def main():
        pub = AsyncPublisher(gw.url, "wrong-key-wrong-key")
        with pytest.raises(PublishError) as info:
            async with pub.run("dan", agent_name="a") as run:
                await run.agent_started()
        assert info.value.status == 401 and pub.stats["requests"] == 1
        await pub.close()

        pub = AsyncPublisher(gw.url, PUBLISH_KEY, batch_ms=300)
        first = pub.run("dan", agent_name="a")
        second = pub.run("dan", agent_name="a")
        await first.agent_started()
        await second.agent_started()
        with pytest.raises(TooManyRunsError) as info:
            await pub.flush()
        assert info.value.run_id == second.run_id and first.error is None
        assert pub.stats["retries"] == 0
        await first.agent_completed()
        await pub.close()

    run_async(main())
