//! HTTP/1.1 on the gateway's one port, without I/O: this module owns request-head
//! parsing (httparse, bounded by [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`]), routing of the
//! paths of PROTOCOL.md sections 3 and 6, validation of a WebSocket upgrade and
//! extraction of its connection parameters (mode, thread, resume point, token, origin),
//! and the bytes of every plain HTTP answer (refusals, JSON and text responses, the 101).
//!
//! The reactor feeds it the bytes read so far and writes what it returns; nothing here
//! blocks or logs, and a token is only verified through the [`Authenticator`] handed to
//! [`admit_upgrade`]. Nothing here panics on any input (fuzzed: `fuzz/`).
//!
//! Choices where the protocol is silent:
//! - **Trailing slash**: one trailing `/` is tolerated on every known path (`/ws/` is
//!   `/ws`, `/health/` is `/health`); paths are otherwise matched exactly, case-sensitively
//!   and without percent-decoding (`/w%73` is 404).
//! - **Request target**: origin-form (`/ws?mode=main`) and absolute-form
//!   (`http://host/ws?...`, also `https`, `ws`, `wss`) are accepted, a `#fragment` is
//!   dropped, `*` routes to 404, anything else is 400.
//! - **HEAD**: routed wherever GET is; the caller answers with headers only (the
//!   builders keep `Content-Length`). A HEAD on a WebSocket path routes there and fails
//!   [`check_upgrade`] with 400, like a GET without upgrade headers.
//! - **Query decoding** follows the WHATWG `application/x-www-form-urlencoded` parser:
//!   `+` is a space, an invalid `%xx` escape is kept literally (never an error), invalid
//!   UTF-8 after decoding becomes U+FFFD, empty `&&` pieces are skipped.
//! - **Duplicates**: a repeated `mode`, `connection_scope`, `thread_id`, `last_seq`,
//!   `epoch`, `user_id` or `token` query parameter, or a repeated `Authorization`,
//!   `Origin`, `Sec-WebSocket-Key` or `Sec-WebSocket-Version` header on an upgrade is 400:
//!   two values for one setting are ambiguous, and an ambiguous credential is refused.
//! - **Origin**: a missing `Origin` header is allowed even with a non-empty allow-list
//!   (only browsers send it, and any other client could forge it anyway); a present one
//!   must match an entry exactly, ignoring ASCII case (RFC 6454 origins compare scheme
//!   and host case-insensitively).
//! - **Host** is not required (load tools and raw clients often omit it).
//! - Refusal messages never contain a query value, header value or token, only the
//!   names of what was wrong, because they are sent to the client and logged.

use std::fmt;
use std::io::Write as _;

use httparse::Status;

use crate::auth::{Authenticator, Claims};

/// Largest request head (request line + headers + blank line) in bytes; over it: 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest number of request headers; over it: 431.
pub const MAX_HEADERS: usize = 100;
/// Largest `thread_id` query parameter in bytes; over it: 400.
pub const MAX_THREAD_ID_BYTES: usize = 256;
/// Largest `epoch` query parameter in bytes; over it: 400.
pub const MAX_EPOCH_BYTES: usize = 256;
/// The WebSocket subprotocol the gateway speaks (section 3).
pub const SUBPROTOCOL: &str = "agentwire.v1";
/// Prefix of the subprotocol entry carrying a JWT (`bearer.<jwt>`).
pub const BEARER_SUBPROTOCOL_PREFIX: &str = "bearer.";
/// Content type of the Prometheus text exposition (`GET /metrics`).
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

// ------------------------------------------------------------------ request

/// Connection scope requested by the client (PROTOCOL.md section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every event of the user (the default).
    Main,
    /// Every event of the user; the `/ws/factory` alias.
    Factory,
    /// Every event of the user; the `/websocket` alias.
    Legacy,
    /// Only events of runs started from this very connection.
    Isolated,
    /// Conformance builds only: `GET /conformance/echo`, a session that receives no
    /// events and echoes every client message back (Autobahn|Testsuite runs). Never
    /// parsed from `mode=`; it exists only as that path's mode.
    #[cfg(feature = "conformance")]
    Echo,
}

impl Mode {
    /// The query-parameter spelling: `main`, `factory`, `legacy` or `isolated` (`echo`
    /// for the conformance echo path, which no `mode=` selects).
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Main => "main",
            Mode::Factory => "factory",
            Mode::Legacy => "legacy",
            Mode::Isolated => "isolated",
            #[cfg(feature = "conformance")]
            Mode::Echo => "echo",
        }
    }

    /// True for [`Mode::Isolated`], the only mode that narrows delivery to the connection.
    pub fn is_isolated(&self) -> bool {
        matches!(self, Mode::Isolated)
    }

    /// Parse the exact (lower-case) query spelling; anything else is `None`.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "main" => Some(Mode::Main),
            "factory" => Some(Mode::Factory),
            "legacy" => Some(Mode::Legacy),
            "isolated" => Some(Mode::Isolated),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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
        let path = if known_path(&self.path).is_some() {
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

// ------------------------------------------------------------------ refusal

/// A refusal before the upgrade: a status and the JSON body
/// `{"error": code, "message": text}`. The message never contains client-supplied values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// The `error` code of PROTOCOL.md section 3.
    pub code: &'static str,
    /// Human-readable reason; safe to log and to send.
    pub message: String,
}

