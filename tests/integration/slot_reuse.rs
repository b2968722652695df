//! A reused slab slot never receives what was meant for its previous owner
//! (STYLE.md: everything that outlives a callback holds `ConnId { key, generation }`).

use serde_json::json;

use crate::support::{config, connect_path, Agent, TestGateway, WAIT};
use agentwire::Inbound;

/// Close A's connection, wait until no session is open (its slot is free, and the
/// most recently freed slot is the next one handed out), connect B, emit for A: B
/// gets none of it; a marker event for B sent afterwards is B's very next frame.
#[test]
fn a_new_owner_of_a_slot_gets_nothing_of_the_old_owner() {
    let gw = TestGateway::plain();
    for round in 0..5 {
        let a_user = format!("slot-a-{round}");
        let b_user = format!("slot-b-{round}");
        let a = gw.connect(&a_user);
        let a_id = a.connected["connection_id"].clone();
        a.close();
        gw.wait_open(0);
        let mut b = gw.connect(&b_user);
        assert_ne!(
            b.connected["connection_id"], a_id,
            "connection ids are never reused"
        );

        let mut ra = gw
            .emitter
            .run(&a_user, None, &format!("r-a-{round}"), "slot_agent")
            .expect("run");
        ra.agent_started(&json!({"for": "a"})).expect("emit");
        ra.agent_completed(&json!({"for": "a"})).expect("emit");
        let mut rb = gw
            .emitter
            .run(&b_user, None, &format!("r-b-{round}"), "slot_agent")
            .expect("run");
        rb.agent_started(&json!({"for": "b"})).expect("emit");
        let ev = b.recv_json();
        assert_eq!(
            ev["user_id"],
            b_user.as_str(),
            "B got an event of the slot's previous owner: {ev}"
        );
        assert_eq!(ev["data"]["for"], "b");
        rb.agent_completed(&json!({})).expect("emit");
        assert_eq!(b.recv_json()["type"], "agent_completed");
        b.close();
        gw.wait_open(0);
    }
}

/// A run started from an isolated connection that has since closed is delivered to
/// nobody, not to whichever connection took the slot.
#[test]
fn a_run_owned_by_a_closed_isolated_connection_reaches_no_one() {
    let mut gw = TestGateway::start(config(), Agent::Test);
    let inbound = gw.inbound();
    let user = "slot-iso";
    let mut iso = connect_path(gw.addr, user, "/ws/isolated");
    let ack = iso.user_message(Some("t1"), "work", "s1");
    let run_id = ack["run_id"].as_str().expect("run_id").to_owned();
    let msg = inbound
        .recv_timeout(WAIT)
        .expect("message reaches the worker");
    assert!(matches!(&msg, Inbound::UserMessage { run_id: r, .. } if *r == run_id));
    iso.close();
    gw.wait_open(0);

    // Same user, both kinds of connection; one of them likely reuses the slot.
    let mut plain = gw.connect(user);
    let mut iso2 = connect_path(gw.addr, user, "/ws/isolated");

    let mut run = gw
        .emitter
        .run(user, Some("t1"), &run_id, "slot_agent")
        .expect("run");
    run.agent_started(&json!({"orphan": true})).expect("emit");
    run.agent_completed(&json!({"orphan": true})).expect("emit");
    let mut marker = gw
        .emitter
        .run(user, Some("t1"), "r-marker", "slot_agent")
        .expect("run");
    marker
        .agent_started(&json!({"marker": true}))
        .expect("emit");

    let ev = plain.recv_json();
    assert_eq!(
        ev["run_id"], "r-marker",
        "the orphaned isolated run leaked to a main connection: {ev}"
    );
    // The isolated one takes neither the orphan nor the marker (not its run).
    iso2.ping_pong();
    marker.agent_completed(&json!({})).expect("emit");
    assert_eq!(plain.recv_json()["type"], "agent_completed");
}
