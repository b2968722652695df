//! Fuzz target `http_head`: bytes -> the gateway's request-head parser, router and
//! upgrade admission (`agentwire::__internal::http`), the way the reactor chains them: parse a head,
//! route it, answer a plain request (keep-alive requests are pipelined, up to 8), or
//! admit an upgrade with a real HS256 authenticator (`http::admit_upgrade`).
//!
//! Asserted:
//! - an upgrade is never accepted without a token that verifies: an accepted one carries
//!   a token that a separately built authenticator verifies to the same claims, which
//!   are those of one of the two validly signed fixed tokens; the token sits where its
//!   source says; a query token only when query tokens are allowed; `user_id`, when
//!   given, equals `sub`; the Origin is on the allow-list when one is set;
//! - every answer (refusal, 404, 405, the 101) parses as one HTTP response with a status
//!   from the contract set, the matching `error` code, a correct `Content-Length`, and
//!   no token in a refusal message or a `Debug` rendering;
//! - no panic.
//!
//! Input: the first byte picks the setup (bit 0: raw bytes or a structured request
//! built with `arbitrary` around a valid upgrade; bit 1: query tokens off; bit 2: an
//! Origin allow-list), the rest is the request.

#![no_main]

use agentwire::__internal::http::{self, Method, Request, Route, TokenSource, MAX_HEAD_BYTES};
use agentwire::__internal::mode::Mode;
use agentwire_fuzz::{self as common, OTHER_SUB, SUB, TOKEN, TOKEN_OTHER};
use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;

const ALLOWED_ORIGIN: &str = "https://app.example";
/// Requests answered on one connection before the target stops (the reactor has no
/// such limit; this keeps one input's work bounded).
const MAX_PIPELINED: usize = 8;

struct Setup {
    allow_query_token: bool,
    origins: Vec<String>,
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let setup = Setup {
        allow_query_token: flags & 2 == 0,
        origins: if flags & 4 == 0 {
            Vec::new()
        } else {
            vec![ALLOWED_ORIGIN.to_owned()]
        },
    };
    if flags & 1 == 0 {
        serve(rest, &setup);
    } else if let Ok(spec) = Spec::arbitrary_take_rest(Unstructured::new(rest)) {
        serve(&spec.render(), &setup);
    }
});

/// What the reactor's `process_http` does with the bytes of one connection, minus
/// I/O, publish bodies (target `publish_body`) and gateway state (limits, draining).
fn serve(mut buf: &[u8], setup: &Setup) {
    for _ in 0..MAX_PIPELINED {
        let (req, head_len) = match http::parse_head(buf) {
            Ok(None) => {
                assert!(
                    buf.len() < MAX_HEAD_BYTES,
                    "incomplete at {} bytes",
                    buf.len()
                );
                return;
            }
            Err(refusal) => {
                assert!(matches!(refusal.status, 400 | 431), "{refusal:?}");
                common::check_refusal(&refusal);
                return;
            }
            Ok(Some(done)) => done,
        };
        assert!(head_len > 0 && head_len <= buf.len() && head_len <= MAX_HEAD_BYTES);
        assert!(req.http_minor <= 1);
        assert_no_token(&format!("{req:?}"));
        let head_only = req.method == Method::Head;
        match Route::of(req.method, &req.path) {
            Route::WebSocket(path_mode) => {
                assert!(matches!(req.method, Method::Get | Method::Head));
                upgrade(&req, path_mode, setup);
                return;
            }
            Route::Publish | Route::DevToken | Route::Disconnect => {
                assert_eq!(req.method, Method::Post);
                return;
            }
            Route::Demo(_) => {
                assert!(matches!(req.method, Method::Get | Method::Head));
                return;
            }
            Route::MethodNotAllowed => {
                assert!(http::allowed_methods(&req.path).is_some());
                let resp = http::method_not_allowed_response(&req.path, head_only);
                common::check_response(&resp, 405, head_only);
                return;
            }
            Route::NotFound => {
                assert!(http::allowed_methods(&req.path).is_none());
                common::check_refusal(&http::Refusal::not_found());
                return;
            }
            Route::Health | Route::Config | Route::Stats | Route::Metrics => {
                assert!(matches!(req.method, Method::Get | Method::Head));
                let resp = http::json_response(200, b"{}", false, head_only, &[]);
                common::check_response(&resp, 200, head_only);
                if req.content_length.unwrap_or(0) > 0 || req.chunked || !http::keep_alive(&req) {
                    return;
                }
                buf = &buf[head_len..];
            }
        }
    }
}

