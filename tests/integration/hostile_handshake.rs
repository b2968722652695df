//! Hostile handshakes (PROTOCOL.md section 3, docs/HOSTILE.md): oversized heads with
//! a bound on the reactor's CPU time, malformed and non-WebSocket upgrades, versions
//! other than 13, a compression offer and compressed (RSV) frames, Origin look-alikes,
//! odd paths and methods, HTTP bodies and bytes pipelined behind a request. Cases
//! already covered elsewhere (a 17 KiB head, 101 headers, version 12, missing upgrade
//! headers, `null` and `.evil.com` origins, `/nope`, two pipelined `/health`) are not
//! repeated here.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use crate::support::{
    assert_refusal, bearer, client_frame, config, http_request, http_request_streamed, log_capture,
    read_response, read_response_from, thread_cpu, token, upgrade, upgrade_head, Agent, RawWs,
    TestGateway, WAIT, WS_KEY,
};

/// Wall-clock bound on answering one oversized head (measured: milliseconds).
const ANSWER_BOUND: Duration = Duration::from_secs(3);
/// Bound on the reactor thread's CPU time for one oversized head: it scans at most a
/// 16 KiB window per read, so a 1 MiB line costs about as much as a 16 KiB one.
const CPU_BOUND: Duration = Duration::from_millis(500);

/// The head of an upgrade with every line given explicitly (no defaults).
fn head(lines: &[&str]) -> String {
    let mut h = lines.join("\r\n");
    h.push_str("\r\n\r\n");
    h
}

/// Each oversized head is refused with 431 `headers_too_large` within
/// [`ANSWER_BOUND`], costing the reactor under [`CPU_BOUND`] of CPU; a healthy client
/// is served right after.
#[test]
fn hostile_oversized_heads_are_431_in_bounded_time_and_cpu() {
    let (gw, tid) = TestGateway::start_watched(config(), Agent::None);
    let t = token("hs-oversized");
    let big_line = format!("X-Big: {}", "a".repeat(1 << 20));
    let many: Vec<String> = (0..200).map(|i| format!("X-H{i}: v")).collect();
    let long_target = format!("/ws?pad={}", "q".repeat(64 * 1024));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "1 MiB header line",
            upgrade_head(gw.addr, "/ws", &[bearer(&t), big_line]).into_bytes(),
        ),
        (
            "200 headers",
            upgrade_head(gw.addr, "/ws", &[&[bearer(&t)], &many[..]].concat()).into_bytes(),
        ),
        (
            "64 KiB request line",
            upgrade_head(gw.addr, &long_target, &[bearer(&t)]).into_bytes(),
        ),
        (
            "1 MiB of header bytes with no line break at all",
            format!("GET /ws HTTP/1.1\r\nX: {}", "b".repeat(1 << 20)).into_bytes(),
        ),
    ];
    for (name, bytes) in cases {
        let cpu_before = thread_cpu(tid);
        let (r, took) = http_request_streamed(gw.addr, bytes);
        let cpu = thread_cpu(tid).saturating_sub(cpu_before);
        eprintln!("{name}: {} in {took:?}, reactor CPU {cpu:?}", r.status);
        assert_refusal(&r, 431, "headers_too_large");
        assert!(took < ANSWER_BOUND, "{name}: answered after {took:?}");
        assert!(cpu < CPU_BOUND, "{name}: reactor used {cpu:?} of CPU");
    }
    let mut c = gw.connect("hs-oversized-after");
    c.ping_pong();
    log_capture::assert_clean();
}

