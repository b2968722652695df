//! Runs cluster-wide under the Redis engine (PROTOCOL.md section 9, "Runs are
//! cluster-wide"; docs/CLUSTER.md): `max_active_runs` over all users and nodes with the
//! run handle's refused flag, a run acked by a `user_message` and never begun getting
//! exactly one `run_timeout` after the node that acked it was killed, a `cancel` before
//! the run's first event reaching the run handle on the node that begins it, and the
//! time-to-first-event and tool-duration histograms counted once in the cluster. Real
//! nodes (in-process and the real binary) on a real `redis-server`.

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;

/// Send `user_message`s on `c` until one is acked (the node learns of the consumer
/// group within a second): the ack's run id.
fn ask(c: &mut Client, thread: Option<&str>) -> String {
    let mut run_id = String::new();
    wait_until("a user_message acked (workers read the stream)", || {
        c.send_json(
            &json!({"type": "user_message", "thread_id": thread, "text": "hi", "ref": "m"}),
        );
        let v = c.recv_json();
        if v["type"] == "ack" {
            run_id = v["run_id"].as_str().expect("run_id").to_owned();
            return true;
        }
        assert_eq!(v["code"], "no_agent", "{v}");
        std::thread::sleep(Duration::from_millis(100));
        false
    });
    run_id
}

fn started(user: &str, run: &str) -> Value {
    json!([pub_event("agent_started", user, None, run, json!({}))])
}

#[test]
fn max_active_runs_holds_over_all_nodes_and_a_refused_run_handle_is_told() {
    let redis = RedisServer::start();
    let tweak = |c: &mut agentwire::Config| c.max_active_runs = 2;
    let n0 = node_with(&redis, "n0", tweak);
    let n1 = node_with(&redis, "n1", tweak);
    publish_ok(n0.addr, &started("ma-u1", "r-1"));
    publish_ok(n1.addr, &started("ma-u2", "r-1"));
    // A third run, of a third user, through either node: 429 too_many_runs as under
    // the memory engine, nothing stored.
    for addr in [n0.addr, n1.addr] {
        let r = publish(addr, &started("ma-u3", "r-1"));
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.json()["error"], "too_many_runs");
        assert_eq!(r.json()["index"], 0);
    }
    let c = n0.connect("ma-u3");
    assert_eq!(
        c.connected["last_seq"], 0,
        "nothing stored: {}",
        c.connected
    );
    // A run an in-process worker begins past it: its handle is refused.
    let mut run = n1.emitter.run("ma-u4", None, "r-e", "worker").expect("run");
    run.agent_started(&json!({})).expect("queued");
    wait_until("the run handle is refused", || run.is_refused());
    assert!(run.emit("text_delta", &json!({"t": "x"})).is_err());
    // A run that ends (through the other node) frees a place for anyone.
    publish_ok(
        n1.addr,
        &json!([pub_event(
            "agent_completed",
            "ma-u1",
            None,
            "r-1",
            json!({})
        )]),
    );
    publish_ok(n0.addr, &started("ma-u3", "r-1"));
    let r = publish(n1.addr, &started("ma-u5", "r-1"));
    assert_eq!(r.status, 429, "full again: {}", r.text());
}

