//! `POST /api/events` (PROTOCOL.md section 6): acceptance, all-or-nothing batches, keys,
//! size limits, ended runs.

use serde_json::{json, Value};

use crate::support::{
    assert_contiguous, assert_envelope, config, get, http_request, pub_event, publish, publish_ok,
    publish_raw, Agent, TestGateway, PUBLISH_KEY,
};

fn error_body(r: &crate::support::HttpResponse, status: u16, code: &str) -> Value {
    assert_eq!(
        r.status,
        status,
        "expected {status} {code}, got {} {}",
        r.status,
        r.text()
    );
    let body = r.json();
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

#[test]
fn single_event_is_accepted_and_delivered() {
    let gw = TestGateway::plain();
    let user = "pub-single";
    let mut c = gw.connect(user);
    let r = publish(
        gw.addr,
        &pub_event(
            "agent_started",
            user,
            Some("t1"),
            "r-p1",
            json!({"q": [1, 2, {"x": null}]}),
        ),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json(), json!({"accepted": 1, "cancelled": []}));
    let ev = c.recv_json();
    assert_envelope(&ev, user, Some("t1"), "r-p1", "pub_agent");
    assert_eq!(ev["type"], "agent_started");
    assert_eq!(ev["seq"].as_u64(), Some(c.last_seq() + 1));
    assert_eq!(
        ev["data"],
        json!({"q": [1, 2, {"x": null}]}),
        "data passed through"
    );
}

#[test]
fn batch_of_three_is_accepted_and_delivered_in_order() {
    let gw = TestGateway::plain();
    let user = "pub-batch";
    let mut c = gw.connect(user);
    let batch = json!([
        pub_event("agent_started", user, None, "r-b", json!({"i": 0})),
        pub_event("text_delta", user, None, "r-b", json!({"i": 1})),
        pub_event("agent_completed", user, None, "r-b", json!({"i": 2})),
    ]);
    let r = publish(gw.addr, &batch);
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json(), json!({"accepted": 3, "cancelled": []}));
    let evs = c.recv_events(3);
    assert_contiguous(&evs, c.last_seq() + 1);
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e["data"]["i"], i);
        assert_eq!(e["thread_id"], Value::Null);
    }
}

/// One bad event refuses the whole batch: nothing delivered, no seq taken.
#[test]
fn bad_event_at_index_2_refuses_the_whole_batch() {
    let gw = TestGateway::plain();
    let user = "pub-bad2";
    let mut c = gw.connect(user);
    publish_ok(
        gw.addr,
        &pub_event("agent_started", user, None, "r-before", json!({})),
    );
    let last = c.recv_json()["seq"].as_u64().expect("seq");

    let bad_events = [
        json!({"type": "Bad-Type", "user_id": user, "run_id": "r-x", "agent_name": "a"}),
        json!({"type": "text_delta", "run_id": "r-x", "agent_name": "a"}),
        json!({"type": "text_delta", "user_id": user, "agent_name": "a"}),
        json!({"type": "text_delta", "user_id": 5, "run_id": "r-x", "agent_name": "a"}),
        json!({"type": "text_delta", "user_id": user, "run_id": "r-x", "agent_name": "a", "thread_id": 3}),
        json!({"type": "text_delta", "user_id": "", "run_id": "r-x", "agent_name": "a"}),
        json!("not an object"),
        json!([1]),
    ];
    for bad in bad_events {
        let batch = json!([
            pub_event("text_delta", user, None, "r-x", json!({"n": 1})),
            pub_event("text_delta", user, None, "r-x", json!({"n": 2})),
            bad.clone(),
            pub_event("text_delta", user, None, "r-x", json!({"n": 4})),
        ]);
        let r = publish(gw.addr, &batch);
        let body = error_body(&r, 400, "bad_event");
        assert_eq!(body["index"], 2, "index of {bad}: {body}");
    }
    // Nothing of those batches arrived, and no seq was consumed.
    publish_ok(
        gw.addr,
        &pub_event("text_delta", user, None, "r-before", json!({"after": true})),
    );
    let ev = c.recv_json();
    assert_eq!(
        ev["data"],
        json!({"after": true}),
        "first frame after the refused batches: {ev}"
    );
    assert_eq!(
        ev["seq"].as_u64(),
        Some(last + 1),
        "no seq consumed by refused batches"
    );
}

#[test]
fn body_that_is_not_json_is_400_bad_event_index_0() {
    let gw = TestGateway::plain();
    for body in [&b"{oops"[..], b"", b"42", b"\"str\""] {
        let r = publish_raw(gw.addr, Some(PUBLISH_KEY), body);
        let v = error_body(&r, 400, "bad_event");
        assert_eq!(v["index"], 0, "{v}");
    }
}

