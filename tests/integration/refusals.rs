//! Every refusal before the upgrade (PROTOCOL.md section 3): status, `error` code and
//! the `{"error", "message"}` body.

use std::net::TcpStream;
use std::time::Duration;

use agentwire::PerUserPolicy;
use serde_json::json;

use crate::support::{
    assert_refusal, bearer, config, connect_with, get, http_request, read_response, token, upgrade,
    upgrade_head, Agent, TestGateway, WAIT,
};

#[test]
fn get_ws_without_upgrade_headers_is_400() {
    let gw = TestGateway::plain();
    let r = http_request(
        gw.addr,
        format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\n{}\r\nConnection: close\r\n\r\n",
            bearer(&token("ref-400a"))
        )
        .as_bytes(),
    );
    assert_refusal(&r, 400, "bad_request");
}

#[test]
fn bad_mode_is_400() {
    let gw = TestGateway::plain();
    let r = upgrade(gw.addr, "/ws?mode=bogus", &[bearer(&token("ref-400b"))]);
    assert_refusal(&r, 400, "bad_request");
}

#[test]
fn bad_last_seq_is_400() {
    let gw = TestGateway::plain();
    for q in ["last_seq=abc", "last_seq=-1", "last_seq=1.5", "last_seq="] {
        let r = upgrade(gw.addr, &format!("/ws?{q}"), &[bearer(&token("ref-400c"))]);
        assert_refusal(&r, 400, "bad_request");
    }
}

#[test]
fn missing_token_is_401() {
    let gw = TestGateway::plain();
    let r = upgrade(gw.addr, "/ws", &[]);
    assert_refusal(&r, 401, "invalid_token");
}

#[test]
fn user_id_mismatch_is_403_and_match_is_accepted() {
    let gw = TestGateway::plain();
    let r = upgrade(
        gw.addr,
        "/ws?user_id=someone-else",
        &[bearer(&token("ref-403a"))],
    );
    assert_refusal(&r, 403, "forbidden");
    let ok = upgrade(
        gw.addr,
        "/ws?user_id=ref-403a",
        &[bearer(&token("ref-403a"))],
    );
    assert_eq!(
        ok.status,
        101,
        "matching user_id is accepted: {}",
        ok.text()
    );
}

#[test]
fn origin_outside_the_allow_list_is_403() {
    let mut cfg = config();
    cfg.allowed_origins = vec!["https://app.example.com".into()];
    let gw = TestGateway::start(cfg, Agent::None);
    let t = token("ref-403b");
    for origin in [
        "https://evil.example.com",
        "https://app.example.com.evil.com",
        "null",
    ] {
        let r = upgrade(gw.addr, "/ws", &[bearer(&t), format!("Origin: {origin}")]);
        assert_refusal(&r, 403, "forbidden");
    }
    let ok = upgrade(
        gw.addr,
        "/ws",
        &[bearer(&t), "Origin: https://app.example.com".into()],
    );
    assert_eq!(ok.status, 101, "listed origin is accepted: {}", ok.text());
}

#[test]
fn unknown_path_is_404_plain_and_upgrade() {
    let gw = TestGateway::plain();
    let r = get(gw.addr, "/nope");
    assert_refusal(&r, 404, "not_found");
    let r = upgrade(gw.addr, "/nope", &[bearer(&token("ref-404"))]);
    assert_refusal(&r, 404, "not_found");
    let r = upgrade(gw.addr, "/ws/nope", &[bearer(&token("ref-404"))]);
    assert_refusal(&r, 404, "not_found");
}

#[test]
fn websocket_version_12_is_426_with_version_13_header() {
    let gw = TestGateway::plain();
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 12\r\n{}\r\n\r\n",
        crate::support::WS_KEY,
        bearer(&token("ref-426"))
    );
    let r = http_request(gw.addr, head.as_bytes());
    assert_refusal(&r, 426, "upgrade_required");
    assert_eq!(
        r.header("sec-websocket-version"),
        Some("13"),
        "headers {:?}",
        r.headers
    );
}