impl Refusal {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 `bad_request`: not a valid upgrade, a bad parameter, a malformed head.
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(400, "bad_request", msg)
    }

    /// 401 `invalid_token`: the token is missing or does not verify.
    pub fn unauthorized(msg: impl Into<String>) -> Self {
        Self::new(401, "invalid_token", msg)
    }

    /// 403 `forbidden`: `user_id` mismatch or Origin not allowed.
    pub fn forbidden(msg: impl Into<String>) -> Self {
        Self::new(403, "forbidden", msg)
    }

    /// 404 `not_found`: unknown path (the path is not echoed).
    pub fn not_found() -> Self {
        Self::new(404, "not_found", "unknown path")
    }

    /// 426 `upgrade_required`: `Sec-WebSocket-Version` is not 13; the response carries
    /// `Sec-WebSocket-Version: 13`.
    pub fn upgrade_required() -> Self {
        Self::new(426, "upgrade_required", "Sec-WebSocket-Version must be 13")
    }

    /// 429 `too_many_connections`: a connection limit is reached.
    pub fn too_many(msg: impl Into<String>) -> Self {
        Self::new(429, "too_many_connections", msg)
    }

    /// 431 `headers_too_large`: head over [`MAX_HEAD_BYTES`] or [`MAX_HEADERS`].
    pub fn headers_too_large() -> Self {
        Self::new(
            431,
            "headers_too_large",
            "request head over 16384 bytes or 100 headers",
        )
    }

    /// 404 `not_found` for `POST /api/events` when no `publish_key` is configured,
    /// saying why.
    pub fn publish_disabled() -> Self {
        Self::new(
            404,
            "not_found",
            "the publish API is disabled: set publish_key",
        )
    }

    /// 503 `overloaded`: the gateway is out of file descriptors (answered through a
    /// descriptor held in reserve, then closed).
    pub fn overloaded() -> Self {
        Self::new(
            503,
            "overloaded",
            "the gateway is at its file descriptor limit; retry later",
        )
    }

    /// 503 `shutting_down`: the gateway is draining.
    pub fn shutting_down() -> Self {
        Self::new(503, "shutting_down", "the gateway is shutting down")
    }

    /// The full HTTP response: JSON body, `Content-Type: application/json`,
    /// `Content-Length`, `Connection: close`; a 426 also carries `Sec-WebSocket-Version: 13`.
    pub fn to_response(&self) -> Vec<u8> {
        self.response(false)
    }

    /// As [`Refusal::to_response`], without the body when `head_only` (a HEAD request).
    pub fn response(&self, head_only: bool) -> Vec<u8> {
        let body = serde_json::json!({ "error": self.code, "message": self.message });
        let body = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let extra: &[(&str, &str)] = if self.status == 426 {
            &[("Sec-WebSocket-Version", "13")]
        } else {
            &[]
        };
        json_response(self.status, &body, true, head_only, extra)
    }
}

// ------------------------------------------------------------------ parsing

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
/// that long, or when there are more than [`MAX_HEADERS`] headers; 400 for a malformed
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

// ------------------------------------------------------------------ routing

/// Where a request goes (section 3 aliases and section 6 endpoints).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// A WebSocket path; the mode implied by the alias (`None` for `/ws`).
    WebSocket(Option<Mode>),
    /// `GET /health`, `GET /ws/health`.
    Health,
    /// `GET /ws/config`.
    Config,
    /// `GET /ws/stats`.
    Stats,
    /// `GET /metrics`.
    Metrics,
    /// `POST /api/events`.
    Publish,
    /// Unknown path: 404.
    NotFound,
    /// Known path, wrong method: 405 with the `Allow` header of [`allowed_methods`].
    MethodNotAllowed,
}

/// The route of a known path regardless of method (one trailing `/` tolerated).
fn known_path(path: &str) -> Option<Route> {
    let path = if path.len() > 1 {
        path.strip_suffix('/').unwrap_or(path)
    } else {
        path
    };
    match path {
        "/ws" => Some(Route::WebSocket(None)),
        "/ws/factory" => Some(Route::WebSocket(Some(Mode::Factory))),
        "/ws/isolated" => Some(Route::WebSocket(Some(Mode::Isolated))),
        "/websocket" => Some(Route::WebSocket(Some(Mode::Legacy))),
        "/health" | "/ws/health" => Some(Route::Health),
        "/ws/config" => Some(Route::Config),
        "/ws/stats" => Some(Route::Stats),
        "/metrics" => Some(Route::Metrics),
        "/api/events" => Some(Route::Publish),
        #[cfg(feature = "conformance")]
        "/conformance/echo" => Some(Route::WebSocket(Some(Mode::Echo))),
        _ => None,
    }
}

/// Route a request: WebSocket paths and the read endpoints take GET and HEAD,
/// `/api/events` takes POST; a known path with another method is
/// [`Route::MethodNotAllowed`], an unknown path [`Route::NotFound`] whatever the method.
/// One trailing slash is tolerated (`/ws/` = `/ws`).
pub fn route(method: Method, path: &str) -> Route {
    match known_path(path) {
        None => Route::NotFound,
        Some(Route::Publish) if method == Method::Post => Route::Publish,
        Some(Route::Publish) => Route::MethodNotAllowed,
        Some(r) if matches!(method, Method::Get | Method::Head) => r,
        Some(_) => Route::MethodNotAllowed,
    }
}

/// The `Allow` header value for a known path (`GET` for WebSocket paths, `GET, HEAD`
/// for the read endpoints, `POST` for publish); `None` for an unknown path.
pub fn allowed_methods(path: &str) -> Option<&'static str> {
    match known_path(path)? {
        Route::WebSocket(_) => Some("GET"),
        Route::Publish => Some("POST"),
        _ => Some("GET, HEAD"),
    }
}

/// The complete 405 answer for `path`: `{"error":"method_not_allowed",...}`, the
/// `Allow` header, `Connection: close`.
pub fn method_not_allowed_response(path: &str, head_only: bool) -> Vec<u8> {
    let body = br#"{"error":"method_not_allowed","message":"method not allowed on this path"}"#;
    match allowed_methods(path) {
        Some(allow) => json_response(405, body, true, head_only, &[("Allow", allow)]),
        None => json_response(405, body, true, head_only, &[]),
    }
}

// ------------------------------------------------------------------ upgrade

/// Where the JWT came from (section 3 order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <jwt>`.
    Header,
    /// `Sec-WebSocket-Protocol: agentwire.v1, bearer.<jwt>`.
    Subprotocol,
    /// `?token=<jwt>`.
    Query,
}

impl TokenSource {
    /// Short name for logs and stats: `header`, `subprotocol`, `query`.
    pub fn as_str(&self) -> &'static str {
        match self {
            TokenSource::Header => "header",
            TokenSource::Subprotocol => "subprotocol",
            TokenSource::Query => "query",
        }
    }
}

/// A valid WebSocket upgrade request, with the connection parameters of section 3.
///
/// `Debug` redacts the token and shows only the lengths of the client's text values.
#[derive(Clone)]
pub struct Upgrade {
    /// `Sec-WebSocket-Accept` value derived from the client's key.
    pub accept_key: String,
    /// The resolved mode (path alias, `mode`, `connection_scope`; default main).
    pub mode: Mode,
    /// `thread_id` filter: non-empty, at most [`MAX_THREAD_ID_BYTES`].
    pub thread_id: Option<String>,
    /// `last_seq` resume point.
    pub last_seq: Option<u64>,
    /// `epoch` the client resumes from.
    pub epoch: Option<String>,
    /// `user_id` claimed by the client (untrusted; compare with the token's `sub`).
    pub user_id: Option<String>,
    /// The unverified JWT and where it came from: the first of the Authorization
    /// bearer, the `bearer.<jwt>` subprotocol (only when `agentwire.v1` is also offered),
    /// and `?token=` (only when query tokens are allowed). Empty values do not count.
    pub token: Option<(String, TokenSource)>,
    /// The client offered `agentwire.v1`: answer `Sec-WebSocket-Protocol: agentwire.v1`.
    pub subprotocol: bool,
    /// The `Origin` header, unchecked (see [`origin_allowed`]).
    pub origin: Option<String>,
}

