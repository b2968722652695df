//! The AG-UI encoding (PROTOCOL.md section 11) under the Redis engine (section 9):
//! an `encoding=agui` connection on one node gets AG-UI events for what is published
//! through any node, a connection opened mid-run on another node starts with the
//! run's state (rebuilt from the user's kept events in Redis), and a resume on another
//! node continues exactly what a connection that never left received. The same
//! checks as `agui.rs` (memory engine), with a real `redis-server` and several nodes.

use serde_json::{json, Value};

use crate::support::agui::{assert_quiet, recv_until, seq, types};
use crate::support::*;

/// Publish `(type, data)` events of one run of `user` through `addr` (202 required).
fn publish_run(
    addr: std::net::SocketAddr,
    user: &str,
    thread: Option<&str>,
    run: &str,
    events: &[(&str, Value)],
) {
    let batch: Vec<Value> = events
        .iter()
        .map(|(kind, data)| pub_event(kind, user, thread, run, data.clone()))
        .collect();
    publish_ok(addr, &Value::Array(batch));
}

#[test]
fn an_agui_connection_on_a_redis_node_gets_ag_ui_events_published_through_another() {
    let redis = RedisServer::start();
    let n0 = node(&redis, "n0");
    let n1 = node(&redis, "n1");
    let user = "cag-u1";
    let mut json_conn = n0.connect(user);
    let mut agui = connect_path(n0.addr, user, "/ws?encoding=agui");
    assert_eq!(agui.connected["type"], "connected");
    assert_eq!(agui.connected["node_id"], "n0");
    let epoch = epoch_of(&agui);
    publish_run(
        n1.addr,
        user,
        Some("t1"),
        "r-1",
        &[
            ("agent_started", json!({"message": "hi"})),
            ("agent_thinking", json!({"step": 1, "thought": "Reading"})),
            (
                "tool_executing",
                json!({"tool": "sql", "args": {"q": 1}, "tool_call_id": "call-1"}),
            ),
            (
                "tool_completed",
                json!({"tool": "sql", "result": 42, "tool_call_id": "call-1"}),
            ),
            ("text_delta", json!({"delta": "The answer "})),
            ("text_delta", json!({"delta": "is 42."})),
            ("usage", json!({"tokens": 7})),
            ("agent_completed", json!({"answer": "The answer is 42."})),
        ],
    );
    // The agentwire connection of the same user on the same node is unchanged.
    let plain = json_conn.recv_events(8);
    assert_contiguous(&plain, 1);
    assert_eq!(plain[0]["type"], "agent_started");

    let frames = recv_until(&mut agui, "r-1", "RUN_FINISHED");
    assert_eq!(
        types(&frames),
        [
            "RUN_STARTED",
            "REASONING_START",
            "REASONING_MESSAGE_START",
            "REASONING_MESSAGE_CONTENT",
            "REASONING_MESSAGE_END",
            "REASONING_END",
            "TOOL_CALL_START",
            "TOOL_CALL_ARGS",
            "TOOL_CALL_END",
            "TOOL_CALL_RESULT",
            "TEXT_MESSAGE_START",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_END",
            "CUSTOM",
            "RUN_FINISHED",
        ]
    );
    for f in &frames {
        assert_eq!(f["metadata"]["epoch"], epoch.as_str(), "{f}");
        assert_eq!(f["runId"], "r-1", "{f}");
        assert!(f["timestamp"].is_u64(), "{f}");
    }
    assert_eq!(frames[0]["threadId"], "t1");
    assert_eq!(seq(&frames[0]), 1);
    assert_eq!(frames[3]["delta"], "Reading");
    assert_eq!(frames[6]["toolCallId"], "call-1");
    assert_eq!(frames[6]["toolCallName"], "sql");
    assert_eq!(frames[9]["content"], "42");
    assert_eq!(frames[12]["delta"], "is 42.");
    assert_eq!(frames[14]["value"], json!({"tokens": 7}));
    assert_eq!(seq(&frames[15]), 8);
    assert_quiet(&mut agui);
    agui.ping_pong();
}

