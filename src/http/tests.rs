//! What the unit tests of every `http` file share: the request heads they build
//! ([`parse`], [`head`], [`upgrade_head`] with the RFC 6455 sample [`KEY`]), and the one
//! test of the whole chain, parse -> route -> upgrade -> response, on random and
//! truncated input.

use super::*;
use crate::origin;

/// The RFC 6455 sample `Sec-WebSocket-Key`.
pub(super) const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Its `Sec-WebSocket-Accept`.
pub(super) const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// The request of a complete head (the whole input).
pub(super) fn parse(head: &str) -> Request {
    match parse_head(head.as_bytes()) {
        Ok(Some((req, n))) => {
            assert_eq!(n, head.len(), "whole input is the head");
            req
        }
        other => panic!("expected a complete head, got {other:?}"),
    }
}

/// A valid upgrade head for `target` plus `extra` header lines.
pub(super) fn upgrade_head(target: &str, extra: &[&str]) -> String {
    let mut s = format!(
        "GET {target} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for line in extra {
        s.push_str(line);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s
}

/// A head built from explicit lines (no defaults).
pub(super) fn head(lines: &[&str]) -> String {
    let mut s = lines.join("\r\n");
    s.push_str("\r\n\r\n");
    s
}

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Everything downstream of a parse must hold up too.
fn exercise(buf: &[u8]) {
    match parse_head(buf) {
        Ok(None) => assert!(buf.len() < MAX_HEAD_BYTES),
        Ok(Some((req, n))) => {
            assert!(n > 0 && n <= buf.len() && n <= MAX_HEAD_BYTES);
            let r = Route::of(req.method, &req.path);
            let _ = keep_alive(&req);
            let _ = format!("{req:?}");
            for allow in [true, false] {
                match check_upgrade(&req, None, allow) {
                    Ok(u) => {
                        let _ = upgrade_response(&u.accept_key, u.subprotocol);
                        let _ = origin::allowed(u.origin.as_deref(), &["x".to_owned()]);
                    }
                    Err(refusal) => assert!(!refusal.to_response().is_empty()),
                }
            }
            if let Route::WebSocket(m) = r {
                let _ = check_upgrade(&req, m, true);
            }
            let _ = method_not_allowed_response(&req.path, true);
        }
        Err(r) => {
            assert!(r.status == 400 || r.status == 431, "{r:?}");
            assert!(!r.to_response().is_empty());
        }
    }
}

#[test]
fn random_and_truncated_input_never_panics() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let pieces: &[&[u8]] = &[
        b"GET",
        b"HEAD",
        b"POST",
        b" ",
        b"  ",
        b"/",
        b"/ws",
        b"/ws/factory",
        b"/websocket",
        b"?",
        b"&",
        b"=",
        b"#",
        b"%",
        b"%4",
        b"%41",
        b"%zz",
        b"%ff",
        b"+",
        b"*",
        b"http://",
        b"h:1",
        b"mode=",
        b"isolated",
        b"last_seq=",
        b"18446744073709551616",
        b"thread_id=",
        b"token=",
        b"connection_scope=true",
        b" HTTP/1.1",
        b" HTTP/1.0",
        b"\r\n",
        b"\n",
        b"\r",
        b"\r\n\r\n",
        b":",
        b": ",
        b",",
        b"\t",
        b"\x00",
        b"\x7f",
        b"\x80",
        b"\xff",
        b"\xc3\xa9",
        b"Host: x",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Connection: close",
        b"Sec-WebSocket-Version: 13",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Protocol: ",
        b"agentwire.v1, bearer.x",
        b"Authorization: Bearer ",
        b"Content-Length: ",
        b"Transfer-Encoding: chunked",
        b"Origin: ",
        b"0",
        b"99999999999999999999",
    ];
    let seeds = [
        upgrade_head(
            "/ws?mode=isolated&last_seq=3&token=t",
            &["Origin: o", "Authorization: Bearer a"],
        ),
        head(&[
            "POST /api/events HTTP/1.1",
            "Content-Length: 2",
            "Transfer-Encoding: chunked",
        ]),
        head(&[
            "GET http://h/ws/stats?x=%41 HTTP/1.0",
            "Connection: keep-alive",
        ]),
    ];
    for _ in 0..4000 {
        // Random bytes.
        let len = rng.below(200);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        exercise(&bytes);
        // Random HTTP-ish token soup.
        let mut soup = Vec::new();
        for _ in 0..rng.below(40) {
            soup.extend_from_slice(pieces[rng.below(pieces.len())]);
        }
        exercise(&soup);
        // A valid head, mutated and truncated.
        let mut seed = seeds[rng.below(seeds.len())].clone().into_bytes();
        for _ in 0..rng.below(4) {
            let at = rng.below(seed.len());
            seed[at] = rng.next() as u8;
        }
        let cut = rng.below(seed.len() + 1);
        exercise(&seed[..cut]);
        exercise(&seed);
    }
    for seed in &seeds {
        for cut in 0..=seed.len() {
            exercise(&seed.as_bytes()[..cut]);
        }
    }
}
