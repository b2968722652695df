//! Several gateway nodes on one real `redis-server` (`engine = "redis"`, PROTOCOL.md
//! section 9): cross-node delivery, one contiguous seq order per user whatever node
//! each event went through, isolation, resume on another node, epoch and seq across
//! node restarts and `kill -9`, and Redis paused or restarted. Every check is per
//! event (its seq and its data), not per count.

use serde_json::{json, Value};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::*;

/// Publish one event of `user` through `addr` and require 202.
fn publish_one(addr: SocketAddr, user: &str, run: &str, i: u64) {
    publish_ok(
        addr,
        &json!([pub_event("text_delta", user, None, run, json!({ "i": i }))]),
    );
}

/// User and run ids may hold newlines (src/ids.rs): such events cross nodes intact
/// (the pub/sub message was split at newlines: the client got a broken frame).
#[test]
fn ids_with_newlines_cross_nodes_intact() {
    let redis = RedisServer::start();
    let nodes: Vec<TestGateway> = (0..2).map(|i| node(&redis, &format!("n{i}"))).collect();
    let (user, run) = ("cx\nnl", "r\n1\n{}");
    let mut a = nodes[0].connect(user);
    for i in 0..3 {
        publish_one(nodes[1].addr, user, run, i);
    }
    let got = a.recv_events(3);
    assert_contiguous(&got, 1);
    assert_eq!(ids(&got, user), [0, 1, 2]);
    assert!(got.iter().all(|e| e["run_id"] == run), "{got:?}");
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
    let engine = &nodes[2].stats()["engine"];
    assert_eq!(engine["name"], "redis");
    assert_eq!(engine["node_id"], "n2");
    assert_eq!(engine["connected"], true);
    assert!(engine["round_trips"].as_u64() >= Some(1), "{engine}");
    assert!(engine["round_trip_us_p99"].as_u64() >= engine["round_trip_us_p50"].as_u64());
    assert!(engine["round_trip_us_p50"].as_u64() >= Some(1), "{engine}");
    let metrics = prometheus(&get(nodes[2].addr, "/metrics").text());
    assert_eq!(metric(&metrics, "agentwire_engine_connected"), 1.0);
    assert!(metric(&metrics, "agentwire_engine_round_trips_total") >= 1.0);
    assert_eq!(nodes[0].stats()["engine"]["users_listened"], 1);
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

#[test]
fn concurrent_publishing_through_three_nodes_gives_every_connection_one_contiguous_order() {
    let redis = RedisServer::start();
    let nodes: Vec<TestGateway> = (0..3).map(|i| node(&redis, &format!("n{i}"))).collect();
    let mut clients: Vec<Client> = nodes.iter().map(|n| n.connect("cc-u1")).collect();
    let per_node = 40u64;
    let publishers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(k, n)| {
            let addr = n.addr;
            std::thread::spawn(move || {
                // Batches of 4 events: one request is one pipeline of scripts.
                for b in 0..per_node / 4 {
                    let batch: Vec<Value> = (0..4)
                        .map(|j| {
                            let i = k as u64 * 1000 + b * 4 + j;
                            pub_event("text_delta", "cc-u1", None, "r-1", json!({ "i": i }))
                        })
                        .collect();
                    publish_ok(addr, &json!(batch));
                }
            })
        })
        .collect();
    for p in publishers {
        p.join().expect("publisher");
    }
    let total = per_node * 3;
    let mut orders = Vec::new();
    for c in &mut clients {
        let got = c.recv_events(total as usize);
        assert_contiguous(&got, 1);
        orders.push(ids(&got, "cc-u1"));
    }
    // Every connection saw the same order, each event once, and each publisher's
    // events in the order it published them.
    assert!(orders.windows(2).all(|w| w[0] == w[1]), "one order for all");
    let order = &orders[0];
    let mut sorted = order.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), total as usize, "no duplicate");
    for k in 0..3u64 {
        let mine: Vec<u64> = order.iter().copied().filter(|i| i / 1000 == k).collect();
        assert_eq!(mine, (k * 1000..k * 1000 + per_node).collect::<Vec<_>>());
    }
}

#[test]
fn many_users_spread_over_nodes_each_see_only_their_own_events() {
    let redis = RedisServer::start();
    let nodes: Vec<TestGateway> = (0..3).map(|i| node(&redis, &format!("n{i}"))).collect();
    let users: Vec<String> = (0..12).map(|u| format!("iso-u{u}")).collect();
    let mut clients: Vec<(String, Client)> = users
        .iter()
        .enumerate()
        .map(|(u, name)| (name.clone(), nodes[u % 3].connect(name)))
        .collect();
    let mut expected: HashMap<String, Vec<u64>> = HashMap::new();
    for round in 0..5u64 {
        let batch: Vec<Value> = users
            .iter()
            .enumerate()
            .map(|(u, name)| {
                let i = round * 100 + u as u64;
                expected.entry(name.clone()).or_default().push(i);
                pub_event("text_delta", name, None, "r-1", json!({ "i": i }))
            })
            .collect();
        // Each round goes through another node.
        publish_ok(nodes[(round % 3) as usize].addr, &json!(batch));
    }
    for (name, c) in &mut clients {
        let got = c.recv_events(5);
        assert_contiguous(&got, 1);
        assert_eq!(&ids(&got, name), &expected[name]);
        c.ping_pong(); // nothing else queued before the pong
    }
}

