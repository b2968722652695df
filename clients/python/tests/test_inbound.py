"""parse_inbound: the gateway's webhook requests (PROTOCOL.md section 6b). Pure
function tests; the gateway's own inbound_url sender drives it in
test_webhook_gateway.py."""

from __future__ import annotations

import json

import pytest

from agentwire_worker import InboundAuthError, InboundBodyError, InboundError, parse_inbound

KEY = "inbound-key-0123456789"
MSG = {
    "type": "user_message", "user_id": "u1", "thread_id": "t1", "run_id": "r-1",
    "text": "What is agentwire?", "ref": "m1", "connection_id": "c1f3", "node_id": "n1",
    "ts": 1763800000123,
}


def body(doc) -> bytes:
    return json.dumps(doc).encode()


def test_a_user_message_with_the_right_key():
    msg = parse_inbound(body(MSG), {"Authorization": f"Bearer {KEY}"}, KEY)
    assert (msg.type, msg.user_id, msg.thread_id, msg.run_id, msg.text, msg.ref) == (
        "user_message", "u1", "t1", "r-1", "What is agentwire?", "m1")
    assert (msg.connection_id, msg.node_id, msg.ts) == ("c1f3", "n1", 1763800000123)


def test_headers_in_any_case_and_shape():
    for headers in (
        {"authorization": f"Bearer {KEY}"},
        [(b"Authorization", f"Bearer {KEY}".encode())],
        [("AUTHORIZATION", f"bearer {KEY}")],
    ):
        assert parse_inbound(body(MSG), headers, KEY).run_id == "r-1"


def test_a_cancel_with_nulls_and_empty_strings():
    doc = {"type": "cancel", "user_id": "u1", "run_id": "r-1", "thread_id": None, "ref": "", "ts": "17"}
    msg = parse_inbound(body(doc), {"Authorization": f"Bearer {KEY}"}, KEY)
    assert (msg.type, msg.thread_id, msg.ref, msg.text, msg.connection_id, msg.ts) == (
        "cancel", None, None, None, None, 17)


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEY}"},
    {"Authorization": f"Bearer {KEY}x"}, {"Authorization": "Bearer "},
])
def test_a_bad_key_is_refused_before_the_body(headers):
    with pytest.raises(InboundAuthError):
        parse_inbound(b"not even json", headers, KEY)


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"[1,2]", b"\xff\xfe",
    body({**MSG, "type": "ping"}), body({k: v for k, v in MSG.items() if k != "user_id"}),
    body({**MSG, "run_id": 5}), body({**MSG, "text": ["x"]}), body({**MSG, "ts": 1.5}),
])
def test_a_bad_body_is_refused(raw):
    with pytest.raises(InboundBodyError) as info:
        parse_inbound(raw, {"Authorization": f"Bearer {KEY}"}, KEY)
    assert isinstance(info.value, InboundError) and isinstance(info.value, ValueError)
    assert str(info.value)


def test_the_key_is_compared_in_constant_time():
    import inspect

    from agentwire_worker import inbound

    assert "hmac.compare_digest" in inspect.getsource(inbound.check_key)