fn upgrade(req: &Request, path_mode: Option<Mode>, setup: &Setup) {
    let admitted = http::admit_upgrade(
        req,
        path_mode,
        setup.allow_query_token,
        &setup.origins,
        common::authenticator(),
    );
    let (up, claims) = match admitted {
        Err(refusal) => {
            assert!(
                matches!(refusal.status, 400 | 401 | 403 | 426),
                "{refusal:?}"
            );
            common::check_refusal(&refusal);
            return;
        }
        Ok(admitted) => admitted,
    };
    // The property: accepted => a token that verifies, found where the source says.
    let (token, source) = up.token.as_ref().expect("upgrade accepted without a token");
    let again = common::oracle()
        .verify(token)
        .expect("upgrade accepted with a token the oracle refuses");
    assert_eq!(again, claims);
    assert!(
        claims == common::expected_claims(SUB) || claims == common::expected_claims(OTHER_SUB),
        "accepted claims {claims:?} of no validly signed token"
    );
    match source {
        TokenSource::Header => assert!(req
            .header("authorization")
            .is_some_and(|v| v.ends_with(token.as_str()))),
        TokenSource::Subprotocol => {
            assert!(up.subprotocol);
            assert!(req
                .header_tokens("sec-websocket-protocol")
                .any(|p| p.strip_prefix("bearer.") == Some(token.as_str())));
        }
        TokenSource::Query => {
            assert!(
                setup.allow_query_token,
                "query token used while switched off"
            );
            assert_eq!(req.query_param("token"), Some(token.as_str()));
        }
    }
    if let Some(uid) = &up.user_id {
        assert_eq!(*uid, claims.sub, "user_id other than sub accepted");
    }
    if !setup.origins.is_empty() {
        if let Some(origin) = &up.origin {
            // Origins compare ASCII case-insensitively (RFC 6454; docs/PROTOCOL.md).
            assert!(
                setup.origins.iter().any(|a| a.eq_ignore_ascii_case(origin)),
                "origin not on the list accepted"
            );
        }
    }
    assert_eq!(req.method, Method::Get);
    assert_eq!(req.http_minor, 1);
    assert!(req.content_length.unwrap_or(0) == 0 && !req.chunked);
    let key = req
        .header("sec-websocket-key")
        .expect("accepted without a key");
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    assert_eq!(up.accept_key, accept);
    let resp = http::upgrade_response(&up.accept_key, up.subprotocol);
    common::check_response(&resp, 101, false);
    let text = String::from_utf8(resp).expect("101 is ASCII");
    assert!(text.contains(&format!("\r\nSec-WebSocket-Accept: {accept}\r\n")));
    assert_eq!(
        text.contains("\r\nSec-WebSocket-Protocol: agentwire.v1\r\n"),
        up.subprotocol
    );
    assert_no_token(&format!("{up:?}"));
}

/// Logs print `Debug` renderings: no valid token may appear in one.
fn assert_no_token(rendered: &str) {
    for token in [TOKEN, TOKEN_OTHER] {
        let sig = token.rsplit('.').next().unwrap_or(token);
        assert!(!rendered.contains(sig), "Debug output carries a token");
    }
}

// ------------------------------------------------------------ structured requests

const METHODS: [&str; 6] = ["GET", "GET", "GET", "HEAD", "POST", "PUT"];
const PATHS: [&str; 16] = [
    "/ws",
    "/ws/",
    "/ws/factory",
    "/ws/isolated",
    "/websocket",
    "/health",
    "/ws/health",
    "/ws/config",
    "/ws/stats",
    "/metrics",
    "/api/events",
    "/nope",
    "*",
    "http://h:1/ws",
    "/ws#frag",
    "/w%73",
];
const HEADER_NAMES: [&str; 12] = [
    "Host",
    "Upgrade",
    "Connection",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Protocol",
    "Authorization",
    "Origin",
    "Content-Length",
    "Transfer-Encoding",
    "X-Other",
    "authorization",
];
const QUERY_NAMES: [&str; 8] = [
    "mode",
    "connection_scope",
    "thread_id",
    "last_seq",
    "epoch",
    "user_id",
    "token",
    "cache",
];
const WORDS: [&str; 28] = [
    "websocket",
    "Upgrade",
    "keep-alive, Upgrade",
    "close",
    "13",
    "8",
    "dGhlIHNhbXBsZSBub25jZQ==",
    "dGhlIHNhbXBsZSBub25jZR==",
    "main",
    "factory",
    "legacy",
    "isolated",
    "true",
    "1",
    "0",
    "false",
    "https://app.example",
    "https://app.example.evil",
    "null",
    SUB,
    OTHER_SUB,
    "agentwire.v1",
    "chunked",
    "18446744073709551616",
    "",
    " ",
    "t1",
    "%00",
];

/// A token to place in a request.
#[derive(Arbitrary, Debug)]
enum TokenPick {
    Valid,
    Other,
    Bad(u8),
    /// The valid token with one byte replaced.
    Flip {
        at: u8,
        to: u8,
    },
    /// A prefix of the valid token.
    Cut(u8),
    /// The valid token with text appended.
    Append(String),
    Raw(String),
}

