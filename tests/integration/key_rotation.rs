//! Issue 13, item 3: several verification keys picked by `kid` (a PEM list or a JWKS
//! file), and SIGHUP reloading the keys, `jwt_secret` and `allowed_origins` on the real
//! binary: new keys accepted, sessions kept, a bad file leaving the old keys in force.
//! The rules are in `src/jwt_keys.rs` and `src/reactor/reload.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::support::*;

// Two P-256 key pairs for these tests only (openssl genpkey -algorithm EC -pkeyopt
// ec_paramgen_curve:P-256; openssl pkey -pubout).
const A_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgp+wXYijDYB5xhWXO
Jy4aKA/VTvOZ4ninC0zulbUBzvqhRANCAAQLZ/4hy8vX1zS+scj0vmW2hODMPw77
E7GPdP3BVlWQDhU8329GgYcIEheG0yoAYnyH0jU/miRa8+dp/dDnb/db
-----END PRIVATE KEY-----
";
const A_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC2f+IcvL19c0vrHI9L5ltoTgzD8O
+xOxj3T9wVZVkA4VPN9vRoGHCBIXhtMqAGJ8h9I1P5okWvPnaf3Q52/3Ww==
-----END PUBLIC KEY-----
";
const B_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgnSrxRVJ+yX3kQdXH
i68/7+2etIAwgLr6FRqBr4mGW86hRANCAATeS458i7bnh6O2VND4q3qvNQbj8e6W
048iYskLAGdN0UbveyNs2TV/jFHTKza5jxzWf8ewObAmjwzhibcXw/sn
-----END PRIVATE KEY-----
";
const B_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE3kuOfIu254ejtlTQ+Kt6rzUG4/Hu
ltOPImLJCwBnTdFG73sjbNk1f4xR0ys2uY8c1n/HsDmwJo8M4Ym3F8P7Jw==
-----END PUBLIC KEY-----
";

/// An ES256 token for `sub` signed with `private_pem`, with header `kid` when given.
fn es_token(private_pem: &str, kid: Option<&str>, sub: &str) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = kid.map(str::to_owned);
    let key = EncodingKey::from_ec_pem(private_pem.as_bytes()).expect("EC private key");
    let t = encode(&header, &json!({"sub": sub, "exp": now_s() + 3600}), &key).expect("signs");
    log_capture::register_secret(&t);
    t
}

/// A file of this test's own under the temp dir, written with `contents`.
fn temp_file(name: &str, contents: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("agentwire-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).expect("write temp file");
    path
}

fn es256_gateway(key_file: &std::path::Path) -> TestGateway {
    let cfg = agentwire::Config {
        jwt_algorithm: agentwire::JwtAlgorithm::Es256,
        jwt_secret: None,
        jwt_public_key_file: Some(key_file.to_path_buf()),
        ..config()
    };
    TestGateway::start(cfg, Agent::None)
}

/// The status and `error` of an upgrade with `token` as bearer (101 when accepted).
fn try_upgrade(addr: SocketAddr, token: &str) -> (u16, String) {
    match connect_with(
        addr,
        "/ws",
        &[("Authorization", &format!("Bearer {token}"))],
    ) {
        Ok(c) => {
            c.close();
            (101, String::new())
        }
        Err(_) => {
            let r = upgrade(addr, "/ws", &[bearer(token)]);
            let code = r.json()["error"].as_str().unwrap_or("").to_owned();
            let message = r.json()["message"].as_str().unwrap_or("").to_owned();
            (r.status, format!("{code}: {message}"))
        }
    }
}

#[test]
fn a_pem_list_picks_the_key_by_kid() {
    let file = temp_file(
        "kid-list.pem",
        &format!("kid: key-a\n{A_PUBLIC}\nkid: key-b\n{B_PUBLIC}"),
    );
    let gw = es256_gateway(&file);
    assert_eq!(
        try_upgrade(gw.addr, &es_token(A_PRIVATE, Some("key-a"), "u-a")).0,
        101
    );
    assert_eq!(
        try_upgrade(gw.addr, &es_token(B_PRIVATE, Some("key-b"), "u-b")).0,
        101
    );
    // The kid names the other key: its signature does not verify.
    let (status, why) = try_upgrade(gw.addr, &es_token(B_PRIVATE, Some("key-a"), "u-x"));
    assert_eq!(
        (status, why.as_str()),
        (401, "invalid_token: bad signature")
    );
    let (status, why) = try_upgrade(gw.addr, &es_token(A_PRIVATE, Some("key-c"), "u-x"));
    assert_eq!((status, why.as_str()), (401, "invalid_token: unknown kid"));
    // No kid with several keys: refused, never tried against each key.
    let (status, why) = try_upgrade(gw.addr, &es_token(A_PRIVATE, None, "u-x"));
    assert_eq!(
        (status, why.as_str()),
        (
            401,
            "invalid_token: kid required: several keys are configured"
        )
    );
    let _ = std::fs::remove_file(file);
    log_capture::assert_clean();
}

#[test]
fn a_single_unlabelled_key_still_accepts_any_kid() {
    let file = temp_file("single.pem", A_PUBLIC);
    let gw = es256_gateway(&file);
    assert_eq!(
        try_upgrade(gw.addr, &es_token(A_PRIVATE, None, "u1")).0,
        101
    );
    assert_eq!(
        try_upgrade(gw.addr, &es_token(A_PRIVATE, Some("any"), "u1")).0,
        101
    );
    assert_eq!(
        try_upgrade(gw.addr, &es_token(B_PRIVATE, None, "u1")).0,
        401
    );
    let _ = std::fs::remove_file(file);
}

/// A JWKS document as identity providers publish it: the two signing keys with their
/// kids, plus keys that are not for ES256 signing (skipped).
fn jwks(with_b: bool) -> String {
    let jwk = |private: &str, kid: &str| -> Value {
        let key = EncodingKey::from_ec_pem(private.as_bytes()).expect("EC private key");
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).expect("jwk");
        jwk.common.key_id = Some(kid.to_owned());
        serde_json::to_value(jwk).expect("jwk json")
    };
    let mut keys = vec![jwk(A_PRIVATE, "jwks-a")];
    if with_b {
        keys.push(jwk(B_PRIVATE, "jwks-b"));
    }
    // An encryption key and a key for another algorithm: skipped, not an error.
    let mut enc = jwk(B_PRIVATE, "enc-key");
    enc["use"] = json!("enc");
    keys.push(enc);
    let mut other = jwk(B_PRIVATE, "rs-key");
    other["alg"] = json!("RS256");
    keys.push(other);
    let set: JwkSet = serde_json::from_value(json!({ "keys": keys })).expect("a JwkSet");
    serde_json::to_string_pretty(&set).expect("jwks text")
}

