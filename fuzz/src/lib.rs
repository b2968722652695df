//! Shared pieces of the agentwire fuzz targets: the fixed HS256 secret and the tokens
//! signed with it (valid until 2100, so committed seeds stay valid), the authenticator
//! built from them, the checks every plain HTTP answer must pass, and the split of a
//! text frame the gateway built.
//!
//! The tokens were made once with a few lines of Python (`hmac` over the base64url
//! header and claims); [`authenticator`] checks at start that the two valid ones verify
//! and the others do not, so a stale constant fails loudly instead of making the
//! "accepted" branch unreachable.

use std::sync::OnceLock;

use agentwire::{AuthSettings, Authenticator, Claims, JwtAlgorithm};

/// The HS256 secret of every target.
pub const SECRET: &str = "agentwire-fuzz-fixed-secret-0123456789";
/// `exp` of the valid tokens: 2100-01-01T00:00:00Z.
pub const EXP: u64 = 4_102_444_800;
/// The `sub` of [`TOKEN`].
pub const SUB: &str = "fuzz-user";
/// The `sub` of [`TOKEN_OTHER`].
pub const OTHER_SUB: &str = "other-user";

/// `{"sub":"fuzz-user","exp":EXP}`, HS256 with [`SECRET`]: verifies.
pub const TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJmdXp6LXVzZXIiLCJleHAiOjQxMDI0NDQ4MDB9.tL2sQQ1IvmsC8FCWfYWifArCTBlJt2gBcq6trSK20oE";
/// `{"sub":"other-user","exp":EXP}`, HS256 with [`SECRET`]: verifies (another user).
pub const TOKEN_OTHER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJvdGhlci11c2VyIiwiZXhwIjo0MTAyNDQ0ODAwfQ.VaEGRm0vpQsb-lBPT3xDiphTkdTcPu3Dt4jrvjOry28";

/// Tokens that must never verify: expired, not yet valid, another key, another
/// algorithm, `alg: none`, no `sub`, empty `sub`, no `exp`, string `exp`, `crit`.
pub const BAD_TOKENS: [&str; 10] = [
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJmdXp6LXVzZXIiLCJleHAiOjEwMDAwMDAwMDB9.SKnARrMmWavMEraTZk5lXmH1KPXdoXYNjkKObCorp6M",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJmdXp6LXVzZXIiLCJleHAiOjQxMDI0NDQ4MDAsIm5iZiI6NDEwMjQ0NDc5MH0.vay7MMMSRZU7HhtimACKaQbwFJJuE4TFiEQIPn4TvFo",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJmdXp6LXVzZXIiLCJleHAiOjQxMDI0NDQ4MDB9.9CXD8Z6VVfPrf_D15C0pgvDtaZJ_c-6O2p9H6VOSdXw",
    "eyJhbGciOiJIUzM4NCIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJmdXp6LXVzZXIiLCJleHAiOjQxMDI0NDQ4MDB9.pUqw2enqOk1B26gjsTxGt8NUKojxSHNNvMkQ07SUraqu33hjU_N-Y27rUhiJCvSo",
    "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJmdXp6LXVzZXIiLCJleHAiOjQxMDI0NDQ4MDB9.",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjQxMDI0NDQ4MDB9.s39anERJhUY5ani9plYxImyEiTn1ztXKHYoLoaJmoac",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIiLCJleHAiOjQxMDI0NDQ4MDB9.kdz-P0cORKrxj4Q6W05y0yH-4uCbeXdRmrRnIwWlegI",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJmdXp6LXVzZXIifQ.sv4jCfd_CCX1pJ6yzp8PKVXdC7z0ZHtpHp1JAMfBgFE",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJmdXp6LXVzZXIiLCJleHAiOiI0MTAyNDQ0ODAwIn0.jy5CBw2MavPrKtHW0E2SFQ5vONxUgmu5bszQ38V3EZs",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCIsImNyaXQiOlsieCJdLCJ4IjoxfQ.eyJzdWIiOiJmdXp6LXVzZXIiLCJleHAiOjQxMDI0NDQ4MDB9.GBIgQ7UQlqy0cPkXXEaRJNEOulzwqQWl3c5J4HutLbM",
];

/// The statuses a plain HTTP answer of the gateway may carry (docs/PROTOCOL.md
/// sections 3 and 6, plus 405 for a known path with the wrong method).
pub const CONTRACT_STATUSES: [u16; 13] = [
    101, 200, 202, 400, 401, 403, 404, 405, 413, 426, 429, 431, 503,
];

fn settings() -> AuthSettings {
    AuthSettings {
        algorithm: JwtAlgorithm::Hs256,
        secret: Some(SECRET.to_owned()),
        public_key_pem: None,
        issuer: None,
        audience: None,
        leeway_s: 5,
    }
}

