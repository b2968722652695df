//! Several gateway nodes on one real `redis-server` (`engine = "redis"`, PROTOCOL.md
//! section 9): cross-node delivery, one contiguous seq order per user whatever node
//! each event went through, isolation, resume on another node, epoch and seq across
//! node restarts and `kill -9`, and Redis paused or restarted. Every check is per
//! event (its seq and its data), not per count.

use serde_json::{json, Value};

use std::net::SocketAddr;

use crate::support::*;

/// Publish one event of `user` through `addr` and require 202.
fn publish_one(addr: SocketAddr, user: &str, run: &str, i: u64) {
    publish_ok(
        addr,
        &json!([pub_event("text_delta", user, None, run, json!({ "i": i }))]),
    );
}

/// The `data.i` of each event, checking they all belong to `user`.
fn ids(events: &[Value], user: &str) -> Vec<u64> {
    events
        .iter()
        .map(|e| {
            assert_eq!(e["user_id"], user, "cross-user delivery: {e}");
            e["data"]["i"].as_u64().expect("data.i")
        })
        .collect()
}

#[test]
fn an_event_published_through_one_node_reaches_the_users_connections_on_every_node() {
    let redis = RedisServer::start();
    let nodes: Vec<TestGateway> = (0..3).map(|i| node(&redis, &format!("n{i}"))).collect();
    let mut a = nodes[0].connect("cx-u1");
    let mut b = nodes[1].connect("cx-u1");
    assert_eq!(a.connected["node_id"], "n0");
    assert_eq!(b.connected["node_id"], "n1");
    assert_eq!(
        a.connected["epoch"], b.connected["epoch"],
        "one epoch per user"
    );
    for i in 0..5 {
        publish_one(nodes[2].addr, "cx-u1", "r-1", i);
    }
    for c in [&mut a, &mut b] {
        let got = c.recv_events(5);
        assert_contiguous(&got, 1);
        assert_eq!(ids(&got, "cx-u1"), [0, 1, 2, 3, 4]);
    }
    // An in-process emit through a node reaches the others too.
    let mut run = nodes[1]
        .emitter
        .run("cx-u1", None, "r-2", "emit_agent")
        .expect("run");
    run.emit("text_delta", &json!({ "i": 5 })).expect("emit");
    for c in [&mut a, &mut b] {
        let got = c.recv_events(1);
        assert_eq!(
            (got[0]["seq"].as_u64(), got[0]["run_id"].as_str()),
            (Some(6), Some("r-2"))
        );
    }
}

#[test]
fn a_client_resumes_on_another_node_with_exactly_what_it_missed() {
    let redis = RedisServer::start();
    let n0 = node(&redis, "n0");
    let n1 = node(&redis, "n1");
    let n2 = node(&redis, "n2");
    let mut c = n0.connect("rs-u1");
    for i in 0..3 {
        publish_one(n1.addr, "rs-u1", "r-1", i);
    }
    let seen = c.recv_events(3);
    let epoch = epoch_of(&c);
    c.close();
    for i in 3..7 {
        publish_one(n1.addr, "rs-u1", "r-1", i);
    }
    let mut back = connect_path(n2.addr, "rs-u1", &format!("/ws?last_seq=3&epoch={epoch}"));
    assert_eq!(back.connected["resumed"], true, "{}", back.connected);
    assert_eq!(back.last_seq(), 7);
    let missed = back.recv_events(4);
    assert_contiguous(&missed, 4);
    assert_eq!(ids(&missed, "rs-u1"), [3, 4, 5, 6]);
    publish_one(n0.addr, "rs-u1", "r-1", 7);
    let live = back.recv_events(1);
    assert_contiguous(&live, 8);
    assert_eq!(ids(&seen, "rs-u1"), [0, 1, 2]);

    // Another epoch, or a seq from the future: resumed false, nothing replayed.
    let mut other = connect_path(n0.addr, "rs-u1", "/ws?last_seq=3&epoch=not-it");
    assert_eq!(other.connected["resumed"], false);
    let mut future = connect_path(n1.addr, "rs-u1", &format!("/ws?last_seq=99&epoch={epoch}"));
    assert_eq!(future.connected["resumed"], false);
    publish_one(n2.addr, "rs-u1", "r-1", 8);
    for cl in [&mut other, &mut future, &mut back] {
        let got = cl.recv_events(1);
        assert_contiguous(&got, 9);
    }
}

#[test]
fn epoch_and_seq_are_kept_across_a_node_restart() {
    let redis = RedisServer::start();
    let mut n0 = node(&redis, "n0");
    let c = n0.connect("rt-u1");
    let epoch = epoch_of(&c);
    for i in 0..3 {
        publish_one(n0.addr, "rt-u1", "r-1", i);
    }
    drop(c);
    let (done, _) = n0.shutdown_and_join(WAIT);
    done.expect("clean shutdown");
    let n1 = node(&redis, "n1");
    let mut back = connect_path(n1.addr, "rt-u1", &format!("/ws?last_seq=1&epoch={epoch}"));
    assert_eq!(back.connected["epoch"], epoch.as_str());
    assert_eq!(back.connected["resumed"], true);
    assert_eq!(back.last_seq(), 3);
    let missed = back.recv_events(2);
    assert_eq!(ids(&missed, "rt-u1"), [1, 2]);
    publish_one(n1.addr, "rt-u1", "r-1", 3);
    assert_contiguous(&back.recv_events(1), 4);
}
