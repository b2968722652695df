//! The request head: [`parse_head`] turns the bytes read so far into a [`Request`]
//! (httparse, bounded by [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`]); target splitting,
//! WHATWG query decoding, the `Content-Length` / `Transfer-Encoding` framing rules, the
//! length policy of a body the gateway reads ([`body_length`]), the one
//! `Authorization: Bearer` parser ([`Request::bearer`], for the upgrade's JWT and the
//! publish API's key) and [`keep_alive`]. `Debug` of a request never shows a value.

use std::fmt;

use httparse::Status;

use super::routes::{known_path, Route};
use super::Refusal;

/// Largest request head (request line + headers + blank line) in bytes; over it: 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest number of request headers; over it: 431.
pub const MAX_HEADERS: usize = 100;

/// The request method, as far as routing cares (methods are case-sensitive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`: answered like GET, without a body.
    Head,
    /// `POST`
    Post,
    /// Any other method (`PUT`, `OPTIONS`, `get`, ...).
    Other,
}

impl Method {
    fn from_token(token: &str) -> Method {
        match token {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            _ => Method::Other,
        }
    }
}

/// Longest header or query name a `Debug` rendering prints (longer ones show as their
/// length: every JWT is longer).
const MAX_LOGGED_NAME_BYTES: usize = 32;

/// A parsed request head (owned; small).
///
/// `Debug` prints header and query *names* only (names over 32 bytes as their length),
/// and the path only when it is a known one, so a request can be logged without
/// leaking a token.
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// Path without the query, e.g. `/ws/factory` (`/` for an absolute-form target
    /// without a path, `*` for the asterisk form). Not percent-decoded.
    pub path: String,
    /// Query pairs, percent-decoded (`+` as space), in order; see the module docs.
    pub query: Vec<(String, String)>,
    /// HTTP minor version: 0 or 1.
    pub http_minor: u8,
    /// Headers in order; names lower-cased, values trimmed (UTF-8, or Latin-1 when the
    /// value is not valid UTF-8).
    pub headers: Vec<(String, String)>,
    /// The `Content-Length`, when given (identical duplicates are merged).
    pub content_length: Option<usize>,
    /// True when `Transfer-Encoding` ends with `chunked`.
    pub chunked: bool,
}

impl Request {
    /// First value of header `name` (give the name in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (lower case), in order.
    pub fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every comma-separated element of every `name` header, trimmed, empties skipped
    /// (`Connection: keep-alive, Upgrade` gives `keep-alive`, `Upgrade`).
    pub fn header_tokens<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.header_all(name)
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
    }

    /// True when a `name` header lists `token`, compared ASCII case-insensitively.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.header_tokens(name)
            .any(|t| t.eq_ignore_ascii_case(token))
    }

    /// First decoded value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// At most one value of header `name` (lower case); `label` names it in the refusal.
    ///
    /// # Errors
    /// 400 `duplicate <label> header` for a second value.
    pub fn single_header<'a>(
        &'a self,
        name: &'a str,
        label: &str,
    ) -> Result<Option<&'a str>, Refusal> {
        let mut values = self.header_all(name);
        let first = values.next();
        if values.next().is_some() {
            return Err(Refusal::bad_request(format!("duplicate {label} header")));
        }
        Ok(first)
    }

    /// The credentials of the request's `Authorization: Bearer <credentials>` header:
    /// the JWT of an upgrade, the key of a publish request. `Ok(None)` without the
    /// header, for another scheme, or for empty credentials.
    ///
    /// # Errors
    /// 400 for two `Authorization` headers: an ambiguous credential.
    pub fn bearer(&self) -> Result<Option<&str>, Refusal> {
        Ok(self
            .single_header("authorization", "Authorization")?
            .and_then(bearer_credentials))
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names are client text too (`/ws?<jwt>` makes a query name of a token, and a
        // JWT is a valid header name): names over 32 bytes show as their length.
        let short = |n: &String| {
            if n.len() <= MAX_LOGGED_NAME_BYTES {
                n.clone()
            } else {
                format!("<{}-byte name>", n.len())
            }
        };
        let header_names: Vec<String> = self.headers.iter().map(|(n, _)| short(n)).collect();
        let query_names: Vec<String> = self.query.iter().map(|(n, _)| short(n)).collect();
        // Only a known path is printed: an unknown one is client text that may carry a
        // token (`/ws;token=...`, `/ws&token=...`, found by fuzzing).
        let path = if known_path(&self.path) == Some(Route::Disconnect) {
            // The user id segment is client text too.
            "/api/users/<user_id>/disconnect".to_owned()
        } else if known_path(&self.path).is_some() {
            self.path.clone()
        } else {
            format!("<unknown path, {} bytes>", self.path.len())
        };
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("path", &path)
            .field("query_names", &query_names)
            .field("http_minor", &self.http_minor)
            .field("header_names", &header_names)
            .field("content_length", &self.content_length)
            .field("chunked", &self.chunked)
            .finish()
    }
}