/// The authenticator of the targets (HS256, [`SECRET`], leeway 5 s), built once.
///
/// # Panics
/// When the fixed tokens do not behave as documented (a broken harness, not a finding).
pub fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        let auth = Authenticator::new(&settings()).expect("fixed fuzz secret is accepted");
        for (token, sub) in [(TOKEN, SUB), (TOKEN_OTHER, OTHER_SUB)] {
            let claims = auth.verify(token).expect("fixed valid token verifies");
            assert_eq!(claims, expected_claims(sub));
        }
        for token in BAD_TOKENS {
            assert!(auth.verify(token).is_err(), "a bad fixed token verified");
        }
        auth
    })
}

/// A second authenticator, built separately: the oracle that re-checks what the
/// gateway accepted.
pub fn oracle() -> &'static Authenticator {
    static ORACLE: OnceLock<Authenticator> = OnceLock::new();
    ORACLE.get_or_init(|| Authenticator::new(&settings()).expect("fixed fuzz secret"))
}

/// The claims a fixed valid token carries.
pub fn expected_claims(sub: &str) -> Claims {
    Claims {
        sub: agentwire::__internal::ids::UserId::parse(sub).expect("a fixed valid sub"),
        exp: EXP,
    }
}

/// The `error` code a refusal with `status` must carry (docs/PROTOCOL.md section 3).
pub fn refusal_code(status: u16) -> Option<&'static str> {
    Some(match status {
        400 => "bad_request",
        401 => "invalid_token",
        403 => "forbidden",
        404 => "not_found",
        426 => "upgrade_required",
        429 => "too_many_connections",
        431 => "headers_too_large",
        503 => "shutting_down",
        _ => return None,
    })
}

/// Check a complete plain HTTP answer: it parses as one HTTP/1.1 response with
/// `status`, its `Content-Length` is the body's length (`head_only`: no body), and a
/// JSON body is an object. Returns the body.
///
/// # Panics
/// On any violation (that is the finding).
pub fn check_response(resp: &[u8], status: u16, head_only: bool) -> &[u8] {
    assert!(
        CONTRACT_STATUSES.contains(&status),
        "status {status} outside the contract"
    );
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(resp) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!(
            "unparsable response {other:?}: {:?}",
            String::from_utf8_lossy(resp)
        ),
    };
    assert_eq!(parsed.version, Some(1));
    assert_eq!(parsed.code, Some(status));
    let body = &resp[head_len..];
    let length = parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .expect("numeric Content-Length")
        });
    if status != 101 {
        let length = length.expect("a plain answer carries Content-Length");
        if head_only {
            assert!(body.is_empty(), "HEAD answer with a body");
        } else {
            assert_eq!(length, body.len(), "Content-Length is not the body length");
        }
    }
    let json = parsed
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("content-type") && h.value == b"application/json");
    if json && !body.is_empty() {
        let v: serde_json::Value = serde_json::from_slice(body).expect("JSON body parses");
        assert!(v.is_object(), "JSON body is not an object");
    }
    body
}

/// Check a refusal's answer: contract status, matching `error` code, and a message
/// that never carries a secret (no fixed token's signature appears in it).
///
/// # Panics
/// On any violation.
pub fn check_refusal(refusal: &agentwire::__internal::http::Refusal) {
    let code = refusal_code(refusal.status)
        .unwrap_or_else(|| panic!("refusal status {} outside the contract", refusal.status));
    assert_eq!(
        refusal.code.as_str(),
        code,
        "status {} with code {}",
        refusal.status, refusal.code
    );
    for token in BAD_TOKENS.iter().chain(&[TOKEN, TOKEN_OTHER]) {
        if let Some(sig) = token.rsplit('.').next().filter(|s| s.len() > 8) {
            assert!(
                !refusal.message.contains(sig),
                "refusal message echoes a token"
            );
        }
    }
    let resp = refusal.to_response();
    let body = check_response(&resp, refusal.status, false);
    let v: serde_json::Value = serde_json::from_slice(body).expect("refusal body is JSON");
    assert_eq!(v["error"], code);
    assert_eq!(v["message"], refusal.message.as_str());
    let head = refusal.response(true);
    check_response(&head, refusal.status, true);
}

/// Split one server-to-client frame the gateway built: asserts it is a FIN text frame,
/// unmasked, whose length field matches the bytes; returns the header's length (2, 4
/// or 10, telling which length form was used) and the payload.
pub fn text_frame_payload(frame: &[u8]) -> (usize, &[u8]) {
    assert_eq!(frame[0], 0x81, "not a FIN text frame");
    assert_eq!(frame[1] & 0x80, 0, "server frames are not masked");
    let (len, start) = match frame[1] & 0x7f {
        126 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
        127 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&frame[2..10]);
            (usize::try_from(u64::from_be_bytes(b)).expect("fits"), 10)
        }
        n => (usize::from(n), 2),
    };
    assert_eq!(frame.len(), start + len, "frame length field is wrong");
    (start, &frame[start..])
}
