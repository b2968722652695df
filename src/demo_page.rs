//! The demo page of PROTOCOL.md section 10.2: a self-contained chat page served at
//! `GET /` (with its script, style sheet and icon, and the browser client
//! `clients/js/agentwire.js` as `/agentwire.js`, unchanged), all built into the binary,
//! and the dev-mode token endpoint `POST /dev/token` the page logs in with.
//!
//! Nothing here does I/O: the reactor routes the requests here ([`DemoAsset`],
//! [`DemoPage::asset`], [`DemoPage::dev_token`]) and writes the bytes returned.
//!
//! - The page is on when `demo_page` says so (default: on in dev mode, off otherwise);
//!   when off, every path of [`DemoAsset`] is 404, like an unknown path.
//! - `POST /dev/token` with `{"user_id": U}` answers `{"token": JWT}`, an HS256 token
//!   for `sub = U` signed with the gateway's (generated) secret, valid for
//!   [`DEV_TOKEN_TTL_S`] (or `jwt_max_lifetime_s` when shorter). Only a gateway built
//!   with [`crate::Gateway::new_dev`] has it; elsewhere it is 404. `U` is checked like a
//!   token's `sub` (a non-empty string of at most 128 bytes): 400 `bad_request`
//!   otherwise. Bodies over [`MAX_DEV_TOKEN_BODY_BYTES`] get 413.
//! - Responses carry `Cache-Control: no-store` (the files change with the binary, and
//!   they are small), `X-Content-Type-Options: nosniff`, and the page a
//!   `Content-Security-Policy` allowing nothing but this origin: no external fonts,
//!   scripts, styles or fetches.

use serde::Serialize;
use serde_json::Value;

use crate::frames::{to_json, ErrorBody, ErrorCode};

use crate::auth::Authenticator;
use crate::config::Config;
use crate::http;
use crate::ids::UserId;

/// Lifetime of a token from `POST /dev/token`, in seconds (the page's client refreshes
/// it before it expires). One hour.
pub const DEV_TOKEN_TTL_S: u64 = 3_600;

/// Largest `POST /dev/token` body, in bytes.
pub const MAX_DEV_TOKEN_BODY_BYTES: usize = 4_096;

const INDEX_HTML: &str = include_str!("../web/demo/index.html");
const APP_JS: &str = include_str!("../web/demo/app.js");
const STYLE_CSS: &str = include_str!("../web/demo/style.css");
const ICON_SVG: &str = include_str!("../web/demo/icon.svg");
const CLIENT_JS: &str = include_str!("../clients/js/agentwire.js");

/// The page's policy: everything from this origin only (WebSocket included).
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                        img-src 'self'; connect-src 'self'; base-uri 'none'; \
                        form-action 'none'; frame-ancestors 'none'";

/// One file of the demo page, by path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemoAsset {
    /// `/`: the page.
    Index,
    /// `/demo/app.js`: the page's script (an ES module).
    AppJs,
    /// `/demo/style.css`.
    StyleCss,
    /// `/demo/icon.svg`: the tab icon.
    Icon,
    /// `/agentwire.js`: `clients/js/agentwire.js` as is.
    ClientJs,
}

impl DemoAsset {
    /// The asset served at `path` (already stripped of one trailing slash).
    pub fn of_path(path: &str) -> Option<DemoAsset> {
        match path {
            "/" | "/index.html" => Some(DemoAsset::Index),
            "/demo/app.js" => Some(DemoAsset::AppJs),
            "/demo/style.css" => Some(DemoAsset::StyleCss),
            "/demo/icon.svg" | "/favicon.ico" => Some(DemoAsset::Icon),
            "/agentwire.js" => Some(DemoAsset::ClientJs),
            _ => None,
        }
    }

    /// Body and content type.
    pub fn content(self) -> (&'static str, &'static str) {
        match self {
            DemoAsset::Index => (INDEX_HTML, "text/html; charset=utf-8"),
            DemoAsset::AppJs => (APP_JS, "text/javascript; charset=utf-8"),
            DemoAsset::StyleCss => (STYLE_CSS, "text/css; charset=utf-8"),
            DemoAsset::Icon => (ICON_SVG, "image/svg+xml"),
            DemoAsset::ClientJs => (CLIENT_JS, "text/javascript; charset=utf-8"),
        }
    }
}

/// What the gateway serves of the demo page: decided once at start.
pub struct DemoPage {
    /// `demo_page` in effect.
    page: bool,
    /// The dev-mode minter of `POST /dev/token` (`None`: 404).
    minter: Option<Authenticator>,
    /// Lifetime of the minted tokens, in seconds.
    ttl_s: u64,
}

impl DemoPage {
    /// The page per `demo_page` (auto: on when `dev`); the token endpoint only when
    /// `dev`, signing with `minter` (the gateway's authenticator, HS256).
    pub fn new(config: &Config, dev: bool, minter: Option<Authenticator>) -> DemoPage {
        DemoPage {
            page: config.demo_page.unwrap_or(dev),
            minter: if dev { minter } else { None },
            ttl_s: config
                .jwt_max_lifetime_s
                .map_or(DEV_TOKEN_TTL_S, |max| max.min(DEV_TOKEN_TTL_S)),
        }
    }

