//! Bad client input (PROTOCOL.md section 4): errors that keep the connection, closes
//! with the right code, and no effect on anyone else.

use serde_json::{json, Value};

use crate::support::{config, Agent, Client, TestGateway, WAIT};
use agentwire::Inbound;

fn expect_error(c: &mut Client, code: &str) -> Value {
    let v = c.recv_json();
    assert_eq!(v["type"], "error", "expected an error frame, got {v}");
    assert_eq!(v["code"], code, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    v
}

#[test]
fn each_kind_of_bad_message_gets_bad_message_and_the_connection_stays() {
    let gw = TestGateway::plain();
    let mut c = gw.connect("in-bad");
    let bad = [
        "hello",
        "{not json",
        "",
        "[1,2,3]",
        "42",
        "\"ping\"",
        "null",
        r#"{"type":"dance"}"#,
        r#"{"text":"no type"}"#,
        r#"{"type":7}"#,
        r#"{"type":"user_message","thread_id":"t1"}"#,
        r#"{"type":"user_message","thread_id":5,"text":"x"}"#,
        r#"{"type":"user_message","thread_id":"","text":"x"}"#,
        r#"{"type":"user_message","text":7}"#,
        r#"{"type":"cancel"}"#,
        r#"{"type":"refresh"}"#,
    ];
    for (i, text) in bad.iter().enumerate() {
        c.send_text(text);
        expect_error(&mut c, "bad_message");
        // A good message after each one: the counter resets, so 13 bad ones in total
        // never add up to a close.
        if i % 2 == 1 {
            c.ping_pong();
        }
    }
    c.ping_pong();
}

#[test]
fn eleven_bad_messages_in_a_row_close_with_1008() {
    let gw = TestGateway::plain();
    let mut c = gw.connect("in-1008");
    for _ in 0..11 {
        c.send_text("nope");
    }
    let before = c.expect_close(1008);
    assert_eq!(before.len(), 10, "ten errors, then the close: {before:?}");
    for v in &before {
        assert_eq!(v["code"], "bad_message", "{v}");
    }
}

#[test]
fn a_good_message_resets_the_bad_counter() {
    let gw = TestGateway::plain();
    let mut c = gw.connect("in-reset");
    for round in 0..3 {
        for _ in 0..10 {
            c.send_text("nope");
            expect_error(&mut c, "bad_message");
        }
        c.ping_pong();
        assert!(round < 3);
    }
    c.ping_pong();
}

#[test]
fn binary_frame_closes_with_1003() {
    let gw = TestGateway::plain();
    let mut c = gw.connect("in-binary");
    c.send_binary(b"\x00\x01\x02");
    c.expect_close(1003);
}

#[test]
fn message_over_max_message_bytes_closes_with_1009() {
    let mut cfg = config();
    cfg.max_message_bytes = 1024;
    let gw = TestGateway::start(cfg, Agent::None);
    let mut c = gw.connect("in-1009");
    // Just under the limit is fine.
    let pad = "a".repeat(1024 - r#"{"type":"ping","pad":""}"#.len());
    c.send_json(&json!({"type": "ping", "pad": pad}));
    assert_eq!(c.recv_json()["type"], "pong");
    c.send_json(&json!({"type": "ping", "pad": "a".repeat(2000)}));
    c.expect_close(1009);
}

#[test]
fn user_message_without_a_worker_is_no_agent() {
    let gw = TestGateway::start(config(), Agent::None);
    let mut c = gw.connect("in-noagent");
    c.send_json(&json!({"type":"user_message","thread_id":"t1","text":"hi","ref":"x"}));
    expect_error(&mut c, "no_agent");
    c.ping_pong();
}

#[test]
fn cancel_of_an_unknown_run_is_not_found() {
    let gw = TestGateway::plain();
    let mut c = gw.connect("in-cancel-unknown");
    c.send_json(&json!({"type":"cancel","run_id":"r-does-not-exist"}));
    expect_error(&mut c, "not_found");
    c.ping_pong();
}

#[test]
fn cancel_of_another_users_run_is_not_found_and_does_not_cancel_it() {
    let gw = TestGateway::plain();
    let mut owner = gw.connect("in-cancel-owner");
    let mut run = gw
        .emitter
        .run("in-cancel-owner", None, "r-owned", "lib_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    assert_eq!(owner.recv_json()["run_id"], "r-owned");

    let mut thief = gw.connect("in-cancel-thief");
    thief.send_json(&json!({"type":"cancel","run_id":"r-owned"}));
    expect_error(&mut thief, "not_found");
    assert!(
        !run.is_cancelled(),
        "another user's cancel must not reach the run"
    );
    owner.ping_pong();
    run.agent_completed(&json!({})).expect("emit");
}

/// A user's cancel of their own running run: `cancel_requested`, the worker's run
/// handle turns cancelled, and the worker also gets `Inbound::Cancel`.
#[test]
fn cancel_of_own_active_run_reaches_the_run_handle() {
    let mut gw = TestGateway::start(config(), Agent::Test);
    let inbound = gw.inbound();
    let emitter = gw.emitter.clone();
    let user = "in-cancel-own";
    let mut c = gw.connect(user);
    let ack = c.user_message(Some("t1"), "long job", "c1");
    let run_id = ack["run_id"].as_str().expect("run_id").to_owned();
    let mut run = match inbound
        .recv_timeout(WAIT)
        .expect("user message reaches the worker")
    {
        Inbound::UserMessage {
            user_id,
            thread_id,
            run_id,
            ..
        } => emitter
            .run(&user_id, thread_id.as_deref(), &run_id, "lib_agent")
            .expect("run"),
        other => panic!("unexpected {other:?}"),
    };
    run.agent_started(&json!({})).expect("emit");
    assert_eq!(c.recv_json()["type"], "agent_started");
    assert!(!run.is_cancelled());

    c.send_json(&json!({"type":"cancel","run_id": run_id}));
    let v = c.recv_json();
    assert_eq!(v, json!({"type":"cancel_requested","run_id": run_id}));
    // The flag is set before the reply is queued.
    assert!(run.is_cancelled(), "run handle sees the cancel");
    match inbound
        .recv_timeout(WAIT)
        .expect("cancel reaches the worker")
    {
        Inbound::Cancel { user_id, run_id: r } => {
            assert_eq!(user_id, user);
            assert_eq!(r, run_id);
        }
        other => panic!("unexpected {other:?}"),
    }
    run.agent_error(&json!({"reason": "cancelled"}))
        .expect("emit");
    let end = c.recv_json();
    assert_eq!(end["type"], "agent_error");
    assert_eq!(end["data"], json!({"reason": "cancelled"}));
    // Ended: cancelling again finds nothing.
    c.send_json(&json!({"type":"cancel","run_id": run_id}));
    expect_error(&mut c, "not_found");
}

/// A cancel that arrives before the worker's first event is remembered: the run
/// handle is cancelled as soon as it registers.
#[test]
fn cancel_before_the_first_event_still_reaches_the_run_handle() {
    let mut gw = TestGateway::start(config(), Agent::Test);
    let inbound = gw.inbound();
    let mut c = gw.connect("in-cancel-early");
    let ack = c.user_message(None, "job", "e1");
    let run_id = ack["run_id"].as_str().expect("run_id").to_owned();
    let (user_id, run_id_in) = match inbound.recv_timeout(WAIT).expect("message") {
        Inbound::UserMessage {
            user_id, run_id, ..
        } => (user_id, run_id),
        other => panic!("unexpected {other:?}"),
    };
    c.send_json(&json!({"type":"cancel","run_id": run_id}));
    assert_eq!(c.recv_json()["type"], "cancel_requested");
    let mut run = gw
        .emitter
        .run(&user_id, None, &run_id_in, "lib_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    assert_eq!(c.recv_json()["type"], "agent_started");
    assert!(
        run.is_cancelled(),
        "a cancel requested before the first event is applied"
    );
    run.agent_completed(&json!({})).expect("emit");
}

/// A client spewing garbage and then a binary frame neither delays nor disturbs the
/// delivery to another user.
#[test]
fn a_bad_client_does_not_affect_another_users_delivery() {
    let gw = TestGateway::plain();
    let mut good = gw.connect("in-neighbour-good");
    let mut bad = gw.connect("in-neighbour-bad");
    let base = good.last_seq();
    let mut run = gw
        .emitter
        .run("in-neighbour-good", None, "r-n", "lib_agent")
        .expect("run");
    run.agent_started(&json!({"i": 0})).expect("emit");
    for i in 0..10 {
        bad.send_text("garbage");
        bad.send_text(&"{".repeat(i + 1));
        run.emit("text_delta", &json!({ "i": i + 1 }))
            .expect("emit");
    }
    bad.send_binary(b"boom");
    run.agent_completed(&json!({"i": 11})).expect("emit");
    let evs = good.recv_events(12);
    crate::support::assert_contiguous(&evs, base + 1);
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e["data"]["i"], i, "{e}");
    }
    // The bad client was closed (1008 after 11 bad in a row, or 1003 for the binary).
    let frames = loop {
        match bad.next_frame(WAIT) {
            crate::support::Frame::Json(_) => continue,
            crate::support::Frame::Close(f) => break f,
            other => panic!("bad client should be closed with a close frame, got {other:?}"),
        }
    };
    let code = frames.map(|(c, _)| c);
    assert!(
        matches!(code, Some(1008) | Some(1003)),
        "close code {code:?}"
    );
    good.ping_pong();
}

/// A burst of messages larger than one read's share is answered in full, in order.
#[test]
fn a_burst_of_pings_gets_every_pong() {
    let gw = TestGateway::plain();
    let mut c = gw.connect("in-burst");
    let mut burst = String::new();
    for i in 0..300 {
        burst.clear();
        burst.push_str(
            &json!({"type": "user_message", "text": "x", "thread_id": 1, "ref": i}).to_string(),
        );
        // Alternate a bad and a good message so the bad counter never trips.
        c.send_text(if i % 2 == 0 {
            r#"{"type":"ping"}"#
        } else {
            &burst
        });
    }
    for i in 0..300 {
        let v = c.recv_json();
        let want = if i % 2 == 0 { "pong" } else { "error" };
        assert_eq!(v["type"], want, "reply {i}: {v}");
    }
    c.ping_pong();
}
