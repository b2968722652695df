//! The `thread_id` connection filter: events of that thread and of the null thread only.

use serde_json::json;

use crate::support::{assert_contiguous, connect_path, TestGateway};

#[test]
fn thread_filter_delivers_its_thread_and_null_thread_only() {
    let gw = TestGateway::plain();
    let user = "thr-u1";
    let mut filtered = connect_path(gw.addr, user, "/ws?thread_id=t1");
    assert_eq!(filtered.connected["thread_id"], "t1");
    let mut plain = gw.connect(user);
    let base = plain.last_seq();

    let mut r1 = gw
        .emitter
        .run(user, Some("t1"), "r-t1", "thr_agent")
        .expect("run");
    let mut r2 = gw
        .emitter
        .run(user, Some("t2"), "r-t2", "thr_agent")
        .expect("run");
    let mut rn = gw
        .emitter
        .run(user, None, "r-null", "thr_agent")
        .expect("run");
    r1.agent_started(&json!({"n": 1})).expect("emit"); // base+1 t1
    r2.agent_started(&json!({"n": 2})).expect("emit"); // base+2 t2
    rn.agent_started(&json!({"n": 3})).expect("emit"); // base+3 null
    r2.agent_completed(&json!({"n": 4})).expect("emit"); // base+4 t2
    rn.agent_completed(&json!({"n": 5})).expect("emit"); // base+5 null
    r1.agent_completed(&json!({"n": 6})).expect("emit"); // base+6 t1 (the barrier)

    let all = plain.recv_events(6);
    assert_contiguous(&all, base + 1);
    let ns: Vec<u64> = all
        .iter()
        .map(|e| e["data"]["n"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(ns, vec![1, 2, 3, 4, 5, 6]);

    // Per-user order is delivery order, so the t2 events would precede the barrier.
    let got = filtered.recv_events(4);
    let ns: Vec<u64> = got
        .iter()
        .map(|e| e["data"]["n"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(
        ns,
        vec![1, 3, 5, 6],
        "t1 + null-thread events only: {got:?}"
    );
    let seqs: Vec<u64> = got.iter().map(|e| e["seq"].as_u64().unwrap_or(0)).collect();
    assert_eq!(
        seqs,
        vec![base + 1, base + 3, base + 5, base + 6],
        "user seq, gaps where filtered"
    );
    for e in &got {
        assert!(e["thread_id"] == "t1" || e["thread_id"].is_null(), "{e}");
    }
    filtered.ping_pong();
    plain.ping_pong();
}

/// The `/ws/factory` and `/websocket` aliases (and `mode=legacy`) are plain modes:
/// they see every event of the user.
#[test]
fn factory_and_legacy_modes_see_every_event() {
    let gw = TestGateway::plain();
    let user = "thr-modes";
    let mut factory = connect_path(gw.addr, user, "/ws/factory");
    let mut legacy = connect_path(gw.addr, user, "/websocket");
    let mut legacy_q = connect_path(gw.addr, user, "/ws?mode=legacy");
    assert_eq!(factory.connected["mode"], "factory");
    assert_eq!(legacy.connected["mode"], "legacy");
    assert_eq!(legacy_q.connected["mode"], "legacy");
    let mut run = gw
        .emitter
        .run(user, Some("tx"), "r-modes", "thr_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    run.agent_completed(&json!({})).expect("emit");
    for c in [&mut factory, &mut legacy, &mut legacy_q] {
        let evs = c.recv_events(2);
        assert_eq!(evs[0]["type"], "agent_started");
        assert_eq!(evs[1]["type"], "agent_completed");
    }
}