#[test]
fn redis_paused_answers_503_and_degraded_then_everything_recovers_by_itself() {
    let redis = RedisServer::start();
    let n0 = node(&redis, "n0");
    let n1 = node(&redis, "n1");
    let mut c = n0.connect("pz-u1");
    publish_one(n1.addr, "pz-u1", "r-1", 0);
    assert_contiguous(&c.recv_events(1), 1);

    redis.pause();
    assert_publish_unavailable(n1.addr, "pz-u1", 1);
    wait_until("/health degraded on the publishing node", || {
        let (status, body) = get_json(n1.addr, "/health");
        status == 503 && body["status"] == "degraded"
    });
    assert_eq!(n1.stats()["engine"]["connected"], false);
    // A new connection is refused before its 101: its open cannot be answered.
    let r = upgrade(n1.addr, "/ws", &[bearer(&token("pz-u3"))]);
    assert_refusal(&r, 503, "engine_unavailable");
    let metrics = prometheus(&get(n1.addr, "/metrics").text());
    assert_eq!(metric(&metrics, "agentwire_engine_connected"), 0.0);
    c.ping_pong(); // the client stays connected
                   // An in-process emit fails after its bounded wait.
    let quick = n1.emitter.with_max_wait(Duration::from_millis(300));
    let mut run = quick.run("pz-u2", None, "r-9", "emit_agent").expect("run");
    match run.emit("text_delta", &json!({ "i": 100 })) {
        Err(agentwire::EmitError::EngineUnavailable(_)) => {}
        other => panic!("emit while Redis is paused: {other:?}"),
    }

    redis.resume();
    wait_until("/health healthy again", || {
        get_json(n1.addr, "/health").0 == 200
    });
    // The event answered 503 may or may not have been stored: a worker retries it
    // (with an idempotency key); here a new one is published.
    publish_one(n1.addr, "pz-u1", "r-1", 2);
    // The client gets what was stored, in order, or is closed 1013 to resume.
    let mut got = Vec::new();
    loop {
        match c.next_frame(WAIT) {
            Frame::Json(v) => {
                let last = v["data"]["i"] == 2;
                got.push(v);
                if last {
                    break;
                }
            }
            Frame::Close(Some((1013, _))) => {
                got.clear();
                break;
            }
            other => panic!("expected events or 1013 after the pause, got {other:?}"),
        }
    }
    if !got.is_empty() {
        assert_contiguous(&got, 2);
    }
}

#[test]
fn redis_restarted_without_its_data_closes_1013_then_resume_says_resumed_false() {
    let mut redis = RedisServer::start();
    let n0 = node(&redis, "n0");
    let mut c = n0.connect("rr-u1");
    for i in 0..3 {
        publish_one(n0.addr, "rr-u1", "r-1", i);
    }
    c.recv_events(3);
    let epoch = epoch_of(&c);
    redis.restart_empty();
    // The node finds the user's history gone: never new seqs as if nothing happened.
    c.expect_close(1013);
    let mut back = None;
    wait_until("a resume is answered after the restart", || {
        back = connect_with(
            n0.addr,
            &format!("/ws?last_seq=3&epoch={epoch}"),
            &[("Authorization", &format!("Bearer {}", token("rr-u1")))],
        )
        .ok();
        back.is_some()
    });
    let mut back = back.expect("connected");
    assert_eq!(back.connected["resumed"], false, "{}", back.connected);
    assert_ne!(back.connected["epoch"], epoch.as_str());
    assert_eq!(back.last_seq(), 0);
    publish_one(n0.addr, "rr-u1", "r-1", 9);
    assert_contiguous(&back.recv_events(1), 1);
}

