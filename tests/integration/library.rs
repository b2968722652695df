//! The library API: `Emitter`, `RunHandle` and `GatewayHandle` as an embedding
//! application uses them.

use std::time::{Duration, Instant};

use agentwire::{EmitError, Gateway};
use serde_json::json;

use crate::support::{assert_envelope, config, Agent, TestGateway, WAIT};

#[test]
fn dropped_run_handle_ends_the_run_with_worker_dropped() {
    let gw = TestGateway::plain();
    let user = "lib-drop";
    let mut c = gw.connect(user);
    let mut run = gw
        .emitter
        .run(user, Some("t9"), "r-drop", "lib_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    run.agent_thinking(&json!({"step": 1})).expect("emit");
    drop(run);
    let evs = c.recv_events(3);
    assert_eq!(evs[0]["type"], "agent_started");
    assert_eq!(evs[1]["type"], "agent_thinking");
    let end = &evs[2];
    assert_eq!(end["type"], "agent_error", "{end}");
    assert_eq!(end["data"], json!({"reason": "worker_dropped"}), "{end}");
    assert_envelope(end, user, Some("t9"), "r-drop", "lib_agent");
    // The run has ended for the gateway: no longer active.
    gw.wait_stats("no active run", |s| s["runs"]["active"] == 0);
    let c2 = gw.connect(user);
    assert_eq!(c2.connected["active_runs"], json!([]));
}

#[test]
fn a_handle_dropped_after_completion_sends_nothing_more() {
    let gw = TestGateway::plain();
    let user = "lib-drop-done";
    let mut c = gw.connect(user);
    let mut run = gw
        .emitter
        .run(user, None, "r-done", "lib_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    run.agent_completed(&json!({})).expect("emit");
    drop(run);
    let evs = c.recv_events(2);
    assert_eq!(evs[1]["type"], "agent_completed");
    let mut marker = gw
        .emitter
        .run(user, None, "r-marker", "lib_agent")
        .expect("run");
    marker.agent_started(&json!({})).expect("emit");
    assert_eq!(
        c.recv_json()["run_id"],
        "r-marker",
        "no worker_dropped after a completed run"
    );
    marker.agent_completed(&json!({})).expect("emit");
}

#[test]
fn emits_after_the_end_of_a_run_are_run_ended() {
    let gw = TestGateway::plain();
    let user = "lib-ended";
    let mut c = gw.connect(user);
    let mut run = gw
        .emitter
        .run(user, None, "r-ended", "lib_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    run.agent_completed(&json!({})).expect("emit");
    assert!(run.is_ended());
    assert!(matches!(
        run.agent_thinking(&json!({})),
        Err(EmitError::RunEnded)
    ));
    assert!(matches!(
        run.emit("text_delta", &json!({})),
        Err(EmitError::RunEnded)
    ));
    assert!(matches!(
        run.agent_completed(&json!({})),
        Err(EmitError::RunEnded)
    ));
    assert!(matches!(
        run.agent_error(&json!({})),
        Err(EmitError::RunEnded)
    ));

    let mut run2 = gw
        .emitter
        .run(user, None, "r-ended2", "lib_agent")
        .expect("run");
    run2.agent_started(&json!({})).expect("emit");
    run2.agent_error(&json!({"reason": "boom"})).expect("emit");
    assert!(matches!(
        run2.tool_executing(&json!({})),
        Err(EmitError::RunEnded)
    ));

    let evs = c.recv_events(4);
    let types: Vec<&str> = evs
        .iter()
        .map(|e| e["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        types,
        [
            "agent_started",
            "agent_completed",
            "agent_started",
            "agent_error"
        ]
    );
    c.ping_pong();
}

#[test]
fn invalid_custom_types_are_refused_and_send_nothing() {
    let gw = TestGateway::plain();
    let user = "lib-types";
    let mut c = gw.connect(user);
    let mut run = gw
        .emitter
        .run(user, None, "r-types", "lib_agent")
        .expect("run");
    let too_long = format!("a{}", "b".repeat(64));
    for bad in [
        "",
        "Text_delta",
        "1abc",
        "_x",
        "text-delta",
        "text delta",
        "tëxt",
        too_long.as_str(),
    ] {
        assert!(
            matches!(run.emit(bad, &json!({})), Err(EmitError::Invalid(_))),
            "type {bad:?} must be refused"
        );
    }
    let longest = format!("a{}", "b".repeat(63));
    run.emit("text_delta", &json!({"n": 1}))
        .expect("valid custom type");
    run.emit(&longest, &json!({"n": 2}))
        .expect("64-character type is valid");
    let evs = c.recv_events(2);
    assert_eq!(evs[0]["type"], "text_delta");
    assert_eq!(evs[1]["type"], longest.as_str());
    assert_eq!(
        evs[1]["seq"].as_u64(),
        evs[0]["seq"].as_u64().map(|s| s + 1),
        "refused emits took no seq"
    );
    run.agent_completed(&json!({})).expect("emit");
}

#[test]
fn bad_run_identifiers_are_refused() {
    let gw = TestGateway::plain();
    assert!(gw.emitter.run("", None, "r", "a").is_err(), "empty user");
    assert!(gw.emitter.run("u", None, "", "a").is_err(), "empty run id");
    assert!(
        gw.emitter.run("u", Some(""), "r", "a").is_err(),
        "empty thread id"
    );
    assert!(
        gw.emitter.run("u", None, &"r".repeat(300), "a").is_err(),
        "run id over 256 bytes"
    );
}

/// `GatewayHandle::shutdown`: every client gets close 1001, the reactor thread ends
/// with `Ok` within `shutdown_grace_ms` plus a margin, and the emitter then reports
/// `Closed`.
#[test]
fn handle_shutdown_closes_every_client_with_1001_and_joins() {
    let mut cfg = config();
    cfg.shutdown_grace_ms = 2000;
    let mut gw = TestGateway::start(cfg, Agent::None);
    let mut clients: Vec<_> = (0..4)
        .map(|i| gw.connect(&format!("lib-shut-{}", i % 2)))
        .collect();
    let emitter = gw.emitter.clone();

    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let _ = tx.send(gw.shutdown_and_join(Duration::from_millis(2000) + WAIT));
        });
        for c in clients.iter_mut() {
            c.expect_close(1001);
        }
    });
    let (result, took) = rx.recv_timeout(WAIT).expect("shutdown finished");
    assert!(result.is_ok(), "reactor thread result: {result:?}");
    assert!(
        took < Duration::from_millis(2000) + Duration::from_secs(3),
        "shutdown took {took:?}"
    );

    // The gateway has stopped: emits fail with Closed (bounded retries).
    let deadline = Instant::now() + WAIT;
    loop {
        let mut run = emitter
            .run("lib-shut-0", None, "r-after", "lib_agent")
            .expect("run");
        match run.agent_started(&json!({})) {
            Err(EmitError::Closed) => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "emitter never reported Closed: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    assert!(matches!(emitter.shutdown(), Err(EmitError::Closed)));
}

/// Shutting down with no client at all is immediate.
#[test]
fn shutdown_of_an_idle_gateway_is_prompt() {
    let mut gw = TestGateway::start(config(), Agent::None);
    let (result, took) = gw.shutdown_and_join(WAIT);
    assert!(result.is_ok(), "{result:?}");
    assert!(took < Duration::from_secs(2), "idle shutdown took {took:?}");
}

/// `Gateway::new` refuses a bad configuration instead of starting.
#[test]
fn gateway_new_refuses_bad_configs() {
    let mut no_secret = config();
    no_secret.jwt_secret = None;
    no_secret.jwt_algorithm = agentwire::JwtAlgorithm::Rs256;
    assert!(Gateway::new(no_secret).is_err(), "RS256 without a key file");
    let mut zero = config();
    zero.max_connections = 0;
    assert!(Gateway::new(zero).is_err(), "max_connections 0");
    let mut hb = config();
    hb.heartbeat_timeout_ms = hb.heartbeat_interval_ms;
    assert!(
        Gateway::new(hb).is_err(),
        "heartbeat timeout not above the interval"
    );
}
