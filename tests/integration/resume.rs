//! Resume (PROTOCOL.md section 5): `last_seq` + `epoch` replay what was missed, with no
//! gap and no duplicate; a resume that cannot be exact says `resumed: false`.

use serde_json::json;

use crate::support::{assert_contiguous, connect_path, TestGateway};

fn emit_n(gw: &TestGateway, user: &str, run: &str, n: usize) {
    let mut r = gw
        .emitter
        .run(user, None, run, "resume_agent")
        .expect("run");
    r.agent_started(&json!({"i": 0})).expect("emit");
    for i in 1..n - 1 {
        r.emit("text_delta", &json!({ "i": i })).expect("emit");
    }
    r.agent_completed(&json!({"i": n - 1})).expect("emit");
}

#[test]
fn resume_replays_exactly_the_missed_events_then_live_ones() {
    let gw = TestGateway::plain();
    let user = "res-u1";
    let mut c = gw.connect(user);
    emit_n(&gw, user, "r-1", 3);
    let seen = c.recv_events(3);
    let last = seen[2]["seq"].as_u64().expect("seq");
    c.close();
    gw.wait_open(0);

    emit_n(&gw, user, "r-2", 4); // while offline
    gw.wait_stats("offline events routed", |s| s["events"]["emitted"] == 7);

    let mut back = connect_path(
        gw.addr,
        user,
        &format!("/ws?last_seq={last}&epoch={}", gw.epoch),
    );
    assert_eq!(back.connected["resumed"], true, "{}", back.connected);
    assert_eq!(back.last_seq(), last + 4);
    let missed = back.recv_events(4);
    assert_contiguous(&missed, last + 1);
    for (i, e) in missed.iter().enumerate() {
        assert_eq!(e["run_id"], "r-2");
        assert_eq!(e["data"]["i"], i);
    }
    emit_n(&gw, user, "r-3", 2);
    let live = back.recv_events(2);
    assert_contiguous(&live, last + 5);
    back.ping_pong();
}

#[test]
fn resume_with_another_epoch_is_not_exact_and_replays_nothing() {
    let gw = TestGateway::plain();
    let user = "res-epoch";
    let mut c = gw.connect(user);
    emit_n(&gw, user, "r-1", 2);
    c.recv_events(2);
    let mut other = connect_path(gw.addr, user, "/ws?last_seq=1&epoch=not-this-one");
    assert_eq!(other.connected["resumed"], false, "{}", other.connected);
    other.ping_pong();
}

#[test]
fn resume_from_the_future_is_not_exact() {
    let gw = TestGateway::plain();
    let user = "res-future";
    let mut c = connect_path(
        gw.addr,
        user,
        &format!("/ws?last_seq=99&epoch={}", gw.epoch),
    );
    assert_eq!(c.connected["resumed"], false, "{}", c.connected);
    c.ping_pong();
}

#[test]
fn no_resume_asked_means_resumed_null_and_no_replay() {
    let gw = TestGateway::plain();
    let user = "res-none";
    emit_n(&gw, user, "r-1", 2);
    gw.wait_stats("events routed", |s| s["events"]["emitted"] == 2);
    let mut c = gw.connect(user);
    assert_eq!(c.connected["resumed"], serde_json::Value::Null);
    assert_eq!(c.last_seq(), 2);
    c.ping_pong();
}

/// A resume on a thread-filtered connection replays only what that filter takes.
#[test]
fn resume_respects_the_thread_filter() {
    let gw = TestGateway::plain();
    let user = "res-thread";
    let mut r1 = gw
        .emitter
        .run(user, Some("t1"), "r-t1", "resume_agent")
        .expect("run");
    let mut r2 = gw
        .emitter
        .run(user, Some("t2"), "r-t2", "resume_agent")
        .expect("run");
    r1.agent_started(&json!({})).expect("emit"); // 1
    r2.agent_started(&json!({})).expect("emit"); // 2
    r2.agent_completed(&json!({})).expect("emit"); // 3
    r1.agent_completed(&json!({})).expect("emit"); // 4
    gw.wait_stats("events routed", |s| s["events"]["emitted"] == 4);
    let mut c = connect_path(
        gw.addr,
        user,
        &format!("/ws?thread_id=t1&last_seq=0&epoch={}", gw.epoch),
    );
    assert_eq!(c.connected["resumed"], true);
    let evs = c.recv_events(2);
    let seqs: Vec<u64> = evs.iter().map(|e| e["seq"].as_u64().unwrap_or(0)).collect();
    assert_eq!(seqs, [1, 4]);
    c.ping_pong();
}

