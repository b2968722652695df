//! peer-tokio: a comparison peer for agentwire, written the way a Rust team would on
//! tokio: one task per connection, per-user fan-out through bounded mpsc channels in a
//! `Mutex<HashMap>`, tokio-tungstenite for the WebSocket, jsonwebtoken for HS256, and a
//! small hand-rolled HTTP/1.1 front (httparse) so the upgrade, `/health` and
//! `POST /api/events` share one port.
//!
//! It speaks the subset of agentwire's protocol (docs/PROTOCOL.md) that the load
//! generator uses, and nothing more:
//! - `GET /ws` upgrade with a JWT (HS256) from `Authorization: Bearer` or `?token=`;
//!   401 `invalid_token` before the upgrade otherwise;
//! - first frame `connected` (`connection_id`, `user_id`, `mode`, `thread_id`, `epoch`,
//!   `last_seq`, `resumed`), then the user's events as
//!   `{"type","seq","user_id","thread_id","run_id","agent_name","ts","data"}` with a
//!   per-user `seq` from 1, `data` passed through byte for byte;
//! - `POST /api/events` with `Authorization: Bearer <publish_key>`: one event or an array
//!   of at most 1000; 202 `{"accepted":N}`, 400 `bad_event` with the index, 401, 413;
//! - `GET /health`.
//!
//! Not implemented (not needed for the comparison): resume/replay, runs, heartbeats,
//! client messages, per-user and total limits. A connection whose channel (4096 frames)
//! is full is closed with 1013, like agentwire's slow-consumer rule.
//!
//! Settings: `--listen` (default 127.0.0.1:8080), `--jwt-secret` / `AGENTWIRE_JWT_SECRET`,
//! `--publish-key` / `AGENTWIRE_PUBLISH_KEY`. Stops on SIGTERM / SIGINT.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

mod bench;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// Largest request head.
const MAX_HEAD: usize = 16 * 1024;
/// Largest publish body (agentwire's `max_publish_bytes` default).
const MAX_BODY: usize = 1024 * 1024;
/// Most events in one publish request.
const MAX_BATCH: usize = 1000;
/// Frames queued for one connection before it counts as a slow consumer.
const CONN_QUEUE: usize = 4096;
/// Largest client message (agentwire's `max_message_bytes` default).
const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Parser, Debug)]
#[command(about = "agentwire comparison peer: tokio + tokio-tungstenite")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// HS256 secret of the clients' tokens.
    #[arg(long, env = "AGENTWIRE_JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// Enables POST /api/events with this key.
    #[arg(long, env = "AGENTWIRE_PUBLISH_KEY", hide_env_values = true)]
    publish_key: Option<String>,
    /// In-process emitter mode for the load generator's `emitter` driver: paced
    /// emitter threads driven over stdin/stdout with the line protocol of agentwire's
    /// examples/bench_gateway.rs (see src/bench.rs).
    #[arg(long)]
    bench: bool,
    #[command(flatten)]
    bench_args: bench::BenchArgs,
}

/// One user's routing state.
#[derive(Default)]
struct User {
    seq: u64,
    conns: Vec<(u64, mpsc::Sender<Utf8Bytes>)>,
}

/// Shared state: users, keys, the epoch.
struct Hub {
    users: Mutex<HashMap<String, User>>,
    key: DecodingKey,
    validation: Validation,
    publish_key: Option<String>,
    epoch: String,
    next_conn: AtomicU64,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

/// An event as published.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    user_id: Cow<'a, str>,
    #[serde(borrow, default)]
    thread_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    run_id: Cow<'a, str>,
    #[serde(borrow)]
    agent_name: Cow<'a, str>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// An event as delivered.
#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    seq: u64,
    user_id: &'a str,
    thread_id: Option<&'a str>,
    run_id: &'a str,
    agent_name: &'a str,
    ts: u64,
    data: &'a RawValue,
}

