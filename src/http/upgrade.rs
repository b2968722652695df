//! WebSocket upgrade admission (PROTOCOL.md section 3): [`check_upgrade`] validates the
//! upgrade headers (method, version, `Upgrade`/`Connection`, a canonical base64
//! `Sec-WebSocket-Key`) and extracts the connection parameters into an [`Upgrade`]
//! (mode, thread, resume point, claimed user, token and where it came from, origin);
//! [`admit_upgrade`] then checks the origin, verifies the token and compares `user_id`
//! with its `sub`. Connection limits and draining are the reactor's.

use std::fmt;

use super::{Method, Refusal, Request};
use crate::agui::Encoding;
use crate::auth::{Authenticator, Claims};
use crate::ids::{has_control_characters, ThreadId, UserId};
use crate::mode::Mode;
use crate::origin;

/// Largest `epoch` query parameter in bytes; over it: 400.
pub const MAX_EPOCH_BYTES: usize = 256;
/// The WebSocket subprotocol the gateway speaks (section 3).
pub const SUBPROTOCOL: &str = "agentwire.v1";
/// Prefix of the subprotocol entry carrying a JWT (`bearer.<jwt>`).
pub const BEARER_SUBPROTOCOL_PREFIX: &str = "bearer.";

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

/// A valid WebSocket upgrade request, with the connection parameters of section 3.
///
/// `Debug` redacts the token and shows only the lengths of the client's text values.
#[derive(Clone)]
pub struct Upgrade {
    /// `Sec-WebSocket-Accept` value derived from the client's key.
    pub accept_key: String,
    /// The resolved mode (path alias, `mode`, `connection_scope`; default main).
    pub mode: Mode,
    /// `thread_id` filter.
    pub thread_id: Option<ThreadId>,
    /// `last_seq` resume point.
    pub last_seq: Option<u64>,
    /// `encoding`: how events are written (`agentwire`, the default, or `agui`).
    pub encoding: Encoding,
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
    /// The `Origin` header, unchecked (see [`origin::allowed`]).
    pub origin: Option<String>,
}

impl fmt::Debug for Upgrade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Query and header values are client text (a token pasted into `thread_id`
        // would be logged, found by fuzzing): only their lengths are shown.
        let len = |v: Option<&str>| v.map(|s| format!("<{} bytes>", s.len()));
        f.debug_struct("Upgrade")
            .field("accept_key", &self.accept_key)
            .field("mode", &self.mode)
            .field("thread_id", &len(self.thread_id.as_deref()))
            .field("last_seq", &self.last_seq)
            .field("encoding", &self.encoding)
            .field("epoch", &len(self.epoch.as_deref()))
            .field("user_id", &len(self.user_id.as_deref()))
            .field(
                "token",
                &self.token.as_ref().map(|(_, src)| ("<redacted>", *src)),
            )
            .field("subprotocol", &self.subprotocol)
            .field("origin", &len(self.origin.as_deref()))
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
    encoding: Option<&'a str>,
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
                "encoding" => (&mut p.encoding, "encoding"),
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

/// Validate an upgrade for `path_mode` (from
/// [`Route::WebSocket`](super::Route::WebSocket)) and extract its connection
/// parameters. Does not verify the token or the origin.
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
///   that is not a u64 in decimal, an `encoding` other than `agentwire|agui`, a `thread_id` that is not a [`ThreadId`] (empty, over
///   256 bytes or with control characters), an `epoch` over [`MAX_EPOCH_BYTES`] or with
///   control characters;
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
    let key = req
        .single_header("sec-websocket-key", "Sec-WebSocket-Key")?
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
    let encoding = match params.encoding {
        Some(e) => Encoding::parse(e).ok_or_else(|| {
            Refusal::bad_request("bad query parameter encoding (expected agentwire or agui)")
        })?,
        None => Encoding::Agentwire,
    };
    let thread_id = match params.thread_id {
        Some(t) => Some(ThreadId::parse(t).map_err(|_| bad_param("thread_id"))?),
        None => None,
    };
    if let Some(e) = params.epoch {
        if e.len() > MAX_EPOCH_BYTES || has_control_characters(e) {
            return Err(bad_param("epoch"));
        }
    }
    if req.content_length.unwrap_or(0) > 0 || req.chunked {
        return Err(Refusal::bad_request("a WebSocket upgrade has no body"));
    }

    let origin = req.single_header("origin", "Origin")?.map(str::to_owned);
    let header_token = req.bearer()?;
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
        thread_id,
        last_seq,
        encoding,
        epoch: params.epoch.map(str::to_owned),
        user_id: params.user_id.map(str::to_owned),
        token,
        subprotocol,
        origin,
    })
}

