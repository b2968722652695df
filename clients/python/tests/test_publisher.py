"""Publisher (sync) against the real gateway binary: what a user's WebSocket receives,
how many requests carry it, order per run under concurrency, retries, refusals."""

from __future__ import annotations

import json
import threading
import time

import pytest

from agentwire_worker import (
    Publisher,
    PublishError,
    RunEndedError,
    TooManyRunsError,
)
from conftest import PUBLISH_KEY, RequestLog

ENVELOPE = {"type", "seq", "user_id", "thread_id", "run_id", "agent_name", "ts", "data"}


def test_whole_run_arrives_in_order_with_the_envelope(gateway, client_factory):
    ws = client_factory("alice")
    log = RequestLog()
    with Publisher(gateway.url, PUBLISH_KEY, client=log.client()) as pub:
        with pub.run("alice", agent_name="data_agent", thread_id="t1") as run:
            assert run.run_id.startswith("r-") and len(run.run_id) == 18
            run.agent_started({"message": "How many users?"})
            run.agent_thinking({"thought": "count them"})
            run.tool_executing({"tool": "sql", "args": {"q": "select count(*)"}})
            run.tool_completed({"tool": "sql", "result": 42})
            run.emit("text_delta", {"delta": "There are 42 ü"})
            run.agent_completed({"answer": "42"})
            assert run.ended
        assert not run.cancelled  # no client asked to cancel it
    evs = ws.events(6)
    assert [e["type"] for e in evs] == [
        "agent_started", "agent_thinking", "tool_executing", "tool_completed", "text_delta", "agent_completed",
    ]
    first = evs[0]["seq"]
    for i, e in enumerate(evs):
        assert set(e) == ENVELOPE, e
        assert e["seq"] == first + i
        assert (e["user_id"], e["thread_id"], e["run_id"], e["agent_name"]) == ("alice", "t1", run.run_id, "data_agent")
        assert isinstance(e["ts"], int) and e["ts"] > 1_600_000_000_000
    assert evs[2]["data"] == {"tool": "sql", "args": {"q": "select count(*)"}}
    assert evs[4]["data"] == {"delta": "There are 42 ü"}
    # Every event carried an idempotency key (section 6a): run_id:nonce:n, n from 1.
    keys = [e["idempotency_key"] for body in log.bodies for e in body]
    nonce = keys[0].split(":")[1]
    assert len(nonce) == 8 and keys == [f"{run.run_id}:{nonce}:{n}" for n in range(1, 7)]
    assert ws.quiet() == []


def test_leaving_the_block_completes_the_run_and_later_emits_raise(gateway, client_factory):
    ws = client_factory("bob")
    with Publisher(gateway.url, PUBLISH_KEY) as pub:
        with pub.run("bob", agent_name="a", run_id="run-given") as run:
            run.agent_started()
        evs = ws.events(2)
        assert [(e["type"], e["run_id"], e["data"]) for e in evs] == [
            ("agent_started", "run-given", {}), ("agent_completed", "run-given", {}),
        ]
        with pytest.raises(RunEndedError):
            run.agent_thinking({"late": True})
        with pytest.raises(RunEndedError):
            run.emit("text_delta", {})
        # An ended run's id may be opened again (the gateway then refuses it: 400).
        with pytest.raises(PublishError) as info:
            with pub.run("bob", agent_name="a", run_id="run-given") as again:
                again.agent_thinking()
        assert info.value.status == 400 and info.value.code == "bad_event"
        assert "already ended" in info.value.message


def test_an_exception_in_the_body_sends_agent_error_and_propagates(gateway, client_factory):
    ws = client_factory("carol")
    with Publisher(gateway.url, PUBLISH_KEY) as pub:
        with pytest.raises(KeyError):
            with pub.run("carol", agent_name="a", thread_id=None) as run:
                run.agent_started({"m": 1})
                raise KeyError("missing column")
    evs = ws.events(2)
    assert [e["type"] for e in evs] == ["agent_started", "agent_error"]
    assert evs[1]["data"] == {"reason": "exception", "error": str(KeyError("missing column"))}
    assert evs[1]["thread_id"] is None
    assert ws.quiet() == []