/// Malformed upgrades: each answered with its documented status (400, 405, 426) and
/// `{"error","message"}` body, never a 101.
#[test]
fn hostile_malformed_upgrades_are_refused() {
    let gw = TestGateway::plain();
    let auth = format!("Authorization: Bearer {}", token("hs-malformed"));
    let key = format!("Sec-WebSocket-Key: {WS_KEY}");
    let up = "Upgrade: websocket";
    let conn = "Connection: Upgrade";
    let v13 = "Sec-WebSocket-Version: 13";
    let base = |first: &str, extra: &[&str]| {
        let mut lines = vec![first, "Host: x", up, conn, v13, key.as_str(), auth.as_str()];
        lines.extend_from_slice(extra);
        head(&lines)
    };
    let without = |drop: &str, extra: &[&str]| {
        let mut lines: Vec<&str> = vec![
            "GET /ws HTTP/1.1",
            "Host: x",
            up,
            conn,
            v13,
            key.as_str(),
            auth.as_str(),
        ];
        lines.retain(|l| !l.starts_with(drop));
        lines.extend_from_slice(extra);
        head(&lines)
    };
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "POST /ws",
            base("POST /ws HTTP/1.1", &[]),
            405,
            "method_not_allowed",
        ),
        (
            "PUT /ws",
            base("PUT /ws HTTP/1.1", &[]),
            405,
            "method_not_allowed",
        ),
        (
            "DELETE /ws",
            base("DELETE /ws HTTP/1.1", &[]),
            405,
            "method_not_allowed",
        ),
        (
            "OPTIONS /ws",
            base("OPTIONS /ws HTTP/1.1", &[]),
            405,
            "method_not_allowed",
        ),
        (
            "lower-case get",
            base("get /ws HTTP/1.1", &[]),
            405,
            "method_not_allowed",
        ),
        (
            "HTTP/1.0 upgrade",
            base("GET /ws HTTP/1.0", &[]),
            400,
            "bad_request",
        ),
        (
            "HTTP/2.0 request line",
            base("GET /ws HTTP/2.0", &[]),
            400,
            "bad_request",
        ),
        (
            "missing Sec-WebSocket-Key",
            without("Sec-WebSocket-Key", &[]),
            400,
            "bad_request",
        ),
        (
            "duplicate Sec-WebSocket-Key",
            base("GET /ws HTTP/1.1", &[key.as_str()]),
            400,
            "bad_request",
        ),
        (
            "Sec-WebSocket-Key not base64",
            without(
                "Sec-WebSocket-Key",
                &["Sec-WebSocket-Key: not base64 at all!"],
            ),
            400,
            "bad_request",
        ),
        (
            "Sec-WebSocket-Key of 15 bytes",
            without(
                "Sec-WebSocket-Key",
                &["Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA"],
            ),
            400,
            "bad_request",
        ),
        (
            "Sec-WebSocket-Key of 17 bytes",
            without(
                "Sec-WebSocket-Key",
                &["Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAA="],
            ),
            400,
            "bad_request",
        ),
        (
            "Sec-WebSocket-Key without padding",
            without(
                "Sec-WebSocket-Key",
                &["Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ"],
            ),
            400,
            "bad_request",
        ),
        (
            "Sec-WebSocket-Key non-canonical last symbol",
            without(
                "Sec-WebSocket-Key",
                &["Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZR=="],
            ),
            400,
            "bad_request",
        ),
        (
            "empty Sec-WebSocket-Key",
            without("Sec-WebSocket-Key", &["Sec-WebSocket-Key: "]),
            400,
            "bad_request",
        ),
        (
            "Upgrade: h2c",
            without("Upgrade:", &["Upgrade: h2c"]),
            400,
            "bad_request",
        ),
        (
            "Upgrade: h2c, no version header (not a WebSocket upgrade)",
            without("Upgrade:", &["Upgrade: h2c"]).replace("Sec-WebSocket-Version: 13\r\n", ""),
            400,
            "bad_request",
        ),
        (
            "Connection without upgrade",
            without("Connection:", &["Connection: keep-alive"]),
            400,
            "bad_request",
        ),
        (
            "an upgrade with a body",
            base("GET /ws HTTP/1.1", &["Content-Length: 5"]) + "hello",
            400,
            "bad_request",
        ),
        (
            "an upgrade with a chunked body",
            base("GET /ws HTTP/1.1", &["Transfer-Encoding: chunked"]) + "5\r\nhello\r\n0\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            "HEAD /ws with upgrade headers",
            base("HEAD /ws HTTP/1.1", &[]),
            400,
            "bad_request",
        ),
        ("no request line", head(&["Host: x"]), 400, "bad_request"),
        (
            "a NUL in a header name",
            base("GET /ws HTTP/1.1", &["X-\0: v"]),
            400,
            "bad_request",
        ),
        (
            "a bare LF inside a header value",
            base("GET /ws HTTP/1.1", &["X-A: a\nb"]),
            400,
            "bad_request",
        ),
    ];
    let mut failures = Vec::new();
    for (name, raw, status, code) in &cases {
        let r = http_request(gw.addr, raw.as_bytes());
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        if r.status != *status || body["error"] != *code {
            failures.push(format!(
                "{name}: expected {status} {code}, got {} {}",
                r.status,
                r.text()
            ));
        }
        if *status == 405 && r.header("allow") != Some("GET") {
            failures.push(format!("{name}: 405 without Allow: GET ({:?})", r.headers));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} malformed upgrades answered wrongly:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    log_capture::assert_clean();
}

