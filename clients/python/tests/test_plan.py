"""The I/O-free send plan fed with answers, for the one rule the real gateway cannot
show on demand: 503 (and Retry-After) is retried with the same body. No HTTP here."""

from __future__ import annotations

from agentwire_worker import _core


def test_503_is_retried_with_the_same_body_then_delivered():
    cfg = _core.Config(batch_s=0, max_events=1000, max_bytes=1 << 20, retries=3, backoff_s=0.1, max_backoff_s=2)
    st = _core.RunState("u", "r", "a", None)
    batch = [st.encode("agent_started", b"{}"), st.encode("text_delta", b'{"d":1}')]
    plan = _core.send_plan(batch, cfg)
    post = next(plan)
    assert isinstance(post, _core.Post) and post.events == 2
    sleep = plan.send(_core.Answer(503, b'{"error":"engine_unavailable"}', retry_after=1.5))
    assert isinstance(sleep, _core.Sleep) and 1.5 <= sleep.seconds <= 2
    again = next(plan)
    assert isinstance(again, _core.Post) and again.body == post.body
    done = plan.send(_core.Answer(202, b'{"accepted":2}'))
    assert isinstance(done, _core.Deliver) and done.events == batch and done.cancelled == []


def test_503_past_the_retries_fails_with_the_last_answer():
    cfg = _core.Config(batch_s=0, max_events=1000, max_bytes=1 << 20, retries=1, backoff_s=0.01, max_backoff_s=0.01)
    st = _core.RunState("u", "r", "a", None)
    plan = _core.send_plan([st.encode("agent_started", b"{}")], cfg)
    next(plan)
    assert isinstance(plan.send(_core.Answer(503, b"{}")), _core.Sleep)
    next(plan)
    fail = plan.send(_core.Answer(503, b'{"error":"shutting_down","message":"draining"}'))
    assert isinstance(fail, _core.Fail) and fail.error.status == 503 and fail.error.code == "shutting_down"