#[test]
fn kill_9_of_a_node_mid_stream_loses_and_duplicates_nothing_for_clients_resuming_elsewhere() {
    let redis = RedisServer::start();
    let mut a = BinaryNode::start(&redis, "bin-a");
    let b = BinaryNode::start(&redis, "bin-b");
    let users = ["k9-u1", "k9-u2"];
    let mut clients: Vec<Client> = users.iter().map(|u| connect(a.addr, u)).collect();
    let total = 120u64;
    let b_addr = b.addr;
    let publisher = std::thread::spawn(move || {
        for i in 0..total {
            for u in users {
                publish_one(b_addr, u, "r-1", i);
            }
        }
    });
    let mut seen: Vec<Vec<Value>> = clients.iter_mut().map(|c| c.recv_events(10)).collect();
    a.kill9();
    for (k, c) in clients.iter_mut().enumerate() {
        // Whatever was in flight, then the connection ends (no close frame: killed).
        loop {
            match c.next_frame(WAIT) {
                Frame::Json(v) => seen[k].push(v),
                Frame::Gone(_) | Frame::Close(_) => break,
                Frame::Timeout => panic!("the killed node's connection did not end"),
            }
        }
    }
    for (k, u) in users.iter().enumerate() {
        let last = seen[k].last().and_then(|e| e["seq"].as_u64()).expect("seq");
        let epoch = epoch_of(&clients[k]);
        let mut back = connect_path(b.addr, u, &format!("/ws?last_seq={last}&epoch={epoch}"));
        assert_eq!(back.connected["resumed"], true, "{}", back.connected);
        let rest = back.recv_events((total - last) as usize);
        seen[k].extend(rest);
    }
    publisher.join().expect("publisher");
    for (k, u) in users.iter().enumerate() {
        // Per event: seq 1..=total in order, data.i 0..total, all of this user.
        assert_contiguous(&seen[k], 1);
        assert_eq!(ids(&seen[k], u), (0..total).collect::<Vec<_>>());
    }
}

#[test]
fn an_event_acknowledged_by_a_node_killed_right_after_is_not_lost() {
    let redis = RedisServer::start();
    let mut a = BinaryNode::start(&redis, "bin-a");
    let b = BinaryNode::start(&redis, "bin-b");
    let first = connect(b.addr, "ak-u1");
    let epoch = epoch_of(&first);
    drop(first);
    publish_one(a.addr, "ak-u1", "r-1", 42);
    a.kill9();
    let mut back = connect_path(b.addr, "ak-u1", &format!("/ws?last_seq=0&epoch={epoch}"));
    assert_eq!(back.connected["resumed"], true);
    let got = back.recv_events(1);
    assert_eq!(ids(&got, "ak-u1"), [42]);
    assert_contiguous(&got, 1);
}

#[test]
fn two_nodes_share_one_address_with_reuse_port() {
    let redis = RedisServer::start();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let on_addr = |name: &str, reuse: bool| {
        let mut cfg = redis_config(&redis, name);
        cfg.listen = addr;
        cfg.reuse_port = reuse;
        cfg
    };
    let n0 = TestGateway::start(on_addr("rp-0", true), Agent::None);
    // Without the setting the address is taken.
    assert!(agentwire::Gateway::new(on_addr("rp-x", false)).is_err());
    let n1 = TestGateway::start(on_addr("rp-1", true), Agent::None);
    // The kernel spreads connections over both (by a hash of the client's address:
    // 24 connections all on one node would be a 2^-23 chance).
    let mut clients: Vec<Client> = (0..24)
        .map(|i| connect(addr, &format!("rp-u{i}")))
        .collect();
    let mut on: HashMap<String, usize> = HashMap::new();
    for c in &clients {
        *on.entry(c.connected["node_id"].as_str().unwrap_or("").to_owned())
            .or_default() += 1;
    }
    assert_eq!(on.len(), 2, "both nodes took connections: {on:?}");
    let batch: Vec<Value> = (0..24)
        .map(|i| {
            pub_event(
                "text_delta",
                &format!("rp-u{i}"),
                None,
                "r-1",
                json!({ "i": i }),
            )
        })
        .collect();
    publish_ok(n0.addr, &json!(batch));
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(ids(&c.recv_events(1), &format!("rp-u{i}")), [i as u64]);
    }
    drop(n1);
}

#[test]
fn a_retried_event_with_its_idempotency_key_is_stored_once_whatever_node_it_went_through() {
    let redis = RedisServer::start();
    let n0 = node(&redis, "n0");
    let n1 = node(&redis, "n1");
    let mut c = n0.connect("ik-u1");
    let keyed = |i: u64, key: &str| {
        let mut ev = pub_event("text_delta", "ik-u1", None, "r-1", json!({ "i": i }));
        ev["idempotency_key"] = json!(key);
        ev
    };
    publish_ok(n0.addr, &json!([keyed(0, "k-0"), keyed(1, "k-1")]));
    // The retry of both through another node, with one new event between them.
    publish_ok(
        n1.addr,
        &json!([keyed(0, "k-0"), keyed(2, "k-2"), keyed(1, "k-1")]),
    );
    let got = c.recv_events(3);
    assert_contiguous(&got, 1);
    assert_eq!(ids(&got, "ik-u1"), [0, 1, 2]);
    c.ping_pong(); // nothing else came
    assert_eq!(n1.stats()["events"]["deduplicated"], 2);
}