    /// Whether `POST /dev/token` answers (dev mode).
    pub fn dev_tokens_on(&self) -> bool {
        self.minter.is_some()
    }

    /// The complete response for `asset`, or `None` when the page is off (404).
    pub fn asset(&self, asset: DemoAsset, close: bool, head_only: bool) -> Option<Vec<u8>> {
        if !self.page {
            return None;
        }
        let (body, content_type) = asset.content();
        let mut extra: Vec<(&str, &str)> = vec![("X-Content-Type-Options", "nosniff")];
        if asset == DemoAsset::Index {
            extra.push(("Content-Security-Policy", PAGE_CSP));
            extra.push(("Referrer-Policy", "no-referrer"));
        }
        Some(http::response(
            200,
            content_type,
            body.as_bytes(),
            close,
            head_only,
            &extra,
        ))
    }

    /// Answer a `POST /dev/token` body: status and JSON. Call only when
    /// [`DemoPage::dev_tokens_on`] (404 otherwise, also answered here).
    pub fn dev_token(&self, body: &[u8]) -> (u16, Vec<u8>) {
        let Some(minter) = &self.minter else {
            return (
                404,
                to_json(&ErrorBody::new(ErrorCode::NotFound, "unknown path")),
            );
        };
        let user = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("user_id").and_then(Value::as_str).map(str::to_owned));
        let Some(user) = user.filter(|u| UserId::check(u).is_ok()) else {
            let message = format!(
                "body must be {{\"user_id\": U}} with U a non-empty string of at most \
                 {} bytes",
                UserId::MAX_BYTES
            );
            return (
                400,
                to_json(&ErrorBody::new(ErrorCode::BadRequest, &message)),
            );
        };
        match minter.mint(&user, self.ttl_s) {
            Ok(token) => (
                200,
                to_json(&DevToken {
                    token: &token,
                    expires_in: self.ttl_s,
                }),
            ),
            Err(e) => (
                500,
                to_json(&ErrorBody::new(
                    ErrorCode::Internal,
                    &format!("cannot mint a token: {e}"),
                )),
            ),
        }
    }
}

/// The answer of `POST /dev/token`.
#[derive(Serialize)]
struct DevToken<'a> {
    token: &'a str,
    expires_in: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthSettings;

    fn minter() -> Authenticator {
        let settings = AuthSettings {
            algorithm: crate::auth::JwtAlgorithm::Hs256,
            secret: Some("0123456789abcdef0123".into()),
            public_key_pem: None,
            issuer: None,
            audience: None,
            leeway_s: 5,
        };
        Authenticator::new(&settings).unwrap()
    }

    #[test]
    fn paths() {
        assert_eq!(DemoAsset::of_path("/"), Some(DemoAsset::Index));
        assert_eq!(
            DemoAsset::of_path("/agentwire.js"),
            Some(DemoAsset::ClientJs)
        );
        assert_eq!(DemoAsset::of_path("/demo/app.js"), Some(DemoAsset::AppJs));
        assert_eq!(DemoAsset::of_path("/demo/nope.js"), None);
    }

    #[test]
    fn page_defaults_to_dev_mode() {
        let mut c = Config::default();
        assert!(DemoPage::new(&c, true, None).page);
        assert!(!DemoPage::new(&c, false, None).page);
        c.demo_page = Some(false);
        assert!(!DemoPage::new(&c, true, None).page);
        c.demo_page = Some(true);
        assert!(DemoPage::new(&c, false, None).page);
        assert!(DemoPage::new(&c, false, None)
            .asset(DemoAsset::Index, false, false)
            .is_some());
        c.demo_page = Some(false);
        assert!(DemoPage::new(&c, false, None)
            .asset(DemoAsset::Index, false, false)
            .is_none());
    }

    #[test]
    fn dev_token_only_in_dev_mode_and_checks_the_user() {
        let c = Config::default();
        let off = DemoPage::new(&c, false, Some(minter()));
        assert_eq!(off.dev_token(br#"{"user_id":"ann"}"#).0, 404);
        let on = DemoPage::new(&c, true, Some(minter()));
        let (status, body) = on.dev_token(br#"{"user_id":"ann"}"#);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, 200, "{body}");
        let token = body["token"].as_str().unwrap();
        assert_eq!(minter().verify(token).unwrap().sub, "ann");
        let long = format!(r#"{{"user_id":"{}"}}"#, "x".repeat(129));
        for bad in [
            &b"{}"[..],
            b"not json",
            br#"{"user_id":""}"#,
            br#"{"user_id":7}"#,
            long.as_bytes(),
        ] {
            assert_eq!(on.dev_token(bad).0, 400);
        }
    }

    #[test]
    fn the_page_names_its_assets_and_test_ids() {
        for needle in [
            "/demo/app.js",
            "/demo/style.css",
            "data-testid=\"login-user\"",
            "data-testid=\"login-submit\"",
            "data-testid=\"message-input\"",
            "data-testid=\"message-send\"",
            "data-testid=\"connection-status\"",
        ] {
            assert!(INDEX_HTML.contains(needle), "{needle}");
        }
        assert!(APP_JS.contains("/agentwire.js"));
        for id in ["\"run\"", "\"event\"", "\"run-cancel\""] {
            assert!(APP_JS.contains(id), "{id}");
        }
    }
}