#[test]
fn wrong_or_missing_key_is_401_invalid_key() {
    let gw = TestGateway::plain();
    let user = "pub-key";
    let mut c = gw.connect(user);
    let ev = pub_event("agent_started", user, None, "r-k", json!({}));
    let body = ev.to_string();
    for key in [
        Some("wrong-key"),
        Some(""),
        Some(&PUBLISH_KEY[..PUBLISH_KEY.len() - 1]),
        None,
    ] {
        let r = publish_raw(gw.addr, key, body.as_bytes());
        error_body(&r, 401, "invalid_key");
    }
    // A JWT is not a publish key.
    let r = publish_raw(gw.addr, Some(&crate::support::token(user)), body.as_bytes());
    error_body(&r, 401, "invalid_key");
    // Nothing was delivered.
    c.ping_pong();
}

#[test]
fn body_over_max_publish_bytes_is_413() {
    let mut cfg = config();
    cfg.max_publish_bytes = 4096;
    let gw = TestGateway::start(cfg, Agent::None);
    let user = "pub-413";
    let mut c = gw.connect(user);
    let big = pub_event(
        "agent_started",
        user,
        None,
        "r-big",
        json!({"pad": "p".repeat(5000)}),
    );
    let r = publish(gw.addr, &big);
    error_body(&r, 413, "payload_too_large");
    // Just under the limit is accepted.
    let small = pub_event(
        "agent_started",
        user,
        None,
        "r-small",
        json!({"pad": "p".repeat(3000)}),
    );
    let r = publish(gw.addr, &small);
    assert_eq!(r.status, 202, "{}", r.text());
    let ev = c.recv_json();
    assert_eq!(
        ev["run_id"], "r-small",
        "the oversized event was not delivered: {ev}"
    );
}

#[test]
fn more_than_1000_events_is_413_and_1000_is_accepted() {
    let gw = TestGateway::plain();
    let user = "pub-1001";
    let mut c = gw.connect(user);
    let batch: Vec<Value> = (0..1001)
        .map(|i| pub_event("text_delta", user, None, "r-many", json!(i)))
        .collect();
    let r = publish(gw.addr, &Value::Array(batch.clone()));
    error_body(&r, 413, "payload_too_large");
    let r = publish(gw.addr, &Value::Array(batch[..1000].to_vec()));
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json(), json!({"accepted": 1000, "cancelled": []}));
    let evs = c.recv_events(1000);
    assert_contiguous(&evs, c.last_seq() + 1);
    assert_eq!(evs[999]["data"], 999);
}

#[test]
fn publish_without_a_configured_key_is_404() {
    let mut cfg = config();
    cfg.publish_key = None;
    let gw = TestGateway::start(cfg, Agent::None);
    let ev = pub_event("agent_started", "pub-nokey", None, "r", json!({}));
    let r = publish(gw.addr, &ev);
    error_body(&r, 404, "not_found");
    let r = publish_raw(gw.addr, None, ev.to_string().as_bytes());
    error_body(&r, 404, "not_found");
}