impl fmt::Debug for Upgrade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Query and header values are client text (a token pasted into `thread_id`
        // would be logged, found by fuzzing): only their lengths are shown.
        let len = |v: &Option<String>| v.as_ref().map(|s| format!("<{} bytes>", s.len()));
        f.debug_struct("Upgrade")
            .field("accept_key", &self.accept_key)
            .field("mode", &self.mode)
            .field("thread_id", &len(&self.thread_id))
            .field("last_seq", &self.last_seq)
            .field("epoch", &len(&self.epoch))
            .field("user_id", &len(&self.user_id))
            .field(
                "token",
                &self.token.as_ref().map(|(_, src)| ("<redacted>", *src)),
            )
            .field("subprotocol", &self.subprotocol)
            .field("origin", &len(&self.origin))
            .finish()
    }
}

/// The section 3 query parameters, each at most once.
#[derive(Default)]
struct UpgradeParams<'a> {
    mode: Option<&'a str>,
    connection_scope: Option<&'a str>,
    thread_id: Option<&'a str>,
    last_seq: Option<&'a str>,
    epoch: Option<&'a str>,
    user_id: Option<&'a str>,
    token: Option<&'a str>,
}

impl<'a> UpgradeParams<'a> {
    fn collect(query: &'a [(String, String)]) -> Result<Self, Refusal> {
        let mut p = UpgradeParams::default();
        for (name, value) in query {
            let (slot, label) = match name.as_str() {
                "mode" => (&mut p.mode, "mode"),
                "connection_scope" => (&mut p.connection_scope, "connection_scope"),
                "thread_id" => (&mut p.thread_id, "thread_id"),
                "last_seq" => (&mut p.last_seq, "last_seq"),
                "epoch" => (&mut p.epoch, "epoch"),
                "user_id" => (&mut p.user_id, "user_id"),
                "token" => (&mut p.token, "token"),
                _ => continue, // unknown parameters are ignored (cache busters etc.)
            };
            if slot.is_some() {
                return Err(Refusal::bad_request(format!(
                    "duplicate query parameter {label}"
                )));
            }
            *slot = Some(value.as_str());
        }
        Ok(p)
    }
}

fn bad_param(name: &str) -> Refusal {
    Refusal::bad_request(format!("bad query parameter {name}"))
}

/// At most one value of header `name`; a second one is 400.
fn single_header<'a>(
    req: &'a Request,
    name: &'a str,
    label: &str,
) -> Result<Option<&'a str>, Refusal> {
    let mut values = req.header_all(name);
    let first = values.next();
    if values.next().is_some() {
        return Err(Refusal::bad_request(format!("duplicate {label} header")));
    }
    Ok(first)
}

/// Validate an upgrade for `path_mode` (from [`Route::WebSocket`]) and extract its
/// connection parameters. Does not verify the token or the origin.
///
/// # Errors
/// In this order:
/// - 400 unless the method is GET over HTTP/1.1;
/// - 426 unless there is exactly one `Sec-WebSocket-Version` and it is `13` (but a
///   request with neither that header nor `Upgrade: websocket` is 400: not an upgrade);
/// - 400 unless `Upgrade` lists `websocket` and `Connection` lists `upgrade`
///   (comma-separated, case-insensitive);
/// - 400 unless there is exactly one `Sec-WebSocket-Key` and it is canonical base64 of
///   16 bytes;
/// - 400 for a duplicate known query parameter, a `mode` other than
///   `main|factory|legacy|isolated`, a `connection_scope` other than `true|false|1|0`,
///   modes that disagree (path alias, `mode`, `connection_scope=true`), a `last_seq`
///   that is not a u64 in decimal, a `thread_id` empty, over 256 bytes or with control
///   characters, an `epoch` over 256 bytes or with control characters;
/// - 400 for a body (`Content-Length` > 0 or chunked);
/// - 400 for a duplicate `Authorization` or `Origin` header.
pub fn check_upgrade(
    req: &Request,
    path_mode: Option<Mode>,
    allow_query_token: bool,
) -> Result<Upgrade, Refusal> {
    if req.method != Method::Get {
        return Err(Refusal::bad_request("a WebSocket upgrade must be a GET"));
    }
    if req.http_minor != 1 {
        return Err(Refusal::bad_request("a WebSocket upgrade needs HTTP/1.1"));
    }
    let wants_websocket = req.has_token("upgrade", "websocket");
    let mut versions = req.header_all("sec-websocket-version");
    match (versions.next(), versions.next()) {
        (Some("13"), None) => {}
        (None, _) if !wants_websocket => {
            return Err(Refusal::bad_request("not a WebSocket upgrade request"))
        }
        _ => return Err(Refusal::upgrade_required()),
    }
    if !wants_websocket {
        return Err(Refusal::bad_request("Upgrade header must be websocket"));
    }
    if !req.has_token("connection", "upgrade") {
        return Err(Refusal::bad_request(
            "Connection header must include upgrade",
        ));
    }
    let key = single_header(req, "sec-websocket-key", "Sec-WebSocket-Key")?
        .ok_or_else(|| Refusal::bad_request("missing Sec-WebSocket-Key"))?;
    if base64_decoded_len(key) != Some(16) {
        return Err(Refusal::bad_request(
            "Sec-WebSocket-Key must be 16 bytes in base64",
        ));
    }

    let params = UpgradeParams::collect(&req.query)?;
    let query_mode = match params.mode {
        Some(m) => Some(Mode::parse(m).ok_or_else(|| bad_param("mode"))?),
        None => None,
    };
    let scope_mode = match params.connection_scope {
        None | Some("false") | Some("0") => None,
        Some("true") | Some("1") => Some(Mode::Isolated),
        Some(_) => return Err(bad_param("connection_scope")),
    };
    let mut mode: Option<Mode> = None;
    for m in [path_mode, query_mode, scope_mode].into_iter().flatten() {
        match mode {
            Some(prev) if prev != m => {
                return Err(Refusal::bad_request(
                    "conflicting mode: path, mode and connection_scope disagree",
                ))
            }
            _ => mode = Some(m),
        }
    }
    let mode = mode.unwrap_or(Mode::Main);

    let last_seq = match params.last_seq {
        Some(s) => Some(parse_u64(s).ok_or_else(|| bad_param("last_seq"))?),
        None => None,
    };
    let has_control = |s: &str| s.chars().any(char::is_control);
    if let Some(t) = params.thread_id {
        if t.is_empty() || t.len() > MAX_THREAD_ID_BYTES || has_control(t) {
            return Err(bad_param("thread_id"));
        }
    }
    if let Some(e) = params.epoch {
        if e.len() > MAX_EPOCH_BYTES || has_control(e) {
            return Err(bad_param("epoch"));
        }
    }
    if req.content_length.unwrap_or(0) > 0 || req.chunked {
        return Err(Refusal::bad_request("a WebSocket upgrade has no body"));
    }

    let origin = single_header(req, "origin", "Origin")?.map(str::to_owned);
    let header_token = single_header(req, "authorization", "Authorization")?
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty());
    let subprotocol = req
        .header_tokens("sec-websocket-protocol")
        .any(|p| p == SUBPROTOCOL);
    let protocol_token = if subprotocol {
        req.header_tokens("sec-websocket-protocol")
            .find_map(|p| p.strip_prefix(BEARER_SUBPROTOCOL_PREFIX))
            .filter(|t| !t.is_empty())
    } else {
        None
    };
    let query_token = params.token.filter(|t| allow_query_token && !t.is_empty());
    let token = header_token
        .map(|t| (t, TokenSource::Header))
        .or(protocol_token.map(|t| (t, TokenSource::Subprotocol)))
        .or(query_token.map(|t| (t, TokenSource::Query)))
        .map(|(t, src)| (t.to_owned(), src));

    Ok(Upgrade {
        accept_key: tungstenite::handshake::derive_accept_key(key.as_bytes()),
        mode,
        thread_id: params.thread_id.map(str::to_owned),
        last_seq,
        epoch: params.epoch.map(str::to_owned),
        user_id: params.user_id.map(str::to_owned),
        token,
        subprotocol,
        origin,
    })
}

