//! The token rules of PROTOCOL.md section 3: every bad token is 401 `invalid_token`;
//! the three places a token may come from; the leeway.

use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

use crate::support::{
    assert_refusal, bearer, config, connect_with, now_s, token_alg, token_alg_none, token_with,
    upgrade, Agent, TestGateway, SECRET,
};

const ISS: &str = "agentwire-tests";
const AUD: &str = "agentwire-clients";
const LEEWAY_S: u64 = 30;

/// A gateway that requires `iss` and `aud`, with a 30 s leeway.
fn strict_gateway() -> TestGateway {
    let mut cfg = config();
    cfg.jwt_issuer = Some(ISS.into());
    cfg.jwt_audience = Some(AUD.into());
    cfg.jwt_leeway_s = LEEWAY_S;
    TestGateway::start(cfg, Agent::None)
}

fn good_claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now_s() + 600, "iss": ISS, "aud": AUD})
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().expect("object").remove(key);
    claims
}

#[test]
fn every_bad_token_is_401_invalid_token() {
    let gw = strict_gateway();
    let sub = "jwt-bad";
    let good = good_claims(sub);
    let now = now_s();
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("empty bearer", Some(String::new())),
        ("malformed", Some("not-a-jwt".into())),
        ("three garbage segments", Some("a.b.c".into())),
        (
            "bad signature",
            Some(token_alg(
                Algorithm::HS256,
                "another-secret-0123456789abcdef",
                &good,
            )),
        ),
        ("alg none", Some(token_alg_none(&good))),
        (
            "HS384 with the right secret",
            Some(token_alg(Algorithm::HS384, SECRET, &good)),
        ),
        (
            "HS512 with the right secret",
            Some(token_alg(Algorithm::HS512, SECRET, &good)),
        ),
        (
            "expired beyond leeway",
            Some(token_with(&with(
                good.clone(),
                "exp",
                json!(now - LEEWAY_S - 60),
            ))),
        ),
        (
            "nbf in the future",
            Some(token_with(&with(
                good.clone(),
                "nbf",
                json!(now + LEEWAY_S + 300),
            ))),
        ),
        (
            "wrong iss",
            Some(token_with(&with(
                good.clone(),
                "iss",
                json!("someone-else"),
            ))),
        ),
        (
            "missing iss",
            Some(token_with(&without(good.clone(), "iss"))),
        ),
        (
            "wrong aud",
            Some(token_with(&with(
                good.clone(),
                "aud",
                json!("other-audience"),
            ))),
        ),
        (
            "missing aud",
            Some(token_with(&without(good.clone(), "aud"))),
        ),
        (
            "missing sub",
            Some(token_with(&without(good.clone(), "sub"))),
        ),
        (
            "empty sub",
            Some(token_with(&with(good.clone(), "sub", json!("")))),
        ),
        (
            "numeric sub",
            Some(token_with(&with(good.clone(), "sub", json!(42)))),
        ),
        (
            "sub over 128 bytes",
            Some(token_with(&with(
                good.clone(),
                "sub",
                json!("u".repeat(129)),
            ))),
        ),
        (
            "missing exp",
            Some(token_with(&without(good.clone(), "exp"))),
        ),
        (
            "string exp",
            Some(token_with(&with(
                good.clone(),
                "exp",
                json!((now + 600).to_string()),
            ))),
        ),
    ];
    let mut failures = Vec::new();
    for (name, tok) in &cases {
        let extra: Vec<String> = tok
            .iter()
            .map(|t| format!("Authorization: Bearer {t}"))
            .collect();
        let r = upgrade(gw.addr, "/ws", &extra);
        let body = if r.status == 101 {
            Value::Null
        } else {
            r.json()
        };
        if r.status != 401 || body["error"] != "invalid_token" {
            failures.push(format!("{name}: got {} {body}", r.status));
        } else {
            assert_refusal(&r, 401, "invalid_token");
        }
    }
    assert!(
        failures.is_empty(),
        "tokens not refused with 401 invalid_token:\n{}",
        failures.join("\n")
    );
    // The same gateway accepts the good token, so the refusals above are about the token.
    let r = upgrade(gw.addr, "/ws", &[bearer(&token_with(&good))]);
    assert_eq!(r.status, 101, "good token accepted: {}", r.text());
    // An audience array containing ours is fine.
    let r = upgrade(
        gw.addr,
        "/ws",
        &[bearer(&token_with(&with(good, "aud", json!(["x", AUD]))))],
    );
    assert_eq!(r.status, 101, "aud array with ours accepted: {}", r.text());
}

/// `exp` a little in the past but within `jwt_leeway_s` is accepted (101 and the
/// `connected` frame). The project's documented choice (docs/PROTOCOL.md appendix:
/// "the token's expiry closes the connection at `exp` itself; the leeway only applies
/// to accepting a token") then closes it with 4001 at once.
#[test]
fn expired_within_leeway_is_accepted_then_closed_at_exp() {
    let gw = strict_gateway();
    let exp = now_s() - 10;
    let claims = with(good_claims("jwt-leeway"), "exp", json!(exp));
    let mut c = connect_with(
        gw.addr,
        "/ws",
        &[("Authorization", &format!("Bearer {}", token_with(&claims)))],
    )
    .expect("token expired 10 s ago with a 30 s leeway is accepted");
    assert_eq!(c.connected["user_id"], "jwt-leeway");
    assert_eq!(c.connected["token_exp"], exp);
    c.expect_close(4001);
}

