//! Gaps in pub/sub filled from the stream (PROTOCOL.md section 9, "every gap is either
//! filled or reported"; docs/CLUSTER.md, "Order, duplicates and gaps"): two nodes on a
//! real `redis-server`, pub/sub made to lose messages for real (every pub/sub
//! connection killed with `CLIENT KILL TYPE pubsub` and kept out with `maxclients`
//! while events are published, so the nodes' feeds miss them), then every connection
//! (plain, thread-filtered, AG-UI, one resuming meanwhile) must see every seq once in
//! order and no 1013; and a gap past the kept events must still close with 1013.

use serde_json::{json, Value};

use crate::support::agui::{seq, types};
use crate::support::*;

/// Kill every pub/sub connection (the nodes' feeds) and keep new connections out:
/// `maxclients` at the count of the others, in one transaction.
fn cut_feeds(control: &mut redis::Connection) {
    let normal: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("normal")
        .query(control)
        .expect("CLIENT LIST");
    let others = normal.lines().filter(|l| !l.trim().is_empty()).count();
    let _: redis::Value = redis::pipe()
        .atomic()
        .cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(others)
        .cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(control)
        .expect("cut the feeds");
}

/// Let the feeds connect again.
fn let_feeds_back(control: &mut redis::Connection) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(10_000)
        .query(control)
        .expect("CONFIG SET maxclients");
}

fn event(kind: &str, user: &str, thread: &str, run: &str, data: Value) -> Value {
    pub_event(kind, user, Some(thread), run, data)
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect()
}

fn engine_stat(node: &TestGateway, name: &str) -> u64 {
    node.stats()["engine"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("engine.{name} in /ws/stats"))
}

#[test]
fn events_pubsub_lost_are_filled_from_the_stream_for_every_connection_without_1013() {
    let redis = RedisServer::start();
    // Five connections of the user (the default limit is 3, counted on every node).
    let roomy = |c: &mut agentwire::Config| c.set("max_connections_per_user", "10").expect("limit");
    let n0 = node_with(&redis, "n0", roomy);
    let n1 = node_with(&redis, "n1", roomy);
    let user = "gf-u1";
    let mut a = n0.connect(user);
    let mut t1 = connect_path(n0.addr, user, "/ws?thread_id=t1");
    let mut agui = connect_path(n0.addr, user, "/ws?encoding=agui");
    let mut b = n1.connect(user);
    let epoch = epoch_of(&a);
    publish_ok(
        n1.addr,
        &json!([
            event("agent_started", user, "t1", "r-1", json!({})),
            event("text_delta", user, "t1", "r-1", json!({"delta": "The "})),
        ]),
    );
    for c in [&mut a, &mut b, &mut t1] {
        assert_eq!(seqs(&c.recv_events(2)), [1, 2]);
    }

    let mut control = redis_con(&redis);
    cut_feeds(&mut control);
    // Stored (202) while no node listens: pub/sub loses 3..=6 on both nodes.
    let lost = [
        (
            &n1,
            event("text_delta", user, "t1", "r-1", json!({"delta": "answer "})),
        ),
        (
            &n1,
            event(
                "agent_thinking",
                user,
                "t2",
                "r-2",
                json!({"step": 1, "thought": "x"}),
            ),
        ),
        (
            &n0,
            event("text_delta", user, "t1", "r-1", json!({"delta": "is "})),
        ),
        (
            &n1,
            event("text_delta", user, "t1", "r-1", json!({"delta": "42."})),
        ),
    ];
    for (through, ev) in lost {
        publish_ok(through.addr, &json!([ev]));
    }
    let_feeds_back(&mut control);
    publish_ok(
        n1.addr,
        &json!([event(
            "agent_completed",
            user,
            "t1",
            "r-1",
            json!({"answer": "The answer is 42."})
        )]),
    );

    // Every connection: each seq once, in order, the frames themselves.
    for c in [&mut a, &mut b] {
        let got = c.recv_events(5);
        assert_eq!(seqs(&got), [3, 4, 5, 6, 7]);
        assert_eq!(got[2]["data"]["delta"], "is ");
        assert_eq!(got[3]["data"]["delta"], "42.");
    }
    // The thread filter still holds for filled events.
    assert_eq!(seqs(&t1.recv_events(4)), [3, 5, 6, 7]);
    // AG-UI: filled events translated like live ones.
    let mut frames = Vec::new();
    while !frames
        .last()
        .is_some_and(|f: &Value| f["type"] == "RUN_FINISHED" && f["runId"] == "r-1")
    {
        frames.push(agui.recv_json());
        assert!(frames.len() < 50, "{frames:#?}");
    }
    let r1: Vec<Value> = frames.into_iter().filter(|f| f["runId"] == "r-1").collect();
    assert_eq!(
        types(&r1),
        [
            "RUN_STARTED",
            "TEXT_MESSAGE_START",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_END",
            "RUN_FINISHED",
        ],
        "{r1:#?}"
    );
    let deltas: Vec<&str> = r1
        .iter()
        .filter(|f| f["type"] == "TEXT_MESSAGE_CONTENT")
        .map(|f| f["delta"].as_str().expect("delta"))
        .collect();
    assert_eq!(deltas, ["The ", "answer ", "is ", "42."]);
    assert_eq!(seq(&r1[7]), 7);

    // A connection resuming on n0 meanwhile: its replay carries 3..=7, live adds 8,
    // nothing twice (the open may be refused 503 while n0's feed is still away).
    let mut c = None;
    wait_until("a resume on n0 is answered", || {
        c = connect_with(
            n0.addr,
            &format!("/ws?last_seq=2&epoch={epoch}"),
            &[("Authorization", &format!("Bearer {}", token(user)))],
        )
        .ok();
        c.is_some()
    });
    let mut c = c.expect("resumed");
    assert_eq!(c.connected["resumed"], true, "{}", c.connected);
    publish_ok(
        n1.addr,
        &json!([event("agent_started", user, "t1", "r-3", json!({}))]),
    );
    assert_eq!(seqs(&c.recv_events(6)), [3, 4, 5, 6, 7, 8]);
    for c in [&mut a, &mut b, &mut t1] {
        assert_eq!(seqs(&c.recv_events(1)), [8]);
    }

    for n in [&n0, &n1] {
        assert_eq!(engine_stat(n, "sessions_closed_for_gaps"), 0);
        assert!(engine_stat(n, "gap_fills") >= 1, "{}", n.stats()["engine"]);
        assert!(
            engine_stat(n, "gap_fill_events") >= 4,
            "{}",
            n.stats()["engine"]
        );
        assert_eq!(engine_stat(n, "gap_fills_failed"), 0);
    }
    let samples = prometheus(&get(n0.addr, "/metrics").text());
    assert!(metric(&samples, "agentwire_engine_gap_fills_total") >= 1.0);
    assert_eq!(metric(&samples, "agentwire_engine_gap_closes_total"), 0.0);
}