/// Admit an upgrade as far as the request decides: [`check_upgrade`], then the Origin
/// allow-list ([`origin_allowed`]), then a token that `auth` verifies, then `user_id`
/// (when given) equal to the token's `sub`. Connection limits and draining are the
/// reactor's. An `Ok` always carries verified claims (fuzzed: `fuzz/`, target
/// `http_head`).
///
/// # Errors
/// Those of [`check_upgrade`]; 403 for an Origin not allowed; 401 for no token or one
/// that does not verify; 403 for a `user_id` other than the token's `sub`.
pub fn admit_upgrade(
    req: &Request,
    path_mode: Option<Mode>,
    allow_query_token: bool,
    allowed_origins: &[String],
    auth: &Authenticator,
) -> Result<(Upgrade, Claims), Refusal> {
    let up = check_upgrade(req, path_mode, allow_query_token)?;
    if !origin_allowed(up.origin.as_deref(), allowed_origins) {
        return Err(Refusal::forbidden("origin not allowed"));
    }
    let Some((token, _source)) = &up.token else {
        return Err(Refusal::unauthorized("token missing"));
    };
    let claims = auth
        .verify(token)
        .map_err(|e| Refusal::unauthorized(e.to_string()))?;
    if up.user_id.as_ref().is_some_and(|uid| *uid != claims.sub) {
        return Err(Refusal::forbidden("user_id does not match the token"));
    }
    Ok((up, claims))
}

