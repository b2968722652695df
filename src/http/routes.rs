//! The path table of PROTOCOL.md sections 3 (the WebSocket path and its aliases) and 6
//! (health, config, stats, metrics, publish): which [`Route`] a method and path take
//! ([`Route::of`]) and which methods a known path allows ([`allowed_methods`], the 405's
//! `Allow` header).

use super::Method;
use crate::demo_page::DemoAsset;
use crate::mode::Mode;

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
    /// `POST /api/users/{user_id}/disconnect` (PROTOCOL.md section 12): the user id is
    /// taken from the path by the handler (`reactor/revoke.rs`).
    Disconnect,
    /// A file of the demo page (section 10.2): `GET /`, `/agentwire.js`, `/demo/...`.
    Demo(DemoAsset),
    /// `POST /dev/token` (section 10.2, dev mode only).
    DevToken,
    /// Unknown path: 404.
    NotFound,
    /// Known path, wrong method: 405 with the `Allow` header of [`allowed_methods`].
    MethodNotAllowed,
}

/// The route of a known path regardless of method (one trailing `/` tolerated).
pub(super) fn known_path(path: &str) -> Option<Route> {
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
        "/dev/token" => Some(Route::DevToken),
        #[cfg(feature = "conformance")]
        "/conformance/echo" => Some(Route::WebSocket(Some(Mode::Echo))),
        _ if is_disconnect_path(path) => Some(Route::Disconnect),
        _ => DemoAsset::of_path(path).map(Route::Demo),
    }
}

/// `/api/users/{segment}/disconnect`, the segment without `/` (its content is checked
/// by the handler: an empty or invalid user id is a 400, not a 404).
fn is_disconnect_path(path: &str) -> bool {
    path.strip_prefix("/api/users/")
        .and_then(|rest| rest.strip_suffix("/disconnect"))
        .is_some_and(|segment| !segment.contains('/'))
}

impl Route {
    /// Route a request: WebSocket paths and the read endpoints take GET and HEAD,
    /// `/api/events` takes POST; a known path with another method is
    /// [`Route::MethodNotAllowed`], an unknown path [`Route::NotFound`] whatever the
    /// method. One trailing slash is tolerated (`/ws/` = `/ws`).
    pub fn of(method: Method, path: &str) -> Route {
        match known_path(path) {
            None => Route::NotFound,
            Some(Route::Publish) if method == Method::Post => Route::Publish,
            Some(Route::Publish) => Route::MethodNotAllowed,
            Some(Route::DevToken) if method == Method::Post => Route::DevToken,
            Some(Route::DevToken) => Route::MethodNotAllowed,
            Some(Route::Disconnect) if method == Method::Post => Route::Disconnect,
            Some(Route::Disconnect) => Route::MethodNotAllowed,
            Some(r) if matches!(method, Method::Get | Method::Head) => r,
            Some(_) => Route::MethodNotAllowed,
        }
    }
}

/// Which listener a request came in on, for [`Route::on_port`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// No `admin_listen`: `listen` serves every route.
    Shared,
    /// `listen` while an admin listener exists: everything but the admin endpoints.
    Client,
    /// The admin listener (`admin_listen`): `/metrics`, `/ws/stats`, `/ws/config` and
    /// `/health`, nothing else.
    Admin,
}

impl Route {
    /// The admin endpoints (PROTOCOL.md section 12, `admin_listen`).
    fn is_admin(self) -> bool {
        matches!(self, Route::Config | Route::Stats | Route::Metrics)
    }

    /// This route as served on `port`: with an admin listener, the admin endpoints
    /// answer 404 on the client port and everything but them and `/health` answers 404
    /// on the admin port (a known path with a wrong method too: the port does not even
    /// admit the path exists). `/health` is on both, for load balancers probing the
    /// client port and monitoring probing the admin port.
    pub fn on_port(self, path: &str, port: Port) -> Route {
        let known = match self {
            Route::MethodNotAllowed => known_path(path),
            other => Some(other),
        };
        let served = match (port, known) {
            (Port::Shared, _) => true,
            (Port::Client, Some(r)) => !r.is_admin(),
            (Port::Admin, Some(r)) => r.is_admin() || r == Route::Health,
            (_, None) => true,
        };
        if served {
            self
        } else {
            Route::NotFound
        }
    }
}