#[test]
fn a_run_acked_and_never_begun_gets_one_run_timeout_after_its_node_was_killed() {
    let redis = RedisServer::start();
    workers_read_the_stream(&redis);
    let idle = [("AGENTWIRE_RUN_IDLE_TIMEOUT_MS", "500")];
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut acker = BinaryNode::start_with(&redis, "bin-a", addr, &idle);
    let tweak = |c: &mut agentwire::Config| c.run_idle_timeout_ms = 500;
    let n1 = node_with(&redis, "n1", tweak);
    let n2 = node_with(&redis, "n2", tweak);
    let mut watcher = n1.connect("pa-u1");
    let mut c = connect(acker.addr, "pa-u1");
    let run_id = ask(&mut c, Some("t1"));
    acker.kill9();
    let got = watcher.recv_events(1);
    assert_eq!(got[0]["type"], "agent_error", "{}", got[0]);
    assert_eq!(got[0]["data"]["reason"], "run_timeout");
    assert_eq!(got[0]["run_id"], run_id.as_str());
    assert_eq!(got[0]["thread_id"], "t1");
    assert_eq!(
        got[0]["agent_name"], "",
        "as the memory engine's: no agent began it"
    );
    // Both nodes' watchdogs pass every second: no second run_timeout.
    match watcher.next_frame(Duration::from_millis(2500)) {
        Frame::Timeout => {}
        other => panic!("expected nothing more, got {other:?}"),
    }
    let timed_out = |n: &TestGateway| n.stats()["runs"]["timed_out"].as_u64().unwrap_or(0);
    assert_eq!(timed_out(&n1) + timed_out(&n2), 1);
    // It ended: a late first event is refused on every node.
    let r = publish(
        n2.addr,
        &json!([pub_event(
            "agent_started",
            "pa-u1",
            Some("t1"),
            &run_id,
            json!({})
        )]),
    );
    assert_eq!(r.status, 400, "{}", r.text());
}

#[test]
fn a_cancel_before_the_first_event_reaches_the_run_handle_on_the_node_that_begins_it() {
    let redis = RedisServer::start();
    workers_read_the_stream(&redis);
    let n0 = node(&redis, "n0");
    let n1 = node(&redis, "n1");
    let n2 = node(&redis, "n2");
    let mut asker = n0.connect("pc-u1");
    let run_id = ask(&mut asker, None);
    // Cancelled through a node that never saw the run: answered as under the memory
    // engine (the run is known from its ack on) and marked in Redis.
    let mut other = n1.connect("pc-u1");
    other.send_json(&json!({"type": "cancel", "run_id": run_id}));
    assert_eq!(
        other.expect_type("cancel_requested")["run_id"],
        run_id.as_str()
    );
    let mut con = redis_con(&redis);
    wait_until("the cancel marked in Redis", || {
        redis::cmd("SISMEMBER")
            .arg("agentwire:{u:pc-u1}:cancel")
            .arg(&run_id)
            .query::<bool>(&mut con)
            .expect("SISMEMBER")
    });
    // A worker on a third node begins the run: its handle sees the cancel with the
    // answer to its first event.
    let mut run = n2
        .emitter
        .run("pc-u1", None, &run_id, "worker")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    wait_until("the handle on n2 sees the cancel", || run.is_cancelled());
    run.agent_error(&json!({"message": "stopped"}))
        .expect("emit");
    let got = asker.recv_events(2);
    assert_eq!(got[1]["type"], "agent_error");
    // Ended (through n2): a cancel of it is not_found on every node, the node that
    // acked it included, as under the memory engine; so is a run nobody knows.
    other.recv_events(2);
    for c in [&mut asker, &mut other] {
        c.send_json(&json!({"type": "cancel", "run_id": run_id}));
        let e = c.expect_type("error");
        assert_eq!(e["code"], "not_found", "{e}");
        c.send_json(&json!({"type": "cancel", "run_id": "r-nobody"}));
        assert_eq!(c.expect_type("error")["code"], "not_found");
    }
    // Ended as cancelled, counted once (on n2, whose publish ended it).
    let cancelled = |addr| {
        metric(
            &prometheus(&get(addr, "/metrics").text()),
            "agentwire_runs_ended_total{outcome=\"cancelled\"}",
        )
    };
    assert_eq!(
        (cancelled(n0.addr), cancelled(n1.addr), cancelled(n2.addr)),
        (0.0, 0.0, 1.0)
    );
}

