//! The demo page's routes (PROTOCOL.md section 10.2): `GET /` and its assets with their
//! content types when `demo_page` is on (dev mode, or set), 404 when off; HEAD;
//! `POST /dev/token` only in dev mode ([`Gateway::new_dev`]), 400 for a bad `user_id`,
//! and its token opens a WebSocket for that user.

use crate::support::*;
use agentwire::{Config, Gateway, GatewayHandle};
use serde_json::json;

/// A gateway started with [`Gateway::new_dev`] (dev mode) on the test config, or with
/// [`Gateway::new`]; shut down on drop.
struct Started {
    addr: std::net::SocketAddr,
    handle: Option<GatewayHandle>,
}

impl Started {
    fn new(cfg: Config, dev: bool) -> Started {
        let gateway = if dev {
            Gateway::new_dev(cfg)
        } else {
            Gateway::new(cfg)
        }
        .expect("gateway config is valid and binds");
        let addr = gateway.local_addr();
        let handle = gateway.spawn().expect("reactor thread");
        Started {
            addr,
            handle: Some(handle),
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            // Bounded: the test config's shutdown grace is 1 s.
            let _ = h.shutdown();
        }
    }
}

fn head(addr: std::net::SocketAddr, path: &str) -> HttpResponse {
    http_request(
        addr,
        format!("HEAD {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

fn post_token(addr: std::net::SocketAddr, body: &str) -> HttpResponse {
    http_request(
        addr,
        format!(
            "POST /dev/token HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

const ASSETS: [(&str, &str); 5] = [
    ("/", "text/html; charset=utf-8"),
    ("/agentwire.js", "text/javascript; charset=utf-8"),
    ("/demo/app.js", "text/javascript; charset=utf-8"),
    ("/demo/style.css", "text/css; charset=utf-8"),
    ("/demo/icon.svg", "image/svg+xml"),
];

#[test]
fn dev_mode_serves_the_page_and_its_assets() {
    let gw = Started::new(config(), true);
    for (path, content_type) in ASSETS {
        let r = get(gw.addr, path);
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some(content_type), "{path}");
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert!(r.header("cache-control").is_some(), "{path}");
        assert!(!r.body.is_empty(), "{path}");
        let h = head(gw.addr, path);
        assert_eq!(h.status, 200, "HEAD {path}");
        assert!(h.body.is_empty(), "HEAD {path} has no body");
        assert_eq!(
            h.header("content-length"),
            Some(r.body.len().to_string().as_str())
        );
    }
    let page = get(gw.addr, "/");
    let csp = page
        .header("content-security-policy")
        .expect("the page has a CSP");
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(page.text().contains("data-testid=\"connection-status\""));
    // The browser client, byte for byte.
    let client = get(gw.addr, "/agentwire.js");
    assert_eq!(client.body, include_bytes!("../../clients/js/agentwire.js"));
    // Paths next to the assets are still unknown.
    assert_eq!(get(gw.addr, "/demo/nope.js").status, 404);
}

#[test]
fn demo_page_off_is_404() {
    // Not dev mode, demo_page auto: off.
    let gw = Started::new(config(), false);
    for (path, _) in ASSETS {
        assert_refusal(&get(gw.addr, path), 404, "not_found");
    }
    // Dev mode with demo_page = false: the page is off, /dev/token still answers.
    let cfg = Config {
        demo_page: Some(false),
        ..config()
    };
    let gw = Started::new(cfg, true);
    assert_refusal(&get(gw.addr, "/"), 404, "not_found");
    assert_eq!(post_token(gw.addr, r#"{"user_id":"ann"}"#).status, 200);
    // demo_page = true outside dev mode: the page, but no token endpoint.
    let cfg = Config {
        demo_page: Some(true),
        ..config()
    };
    let gw = Started::new(cfg, false);
    assert_eq!(get(gw.addr, "/").status, 200);
    assert_refusal(
        &post_token(gw.addr, r#"{"user_id":"ann"}"#),
        404,
        "not_found",
    );
}

#[test]
fn dev_token_only_in_dev_mode() {
    let prod = Started::new(config(), false);
    assert_refusal(
        &post_token(prod.addr, r#"{"user_id":"ann"}"#),
        404,
        "not_found",
    );

    let dev = Started::new(config(), true);
    let r = post_token(dev.addr, r#"{"user_id":"ann"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let token = r.json()["token"]
        .as_str()
        .expect("token is a string")
        .to_owned();
    // The token opens a WebSocket as that user (signed with the gateway's secret).
    let client = connect_with(
        dev.addr,
        "/ws",
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .expect("the dev token is accepted");
    assert_eq!(client.connected["user_id"], json!("ann"));
}

#[test]
fn dev_token_refuses_a_bad_user_id() {
    let dev = Started::new(config(), true);
    let long = format!(r#"{{"user_id":"{}"}}"#, "x".repeat(129));
    for body in [
        "",
        "not json",
        "{}",
        r#"{"user_id":""}"#,
        r#"{"user_id":42}"#,
        r#"["ann"]"#,
        &long,
    ] {
        assert_refusal(&post_token(dev.addr, body), 400, "bad_request");
    }
    let at_limit = format!(r#"{{"user_id":"{}"}}"#, "x".repeat(128));
    assert_eq!(post_token(dev.addr, &at_limit).status, 200);
    // A body over the endpoint's bound is refused on its Content-Length.
    let huge = format!(r#"{{"user_id":"{}"}}"#, "x".repeat(8192));
    assert_eq!(post_token(dev.addr, &huge).status, 413);
    // Other methods: 405 with Allow: POST.
    let r = get(dev.addr, "/dev/token");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
}
