//! Idempotent publishing (PROTOCOL.md section 6a) and the `cancelled` list of publish
//! answers (section 6b, first bullet): retries acknowledged and routed once, the TTL,
//! per-user keys, bad keys, the emitter's API, the per-user bound, cancels.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{config, publish, Agent, Client, Frame, TestGateway};

/// An event with an idempotency key.
fn keyed(kind: &str, user: &str, run: &str, key: &str) -> Value {
    json!({"type": kind, "user_id": user, "run_id": run, "agent_name": "idem_agent",
           "data": {"k": key}, "idempotency_key": key})
}

/// A keyless event (a sentinel: the next frame after it proves nothing came between).
fn plain(kind: &str, user: &str, run: &str) -> Value {
    json!({"type": kind, "user_id": user, "run_id": run, "agent_name": "idem_agent"})
}

/// Publish and require 202 with `accepted` = `n`; the answer's body.
fn accepted(gw: &TestGateway, events: &Value, n: usize) -> Value {
    let r = publish(gw.addr, events);
    assert_eq!(r.status, 202, "{}", r.text());
    let body = r.json();
    assert_eq!(body["accepted"], n, "{body}");
    body
}

/// The next event frame; its (type, seq, data.k).
fn next(c: &mut Client) -> (String, u64, Value) {
    match c.next_frame(Duration::from_secs(5)) {
        Frame::Json(v) => (
            v["type"].as_str().unwrap_or_default().to_owned(),
            v["seq"].as_u64().unwrap_or(0),
            v["data"]["k"].clone(),
        ),
        other => panic!("expected an event, got {other:?}"),
    }
}

/// Publish a keyless sentinel on run `run` and require it to be the next frame, with
/// the next seq: nothing was delivered in between.
fn sentinel_is_next(gw: &TestGateway, c: &mut Client, user: &str, run: &str, last: u64) {
    accepted(gw, &plain("agent_thinking", user, run), 1);
    let (kind, seq, _) = next(c);
    assert_eq!((kind.as_str(), seq), ("agent_thinking", last + 1));
}

fn deduplicated(gw: &TestGateway) -> u64 {
    gw.stats()["events"]["deduplicated"].as_u64().unwrap_or(0)
}

#[test]
fn a_retried_batch_is_acknowledged_and_delivered_once() {
    let gw = TestGateway::plain();
    let user = "idem-retry";
    let mut c = gw.connect(user);
    let batch = json!([
        keyed("agent_started", user, "r1", "b-1"),
        keyed("agent_thinking", user, "r1", "b-2"),
        keyed("agent_completed", user, "r1", "b-3"),
    ]);
    let first = accepted(&gw, &batch, 3);
    let mut seqs = Vec::new();
    for want in ["b-1", "b-2", "b-3"] {
        let (_, seq, k) = next(&mut c);
        assert_eq!(k, want);
        seqs.push(seq);
    }
    // The retry: same answer, although its agent_completed ended the run (not 400).
    let again = accepted(&gw, &batch, 3);
    assert_eq!(first, again);
    assert_eq!(deduplicated(&gw), 3);
    sentinel_is_next(&gw, &mut c, user, "r2", seqs[2]);
    // A retry of only the run's end, alone, is acknowledged as well.
    accepted(&gw, &batch[2], 1);
    // Within one batch, the second event with a key repeats the first.
    let twice = json!([
        keyed("agent_thinking", user, "r2", "b-4"),
        keyed("agent_thinking", user, "r2", "b-4"),
    ]);
    accepted(&gw, &twice, 2);
    let (_, seq, k) = next(&mut c);
    assert_eq!((seq, k), (seqs[2] + 2, json!("b-4")));
    sentinel_is_next(&gw, &mut c, user, "r2", seq);
    assert_eq!(deduplicated(&gw), 5);
    let metrics = crate::support::get(gw.addr, "/metrics").text();
    let samples = crate::support::prometheus(&metrics);
    assert_eq!(
        crate::support::metric(&samples, "agentwire_events_deduplicated_total"),
        5.0
    );
}

#[test]
fn a_repeat_dedups_within_the_ttl_and_is_new_after_it() {
    let user = "idem-ttl";
    // Default TTL (120 s): a repeat in a later request dedups.
    let gw = TestGateway::plain();
    let mut c = gw.connect(user);
    accepted(&gw, &keyed("agent_thinking", user, "r", "t-1"), 1);
    let (_, seq, _) = next(&mut c);
    accepted(&gw, &keyed("agent_thinking", user, "r", "t-1"), 1);
    sentinel_is_next(&gw, &mut c, user, "r", seq);
    drop(gw);

    // A short TTL: after it, the same key is a new event (a new seq, delivered).
    let gw = TestGateway::start(
        agentwire::Config {
            replay_ttl_ms: 200,
            ..config()
        },
        Agent::None,
    );
    let mut c = gw.connect(user);
    accepted(&gw, &keyed("agent_thinking", user, "r", "t-1"), 1);
    let (_, seq, _) = next(&mut c);
    let accepted_at = Instant::now();
    while accepted_at.elapsed() < Duration::from_millis(300) {
        std::thread::sleep(Duration::from_millis(20));
    }
    accepted(&gw, &keyed("agent_thinking", user, "r", "t-1"), 1);
    let (kind, seq2, k) = next(&mut c);
    assert_eq!(
        (kind.as_str(), seq2, k),
        ("agent_thinking", seq + 1, json!("t-1"))
    );
    assert_eq!(deduplicated(&gw), 0);
}

