//! A session's life after the upgrade (PROTOCOL.md sections 4 and 5): heartbeats,
//! token expiry and refresh, protocol violations, handshake and run timeouts.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{
    client_frame, config, connect_with, now_s, raw_connect, token, token_with, Agent, Frame,
    TestGateway, WAIT,
};

fn gateway_with(f: impl FnOnce(&mut agentwire::Config)) -> TestGateway {
    let mut cfg = config();
    f(&mut cfg);
    TestGateway::start(cfg, Agent::None)
}

/// A client that never answers the gateway's Pings is closed with 1001 after
/// `heartbeat_timeout_ms`, having been pinged first.
#[test]
fn silent_client_is_pinged_then_closed_with_1001() {
    let gw = gateway_with(|c| {
        c.heartbeat_interval_ms = 100;
        c.heartbeat_timeout_ms = 400;
    });
    let mut raw = raw_connect(gw.addr, "ses-silent");
    let started = Instant::now();
    let mut pings = 0;
    let code = loop {
        match raw.next_frame(WAIT) {
            Some((0x9, _)) => pings += 1,
            Some((0x1, _)) => {} // connected
            Some((0x8, payload)) => break u16::from_be_bytes([payload[0], payload[1]]),
            Some((op, _)) => panic!("unexpected opcode {op}"),
            None => panic!("closed without a close frame after {pings} pings"),
        }
    };
    assert_eq!(code, 1001);
    assert!(pings >= 1, "pinged before the timeout");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "not closed before the timeout: {:?}",
        started.elapsed()
    );
    gw.wait_stats("heartbeat close counted", |s| {
        s["connections"]["closed_by_reason"]["heartbeat_timeout"] == 1
    });
}

/// A client that answers Pings stays open well past the heartbeat timeout.
#[test]
fn responsive_client_outlives_the_heartbeat_timeout() {
    let gw = gateway_with(|c| {
        c.heartbeat_interval_ms = 100;
        c.heartbeat_timeout_ms = 500;
    });
    let mut c = gw.connect("ses-alive");
    // Reading answers the Pings (tungstenite queues the Pong and flushes it on the
    // next read).
    match c.next_frame(Duration::from_millis(1500)) {
        Frame::Timeout => {}
        other => panic!("expected nothing but pings, got {other:?}"),
    }
    c.ping_pong();
}

#[test]
fn connection_is_closed_with_4001_when_its_token_expires() {
    let gw = TestGateway::plain();
    let exp = now_s() + 2;
    let t = token_with(&json!({"sub": "ses-exp", "exp": exp}));
    let mut c = connect_with(gw.addr, "/ws", &[("Authorization", &format!("Bearer {t}"))])
        .expect("accepted");
    assert_eq!(c.connected["token_exp"].as_u64(), Some(exp));
    c.ping_pong();
    c.expect_close(4001);
}

#[test]
fn refresh_extends_the_session_past_the_old_expiry() {
    let gw = TestGateway::plain();
    let user = "ses-refresh";
    let t = token_with(&json!({"sub": user, "exp": now_s() + 3}));
    let mut c = connect_with(gw.addr, "/ws", &[("Authorization", &format!("Bearer {t}"))])
        .expect("accepted");
    let new_exp = now_s() + 3600;
    c.send_json(
        &json!({"type": "refresh", "token": token_with(&json!({"sub": user, "exp": new_exp}))}),
    );
    assert_eq!(c.recv_json(), json!({"type": "refreshed", "exp": new_exp}));
    match c.next_frame(Duration::from_millis(4000)) {
        Frame::Timeout => {}
        other => panic!("refreshed session must stay open past the old exp, got {other:?}"),
    }
    c.ping_pong();
}

#[test]
fn refresh_with_an_invalid_token_is_an_error_and_keeps_the_connection() {
    let gw = TestGateway::plain();
    let mut c = gw.connect("ses-refresh-bad");
    c.send_json(&json!({"type": "refresh", "token": "not.a.jwt"}));
    let v = c.recv_json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["code"], "invalid_token", "{v}");
    c.ping_pong();
}

#[test]
fn refresh_for_another_user_closes_with_4003() {
    let gw = TestGateway::plain();
    let mut c = gw.connect("ses-refresh-a");
    c.send_json(&json!({"type": "refresh", "token": token("ses-refresh-b")}));
    c.expect_close(4003);
}

