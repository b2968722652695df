//! The harness every integration test uses: an in-process gateway on `127.0.0.1:0`
//! ([`TestGateway`]), a blocking WebSocket client with a deadline on every wait
//! ([`Client`]), a raw HTTP client for refusals and the plain endpoints
//! ([`http_request`], [`upgrade`]), a byte-level WebSocket for malformed frames and
//! silent peers ([`RawWs`]), the publish API ([`publish`]) and JWT minting, good and
//! bad ([`token`], [`token_with`], [`token_alg`], [`token_alg_none`]). Slow readers and
//! non-panicking raw reads: [`slow_reader_stream`], [`raw_upgrade`], [`RawWs::try_next`].
//! A real HTTP server for the inbound webhook: [`WebhookServer`].
//!
//! Nothing here sleeps to synchronize: waits read a socket with a timeout, or poll an
//! HTTP endpoint until a condition holds, and panic with a description when their
//! deadline passes, so a hang fails the test instead of stalling CI.

#![allow(dead_code)] // each test module uses its own subset

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentwire::{Config, Emitter, Gateway, GatewayHandle, Inbound};
use crossbeam_channel::Receiver;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::{HeaderName, HeaderValue};
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

/// HS256 secret of every test gateway.
pub const SECRET: &str = "integration-test-secret-0123456789abcdef";
/// Publish key of every test gateway (unless a test removes it).
pub const PUBLISH_KEY: &str = "integration-publish-key-7f3a9c";
/// Default deadline of one wait (a frame, a response, a state change).
pub const WAIT: Duration = Duration::from_secs(10);
/// A Sec-WebSocket-Key that is valid base64 of 16 bytes.
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

mod gateway;
pub use gateway::*;
mod tokens;
pub use tokens::*;
mod ws;
pub use ws::*;
mod http;
pub use http::*;
mod publish;
pub use publish::*;
mod raw_ws;
pub use raw_ws::*;
mod process;
pub use process::*;
pub mod log_capture;
pub mod tls;
mod webhook_server;
pub use webhook_server::*;
mod redis;
pub use redis::*;
mod sentinel;
pub use sentinel::*;
pub mod agui;