def test_batching_many_events_few_requests(gateway, client_factory):
    ws = client_factory("dave")
    log = RequestLog()
    n = 3000
    with Publisher(gateway.url, PUBLISH_KEY, batch_ms=50, client=log.client()) as pub:
        with pub.run("dave", agent_name="a") as run:
            run.agent_started()
            for i in range(n):
                run.emit("text_delta", {"i": i})
    total = n + 2
    evs = ws.events(total)
    assert [e["data"].get("i") for e in evs[1:-1]] == list(range(n))
    sizes = [len(b) for b in log.bodies]
    assert sum(sizes) == total
    assert max(sizes) <= 1000
    # 3002 events need at least 4 requests; batching keeps it near that, far from 3002.
    assert len(sizes) <= 30, sizes
    assert gateway.stats()["events"]["published"] == total
    assert pub.stats["requests"] == len(sizes) and pub.stats["retries"] == 0


def test_a_batch_is_split_by_size_under_max_publish_bytes(gateway_factory, client_factory):
    gw = gateway_factory("--max-publish-bytes", "4096")
    ws = client_factory("erin", gw)
    log = RequestLog()
    pad = "x" * 900
    with Publisher(gw.url, PUBLISH_KEY, batch_ms=50, max_batch_bytes=1_048_576, client=log.client()) as pub:
        with pub.run("erin", agent_name="a") as run:
            for i in range(12):
                run.emit("text_delta", {"i": i, "pad": pad})
    evs = ws.events(13)
    assert [e["data"].get("i") for e in evs[:-1]] == list(range(12))
    # The gateway answered 413 to the large batch; the halves (in order) went through.
    assert 413 in log.statuses
    assert gw.stats()["events"]["published"] == 13
    # And with max_batch_bytes set to the gateway's limit no 413 happens at all.
    log2 = RequestLog()
    with Publisher(gw.url, PUBLISH_KEY, batch_ms=50, max_batch_bytes=4096, client=log2.client()) as pub:
        with pub.run("erin", agent_name="a") as run:
            for i in range(12):
                run.emit("text_delta", {"i": i, "pad": pad})
    assert set(log2.statuses) == {202}
    assert all(len(raw) <= 4096 for raw in log2.raw)
    assert len(log2.raw) >= 3
    assert [e["data"].get("i") for e in ws.events(13)[:-1]] == list(range(12))


def test_order_per_run_under_concurrency(gateway, client_factory):
    users = ["u1", "u2"]
    clients = {u: client_factory(u) for u in users}
    log = RequestLog()
    per_run = 300
    runs = []
    errors = []
    with Publisher(gateway.url, PUBLISH_KEY, batch_ms=2, max_in_flight=4, client=log.client()) as pub:

        def work(k: int) -> None:
            try:
                with pub.run(users[k % 2], agent_name=f"agent{k}") as run:
                    runs.append(run)
                    run.agent_started({"k": k})
                    for i in range(per_run):
                        run.emit("text_delta", {"k": k, "i": i})
                        if i % 50 == 0:
                            time.sleep(0.001)  # let the runs interleave
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert errors == []
    assert len(runs) == 8
    for u in users:
        evs = clients[u].events(4 * (per_run + 2))
        seqs = [e["seq"] for e in evs]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        by_run: dict = {}
        for e in evs:
            by_run.setdefault(e["run_id"], []).append(e)
        assert len(by_run) == 4
        for rid, got in by_run.items():
            assert got[0]["type"] == "agent_started" and got[-1]["type"] == "agent_completed"
            assert [e["data"]["i"] for e in got[1:-1]] == list(range(per_run)), rid
    assert log.overlaps == []  # never two requests of one run in flight
    assert len(log.bodies) < 8 * (per_run + 2) / 5