impl TokenPick {
    fn render(&self) -> String {
        match self {
            TokenPick::Valid => TOKEN.to_owned(),
            TokenPick::Other => TOKEN_OTHER.to_owned(),
            TokenPick::Bad(i) => {
                common::BAD_TOKENS[usize::from(*i) % common::BAD_TOKENS.len()].to_owned()
            }
            TokenPick::Flip { at, to } => {
                let mut bytes = TOKEN.as_bytes().to_vec();
                let at = usize::from(*at) % bytes.len();
                bytes[at] = *to;
                String::from_utf8_lossy(&bytes).into_owned()
            }
            TokenPick::Cut(n) => TOKEN[..usize::from(*n).min(TOKEN.len())].to_owned(),
            TokenPick::Append(s) => format!("{TOKEN}{s}"),
            TokenPick::Raw(s) => s.clone(),
        }
    }
}

/// Where a token goes.
#[derive(Arbitrary, Debug)]
enum Place {
    /// `Authorization: <scheme> <token>`; scheme 0 = `Bearer`.
    Authorization { scheme: u8 },
    /// `Sec-WebSocket-Protocol: [agentwire.v1, ]bearer.<token>`.
    Subprotocol { offer_v1: bool, v1_last: bool },
    /// `?token=<token>`.
    Query,
}

#[derive(Arbitrary, Debug)]
enum Value {
    Word(u8),
    Token(TokenPick),
    Text(String),
    Number(u64),
}

impl Value {
    fn render(&self) -> String {
        match self {
            Value::Word(i) => WORDS[usize::from(*i) % WORDS.len()].to_owned(),
            Value::Token(t) => t.render(),
            Value::Text(s) => s.clone(),
            Value::Number(n) => n.to_string(),
        }
    }
}

/// A request built around a valid upgrade of `fuzz-user` (`Authorization: Bearer`),
/// then changed: method, path, version, base headers left out, tokens placed,
/// headers and query parameters added, bytes flipped, cut, bytes pipelined after it.
#[derive(Arbitrary, Debug)]
struct Spec {
    method: u8,
    path: u8,
    http10: bool,
    /// Bit i leaves base header i out (Host, Upgrade, Connection, Version, Key,
    /// the default Authorization).
    drop_base: u8,
    tokens: Vec<(Place, TokenPick)>,
    query: Vec<(u8, Value, bool)>,
    headers: Vec<(u8, Value)>,
    flips: Vec<(u16, u8)>,
    cut: Option<u16>,
    pipelined: Vec<u8>,
}

impl Spec {
    fn render(&self) -> Vec<u8> {
        let method = METHODS[usize::from(self.method) % METHODS.len()];
        let path = PATHS[usize::from(self.path) % PATHS.len()];
        let mut query: Vec<String> = Vec::new();
        let mut headers: Vec<(String, String)> = Vec::new();
        let base = [
            ("Host", "gateway.test".to_owned()),
            ("Upgrade", "websocket".to_owned()),
            ("Connection", "Upgrade".to_owned()),
            ("Sec-WebSocket-Version", "13".to_owned()),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==".to_owned()),
            ("Authorization", format!("Bearer {TOKEN}")),
        ];
        for (i, (name, value)) in base.into_iter().enumerate() {
            if self.drop_base & (1 << i) == 0 {
                headers.push((name.to_owned(), value));
            }
        }
        for (place, pick) in &self.tokens {
            let token = pick.render();
            match place {
                Place::Authorization { scheme } => {
                    let scheme = ["Bearer", "bearer", "Basic", "Bearer "][usize::from(*scheme) % 4];
                    headers.push(("Authorization".to_owned(), format!("{scheme} {token}")));
                }
                Place::Subprotocol { offer_v1, v1_last } => {
                    let value = match (offer_v1, v1_last) {
                        (false, _) => format!("bearer.{token}"),
                        (true, false) => format!("agentwire.v1, bearer.{token}"),
                        (true, true) => format!("bearer.{token}, agentwire.v1"),
                    };
                    headers.push(("Sec-WebSocket-Protocol".to_owned(), value));
                }
                Place::Query => query.push(format!("token={token}")),
            }
        }
        for (name, value, encode) in &self.query {
            let name = QUERY_NAMES[usize::from(*name) % QUERY_NAMES.len()];
            let value = value.render();
            let value = if *encode {
                percent_encode(&value)
            } else {
                value
            };
            query.push(format!("{name}={value}"));
        }
        for (name, value) in &self.headers {
            let name = HEADER_NAMES[usize::from(*name) % HEADER_NAMES.len()];
            headers.push((name.to_owned(), value.render()));
        }
        let version = if self.http10 { "1.0" } else { "1.1" };
        let mut out = format!("{method} {path}");
        if !query.is_empty() {
            out.push(if path.contains('?') { '&' } else { '?' });
            out.push_str(&query.join("&"));
        }
        out.push_str(&format!(" HTTP/{version}\r\n"));
        for (name, value) in headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        for &(at, to) in &self.flips {
            let len = bytes.len();
            bytes[usize::from(at) % len] = to;
        }
        if let Some(cut) = self.cut {
            bytes.truncate(usize::from(cut));
        }
        bytes.extend_from_slice(&self.pipelined);
        bytes
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
