//! Issue 13, item 4 (one node): `POST /api/users/{user_id}/disconnect` with the
//! publish key closes every session of the user with 4004 and answers `{"closed":N}`;
//! with `"until"` the user's upgrades are refused (401) until then, and accepted after;
//! bad requests are 400 and change nothing; past `max_revoked_users` a new revocation
//! is 503 and closes nothing. The rules are in `src/reactor/revoke.rs` and
//! `src/revocation.rs`.

use std::net::SocketAddr;

use serde_json::json;

use crate::support::*;

/// `POST path` with the publish key (or `key`) and `body` (no `Content-Length` at all
/// when `body` is `None`).
fn post(addr: SocketAddr, path: &str, key: Option<&str>, body: Option<&str>) -> HttpResponse {
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let length = body.map_or(String::new(), |b| {
        format!("Content-Length: {}\r\n", b.len())
    });
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{length}Connection: close\r\n\r\n{}",
        body.unwrap_or("")
    );
    http_request(addr, req.as_bytes())
}

fn disconnect(addr: SocketAddr, user: &str, body: Option<&str>) -> HttpResponse {
    post(
        addr,
        &format!("/api/users/{user}/disconnect"),
        Some(PUBLISH_KEY),
        body,
    )
}

#[test]
fn disconnect_closes_every_session_of_the_user_with_4004_and_only_theirs() {
    let gw = TestGateway::plain();
    let mut a1 = gw.connect("rev-user");
    let mut a2 = gw.connect("rev-user");
    let mut other = gw.connect("rev-bystander");
    let r = disconnect(gw.addr, "rev-user", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"closed": 2}));
    a1.expect_close(4004);
    a2.expect_close(4004);
    other.ping_pong();
    // Without until the user may come back at once.
    let mut back = gw.connect("rev-user");
    back.ping_pong();
    // A user with no session: nothing to close.
    let r = disconnect(gw.addr, "nobody-here", Some("{}"));
    assert_eq!((r.status, r.json()), (200, json!({"closed": 0})));
    let s = gw.wait_stats("two revoked closes", |s| {
        s["connections"]["closed_by_reason"]["revoked"] == json!(2)
    });
    assert_eq!(s["connections"]["open"], json!(2));
    log_capture::assert_clean();
}

