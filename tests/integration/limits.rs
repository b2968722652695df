//! Connection limits: per user (evict_oldest, reject) and in total.

use agentwire::PerUserPolicy;
use serde_json::json;

use crate::support::{assert_refusal, bearer, config, token, upgrade, Agent, TestGateway};

#[test]
fn fourth_connection_evicts_the_oldest_with_4002() {
    let mut cfg = config();
    cfg.max_connections_per_user = 3;
    cfg.per_user_policy = PerUserPolicy::EvictOldest;
    let gw = TestGateway::start(cfg, Agent::None);
    let user = "lim-evict";
    let mut c1 = gw.connect(user);
    let mut c2 = gw.connect(user);
    let mut c3 = gw.connect(user);
    let mut c4 = gw.connect(user);
    c1.expect_close(4002);
    c2.ping_pong();
    c3.ping_pong();
    c4.ping_pong();
    let s = gw.wait_open(3);
    assert_eq!(s["connections"]["closed_by_reason"]["evicted"], 1, "{s}");

    // The evicted connection gets nothing more; the others get the user's events.
    let mut run = gw
        .emitter
        .run(user, None, "r-evict", "lim_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    for c in [&mut c2, &mut c3, &mut c4] {
        assert_eq!(c.recv_json()["run_id"], "r-evict");
    }
    // A fifth evicts the next oldest.
    let _c5 = gw.connect(user);
    c2.expect_close(4002);
    c3.ping_pong();
}

#[test]
fn fourth_connection_under_reject_is_429_and_the_three_stay() {
    let mut cfg = config();
    cfg.max_connections_per_user = 3;
    cfg.per_user_policy = PerUserPolicy::Reject;
    let gw = TestGateway::start(cfg, Agent::None);
    let user = "lim-reject";
    let mut cs: Vec<_> = (0..3).map(|_| gw.connect(user)).collect();
    let r = upgrade(gw.addr, "/ws", &[bearer(&token(user))]);
    assert_refusal(&r, 429, "too_many_connections");
    for c in cs.iter_mut() {
        c.ping_pong();
    }
    let s = gw.stats();
    assert_eq!(
        s["connections"]["refused"]["too_many_connections"], 1,
        "{s}"
    );
    assert_eq!(s["connections"]["open"], 3, "{s}");
}

#[test]
fn total_limit_refuses_with_429_across_users() {
    let mut cfg = config();
    cfg.max_connections = 4;
    let gw = TestGateway::start(cfg, Agent::None);
    let mut cs: Vec<_> = (0..4)
        .map(|i| gw.connect(&format!("lim-total-{i}")))
        .collect();
    let r = upgrade(gw.addr, "/ws", &[bearer(&token("lim-total-x"))]);
    assert_refusal(&r, 429, "too_many_connections");
    // Even a user already connected cannot exceed the total under evict_oldest ...
    // ... unless eviction frees a slot: the per-user policy runs first. With one
    // connection each and a per-user limit of 3 nothing is evicted, so 429 again.
    let r = upgrade(gw.addr, "/ws", &[bearer(&token("lim-total-0"))]);
    assert_refusal(&r, 429, "too_many_connections");
    for c in cs.iter_mut() {
        c.ping_pong();
    }
}

/// A client that stops reading is closed with 1013 once its unsent output passes
/// `max_pending_bytes`; another user's delivery is not held up meanwhile.
#[test]
fn slow_consumer_is_closed_with_1013_and_others_are_not_delayed() {
    let mut cfg = config();
    cfg.max_pending_bytes = 256 * 1024;
    let gw = TestGateway::start(cfg, Agent::None);
    let mut slow = gw.connect("lim-slow");
    let mut fast = gw.connect("lim-fast");
    let blob = "s".repeat(60 * 1024);
    let mut flood = gw
        .emitter
        .run("lim-slow", None, "r-flood", "lim_agent")
        .expect("run");
    let mut other = gw
        .emitter
        .run("lim-fast", None, "r-fast", "lim_agent")
        .expect("run");
    for i in 0..150 {
        flood
            .emit("text_delta", &json!({ "blob": blob }))
            .expect("emit");
        if i % 10 == 0 {
            other.emit("text_delta", &json!({ "i": i })).expect("emit");
        }
    }
    // The fast client gets all of its events while the slow one is not reading.
    let evs = fast.recv_events(15);
    for (k, e) in evs.iter().enumerate() {
        assert_eq!(e["data"]["i"], k * 10, "{e}");
    }
    gw.wait_stats("slow consumer closed", |s| {
        s["connections"]["closed_by_reason"]["slow_consumer"] == 1
    });
    let before = slow.expect_close(1013);
    assert!(
        before.len() < 150,
        "not every event was queued for the slow client"
    );
    fast.ping_pong();
}

/// At the total limit, a user's extra connection under evict_oldest still succeeds:
/// the eviction frees the slot it needs.
#[test]
fn eviction_frees_a_slot_at_the_total_limit() {
    let mut cfg = config();
    cfg.max_connections = 3;
    cfg.max_connections_per_user = 3;
    let gw = TestGateway::start(cfg, Agent::None);
    let user = "lim-evict-total";
    let mut old = gw.connect(user);
    let _b = gw.connect(user);
    let _c = gw.connect(user);
    let mut newest = gw.connect(user);
    old.expect_close(4002);
    newest.ping_pong();
}