/// The `Allow` header value for a known path (`GET` for WebSocket paths, `GET, HEAD`
/// for the read endpoints, `POST` for publish); `None` for an unknown path.
pub fn allowed_methods(path: &str) -> Option<&'static str> {
    match known_path(path)? {
        Route::WebSocket(_) => Some("GET"),
        Route::Publish | Route::DevToken | Route::Disconnect => Some("POST"),
        _ => Some("GET, HEAD"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            (Get, "/index", Route::NotFound),
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
            // The demo page (section 10.2); off, the reactor answers 404.
            (Post, "/api/users/u1/disconnect", Route::Disconnect),
            (Post, "/api/users/a%2Fb/disconnect/", Route::Disconnect),
            (Post, "/api/users//disconnect", Route::Disconnect),
            (Get, "/api/users/u1/disconnect", Route::MethodNotAllowed),
            (Post, "/api/users/a/b/disconnect", Route::NotFound),
            (Post, "/api/users/u1", Route::NotFound),
            (Get, "/", Route::Demo(DemoAsset::Index)),
            (Head, "/", Route::Demo(DemoAsset::Index)),
            (Get, "/agentwire.js", Route::Demo(DemoAsset::ClientJs)),
            (Get, "/demo/app.js", Route::Demo(DemoAsset::AppJs)),
            (Get, "/demo/style.css", Route::Demo(DemoAsset::StyleCss)),
            (Post, "/dev/token", Route::DevToken),
            (Get, "/dev/token", Route::MethodNotAllowed),
            (Post, "/", Route::MethodNotAllowed),
        ];
        for (method, path, want) in cases {
            assert_eq!(Route::of(method, path), want, "{method:?} {path}");
        }
    }

    #[test]
    fn admin_endpoints_move_to_the_admin_port() {
        use Method::*;
        let on = |m, path, port| Route::of(m, path).on_port(path, port);
        for path in ["/metrics", "/ws/stats", "/ws/config", "/ws/stats/"] {
            assert_ne!(on(Get, path, Port::Shared), Route::NotFound, "{path}");
            assert_eq!(on(Get, path, Port::Client), Route::NotFound, "{path}");
            assert_ne!(on(Get, path, Port::Admin), Route::NotFound, "{path}");
            assert_eq!(on(Post, path, Port::Client), Route::NotFound, "{path}");
            assert_eq!(
                on(Post, path, Port::Admin),
                Route::MethodNotAllowed,
                "{path}"
            );
        }
        for path in ["/health", "/ws/health"] {
            for port in [Port::Shared, Port::Client, Port::Admin] {
                assert_eq!(on(Get, path, port), Route::Health, "{path} {port:?}");
            }
        }
        for (m, path) in [
            (Get, "/ws"),
            (Post, "/ws"),
            (Post, "/api/events"),
            (Post, "/api/users/u/disconnect"),
            (Post, "/dev/token"),
            (Get, "/"),
        ] {
            assert_eq!(on(m, path, Port::Admin), Route::NotFound, "{path}");
            assert_eq!(on(m, path, Port::Client), Route::of(m, path), "{path}");
        }
        assert_eq!(on(Get, "/nope", Port::Admin), Route::NotFound);
    }

    #[test]
    fn allow_header_for_405() {
        assert_eq!(allowed_methods("/ws"), Some("GET"));
        assert_eq!(allowed_methods("/health/"), Some("GET, HEAD"));
        assert_eq!(allowed_methods("/api/events"), Some("POST"));
        assert_eq!(allowed_methods("/nope"), None);
    }
}
