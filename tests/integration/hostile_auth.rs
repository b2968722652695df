//! Hostile credentials (PROTOCOL.md section 3, docs/HOSTILE.md): the JWT cases
//! `jwt.rs` does not already cover (algorithm confusion, `kid`/`jku`/`jwk` header
//! tricks, malformed segments and base64, claims of the wrong JSON type, `sub` at and
//! over 128 bytes in multi-byte UTF-8), tokens in several places at once, the bearer
//! scheme's spelling, huge tokens (bounded time), the same matrix through `refresh`,
//! and the log check: no token, token signature or query string is ever written to
//! the gateway's log (see `support::log_capture`, which also checks the whole run's
//! log at process exit).

use std::time::Duration;

use jsonwebtoken::{Algorithm, Header};
use serde_json::{json, Value};

use crate::support::{
    assert_refusal, b64url, bearer, config, connect_with, http_request_streamed, log_capture,
    now_s, token, token_alg, token_alg_none, token_forged, token_header, token_with, upgrade,
    upgrade_head, Agent, TestGateway, SECRET,
};

const ISS: &str = "hostile-issuer";
const AUD: &str = "hostile-audience";
/// A huge-token answer must come within this (the gateway reads at most 16 KiB of a
/// head before answering 431; measured well under 100 ms).
const HUGE_BOUND: Duration = Duration::from_secs(3);

fn strict_gateway() -> TestGateway {
    let mut cfg = config();
    cfg.jwt_issuer = Some(ISS.into());
    cfg.jwt_audience = Some(AUD.into());
    cfg.jwt_leeway_s = 5;
    TestGateway::start(cfg, Agent::None)
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now_s() + 600, "iss": ISS, "aud": AUD})
}

fn with(mut c: Value, key: &str, value: Value) -> Value {
    c[key] = value;
    c
}

/// The three segments of a token.
fn segments(t: &str) -> (String, String, String) {
    let mut it = t.split('.');
    let mut next = || it.next().expect("three segments").to_owned();
    (next(), next(), next())
}