/// Events already pushed out of a small replay buffer make the resume inexact.
#[test]
fn resume_past_the_replay_buffer_is_not_exact() {
    let mut cfg = crate::support::config();
    cfg.replay_events = 2;
    let gw = TestGateway::start(cfg, crate::support::Agent::None);
    let user = "res-trim";
    emit_n(&gw, user, "r-1", 5);
    gw.wait_stats("events routed", |s| s["events"]["emitted"] == 5);
    let mut c = connect_path(gw.addr, user, &format!("/ws?last_seq=1&epoch={}", gw.epoch));
    assert_eq!(c.connected["resumed"], false, "{}", c.connected);
    assert_eq!(c.last_seq(), 5);
    // Within the buffer: exact.
    let mut d = connect_path(gw.addr, user, &format!("/ws?last_seq=3&epoch={}", gw.epoch));
    assert_eq!(d.connected["resumed"], true, "{}", d.connected);
    assert_contiguous(&d.recv_events(2), 4);
    c.ping_pong();
    d.ping_pong();
}

/// A client closed as a slow consumer resumes from its last seen seq and gets the
/// rest, though the replay is far larger than `max_pending_bytes`, as long as it reads.
#[test]
fn slow_consumer_resumes_without_being_closed_again() {
    let mut cfg = crate::support::config();
    cfg.max_pending_bytes = 256 * 1024;
    // The replay (7 MiB) must stay kept: above the default per-user byte cap.
    cfg.replay_bytes_per_user = 64 << 20;
    let gw = TestGateway::start(cfg, crate::support::Agent::None);
    let user = "res-slow";
    let mut slow = gw.connect(user);
    let blob = "r".repeat(60 * 1024);
    let mut run = gw
        .emitter
        .run(user, None, "r-big", "resume_agent")
        .expect("run");
    for i in 0..120 {
        run.emit("text_delta", &json!({ "i": i, "blob": blob }))
            .expect("emit");
    }
    run.agent_completed(&json!({ "i": 120 })).expect("emit");
    gw.wait_stats("slow consumer closed", |s| {
        s["connections"]["closed_by_reason"]["slow_consumer"] == 1
    });
    let got = slow.expect_close(1013);
    let last = got.last().map_or(0, |e| e["seq"].as_u64().expect("seq"));
    assert_contiguous(&got, 1);

    let mut back = connect_path(
        gw.addr,
        user,
        &format!("/ws?last_seq={last}&epoch={}", gw.epoch),
    );
    assert_eq!(back.connected["resumed"], true, "{}", back.connected);
    let rest = back.recv_events(121 - last as usize);
    assert_contiguous(&rest, last + 1);
    assert_eq!(
        rest.last().map(|e| e["type"].clone()),
        Some(json!("agent_completed"))
    );
    back.ping_pong();
}

/// docs/PROTOCOL.md appendix: `last_seq` without `epoch` cannot be verified.
#[test]
fn last_seq_without_epoch_is_not_exact() {
    let gw = TestGateway::plain();
    let user = "res-noepoch";
    emit_n(&gw, user, "r-1", 2);
    gw.wait_stats("events routed", |s| s["events"]["emitted"] == 2);
    let mut c = connect_path(gw.addr, user, "/ws?last_seq=0");
    assert_eq!(c.connected["resumed"], false, "{}", c.connected);
    c.ping_pong();
}

/// After `replay_ttl_ms` an offline user's kept events expire (resume is inexact) and
/// the idle user is forgotten: seen again, it starts over in a new epoch (seq from 1),
/// so a client holding the old epoch reloads instead of mixing two counters.
#[test]
fn replay_expires_and_a_forgotten_user_starts_a_new_epoch() {
    let mut cfg = crate::support::config();
    cfg.replay_ttl_ms = 50;
    let gw = TestGateway::start(cfg, crate::support::Agent::None);
    let user = "res-ttl";
    emit_n(&gw, user, "r-1", 2);
    gw.wait_stats("events routed", |s| s["events"]["emitted"] == 2);
    gw.wait_stats("the idle user forgotten", |s| s["users"]["known"] == 0);
    let mut c = connect_path(gw.addr, user, &format!("/ws?last_seq=2&epoch={}", gw.epoch));
    assert_eq!(c.connected["resumed"], false, "{}", c.connected);
    assert_eq!(c.last_seq(), 0, "a forgotten user starts over");
    assert_ne!(c.connected["epoch"], gw.epoch.as_str(), "in a new epoch");
    emit_n(&gw, user, "r-2", 2);
    assert_contiguous(&c.recv_events(2), 1);
}