#[test]
fn total_connection_limit_is_429() {
    let mut cfg = config();
    cfg.max_connections = 2;
    cfg.max_connections_per_user = 2;
    let gw = TestGateway::start(cfg, Agent::None);
    let mut a = gw.connect("ref-429a-1");
    let mut b = gw.connect("ref-429a-2");
    let r = upgrade(gw.addr, "/ws", &[bearer(&token("ref-429a-3"))]);
    assert_refusal(&r, 429, "too_many_connections");
    a.ping_pong();
    b.ping_pong();
    // A slot freed is a slot usable again.
    a.close();
    gw.wait_open(1);
    let mut c = gw.connect("ref-429a-3");
    c.ping_pong();
}

#[test]
fn per_user_limit_under_reject_is_429() {
    let mut cfg = config();
    cfg.max_connections_per_user = 2;
    cfg.per_user_policy = PerUserPolicy::Reject;
    let gw = TestGateway::start(cfg, Agent::None);
    let _a = gw.connect("ref-429b");
    let _b = gw.connect("ref-429b");
    let r = upgrade(gw.addr, "/ws", &[bearer(&token("ref-429b"))]);
    assert_refusal(&r, 429, "too_many_connections");
    // Another user is not affected.
    let mut other = gw.connect("ref-429b-other");
    other.ping_pong();
}

#[test]
fn request_head_over_16_kib_is_431() {
    let gw = TestGateway::plain();
    let big = format!("X-Padding: {}", "a".repeat(17 * 1024));
    let r = upgrade(gw.addr, "/ws", &[bearer(&token("ref-431a")), big]);
    assert_refusal(&r, 431, "headers_too_large");
}

#[test]
fn more_than_100_headers_is_431() {
    let gw = TestGateway::plain();
    let mut extra: Vec<String> = (0..101).map(|i| format!("X-H{i}: v")).collect();
    extra.push(bearer(&token("ref-431b")));
    let r = upgrade(gw.addr, "/ws", &extra);
    assert_refusal(&r, 431, "headers_too_large");
}

/// While the gateway drains (held open by a client that stops reading, so the drain
/// lasts its whole `shutdown_grace_ms`), `/health` answers 503 `draining` and a new
/// upgrade 503 `shutting_down`.
#[test]
fn upgrade_during_shutdown_is_503() {
    let mut cfg = config();
    cfg.max_pending_bytes = 1 << 30;
    cfg.shutdown_grace_ms = 4000;
    let gw = TestGateway::start(cfg, Agent::None);
    let user = "ref-503-stuck";
    let stuck = gw.connect(user);
    // Pile up far more than the socket buffers hold; the client never reads.
    let blob = "x".repeat(60 * 1024);
    let mut run = gw.emitter.run(user, None, "r-flood", "flood").expect("run");
    for _ in 0..400 {
        run.emit("text_delta", &json!({ "blob": blob }))
            .expect("emit");
    }
    gw.wait_stats("output piling up on the stuck client", |s| {
        s["bytes"]["pending_out"].as_u64().is_some_and(|n| n > 0)
            && s["events"]["delivered"].as_u64() == Some(400)
    });

    gw.emitter.shutdown().expect("shutdown request");
    let mut draining = None;
    crate::support::wait_until("/health to report draining", || {
        let r = get(gw.addr, "/health");
        let done = r.status == 503;
        draining = Some(r);
        done
    });
    let health = draining.expect("a health answer");
    let body = health.json();
    assert_eq!(body["status"], "draining", "{body}");

    let r = upgrade(gw.addr, "/ws", &[bearer(&token("ref-503-new"))]);
    assert_refusal(&r, 503, "shutting_down");
    drop(stuck);
    drop(run);
}

/// Seen through a real client library, a refusal is a failed handshake carrying the
/// status (the harness relies on this to report refusals readably).
#[test]
fn refused_handshake_through_a_real_client_reports_the_status() {
    let gw = TestGateway::plain();
    let err = match connect_with(gw.addr, "/ws", &[("Authorization", "Bearer not-a-jwt")]) {
        Ok(_) => panic!("a malformed token must be refused"),
        Err(e) => e,
    };
    assert!(err.contains("401"), "{err}");
}

/// A request split across writes (slow client) is still answered once complete.
#[test]
fn request_head_in_pieces_is_answered() {
    let gw = TestGateway::plain();
    let head = upgrade_head(gw.addr, "/nope", &[]);
    let mut s = TcpStream::connect_timeout(&gw.addr, WAIT).expect("connect");
    use std::io::Write;
    let (a, b) = head.as_bytes().split_at(head.len() / 2);
    s.write_all(a).expect("write");
    s.flush().expect("flush");
    // Not synchronization: a pause so the two halves arrive as separate reads.
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(b).expect("write");
    let r = read_response(&mut s);
    assert_refusal(&r, 404, "not_found");
}

