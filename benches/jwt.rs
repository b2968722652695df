//! Token verification as the gateway does it at every upgrade and `refresh`:
//! [`Authenticator::verify`] (shape check, signature with the pinned algorithm through
//! jsonwebtoken's aws-lc backend, then `exp`/`nbf`/`sub`), for HS256, RS256 (2048-bit)
//! and ES256 (P-256), each with a valid token and with a token whose signature is wrong.
//!
//! The RS256 and ES256 keys are the test-only keys of src/auth.rs's unit tests, committed
//! as benches/keys/*.pem.

use std::hint::black_box;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentwire::AuthSettings;
use agentwire::{Authenticator, JwtAlgorithm};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

const SECRET: &str = "bench-secret-0123456789abcdef0123456789abcdef0123456789abcdef";
const RSA_PRIVATE_PEM: &str = include_str!("keys/rsa_private.pem");
const RSA_PUBLIC_PEM: &str = include_str!("keys/rsa_public.pem");
const EC_PRIVATE_PEM: &str = include_str!("keys/ec_private.pem");
const EC_PUBLIC_PEM: &str = include_str!("keys/ec_public.pem");

/// One algorithm's authenticator and its two tokens.
struct Case {
    name: &'static str,
    auth: Authenticator,
    valid: String,
    bad_signature: String,
}

fn settings(algorithm: JwtAlgorithm, public_key_pem: Option<&str>) -> AuthSettings {
    AuthSettings {
        algorithm,
        secret: Some(SECRET.to_owned()),
        public_key_pem: public_key_pem.map(|p| p.as_bytes().to_vec()),
        issuer: None,
        audience: None,
        leeway_s: 5,
    }
}

/// A token like the ones browsers hold: `sub`, an hour of `exp`, `iat`.
fn token(alg: Algorithm, key: &EncodingKey) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let claims = json!({"sub": "user-7f3a2c91", "exp": now + 3600, "iat": now});
    encode(&Header::new(alg), &claims, key).expect("signing")
}

/// The same token with one signature character changed (still valid base64url, same
/// length, so only the signature check can refuse it).
fn tamper(token: &str) -> String {
    let sig_start = token.rfind('.').expect("three parts") + 1;
    let mut bytes = token.as_bytes().to_vec();
    let at = sig_start + 2;
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).expect("ascii")
}

fn cases() -> Vec<Case> {
    let hs = EncodingKey::from_secret(SECRET.as_bytes());
    let rs = EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).expect("RSA test key");
    let es = EncodingKey::from_ec_pem(EC_PRIVATE_PEM.as_bytes()).expect("EC test key");
    [
        ("HS256", JwtAlgorithm::Hs256, None, Algorithm::HS256, hs),
        (
            "RS256",
            JwtAlgorithm::Rs256,
            Some(RSA_PUBLIC_PEM),
            Algorithm::RS256,
            rs,
        ),
        (
            "ES256",
            JwtAlgorithm::Es256,
            Some(EC_PUBLIC_PEM),
            Algorithm::ES256,
            es,
        ),
    ]
    .into_iter()
    .map(|(name, algorithm, public, alg, key)| {
        let auth = Authenticator::new(&settings(algorithm, public)).expect("authenticator");
        let valid = token(alg, &key);
        let bad_signature = tamper(&valid);
        // The two tokens do what they are here for.
        assert_eq!(
            auth.verify(&valid).expect("valid token verifies").sub,
            "user-7f3a2c91"
        );
        assert!(
            auth.verify(&bad_signature).is_err(),
            "{name}: tampered token accepted"
        );
        Case {
            name,
            auth,
            valid,
            bad_signature,
        }
    })
    .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("jwt_verify");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(1));
    for case in cases() {
        group.bench_function(BenchmarkId::new(case.name, "valid"), |b| {
            b.iter(|| case.auth.verify(black_box(&case.valid)))
        });
        group.bench_function(BenchmarkId::new(case.name, "bad_signature"), |b| {
            b.iter(|| case.auth.verify(black_box(&case.bad_signature)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