/// Admit an upgrade as far as the request decides: [`check_upgrade`], then the Origin
/// allow-list ([`origin::allowed`]), then a token that `auth` verifies, then `user_id`
/// (when given) a [`UserId`] equal to the token's `sub`, byte for byte. Connection limits and draining are the
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
    if !origin::allowed(up.origin.as_deref(), allowed_origins) {
        return Err(Refusal::forbidden("origin not allowed"));
    }
    let Some((token, _source)) = &up.token else {
        return Err(Refusal::unauthorized("token missing"));
    };
    let claims = auth
        .verify(token)
        .map_err(|e| Refusal::unauthorized(e.to_string()))?;
    // A claimed user_id that is not a valid UserId can never be the sub: 403 as for any
    // other mismatch (PROTOCOL.md section 3), never 400.
    if up
        .user_id
        .as_deref()
        .is_some_and(|uid| UserId::check(uid).is_err() || *uid != *claims.sub)
    {
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
    if b.is_empty() || !b.len().is_multiple_of(4) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::tests::{head, parse, upgrade_head, ACCEPT, KEY};
    use crate::http::Route;

    fn up(target: &str, extra: &[&str]) -> Result<Upgrade, Refusal> {
        let req = parse(&upgrade_head(target, extra));
        let mode = match Route::of(req.method, &req.path) {
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
    fn encoding_is_agentwire_or_agui_and_anything_else_is_refused() {
        let enc = |target: &str| up(target, &[]).map(|u| u.encoding).map_err(|r| r.status);
        assert_eq!(enc("/ws"), Ok(Encoding::Agentwire));
        assert_eq!(enc("/ws?encoding=agentwire"), Ok(Encoding::Agentwire));
        assert_eq!(enc("/ws?encoding=agui"), Ok(Encoding::Agui));
        assert_eq!(enc("/ws/isolated?encoding=agui"), Ok(Encoding::Agui));
        for bad in ["AGUI", "ag-ui", "", "json", "agui%20"] {
            assert_eq!(enc(&format!("/ws?encoding={bad}")), Err(400), "{bad:?}");
        }
        assert_eq!(enc("/ws?encoding=agui&encoding=agui"), Err(400));
        let refusal = up("/ws?encoding=xml", &[]).unwrap_err();
        assert!(String::from_utf8_lossy(&refusal.to_response()).contains("encoding"));
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
        let long = format!("/ws?thread_id={}", "t".repeat(ThreadId::MAX_BYTES));
        assert_eq!(
            up(&long, &[]).unwrap().thread_id.map(|t| t.len()),
            Some(ThreadId::MAX_BYTES)
        );
        let too_long = format!("/ws?thread_id={}", "t".repeat(ThreadId::MAX_BYTES + 1));
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
        // A claimed user_id that is no UserId is a mismatch like any other: 403.
        let long = "u".repeat(UserId::MAX_BYTES + 1);
        for claimed in ["", "U1", "u1%00", long.as_str()] {
            let target = format!("/ws?user_id={claimed}&token={good}");
            assert_eq!(status(admit(&target, &[], &[])), 403, "{claimed}");
        }
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
}