#[test]
fn an_agui_connection_opened_mid_run_on_another_node_gets_the_runs_state_first() {
    let redis = RedisServer::start();
    let n0 = node(&redis, "n0");
    let n1 = node(&redis, "n1");
    let n2 = node(&redis, "n2");
    let user = "cag-mid";
    let mut watcher = n0.connect(user);
    publish_run(
        n1.addr,
        user,
        None,
        "r-mid",
        &[
            ("agent_started", json!({})),
            ("tool_executing", json!({"tool": "search"})),
            ("text_delta", json!({"delta": "Hel"})),
        ],
    );
    watcher.recv_events(3);

    let mut agui = connect_path(n2.addr, user, "/ws?encoding=agui");
    assert_eq!(agui.connected["node_id"], "n2");
    assert_eq!(agui.connected["active_runs"][0]["run_id"], "r-mid");
    // The run's state as of seq 3, built from the kept events: the run started at
    // seq 1 (no thread: its own thread) and its text message open since seq 3.
    let opening = [agui.recv_json(), agui.recv_json()];
    assert_eq!(types(&opening), ["RUN_STARTED", "TEXT_MESSAGE_START"]);
    assert_eq!(opening[0]["threadId"], "r-mid");
    assert_eq!((seq(&opening[0]), seq(&opening[1])), (1, 3));

    publish_run(
        n0.addr,
        user,
        None,
        "r-mid",
        &[
            ("text_delta", json!({"delta": "lo"})),
            ("tool_completed", json!({"result": "found"})),
            ("agent_error", json!({"reason": "cancelled"})),
        ],
    );
    let rest = recv_until(&mut agui, "r-mid", "RUN_ERROR");
    assert_eq!(
        types(&rest),
        [
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_END",
            "TOOL_CALL_RESULT",
            "RUN_ERROR"
        ]
    );
    assert_eq!(rest[0]["messageId"], opening[1]["messageId"]);
    // Paired by order with the tool call that started before the connection opened.
    assert_eq!(rest[2]["toolCallId"], "r-mid:tool:1");
    assert_eq!(rest[3]["threadId"], "r-mid");
    assert_eq!(rest[3]["code"], "cancelled");
    assert_eq!(rest[3]["message"], "the run was cancelled");
    assert_quiet(&mut agui);
}

#[test]
fn an_agui_resume_on_another_node_continues_exactly() {
    let redis = RedisServer::start();
    let n0 = node(&redis, "n0");
    let n1 = node(&redis, "n1");
    let n2 = node(&redis, "n2");
    let user = "cag-res";
    // A connection that stays: the reference stream.
    let mut stays = connect_path(n2.addr, user, "/ws?encoding=agui");
    let mut leaves = connect_path(n0.addr, user, "/ws?encoding=agui");
    let epoch = epoch_of(&leaves);
    publish_run(
        n2.addr,
        user,
        Some("t"),
        "r-res",
        &[
            ("agent_started", json!({})),
            ("tool_executing", json!({"tool": "a"})),
            ("text_delta", json!({"delta": "one "})),
        ],
    );
    let before = recv_until(&mut leaves, "r-res", "TEXT_MESSAGE_CONTENT");
    let last = seq(before.last().expect("frames"));
    assert_eq!(last, 3);
    leaves.close();
    n0.wait_open(0);

    publish_run(
        n2.addr,
        user,
        Some("t"),
        "r-res",
        &[
            ("text_delta", json!({"delta": "two"})),
            ("tool_completed", json!({"result": "done"})),
            ("agent_completed", json!({})),
        ],
    );
    let reference = recv_until(&mut stays, "r-res", "RUN_FINISHED");
    let mut back = connect_path(
        n1.addr,
        user,
        &format!("/ws?encoding=agui&last_seq={last}&epoch={epoch}"),
    );
    assert_eq!(back.connected["resumed"], true, "{}", back.connected);
    assert_eq!(back.connected["node_id"], "n1");
    let after = recv_until(&mut back, "r-res", "RUN_FINISHED");
    // The resumed stream opens with the run's state as of `last` (frames of seq <=
    // last: a client that resumes drops them), then the replay, translated.
    let (opening, replayed): (Vec<Value>, Vec<Value>) =
        after.into_iter().partition(|f| seq(f) <= last);
    assert_eq!(types(&opening), ["RUN_STARTED", "TEXT_MESSAGE_START"]);
    // What the client had plus the replay is exactly what a connection that never
    // left received (on yet another node).
    let joined: Vec<Value> = before.into_iter().chain(replayed).collect();
    assert_eq!(joined, reference);
    assert_eq!(
        types(&reference)[5..],
        [
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_END",
            "TOOL_CALL_RESULT",
            "RUN_FINISHED"
        ]
    );
    assert_eq!(
        reference[8]["toolCallId"], reference[1]["toolCallId"],
        "paired by order"
    );
    // Live events after the replay go through the same translation.
    publish_run(
        n0.addr,
        user,
        None,
        "r-next",
        &[("agent_started", json!({}))],
    );
    for c in [&mut back, &mut stays] {
        let f = c.recv_json();
        assert_eq!((f["type"].as_str(), seq(&f)), (Some("RUN_STARTED"), 7));
    }
}
