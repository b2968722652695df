//! The HTTP side of a new connection, with the functions the reactor calls, in its
//! order: [`parse_head`], [`Route::of`], then for a WebSocket path [`check_upgrade`]
//! (which derives the `Sec-WebSocket-Accept` key), [`origin::allowed`] and the 101 bytes
//! ([`upgrade_response`]); for `/health` the JSON answer ([`json_response`]); for a
//! refusal its response ([`Refusal::to_response`]).
//!
//! Three requests: a realistic browser upgrade (Chrome's headers, `Authorization:
//! Bearer` with an HS256 token; the token's verification is `benches/jwt.rs`), a plain
//! `GET /health` from curl, and an upgrade without a token (refused 401). Plus the
//! accept-key derivation alone (SHA-1 + base64).

use std::hint::black_box;
use std::time::Duration;

use agentwire::__internal::http::{
    check_upgrade, json_response, keep_alive, parse_head, upgrade_response, Refusal, Route,
};
use agentwire::__internal::origin;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;

/// A token's shape and length (HS256, `sub` + `exp` + `iat`); never verified here.
const TOKEN: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.\
eyJzdWIiOiJ1c2VyLTdmM2EyYzkxIiwiZXhwIjoxNzk2MDAwMDAwLCJpYXQiOjE3OTU5OTY0MDB9.\
q0bYkJmP3x6cE3vR2WcK7h1vTq2sX8nU5aLzD4fG9oI";

const ALLOWED_ORIGINS: &[&str] = &["https://app.example.com"];

/// Chrome's upgrade request, as a browser page behind a proxy sends it.
fn browser_upgrade(token: Option<&str>) -> Vec<u8> {
    let mut req = String::from(
        "GET /ws?mode=main&thread_id=thread-2026-11-30-a81f HTTP/1.1\r\n\
         Host: gateway.example.com\r\n\
         Connection: Upgrade\r\n\
         Pragma: no-cache\r\n\
         Cache-Control: no-cache\r\n\
         User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36\r\n\
         Upgrade: websocket\r\n\
         Origin: https://app.example.com\r\n\
         Sec-WebSocket-Version: 13\r\n\
         Accept-Encoding: gzip, deflate, br, zstd\r\n\
         Accept-Language: en-US,en;q=0.9,de;q=0.8\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    );
    if let Some(token) = token {
        req.push_str("Authorization: Bearer ");
        req.push_str(token);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.into_bytes()
}

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\n\
Host: 127.0.0.1:8080\r\n\
User-Agent: curl/8.5.0\r\n\
Accept: */*\r\n\r\n";

/// The reactor's path for a WebSocket request up to the token check: `Ok` with the 101
/// bytes and the token to verify, or the refusal's response.
fn upgrade_path(buf: &[u8], allowed: &[String]) -> Result<(Vec<u8>, String), Vec<u8>> {
    let (req, _head_len) = match parse_head(buf) {
        Ok(Some(done)) => done,
        Ok(None) => return Err(Vec::new()),
        Err(r) => return Err(r.to_response()),
    };
    let Route::WebSocket(path_mode) = Route::of(req.method, &req.path) else {
        return Err(Refusal::not_found().to_response());
    };
    let up = check_upgrade(&req, path_mode, true).map_err(|r| r.to_response())?;
    if !origin::allowed(up.origin.as_deref(), allowed) {
        return Err(Refusal::forbidden("origin not allowed").to_response());
    }
    let Some((token, _source)) = up.token else {
        return Err(Refusal::unauthorized("token missing").to_response());
    };
    Ok((upgrade_response(&up.accept_key, up.subprotocol), token))
}

/// The reactor's path for `GET /health`: parse, route, the JSON body, the response.
fn health_path(buf: &[u8]) -> Vec<u8> {
    let Ok(Some((req, _))) = parse_head(buf) else {
        return Vec::new();
    };
    if Route::of(req.method, &req.path) != Route::Health {
        return Vec::new();
    }
    let body = json!({
        "status": "healthy",
        "version": "0.1.0",
        "uptime_s": 3600,
        "connections": 10_000,
        "epoch": "9f2c41d0e3b7a615",
    });
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    json_response(200, &bytes, !keep_alive(&req), false, &[])
}

fn bench(c: &mut Criterion) {
    let allowed: Vec<String> = ALLOWED_ORIGINS.iter().map(|s| s.to_string()).collect();
    let upgrade = browser_upgrade(Some(TOKEN));
    let no_token = browser_upgrade(None);

    // The paths give the answers the reactor would (and so measure the real work).
    let (resp, token) = upgrade_path(&upgrade, &allowed).expect("upgrade accepted");
    assert!(resp.starts_with(b"HTTP/1.1 101 "));
    assert!(resp
        .windows(28)
        .any(|w| w == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    assert_eq!(token, TOKEN);
    let refused = upgrade_path(&no_token, &allowed).expect_err("no token: refused");
    assert!(refused.starts_with(b"HTTP/1.1 401 "));
    assert!(health_path(HEALTH).starts_with(b"HTTP/1.1 200 "));

    let mut group = c.benchmark_group("http");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(1));

    group.bench_function(format!("upgrade_browser_{}B", upgrade.len()), |b| {
        b.iter(|| upgrade_path(black_box(&upgrade), &allowed))
    });
    group.bench_function(format!("parse_head_only_{}B", upgrade.len()), |b| {
        b.iter(|| parse_head(black_box(&upgrade)))
    });
    group.bench_function("derive_accept_key", |b| {
        b.iter(|| tungstenite::handshake::derive_accept_key(black_box(b"dGhlIHNhbXBsZSBub25jZQ==")))
    });
    group.bench_function(format!("health_get_{}B", HEALTH.len()), |b| {
        b.iter(|| health_path(black_box(HEALTH)))
    });
    group.bench_function(format!("refuse_401_no_token_{}B", no_token.len()), |b| {
        b.iter(|| upgrade_path(black_box(&no_token), &allowed))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
