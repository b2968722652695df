//! The AG-UI encoding on the wire (PROTOCOL.md section 11): `encoding=agui` gets AG-UI
//! events, the agentwire JSON connections of the same user are unchanged, a
//! connection joining mid-run starts with the run's state, a resume goes through the
//! same translation and continues exactly, and an unknown encoding is refused.
//! (The frames are checked against AG-UI's own schemas and `verifyEvents` by the
//! Node test `clients/js/test/agui.test.mjs`.)

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::agui::{assert_quiet, recv_until, seq, types};
use crate::support::{
    assert_refusal, bearer, config, connect_path, token, upgrade, Agent, Frame, TestGateway,
};

#[test]
fn an_agui_connection_gets_ag_ui_events_and_json_ones_are_unchanged() {
    let gw = TestGateway::plain();
    let user = "agui-u1";
    let mut json_conn = gw.connect(user);
    let mut agui = connect_path(gw.addr, user, "/ws?encoding=agui");
    // The connected frame is the agentwire one.
    assert_eq!(agui.connected["type"], "connected");
    assert_eq!(agui.connected["epoch"], gw.epoch.as_str());
    assert_eq!(agui.connected["active_runs"], json!([]));

    let mut run = gw
        .emitter
        .run(user, Some("t1"), "r-1", "agui_agent")
        .expect("run");
    run.agent_started(&json!({"message": "hi"})).expect("emit");
    run.agent_thinking(&json!({"step": 1, "thought": "Reading"}))
        .expect("emit");
    run.tool_executing(&json!({"tool": "sql", "args": {"q": 1}, "tool_call_id": "call-1"}))
        .expect("emit");
    run.tool_completed(&json!({"tool": "sql", "result": 42, "tool_call_id": "call-1"}))
        .expect("emit");
    run.emit("text_delta", &json!({"delta": "The answer "}))
        .expect("emit");
    run.emit("text_delta", &json!({"delta": "is 42."}))
        .expect("emit");
    run.emit("usage", &json!({"tokens": 7})).expect("emit");
    run.agent_completed(&json!({"answer": "The answer is 42."}))
        .expect("emit");

    let events = json_conn.recv_events(8);
    assert_eq!(events[0]["type"], "agent_started");
    assert_eq!(events[0]["data"], json!({"message": "hi"}));
    assert_eq!(events[7]["type"], "agent_completed");
    let first = events[0]["seq"].as_u64().expect("seq");

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
        assert_eq!(f["runId"], "r-1");
        assert_eq!(f["metadata"]["epoch"], gw.epoch.as_str());
        assert!(f["timestamp"].is_u64(), "{f}");
        assert!(f.get("seq").is_none(), "seq travels in metadata only: {f}");
    }
    assert_eq!(frames[0]["threadId"], "t1");
    assert_eq!(frames[0]["rawEvent"]["agent_name"], "agui_agent");
    assert_eq!(seq(&frames[0]), first);
    assert_eq!(frames[6]["toolCallId"], "call-1");
    assert_eq!(frames[7]["delta"], r#"{"q":1}"#);
    assert_eq!(frames[9]["toolCallId"], "call-1");
    assert_eq!(frames[9]["content"], "42");
    assert_eq!(frames[12]["delta"], "is 42.");
    assert_eq!(frames[14]["name"], "usage");
    assert_eq!(frames[14]["value"], json!({"tokens": 7}));
    assert_eq!(frames[15]["result"], json!({"answer": "The answer is 42."}));
    assert_eq!(seq(&frames[15]), first + 7);
    assert_quiet(&mut agui);

    // Client messages are unchanged on an AG-UI connection.
    agui.ping_pong();
}

