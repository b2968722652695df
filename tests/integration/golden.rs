//! The golden path: log in, ask the built-in demo agent, watch its run arrive in order.

use std::collections::HashSet;

use serde_json::json;

use crate::support::{assert_contiguous, assert_envelope, config, Agent, TestGateway, WAIT};

/// Guards the whole chain user_message -> inbound -> demo agent -> emitter -> reactor
/// -> the user's socket: ack first, then the run's events in order with contiguous
/// seq and a complete envelope.
#[test]
fn demo_agent_run_arrives_in_order_with_full_envelopes() {
    let gw = TestGateway::start(config(), Agent::Demo);
    let user = "golden-u1";
    let mut c = gw.connect(user);

    let connected = c.connected.clone();
    assert_eq!(connected["user_id"], user);
    assert_eq!(connected["mode"], "main");
    assert_eq!(connected["thread_id"], json!(null));
    assert_eq!(connected["resumed"], json!(null));
    assert_eq!(connected["epoch"], gw.epoch.as_str());
    let id = connected["connection_id"].as_str().expect("connection_id");
    assert!(
        id.len() > 1 && id.starts_with('c') && id[1..].chars().all(|c| c.is_ascii_hexdigit()),
        "connection_id is c + hex: {id}"
    );
    assert_eq!(connected["heartbeat_interval_ms"], 30_000);
    assert!(connected["token_exp"].is_u64());
    assert_eq!(connected["active_runs"], json!([]));
    let last_seq = c.last_seq();

    c.send_json(&json!({"type":"user_message","thread_id":"t1","text":"hi","ref":"x"}));
    let ack = c.recv_json();
    assert_eq!(ack["type"], "ack", "first frame after user_message: {ack}");
    assert_eq!(ack["ref"], "x");
    let run_id = ack["run_id"]
        .as_str()
        .expect("ack.run_id is a string")
        .to_owned();
    assert!(!run_id.is_empty());

    // The demo run takes about a second; allow several.
    let deadline = std::time::Instant::now() + WAIT * 2;
    let mut events = Vec::new();
    loop {
        let remaining = deadline.saturating_duration_since(std::time::Instant::now());
        let ev = c.recv_json_within(remaining);
        let done = ev["type"] == "agent_completed" || ev["type"] == "agent_error";
        events.push(ev);
        if done {
            break;
        }
    }

    for ev in &events {
        assert_envelope(ev, user, Some("t1"), &run_id, "demo_agent");
        assert!(ev["data"].is_object(), "demo data is an object: {ev}");
    }
    assert_contiguous(&events, last_seq + 1);
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(types.first(), Some(&"agent_started"), "{types:?}");
    assert_eq!(types.last(), Some(&"agent_completed"), "{types:?}");
    let present: HashSet<&str> = types.iter().copied().collect();
    for critical in [
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "agent_completed",
    ] {
        assert!(
            present.contains(critical),
            "{critical} missing from {types:?}"
        );
    }
    let executing = types
        .iter()
        .position(|t| *t == "tool_executing")
        .expect("tool_executing");
    let completed = types
        .iter()
        .position(|t| *t == "tool_completed")
        .expect("tool_completed");
    assert!(
        executing < completed,
        "tool_executing before tool_completed: {types:?}"
    );
    assert_eq!(
        types.iter().filter(|t| **t == "agent_started").count(),
        1,
        "{types:?}"
    );
    assert_eq!(
        types.iter().filter(|t| **t == "agent_completed").count(),
        1,
        "{types:?}"
    );

    // The run has ended: a new connection lists no active run, and seq resumes after it.
    c.ping_pong();
    let c2 = gw.connect(user);
    assert_eq!(c2.connected["active_runs"], json!([]));
    assert_eq!(c2.last_seq(), last_seq + events.len() as u64);
}

/// A second tab opened while a run is in progress sees it in `active_runs`.
#[test]
fn connected_lists_active_runs_of_the_user() {
    let gw = TestGateway::plain();
    let user = "golden-active";
    let mut first = gw.connect(user);
    let mut run = gw
        .emitter
        .run(user, Some("t1"), "r-active", "lib_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    run.tool_executing(&json!({"tool": "sql"})).expect("emit");
    let evs = first.recv_events(2);

    let second = gw.connect(user);
    let runs = second.connected["active_runs"]
        .as_array()
        .expect("active_runs array")
        .clone();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let r = &runs[0];
    assert_eq!(r["run_id"], "r-active");
    assert_eq!(r["thread_id"], "t1");
    assert_eq!(r["agent_name"], "lib_agent");
    assert_eq!(r["last_type"], "tool_executing");
    assert_eq!(r["last_seq"], evs[1]["seq"]);
    assert!(r["started_ts"].is_u64());

    // Narrowed by the thread filter.
    let other_thread = crate::support::connect_path(gw.addr, user, "/ws?thread_id=t2");
    assert_eq!(other_thread.connected["active_runs"], json!([]));
    run.agent_completed(&json!({})).expect("emit");
}

/// Cancelling a demo run mid-way: `cancel_requested`, then the run ends with
/// `agent_error {"reason":"cancelled"}` and nothing after it.
#[test]
fn cancelling_a_demo_run_ends_it_with_cancelled() {
    let gw = TestGateway::start(config(), Agent::Demo);
    let user = "golden-cancel";
    let mut c = gw.connect(user);
    let ack = c.user_message(None, "cancel me", "c1");
    let run_id = ack["run_id"].as_str().expect("run_id").to_owned();
    let started = c.recv_json();
    assert_eq!(started["type"], "agent_started", "{started}");
    c.send_json(&json!({"type": "cancel", "run_id": run_id}));
    let mut seen_reply = false;
    let deadline = std::time::Instant::now() + WAIT;
    let end = loop {
        let v = c.recv_json_within(deadline.saturating_duration_since(std::time::Instant::now()));
        if v["type"] == "cancel_requested" {
            assert_eq!(v["run_id"], run_id.as_str());
            seen_reply = true;
            continue;
        }
        assert_eq!(v["run_id"], run_id.as_str(), "{v}");
        if v["type"] == "agent_error" || v["type"] == "agent_completed" {
            break v;
        }
    };
    assert!(seen_reply, "cancel_requested arrived before the run ended");
    assert_eq!(end["type"], "agent_error", "{end}");
    assert_eq!(end["data"], json!({"reason": "cancelled"}), "{end}");
    c.ping_pong();
}

/// `ref` is optional: the ack then carries `"ref": null`.
#[test]
fn ack_without_ref_has_null_ref() {
    let gw = TestGateway::start(config(), Agent::Demo);
    let mut c = gw.connect("golden-noref");
    c.send_json(&json!({"type": "user_message", "text": "hi"}));
    let ack = c.recv_json();
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["ref"], serde_json::Value::Null, "{ack}");
    let ev = c.recv_json();
    assert_eq!(ev["run_id"], ack["run_id"]);
    assert_eq!(
        ev["thread_id"],
        serde_json::Value::Null,
        "thread_id omitted means null: {ev}"
    );
}