/// The limits are "over 16 KiB" and "over 100 headers": a head at the limits passes.
#[test]
fn request_head_at_the_limits_is_accepted() {
    let gw = TestGateway::plain();
    // 6 headers of our own (Host, Upgrade, Connection, Key, Version, Authorization).
    let mut extra: Vec<String> = (0..94).map(|i| format!("X-H{i}: v")).collect();
    extra.push(bearer(&token("ref-limits")));
    let head = upgrade_head(gw.addr, "/ws", &extra);
    assert_eq!(head.matches("\r\n").count() - 2, 100, "100 header lines");
    let r = http_request(gw.addr, head.as_bytes());
    assert_eq!(r.status, 101, "exactly 100 headers: {}", r.text());

    let base = upgrade_head(
        gw.addr,
        "/ws",
        &[bearer(&token("ref-limits")), "X-Pad: ".into()],
    );
    let pad = "p".repeat(16 * 1024 - 100 - base.len());
    let head = upgrade_head(
        gw.addr,
        "/ws",
        &[bearer(&token("ref-limits")), format!("X-Pad: {pad}")],
    );
    assert!(head.len() < 16 * 1024);
    let r = http_request(gw.addr, head.as_bytes());
    assert_eq!(r.status, 101, "a {}-byte head: {}", head.len(), r.text());
}

/// Query values are percent-decoded before they are compared or used.
#[test]
fn percent_encoded_user_id_and_thread_id_are_decoded() {
    let gw = TestGateway::plain();
    let user = "ref user/é";
    let t = token(user);
    let mut c = crate::support::connect_with(
        gw.addr,
        "/ws?user_id=ref%20user%2F%C3%A9&thread_id=t%201",
        &[("Authorization", &format!("Bearer {t}"))],
    )
    .expect("decoded user_id matches the token's sub");
    assert_eq!(c.connected["user_id"], user);
    assert_eq!(c.connected["thread_id"], "t 1");
    let mut run = gw
        .emitter
        .run(user, Some("t 1"), "r-pct", "a")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    assert_eq!(c.recv_json()["thread_id"], "t 1");
    run.agent_completed(&json!({})).expect("emit");
}

/// docs/PROTOCOL.md appendix: checks run in the order route (404), draining (503),
/// upgrade validity (400, 426), Origin (403), token (401), `user_id` (403), limits (429).
#[test]
fn refusal_checks_run_in_the_documented_order() {
    let mut cfg = config();
    cfg.allowed_origins = vec!["https://app.example.com".into()];
    cfg.max_connections_per_user = 1;
    cfg.per_user_policy = PerUserPolicy::Reject;
    let gw = TestGateway::start(cfg, Agent::None);
    let evil = "Origin: https://evil.example.com".to_string();
    let bad_token = bearer("x.y.z");
    // Unknown path beats everything.
    let r = upgrade(
        gw.addr,
        "/nowhere?mode=bogus",
        &[evil.clone(), bad_token.clone()],
    );
    assert_refusal(&r, 404, "not_found");
    // Upgrade validity beats Origin and token.
    let r = upgrade(
        gw.addr,
        "/ws?mode=bogus",
        &[evil.clone(), bad_token.clone()],
    );
    assert_refusal(&r, 400, "bad_request");
    // Origin beats the token.
    let r = upgrade(gw.addr, "/ws", &[evil, bad_token.clone()]);
    assert_refusal(&r, 403, "forbidden");
    // The token beats user_id.
    let r = upgrade(gw.addr, "/ws?user_id=other", &[bad_token]);
    assert_refusal(&r, 401, "invalid_token");
    // user_id beats the limits.
    let _held = gw.connect("ref-order");
    let r = upgrade(gw.addr, "/ws?user_id=other", &[bearer(&token("ref-order"))]);
    assert_refusal(&r, 403, "forbidden");
    let r = upgrade(gw.addr, "/ws", &[bearer(&token("ref-order"))]);
    assert_refusal(&r, 429, "too_many_connections");
}