/// Incremental head parse of the bytes read so far.
///
/// - `Ok(None)`: incomplete, read more. The caller may keep more than
///   [`MAX_HEAD_BYTES`] buffered (a pipelined body); only the first `MAX_HEAD_BYTES` are
///   ever scanned, so each call is O(min(len, 16 KiB)).
/// - `Ok(Some((req, head_len)))`: complete; bytes from `head_len` on are body or
///   pipelined data.
///
/// # Errors
/// 431 when no end of head is within the first [`MAX_HEAD_BYTES`] of a buffer at least
/// that long, or when there are more than `MAX_HEADERS` headers; 400 for a malformed
/// head, a target that is not a path, an unparsable or conflicting `Content-Length`, a
/// `Transfer-Encoding` not ending in a single `chunked`, or `chunked` with
/// `Content-Length`.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, Refusal> {
    let window = buf.get(..MAX_HEAD_BYTES).unwrap_or(buf);
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut raw = httparse::Request::new(&mut slots);
    let head_len = match raw.parse(window) {
        Ok(Status::Complete(n)) => n,
        Ok(Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(Refusal::headers_too_large())
        }
        Ok(Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::headers_too_large()),
        Err(e) => return Err(Refusal::bad_request(format!("malformed request head: {e}"))),
    };

    let method = Method::from_token(raw.method.unwrap_or(""));
    let http_minor = raw.version.unwrap_or(1);
    let (path, query) = split_target(raw.path.unwrap_or(""))?;
    let headers: Vec<(String, String)> = raw
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), header_value(h.value)))
        .collect();

    let mut req = Request {
        method,
        path: path.to_owned(),
        query: query.map(parse_query).unwrap_or_default(),
        http_minor,
        headers,
        content_length: None,
        chunked: false,
    };
    req.content_length = content_length(&req)?;
    req.chunked = transfer_chunked(&req)?;
    if req.chunked && req.content_length.is_some() {
        return Err(Refusal::bad_request(
            "Transfer-Encoding and Content-Length together",
        ));
    }
    Ok(Some((req, head_len)))
}