def test_retries_until_a_late_gateway_answers_without_duplicates(gateway_factory, tmp_path):
    gw = gateway_factory(start=False)
    log = RequestLog()
    starter = threading.Timer(0.3, gw.start)
    starter.start()
    try:
        with Publisher(gw.url, PUBLISH_KEY, backoff_ms=50, retries=10, client=log.client()) as pub:
            with pub.run("frank", agent_name="a") as run:
                run.agent_started()
                run.tool_executing({"tool": "t"})
            assert pub.stats["retries"] >= 1
    finally:
        starter.join()
    assert "error" in log.statuses and log.statuses[-1] == 202
    assert gw.stats()["events"]["published"] == 3
    # The user's seq counts each event once.
    from conftest import Client

    c = Client(gw, "frank")
    assert c.connected["last_seq"] == 3
    c.close()


def test_retry_bodies_are_identical(gateway_factory):
    gw = gateway_factory(start=False)
    log = RequestLog()
    starter = threading.Timer(0.3, gw.start)
    starter.start()
    try:
        with Publisher(gw.url, PUBLISH_KEY, backoff_ms=50, retries=10, batch_ms=20, client=log.client()) as pub:
            run = pub.run("gina", agent_name="a")
            run.agent_started()
            run.agent_completed()
            pub.flush()
    finally:
        starter.join()
    assert len(log.raw) >= 2
    assert len(set(log.raw)) == 1  # the retried request is byte for byte the first one
    nonce = log.bodies[0][0]["idempotency_key"].split(":")[1]
    assert [e["idempotency_key"] for e in log.bodies[0]] == [f"{run.run_id}:{nonce}:1", f"{run.run_id}:{nonce}:2"]


def test_no_retry_on_401(gateway):
    log = RequestLog()
    pub = Publisher(gateway.url, "not-the-publish-key", retries=5, client=log.client())
    with pytest.raises(PublishError) as info:
        with pub.run("hank", agent_name="a") as run:
            run.agent_started()
    assert info.value.status == 401 and info.value.code == "invalid_key"
    assert len(log.raw) == 1 and pub.stats["retries"] == 0
    assert run.error is info.value
    with pytest.raises(PublishError):
        run.agent_thinking()  # a failed run keeps raising its error
    pub.close()  # its error was raised already: close() does not raise it again


def test_a_bad_run_does_not_sink_the_other_runs_of_its_batch(gateway, client_factory):
    ws = client_factory("ivy")
    log = RequestLog()
    # A long batch window, so the three emits below surely share one request.
    with Publisher(gateway.url, PUBLISH_KEY, batch_ms=300, client=log.client()) as pub:
        with pub.run("ivy", agent_name="a", run_id="done-run") as r:
            r.agent_started()
        ws.events(2)
        log.bodies.clear()
        log.statuses.clear()
        stale = pub.run("ivy", agent_name="a", run_id="done-run")
        good = pub.run("ivy", agent_name="a", run_id="good-run")
        stale.agent_thinking({"late": 1})
        good.agent_started()
        good.agent_completed()
        with pytest.raises(PublishError) as info:
            pub.flush()
    assert info.value.status == 400 and info.value.run_id == "done-run"
    assert stale.error is info.value and good.error is None
    # One request with both runs (400 index 0), then the good run alone, no retry.
    assert log.statuses == [400, 202]
    assert len(log.bodies[0]) == 3 and len(log.bodies[1]) == 2
    evs = ws.events(2)
    assert [(e["run_id"], e["type"]) for e in evs] == [("good-run", "agent_started"), ("good-run", "agent_completed")]
    assert ws.quiet() == []


def test_too_many_runs_is_surfaced_not_retried(gateway_factory, client_factory):
    gw = gateway_factory("--max-active-runs-per-user", "2")
    ws = client_factory("jack", gw)
    log = RequestLog()
    pub = Publisher(gw.url, PUBLISH_KEY, batch_ms=300, client=log.client())  # one request for the 3 starts
    runs = [pub.run("jack", agent_name="a", run_id=f"run-{k}") for k in range(3)]
    for r in runs:
        r.agent_started()
    with pytest.raises(TooManyRunsError) as info:
        pub.flush()
    err = info.value
    assert err.status == 429 and err.code == "too_many_runs" and err.run_id == "run-2"
    assert runs[2].error is err and runs[0].error is None and runs[1].error is None
    with pytest.raises(TooManyRunsError):
        runs[2].agent_thinking()
    assert pub.stats["retries"] == 0 and log.statuses == [429, 202]
    evs = ws.events(2)
    assert sorted(e["run_id"] for e in evs) == ["run-0", "run-1"]
    for r in runs[:2]:
        r.agent_completed()
    pub.close()
    assert [e["type"] for e in ws.events(2)] == ["agent_completed", "agent_completed"]