#[test]
fn runs_are_cluster_wide_listed_in_connected_capped_and_refused_once_ended() {
    let redis = RedisServer::start();
    let tweak = |c: &mut agentwire::Config| c.max_active_runs_per_user = 2;
    let n0 = node_with(&redis, "n0", tweak);
    let n1 = node_with(&redis, "n1", tweak);
    publish_ok(
        n0.addr,
        &json!([pub_event(
            "agent_started",
            "ru-u1",
            Some("t1"),
            "r-1",
            json!({})
        )]),
    );
    publish_ok(
        n1.addr,
        &json!([pub_event("agent_thinking", "ru-u1", None, "r-2", json!({}))]),
    );
    let c = n1.connect("ru-u1");
    let mut runs: Vec<Value> = c.connected["active_runs"].as_array().expect("runs").clone();
    runs.sort_by_key(|r| r["run_id"].as_str().unwrap_or("").to_owned());
    assert_eq!(runs.len(), 2, "{}", c.connected);
    assert_eq!(runs[0]["run_id"], "r-1");
    assert_eq!(runs[0]["thread_id"], "t1");
    assert_eq!(runs[0]["agent_name"], "pub_agent");
    assert_eq!(runs[0]["last_seq"], 1);
    assert_eq!(runs[0]["last_type"], "agent_started");
    assert_eq!(
        (runs[1]["run_id"].as_str(), runs[1]["last_seq"].as_u64()),
        (Some("r-2"), Some(2))
    );
    // A connection on thread t2 sees r-2 (no thread) only.
    let t2 = connect_path(n0.addr, "ru-u1", "/ws?thread_id=t2");
    let listed: Vec<&str> = t2.connected["active_runs"]
        .as_array()
        .expect("runs")
        .iter()
        .filter_map(|r| r["run_id"].as_str())
        .collect();
    assert_eq!(listed, ["r-2"]);
    // A third run is refused wherever it is published.
    let r = publish(
        n0.addr,
        &json!([pub_event("agent_started", "ru-u1", None, "r-3", json!({}))]),
    );
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"], "too_many_runs");
    // An ended run leaves the list, and its events are refused on every node.
    publish_ok(
        n0.addr,
        &json!([pub_event(
            "agent_completed",
            "ru-u1",
            Some("t1"),
            "r-1",
            json!({})
        )]),
    );
    let r = publish(
        n1.addr,
        &json!([pub_event(
            "agent_thinking",
            "ru-u1",
            Some("t1"),
            "r-1",
            json!({})
        )]),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let again = n0.connect("ru-u1");
    let listed: Vec<&str> = again.connected["active_runs"]
        .as_array()
        .expect("runs")
        .iter()
        .filter_map(|r| r["run_id"].as_str())
        .collect();
    assert_eq!(listed, ["r-2"]);
}

#[test]
fn a_silent_run_gets_exactly_one_run_timeout_even_after_the_node_that_saw_it_stopped() {
    let redis = RedisServer::start();
    let tweak = |c: &mut agentwire::Config| c.run_idle_timeout_ms = 300;
    let mut n0 = node_with(&redis, "n0", tweak);
    let n1 = node_with(&redis, "n1", tweak);
    let n2 = node_with(&redis, "n2", tweak);
    let mut a = n1.connect("wd-u1");
    let mut b = n2.connect("wd-u1");
    publish_ok(
        n0.addr,
        &json!([pub_event("agent_started", "wd-u1", None, "r-1", json!({}))]),
    );
    let (done, _) = n0.shutdown_and_join(WAIT);
    done.expect("n0 stops");
    for c in [&mut a, &mut b] {
        let got = c.recv_events(2);
        assert_contiguous(&got, 1);
        assert_eq!(got[1]["type"], "agent_error", "{}", got[1]);
        assert_eq!(got[1]["data"]["reason"], "run_timeout");
        assert_eq!(got[1]["run_id"], "r-1");
    }
    // Both nodes' watchdogs run every second: two passes each, no second run_timeout.
    let timed_out = |n: &TestGateway| n.stats()["runs"]["timed_out"].as_u64().unwrap_or(0);
    match a.next_frame(Duration::from_millis(2500)) {
        Frame::Timeout => {}
        other => panic!("expected nothing more, got {other:?}"),
    }
    assert_eq!(timed_out(&n1) + timed_out(&n2), 1);
    let r = publish(
        n1.addr,
        &json!([pub_event("agent_thinking", "wd-u1", None, "r-1", json!({}))]),
    );
    assert_eq!(r.status, 400, "the timed-out run has ended: {}", r.text());
}

/// The inbound stream's entries read by consumer group `workers` (flat fields).
fn read_inbound(con: &mut redis::Connection) -> Vec<HashMap<String, String>> {
    let reply: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("w1")
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg("agentwire:inbound")
        .arg(">")
        .query(con)
        .expect("XREADGROUP");
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        other => panic!("expected a string, got {other:?}"),
    };
    let mut out = Vec::new();
    let redis::Value::Array(streams) = reply else {
        return out;
    };
    for stream in streams {
        let redis::Value::Array(parts) = stream else {
            continue;
        };
        let Some(redis::Value::Array(entries)) = parts.get(1) else {
            continue;
        };
        for entry in entries {
            let redis::Value::Array(e) = entry else {
                continue;
            };
            let Some(redis::Value::Array(fields)) = e.get(1) else {
                continue;
            };
            out.push(
                fields
                    .chunks(2)
                    .map(|kv| (text(&kv[0]), text(&kv[1])))
                    .collect(),
            );
        }
    }
    out
}