/// Split a request target into (path, query). Accepts origin-form, absolute-form with
/// an http(s)/ws(s) scheme, and `*`; drops a fragment.
fn split_target(target: &str) -> Result<(&str, Option<&str>), Refusal> {
    let target = target.split_once('#').map_or(target, |(t, _)| t);
    if target == "*" {
        return Ok(("*", None));
    }
    let rest = if target.starts_with('/') {
        target
    } else {
        strip_absolute_form(target)
            .ok_or_else(|| Refusal::bad_request("request target must be a path"))?
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    Ok((if path.is_empty() { "/" } else { path }, query))
}

/// `http://host:port/p?q` -> `/p?q` (or `?q` / empty when there is no path).
fn strip_absolute_form(target: &str) -> Option<&str> {
    let (scheme, rest) = target.split_once("://")?;
    let known = ["http", "https", "ws", "wss"];
    if !known.iter().any(|k| scheme.eq_ignore_ascii_case(k)) {
        return None;
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    if end == 0 {
        return None; // no authority
    }
    rest.get(end..)
}

/// Trimmed header value; UTF-8 when valid, else each byte as a Latin-1 character.
fn header_value(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = raw.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    let trimmed = match (start, end) {
        (Some(s), Some(e)) => raw.get(s..=e).unwrap_or(&[]),
        _ => &[],
    };
    match std::str::from_utf8(trimmed) {
        Ok(s) => s.to_owned(),
        Err(_) => trimmed.iter().map(|&b| char::from(b)).collect(),
    }
}

/// Every `Content-Length` element must be digits and all must agree.
fn content_length(req: &Request) -> Result<Option<usize>, Refusal> {
    let bad = || Refusal::bad_request("bad Content-Length");
    let mut found: Option<usize> = None;
    for value in req.header_all("content-length") {
        for item in value.split(',') {
            let item = item.trim();
            if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let n: usize = item.parse().map_err(|_| bad())?;
            match found {
                Some(prev) if prev != n => return Err(bad()),
                _ => found = Some(n),
            }
        }
    }
    Ok(found)
}

/// `Transfer-Encoding` must end with exactly one `chunked` (the only coding we frame).
fn transfer_chunked(req: &Request) -> Result<bool, Refusal> {
    if req.header("transfer-encoding").is_none() {
        return Ok(false);
    }
    let mut count = 0usize;
    let mut chunked_count = 0usize;
    let mut last_chunked = false;
    for token in req
        .header_all("transfer-encoding")
        .flat_map(|v| v.split(','))
    {
        let token = token.trim();
        if token.is_empty() {
            continue;
        }
        count += 1;
        last_chunked = token.eq_ignore_ascii_case("chunked");
        if last_chunked {
            chunked_count += 1;
        }
    }
    if count > 0 && last_chunked && chunked_count == 1 {
        Ok(true)
    } else {
        Err(Refusal::bad_request("unsupported Transfer-Encoding"))
    }
}

/// Split a query string into decoded pairs (WHATWG urlencoded parsing).
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
            (percent_decode(name), percent_decode(value))
        })
        .collect()
}

/// Decode `+` as space and `%xx` escapes; an invalid escape is kept as is; invalid UTF-8
/// in the result becomes U+FFFD.
pub fn percent_decode(s: &str) -> String {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return s.to_owned();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_value);
                let lo = bytes.get(i + 2).copied().and_then(hex_value);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi << 4) | lo);
                        i += 3;
                    }
                    _ => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    match String::from_utf8(out) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Should the connection stay open after answering this request? HTTP/1.1: yes unless
/// `Connection: close`; HTTP/1.0: only with `Connection: keep-alive` (and no `close`).
pub fn keep_alive(req: &Request) -> bool {
    if req.has_token("connection", "close") {
        return false;
    }
    req.http_minor >= 1 || req.has_token("connection", "keep-alive")
}

/// The length of the body of `req` when the gateway reads it (the publish API),
/// decided on the head alone, before a byte of the body is buffered.
///
/// # Errors
/// 400 for a chunked body (not supported) or no `Content-Length`; 413
/// `payload_too_large` for a `Content-Length` over `max` (`max_publish_bytes`).
pub fn body_length(req: &Request, max: usize) -> Result<usize, Refusal> {
    let Some(len) = req.content_length else {
        return Err(Refusal::bad_request(if req.chunked {
            "chunked bodies are not supported; send Content-Length"
        } else {
            "Content-Length required"
        }));
    };
    if len > max {
        return Err(Refusal::payload_too_large(format!(
            "body over max_publish_bytes ({max})"
        )));
    }
    Ok(len)
}