#[derive(Serialize)]
struct Connected<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    connection_id: String,
    user_id: &'a str,
    mode: &'static str,
    thread_id: Option<&'a str>,
    epoch: &'a str,
    last_seq: u64,
    resumed: Option<bool>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("peer-tokio: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    if args.bench {
        return match bench::run(&runtime, args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("peer-tokio: {e}");
                std::process::ExitCode::from(1)
            }
        };
    }
    match runtime.block_on(serve(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peer-tokio: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

fn new_hub(args: &Args) -> Result<Arc<Hub>, String> {
    if args.jwt_secret.is_empty() {
        return Err("--jwt-secret (AGENTWIRE_JWT_SECRET) must not be empty".into());
    }
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 5;
    validation.set_required_spec_claims(&["exp", "sub"]);
    let epoch = format!(
        "{:08x}",
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish() as u32
    );
    Ok(Arc::new(Hub {
        users: Mutex::new(HashMap::new()),
        key: DecodingKey::from_secret(args.jwt_secret.as_bytes()),
        validation,
        publish_key: args.publish_key.clone(),
        epoch,
        next_conn: AtomicU64::new(1),
    }))
}

/// Accept connections, one task each, until the listener fails for good.
async fn accept_loop(listener: TcpListener, hub: Arc<Hub>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, hub.clone()));
            }
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning.
                eprintln!("peer-tokio: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve(args: Args) -> Result<(), String> {
    let hub = new_hub(&args)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot bind {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!("peer-tokio: listening on {addr}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = accept_loop(listener, hub) => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("peer-tokio: stopping");
    Ok(())
}

/// A parsed request head.
struct Head {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    len: usize,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn parse_head(buf: &[u8]) -> Result<Option<Head>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let target = req.path.unwrap_or("/");
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            Ok(Some(Head {
                method: req.method.unwrap_or("").to_owned(),
                path: path.to_owned(),
                query: query.to_owned(),
                headers: req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_owned(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect(),
                len,
            }))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(()),
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(text.as_bytes()).await
}

fn error_body(code: &str, message: &str) -> String {
    serde_json::json!({"error": code, "message": message}).to_string()
}

/// One TCP connection: HTTP requests (keep-alive) until an upgrade or the end.
async fn connection(mut stream: TcpStream, hub: Arc<Hub>) {
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        let head = loop {
            match parse_head(&buf) {
                Ok(Some(h)) => break h,
                Ok(None) if buf.len() > MAX_HEAD => {
                    let _ = respond(
                        &mut stream,
                        "431 Request Header Fields Too Large",
                        &error_body("headers_too_large", "request head too large"),
                    )
                    .await;
                    return;
                }
                Ok(None) => {}
                Err(()) => {
                    let _ = respond(
                        &mut stream,
                        "400 Bad Request",
                        &error_body("bad_request", "malformed request"),
                    )
                    .await;
                    return;
                }
            }
            buf.reserve(1024);
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let rest = buf.split_off(head.len);
        buf = rest;
        let close_after = head
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let result = match (head.method.as_str(), head.path.as_str()) {
            ("GET", "/health" | "/ws/health") => {
                respond(&mut stream, "200 OK", r#"{"status":"healthy"}"#).await
            }
            ("GET", "/ws") => {
                upgrade(stream, head, std::mem::take(&mut buf), hub).await;
                return;
            }
            ("POST", "/api/events") => {
                let len = head
                    .header("content-length")
                    .and_then(|v| v.trim().parse::<usize>().ok());
                let Some(len) = len else {
                    let _ = respond(
                        &mut stream,
                        "411 Length Required",
                        &error_body("bad_request", "Content-Length required"),
                    )
                    .await;
                    return;
                };
                if len > MAX_BODY {
                    let _ = respond(
                        &mut stream,
                        "413 Payload Too Large",
                        &error_body("payload_too_large", "body over 1 MiB"),
                    )
                    .await;
                    return;
                }
                buf.reserve(len.saturating_sub(buf.len()));
                while buf.len() < len {
                    match stream.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
                let rest = buf.split_off(len);
                let body = std::mem::replace(&mut buf, rest);
                let (status, text) = publish(&hub, &head, &body);
                respond(&mut stream, status, &text).await
            }
            _ => {
                respond(
                    &mut stream,
                    "404 Not Found",
                    &error_body("not_found", "unknown path"),
                )
                .await
            }
        };
        if result.is_err() || close_after {
            return;
        }
    }
}

/// The token of an upgrade request: `Authorization: Bearer`, else `?token=`.
fn token<'a>(head: &'a Head) -> Option<Cow<'a, str>> {
    if let Some(t) = head
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(Cow::Borrowed(t.trim()));
    }
    head.query
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .map(|t| Cow::Owned(percent_decode(t)))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b, bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn verify(hub: &Hub, token: &str) -> Option<String> {
    let data = jsonwebtoken::decode::<Claims>(token, &hub.key, &hub.validation).ok()?;
    let sub = data.claims.sub;
    (!sub.is_empty() && sub.len() <= 128).then_some(sub)
}

async fn upgrade(mut stream: TcpStream, head: Head, leftover: Vec<u8>, hub: Arc<Hub>) {
    let is_upgrade = head
        .header("upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = head.header("sec-websocket-key").filter(|_| is_upgrade) else {
        let _ = respond(
            &mut stream,
            "400 Bad Request",
            &error_body("bad_request", "not a WebSocket upgrade"),
        )
        .await;
        return;
    };
    if head.header("sec-websocket-version") != Some("13") {
        let _ = respond(
            &mut stream,
            "426 Upgrade Required",
            &error_body("upgrade_required", "Sec-WebSocket-Version must be 13"),
        )
        .await;
        return;
    }
    let Some(user) = token(&head).and_then(|t| verify(&hub, &t)) else {
        let _ = respond(
            &mut stream,
            "401 Unauthorized",
            &error_body("invalid_token", "missing or invalid token"),
        )
        .await;
        return;
    };
    let accept = derive_accept_key(key.as_bytes());
    let conn_id = hub.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(CONN_QUEUE);
    // Registered and `last_seq` read under one lock: the first event this connection
    // gets is last_seq + 1.
    let last_seq = {
        let Ok(mut users) = hub.users.lock() else {
            return;
        };
        let u = users.entry(user.clone()).or_default();
        u.conns.push((conn_id, tx));
        u.seq
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if stream.write_all(response.as_bytes()).await.is_ok() {
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        let ws = WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(config))
            .await;
        let hello = Connected {
            kind: "connected",
            connection_id: format!("c{conn_id:08x}"),
            user_id: &user,
            mode: "main",
            thread_id: None,
            epoch: &hub.epoch,
            last_seq,
            resumed: None,
        };
        let hello = serde_json::to_string(&hello).unwrap_or_default();
        session(ws, hello, &mut rx).await;
    }
    if let Ok(mut users) = hub.users.lock() {
        if let Some(u) = users.get_mut(&user) {
            u.conns.retain(|(id, _)| *id != conn_id);
        }
    }
}

/// An open WebSocket: write the user's frames, answer the client, until either ends.
async fn session(
    ws: WebSocketStream<TcpStream>,
    hello: String,
    rx: &mut mpsc::Receiver<Utf8Bytes>,
) {
    let (mut sink, mut stream) = ws.split();
    if sink.send(Message::text(hello)).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            frame = rx.recv() => {
                let Some(frame) = frame else {
                    // Dropped by the router: the queue was full.
                    let _ = sink.send(Message::Close(Some(CloseFrame {
                        code: CloseCode::Again,
                        reason: "slow consumer".into(),
                    }))).await;
                    return;
                };
                // Queue what is already waiting, then one flush.
                if sink.feed(Message::Text(frame)).await.is_err() {
                    return;
                }
                while let Ok(more) = rx.try_recv() {
                    if sink.feed(Message::Text(more)).await.is_err() {
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
            msg = stream.next() => match msg {
                // Pings are answered by tungstenite itself; client messages are not part
                // of this peer's protocol subset.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    let _ = sink.close().await;
                    return;
                }
                Some(Ok(_)) => {
                    // A pending pong goes out with the next write or flush.
                    if sink.flush().await.is_err() {
                        return;
                    }
                }
            },
        }
    }
}

fn valid_type(t: &str) -> bool {
    let b = t.as_bytes();
    matches!(b.first(), Some(c) if c.is_ascii_lowercase())
        && b.len() <= 64
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

fn check(e: &Incoming<'_>) -> Result<(), &'static str> {
    if !valid_type(&e.kind) {
        return Err("type must match ^[a-z][a-z0-9_]{0,63}$");
    }
    if e.user_id.is_empty() || e.user_id.len() > 128 {
        return Err("user_id must be 1-128 bytes");
    }
    if e.run_id.is_empty() || e.agent_name.is_empty() {
        return Err("run_id and agent_name must not be empty");
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `POST /api/events`: status line and body.
fn publish(hub: &Hub, head: &Head, body: &[u8]) -> (&'static str, String) {
    let key = head
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(expected) = hub.publish_key.as_deref() else {
        return (
            "404 Not Found",
            error_body("not_found", "publishing is off"),
        );
    };
    if key.map(str::trim) != Some(expected) {
        return (
            "401 Unauthorized",
            error_body("invalid_key", "bad publish key"),
        );
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let events: Vec<Incoming<'_>> = if first == Some(&b'[') {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return bad_event(&e.to_string(), 0),
        }
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => vec![v],
            Err(e) => return bad_event(&e.to_string(), 0),
        }
    };
    if events.len() > MAX_BATCH {
        return (
            "413 Payload Too Large",
            error_body("payload_too_large", "more than 1000 events"),
        );
    }
    for (i, e) in events.iter().enumerate() {
        if let Err(why) = check(e) {
            return bad_event(why, i);
        }
    }
    let empty = RawValue::from_string("{}".into()).ok();
    let ts = now_ms();
    let Ok(mut users) = hub.users.lock() else {
        return (
            "500 Internal Server Error",
            error_body("internal", "lock poisoned"),
        );
    };
    for e in &events {
        let Some(data) = e.data.or(empty.as_deref()) else {
            continue;
        };
        let env = Envelope {
            kind: &e.kind,
            seq: 0,
            user_id: &e.user_id,
            thread_id: e.thread_id.as_deref(),
            run_id: &e.run_id,
            agent_name: &e.agent_name,
            ts,
            data,
        };
        deliver(&mut users, env);
    }
    ("202 Accepted", format!("{{\"accepted\":{}}}", events.len()))
}

/// Route one event to its user (under the users lock): the next `seq`, serialized once,
/// queued on every connection of the user. A full queue drops that connection's sender:
/// its task then closes it with 1013.
fn deliver(users: &mut HashMap<String, User>, mut env: Envelope<'_>) {
    let user = match users.get_mut(env.user_id) {
        Some(u) => u,
        None => users.entry(env.user_id.to_owned()).or_default(),
    };
    user.seq += 1;
    env.seq = user.seq;
    let Ok(text) = serde_json::to_string(&env) else {
        return;
    };
    let frame = Utf8Bytes::from(text);
    user.conns
        .retain(|(_, tx)| tx.try_send(frame.clone()).is_ok());
}

fn bad_event(message: &str, index: usize) -> (&'static str, String) {
    (
        "400 Bad Request",
        serde_json::json!({"error": "bad_event", "message": message, "index": index}).to_string(),
    )
}
