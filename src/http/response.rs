//! The bytes of every plain HTTP answer: status lines with their reason phrases, JSON
//! and text responses (`Content-Length` always, `Connection` as asked, headers that
//! would split the response left out), the 405 with its `Allow` header, the 101
//! Switching Protocols, and [`Refusal`], a typed refusal with its JSON response.

use std::io::Write as _;

use super::routes::allowed_methods;
use super::upgrade::SUBPROTOCOL;
use crate::frames::{self, ErrorBody, ErrorCode};

/// Content type of the Prometheus text exposition (`GET /metrics`).
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A refusal before the upgrade: a status and the JSON body
/// `{"error": code, "message": text}`. The message never contains client-supplied values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// The `error` code of PROTOCOL.md section 3.
    pub code: ErrorCode,
    /// Human-readable reason; safe to log and to send.
    pub message: String,
}

impl Refusal {
    fn new(status: u16, code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 `bad_request`: not a valid upgrade, a bad parameter, a malformed head.
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(400, ErrorCode::BadRequest, msg)
    }

    /// 401 `invalid_token`: the token is missing or does not verify.
    pub fn unauthorized(msg: impl Into<String>) -> Self {
        Self::new(401, ErrorCode::InvalidToken, msg)
    }

    /// 403 `forbidden`: `user_id` mismatch or Origin not allowed.
    pub fn forbidden(msg: impl Into<String>) -> Self {
        Self::new(403, ErrorCode::Forbidden, msg)
    }

    /// 404 `not_found`: unknown path (the path is not echoed).
    pub fn not_found() -> Self {
        Self::new(404, ErrorCode::NotFound, "unknown path")
    }

    /// 426 `upgrade_required`: `Sec-WebSocket-Version` is not 13; the response carries
    /// `Sec-WebSocket-Version: 13`.
    pub fn upgrade_required() -> Self {
        Self::new(
            426,
            ErrorCode::UpgradeRequired,
            "Sec-WebSocket-Version must be 13",
        )
    }

    /// 429 `too_many_connections`: a connection limit is reached.
    pub fn too_many(msg: impl Into<String>) -> Self {
        Self::new(429, ErrorCode::TooManyConnections, msg)
    }

    /// 431 `headers_too_large`: head over [`MAX_HEAD_BYTES`](super::MAX_HEAD_BYTES)
    /// or [`MAX_HEADERS`](super::MAX_HEADERS).
    pub fn headers_too_large() -> Self {
        Self::new(
            431,
            ErrorCode::HeadersTooLarge,
            "request head over 16384 bytes or 100 headers",
        )
    }

    /// 413 `payload_too_large`: a request body over the limit (the publish API).
    pub fn payload_too_large(msg: impl Into<String>) -> Self {
        Self::new(413, ErrorCode::PayloadTooLarge, msg)
    }

    /// 404 `not_found` for `POST /api/events` when no `publish_key` is configured,
    /// saying why.
    pub fn publish_disabled() -> Self {
        Self::new(
            404,
            ErrorCode::NotFound,
            "the publish API is disabled: set publish_key",
        )
    }

    /// 503 `overloaded`: the gateway is out of file descriptors (answered through a
    /// descriptor held in reserve, then closed).
    pub fn overloaded() -> Self {
        Self::new(
            503,
            ErrorCode::Overloaded,
            "the gateway is at its file descriptor limit; retry later",
        )
    }

    /// 503 `shutting_down`: the gateway is draining.
    pub fn shutting_down() -> Self {
        Self::new(503, ErrorCode::ShuttingDown, "the gateway is shutting down")
    }

    /// The full HTTP response: JSON body, `Content-Type: application/json`,
    /// `Content-Length`, `Connection: close`; a 426 also carries `Sec-WebSocket-Version: 13`.
    pub fn to_response(&self) -> Vec<u8> {
        self.response(false)
    }

    /// As [`Refusal::to_response`], without the body when `head_only` (a HEAD request).
    pub fn response(&self, head_only: bool) -> Vec<u8> {
        let body = frames::to_json(&ErrorBody::new(self.code, &self.message));
        let extra: &[(&str, &str)] = if self.status == 426 {
            &[("Sec-WebSocket-Version", "13")]
        } else {
            &[]
        };
        json_response(self.status, &body, true, head_only, extra)
    }
}