/// The credentials of one `Authorization` header value `Bearer <credentials>`: the
/// scheme in any case (RFC 7235), one space, the credentials trimmed; `None` for
/// another scheme or empty credentials. The value comes trimmed of blanks from
/// [`parse_head`].
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    let credentials = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credentials.is_empty()).then_some(credentials)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::tests::{head, parse, upgrade_head};
    use crate::http::Route;

    fn status_of(buf: &[u8]) -> u16 {
        match parse_head(buf) {
            Err(r) => r.status,
            Ok(other) => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn every_strict_prefix_of_a_head_is_incomplete() {
        let h = upgrade_head("/ws?mode=main&token=abc", &["Origin: http://a.example"]);
        for cut in 0..h.len() {
            assert_eq!(
                parse_head(&h.as_bytes()[..cut]).map(|o| o.is_none()),
                Ok(true),
                "prefix of {cut} bytes"
            );
        }
        assert!(matches!(parse_head(h.as_bytes()), Ok(Some((_, n))) if n == h.len()));
    }

    #[test]
    fn complete_head_reports_length_and_leaves_pipelined_bytes() {
        let first = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
        let second = "GET /metrics HTTP/1.1\r\n\r\n";
        let buf = format!("{first}{second}");
        let (req, n) = parse_head(buf.as_bytes()).unwrap().unwrap();
        assert_eq!(n, first.len());
        assert_eq!(req.path, "/health");
        let (req2, n2) = parse_head(&buf.as_bytes()[n..]).unwrap().unwrap();
        assert_eq!((req2.path.as_str(), n2), ("/metrics", second.len()));

        // A body after the head is left to the caller.
        let post = "POST /api/events HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        let (req, n) = parse_head(post.as_bytes()).unwrap().unwrap();
        assert_eq!((req.content_length, &post[n..]), (Some(2), "{}"));
    }

    #[test]
    fn request_fields_are_parsed() {
        let req = parse(&head(&[
            "GET /ws/factory?mode=factory&thread_id=t%201&x=a+b&flag&&empty= HTTP/1.0",
            "Host: gw",
            "X-Mixed-Case:   padded value \t",
            "x-mixed-case: second",
        ]));
        assert_eq!(req.method, Method::Get);
        assert_eq!(req.path, "/ws/factory");
        assert_eq!(req.http_minor, 0);
        assert_eq!(req.header("x-mixed-case"), Some("padded value"));
        assert_eq!(
            req.header_all("x-mixed-case").collect::<Vec<_>>(),
            ["padded value", "second"]
        );
        assert_eq!(req.header("missing"), None);
        assert_eq!(req.query_param("thread_id"), Some("t 1"));
        assert_eq!(req.query_param("x"), Some("a b"));
        assert_eq!(req.query_param("flag"), Some(""));
        assert_eq!(req.query_param("empty"), Some(""));
        let names: Vec<&str> = req.query.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["mode", "thread_id", "x", "flag", "empty"]);
        assert_eq!((req.content_length, req.chunked), (None, false));
    }

    #[test]
    fn methods_are_case_sensitive_tokens() {
        for (m, want) in [
            ("GET", Method::Get),
            ("HEAD", Method::Head),
            ("POST", Method::Post),
            ("PUT", Method::Other),
            ("OPTIONS", Method::Other),
            ("get", Method::Other),
        ] {
            assert_eq!(
                parse(&head(&[&format!("{m} / HTTP/1.1")])).method,
                want,
                "{m}"
            );
        }
    }

    #[test]
    fn non_utf8_header_value_is_read_as_latin1() {
        let mut buf = b"GET / HTTP/1.1\r\nX-Name: caf\xe9\r\n\r\n".to_vec();
        let (req, _) = parse_head(&buf).unwrap().unwrap();
        assert_eq!(req.header("x-name"), Some("caf\u{e9}"));
        buf = "GET / HTTP/1.1\r\nX-Name: café\r\n\r\n".as_bytes().to_vec();
        let (req, _) = parse_head(&buf).unwrap().unwrap();
        assert_eq!(req.header("x-name"), Some("café"));
    }

    #[test]
    fn request_targets() {
        let req = parse(&head(&["GET http://gw:8080/ws/stats?x=1 HTTP/1.1"]));
        assert_eq!(
            (req.path.as_str(), req.query_param("x")),
            ("/ws/stats", Some("1"))
        );
        let req = parse(&head(&["GET WSS://gw?mode=main HTTP/1.1"]));
        assert_eq!(
            (req.path.as_str(), req.query_param("mode")),
            ("/", Some("main"))
        );
        let req = parse(&head(&["GET https://gw HTTP/1.1"]));
        assert_eq!(req.path, "/");
        let req = parse(&head(&["GET /health#frag?x=1 HTTP/1.1"]));
        assert_eq!((req.path.as_str(), req.query.len()), ("/health", 0));
        let req = parse(&head(&["OPTIONS * HTTP/1.1"]));
        assert_eq!(
            (req.path.as_str(), Route::of(req.method, &req.path)),
            ("*", Route::NotFound)
        );
        let req = parse(&head(&["GET /ws? HTTP/1.1"]));
        assert_eq!((req.path.as_str(), req.query.len()), ("/ws", 0));

        for bad in ["gw:443", "ftp://gw/ws", "http:///ws", "ws", "http:/x"] {
            assert_eq!(
                status_of(head(&[&format!("GET {bad} HTTP/1.1")]).as_bytes()),
                400,
                "{bad}"
            );
        }
    }

    #[test]
    fn oversized_head_is_431() {
        // A head of exactly MAX_HEAD_BYTES is fine, one byte more is not.
        let start = "GET / HTTP/1.1\r\nX-Pad: ";
        let pad = MAX_HEAD_BYTES - start.len() - 4;
        let exact = format!("{start}{}\r\n\r\n", "a".repeat(pad));
        assert_eq!(exact.len(), MAX_HEAD_BYTES);
        assert!(matches!(parse_head(exact.as_bytes()), Ok(Some((_, n))) if n == MAX_HEAD_BYTES));
        let over = format!("{start}{}\r\n\r\n", "a".repeat(pad + 1));
        assert_eq!(status_of(over.as_bytes()), 431);

        // Many headers adding up to more than 16 KiB.
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..90 {
            many.push_str(&format!("X-H{i}: {}\r\n", "v".repeat(200)));
        }
        many.push_str("\r\n");
        assert!(many.len() > MAX_HEAD_BYTES);
        assert_eq!(status_of(many.as_bytes()), 431);
        // While fewer than 16 KiB have arrived, it is only incomplete.
        assert_eq!(parse_head(&many.as_bytes()[..MAX_HEAD_BYTES - 1]), Ok(None));
    }

    #[test]
    fn huge_request_line_is_431_and_only_the_window_is_scanned() {
        let line = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(64 * 1024));
        assert_eq!(status_of(line.as_bytes()), 431);
        // Without any end in sight, 16 KiB of garbage-free bytes is enough to refuse.
        let partial = format!("GET /{}", "a".repeat(64 * 1024));
        assert_eq!(status_of(partial.as_bytes()), 431);
        // A 1 MiB buffer is refused from its first 16 KiB.
        let big = vec![b'a'; 1 << 20];
        let mut buf = b"GET /".to_vec();
        buf.extend_from_slice(&big);
        assert_eq!(status_of(&buf), 431);
        // A complete head followed by a large pipelined body still parses.
        let mut post = b"POST /api/events HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n".to_vec();
        let head_len = post.len();
        post.extend_from_slice(&big);
        assert!(matches!(parse_head(&post), Ok(Some((_, n))) if n == head_len));
    }

    #[test]
    fn header_count_limit() {
        let with = |n: usize| {
            let mut s = String::from("GET / HTTP/1.1\r\n");
            for i in 0..n {
                s.push_str(&format!("X-H{i}: v\r\n"));
            }
            s.push_str("\r\n");
            s
        };
        assert_eq!(parse(&with(MAX_HEADERS)).headers.len(), MAX_HEADERS);
        assert_eq!(status_of(with(MAX_HEADERS + 1).as_bytes()), 431);
        let r = parse_head(with(MAX_HEADERS + 1).as_bytes()).unwrap_err();
        assert_eq!(r, Refusal::headers_too_large());
    }

    #[test]
    fn malformed_heads_are_400() {
        let cases: &[&[u8]] = &[
            b"GET / HTTP/1.1 extra\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTX/1.1\r\n\r\n",
            b"GET /\r\n\r\n",
            b"G\x01T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nName : x\r\n\r\n",
            b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"GET /\xff HTTP/1.1\r\n\r\n",
        ];
        for case in cases {
            assert_eq!(status_of(case), 400, "{:?}", String::from_utf8_lossy(case));
        }
    }

    #[test]
    fn content_length_and_transfer_encoding() {
        let cl = |lines: &[&str]| {
            let mut all = vec!["POST /api/events HTTP/1.1"];
            all.extend_from_slice(lines);
            parse_head(head(&all).as_bytes()).map(|o| o.map(|(r, _)| (r.content_length, r.chunked)))
        };
        assert_eq!(cl(&["Content-Length: 12"]), Ok(Some((Some(12), false))));
        assert_eq!(cl(&["Content-Length: 0"]), Ok(Some((Some(0), false))));
        assert_eq!(
            cl(&["Content-Length: 5", "Content-Length: 5"]),
            Ok(Some((Some(5), false)))
        );
        assert_eq!(cl(&["Content-Length: 5, 5"]), Ok(Some((Some(5), false))));
        assert_eq!(cl(&["Transfer-Encoding: chunked"]), Ok(Some((None, true))));
        assert_eq!(
            cl(&["Transfer-Encoding: gzip, Chunked"]),
            Ok(Some((None, true)))
        );
        for bad in [
            &["Content-Length: 5", "Content-Length: 6"][..],
            &["Content-Length: 5, 6"],
            &["Content-Length: abc"],
            &["Content-Length: +5"],
            &["Content-Length: -1"],
            &["Content-Length: 1 2"],
            &["Content-Length:"],
            &["Content-Length: 99999999999999999999999999"],
            &["Transfer-Encoding: chunked", "Content-Length: 5"],
            &["Transfer-Encoding: gzip"],
            &["Transfer-Encoding: chunked, gzip"],
            &["Transfer-Encoding: chunked, chunked"],
            &["Transfer-Encoding:"],
        ] {
            assert_eq!(cl(bad).map(|_| ()).unwrap_err().status, 400, "{bad:?}");
        }
    }

    #[test]
    fn percent_decoding_is_lenient_whatwg() {
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("a+b%20c"), "a b c");
        assert_eq!(percent_decode("%2B%2b"), "++");
        assert_eq!(percent_decode("%e2%9C%93"), "\u{2713}");
        // Invalid escapes are kept literally.
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%%41"), "%A");
        // Invalid UTF-8 becomes U+FFFD.
        assert_eq!(percent_decode("a%ffb"), "a\u{fffd}b");
        let req = parse(&head(&["GET /ws?mode=ma%zzin&k%3D=v%26w HTTP/1.1"]));
        assert_eq!(req.query_param("mode"), Some("ma%zzin"));
        assert_eq!(req.query_param("k="), Some("v&w"));
    }

    #[test]
    fn request_debug_hides_values() {
        let req = parse(&head(&[
            "GET /ws?token=SECRETQ HTTP/1.1",
            "Authorization: Bearer SECRETH",
        ]));
        let dbg = format!("{req:?}");
        assert!(!dbg.contains("SECRET"), "{dbg}");
        assert!(
            dbg.contains("authorization") && dbg.contains("token"),
            "{dbg}"
        );
    }

    /// Regression (fuzz target http_head): a token in an unknown path, as in a
    /// mistyped `?`, must not reach a `Debug` rendering (logs).
    #[test]
    fn request_debug_hides_unknown_paths() {
        for target in ["/ws;token=SECRETP", "/ws&token=SECRETP", "/SECRETP"] {
            let req = parse(&head(&[&format!("GET {target} HTTP/1.1")]));
            let dbg = format!("{req:?}");
            assert!(!dbg.contains("SECRET"), "{dbg}");
            assert!(dbg.contains("<unknown path"), "{dbg}");
        }
        let dbg = format!("{:?}", parse(&head(&["GET /ws/factory/ HTTP/1.1"])));
        assert!(dbg.contains("\"/ws/factory/\""), "{dbg}");
        // A token as a query name (`/ws?<jwt>`) or as a header name.
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.SECRETSECRETSECRETSECRETSECRETSECRET";
        let req = parse(&head(&[
            &format!("GET /ws?{jwt}&mode=main HTTP/1.1"),
            &format!("{jwt}: x"),
            "Host: h",
        ]));
        let dbg = format!("{req:?}");
        assert!(!dbg.to_lowercase().contains("secret"), "{dbg}");
        assert!(
            dbg.contains("<74-byte name>") && dbg.contains("\"mode\"") && dbg.contains("\"host\""),
            "{dbg}"
        );
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |line: &str, conn: Option<&str>| {
            let c = conn.map(|c| format!("Connection: {c}"));
            let mut lines = vec![line];
            lines.extend(c.as_deref());
            keep_alive(&parse(&head(&lines)))
        };
        assert!(ka("GET /health HTTP/1.1", None));
        assert!(ka("GET /health HTTP/1.1", Some("keep-alive")));
        assert!(!ka("GET /health HTTP/1.1", Some("close")));
        assert!(!ka("GET /health HTTP/1.1", Some("Keep-Alive, Close")));
        assert!(!ka("GET /health HTTP/1.0", None));
        assert!(ka("GET /health HTTP/1.0", Some("Keep-Alive")));
        assert!(!ka("GET /health HTTP/1.0", Some("close")));
        assert!(!ka("GET /health HTTP/1.0", Some("upgrade")));
    }

    /// The one Bearer parser: the upgrade's JWT and the publish API's key.
    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_credentials("Bearer pk-1"), Some("pk-1"));
        assert_eq!(bearer_credentials("bearer  pk-1 "), Some("pk-1"));
        assert_eq!(bearer_credentials("BEARER pk-1"), Some("pk-1"));
        assert_eq!(bearer_credentials("Basic pk-1"), None);
        assert_eq!(bearer_credentials("Bearer"), None);
        assert_eq!(bearer_credentials("Bearer "), None);
        assert_eq!(bearer_credentials("Bearer\tpk-1"), None);
        assert_eq!(bearer_credentials("pk-1"), None);
    }

    #[test]
    fn bearer_of_a_request() {
        let bearer = |lines: &[&str]| {
            let mut all = vec!["POST /api/events HTTP/1.1"];
            all.extend_from_slice(lines);
            parse(&head(&all))
                .bearer()
                .map(|b| b.map(str::to_owned))
                .map_err(|r| r.status)
        };
        assert_eq!(bearer(&[]), Ok(None));
        assert_eq!(
            bearer(&["Authorization: bearer   pk-1 "]),
            Ok(Some("pk-1".into()))
        );
        assert_eq!(bearer(&["Authorization: Basic dXNlcg=="]), Ok(None));
        assert_eq!(bearer(&["Authorization: Bearer "]), Ok(None));
        let two = ["Authorization: Bearer a", "Authorization: Bearer a"];
        assert_eq!(bearer(&two), Err(400));
    }

    #[test]
    fn body_length_policy() {
        let len = |lines: &[&str], max: usize| {
            let mut all = vec!["POST /api/events HTTP/1.1"];
            all.extend_from_slice(lines);
            body_length(&parse(&head(&all)), max)
        };
        assert_eq!(len(&["Content-Length: 10"], 10), Ok(10));
        assert_eq!(len(&["Content-Length: 0"], 10), Ok(0));
        let over = len(&["Content-Length: 11"], 10).unwrap_err();
        assert_eq!(
            (over.status, over.code.as_str()),
            (413, "payload_too_large")
        );
        assert_eq!(over.message, "body over max_publish_bytes (10)");
        let missing = len(&[], 10).unwrap_err();
        assert_eq!(missing, Refusal::bad_request("Content-Length required"));
        let chunked = len(&["Transfer-Encoding: chunked"], 10).unwrap_err();
        assert_eq!(
            chunked,
            Refusal::bad_request("chunked bodies are not supported; send Content-Length")
        );
    }
}