/// Decimal digits only (no sign, no spaces), fitting a u64.
fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn base64_value(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Length of the bytes `s` encodes in padded, canonical standard base64 (unused bits
/// of the last symbol zero), or `None` when it is not such base64.
fn base64_decoded_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() % 4 != 0 {
        return None;
    }
    let pad = b.iter().rev().take_while(|&&c| c == b'=').count();
    if pad > 2 {
        return None;
    }
    let data = b.get(..b.len() - pad)?;
    if !data.iter().all(|&c| base64_value(c).is_some()) {
        return None;
    }
    let last = base64_value(*data.last()?)?;
    let canonical = match pad {
        1 => last & 0b11 == 0,
        2 => last & 0b1111 == 0,
        _ => true,
    };
    canonical.then_some(b.len() / 4 * 3 - pad)
}

/// True when `origin` is allowed by `allowed`: an empty list allows any; otherwise a
/// present `Origin` must equal an entry as a whole value, ignoring ASCII case (an
/// origin is a scheme, a host and a port, and RFC 6454 serializes scheme and host in
/// lower case, so `HTTPS://App.Example.com` is the origin `https://app.example.com`);
/// `null` and look-alikes such as `http://good.example.evil.com` are refused unless
/// listed. A missing `Origin` is allowed: only browsers send one, and the allow-list
/// exists to stop other sites' pages, not non-browser clients (which could forge it).
pub fn origin_allowed(origin: Option<&str>, allowed: &[String]) -> bool {
    match origin {
        _ if allowed.is_empty() => true,
        None => true,
        Some(o) => allowed.iter().any(|a| a.eq_ignore_ascii_case(o)),
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

// ------------------------------------------------------------------ responses

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

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn parse(head: &str) -> Request {
        match parse_head(head.as_bytes()) {
            Ok(Some((req, n))) => {
                assert_eq!(n, head.len(), "whole input is the head");
                req
            }
            other => panic!("expected a complete head, got {other:?}"),
        }
    }

    fn status_of(buf: &[u8]) -> u16 {
        match parse_head(buf) {
            Err(r) => r.status,
            Ok(other) => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// A valid upgrade head for `target` plus `extra` header lines.
    fn upgrade_head(target: &str, extra: &[&str]) -> String {
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
    fn head(lines: &[&str]) -> String {
        let mut s = lines.join("\r\n");
        s.push_str("\r\n\r\n");
        s
    }

    fn up(target: &str, extra: &[&str]) -> Result<Upgrade, Refusal> {
        let req = parse(&upgrade_head(target, extra));
        let mode = match route(req.method, &req.path) {
            Route::WebSocket(m) => m,
            other => panic!("not a websocket route: {other:?}"),
        };
        check_upgrade(&req, mode, true)
    }

    fn up_status(target: &str, extra: &[&str]) -> u16 {
        match up(target, extra) {
            Ok(u) => panic!("expected a refusal, got {u:?}"),
            Err(r) => r.status,
        }
    }

    fn check_lines(lines: &[&str]) -> Result<Upgrade, Refusal> {
        check_upgrade(&parse(&head(lines)), None, true)
    }

    // -------------------------------------------------------------- parse_head

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
            (req.path.as_str(), route(req.method, &req.path)),
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

    // -------------------------------------------------------------- routing

    #[test]
    fn every_route_and_alias() {
        use Method::*;
        let cases = [
            (Get, "/ws", Route::WebSocket(None)),
            (Get, "/ws/factory", Route::WebSocket(Some(Mode::Factory))),
            (Get, "/ws/isolated", Route::WebSocket(Some(Mode::Isolated))),
            (Get, "/websocket", Route::WebSocket(Some(Mode::Legacy))),
            (Get, "/health", Route::Health),
            (Get, "/ws/health", Route::Health),
            (Get, "/ws/config", Route::Config),
            (Get, "/ws/stats", Route::Stats),
            (Get, "/metrics", Route::Metrics),
            (Post, "/api/events", Route::Publish),
            (Head, "/health", Route::Health),
            (Head, "/ws/health", Route::Health),
            (Head, "/ws/config", Route::Config),
            (Head, "/ws/stats", Route::Stats),
            (Head, "/metrics", Route::Metrics),
            (Head, "/ws", Route::WebSocket(None)),
            // One trailing slash is tolerated.
            (Get, "/ws/", Route::WebSocket(None)),
            (Get, "/ws/factory/", Route::WebSocket(Some(Mode::Factory))),
            (Get, "/health/", Route::Health),
            (Post, "/api/events/", Route::Publish),
            // Unknown paths, whatever the method.
            (Get, "/", Route::NotFound),
            (Get, "/ws//", Route::NotFound),
            (Get, "/WS", Route::NotFound),
            (Get, "/w%73", Route::NotFound),
            (Get, "/ws/other", Route::NotFound),
            (Get, "/healthz", Route::NotFound),
            (Post, "/nope", Route::NotFound),
            (Other, "/nope", Route::NotFound),
            (Get, "*", Route::NotFound),
            (Get, "", Route::NotFound),
            // Method mismatches.
            (Post, "/ws", Route::MethodNotAllowed),
            (Other, "/websocket", Route::MethodNotAllowed),
            (Post, "/health", Route::MethodNotAllowed),
            (Post, "/metrics", Route::MethodNotAllowed),
            (Other, "/ws/stats", Route::MethodNotAllowed),
            (Post, "/ws/config", Route::MethodNotAllowed),
            (Get, "/api/events", Route::MethodNotAllowed),
            (Head, "/api/events", Route::MethodNotAllowed),
            (Other, "/api/events", Route::MethodNotAllowed),
        ];
        for (method, path, want) in cases {
            assert_eq!(route(method, path), want, "{method:?} {path}");
        }
    }

    #[test]
    fn allow_header_for_405() {
        assert_eq!(allowed_methods("/ws"), Some("GET"));
        assert_eq!(allowed_methods("/health/"), Some("GET, HEAD"));
        assert_eq!(allowed_methods("/api/events"), Some("POST"));
        assert_eq!(allowed_methods("/nope"), None);
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

    #[test]
    fn mode_strings() {
        for m in [Mode::Main, Mode::Factory, Mode::Legacy, Mode::Isolated] {
            assert_eq!(Mode::parse(m.as_str()), Some(m));
            assert_eq!(m.to_string(), m.as_str());
            assert_eq!(m.is_isolated(), m == Mode::Isolated);
        }
        assert_eq!(Mode::parse("Main"), None);
        assert_eq!(Mode::parse(""), None);
    }

    // -------------------------------------------------------------- upgrade

    #[test]
    fn accept_key_rfc6455_vector() {
        let u = up("/ws", &[]).unwrap();
        assert_eq!(u.accept_key, ACCEPT);
        assert_eq!(
            tungstenite::handshake::derive_accept_key(KEY.as_bytes()),
            ACCEPT
        );
    }

    #[test]
    fn minimal_upgrade_defaults() {
        let u = up("/ws", &[]).unwrap();
        assert_eq!(u.mode, Mode::Main);
        assert_eq!(
            (u.thread_id, u.last_seq, u.epoch, u.user_id),
            (None, None, None, None)
        );
        assert!(u.token.is_none() && !u.subprotocol && u.origin.is_none());
    }

    #[test]
    fn upgrade_must_be_get_over_http11() {
        let post = head(&[
            "POST /ws HTTP/1.1",
            "Upgrade: websocket",
            "Connection: Upgrade",
            &format!("Sec-WebSocket-Key: {KEY}"),
            "Sec-WebSocket-Version: 13",
        ]);
        assert_eq!(
            check_upgrade(&parse(&post), None, true).unwrap_err().status,
            400
        );
        let head_req = post.replacen("POST", "HEAD", 1);
        assert_eq!(
            check_upgrade(&parse(&head_req), None, true)
                .unwrap_err()
                .status,
            400
        );
        let http10 = upgrade_head("/ws", &[]).replacen("HTTP/1.1", "HTTP/1.0", 1);
        assert_eq!(
            check_upgrade(&parse(&http10), None, true)
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn version_checks_426_and_400() {
        let base = |version: Option<&str>, upgrade: Option<&str>| {
            let key = format!("Sec-WebSocket-Key: {KEY}");
            let mut lines = vec!["GET /ws HTTP/1.1", "Connection: Upgrade", key.as_str()];
            let v = version.map(|v| format!("Sec-WebSocket-Version: {v}"));
            let u = upgrade.map(|u| format!("Upgrade: {u}"));
            lines.extend(v.as_deref());
            lines.extend(u.as_deref());
            check_lines(&lines)
        };
        let r = base(Some("12"), Some("websocket")).unwrap_err();
        assert_eq!(r, Refusal::upgrade_required());
        let resp = String::from_utf8(r.to_response()).unwrap();
        assert!(
            resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
            "{resp}"
        );
        assert!(resp.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{resp}");
        assert_eq!(
            base(Some("8, 13"), Some("websocket")).unwrap_err().status,
            426
        );
        assert_eq!(base(Some(""), Some("websocket")).unwrap_err().status, 426);
        // Upgrade requested, version missing: 426.
        assert_eq!(base(None, Some("websocket")).unwrap_err().status, 426);
        // Neither: a plain GET on /ws is not an upgrade at all.
        assert_eq!(base(None, None).unwrap_err().status, 400);
        let plain = parse(&head(&["GET /ws HTTP/1.1", "Host: gw"]));
        assert_eq!(check_upgrade(&plain, None, true).unwrap_err().status, 400);
        // Version first: a bad version wins over a bad Upgrade header.
        assert_eq!(base(Some("12"), Some("h2c")).unwrap_err().status, 426);
        // Duplicate version headers.
        let dup = upgrade_head("/ws", &["Sec-WebSocket-Version: 13"]);
        assert_eq!(
            check_upgrade(&parse(&dup), None, true).unwrap_err().status,
            426
        );
        assert!(base(Some("13"), Some("websocket")).is_ok());
    }

    #[test]
    fn upgrade_and_connection_headers() {
        let key = format!("Sec-WebSocket-Key: {KEY}");
        let with = |upgrade: &str, connection: &str| {
            let mut lines = vec![
                "GET /ws HTTP/1.1",
                "Sec-WebSocket-Version: 13",
                key.as_str(),
            ];
            if !upgrade.is_empty() {
                lines.push(upgrade);
            }
            if !connection.is_empty() {
                lines.push(connection);
            }
            check_lines(&lines).map(|_| ()).map_err(|r| r.status)
        };
        assert_eq!(with("Upgrade: websocket", "Connection: Upgrade"), Ok(()));
        assert_eq!(
            with("Upgrade: WebSocket", "Connection: keep-alive, Upgrade"),
            Ok(())
        );
        assert_eq!(
            with("Upgrade: h2c, websocket", "Connection: UPGRADE"),
            Ok(())
        );
        assert_eq!(with("Upgrade: h2c", "Connection: Upgrade"), Err(400));
        assert_eq!(with("Upgrade: websocketx", "Connection: Upgrade"), Err(400));
        assert_eq!(with("", "Connection: Upgrade"), Err(400));
        assert_eq!(
            with("Upgrade: websocket", "Connection: keep-alive"),
            Err(400)
        );
        assert_eq!(with("Upgrade: websocket", "Connection: upgrades"), Err(400));
        assert_eq!(with("Upgrade: websocket", ""), Err(400));
        // Connection tokens may be spread over several headers.
        let two = head(&[
            "GET /ws HTTP/1.1",
            "Sec-WebSocket-Version: 13",
            &key,
            "Upgrade: websocket",
            "Connection: keep-alive",
            "Connection: Upgrade",
        ]);
        assert!(check_upgrade(&parse(&two), None, true).is_ok());
    }

    #[test]
    fn websocket_key_checks() {
        let with_key = |keys: &[&str]| {
            let mut lines = vec![
                "GET /ws HTTP/1.1".to_owned(),
                "Upgrade: websocket".into(),
                "Connection: Upgrade".into(),
                "Sec-WebSocket-Version: 13".into(),
            ];
            lines.extend(keys.iter().map(|k| format!("Sec-WebSocket-Key: {k}")));
            let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
            check_lines(&refs)
                .map(|u| u.accept_key)
                .map_err(|r| r.status)
        };
        assert_eq!(with_key(&[KEY]), Ok(ACCEPT.to_owned()));
        assert_eq!(with_key(&["AAAAAAAAAAAAAAAAAAAAAA=="]).map(|_| ()), Ok(()));
        assert_eq!(with_key(&[]), Err(400), "missing");
        assert_eq!(with_key(&[KEY, KEY]), Err(400), "duplicate");
        assert_eq!(with_key(&["c2hvcnQ="]), Err(400), "5 bytes");
        assert_eq!(with_key(&["dGhlIHNhbXBsZSBub25jZQ"]), Err(400), "unpadded");
        assert_eq!(
            with_key(&["dGhlIHNhbXBsZSBub25jZR=="]),
            Err(400),
            "non-canonical"
        );
        assert_eq!(
            with_key(&["dGhlIHNhbXBsZSBub25j*Q=="]),
            Err(400),
            "bad alphabet"
        );
        assert_eq!(
            with_key(&["dGhlIHNhbXBsZSBub25jZQ==dGhl"]),
            Err(400),
            "too long"
        );
        assert_eq!(
            with_key(&["AAAAAAAAAAAAAAAAAAAAAAAA"]),
            Err(400),
            "18 bytes"
        );
        assert_eq!(with_key(&[""]), Err(400), "empty");
    }

    #[test]
    fn base64_lengths() {
        assert_eq!(base64_decoded_len("Zm9vYmFy"), Some(6));
        assert_eq!(base64_decoded_len("Zm9vYg=="), Some(4));
        assert_eq!(base64_decoded_len("Zm9vYmE="), Some(5));
        assert_eq!(base64_decoded_len("Zm9vYh=="), None);
        assert_eq!(base64_decoded_len("Zm9vYmF="), None);
        assert_eq!(base64_decoded_len("Zm9v=mFy"), None);
        assert_eq!(base64_decoded_len("Zm9vY==="), None);
        assert_eq!(base64_decoded_len("===="), None);
        assert_eq!(base64_decoded_len("Zm9"), None);
        assert_eq!(base64_decoded_len(""), None);
    }

    #[test]
    fn mode_from_alias_query_and_connection_scope() {
        let mode = |target: &str| up(target, &[]).map(|u| u.mode).map_err(|r| r.status);
        assert_eq!(mode("/ws"), Ok(Mode::Main));
        assert_eq!(mode("/ws?mode=main"), Ok(Mode::Main));
        assert_eq!(mode("/ws?mode=factory"), Ok(Mode::Factory));
        assert_eq!(mode("/ws?mode=legacy"), Ok(Mode::Legacy));
        assert_eq!(mode("/ws?mode=isolated"), Ok(Mode::Isolated));
        assert_eq!(mode("/ws/factory"), Ok(Mode::Factory));
        assert_eq!(mode("/ws/isolated"), Ok(Mode::Isolated));
        assert_eq!(mode("/websocket"), Ok(Mode::Legacy));
        assert_eq!(mode("/ws/factory?mode=factory"), Ok(Mode::Factory));
        assert_eq!(mode("/websocket?mode=legacy"), Ok(Mode::Legacy));
        assert_eq!(mode("/ws/factory?mode=main"), Err(400));
        assert_eq!(mode("/websocket?mode=isolated"), Err(400));
        assert_eq!(mode("/ws/isolated?mode=factory"), Err(400));
        assert_eq!(mode("/ws?mode=other"), Err(400));
        assert_eq!(mode("/ws?mode=Main"), Err(400));
        assert_eq!(mode("/ws?mode="), Err(400));
        assert_eq!(mode("/ws?mode=main&mode=main"), Err(400));
        // connection_scope=true selects isolated.
        assert_eq!(mode("/ws?connection_scope=true"), Ok(Mode::Isolated));
        assert_eq!(mode("/ws?connection_scope=1"), Ok(Mode::Isolated));
        assert_eq!(mode("/ws?connection_scope=false"), Ok(Mode::Main));
        assert_eq!(
            mode("/ws?connection_scope=0&mode=factory"),
            Ok(Mode::Factory)
        );
        assert_eq!(
            mode("/ws?connection_scope=true&mode=isolated"),
            Ok(Mode::Isolated)
        );
        assert_eq!(
            mode("/ws/isolated?connection_scope=true"),
            Ok(Mode::Isolated)
        );
        assert_eq!(mode("/ws?connection_scope=true&mode=main"), Err(400));
        assert_eq!(mode("/ws/factory?connection_scope=true"), Err(400));
        assert_eq!(mode("/ws?connection_scope=yes"), Err(400));
        // Unknown parameters are ignored.
        assert_eq!(mode("/ws?cachebust=1&mode=factory"), Ok(Mode::Factory));
    }

    #[test]
    fn resume_and_thread_parameters() {
        let u = up(
            "/ws?last_seq=42&epoch=9f2c41d0&thread_id=t%2F1&user_id=u1",
            &[],
        )
        .unwrap();
        assert_eq!(u.last_seq, Some(42));
        assert_eq!(u.epoch.as_deref(), Some("9f2c41d0"));
        assert_eq!(u.thread_id.as_deref(), Some("t/1"));
        assert_eq!(u.user_id.as_deref(), Some("u1"));
        assert_eq!(up("/ws?last_seq=0", &[]).unwrap().last_seq, Some(0));
        assert_eq!(up("/ws?last_seq=007", &[]).unwrap().last_seq, Some(7));
        let max = format!("/ws?last_seq={}", u64::MAX);
        assert_eq!(up(&max, &[]).unwrap().last_seq, Some(u64::MAX));
        for bad in [
            "/ws?last_seq=",
            "/ws?last_seq=-1",
            "/ws?last_seq=+1",
            "/ws?last_seq=1.5",
            "/ws?last_seq=abc",
            "/ws?last_seq=%201",
            "/ws?last_seq=18446744073709551616",
            "/ws?last_seq=1&last_seq=2",
            "/ws?thread_id=",
            "/ws?thread_id=a%0Ab",
            "/ws?thread_id=a&thread_id=b",
            "/ws?epoch=a%00",
            "/ws?epoch=a&epoch=a",
            "/ws?user_id=a&user_id=b",
        ] {
            assert_eq!(up_status(bad, &[]), 400, "{bad}");
        }
        let long = format!("/ws?thread_id={}", "t".repeat(MAX_THREAD_ID_BYTES));
        assert_eq!(
            up(&long, &[]).unwrap().thread_id.map(|t| t.len()),
            Some(MAX_THREAD_ID_BYTES)
        );
        let too_long = format!("/ws?thread_id={}", "t".repeat(MAX_THREAD_ID_BYTES + 1));
        assert_eq!(up_status(&too_long, &[]), 400);
        let epoch_long = format!("/ws?epoch={}", "e".repeat(MAX_EPOCH_BYTES + 1));
        assert_eq!(up_status(&epoch_long, &[]), 400);
        // An empty user_id is passed on (the reactor answers 403: it is not the sub).
        assert_eq!(
            up("/ws?user_id=", &[]).unwrap().user_id.as_deref(),
            Some("")
        );
    }

    #[test]
    fn refusal_messages_never_echo_values() {
        for target in [
            "/ws?mode=SECRET",
            "/ws?last_seq=SECRET",
            "/ws?connection_scope=SECRET",
            "/ws?thread_id=SECRET%0a",
            "/ws?token=SECRET&token=SECRET",
        ] {
            let r = up(target, &[]).unwrap_err();
            assert!(!r.message.contains("SECRET"), "{target}: {}", r.message);
            assert!(!String::from_utf8_lossy(&r.to_response()).contains("SECRET"));
        }
        let r = up(
            "/ws",
            &[
                "Authorization: Bearer SECRET",
                "Authorization: Bearer SECRET",
            ],
        )
        .unwrap_err();
        assert!(r.status == 400 && !r.message.contains("SECRET"));
    }

    #[test]
    fn upgrade_with_a_body_is_400() {
        assert_eq!(up_status("/ws", &["Content-Length: 5"]), 400);
        assert_eq!(up_status("/ws", &["Transfer-Encoding: chunked"]), 400);
        assert!(up("/ws", &["Content-Length: 0"]).is_ok());
    }

    /// Regression (fuzz target http_head): a token pasted into a query value or the
    /// Origin must not reach a `Debug` rendering (logs); only lengths are shown.
    #[test]
    fn upgrade_debug_hides_client_values() {
        let u = up(
            "/ws?thread_id=SECRET1&epoch=SECRET2&user_id=SECRET3&token=SECRET4",
            &["Origin: SECRET5"],
        )
        .unwrap();
        let dbg = format!("{u:?}");
        assert!(!dbg.contains("SECRET"), "{dbg}");
        assert!(dbg.contains("<7 bytes>") && dbg.contains("Query"), "{dbg}");
    }

    #[test]
    fn admission_needs_a_verifying_token() {
        use crate::auth::{AuthSettings, JwtAlgorithm};
        let auth = Authenticator::new(&AuthSettings {
            algorithm: JwtAlgorithm::Hs256,
            secret: Some("admission-test-secret-0123456789abcdef".into()),
            public_key_pem: None,
            issuer: None,
            audience: None,
            leeway_s: 5,
        })
        .unwrap();
        let good = auth.mint("u1", 600).unwrap();
        let admit = |target: &str, extra: &[&str], origins: &[String]| {
            let req = parse(&upgrade_head(target, extra));
            admit_upgrade(&req, None, true, origins, &auth)
        };
        let status =
            |r: Result<(Upgrade, Claims), Refusal>| r.map(|_| 101).unwrap_or_else(|r| r.status);
        let (u, claims) = admit(&format!("/ws?user_id=u1&token={good}"), &[], &[]).unwrap();
        assert_eq!((claims.sub.as_str(), u.mode), ("u1", Mode::Main));
        assert_eq!(status(admit("/ws", &[], &[])), 401);
        assert_eq!(status(admit(&format!("/ws?token={good}x"), &[], &[])), 401);
        assert_eq!(
            status(admit(&format!("/ws?user_id=u2&token={good}"), &[], &[])),
            403
        );
        let origins = ["https://app.example".to_owned()];
        let bearer = format!("Authorization: Bearer {good}");
        assert_eq!(status(admit("/ws", &[&bearer], &origins)), 101);
        assert_eq!(
            status(admit(
                "/ws",
                &[&bearer, "Origin: https://evil.example"],
                &origins
            )),
            403
        );
        // The upgrade checks come first: no token is looked at for a bad request.
        assert_eq!(status(admit("/ws?mode=nope", &[&bearer], &origins)), 400);
    }

    #[test]
    fn token_precedence() {
        let proto = "Sec-WebSocket-Protocol: agentwire.v1, bearer.PROTO";
        let auth = "Authorization: Bearer HDR";
        let tok = |target: &str, extra: &[&str]| up(target, extra).unwrap().token;
        let some = |t: &str, s| Some((t.to_owned(), s));
        assert_eq!(
            tok("/ws?token=Q", &[auth, proto]),
            some("HDR", TokenSource::Header)
        );
        assert_eq!(
            tok("/ws?token=Q", &[proto]),
            some("PROTO", TokenSource::Subprotocol)
        );
        assert_eq!(tok("/ws?token=Q", &[]), some("Q", TokenSource::Query));
        assert_eq!(tok("/ws", &[]), None);
        // Scheme is case-insensitive; other schemes and empty values do not count.
        assert_eq!(
            tok("/ws", &["Authorization: bearer   HDR "]),
            some("HDR", TokenSource::Header)
        );
        assert_eq!(
            tok("/ws?token=Q", &["Authorization: Basic dXNlcg=="]),
            some("Q", TokenSource::Query)
        );
        assert_eq!(
            tok("/ws?token=Q", &["Authorization: Bearer "]),
            some("Q", TokenSource::Query)
        );
        assert_eq!(tok("/ws?token=", &[]), None);
        // Query token switched off.
        let req = parse(&upgrade_head("/ws?token=Q", &[]));
        assert_eq!(check_upgrade(&req, None, false).unwrap().token, None);
        let req = parse(&upgrade_head("/ws?token=Q", &[proto]));
        assert_eq!(
            check_upgrade(&req, None, false).unwrap().token,
            some("PROTO", TokenSource::Subprotocol)
        );
        // The bearer subprotocol counts only next to agentwire.v1, in any header.
        assert_eq!(
            tok("/ws?token=Q", &["Sec-WebSocket-Protocol: bearer.PROTO"]),
            some("Q", TokenSource::Query)
        );
        assert_eq!(
            tok(
                "/ws",
                &[
                    "Sec-WebSocket-Protocol: bearer.PROTO",
                    "Sec-WebSocket-Protocol: agentwire.v1"
                ]
            ),
            some("PROTO", TokenSource::Subprotocol)
        );
        assert_eq!(
            tok(
                "/ws?token=Q",
                &["Sec-WebSocket-Protocol: agentwire.v1, bearer."]
            ),
            some("Q", TokenSource::Query)
        );
        // Percent-decoded query token.
        assert_eq!(
            tok("/ws?token=a%2Eb.c", &[]),
            some("a.b.c", TokenSource::Query)
        );
        // Duplicate credentials are ambiguous.
        assert_eq!(up_status("/ws?token=a&token=b", &[]), 400);
        assert_eq!(
            up_status("/ws", &[auth, "Authorization: Bearer OTHER"]),
            400
        );
        // Debug output redacts the token.
        let dbg = format!(
            "{:?}",
            up("/ws", &["Authorization: Bearer SECRETJWT"]).unwrap()
        );
        assert!(
            !dbg.contains("SECRETJWT") && dbg.contains("Header"),
            "{dbg}"
        );
    }

    #[test]
    fn subprotocol_flag() {
        let flag = |extra: &[&str]| up("/ws", extra).unwrap().subprotocol;
        assert!(!flag(&[]));
        assert!(flag(&["Sec-WebSocket-Protocol: agentwire.v1"]));
        assert!(flag(&["Sec-WebSocket-Protocol: chat, agentwire.v1"]));
        assert!(flag(&["Sec-WebSocket-Protocol: bearer.x, agentwire.v1"]));
        assert!(!flag(&["Sec-WebSocket-Protocol: AGENTWIRE.V1"]));
        assert!(!flag(&["Sec-WebSocket-Protocol: agentwire.v2"]));
    }

    #[test]
    fn origin_is_extracted_not_checked() {
        let u = up("/ws", &["Origin: https://app.example"]).unwrap();
        assert_eq!(u.origin.as_deref(), Some("https://app.example"));
        assert_eq!(
            up_status("/ws", &["Origin: https://a", "Origin: https://b"]),
            400
        );
    }

    #[test]
    fn origin_allow_list() {
        let list = vec![
            "https://app.example".to_owned(),
            "http://localhost:3000".to_owned(),
        ];
        assert!(origin_allowed(Some("https://evil.example"), &[]));
        assert!(origin_allowed(None, &[]));
        assert!(origin_allowed(Some("https://app.example"), &list));
        assert!(origin_allowed(Some("http://localhost:3000"), &list));
        // RFC 6454: scheme and host are case-insensitive; the whole value still counts.
        assert!(origin_allowed(Some("https://APP.example"), &list));
        assert!(origin_allowed(Some("HTTP://LocalHost:3000"), &list));
        assert!(
            origin_allowed(None, &list),
            "non-browser clients send no Origin"
        );
        for bad in [
            "null",
            "",
            "http://app.example",
            "https://app.example/",
            "https://app.example:443",
            "https://app.example.evil.com",
            "https://evil.com/https://app.example",
            "http://localhost:30001",
            " https://app.example",
        ] {
            assert!(!origin_allowed(Some(bad), &list), "{bad:?}");
        }
    }

    // -------------------------------------------------------------- responses

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
            (Refusal::bad_request("m"), 400, "bad_request", "Bad Request"),
            (
                Refusal::unauthorized("m"),
                401,
                "invalid_token",
                "Unauthorized",
            ),
            (Refusal::forbidden("m"), 403, "forbidden", "Forbidden"),
            (Refusal::not_found(), 404, "not_found", "Not Found"),
            (
                Refusal::upgrade_required(),
                426,
                "upgrade_required",
                "Upgrade Required",
            ),
            (
                Refusal::too_many("m"),
                429,
                "too_many_connections",
                "Too Many Requests",
            ),
            (
                Refusal::headers_too_large(),
                431,
                "headers_too_large",
                "Request Header Fields Too Large",
            ),
            (
                Refusal::shutting_down(),
                503,
                "shutting_down",
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
            assert_eq!(json["error"], code);
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

    // -------------------------------------------------------------- robustness

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
                let r = route(req.method, &req.path);
                let _ = keep_alive(&req);
                let _ = format!("{req:?}");
                for allow in [true, false] {
                    match check_upgrade(&req, None, allow) {
                        Ok(u) => {
                            let _ = upgrade_response(&u.accept_key, u.subprotocol);
                            let _ = origin_allowed(u.origin.as_deref(), &["x".to_owned()]);
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
}