#[test]
fn a_jwks_file_picks_the_key_by_kid_and_skips_keys_not_for_signing() {
    let file = temp_file("keys.jwks", &jwks(true));
    let gw = es256_gateway(&file);
    assert_eq!(
        try_upgrade(gw.addr, &es_token(A_PRIVATE, Some("jwks-a"), "j1")).0,
        101
    );
    assert_eq!(
        try_upgrade(gw.addr, &es_token(B_PRIVATE, Some("jwks-b"), "j2")).0,
        101
    );
    let (status, why) = try_upgrade(gw.addr, &es_token(B_PRIVATE, Some("enc-key"), "j3"));
    assert_eq!((status, why.as_str()), (401, "invalid_token: unknown kid"));
    let (status, _) = try_upgrade(gw.addr, &es_token(B_PRIVATE, Some("jwks-a"), "j4"));
    assert_eq!(status, 401);
    let _ = std::fs::remove_file(file);
}

#[test]
fn a_key_file_with_no_usable_key_stops_the_start() {
    let file = temp_file("nothing.jwks", r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#);
    let cfg = agentwire::Config {
        jwt_algorithm: agentwire::JwtAlgorithm::Es256,
        jwt_secret: None,
        jwt_public_key_file: Some(file.clone()),
        ..config()
    };
    let err = agentwire::Gateway::new(cfg).err().expect("refused");
    assert!(
        err.to_string().contains("holds no ES256 signing key"),
        "{err}"
    );
    let _ = std::fs::remove_file(file);
}

/// The binary with `args` plus an ephemeral listen address, RUST_LOG=info.
fn binary(addr: SocketAddr, args: &[&str]) -> Spawned {
    let listen = addr.to_string();
    let mut all = vec![
        "serve",
        "--listen",
        listen.as_str(),
        "--demo-agent",
        "false",
    ];
    all.extend_from_slice(args);
    let p = Spawned::start(
        env!("CARGO_BIN_EXE_agentwire"),
        &all,
        &[("RUST_LOG", "info")],
    );
    wait_healthy(addr, &p);
    p
}

#[test]
fn sighup_reloads_the_key_file_keeps_sessions_and_keeps_old_keys_on_a_bad_file() {
    let file = temp_file("reload.pem", &format!("kid: old\n{A_PUBLIC}"));
    let addr = free_addr();
    let key_file = file.to_str().expect("utf-8 path");
    let p = binary(
        addr,
        &[
            "--jwt-algorithm",
            "ES256",
            "--jwt-public-key-file",
            key_file,
        ],
    );
    let old_token = es_token(A_PRIVATE, Some("old"), "rotating-user");
    let new_token = es_token(B_PRIVATE, Some("new"), "rotating-user");
    let mut kept = connect_with(
        addr,
        "/ws",
        &[("Authorization", &format!("Bearer {old_token}"))],
    )
    .expect("old key accepted before the reload");
    assert_eq!(try_upgrade(addr, &new_token).0, 401);

    // Rotate: the new key only.
    std::fs::write(&file, format!("kid: new\n{B_PUBLIC}")).expect("rewrite key file");
    p.signal(libc::SIGHUP);
    let done = p.wait_line_n("SIGHUP reload done", 1);
    assert!(done.contains("keys [new]"), "{done}");
    assert_eq!(try_upgrade(addr, &new_token).0, 101);
    let (status, why) = try_upgrade(addr, &old_token);
    assert_eq!((status, why.as_str()), (401, "invalid_token: unknown kid"));
    // The session opened with the old key is still served.
    kept.ping_pong();

    // A bad file: the reload fails, the new key stays in force.
    std::fs::write(
        &file,
        "kid: broken\n-----BEGIN PUBLIC KEY-----\nnot base64\n",
    )
    .expect("rewrite key file");
    p.signal(libc::SIGHUP);
    let failed = p.wait_line_n("SIGHUP reload failed", 1);
    assert!(failed.contains("are kept"), "{failed}");
    assert_eq!(try_upgrade(addr, &new_token).0, 101);
    // A missing file: the same.
    std::fs::remove_file(&file).expect("remove key file");
    p.signal(libc::SIGHUP);
    p.wait_line_n("SIGHUP reload failed", 2);
    assert_eq!(try_upgrade(addr, &new_token).0, 101);
    kept.ping_pong();
    assert_eq!(p.count_lines("SIGHUP reload done"), 1);
    let (_, stats) = get_json(addr, "/ws/stats");
    assert_eq!(stats["reload"], json!({"done": 1, "failed": 2}), "{stats}");
    let leaks = log_capture::violations_in(&p.lines());
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[test]
fn sighup_rereads_the_config_file_for_the_secret_and_allowed_origins() {
    const NEW_SECRET: &str = "a-rotated-secret-0123456789abcdef-xyz";
    let toml = |secret: &str, origin: &str| {
        format!("jwt_secret = \"{secret}\"\nallowed_origins = [\"{origin}\"]\n")
    };
    let file = temp_file("reload.toml", &toml(SECRET, "https://a.example"));
    let addr = free_addr();
    let p = binary(addr, &["--config", file.to_str().expect("utf-8 path")]);
    let origin_up = |origin: &str, t: &str| {
        let r = upgrade(addr, "/ws", &[bearer(t), format!("Origin: {origin}")]);
        r.status
    };
    let old = token("origin-user");
    let new = token_alg(
        Algorithm::HS256,
        NEW_SECRET,
        &json!({"sub": "origin-user", "exp": now_s() + 3600}),
    );
    let mut kept = connect_with(
        addr,
        "/ws",
        &[
            ("Authorization", &format!("Bearer {old}")),
            ("Origin", "https://a.example"),
        ],
    )
    .expect("allowed origin, current secret");
    assert_eq!(origin_up("https://b.example", &old), 403);

    std::fs::write(
        &file,
        toml(NEW_SECRET, "https://b.example") + "max_connections = 77\n",
    )
    .expect("rewrite config");
    p.signal(libc::SIGHUP);
    p.wait_line_n("SIGHUP reload done", 1);
    let ignored = p.wait_line_n("only a restart applies", 1);
    assert!(ignored.contains("max_connections"), "{ignored}");
    assert_eq!(origin_up("https://a.example", &new), 403);
    assert_eq!(origin_up("https://b.example", &old), 401);
    let c = connect_with(
        addr,
        "/ws",
        &[
            ("Authorization", &format!("Bearer {new}")),
            ("Origin", "https://b.example"),
        ],
    )
    .expect("new origin, new secret");
    c.close();
    kept.ping_pong();
    // /ws/config shows the origins in force, not the secret.
    let (_, cfg) = get_json(addr, "/ws/config");
    assert_eq!(cfg["allowed_origins"], json!(["https://b.example"]));
    assert_eq!(cfg["max_connections"], json!(10000));
    assert!(!cfg.to_string().contains(NEW_SECRET));

    // A config file that no longer parses: everything in force is kept.
    std::fs::write(&file, "jwt_secret = \n").expect("rewrite config");
    p.signal(libc::SIGHUP);
    p.wait_line_n("SIGHUP reload failed", 1);
    assert_eq!(origin_up("https://a.example", &new), 403);
    let c = connect_with(
        addr,
        "/ws",
        &[
            ("Authorization", &format!("Bearer {new}")),
            ("Origin", "https://b.example"),
        ],
    )
    .expect("still the new secret and origin");
    c.close();
    let _ = std::fs::remove_file(file);
    let leaks = log_capture::violations_in(&p.lines());
    assert!(leaks.is_empty(), "{leaks:?}");
    assert!(!p.lines().iter().any(|l| l.contains(NEW_SECRET)));
}
