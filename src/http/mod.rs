//! HTTP/1.1 on the gateway's one port, without I/O. The reactor feeds it the bytes read
//! so far and writes what it returns; nothing here blocks or logs, and a token is only
//! verified through the [`Authenticator`](crate::auth::Authenticator) handed to
//! [`admit_upgrade`]. Nothing here panics on any input (fuzzed: `fuzz/`).
//!
//! One file per step of a request, in the order the reactor takes them:
//!
//! | file | owns |
//! | --- | --- |
//! | `request.rs` | the request head: [`parse_head`] (httparse, bounded by [`MAX_HEAD_BYTES`] and `MAX_HEADERS`), [`Request`], [`Method`], query decoding, `Content-Length` / chunked, the publish body's length ([`body_length`]), the `Authorization: Bearer` credentials ([`Request::bearer`]), [`keep_alive`] |
//! | `routes.rs` | the path table of PROTOCOL.md sections 3 and 6: [`Route::of`], [`allowed_methods`] |
//! | `upgrade.rs` | WebSocket upgrade admission: [`check_upgrade`] (connection parameters: mode, thread, resume point, token, origin), [`admit_upgrade`] (origin, token, `user_id`) |
//! | `response.rs` | the bytes of every plain answer: [`Refusal`] and its response, JSON and text responses, the 405, the 101 |
//!
//! Origins are compared by [`crate::origin`] (shared with the `allowed_origins`
//! setting); the connection [`Mode`](crate::mode::Mode) is [`crate::mode`]'s.
//!
//! Choices where the protocol is silent:
//! - **Trailing slash** (`routes.rs`): one trailing `/` is tolerated on every known path
//!   (`/ws/` is `/ws`, `/health/` is `/health`); paths are otherwise matched exactly,
//!   case-sensitively and without percent-decoding (`/w%73` is 404).
//! - **Request target** (`request.rs`): origin-form (`/ws?mode=main`) and absolute-form
//!   (`http://host/ws?...`, also `https`, `ws`, `wss`) are accepted, a `#fragment` is
//!   dropped, `*` routes to 404, anything else is 400.
//! - **HEAD**: routed wherever GET is; the caller answers with headers only (the
//!   builders keep `Content-Length`). A HEAD on a WebSocket path routes there and fails
//!   [`check_upgrade`] with 400, like a GET without upgrade headers.
//! - **Query decoding** (`request.rs`) follows the WHATWG
//!   `application/x-www-form-urlencoded` parser: `+` is a space, an invalid `%xx` escape
//!   is kept literally (never an error), invalid UTF-8 after decoding becomes U+FFFD,
//!   empty `&&` pieces are skipped.
//! - **Duplicates** (`upgrade.rs`): a repeated `mode`, `connection_scope`, `thread_id`,
//!   `last_seq`, `epoch`, `user_id` or `token` query parameter, or a repeated
//!   `Authorization`, `Origin`, `Sec-WebSocket-Key` or `Sec-WebSocket-Version` header on
//!   an upgrade is 400: two values for one setting are ambiguous, and an ambiguous
//!   credential is refused. Two `Authorization` headers on a publish request are a
//!   missing key (401).
//! - **Bearer** (`request.rs`): `Authorization: Bearer <credentials>` with the scheme in
//!   any case, one space, the credentials trimmed; empty credentials count as none. One
//!   parser for the upgrade's JWT and the publish API's key.
//! - **Origin** ([`crate::origin`]): a missing `Origin` header is allowed even with a
//!   non-empty allow-list (only browsers send it, and any other client could forge it
//!   anyway); a present one must match an entry exactly, ignoring ASCII case (RFC 6454
//!   origins compare scheme and host case-insensitively).
//! - **Host** is not required (load tools and raw clients often omit it).
//! - Refusal messages never contain a query value, header value or token, only the
//!   names of what was wrong, because they are sent to the client and logged.

mod request;
mod response;
mod routes;
mod upgrade;

#[cfg(test)]
mod tests;

pub use request::{body_length, keep_alive, parse_head, Method, Request, MAX_HEAD_BYTES};
pub use response::{
    json_response, method_not_allowed_response, response, text_response, upgrade_response, Refusal,
    PROMETHEUS_CONTENT_TYPE,
};
pub use routes::{allowed_methods, Port, Route};
pub use upgrade::{admit_upgrade, check_upgrade, TokenSource, Upgrade};