/// Every version other than a single `13` is 426 `upgrade_required` with
/// `Sec-WebSocket-Version: 13` in the answer.
#[test]
fn hostile_versions_other_than_13_are_426() {
    let gw = TestGateway::plain();
    let t = token("hs-version");
    for version in [
        vec!["Sec-WebSocket-Version: 8"],
        vec!["Sec-WebSocket-Version: 14"],
        vec!["Sec-WebSocket-Version: 0"],
        vec!["Sec-WebSocket-Version: 13, 8"],
        vec!["Sec-WebSocket-Version: 013"],
        vec!["Sec-WebSocket-Version: "],
        vec!["Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 13"],
        vec![],
    ] {
        let mut lines = vec![
            "GET /ws HTTP/1.1".to_owned(),
            "Host: x".into(),
            "Upgrade: websocket".into(),
            "Connection: Upgrade".into(),
            format!("Sec-WebSocket-Key: {WS_KEY}"),
            bearer(&t),
        ];
        lines.extend(version.iter().map(|v| (*v).to_owned()));
        let raw = head(&lines.iter().map(String::as_str).collect::<Vec<_>>());
        let r = http_request(gw.addr, raw.as_bytes());
        assert_refusal(&r, 426, "upgrade_required");
        assert_eq!(
            r.header("sec-websocket-version"),
            Some("13"),
            "{version:?}: {:?}",
            r.headers
        );
    }
    log_capture::assert_clean();
}