#[test]
fn until_refuses_new_upgrades_with_401_until_it_passes() {
    let gw = TestGateway::plain();
    let mut c = gw.connect("rev-until");
    let until = now_s() + 2;
    let r = disconnect(
        gw.addr,
        "rev-until",
        Some(&format!("{{\"until\": {until}}}")),
    );
    assert_eq!((r.status, r.json()), (200, json!({"closed": 1})));
    c.expect_close(4004);
    let refused = upgrade(gw.addr, "/ws", &[bearer(&token("rev-until"))]);
    assert_refusal(&refused, 401, "invalid_token");
    assert_eq!(refused.json()["message"], "user revoked");
    // Other users are not affected.
    gw.connect("rev-other").ping_pong();
    // Once `until` has passed the user is accepted again (polled, bounded).
    let deadline = std::time::Instant::now() + WAIT;
    let mut back = loop {
        if let Ok(c) = connect_with(
            gw.addr,
            "/ws",
            &[("Authorization", &format!("Bearer {}", token("rev-until")))],
        ) {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still refused after until"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(now_s() >= until, "accepted before until");
    back.ping_pong();
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let gw = TestGateway::plain();
    let mut c = gw.connect("rev-bad");
    let now = now_s();
    for (path, body, status, code) in [
        ("/api/users/%zz/disconnect", None, 400, "bad_request"),
        ("/api/users//disconnect", None, 400, "bad_request"),
        (
            "/api/users/rev-bad/disconnect",
            Some("{"),
            400,
            "bad_request",
        ),
        (
            "/api/users/rev-bad/disconnect",
            Some("[1]"),
            400,
            "bad_request",
        ),
        (
            "/api/users/rev-bad/disconnect",
            Some(r#"{"untill":5}"#),
            400,
            "bad_request",
        ),
        (
            "/api/users/rev-bad/disconnect",
            Some(r#"{"until":"soon"}"#),
            400,
            "bad_request",
        ),
        (
            "/api/users/rev-bad/disconnect",
            Some(r#"{"until":-1}"#),
            400,
            "bad_request",
        ),
    ] {
        let r = post(gw.addr, path, Some(PUBLISH_KEY), body);
        assert_refusal(&r, status, code);
    }
    let past = format!("{{\"until\": {}}}", now - 10);
    let r = disconnect(gw.addr, "rev-bad", Some(&past));
    assert_refusal(&r, 400, "bad_request");
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("not in the future"));
    let millis = format!("{{\"until\": {}}}", now * 1000);
    let r = disconnect(gw.addr, "rev-bad", Some(&millis));
    assert_refusal(&r, 400, "bad_request");
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("not milliseconds"));
    let r = disconnect(gw.addr, "rev-bad", Some(&" ".repeat(2000)));
    assert_eq!(r.status, 413);
    // The key: wrong or missing is 401.
    let r = post(
        gw.addr,
        "/api/users/rev-bad/disconnect",
        Some("wrong-key-0123456789"),
        None,
    );
    assert_refusal(&r, 401, "invalid_key");
    let r = post(gw.addr, "/api/users/rev-bad/disconnect", None, None);
    assert_refusal(&r, 401, "invalid_key");
    // Another method is 405.
    let r = get(gw.addr, "/api/users/rev-bad/disconnect");
    assert_eq!(r.status, 405);
    // Nothing happened to the user.
    c.ping_pong();
    let s = gw.stats();
    let revoked = s["connections"]["closed_by_reason"]["revoked"].as_u64();
    assert_eq!(revoked.unwrap_or(0), 0, "{s}");
    gw.connect("rev-bad").ping_pong();
}

#[test]
fn without_a_publish_key_the_endpoint_is_404() {
    let gw = TestGateway::start(
        agentwire::Config {
            publish_key: None,
            ..config()
        },
        Agent::None,
    );
    let mut c = gw.connect("rev-nokey");
    let r = post(
        gw.addr,
        "/api/users/rev-nokey/disconnect",
        Some(PUBLISH_KEY),
        None,
    );
    assert_refusal(&r, 404, "not_found");
    c.ping_pong();
}

#[test]
fn past_max_revoked_users_a_new_revocation_is_503_and_closes_nothing() {
    let gw = TestGateway::start(
        agentwire::Config {
            max_revoked_users: 2,
            ..config()
        },
        Agent::None,
    );
    let until = format!("{{\"until\": {}}}", now_s() + 3600);
    for user in ["cap-a", "cap-b"] {
        assert_eq!(disconnect(gw.addr, user, Some(&until)).status, 200);
    }
    let mut c = gw.connect("cap-c");
    let r = disconnect(gw.addr, "cap-c", Some(&until));
    assert_refusal(&r, 503, "too_many_revocations");
    c.ping_pong();
    // Revoking a user already revoked replaces their until: always room.
    assert_eq!(disconnect(gw.addr, "cap-a", Some(&until)).status, 200);
    // Without until there is nothing to store: the sessions close.
    let r = disconnect(gw.addr, "cap-c", None);
    assert_eq!((r.status, r.json()), (200, json!({"closed": 1})));
    c.expect_close(4004);
    assert_refusal(
        &upgrade(gw.addr, "/ws", &[bearer(&token("cap-b"))]),
        401,
        "invalid_token",
    );
    // The store's fill is a budget in /ws/stats and /metrics.
    let s = gw.stats();
    assert_eq!(
        s["budgets"]["revoked_users"],
        json!({"limit": 2, "used": 2}),
        "{s}"
    );
    assert_eq!(
        s["revocation"],
        json!({"disconnects": 4, "revoked_users": 2}),
        "{s}"
    );
    let metrics = prometheus(&get(gw.addr, "/metrics").text());
    assert_eq!(
        metric(&metrics, "agentwire_budget_used{budget=\"revoked_users\"}"),
        2.0
    );
    assert_eq!(metric(&metrics, "agentwire_user_disconnects_total"), 4.0);
}

#[test]
fn a_user_id_with_escaped_characters_is_revoked_by_its_decoded_name() {
    let gw = TestGateway::plain();
    let mut c = gw.connect("team/alice smith");
    let r = disconnect(gw.addr, "team%2Falice%20smith", None);
    assert_eq!((r.status, r.json()), (200, json!({"closed": 1})));
    c.expect_close(4004);
}
