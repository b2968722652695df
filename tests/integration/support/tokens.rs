//! JWT minting for tests, good and bad: [`token`], [`token_with`], [`token_alg`],
//! [`token_alg_none`], forged headers and signatures.

#![allow(dead_code)] // each test module uses its own subset

use super::*;

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// A valid HS256 token for `sub`, expiring in an hour.
pub fn token(sub: &str) -> String {
    token_with(&json!({ "sub": sub, "exp": now_s() + 3600 }))
}

/// An HS256 token with [`SECRET`] and exactly these claims.
pub fn token_with(claims: &Value) -> String {
    token_alg(Algorithm::HS256, SECRET, claims)
}

/// A token signed with an HMAC algorithm and secret of the caller's choice.
pub fn token_alg(alg: Algorithm, secret: &str, claims: &Value) -> String {
    token_header(&Header::new(alg), secret, claims)
}

/// A token with this exact JOSE header, HMAC-signed with `secret` (the header's `alg`
/// picks the HMAC; see [`token_forged`] for a header that lies about it).
pub fn token_header(header: &Header, secret: &str, claims: &Value) -> String {
    let t = jsonwebtoken::encode(header, claims, &EncodingKey::from_secret(secret.as_bytes()))
        .expect("token encodes");
    log_capture::register_secret(&t);
    t
}

/// An unsigned token: header `{"alg":"none","typ":"JWT"}`, these claims, and an
/// empty signature, built by hand (jsonwebtoken refuses to make one).
pub fn token_alg_none(claims: &Value) -> String {
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64url(claims.to_string().as_bytes());
    let t = format!("{header}.{payload}.");
    log_capture::register_secret(&t);
    t
}

/// A token whose header is `header_json` verbatim, signed HMAC-SHA256 with `secret`
/// whatever the header claims (alg confusion: `{"alg":"RS256"}` with an HMAC signature,
/// `kid` and `jku` tricks). Registered with [`log_capture`].
pub fn token_forged(header_json: &str, secret: &[u8], claims: &Value) -> String {
    let signing_input = format!(
        "{}.{}",
        b64url(header_json.as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let sig = jsonwebtoken::crypto::sign(
        signing_input.as_bytes(),
        &EncodingKey::from_secret(secret),
        Algorithm::HS256,
    )
    .expect("HMAC signs");
    let t = format!("{signing_input}.{sig}");
    log_capture::register_secret(&t);
    t
}

/// Unpadded base64url (RFC 4648 section 5).
pub fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let symbols = chunk.len() + 1;
        for i in 0..symbols {
            let index = (n >> (18 - 6 * i)) & 0x3f;
            out.push(char::from(ALPHABET[index as usize]));
        }
    }
    out
}