#[test]
fn user_messages_and_cancels_reach_workers_anywhere_through_the_inbound_stream() {
    let redis = RedisServer::start();
    let n0 = node(&redis, "n0"); // no in-process worker
    let n1 = node(&redis, "n1");
    let mut c = n0.connect("in-u1");
    // Without a consumer group (and no in-process worker): no_agent.
    c.send_json(&json!({"type": "user_message", "text": "hi", "ref": "m0"}));
    let e = c.expect_type("error");
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("no_agent"), Some("m0"))
    );
    workers_read_the_stream(&redis);
    let mut con = redis_con(&redis);
    let mut ack = Value::Null;
    wait_until("a user_message acked once workers read the stream", || {
        c.send_json(
            &json!({"type": "user_message", "thread_id": "t1", "text": "hello", "ref": "m1"}),
        );
        let v = c.recv_json();
        if v["type"] == "ack" {
            ack = v;
            return true;
        }
        assert_eq!(v["code"], "no_agent", "{v}");
        std::thread::sleep(Duration::from_millis(100));
        false
    });
    let run_id = ack["run_id"].as_str().expect("run_id").to_owned();
    assert_eq!(ack["ref"], "m1");
    let entries = read_inbound(&mut con);
    let msg = entries
        .iter()
        .find(|e| e["type"] == "user_message" && e["run_id"] == run_id)
        .unwrap_or_else(|| panic!("no stream entry for {run_id}: {entries:?}"));
    assert_eq!(msg["user_id"], "in-u1");
    assert_eq!(msg["thread_id"], "t1");
    assert_eq!(msg["text"], "hello");
    assert_eq!(msg["ref"], "m1");
    assert_eq!(
        msg["connection_id"],
        c.connected["connection_id"].as_str().unwrap()
    );
    assert_eq!(msg["node_id"], "n0");
    assert!(msg["ts"].parse::<u64>().is_ok(), "{msg:?}");
    // The worker answers through any node; the client sees the run.
    publish_ok(
        n1.addr,
        &json!([pub_event(
            "agent_started",
            "in-u1",
            Some("t1"),
            &run_id,
            json!({})
        )]),
    );
    let ev = c.recv_events(1);
    assert_eq!(ev[0]["run_id"], run_id.as_str());
    // A cancel of it: cancel_requested, and a cancel entry for the workers.
    c.send_json(&json!({"type": "cancel", "run_id": run_id}));
    let cr = c.expect_type("cancel_requested");
    assert_eq!(cr["run_id"], run_id.as_str());
    // Appended without waiting (the answer does not depend on it): read until it is.
    let mut entries = Vec::new();
    wait_until("the cancel in the inbound stream", || {
        entries.extend(read_inbound(&mut con));
        entries.iter().any(|e| e["type"] == "cancel")
    });
    let cancel = entries
        .iter()
        .find(|e| e["type"] == "cancel")
        .expect("cancel entry");
    assert_eq!(
        (cancel["run_id"].as_str(), cancel["user_id"].as_str()),
        (run_id.as_str(), "in-u1")
    );
    assert_eq!(
        (cancel["thread_id"].as_str(), cancel["ref"].as_str()),
        ("", "")
    );
}

#[test]
fn a_replay_larger_than_max_pending_bytes_streams_as_the_socket_drains() {
    let redis = RedisServer::start();
    let n0 = node(&redis, "n0");
    let mut cfg = redis_config(&redis, "n1");
    cfg.max_pending_bytes = 65_536;
    let n1 = TestGateway::start(cfg, Agent::None);
    let first = n0.connect("big-u1");
    let epoch = epoch_of(&first);
    drop(first);
    let pad = "x".repeat(4000);
    for b in 0..10u64 {
        let batch: Vec<Value> = (0..10)
            .map(|j| {
                pub_event(
                    "text_delta",
                    "big-u1",
                    None,
                    "r-1",
                    json!({ "i": b * 10 + j, "pad": pad }),
                )
            })
            .collect();
        publish_ok(n0.addr, &json!(batch));
    }
    // 100 events of ~4 KB: six times max_pending_bytes of the resuming node.
    let mut back = connect_path(n1.addr, "big-u1", &format!("/ws?last_seq=0&epoch={epoch}"));
    assert_eq!(back.connected["resumed"], true);
    publish_one(n0.addr, "big-u1", "r-1", 100); // live, during the replay
    let got = back.recv_events(101);
    assert_contiguous(&got, 1);
    assert_eq!(ids(&got, "big-u1"), (0..=100).collect::<Vec<_>>());
    back.ping_pong();
}