#[test]
fn unmasked_client_frame_closes_with_1002() {
    let gw = TestGateway::plain();
    let mut raw = raw_connect(gw.addr, "ses-unmasked");
    raw.send(&client_frame(0x1, br#"{"type":"ping"}"#, true, false));
    assert_eq!(raw.expect_close(WAIT), 1002);
}

#[test]
fn invalid_utf8_text_closes_with_1007() {
    let gw = TestGateway::plain();
    let mut raw = raw_connect(gw.addr, "ses-utf8");
    raw.send(&client_frame(0x1, b"{\"type\":\"\xff\xfe\"}", true, true));
    assert_eq!(raw.expect_close(WAIT), 1007);
}

#[test]
fn continuation_without_a_first_fragment_closes_with_1002() {
    let gw = TestGateway::plain();
    let mut raw = raw_connect(gw.addr, "ses-frag");
    raw.send(&client_frame(0x0, b"orphan", true, true));
    assert_eq!(raw.expect_close(WAIT), 1002);
}

#[test]
fn fragmented_text_message_is_reassembled() {
    let gw = TestGateway::plain();
    let mut raw = raw_connect(gw.addr, "ses-frag-ok");
    let mut bytes = client_frame(0x1, br#"{"type":"#, false, true);
    bytes.extend(client_frame(0x0, br#""ping"}"#, true, true));
    raw.send(&bytes);
    loop {
        let (op, payload) = raw.next_frame(WAIT).expect("frame");
        assert_eq!(op, 0x1, "text frames only");
        let v: serde_json::Value = serde_json::from_slice(&payload).expect("json");
        if v["type"] == "connected" {
            continue;
        }
        assert_eq!(v["type"], "pong", "{v}");
        break;
    }
}

/// A socket that never completes its request is dropped after `handshake_timeout_ms`.
#[test]
fn incomplete_handshake_is_dropped_after_the_handshake_timeout() {
    let gw = gateway_with(|c| c.handshake_timeout_ms = 300);
    let mut s = TcpStream::connect_timeout(&gw.addr, WAIT).expect("connect");
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(
        n,
        0,
        "dropped without an answer: {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let took = started.elapsed();
    assert!(took < WAIT, "dropped in time: {took:?}");
    assert!(
        took >= Duration::from_millis(200),
        "not dropped before the timeout: {took:?}"
    );
}

/// A run with no event for `run_idle_timeout_ms` ends with a synthetic
/// `agent_error {"reason":"run_timeout"}` carrying the run's thread and agent.
#[test]
fn idle_run_is_ended_with_run_timeout() {
    let gw = gateway_with(|c| c.run_idle_timeout_ms = 200);
    let user = "ses-idle";
    let mut c = gw.connect(user);
    let mut run = gw
        .emitter
        .run(user, Some("t-idle"), "r-idle", "idle_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    let started = c.recv_json();
    assert_eq!(started["type"], "agent_started");
    let end = c.recv_json();
    assert_eq!(end["type"], "agent_error", "{end}");
    assert_eq!(end["data"], json!({"reason": "run_timeout"}), "{end}");
    crate::support::assert_envelope(&end, user, Some("t-idle"), "r-idle", "idle_agent");
    assert_eq!(end["seq"].as_u64(), started["seq"].as_u64().map(|s| s + 1));
    // Later events of that run are dropped; the handle does not know and drops quietly.
    run.emit("text_delta", &json!({})).expect("queued");
    drop(run);
    let mut marker = gw
        .emitter
        .run(user, None, "r-after", "idle_agent")
        .expect("run");
    marker.agent_started(&json!({})).expect("emit");
    assert_eq!(c.recv_json()["run_id"], "r-after");
    marker.agent_completed(&json!({})).expect("emit");
}

/// Frames pipelined right behind the upgrade request, in the same write, are read.
#[test]
fn frame_pipelined_behind_the_upgrade_is_answered() {
    let gw = TestGateway::plain();
    let mut s = TcpStream::connect_timeout(&gw.addr, WAIT).expect("connect");
    let mut bytes = crate::support::upgrade_head(
        gw.addr,
        "/ws",
        &[crate::support::bearer(&token("ses-pipe"))],
    )
    .into_bytes();
    bytes.extend(client_frame(0x1, br#"{"type":"ping"}"#, true, true));
    s.write_all(&bytes).expect("write");
    let r = crate::support::read_response(&mut s);
    assert_eq!(r.status, 101, "{}", r.text());
    let mut raw = crate::support::RawWs::from_parts(s, r.body);
    let mut types = Vec::new();
    while types.len() < 2 {
        let (op, payload) = raw.next_frame(WAIT).expect("frame");
        assert_eq!(op, 0x1);
        let v: serde_json::Value = serde_json::from_slice(&payload).expect("json");
        types.push(v["type"].as_str().unwrap_or("").to_owned());
    }
    assert_eq!(types, ["connected", "pong"]);
}

/// A client-initiated close is answered with a close frame, and the session is freed.
#[test]
fn client_close_is_echoed_and_the_session_freed() {
    let gw = TestGateway::plain();
    let mut raw = raw_connect(gw.addr, "ses-close");
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    raw.send(&client_frame(0x8, &payload, true, true));
    assert_eq!(raw.expect_close(WAIT), 1000);
    gw.wait_stats("session freed", |s| {
        s["connections"]["open"] == 0 && s["connections"]["closed_by_reason"]["client_closed"] == 1
    });
}

/// A client that vanishes with a TCP reset is cleaned up; others are unaffected.
#[test]
fn reset_connection_is_cleaned_up() {
    let gw = TestGateway::plain();
    let mut keep = gw.connect("ses-keep");
    let raw = raw_connect(gw.addr, "ses-reset");
    gw.wait_open(2);
    let sock = socket2::SockRef::from(&raw.stream);
    sock.set_linger(Some(Duration::ZERO)).expect("linger 0");
    drop(raw);
    // An event for the vanished user makes the gateway write to the dead socket too.
    let mut run = gw.emitter.run("ses-reset", None, "r-x", "a").expect("run");
    run.agent_started(&json!({})).expect("emit");
    gw.wait_open(1);
    keep.ping_pong();
    drop(run);
}

/// HTTP/1.1 keep-alive: several requests on one connection, pipelined, each answered.
#[test]
fn plain_http_keep_alive_and_pipelining() {
    let gw = TestGateway::plain();
    let mut s = TcpStream::connect_timeout(&gw.addr, WAIT).expect("connect");
    s.write_all(
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /ws/health HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .expect("write");
    let mut buf = Vec::new();
    for _ in 0..2 {
        let r = crate::support::read_response_from(&mut s, &mut buf);
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["status"], "healthy");
    }
    s.write_all(b"GET /ws/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let r = crate::support::read_response_from(&mut s, &mut buf);
    assert_eq!(r.status, 200);
    assert!(r.json()["connections"].is_object());
}

/// docs/PROTOCOL.md appendix: an idle keep-alive connection is closed after
/// `handshake_timeout_ms`.
#[test]
fn idle_keep_alive_connection_is_closed() {
    let gw = gateway_with(|c| c.handshake_timeout_ms = 300);
    let mut s = TcpStream::connect_timeout(&gw.addr, WAIT).expect("connect");
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut buf = Vec::new();
    let r = crate::support::read_response_from(&mut s, &mut buf);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("keep-alive"));
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let n = s.read(&mut byte).unwrap_or(0);
    assert_eq!(n, 0, "closed without more data");
    assert!(started.elapsed() < WAIT);
}

/// A refresh to a far-future `exp` (10^17 s) must not break the expiry arithmetic.
#[test]
fn refresh_to_a_far_future_exp_keeps_the_gateway_up() {
    let gw = TestGateway::plain();
    let user = "ses-refresh-far";
    let mut c = gw.connect(user);
    let exp = 100_000_000_000_000_000u64;
    c.send_json(
        &json!({"type": "refresh", "token": token_with(&json!({"sub": user, "exp": exp}))}),
    );
    let v = c.recv_json();
    assert!(
        v == json!({"type": "refreshed", "exp": exp})
            || (v["type"] == "error" && v["code"] == "invalid_token"),
        "refreshed or refused: {v}"
    );
    c.ping_pong();
    let (status, _) = crate::support::get_json(gw.addr, "/health");
    assert_eq!(status, 200);
}

/// Regression: a closing connection whose peer keeps its socket open (no FIN) must not
/// make the loop spin until the linger ends (every `shutdown(Write)` raised a new
/// writable edge, and the flush shut the socket down again on each one).
#[test]
fn a_lingering_close_does_not_spin_the_loop() {
    let gw = TestGateway::plain();
    let mut raw = crate::support::raw_connect(gw.addr, "linger-spin");
    raw.send(&crate::support::client_frame(
        0x8,
        &1000u16.to_be_bytes(),
        true,
        true,
    ));
    assert_eq!(raw.expect_close(Duration::from_secs(5)), 1000);
    // The socket stays open: the gateway lingers (up to 2 s) waiting for our FIN.
    let before = gw.stats()["loop"]["iterations"]
        .as_u64()
        .expect("iterations");
    std::thread::sleep(Duration::from_millis(1000));
    let after = gw.stats()["loop"]["iterations"]
        .as_u64()
        .expect("iterations");
    // Idle, the loop wakes for the housekeeping timer, the linger timer and these
    // two stats requests: a handful of iterations, not thousands.
    assert!(
        after - before < 100,
        "{} loop iterations in 1 s while lingering",
        after - before
    );
    drop(raw);
}