@pytest.mark.parametrize("bad", ["Bad", "1abc", "a" * 65, "text-delta", "", "connected", "ack", None, 7])
def test_the_type_rule_is_checked_before_sending(gateway, bad):
    log = RequestLog()
    with Publisher(gateway.url, PUBLISH_KEY, client=log.client()) as pub:
        run = pub.run("kim", agent_name="a")
        with pytest.raises(ValueError):
            run.emit(bad, {})
        run.emit("a" * 64, {})  # the longest valid name
        run.emit("x1_", {})
        run.agent_completed()
    assert [e["type"] for b in log.bodies for e in b] == ["a" * 64, "x1_", "agent_completed"]


def test_bad_arguments_raise_before_anything_is_queued(gateway):
    with Publisher(gateway.url, PUBLISH_KEY) as pub:
        with pytest.raises(ValueError):
            pub.run("", agent_name="a")
        with pytest.raises(ValueError):
            pub.run("u" * 129, agent_name="a")
        with pytest.raises(ValueError):
            pub.run("u", agent_name="a", thread_id="")
        run = pub.run("u", agent_name="a")
        with pytest.raises(TypeError):
            run.emit("text_delta", {"x": object()})
        with pytest.raises(ValueError):
            pub.run("u", agent_name="a", run_id=run.run_id)  # still open
        run.agent_completed()
        assert pub.stats["events_enqueued"] == 1


def test_close_flushes_and_emits_after_close_raise(gateway, client_factory):
    from agentwire_worker import PublisherClosedError

    ws = client_factory("lee")
    pub = Publisher(gateway.url, PUBLISH_KEY, batch_ms=200)
    run = pub.run("lee", agent_name="a")
    run.agent_started()
    pub.close()
    assert [e["type"] for e in ws.events(1)] == ["agent_started"]
    with pytest.raises(PublisherClosedError):
        run.agent_completed()
    pub.close()  # twice is fine


def test_keep_alive_connections_are_reused(gateway):
    log = RequestLog()
    with Publisher(gateway.url, PUBLISH_KEY, batch_ms=0, max_in_flight=4, client=log.client()) as pub:
        for k in range(20):
            with pub.run("mia", agent_name="a") as run:
                run.agent_started()
    assert len(log.local_addrs) >= 20
    # Every request went over one of a few pooled connections, not one each.
    assert len(set(log.local_addrs)) <= 4, set(log.local_addrs)


def test_a_cancel_from_the_users_tab_reaches_the_run(gateway, client_factory):
    """PROTOCOL.md section 6b: the 202 answer lists the runs a client asked to cancel;
    the run helper turns ``cancelled`` True (against the real gateway)."""
    ws = client_factory("carol")
    with Publisher(gateway.url, PUBLISH_KEY, batch_ms=1) as pub:
        with pub.run("carol", agent_name="slow_agent") as run:
            run.agent_started({"message": "take your time"})
            pub.flush()
            assert ws.events(1)[0]["type"] == "agent_started"
            ws.ws.send(json.dumps({"type": "cancel", "run_id": run.run_id}))
            deadline = time.monotonic() + 10
            while True:
                frame = json.loads(ws.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
                if frame.get("type") == "cancel_requested":
                    assert frame["run_id"] == run.run_id
                    break
            assert not run.cancelled
            run.agent_thinking({"thought": "step 2"})
            pub.flush()
            assert run.cancelled
            run.agent_error({"reason": "cancelled"})
    types = [e["type"] for e in ws.events(2)]
    assert types == ["agent_thinking", "agent_error"], types