/// `nbf` a little in the future but within the leeway is accepted.
#[test]
fn nbf_within_leeway_is_accepted() {
    let gw = strict_gateway();
    let claims = with(good_claims("jwt-nbf"), "nbf", json!(now_s() + 10));
    let r = upgrade(gw.addr, "/ws", &[bearer(&token_with(&claims))]);
    assert_eq!(r.status, 101, "{}", r.text());
}

#[test]
fn token_via_authorization_bearer() {
    let gw = strict_gateway();
    let t = token_with(&good_claims("jwt-hdr"));
    let mut c = connect_with(gw.addr, "/ws", &[("Authorization", &format!("Bearer {t}"))])
        .expect("accepted");
    assert_eq!(c.connected["user_id"], "jwt-hdr");
    assert_eq!(
        c.header("sec-websocket-protocol"),
        None,
        "no subprotocol offered, none answered"
    );
    c.ping_pong();
}

#[test]
fn token_via_subprotocol_answers_exactly_agentwire_v1() {
    let gw = strict_gateway();
    let t = token_with(&good_claims("jwt-proto"));
    let mut c = connect_with(
        gw.addr,
        "/ws",
        &[(
            "Sec-WebSocket-Protocol",
            &format!("agentwire.v1, bearer.{t}"),
        )],
    )
    .expect("accepted");
    assert_eq!(c.connected["user_id"], "jwt-proto");
    assert_eq!(c.header("sec-websocket-protocol"), Some("agentwire.v1"));
    c.ping_pong();
    // Raw: exactly one Sec-WebSocket-Protocol header with exactly agentwire.v1.
    let r = upgrade(
        gw.addr,
        "/ws",
        &[format!("Sec-WebSocket-Protocol: agentwire.v1, bearer.{t}")],
    );
    assert_eq!(r.status, 101, "{}", r.text());
    let protos: Vec<&String> = r
        .headers
        .iter()
        .filter(|(k, _)| k == "sec-websocket-protocol")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(protos, vec!["agentwire.v1"], "{:?}", r.headers);
}

#[test]
fn bearer_subprotocol_without_agentwire_v1_is_not_a_token() {
    let gw = strict_gateway();
    let t = token_with(&good_claims("jwt-proto2"));
    let r = upgrade(
        gw.addr,
        "/ws",
        &[format!("Sec-WebSocket-Protocol: bearer.{t}")],
    );
    assert_refusal(&r, 401, "invalid_token");
}

#[test]
fn token_via_query_parameter() {
    let gw = strict_gateway();
    let t = token_with(&good_claims("jwt-query"));
    let mut c = connect_with(gw.addr, &format!("/ws?token={t}"), &[]).expect("accepted");
    assert_eq!(c.connected["user_id"], "jwt-query");
    c.ping_pong();
}

#[test]
fn query_token_refused_when_disabled() {
    let mut cfg = config();
    cfg.allow_query_token = false;
    let gw = TestGateway::start(cfg, Agent::None);
    let t = crate::support::token("jwt-noquery");
    let r = upgrade(gw.addr, &format!("/ws?token={t}"), &[]);
    assert_refusal(&r, 401, "invalid_token");
    // The header still works on that gateway.
    let r = upgrade(gw.addr, "/ws", &[bearer(&t)]);
    assert_eq!(r.status, 101, "{}", r.text());
}

/// The header comes first: a bad bearer is not rescued by a good query token.
#[test]
fn authorization_header_takes_precedence_over_query() {
    let gw = TestGateway::plain();
    let good = crate::support::token("jwt-prec");
    let bad = token_alg(
        Algorithm::HS256,
        "another-secret-0123456789abcdef",
        &json!({"sub": "jwt-prec", "exp": now_s() + 600}),
    );
    let r = upgrade(gw.addr, &format!("/ws?token={good}"), &[bearer(&bad)]);
    assert_refusal(&r, 401, "invalid_token");
}

#[test]
fn refusals_are_counted_as_invalid_token() {
    let gw = TestGateway::plain();
    for _ in 0..3 {
        let r = upgrade(gw.addr, "/ws", &[bearer("x.y.z")]);
        assert_refusal(&r, 401, "invalid_token");
    }
    let s = gw.stats();
    assert_eq!(s["connections"]["refused"]["invalid_token"], 3, "{s}");
    assert_eq!(s["connections"]["opened"], 0, "{s}");
}

/// A token with a far-future `exp` (a "never expires" token: 10^17 s, or i64::MAX as
/// some issuers write it) must not break the expiry arithmetic: the connection works
/// and the gateway stays up.
#[test]
fn far_future_exp_does_not_break_the_gateway() {
    let gw = TestGateway::plain();
    for (i, exp) in [json!(100_000_000_000_000_000u64), json!(i64::MAX)]
        .into_iter()
        .enumerate()
    {
        let user = format!("jwt-far-{i}");
        let t = token_with(&json!({"sub": user, "exp": exp}));
        let r = upgrade(gw.addr, "/ws", &[bearer(&t)]);
        if r.status == 401 {
            continue; // refusing such a token is acceptable too
        }
        assert_eq!(r.status, 101, "exp {exp}: {}", r.text());
        let mut c = connect_with(gw.addr, "/ws", &[("Authorization", &format!("Bearer {t}"))])
            .unwrap_or_else(|e| panic!("exp {exp}: {e}"));
        c.ping_pong();
    }
    let (status, body) = crate::support::get_json(gw.addr, "/health");
    assert_eq!(status, 200, "{body}");
}