#[test]
fn events_of_an_ended_run_are_refused() {
    let gw = TestGateway::plain();
    let user = "pub-ended";
    let mut c = gw.connect(user);
    publish_ok(
        gw.addr,
        &json!([
            pub_event("agent_started", user, None, "r-end", json!({})),
            pub_event("agent_completed", user, None, "r-end", json!({})),
        ]),
    );
    let evs = c.recv_events(2);
    let last = evs[1]["seq"].as_u64().expect("seq");

    let r = publish(
        gw.addr,
        &pub_event("text_delta", user, None, "r-end", json!({"late": true})),
    );
    let body = error_body(&r, 400, "bad_event");
    assert_eq!(body["index"], 0, "{body}");
    // Also when the batch itself ends the run before the late event.
    let r = publish(
        gw.addr,
        &json!([
            pub_event("agent_started", user, None, "r-end2", json!({})),
            pub_event("agent_error", user, None, "r-end2", json!({})),
            pub_event("text_delta", user, None, "r-end2", json!({"late": true})),
        ]),
    );
    let body = error_body(&r, 400, "bad_event");
    assert_eq!(body["index"], 2, "{body}");
    // An emitter run with the ended id is dropped by the gateway too.
    let mut again = gw
        .emitter
        .run(user, None, "r-end", "lib_agent")
        .expect("run");
    again
        .emit("text_delta", &json!({"late": "lib"}))
        .expect("queued");
    drop(again);

    publish_ok(
        gw.addr,
        &pub_event("agent_started", user, None, "r-next", json!({})),
    );
    let ev = c.recv_json();
    assert_eq!(
        ev["run_id"], "r-next",
        "nothing of the ended runs arrived: {ev}"
    );
    assert_eq!(
        ev["seq"].as_u64(),
        Some(last + 1),
        "refused events took no seq"
    );
    let s = gw.stats();
    assert!(
        s["events"]["dropped"]["run_ended"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{s}"
    );
}

/// docs/PROTOCOL.md appendix: a known path with the wrong method is 405 with `Allow`;
/// publish needs `Content-Length` (chunked is 400).
#[test]
fn wrong_method_is_405_and_a_body_needs_content_length() {
    let gw = TestGateway::plain();
    let r = get(gw.addr, "/api/events");
    let body = error_body(&r, 405, "method_not_allowed");
    assert_eq!(r.header("allow"), Some("POST"), "{body} {:?}", r.headers);
    let r = http_request(
        gw.addr,
        b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    error_body(&r, 405, "method_not_allowed");
    assert_eq!(r.header("allow"), Some("GET, HEAD"));

    let r = http_request(
        gw.addr,
        format!("POST /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PUBLISH_KEY}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    error_body(&r, 400, "bad_request");
    let r = http_request(
        gw.addr,
        format!(
            "POST /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PUBLISH_KEY}\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n[]\r\n0\r\n\r\n"
        )
        .as_bytes(),
    );
    error_body(&r, 400, "bad_request");
}

/// docs/PROTOCOL.md appendix: an empty array is accepted; unknown fields are ignored;
/// omitted `data` is delivered as null.
#[test]
fn empty_batch_unknown_fields_and_missing_data() {
    let gw = TestGateway::plain();
    let user = "pub-edges";
    let mut c = gw.connect(user);
    let r = publish(gw.addr, &json!([]));
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json(), json!({"accepted": 0, "cancelled": []}));
    publish_ok(
        gw.addr,
        &json!({"type": "agent_started", "user_id": user, "run_id": "r-e", "agent_name": "a", "extra": {"x": 1}}),
    );
    let ev = c.recv_json();
    assert_eq!(ev["data"], Value::Null, "{ev}");
    assert_eq!(ev["thread_id"], Value::Null, "{ev}");
    assert!(
        ev.get("extra").is_none(),
        "unknown fields are not passed on: {ev}"
    );
}

/// docs/PROTOCOL.md appendix: the gateway's own frame types are reserved.
#[test]
fn reserved_frame_types_cannot_be_published_or_emitted() {
    let gw = TestGateway::plain();
    let user = "pub-reserved";
    let mut c = gw.connect(user);
    let mut run = gw.emitter.run(user, None, "r-res", "a").expect("run");
    for kind in [
        "connected",
        "pong",
        "ack",
        "error",
        "refreshed",
        "cancel_requested",
    ] {
        let r = publish(gw.addr, &pub_event(kind, user, None, "r-res", json!({})));
        let body = error_body(&r, 400, "bad_event");
        assert_eq!(body["index"], 0);
        assert!(
            matches!(
                run.emit(kind, &json!({})),
                Err(agentwire::EmitError::Invalid(_))
            ),
            "emit of reserved type {kind}"
        );
    }
    run.agent_started(&json!({})).expect("emit");
    let ev = c.recv_json();
    assert_eq!(
        ev["type"], "agent_started",
        "nothing reserved got through: {ev}"
    );
    assert_eq!(ev["seq"].as_u64(), Some(c.last_seq() + 1));
    run.agent_completed(&json!({})).expect("emit");
}

/// The auth scheme is case-insensitive (RFC 7235 section 2.1), as it is for upgrades.
#[test]
fn publish_accepts_a_lower_case_bearer_scheme() {
    let gw = TestGateway::plain();
    let user = "pub-scheme";
    let mut c = gw.connect(user);
    let body = pub_event("agent_started", user, None, "r-s", json!({})).to_string();
    let req = format!(
        "POST /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: bearer {PUBLISH_KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let r = http_request(gw.addr, req.as_bytes());
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(c.recv_json()["run_id"], "r-s");
}

/// Keep-alive publishing: several requests on one connection are each answered.
#[test]
fn publish_over_one_keep_alive_connection() {
    use std::io::Write;
    let gw = TestGateway::plain();
    let user = "pub-keepalive";
    let mut c = gw.connect(user);
    let mut s = std::net::TcpStream::connect(gw.addr).expect("connect");
    let mut buf = Vec::new();
    for i in 0..3 {
        let body = pub_event("text_delta", user, None, "r-ka", json!({ "i": i })).to_string();
        let req = format!(
            "POST /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PUBLISH_KEY}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).expect("write");
        let r = crate::support::read_response_from(&mut s, &mut buf);
        assert_eq!(r.status, 202, "request {i}: {}", r.text());
    }
    let evs = c.recv_events(3);
    assert_contiguous(&evs, c.last_seq() + 1);
}