/// `permessage-deflate` offered: the upgrade succeeds without negotiating it (no
/// `Sec-WebSocket-Extensions` in the 101); a frame with RSV1 (a compressed frame), RSV2
/// or RSV3 set then closes with 1002.
#[test]
fn hostile_compression_is_never_negotiated_and_rsv_frames_close_1002() {
    let gw = TestGateway::plain();
    for (i, rsv) in [0x40u8, 0x20, 0x10].into_iter().enumerate() {
        let user = format!("hs-rsv-{i}");
        let mut s = TcpStream::connect_timeout(&gw.addr, WAIT).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let req = upgrade_head(
            gw.addr,
            "/ws",
            &[
                bearer(&token(&user)),
                "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits, \
                 x-webkit-deflate-frame"
                    .into(),
            ],
        );
        s.write_all(req.as_bytes()).expect("write upgrade");
        let r = read_response(&mut s);
        assert_eq!(r.status, 101, "{}", r.text());
        assert_eq!(
            r.header("sec-websocket-extensions"),
            None,
            "no extension negotiated: {:?}",
            r.headers
        );
        let mut raw = RawWs::from_parts(s, r.body);
        let (op, _) = raw.next_frame(WAIT).expect("connected frame");
        assert_eq!(op, 0x1);
        // {"type":"ping"} deflated would go here; any payload with RSV1 is a violation.
        let mut frame = client_frame(0x1, br#"{"type":"ping"}"#, true, true);
        frame[0] |= rsv;
        raw.send(&frame);
        assert_eq!(raw.expect_close(WAIT), 1002, "RSV bits {rsv:#04x}");
    }
    gw.wait_stats("the RSV connections closed as protocol errors", |s| {
        s["connections"]["closed_by_reason"]["protocol_error"] == 3 && s["connections"]["open"] == 0
    });
    log_capture::assert_clean();
}

/// With `allowed_origins = https://app.example.com`: look-alikes, other schemes and
/// ports, paths, a second Origin header are refused; the listed origin in another
/// letter case is the same origin (RFC 6454: scheme and host compare
/// case-insensitively) and is accepted.
#[test]
fn hostile_origin_look_alikes_are_403() {
    let mut cfg = config();
    cfg.allowed_origins = vec!["https://app.example.com".into()];
    let gw = TestGateway::start(cfg, Agent::None);
    let t = token("hs-origin");
    let refused = [
        "https://evilapp.example.com",
        "http://app.example.com",
        "https://app.example.com:8443",
        "https://app.example.com:443.evil.com",
        "https://app.example.com/",
        "https://app.example.com/path",
        "https://app.example.co",
        "https://app.example.com.",
        "https://sub.app.example.com",
        "wss://app.example.com",
        "https://app.example.com%2eevil.com",
        "https://app.example.com@evil.com",
        "https://evil.com#https://app.example.com",
        "",
        "*",
        "null ",
    ];
    let mut failures = Vec::new();
    for origin in refused {
        let r = upgrade(gw.addr, "/ws", &[bearer(&t), format!("Origin: {origin}")]);
        if r.status != 403 {
            failures.push(format!("Origin {origin:?}: expected 403, got {}", r.status));
        }
    }
    let r = upgrade(
        gw.addr,
        "/ws",
        &[
            bearer(&t),
            "Origin: https://app.example.com".into(),
            "Origin: https://evil.example.com".into(),
        ],
    );
    if r.status != 400 {
        failures.push(format!(
            "two Origin headers: expected 400, got {}",
            r.status
        ));
    }
    for origin in [
        "https://app.example.com",
        "https://APP.Example.COM",
        "HTTPS://app.example.com",
    ] {
        let r = upgrade(gw.addr, "/ws", &[bearer(&t), format!("Origin: {origin}")]);
        if r.status != 101 {
            failures.push(format!(
                "Origin {origin:?}: expected 101, got {} {}",
                r.status,
                r.text()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    log_capture::assert_clean();
}

/// Paths that look like a known one but are not: 404 `not_found` for an upgrade and
/// for a plain GET.
#[test]
fn hostile_unknown_paths_are_404() {
    let gw = TestGateway::plain();
    let t = token("hs-paths");
    let long = format!("/{}", "x".repeat(12 * 1024));
    let paths = [
        "/WS",
        "/Ws",
        "/ws//",
        "//ws",
        "/ws%2f",
        "/w%73",
        "/./ws",
        "/../ws",
        "/ws/../ws",
        "/ws.json",
        "/wss",
        "/ws/isolated/x",
        "/websocket//",
        "*",
        long.as_str(),
    ];
    let mut failures = Vec::new();
    for path in paths {
        for r in [
            upgrade(gw.addr, path, &[bearer(&t)]),
            http_request(
                gw.addr,
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            ),
        ] {
            if r.status != 404 {
                failures.push(format!("{:.40}: expected 404, got {}", path, r.status));
            }
        }
    }
    // Paths that normalise to a WebSocket route are upgrades (one trailing slash, the
    // absolute form): not 404.
    for path in ["/ws/", "http://example.com/ws"] {
        let r = upgrade(gw.addr, path, &[bearer(&t)]);
        if r.status != 101 {
            failures.push(format!(
                "{path}: expected 101, got {} {}",
                r.status,
                r.text()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    log_capture::assert_clean();
}

/// HEAD is answered with the GET's headers and no body; a GET with a body is answered
/// and the connection closed (the body is never parsed as a request).
#[test]
fn hostile_head_and_bodies_on_get() {
    let gw = TestGateway::plain();
    let mut s = TcpStream::connect_timeout(&gw.addr, WAIT).expect("connect");
    s.write_all(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut buf = Vec::new();
    // HEAD: a Content-Length but no body, so the next response starts right after.
    let head_r = read_head_only(&mut s, &mut buf);
    assert_eq!(head_r.0, 200, "HEAD /health");
    assert!(head_r.1 > 0, "HEAD keeps the GET's Content-Length");
    let get_r = read_response_from(&mut s, &mut buf);
    assert_eq!(get_r.status, 200);
    assert_eq!(get_r.json()["status"], "healthy");

    // A body smuggling a second request: answered once, then closed.
    let smuggle = "GET /ws/stats HTTP/1.1\r\nHost: x\r\n\r\n";
    let raw = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{smuggle}",
        smuggle.len()
    );
    let mut s = TcpStream::connect_timeout(&gw.addr, WAIT).expect("connect");
    s.write_all(raw.as_bytes()).expect("write");
    let mut buf = Vec::new();
    let r = read_response_from(&mut s, &mut buf);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"), "{:?}", r.headers);
    assert_eq!(read_to_eof(&mut s, &mut buf), 0, "nothing after the answer");
    assert!(
        buf.is_empty(),
        "the smuggled request was not answered: {buf:?}"
    );
    log_capture::assert_clean();
}

/// Bytes pipelined behind requests: after a refused upgrade nothing more is answered;
/// after an accepted upgrade, a plain HTTP request is read as WebSocket frames (a
/// protocol violation: close 1002); after `Connection: close` nothing more is answered;
/// 500 pipelined `/health` requests are all answered in order, in bounded time.
#[test]
fn hostile_bytes_pipelined_behind_requests() {
    let gw = TestGateway::plain();
    let health = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";

    // Refused upgrade (no token) + a pipelined request: one answer, then EOF.
    let mut s = TcpStream::connect_timeout(&gw.addr, WAIT).expect("connect");
    s.write_all((upgrade_head(gw.addr, "/ws", &[]) + health).as_bytes())
        .expect("write");
    let mut buf = Vec::new();
    let r = read_response_from(&mut s, &mut buf);
    assert_refusal(&r, 401, "invalid_token");
    assert_eq!(
        read_to_eof(&mut s, &mut buf),
        0,
        "nothing after the refusal"
    );

    // Accepted upgrade + a pipelined HTTP request: 101, connected, then close 1002.
    let mut s = TcpStream::connect_timeout(&gw.addr, WAIT).expect("connect");
    s.write_all((upgrade_head(gw.addr, "/ws", &[bearer(&token("hs-pipe"))]) + health).as_bytes())
        .expect("write");
    let r = read_response(&mut s);
    assert_eq!(r.status, 101, "{}", r.text());
    let mut raw = RawWs::from_parts(s, r.body);
    assert_eq!(raw.expect_close(WAIT), 1002);

    // Connection: close, then another request: one answer, then EOF.
    let mut s = TcpStream::connect_timeout(&gw.addr, WAIT).expect("connect");
    s.write_all(
        format!("GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n{health}").as_bytes(),
    )
    .expect("write");
    let mut buf = Vec::new();
    assert_eq!(read_response_from(&mut s, &mut buf).status, 200);
    assert_eq!(
        read_to_eof(&mut s, &mut buf),
        0,
        "nothing after Connection: close"
    );

    // 500 pipelined requests in one write.
    let started = std::time::Instant::now();
    let mut s = TcpStream::connect_timeout(&gw.addr, WAIT).expect("connect");
    s.write_all(health.repeat(500).as_bytes()).expect("write");
    let mut buf = Vec::new();
    for i in 0..500 {
        let r = read_response_from(&mut s, &mut buf);
        assert_eq!(r.status, 200, "pipelined request {i}");
    }
    let took = started.elapsed();
    eprintln!("500 pipelined /health answered in {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "500 pipelined requests took {took:?}"
    );
    log_capture::assert_clean();
}

/// Read one response head (status, Content-Length) without expecting a body (HEAD).
fn read_head_only(s: &mut TcpStream, buf: &mut Vec<u8>) -> (u16, usize) {
    use std::io::Read;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let status = text
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .expect("status");
            let len = text
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            return (status, len);
        }
        let remaining = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(!remaining.is_zero(), "no response head within {WAIT:?}");
        s.set_read_timeout(Some(remaining)).expect("timeout");
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => panic!("EOF before a response head"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Read until EOF (within [`WAIT`]); returns how many more bytes arrived.
fn read_to_eof(s: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    use std::io::Read;
    let before = buf.len();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let remaining = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(!remaining.is_zero(), "no EOF within {WAIT:?}");
        s.set_read_timeout(Some(remaining)).expect("timeout");
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => return buf.len() - before,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return buf.len() - before,
            Err(e) => panic!("read: {e}"),
        }
    }
}