#[test]
fn a_gap_past_the_kept_events_still_closes_1013_and_the_resume_says_resumed_false() {
    let redis = RedisServer::start();
    let small = |c: &mut agentwire::Config| c.set("replay_events", "5").expect("replay_events");
    let n0 = node_with(&redis, "n0", small);
    let n1 = node_with(&redis, "n1", small);
    let user = "gf-u2";
    let mut a = n0.connect(user);
    let epoch = epoch_of(&a);
    publish_ok(
        n1.addr,
        &json!([event(
            "text_delta",
            user,
            "t1",
            "r-1",
            json!({"delta": "0"})
        )]),
    );
    assert_eq!(seqs(&a.recv_events(1)), [1]);

    let mut control = redis_con(&redis);
    cut_feeds(&mut control);
    // 2..=251 lost by pub/sub; MAXLEN ~ 5 trims whole stream nodes (100 entries):
    // 2..=200 are gone from the stream, so the fill cannot be exact.
    for chunk in 0..5 {
        let batch: Vec<Value> = (0..50)
            .map(|i| {
                event(
                    "text_delta",
                    user,
                    "t1",
                    "r-1",
                    json!({"delta": format!("{chunk}/{i}")}),
                )
            })
            .collect();
        publish_ok(n1.addr, &Value::Array(batch));
    }
    let_feeds_back(&mut control);
    a.expect_close(1013);
    assert!(
        engine_stat(&n0, "gap_fills_failed") >= 1,
        "{}",
        n0.stats()["engine"]
    );
    assert!(engine_stat(&n0, "sessions_closed_for_gaps") >= 1);
    assert_eq!(engine_stat(&n0, "gap_fills"), 0);

    let back = connect_with(
        n0.addr,
        &format!("/ws?last_seq=1&epoch={epoch}"),
        &[("Authorization", &format!("Bearer {}", token(user)))],
    )
    .expect("connects");
    assert_eq!(back.connected["resumed"], false, "{}", back.connected);
}