/// Run `(name, path and query, extra header lines, expected status)` upgrade cases;
/// collect every mismatch, so one run reports them all.
fn expect_upgrade_statuses(gw: &TestGateway, cases: &[(&str, String, Vec<String>, u16)]) {
    let mut failures = Vec::new();
    for (name, path, extra, want) in cases {
        let r = upgrade(gw.addr, path, extra);
        if r.status != *want {
            failures.push(format!(
                "{name}: expected {want}, got {} {}",
                r.status,
                r.text()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Run `(name, token, expected status)` cases against `/ws` as bearer tokens; collect
/// every mismatch, so one run reports the whole matrix.
fn run_matrix(gw: &TestGateway, cases: &[(&str, String, u16)]) {
    let mut failures = Vec::new();
    for (name, tok, want) in cases {
        log_capture::register_secret(tok);
        let r = upgrade(gw.addr, "/ws", &[bearer(tok)]);
        if r.status != *want {
            failures.push(format!(
                "{name}: expected {want}, got {} {}",
                r.status,
                r.text()
            ));
        } else if *want == 401 {
            assert_refusal(&r, 401, "invalid_token");
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} token cases answered wrongly:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn hostile_token_matrix() {
    let gw = strict_gateway();
    let sub = "auth-matrix";
    let good = claims(sub);
    let good_token = token_with(&good);
    let (h, p, s) = segments(&good_token);
    let hs256 = r#"{"alg":"HS256","typ":"JWT"}"#;
    let forged = |header: &str, key: &[u8], c: &Value| token_forged(header, key, c);
    let attacker = b"attacker-key-0123456789abcdef0123";
    let now = now_s();
    let cases: Vec<(&str, String, u16)> = vec![
        // Shape: segments and base64.
        ("two segments", format!("{h}.{p}"), 401),
        ("four segments", format!("{good_token}.{s}"), 401),
        ("empty signature, alg HS256", format!("{h}.{p}."), 401),
        ("empty payload", format!("{h}..{s}"), 401),
        ("padding on the signature", format!("{good_token}="), 401),
        (
            "standard base64 alphabet in the signature",
            format!("{h}.{p}.+{}", &s[1..]),
            401,
        ),
        ("a space inside", format!("{h}.{p} .{s}"), 401),
        (
            "non-base64 byte",
            format!("{h}.{p}.{}!", &s[..s.len() - 1]),
            401,
        ),
        (
            "header not JSON",
            forged("not json", SECRET.as_bytes(), &good),
            401,
        ),
        (
            "header a JSON array",
            forged("[]", SECRET.as_bytes(), &good),
            401,
        ),
        (
            "payload not JSON",
            format!("{h}.{}.{s}", b64url(b"{not json")),
            401,
        ),
        (
            "signature of another payload",
            {
                let (_, p2, _) = segments(&token_with(&claims("auth-someone-else")));
                format!("{h}.{p2}.{s}")
            },
            401,
        ),
        // Algorithm confusion.
        (
            "alg RS256 header, HMAC-signed with the HS256 secret",
            forged(r#"{"alg":"RS256","typ":"JWT"}"#, SECRET.as_bytes(), &good),
            401,
        ),
        (
            "alg ES256 header, HMAC-signed with the HS256 secret",
            forged(r#"{"alg":"ES256","typ":"JWT"}"#, SECRET.as_bytes(), &good),
            401,
        ),
        (
            "alg hs256 (lower case)",
            forged(r#"{"alg":"hs256","typ":"JWT"}"#, SECRET.as_bytes(), &good),
            401,
        ),
        (
            "alg None (capitalised), no signature",
            {
                let t = format!(
                    "{}.{}.",
                    b64url(br#"{"alg":"None","typ":"JWT"}"#),
                    b64url(good.to_string().as_bytes())
                );
                t
            },
            401,
        ),
        (
            "alg none with a signature",
            forged(r#"{"alg":"none","typ":"JWT"}"#, SECRET.as_bytes(), &good),
            401,
        ),
        (
            "alg missing",
            forged(r#"{"typ":"JWT"}"#, SECRET.as_bytes(), &good),
            401,
        ),
        ("alg none, helper-built", token_alg_none(&good), 401),
        // Header tricks: the gateway has one key and never looks a key up.
        (
            "kid path traversal, signed with an empty key",
            forged(
                r#"{"alg":"HS256","typ":"JWT","kid":"../../../../../../dev/null"}"#,
                b"",
                &good,
            ),
            401,
        ),
        (
            "kid SQL injection, signed with the injected key",
            forged(
                r#"{"alg":"HS256","kid":"x' UNION SELECT 'attacker-key-0123456789abcdef0123"}"#,
                attacker,
                &good,
            ),
            401,
        ),
        (
            "jku to an attacker's key set, signed with the attacker's key",
            forged(
                r#"{"alg":"HS256","jku":"https://attacker.example/jwks.json"}"#,
                attacker,
                &good,
            ),
            401,
        ),
        (
            "embedded jwk of the attacker's key, signed with it",
            forged(
                &format!(
                    r#"{{"alg":"HS256","jwk":{{"kty":"oct","k":"{}"}}}}"#,
                    b64url(attacker)
                ),
                attacker,
                &good,
            ),
            401,
        ),
        (
            "crit extension the gateway does not understand",
            forged(
                r#"{"alg":"HS256","crit":["exp-ext"],"exp-ext":1}"#,
                SECRET.as_bytes(),
                &good,
            ),
            401,
        ),
        (
            "kid ignored: right secret with an arbitrary kid",
            token_header(
                &Header {
                    kid: Some("../../etc/passwd".into()),
                    ..Header::new(Algorithm::HS256)
                },
                SECRET,
                &good,
            ),
            101,
        ),
        (
            "typ missing is fine with the right secret",
            forged(r#"{"alg":"HS256"}"#, SECRET.as_bytes(), &good),
            101,
        ),
        (
            "hand-built HS256 equals the library's",
            forged(hs256, SECRET.as_bytes(), &good),
            101,
        ),
        // Claims of the wrong JSON type (CVE-2026-25537 was string exp/nbf skipped).
        (
            "nbf as a string in the future",
            token_with(&with(good.clone(), "nbf", json!((now + 3600).to_string()))),
            401,
        ),
        (
            "exp null",
            token_with(&with(good.clone(), "exp", json!(null))),
            401,
        ),
        (
            "exp true",
            token_with(&with(good.clone(), "exp", json!(true))),
            401,
        ),
        (
            "exp an array",
            token_with(&with(good.clone(), "exp", json!([now + 600]))),
            401,
        ),
        (
            "exp an object",
            token_with(&with(good.clone(), "exp", json!({"at": now + 600}))),
            401,
        ),
        (
            "exp negative",
            token_with(&with(good.clone(), "exp", json!(-1))),
            401,
        ),
        (
            "exp a float in the past",
            token_with(&with(good.clone(), "exp", json!((now - 3600) as f64 + 0.5))),
            401,
        ),
        (
            "iss an array holding ours",
            token_with(&with(good.clone(), "iss", json!([ISS]))),
            401,
        ),
        (
            "aud a number",
            token_with(&with(good.clone(), "aud", json!(7))),
            401,
        ),
        (
            "aud empty array",
            token_with(&with(good.clone(), "aud", json!([]))),
            401,
        ),
        // sub: the type and the 128-byte limit, counted in bytes of UTF-8.
        (
            "sub null",
            token_with(&with(good.clone(), "sub", json!(null))),
            401,
        ),
        (
            "sub true",
            token_with(&with(good.clone(), "sub", json!(true))),
            401,
        ),
        (
            "sub an array",
            token_with(&with(good.clone(), "sub", json!(["u"]))),
            401,
        ),
        (
            "sub an object",
            token_with(&with(good.clone(), "sub", json!({"id": "u"}))),
            401,
        ),
        (
            "sub 130 bytes of 65 two-byte characters",
            token_with(&with(good.clone(), "sub", json!("é".repeat(65)))),
            401,
        ),
        (
            "sub exactly 128 bytes of 64 two-byte characters",
            token_with(&with(good.clone(), "sub", json!("é".repeat(64)))),
            101,
        ),
        (
            "sub exactly 128 ASCII bytes",
            token_with(&with(good.clone(), "sub", json!("a".repeat(128)))),
            101,
        ),
        // Size: over MAX_TOKEN_BYTES (8 KiB) but inside a 16 KiB head.
        (
            "a 9 KiB token",
            token_with(&with(good.clone(), "pad", json!("p".repeat(9 * 1024)))),
            401,
        ),
        ("the good token itself", good_token.clone(), 101),
    ];
    run_matrix(&gw, &cases);
    log_capture::assert_clean();
}

/// PROTOCOL.md section 3: the first of header, subprotocol, query is the token; a bad
/// earlier one is never rescued by a good later one; two values in one place are 400.
#[test]
fn hostile_token_in_two_places() {
    let gw = TestGateway::plain();
    let user = "auth-places";
    let good = token(user);
    let bad = token_alg(
        Algorithm::HS256,
        "another-secret-0123456789abcdef",
        &json!({"sub": user, "exp": now_s() + 600}),
    );
    let proto = |t: &str| format!("Sec-WebSocket-Protocol: agentwire.v1, bearer.{t}");
    let cases: Vec<(&str, String, Vec<String>, u16)> = vec![
        (
            "bad header, good subprotocol",
            "/ws".into(),
            vec![bearer(&bad), proto(&good)],
            401,
        ),
        (
            "good header, bad subprotocol",
            "/ws".into(),
            vec![bearer(&good), proto(&bad)],
            101,
        ),
        (
            "bad subprotocol, good query",
            format!("/ws?token={good}"),
            vec![proto(&bad)],
            401,
        ),
        (
            "good subprotocol, bad query",
            format!("/ws?token={bad}"),
            vec![proto(&good)],
            101,
        ),
        (
            "two Authorization headers, both good",
            "/ws".into(),
            vec![bearer(&good), bearer(&good)],
            400,
        ),
        (
            "two token query parameters, both good",
            format!("/ws?token={good}&token={good}"),
            vec![],
            400,
        ),
        (
            "two bearer subprotocol entries: the first one counts",
            "/ws".into(),
            vec![format!(
                "Sec-WebSocket-Protocol: agentwire.v1, bearer.{bad}, bearer.{good}"
            )],
            401,
        ),
    ];
    expect_upgrade_statuses(&gw, &cases);
    log_capture::assert_clean();
}

/// RFC 7235: the auth scheme is case-insensitive; exactly `Bearer`, one space, token.
#[test]
fn hostile_bearer_scheme_spellings() {
    let gw = TestGateway::plain();
    let t = token("auth-scheme");
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "lower-case bearer",
            format!("Authorization: bearer {t}"),
            101,
        ),
        (
            "upper-case BEARER",
            format!("Authorization: BEARER {t}"),
            101,
        ),
        ("two spaces", format!("Authorization: Bearer  {t}"), 101),
        ("no scheme", format!("Authorization: {t}"), 401),
        ("Basic scheme", format!("Authorization: Basic {t}"), 401),
        (
            "Bearer with nothing after it",
            "Authorization: Bearer".into(),
            401,
        ),
        (
            "Bearer and spaces only",
            "Authorization: Bearer    ".into(),
            401,
        ),
        (
            "a tab instead of the space",
            format!("Authorization: Bearer\t{t}"),
            401,
        ),
        (
            "token then garbage",
            format!("Authorization: Bearer {t} extra"),
            401,
        ),
        (
            "Bearer glued to the token",
            format!("Authorization: Bearer{t}"),
            401,
        ),
    ];
    let cases: Vec<(&str, String, Vec<String>, u16)> = cases
        .into_iter()
        .map(|(name, line, want)| (name, "/ws".to_owned(), vec![line], want))
        .collect();
    expect_upgrade_statuses(&gw, &cases);
    log_capture::assert_clean();
}

/// A 1 MiB token in each of the three places: the head passes 16 KiB, so the answer is
/// 431 `headers_too_large`, within [`HUGE_BOUND`]; the gateway then serves others.
#[test]
fn hostile_one_mib_token_is_431_in_bounded_time() {
    let gw = TestGateway::plain();
    let huge = format!(
        "{}.{}.{}",
        "a".repeat(16),
        "b".repeat(1 << 20),
        "c".repeat(43)
    );
    let places = [
        ("header", "/ws".to_owned(), vec![bearer(&huge)]),
        (
            "subprotocol",
            "/ws".to_owned(),
            vec![format!(
                "Sec-WebSocket-Protocol: agentwire.v1, bearer.{huge}"
            )],
        ),
        ("query", format!("/ws?token={huge}"), vec![]),
    ];
    for (place, path, extra) in places {
        let head = upgrade_head(gw.addr, &path, &extra).into_bytes();
        let (r, took) = http_request_streamed(gw.addr, head);
        eprintln!("1 MiB token in the {place}: {} after {took:?}", r.status);
        assert_refusal(&r, 431, "headers_too_large");
        assert!(took < HUGE_BOUND, "{place}: answered after {took:?}");
    }
    let mut c = gw.connect("auth-after-huge");
    c.ping_pong();
    log_capture::assert_clean();
}

/// The same bad tokens through `refresh` on an open connection: each answers `error`
/// `invalid_token` and the connection stays; a token over `max_message_bytes` closes
/// with 1009 like any oversized message. One connection per token: a connection gets
/// one token check per second (a refresh sooner is `rate_limited`, issue 9 F3).
#[test]
fn hostile_refresh_tokens_are_errors_and_keep_the_connection() {
    let gw = TestGateway::plain();
    let user = "auth-refresh";
    let good = json!({"sub": user, "exp": now_s() + 600});
    let bad = [
        token_alg_none(&good),
        token_alg(Algorithm::HS512, SECRET, &good),
        token_forged(r#"{"alg":"RS256"}"#, SECRET.as_bytes(), &good),
        token_with(&json!({"sub": user, "exp": (now_s() + 600).to_string()})),
        token_with(&json!({"sub": user, "exp": now_s() - 3600})),
        token_with(&json!({"sub": 5, "exp": now_s() + 600})),
        token_with(&json!({"sub": user, "exp": now_s() + 600, "pad": "p".repeat(9000)})),
        "x.y.z".into(),
    ];
    for t in &bad {
        let mut c = gw.connect(user);
        c.send_json(&json!({"type": "refresh", "token": t}));
        let v = c.recv_json();
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["code"], "invalid_token", "{v}");
        c.ping_pong();
    }
    let mut c = gw.connect(user);
    let huge = format!(
        "{}.{}.{}",
        "a".repeat(16),
        "b".repeat(70 * 1024),
        "c".repeat(43)
    );
    log_capture::register_secret(&huge);
    c.send_json(&json!({"type": "refresh", "token": huge}));
    c.expect_close(1009);
    log_capture::assert_clean();
}

/// Tokens travel through every place (header, subprotocol, query, refresh), good and
/// bad, accepted and refused; the gateway's log of it names the connections and users
/// but holds no token segment, no `token=` and no `?`. The capture is not vacuous: the
/// lines of this gateway's refusals and sessions are there.
#[test]
fn hostile_logs_never_hold_a_token_or_query_string() {
    let gw = strict_gateway();
    let user = "auth-logs-user";
    let good = token_with(&claims(user));
    let bad_sig = token_alg(
        Algorithm::HS256,
        "another-secret-0123456789abcdef",
        &claims(user),
    );
    let mut c1 = connect_with(
        gw.addr,
        "/ws",
        &[("Authorization", &format!("Bearer {good}"))],
    )
    .expect("header token");
    let mut c2 = connect_with(
        gw.addr,
        "/ws",
        &[(
            "Sec-WebSocket-Protocol",
            &format!("agentwire.v1, bearer.{good}"),
        )],
    )
    .expect("subprotocol token");
    let mut c3 = connect_with(
        gw.addr,
        &format!("/ws?token={good}&mode=main&thread_id=t-logs"),
        &[],
    )
    .expect("query token");
    for path in [
        format!("/ws?token={bad_sig}"),
        format!("/ws?token={good}&user_id=someone-else"),
        format!("/nowhere?token={good}"),
        format!("/ws?mode=bogus&token={good}"),
    ] {
        let r = upgrade(gw.addr, &path, &[]);
        assert!(
            matches!(r.status, 400 | 401 | 403 | 404),
            "{path}: {}",
            r.status
        );
    }
    let r = upgrade(gw.addr, "/ws", &[bearer(&bad_sig)]);
    assert_refusal(&r, 401, "invalid_token");
    c1.send_json(&json!({"type": "refresh", "token": good}));
    assert_eq!(c1.recv_json()["type"], "refreshed");
    c2.send_json(&json!({"type": "refresh", "token": bad_sig}));
    assert_eq!(c2.recv_json()["code"], "invalid_token");
    c3.send_json(&json!({"type": "refresh", "token": token_with(&claims("auth-logs-other"))}));
    c3.expect_close(4003);
    c1.close();
    c2.close();
    gw.wait_open(0);

    let mine: Vec<String> = log_capture::lines()
        .into_iter()
        .filter(|l| l.contains(user))
        .collect();
    assert!(
        mine.iter().filter(|l| l.contains(" open ")).count() >= 3
            && mine.iter().any(|l| l.contains("closed reason=")),
        "the capture holds this test's session lines: {mine:#?}"
    );
    let refused = log_capture::lines()
        .iter()
        .filter(|l| l.contains("refused status="))
        .count();
    assert!(refused >= 5, "refusal lines captured: {refused}");
    log_capture::assert_clean();
}