#[test]
fn a_cancel_on_one_node_reaches_the_in_process_run_handle_on_another() {
    let redis = RedisServer::start();
    let n0 = node(&redis, "n0");
    let n1 = node(&redis, "n1");
    let mut c = n1.connect("cn-u1");
    let mut run = n0
        .emitter
        .run("cn-u1", None, "r-cancel", "worker_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    assert_eq!(c.recv_events(1)[0]["run_id"], "r-cancel");
    assert!(!run.is_cancelled());
    c.send_json(&json!({"type": "cancel", "run_id": "r-cancel"}));
    assert_eq!(c.expect_type("cancel_requested")["run_id"], "r-cancel");
    // The node that publishes the run learns it with the answer to the run's next
    // event: the handle sees it after its next emit.
    let mut n = 0;
    wait_until("the handle on n0 sees the cancel", || {
        n += 1;
        run.emit("text_delta", &json!({ "n": n })).expect("emit");
        run.is_cancelled()
    });
    run.agent_completed(&json!({"cancelled": true}))
        .expect("emit");
}

#[test]
fn max_connections_per_user_counts_every_node_and_evicts_the_oldest_wherever_it_is() {
    let redis = RedisServer::start();
    let n0 = node(&redis, "n0");
    let n1 = node(&redis, "n1");
    // max_connections_per_user is 3, policy evict_oldest (the defaults).
    let mut oldest = n0.connect("lim-u1");
    let mut second = n0.connect("lim-u1");
    let mut third = n1.connect("lim-u1");
    let mut fourth = n1.connect("lim-u1");
    // The fourth, on n1, evicted the oldest, on n0.
    oldest.expect_close(4002);
    for c in [&mut second, &mut third, &mut fourth] {
        c.ping_pong();
    }
    publish_one(n1.addr, "lim-u1", "r-1", 0);
    for c in [&mut second, &mut third, &mut fourth] {
        assert_eq!(ids(&c.recv_events(1), "lim-u1"), [0]);
    }
    // A connection that closed stops counting: a new one evicts nobody.
    third.close();
    let mut con = redis_con(&redis);
    wait_until("the closed connection no longer counts", || {
        let n: u64 = redis::cmd("ZCARD")
            .arg("agentwire:{u:lim-u1}:conns")
            .query(&mut con)
            .expect("ZCARD");
        n == 2
    });
    let mut fifth = n0.connect("lim-u1");
    for c in [&mut second, &mut fourth, &mut fifth] {
        c.ping_pong();
    }
}

#[test]
fn reject_refuses_a_connection_past_the_limit_counted_on_every_node() {
    let redis = RedisServer::start();
    let tweak = |c: &mut agentwire::Config| {
        c.max_connections_per_user = 2;
        c.per_user_policy = agentwire::PerUserPolicy::Reject;
    };
    let n0 = node_with(&redis, "n0", tweak);
    let n1 = node_with(&redis, "n1", tweak);
    let mut a = n0.connect("rj-u1");
    let mut b = n1.connect("rj-u1");
    // One connection on n0: under its own limit, over the cluster's.
    let r = upgrade(n0.addr, "/ws", &[bearer(&token("rj-u1"))]);
    assert_refusal(&r, 429, "too_many_connections");
    a.ping_pong();
    b.ping_pong();
    // The refused one did not count: after a close there is room again.
    b.close();
    let mut con = redis_con(&redis);
    wait_until("the closed connection no longer counts", || {
        let n: u64 = redis::cmd("ZCARD")
            .arg("agentwire:{u:rj-u1}:conns")
            .query(&mut con)
            .expect("ZCARD");
        n == 1
    });
    let mut c = n0.connect("rj-u1");
    c.ping_pong();
    a.ping_pong();
}

#[test]
fn live_connections_keep_counting_and_a_dead_nodes_stop_within_its_lease() {
    let redis = RedisServer::start();
    let limits = [
        ("AGENTWIRE_MAX_CONNECTIONS_PER_USER", "2"),
        ("AGENTWIRE_PER_USER_POLICY", "reject"),
    ];
    let at = || SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut a = BinaryNode::start_with(&redis, "ls-a", at(), &limits);
    let b = BinaryNode::start_with(&redis, "ls-b", at(), &limits);
    let mut on_a = connect(a.addr, "ls-u1");
    let mut on_b = connect(b.addr, "ls-u1");
    // Past one lease (15 s): the nodes renewed them (every 5 s), so they still count.
    std::thread::sleep(Duration::from_secs(17));
    on_a.ping_pong();
    on_b.ping_pong();
    let r = upgrade(b.addr, "/ws", &[bearer(&token("ls-u1"))]);
    assert_refusal(&r, 429, "too_many_connections");
    // Node a dies without a word: its connection stops counting when its lease ends.
    a.kill9();
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let r = upgrade(b.addr, "/ws", &[bearer(&token("ls-u1"))]);
        if r.status == 101 {
            break;
        }
        assert_refusal(&r, 429, "too_many_connections");
        assert!(
            Instant::now() < deadline,
            "a dead node's connection still counts"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    on_b.ping_pong();
}

#[test]
fn the_webhook_works_across_nodes_its_cancel_reaching_the_node_that_publishes() {
    let redis = RedisServer::start();
    let server = WebhookServer::start(Behaviour::Answer(200));
    let n0 = TestGateway::start(webhook_config(&redis, "n0", &server), Agent::None);
    let n1 = node(&redis, "n1");
    let mut c = n0.connect("wh-u1");
    c.send_json(&json!({"type": "user_message", "text": "hi", "ref": "m1"}));
    let msg = server.next_request();
    assert_eq!(msg.body["type"], "user_message");
    assert_eq!(
        msg.body["node_id"], "n0",
        "the node of the client's connected frame"
    );
    let run = msg.body["run_id"].as_str().expect("run_id").to_owned();
    assert_eq!(c.expect_type("ack")["run_id"], run.as_str());
    // The worker answers through the other node.
    publish_ok(
        n1.addr,
        &json!([pub_event("agent_started", "wh-u1", None, &run, json!({}))]),
    );
    assert_eq!(c.recv_events(1)[0]["run_id"], run.as_str());
    // A cancel on n0 goes to the webhook (a run n0 never saw begin: it began through
    // n1), and after its 2xx the node publishing the run's next event learns it.
    c.send_json(&json!({"type": "cancel", "run_id": run}));
    let cancel = server.next_request();
    assert_eq!(
        (cancel.body["type"].as_str(), cancel.body["run_id"].as_str()),
        (Some("cancel"), Some(run.as_str()))
    );
    assert_eq!(c.expect_type("cancel_requested")["run_id"], run.as_str());
    let mut i = 0;
    wait_until("n1's publish answer lists the run as cancelled", || {
        i += 1;
        let r = publish(
            n1.addr,
            &json!([pub_event(
                "text_delta",
                "wh-u1",
                None,
                &run,
                json!({ "i": i })
            )]),
        );
        assert_eq!(r.status, 202, "{}", r.text());
        r.json()["cancelled"] == json!([run])
    });
}

/// `POST /api/users/{user}/disconnect` through `addr` with the publish key.
fn disconnect(addr: SocketAddr, user: &str, body: Option<&str>) -> HttpResponse {
    let body = body.unwrap_or("");
    let req = format!(
        "POST /api/users/{user}/disconnect HTTP/1.1\r\nHost: {addr}\r\nAuthorization: \
         Bearer {PUBLISH_KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    http_request(addr, req.as_bytes())
}

/// Require `addr` to refuse `user`'s upgrade with 401 "user revoked".
fn assert_revoked(addr: SocketAddr, user: &str) {
    let refused = upgrade(addr, "/ws", &[bearer(&token(user))]);
    assert_refusal(&refused, 401, "invalid_token");
    assert_eq!(refused.json()["message"], "user revoked");
}

#[test]
fn revoking_through_one_node_closes_the_users_connections_on_every_node() {
    let redis = RedisServer::start();
    let n0 = node(&redis, "n0");
    let n1 = node(&redis, "n1");
    let mut u0 = n0.connect("rv-u");
    let mut u1 = n1.connect("rv-u");
    let mut other0 = n0.connect("rv-other");
    let mut other1 = n1.connect("rv-other");
    // Without `until`: closed everywhere; `closed` counts the node that got it.
    let r = disconnect(n1.addr, "rv-u", None);
    assert_eq!((r.status, r.json()), (200, json!({"closed": 1})));
    u0.expect_close(4004);
    u1.expect_close(4004);
    // ... and the user may come back at once, on either node.
    let mut again0 = n0.connect("rv-u");
    let mut again1 = n1.connect("rv-u");
    again0.ping_pong();
    // With `until`: closed everywhere, and refused on every node, also one started
    // afterwards (it reads the revocation from Redis).
    let until = now_s() + 300;
    let r = disconnect(n1.addr, "rv-u", Some(&format!("{{\"until\": {until}}}")));
    assert_eq!((r.status, r.json()), (200, json!({"closed": 1})));
    again0.expect_close(4004);
    again1.expect_close(4004);
    assert_revoked(n1.addr, "rv-u");
    // n0 learnt it from the channel: its close above came after it stored the until.
    assert_revoked(n0.addr, "rv-u");
    let n2 = node(&redis, "n2");
    assert_revoked(n2.addr, "rv-u");
    // Another user is untouched, old connections and new ones, on every node.
    other0.ping_pong();
    other1.ping_pong();
    let mut other2 = n2.connect("rv-other");
    other2.ping_pong();
    publish_one(n2.addr, "rv-other", "r-1", 0);
    for c in [&mut other0, &mut other1, &mut other2] {
        assert_eq!(ids(&c.recv_events(1), "rv-other"), [0]);
    }
    // Redis holds it, expiring at `until`.
    let mut con = redis_con(&redis);
    let score: Option<u64> = redis::cmd("ZSCORE")
        .arg("agentwire:revoked")
        .arg("rv-u")
        .query(&mut con)
        .expect("ZSCORE");
    assert_eq!(score, Some(until));
}

/// The run metrics of one node's `/metrics`: started, in flight, ended by outcome.
fn run_metrics(addr: SocketAddr) -> (f64, f64, HashMap<&'static str, f64>) {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200);
    let m = prometheus(&r.text());
    let ended = [
        "completed",
        "error",
        "run_timeout",
        "worker_dropped",
        "cancelled",
    ]
    .into_iter()
    .map(|o| {
        let name = format!("agentwire_runs_ended_total{{outcome=\"{o}\"}}");
        (o, metric(&m, &name))
    })
    .collect();
    (
        metric(&m, "agentwire_runs_started_total"),
        metric(&m, "agentwire_runs_in_flight"),
        ended,
    )
}

#[test]
fn each_run_counts_once_on_the_node_whose_publish_began_or_ended_it() {
    let redis = RedisServer::start();
    let n0 = node(&redis, "n0");
    let n1 = node(&redis, "n1");
    // Connections on both nodes: every node sees every event, but counts only its own.
    let mut c0 = n0.connect("rm-u");
    let mut c1 = n1.connect("rm-u");
    let ev = |kind: &str, run: &str, data: Value| json!([pub_event(kind, "rm-u", None, run, data)]);
    // r-a: begun through n0, ended (completed) through n1.
    publish_ok(n0.addr, &ev("agent_started", "r-a", json!({})));
    publish_ok(n1.addr, &ev("text_delta", "r-a", json!({"i": 1})));
    publish_ok(n1.addr, &ev("agent_completed", "r-a", json!({})));
    // r-b: begun and ended (error) through n1.
    publish_ok(n1.addr, &ev("agent_started", "r-b", json!({})));
    publish_ok(
        n1.addr,
        &ev("agent_error", "r-b", json!({"message": "out of tokens"})),
    );
    // r-c: begun through n1, still in flight.
    publish_ok(n1.addr, &ev("agent_started", "r-c", json!({})));
    c0.recv_events(6);
    c1.recv_events(6);
    let (s0, f0, e0) = run_metrics(n0.addr);
    let (s1, f1, e1) = run_metrics(n1.addr);
    assert_eq!((s0, s1), (1.0, 2.0), "started per node");
    assert_eq!(e0["completed"] + e1["completed"], 1.0);
    assert_eq!((e0["completed"], e1["completed"]), (0.0, 1.0));
    assert_eq!(e0["error"] + e1["error"], 1.0);
    for o in ["run_timeout", "worker_dropped", "cancelled"] {
        assert_eq!(e0[o] + e1[o], 0.0, "{o}");
    }
    // Cluster-wide: 3 started, 2 ended, 1 in flight (the sum over nodes; one node's
    // own figure may be off, as n0 began a run that n1 ended).
    assert_eq!(s0 + s1, 3.0);
    assert_eq!(f0 + f1, 1.0);
}

/// A request waiting for the engine is answered, not cut off by the connection's
/// handshake / keep-alive deadline: with `handshake_timeout_ms` shorter than
/// `redis_timeout_ms` and Redis paused, a publish gets 503 `engine_unavailable` and an
/// upgrade its 503 refusal (before, the deadline closed both with no answer).
#[test]
fn a_request_waiting_for_redis_outlives_the_handshake_deadline_and_is_answered() {
    let redis = RedisServer::start();
    let mut cfg = redis_config(&redis, "n0");
    cfg.set("handshake_timeout_ms", "150").expect("handshake");
    cfg.set("redis_timeout_ms", "800")
        .expect("redis_timeout_ms");
    let n0 = TestGateway::start(cfg, Agent::None);
    publish_one(n0.addr, "hd-u1", "r-1", 0);

    redis.pause();
    assert_publish_unavailable(n0.addr, "hd-u1", 1);
    let r = upgrade(n0.addr, "/ws", &[bearer(&token("hd-u2"))]);
    assert_refusal(&r, 503, "engine_unavailable");
    redis.resume();
}