#[test]
fn time_to_first_event_and_tool_durations_count_once_on_the_node_that_saw_them_end() {
    let redis = RedisServer::start();
    workers_read_the_stream(&redis);
    let n0 = node(&redis, "n0");
    let n1 = node(&redis, "n1");
    let mut c = n0.connect("tm-u1");
    let run_id = ask(&mut c, None);
    let ev = |kind: &str, data: Value| json!([pub_event(kind, "tm-u1", None, &run_id, data)]);
    // The worker answers through the other node.
    publish_ok(n1.addr, &ev("agent_started", json!({})));
    publish_ok(
        n0.addr,
        &ev(
            "tool_executing",
            json!({"tool_call_id": "c1", "tool": "search"}),
        ),
    );
    publish_ok(
        n1.addr,
        &ev("tool_completed", json!({"tool_call_id": "c1"})),
    );
    publish_ok(n1.addr, &ev("agent_completed", json!({})));
    c.recv_events(4);
    let counts = |addr| {
        let m = prometheus(&get(addr, "/metrics").text());
        (
            metric(&m, "agentwire_run_first_event_seconds_count"),
            metric(&m, "agentwire_tool_duration_seconds_count"),
        )
    };
    assert_eq!(
        counts(n0.addr),
        (0.0, 0.0),
        "n0 acked the message and began a tool"
    );
    assert_eq!(
        counts(n1.addr),
        (1.0, 1.0),
        "n1 began the run and finished the tool"
    );
    // A run a worker starts by itself (no user_message): nothing measured.
    publish_ok(
        n1.addr,
        &json!([pub_event(
            "agent_started",
            "tm-u1",
            None,
            "r-own",
            json!({})
        )]),
    );
    c.recv_events(1);
    assert_eq!(counts(n1.addr), (1.0, 1.0));
}

#[test]
fn a_run_acked_through_the_webhook_and_never_begun_gets_one_run_timeout() {
    let redis = RedisServer::start();
    let server = WebhookServer::start(Behaviour::Answer(200));
    let mut cfg = webhook_config(&redis, "n0", &server);
    cfg.run_idle_timeout_ms = 500;
    let n0 = TestGateway::start(cfg, Agent::None);
    let n1 = node_with(&redis, "n1", |c| c.run_idle_timeout_ms = 500);
    let mut watcher = n1.connect("wp-u1");
    let mut c = n0.connect("wp-u1");
    c.send_json(&json!({"type": "user_message", "thread_id": "t9", "text": "hi", "ref": "m1"}));
    let run = server.next_request().body["run_id"]
        .as_str()
        .expect("run_id")
        .to_owned();
    assert_eq!(c.expect_type("ack")["run_id"], run.as_str());
    let got = watcher.recv_events(1);
    assert_eq!(
        (got[0]["type"].as_str(), got[0]["data"]["reason"].as_str()),
        (Some("agent_error"), Some("run_timeout")),
        "{}",
        got[0]
    );
    assert_eq!(got[0]["run_id"], run.as_str());
    assert_eq!(got[0]["thread_id"], "t9");
    match watcher.next_frame(Duration::from_millis(2500)) {
        Frame::Timeout => {}
        other => panic!("expected nothing more, got {other:?}"),
    }
    let timed_out = |n: &TestGateway| n.stats()["runs"]["timed_out"].as_u64().unwrap_or(0);
    assert_eq!(timed_out(&n0) + timed_out(&n1), 1);
}

#[test]
fn a_run_acked_by_a_node_that_drains_stays_open_for_a_worker_on_another_node() {
    let redis = RedisServer::start();
    workers_read_the_stream(&redis);
    let mut n0 = node(&redis, "n0");
    let n1 = node(&redis, "n1");
    let mut watcher = n1.connect("dr-u1");
    let mut c = n0.connect("dr-u1");
    let run_id = ask(&mut c, None);
    let (done, _) = n0.shutdown_and_join(WAIT);
    done.expect("n0 stops");
    // Not ended with `shutdown`: the worker (reading the stream) answers through n1.
    publish_ok(
        n1.addr,
        &json!([pub_event(
            "agent_started",
            "dr-u1",
            None,
            &run_id,
            json!({})
        )]),
    );
    let got = watcher.recv_events(1);
    assert_eq!(
        (got[0]["type"].as_str(), got[0]["run_id"].as_str()),
        (Some("agent_started"), Some(run_id.as_str())),
        "{}",
        got[0]
    );
}