/// Standard reason phrase of `status` (`"Unknown"` for a code without one here).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The 101 Switching Protocols response; with `subprotocol`, it selects `agentwire.v1`.
pub fn upgrade_response(accept_key: &str, subprotocol: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    push_header(&mut out, "Sec-WebSocket-Accept", accept_key);
    if subprotocol {
        push_header(&mut out, "Sec-WebSocket-Protocol", SUBPROTOCOL);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A plain JSON response: status line with the standard reason phrase,
/// `Content-Type: application/json`, `Content-Length`, `Cache-Control: no-store`,
/// `Connection: close` when `close` (else `Connection: keep-alive`, which HTTP/1.0
/// clients need), then `extra` headers; `head_only` omits the body but keeps its
/// `Content-Length`.
pub fn json_response(
    status: u16,
    body: &[u8],
    close: bool,
    head_only: bool,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    response(status, "application/json", body, close, head_only, extra)
}

/// As [`json_response`] with another content type (Prometheus:
/// [`PROMETHEUS_CONTENT_TYPE`]) and no extra headers.
pub fn text_response(
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
    head_only: bool,
) -> Vec<u8> {
    response(status, content_type, body, close, head_only, &[])
}

/// Any plain response; see [`json_response`]. A header name or value containing CR or
/// LF is left out (no response splitting, even through a coding mistake).
pub fn response(
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
    head_only: bool,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let body_len = if head_only { 0 } else { body.len() };
    let mut out = Vec::with_capacity(160 + body_len);
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", reason_phrase(status));
    push_header(&mut out, "Content-Type", content_type);
    let _ = write!(out, "Content-Length: {}\r\n", body.len());
    out.extend_from_slice(b"Cache-Control: no-store\r\n");
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    for (name, value) in extra {
        push_header(&mut out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// The complete 405 answer for `path`: `{"error":"method_not_allowed",...}`, the
/// `Allow` header, `Connection: close`.
pub fn method_not_allowed_response(path: &str, head_only: bool) -> Vec<u8> {
    let why = "method not allowed on this path";
    let body = &frames::to_json(&ErrorBody::new(ErrorCode::MethodNotAllowed, why));
    match allowed_methods(path) {
        Some(allow) => json_response(405, body, true, head_only, &[("Allow", allow)]),
        None => json_response(405, body, true, head_only, &[]),
    }
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    let unsafe_byte = |s: &str| s.bytes().any(|b| b == b'\r' || b == b'\n');
    if name.is_empty() || unsafe_byte(name) || unsafe_byte(value) {
        return;
    }
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::tests::ACCEPT;
    use httparse::Status;

    #[test]
    fn upgrade_response_bytes() {
        assert_eq!(
            upgrade_response(ACCEPT, false),
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
            )
            .into_bytes()
        );
        let with = String::from_utf8(upgrade_response(ACCEPT, true)).unwrap();
        assert!(
            with.ends_with("\r\nSec-WebSocket-Protocol: agentwire.v1\r\n\r\n"),
            "{with}"
        );
        // The 101 parses as a response with httparse.
        let mut slots = [httparse::EMPTY_HEADER; 8];
        let mut resp = httparse::Response::new(&mut slots);
        assert_eq!(
            resp.parse(with.as_bytes()),
            Ok(Status::Complete(with.len()))
        );
        assert_eq!(resp.code, Some(101));
    }

    #[test]
    fn json_response_bytes() {
        let r = json_response(200, br#"{"ok":true}"#, false, false, &[("X-A", "1")]);
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\
             Cache-Control: no-store\r\nConnection: keep-alive\r\nX-A: 1\r\n\r\n{\"ok\":true}"
        );
        let r = String::from_utf8(json_response(503, b"{}", true, true, &[])).unwrap();
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(r.contains("\r\nContent-Length: 2\r\n") && r.contains("\r\nConnection: close\r\n"));
        assert!(r.ends_with("\r\n\r\n"), "HEAD: no body");
        // Header injection through `extra` is dropped.
        let r = String::from_utf8(json_response(
            200,
            b"",
            true,
            false,
            &[("X", "a\r\nSet-Cookie: x")],
        ))
        .unwrap();
        assert!(!r.contains("Set-Cookie"), "{r}");
    }

    #[test]
    fn text_response_bytes() {
        let body = b"# TYPE x counter\nx 1\n";
        let r = String::from_utf8(text_response(
            200,
            PROMETHEUS_CONTENT_TYPE,
            body,
            false,
            false,
        ))
        .unwrap();
        assert!(
            r.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{r}"
        );
        assert!(r.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
        assert!(r.ends_with("\r\n\r\n# TYPE x counter\nx 1\n"));
        let h = text_response(200, PROMETHEUS_CONTENT_TYPE, body, false, true);
        assert!(h.ends_with(b"\r\n\r\n"));
    }

    #[test]
    fn refusal_constructors_and_bodies() {
        let cases = [
            (
                Refusal::bad_request("m"),
                400,
                ErrorCode::BadRequest,
                "Bad Request",
            ),
            (
                Refusal::unauthorized("m"),
                401,
                ErrorCode::InvalidToken,
                "Unauthorized",
            ),
            (
                Refusal::forbidden("m"),
                403,
                ErrorCode::Forbidden,
                "Forbidden",
            ),
            (Refusal::not_found(), 404, ErrorCode::NotFound, "Not Found"),
            (
                Refusal::upgrade_required(),
                426,
                ErrorCode::UpgradeRequired,
                "Upgrade Required",
            ),
            (
                Refusal::too_many("m"),
                429,
                ErrorCode::TooManyConnections,
                "Too Many Requests",
            ),
            (
                Refusal::headers_too_large(),
                431,
                ErrorCode::HeadersTooLarge,
                "Request Header Fields Too Large",
            ),
            (
                Refusal::payload_too_large("m"),
                413,
                ErrorCode::PayloadTooLarge,
                "Content Too Large",
            ),
            (
                Refusal::shutting_down(),
                503,
                ErrorCode::ShuttingDown,
                "Service Unavailable",
            ),
        ];
        for (r, status, code, reason) in cases {
            assert_eq!((r.status, r.code), (status, code));
            let bytes = r.to_response();
            let text = String::from_utf8(bytes.clone()).unwrap();
            assert!(
                text.starts_with(&format!("HTTP/1.1 {status} {reason}\r\n")),
                "{text}"
            );
            assert!(text.contains("\r\nConnection: close\r\n"));
            assert!(text.contains("\r\nContent-Type: application/json\r\n"));
            assert_eq!(text.contains("Sec-WebSocket-Version: 13"), status == 426);
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(json["error"], code.as_str());
            assert_eq!(json["message"], r.message.as_str());
            assert!(r.response(true).ends_with(b"\r\n\r\n"));
        }
        // Messages are JSON-escaped.
        let r = Refusal::bad_request("quote \" and \\ and \n");
        let text = String::from_utf8(r.to_response()).unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1;
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["message"], "quote \" and \\ and \n");
        assert_eq!(r.to_string(), "400 bad_request: quote \" and \\ and \n");
    }

    #[test]
    fn reason_phrases() {
        assert_eq!(reason_phrase(405), "Method Not Allowed");
        assert_eq!(reason_phrase(413), "Content Too Large");
        assert_eq!(reason_phrase(202), "Accepted");
        assert_eq!(reason_phrase(299), "Unknown");
    }

    #[test]
    fn method_not_allowed_bytes() {
        let resp = String::from_utf8(method_not_allowed_response("/api/events", false)).unwrap();
        assert!(
            resp.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{resp}"
        );
        assert!(resp.contains("\r\nAllow: POST\r\n"), "{resp}");
        assert!(resp.contains("\r\nConnection: close\r\n"), "{resp}");
        assert!(resp.ends_with(
            r#""error":"method_not_allowed","message":"method not allowed on this path"}"#
        ));
        let head_only = String::from_utf8(method_not_allowed_response("/health", true)).unwrap();
        assert!(head_only.ends_with("\r\n\r\n") && head_only.contains("Allow: GET, HEAD"));
    }
}