#[test]
fn a_connection_opened_mid_run_gets_the_runs_state_first() {
    let gw = TestGateway::plain();
    let user = "agui-mid";
    let mut json_conn = gw.connect(user);
    let mut run = gw
        .emitter
        .run(user, None, "r-mid", "agui_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    run.emit("text_delta", &json!({"delta": "Hel"}))
        .expect("emit");
    let seen = json_conn.recv_events(2);
    let started = seen[0]["seq"].as_u64().expect("seq");

    let mut agui = connect_path(gw.addr, user, "/ws?encoding=agui");
    assert_eq!(agui.connected["active_runs"][0]["run_id"], "r-mid");
    let opening = [agui.recv_json(), agui.recv_json()];
    assert_eq!(types(&opening), ["RUN_STARTED", "TEXT_MESSAGE_START"]);
    // No thread: the run is its own thread.
    assert_eq!(opening[0]["threadId"], "r-mid");
    assert_eq!(seq(&opening[0]), started);
    assert_eq!(seq(&opening[1]), started + 1);

    run.emit("text_delta", &json!({"delta": "lo"}))
        .expect("emit");
    run.agent_error(&json!({"reason": "cancelled"}))
        .expect("emit");
    let rest = recv_until(&mut agui, "r-mid", "RUN_ERROR");
    assert_eq!(
        types(&rest),
        ["TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END", "RUN_ERROR"]
    );
    assert_eq!(rest[0]["messageId"], opening[1]["messageId"]);
    let err = &rest[2];
    assert_eq!(
        (&err["runId"], &err["threadId"]),
        (&json!("r-mid"), &json!("r-mid"))
    );
    assert_eq!(err["code"], "cancelled");
    assert_eq!(err["message"], "the run was cancelled");
}

#[test]
fn a_resume_goes_through_the_translation_and_continues_exactly() {
    let gw = TestGateway::plain();
    let user = "agui-resume";
    // A connection that stays: the reference stream.
    let mut stays = connect_path(gw.addr, user, "/ws?encoding=agui");
    let mut leaves = connect_path(gw.addr, user, "/ws?encoding=agui");
    let mut run = gw
        .emitter
        .run(user, Some("t"), "r-res", "agui_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    run.tool_executing(&json!({"tool": "a"})).expect("emit");
    run.emit("text_delta", &json!({"delta": "one "}))
        .expect("emit");
    let before = recv_until(&mut leaves, "r-res", "TEXT_MESSAGE_CONTENT");
    let last = seq(before.last().expect("frames"));
    leaves.close();
    gw.wait_open(1);

    run.emit("text_delta", &json!({"delta": "two"}))
        .expect("emit");
    run.tool_completed(&json!({"result": "done"}))
        .expect("emit");
    run.agent_completed(&json!({})).expect("emit");
    let reference = recv_until(&mut stays, "r-res", "RUN_FINISHED");
    let mut back = connect_path(
        gw.addr,
        user,
        &format!("/ws?encoding=agui&last_seq={last}&epoch={}", gw.epoch),
    );
    assert_eq!(back.connected["resumed"], true, "{}", back.connected);
    let after = recv_until(&mut back, "r-res", "RUN_FINISHED");
    // The resumed stream opens with the run's state as of `last` (frames of seq <=
    // last: a client that resumes drops them), then the replay, translated.
    let (opening, replayed): (Vec<Value>, Vec<Value>) =
        after.into_iter().partition(|f| seq(f) <= last);
    assert_eq!(types(&opening), ["RUN_STARTED", "TEXT_MESSAGE_START"]);
    // What the client had plus the replay is exactly what a connection that never
    // left received.
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
}

#[test]
fn an_unknown_encoding_is_refused_with_400() {
    let gw = TestGateway::plain();
    for q in [
        "encoding=xml",
        "encoding=AGUI",
        "encoding=agui&encoding=agentwire",
    ] {
        let r = upgrade(gw.addr, &format!("/ws?{q}"), &[bearer(&token("agui-bad"))]);
        assert_refusal(&r, 400, "bad_request");
    }
    // The explicit default is accepted and sends agentwire JSON.
    let mut c = connect_path(gw.addr, "agui-bad", "/ws?encoding=agentwire");
    let mut run = gw.emitter.run("agui-bad", None, "r", "a").expect("run");
    run.agent_started(&json!({})).expect("emit");
    assert_eq!(c.recv_events(1)[0]["type"], "agent_started");
}

#[test]
fn the_gateways_own_run_ends_are_run_errors_with_their_reason() {
    let mut cfg = config();
    cfg.run_idle_timeout_ms = 200;
    let gw = TestGateway::start(cfg, Agent::None);
    let user = "agui-ends";
    let mut agui = connect_path(gw.addr, user, "/ws?encoding=agui");
    // A silent run: the watchdog ends it (`run_timeout`).
    let mut idle = gw
        .emitter
        .run(user, Some("t-idle"), "r-idle", "a")
        .expect("run");
    idle.agent_started(&json!({})).expect("emit");
    idle.emit("text_delta", &json!({"delta": "…"}))
        .expect("emit");
    let frames = recv_until(&mut agui, "r-idle", "RUN_ERROR");
    assert_eq!(
        types(&frames),
        [
            "RUN_STARTED",
            "TEXT_MESSAGE_START",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_END",
            "RUN_ERROR"
        ]
    );
    let err = frames.last().expect("RUN_ERROR");
    assert_eq!(
        (&err["runId"], &err["threadId"]),
        (&json!("r-idle"), &json!("t-idle"))
    );
    assert_eq!(err["code"], "run_timeout");
    assert_eq!(err["rawEvent"]["data"], json!({"reason": "run_timeout"}));
    drop(idle);
    // A run handle dropped before its run ended (`worker_dropped`).
    let mut dropped = gw.emitter.run(user, None, "r-drop", "a").expect("run");
    dropped.agent_started(&json!({})).expect("emit");
    drop(dropped);
    let frames = recv_until(&mut agui, "r-drop", "RUN_ERROR");
    assert_eq!(types(&frames), ["RUN_STARTED", "RUN_ERROR"]);
    assert_eq!(frames[1]["code"], "worker_dropped");
    assert_eq!(frames[1]["threadId"], "r-drop");
    assert_eq!(
        frames[1]["message"],
        "the worker stopped before the run ended"
    );
}

#[test]
fn a_large_replay_streamed_in_parts_goes_through_one_translation() {
    // A small output bound: the replay is queued in many parts as the socket drains,
    // and the connection's translation state carries across them.
    let mut cfg = config();
    cfg.max_pending_bytes = 8192;
    let gw = TestGateway::start(cfg, Agent::None);
    let user = "agui-big-replay";
    let mut stays = connect_path(gw.addr, user, "/ws?encoding=agui");
    let mut run = gw.emitter.run(user, Some("t"), "r-big", "a").expect("run");
    run.agent_started(&json!({})).expect("emit");
    let mut reference = recv_until(&mut stays, "r-big", "RUN_STARTED");
    let last = seq(&reference[0]);
    for i in 0..300 {
        if i % 50 == 0 {
            run.tool_executing(&json!({"tool": "t", "args": {"i": i}}))
                .expect("emit");
            run.tool_completed(&json!({"result": i})).expect("emit");
        }
        run.emit("text_delta", &json!({"delta": format!("{i} ")}))
            .expect("emit");
        // Keep the reference connection drained so it is never the slow one.
        if i % 20 == 0 {
            while let Frame::Json(f) = stays.next_frame(Duration::from_millis(1)) {
                reference.push(f);
            }
        }
    }
    run.agent_completed(&json!({})).expect("emit");
    reference.extend(recv_until(&mut stays, "r-big", "RUN_FINISHED"));

    let mut back = connect_path(
        gw.addr,
        user,
        &format!("/ws?encoding=agui&last_seq={last}&epoch={}", gw.epoch),
    );
    assert_eq!(back.connected["resumed"], true, "{}", back.connected);
    let after = recv_until(&mut back, "r-big", "RUN_FINISHED");
    let replayed: Vec<Value> = after.into_iter().filter(|f| seq(f) > last).collect();
    assert_eq!(replayed.len(), reference.len() - 1);
    assert_eq!(replayed, reference[1..]);
    let stats = gw.stats();
    assert!(
        stats["events"]["replayed"].as_u64() >= Some(300),
        "{}",
        stats["events"]
    );
}