#[test]
fn keys_of_another_user_do_not_collide() {
    let gw = TestGateway::plain();
    let mut a = gw.connect("idem-a");
    let mut b = gw.connect("idem-b");
    accepted(&gw, &keyed("agent_thinking", "idem-a", "r", "same"), 1);
    accepted(&gw, &keyed("agent_thinking", "idem-b", "r", "same"), 1);
    assert_eq!(next(&mut a).2, json!("same"));
    assert_eq!(next(&mut b).2, json!("same"));
    assert_eq!(deduplicated(&gw), 0);
}

#[test]
fn bad_keys_are_400_with_their_index() {
    let gw = TestGateway::plain();
    let user = "idem-bad";
    let ok = keyed("agent_thinking", user, "r", &"k".repeat(128));
    let bad_keys = [json!(""), json!("x".repeat(129)), json!(5), json!({"k": 1})];
    for bad in bad_keys {
        let mut event = plain("agent_thinking", user, "r");
        event["idempotency_key"] = bad.clone();
        let r = publish(gw.addr, &json!([ok, event]));
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        let body = r.json();
        assert_eq!(body["error"], "bad_event", "{body}");
        assert_eq!(body["index"], 1, "{body}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("idempotency_key")),
            "{body}"
        );
    }
    // Nothing of the refused requests was accepted: the 128-byte key is still new.
    accepted(&gw, &ok, 1);
    assert_eq!(deduplicated(&gw), 0);
}

#[test]
fn the_emitter_api_dedups() {
    let gw = TestGateway::plain();
    let user = "idem-emitter";
    let mut c = gw.connect(user);
    let mut run = gw
        .emitter
        .run(user, None, "r-lib", "lib_agent")
        .expect("run");
    run.emit_idempotent("agent_started", &json!({"k": "e-1"}), "e-1")
        .expect("emit");
    run.emit_idempotent("agent_started", &json!({"k": "e-1"}), "e-1")
        .expect("emit");
    run.emit_idempotent("text_delta", &json!({"k": "e-2"}), "e-2")
        .expect("emit");
    assert!(
        run.emit_idempotent("text_delta", &json!({}), "").is_err(),
        "an empty key is refused"
    );
    run.agent_completed(&json!({"k": "end"})).expect("emit");
    let got: Vec<(String, Value)> = (0..3)
        .map(|_| next(&mut c))
        .map(|(t, _, k)| (t, k))
        .collect();
    assert_eq!(
        got,
        vec![
            ("agent_started".to_owned(), json!("e-1")),
            ("text_delta".to_owned(), json!("e-2")),
            ("agent_completed".to_owned(), json!("end")),
        ]
    );
    assert_eq!(deduplicated(&gw), 1);
}

#[test]
fn the_per_user_key_bound_holds_and_counts_in_the_budget() {
    let gw = TestGateway::plain();
    let user = "idem-bound";
    let per_user = gw.stats()["idempotency"]["per_user_limit"]
        .as_u64()
        .expect("per_user_limit") as usize;
    let overhead = gw.stats()["idempotency"]["key_overhead_bytes"]
        .as_u64()
        .expect("key_overhead_bytes") as usize;
    let total = per_user + 100;
    let key = |i: usize| format!("key-{i:06}");
    for chunk in (0..total).collect::<Vec<_>>().chunks(1000) {
        let events: Vec<Value> = chunk
            .iter()
            .map(|&i| keyed("agent_thinking", user, "r", &key(i)))
            .collect();
        accepted(&gw, &Value::Array(events), chunk.len());
    }
    let stats = gw.stats();
    let idem = &stats["idempotency"];
    assert_eq!(idem["keys"], per_user, "{idem}");
    assert_eq!(idem["dropped"], 100, "{idem}");
    assert_eq!(
        idem["bytes"],
        per_user * (key(0).len() + overhead),
        "{idem}"
    );
    let budget = &stats["budgets"]["replay_memory_bytes"];
    let used = budget["used"].as_u64().expect("budget used") as usize;
    assert!(used >= per_user * (key(0).len() + overhead), "{budget}");
    assert!(
        used <= budget["limit"].as_u64().unwrap_or(0) as usize,
        "{budget}"
    );
    // The oldest keys went first: key 0 is new again, the newest still a repeat.
    let before = deduplicated(&gw);
    accepted(&gw, &keyed("agent_thinking", user, "r", &key(total - 1)), 1);
    assert_eq!(deduplicated(&gw), before + 1);
    accepted(&gw, &keyed("agent_thinking", user, "r", &key(0)), 1);
    assert_eq!(deduplicated(&gw), before + 1);
}

#[test]
fn cancelled_lists_a_run_a_client_cancelled() {
    let gw = TestGateway::plain();
    let user = "idem-cancel";
    let mut c = gw.connect(user);
    let body = accepted(&gw, &plain("agent_started", user, "r-c"), 1);
    assert_eq!(body["cancelled"], json!([]), "{body}");
    next(&mut c);
    c.send_json(&json!({"type": "cancel", "run_id": "r-c"}));
    let v = c.recv_json();
    assert_eq!(v, json!({"type": "cancel_requested", "run_id": "r-c"}));
    let batch = json!([
        plain("agent_thinking", user, "r-c"),
        plain("agent_started", user, "r-other"),
        plain("agent_thinking", user, "r-c"),
    ]);
    let body = accepted(&gw, &batch, 3);
    assert_eq!(body["cancelled"], json!(["r-c"]), "once: {body}");
    let body = accepted(&gw, &plain("agent_thinking", user, "r-other"), 1);
    assert_eq!(body["cancelled"], json!([]), "{body}");
    // Another user's run of the same id is not cancelled.
    let body = accepted(&gw, &plain("agent_started", "idem-cancel-2", "r-c"), 1);
    assert_eq!(body["cancelled"], json!([]), "{body}");
}
