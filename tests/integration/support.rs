//! The harness every integration test uses: an in-process gateway on `127.0.0.1:0`
//! ([`TestGateway`]), a blocking WebSocket client with a deadline on every wait
//! ([`Client`]), a raw HTTP client for refusals and the plain endpoints
//! ([`http_request`], [`upgrade`]), a byte-level WebSocket for malformed frames and
//! silent peers ([`RawWs`]), the publish API ([`publish`]) and JWT minting, good and
//! bad ([`token`], [`token_with`], [`token_alg`], [`token_alg_none`]). Slow readers and
//! non-panicking raw reads: [`slow_reader_stream`], [`raw_upgrade`], [`RawWs::try_next`].
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

// ------------------------------------------------------------------ gateway

/// The configuration every test starts from: ephemeral port, HS256 with [`SECRET`],
/// publishing enabled with [`PUBLISH_KEY`], no demo agent, a short shutdown grace.
pub fn config() -> Config {
    Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        jwt_secret: Some(SECRET.into()),
        publish_key: Some(PUBLISH_KEY.into()),
        demo_agent: Some(false),
        shutdown_grace_ms: 1000,
        ..Config::default()
    }
}

/// Who consumes the gateway's inbound channel (`user_message`, `cancel`).
pub enum Agent {
    /// Nobody: the receiver is dropped, so `user_message` gets `no_agent`.
    None,
    /// The built-in demo agent (`agentwire::demo::spawn`).
    Demo,
    /// The test takes the receiver ([`TestGateway::inbound`]) and runs its own worker.
    Test,
}

/// A gateway running on its own reactor thread. Dropping it asks the gateway to shut
/// down (without waiting for it).
pub struct TestGateway {
    pub addr: SocketAddr,
    pub emitter: Emitter,
    pub epoch: String,
    inbound: Option<Receiver<Inbound>>,
    handle: Option<GatewayHandle>,
}

impl TestGateway {
    pub fn start(cfg: Config, agent: Agent) -> TestGateway {
        log_capture::install();
        let mut gateway = Gateway::new(cfg).expect("gateway config is valid and binds");
        let addr = gateway.local_addr();
        let emitter = gateway.emitter();
        let epoch = gateway.epoch().to_owned();
        let inbound = match agent {
            Agent::None => None,
            Agent::Demo => {
                let rx = gateway.inbound().expect("inbound taken once");
                agentwire::demo::spawn(emitter.clone(), rx).expect("demo agent thread");
                None
            }
            Agent::Test => gateway.inbound(),
        };
        let handle = gateway.spawn().expect("reactor thread");
        TestGateway {
            addr,
            emitter,
            epoch,
            inbound,
            handle: Some(handle),
        }
    }

    /// A gateway with [`config`] and no agent.
    pub fn plain() -> TestGateway {
        TestGateway::start(config(), Agent::None)
    }

    /// The inbound channel (only with [`Agent::Test`]; once).
    pub fn inbound(&mut self) -> Receiver<Inbound> {
        self.inbound
            .take()
            .expect("started with Agent::Test, taken once")
    }

    /// Start a test worker on the inbound channel: it answers every `user_message`
    /// with `agent_started` then `agent_completed` (agent `test_agent`, the message's
    /// run id and thread), and forwards every inbound message to the returned channel.
    pub fn echo_worker(&mut self) -> Receiver<Inbound> {
        let inbound = self.inbound();
        let emitter = self.emitter.clone();
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for msg in inbound.iter() {
                if let Inbound::UserMessage {
                    user_id,
                    thread_id,
                    run_id,
                    text,
                    ..
                } = &msg
                {
                    if let Ok(mut run) =
                        emitter.run(user_id, thread_id.as_deref(), run_id, "test_agent")
                    {
                        let _ = run.agent_started(&json!({ "text": text }));
                        let _ = run.agent_completed(&json!({ "answer": text }));
                    }
                }
                let _ = tx.send(msg);
            }
        });
        rx
    }

    /// Shut down through the library and wait for the reactor thread; returns the
    /// join result and how long it took. Bounded: panics after `within`.
    pub fn shutdown_and_join(&mut self, within: Duration) -> (Result<(), String>, Duration) {
        let handle = self.handle.take().expect("not shut down yet");
        let started = Instant::now();
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(handle.shutdown().map_err(|e| e.to_string()));
        });
        match rx.recv_timeout(within) {
            Ok(result) => (result, started.elapsed()),
            Err(_) => panic!("GatewayHandle::shutdown did not return within {within:?}"),
        }
    }

    pub fn connect(&self, user: &str) -> Client {
        connect(self.addr, user)
    }

    pub fn stats(&self) -> Value {
        get_json(self.addr, "/ws/stats").1
    }

    /// Poll `/ws/stats` until `pred` holds.
    pub fn wait_stats(&self, what: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.stats();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last stats: {s}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Poll `/ws/stats` until exactly `n` sessions are open.
    pub fn wait_open(&self, n: u64) -> Value {
        self.wait_stats(&format!("{n} open connections"), |s| {
            s["connections"]["open"] == json!(n)
        })
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if self.handle.take().is_some() {
            let _ = self.emitter.shutdown();
        }
    }
}

// ------------------------------------------------------------------- tokens

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// A valid HS256 token for `sub`, expiring in an hour.
pub fn token(sub: &str) -> String {
    token_with(&json!({ "sub": sub, "exp": now_s() + 3600 }))
}

/// An HS256 token with [`SECRET`] and exactly these claims.
pub fn token_with(claims: &Value) -> String {
    token_alg(Algorithm::HS256, SECRET, claims)
}

/// A token signed with an HMAC algorithm and secret of the caller's choice.
pub fn token_alg(alg: Algorithm, secret: &str, claims: &Value) -> String {
    token_header(&Header::new(alg), secret, claims)
}

/// A token with this exact JOSE header, HMAC-signed with `secret` (the header's `alg`
/// picks the HMAC; see [`token_forged`] for a header that lies about it).
pub fn token_header(header: &Header, secret: &str, claims: &Value) -> String {
    let t = jsonwebtoken::encode(header, claims, &EncodingKey::from_secret(secret.as_bytes()))
        .expect("token encodes");
    log_capture::register_secret(&t);
    t
}

/// An unsigned token: header `{"alg":"none","typ":"JWT"}`, these claims, and an
/// empty signature, built by hand (jsonwebtoken refuses to make one).
pub fn token_alg_none(claims: &Value) -> String {
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64url(claims.to_string().as_bytes());
    let t = format!("{header}.{payload}.");
    log_capture::register_secret(&t);
    t
}

/// A token whose header is `header_json` verbatim, signed HMAC-SHA256 with `secret`
/// whatever the header claims (alg confusion: `{"alg":"RS256"}` with an HMAC signature,
/// `kid` and `jku` tricks). Registered with [`log_capture`].
pub fn token_forged(header_json: &str, secret: &[u8], claims: &Value) -> String {
    let signing_input = format!(
        "{}.{}",
        b64url(header_json.as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let sig = jsonwebtoken::crypto::sign(
        signing_input.as_bytes(),
        &EncodingKey::from_secret(secret),
        Algorithm::HS256,
    )
    .expect("HMAC signs");
    let t = format!("{signing_input}.{sig}");
    log_capture::register_secret(&t);
    t
}

/// Unpadded base64url (RFC 4648 section 5).
pub fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let symbols = chunk.len() + 1;
        for i in 0..symbols {
            let index = (n >> (18 - 6 * i)) & 0x3f;
            out.push(char::from(ALPHABET[index as usize]));
        }
    }
    out
}

// ---------------------------------------------------------------- WebSocket

/// What the next frame from the gateway was.
#[derive(Debug)]
pub enum Frame {
    /// A text frame, parsed as JSON.
    Json(Value),
    /// A close frame (its code and reason, if any).
    Close(Option<(u16, String)>),
    /// The connection ended without a close frame (reset, EOF, error).
    Gone(String),
    /// Nothing arrived before the deadline.
    Timeout,
}

/// A blocking WebSocket client whose every read has a deadline.
pub struct Client {
    ws: WebSocket<TcpStream>,
    /// The `connected` frame the gateway sent first.
    pub connected: Value,
    /// Headers of the 101 response (lower-case names).
    pub headers: Vec<(String, String)>,
}

/// Connect as `user` to `/ws` with an `Authorization: Bearer` token; returns once the
/// `connected` frame has arrived.
pub fn connect(addr: SocketAddr, user: &str) -> Client {
    connect_with(
        addr,
        "/ws",
        &[("Authorization", &format!("Bearer {}", token(user)))],
    )
    .unwrap_or_else(|e| panic!("connect {user}: {e}"))
}

/// Connect as `user` to `path_and_query` (bearer token), e.g. `/ws?thread_id=t1`.
pub fn connect_path(addr: SocketAddr, user: &str, path_and_query: &str) -> Client {
    connect_with(
        addr,
        path_and_query,
        &[("Authorization", &format!("Bearer {}", token(user)))],
    )
    .unwrap_or_else(|e| panic!("connect {user} to {path_and_query}: {e}"))
}

/// Upgrade `path_and_query` with these extra request headers; `Err` describes a
/// refused or failed handshake. On success the `connected` frame has been read.
pub fn connect_with(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Result<Client, String> {
    let stream =
        TcpStream::connect_timeout(&addr, WAIT).map_err(|e| format!("tcp connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(WAIT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(WAIT))
        .map_err(|e| e.to_string())?;
    let mut request = format!("ws://{addr}{path_and_query}")
        .into_client_request()
        .map_err(|e| format!("request: {e}"))?;
    for (name, value) in headers {
        request.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?,
            HeaderValue::from_str(value).map_err(|e| e.to_string())?,
        );
    }
    let (ws, response) = tungstenite::client::client_with_config(request, stream, None)
        .map_err(|e| format!("handshake: {e}"))?;
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                v.to_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let mut client = Client {
        ws,
        connected: Value::Null,
        headers,
    };
    match client.next_frame(WAIT) {
        Frame::Json(v) if v["type"] == "connected" => {
            client.connected = v;
            Ok(client)
        }
        other => Err(format!("expected the connected frame, got {other:?}")),
    }
}

impl Client {
    /// The `last_seq` of the `connected` frame.
    pub fn last_seq(&self) -> u64 {
        self.connected["last_seq"]
            .as_u64()
            .expect("connected.last_seq is a number")
    }

    /// A header of the 101 response.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The next data or close frame, skipping pings and pongs; never waits past
    /// `within`.
    pub fn next_frame(&mut self, within: Duration) -> Frame {
        let deadline = Instant::now() + within;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Frame::Timeout;
            }
            let socket = self.ws.get_ref();
            if let Err(e) = socket.set_read_timeout(Some(remaining.max(Duration::from_millis(1)))) {
                return Frame::Gone(format!("set_read_timeout: {e}"));
            }
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    let v = serde_json::from_str(t.as_str()).unwrap_or_else(|e| {
                        panic!("gateway sent a text frame that is not JSON ({e}): {t}")
                    });
                    return Frame::Json(v);
                }
                Ok(Message::Binary(b)) => {
                    panic!("gateway sent a binary frame of {} bytes", b.len())
                }
                Ok(Message::Close(f)) => {
                    return Frame::Close(
                        f.map(|CloseFrame { code, reason }| (u16::from(code), reason.to_string())),
                    )
                }
                Ok(_) => continue, // ping, pong, raw frame
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    continue
                }
                Err(e) => return Frame::Gone(e.to_string()),
            }
        }
    }

    /// The next JSON frame; panics on a close, an error or the deadline.
    pub fn recv_json_within(&mut self, within: Duration) -> Value {
        match self.next_frame(within) {
            Frame::Json(v) => v,
            other => panic!("expected a JSON frame within {within:?}, got {other:?}"),
        }
    }

    /// The next JSON frame within [`WAIT`].
    pub fn recv_json(&mut self) -> Value {
        self.recv_json_within(WAIT)
    }

    /// The next JSON frame, which must have this `type`.
    pub fn expect_type(&mut self, kind: &str) -> Value {
        let v = self.recv_json();
        assert_eq!(v["type"], kind, "expected a {kind} frame, got {v}");
        v
    }

    /// The next `n` frames, which must all be events (they carry a `seq`).
    pub fn recv_events(&mut self, n: usize) -> Vec<Value> {
        (0..n)
            .map(|i| {
                let v = self.recv_json();
                assert!(v["seq"].is_u64(), "frame {i} of {n} is not an event: {v}");
                v
            })
            .collect()
    }

    /// Read until a close frame arrives and check its code; JSON frames before it are
    /// returned. Panics if the connection ends without one or the deadline passes.
    pub fn expect_close_within(&mut self, code: u16, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        let mut before = Vec::new();
        loop {
            match self.next_frame(deadline.saturating_duration_since(Instant::now())) {
                Frame::Json(v) => before.push(v),
                Frame::Close(Some((got, reason))) => {
                    assert_eq!(
                        got, code,
                        "close code (reason {reason:?}); frames before: {before:?}"
                    );
                    return before;
                }
                other => panic!("expected close {code}, got {other:?}; frames before: {before:?}"),
            }
        }
    }

    pub fn expect_close(&mut self, code: u16) -> Vec<Value> {
        self.expect_close_within(code, WAIT)
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text))
            .unwrap_or_else(|e| panic!("send text: {e}"));
    }

    pub fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string());
    }

    pub fn send_binary(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::binary(bytes.to_vec()))
            .unwrap_or_else(|e| panic!("send binary: {e}"));
    }

    /// Send `{"type":"ping"}` and require the very next frame to be the `pong`: proves
    /// the connection is open and that nothing else was queued ahead of the pong.
    pub fn ping_pong(&mut self) {
        self.send_json(&json!({"type": "ping"}));
        let v = self.recv_json();
        assert_eq!(
            v["type"], "pong",
            "expected pong as the next frame, got {v}"
        );
        assert!(v["ts"].is_u64(), "pong carries ts: {v}");
    }

    /// `user_message`; returns the `ack` (which must be the next frame).
    pub fn user_message(&mut self, thread: Option<&str>, text: &str, reference: &str) -> Value {
        self.send_json(
            &json!({"type": "user_message", "thread_id": thread, "text": text, "ref": reference}),
        );
        let ack = self.recv_json();
        assert_eq!(ack["type"], "ack", "expected ack, got {ack}");
        assert_eq!(ack["ref"], reference, "ack echoes ref: {ack}");
        assert!(
            ack["run_id"].as_str().is_some_and(|r| !r.is_empty()),
            "ack has a run_id: {ack}"
        );
        ack
    }

    /// Client-initiated close handshake, then drop the socket.
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match self.next_frame(deadline.saturating_duration_since(Instant::now())) {
                Frame::Json(_) | Frame::Close(_) => continue,
                Frame::Gone(_) | Frame::Timeout => break,
            }
        }
    }
}

/// Check the envelope of an event (PROTOCOL.md section 2).
pub fn assert_envelope(ev: &Value, user: &str, thread: Option<&str>, run: &str, agent: &str) {
    let obj = ev
        .as_object()
        .unwrap_or_else(|| panic!("event is an object: {ev}"));
    for field in [
        "type",
        "seq",
        "user_id",
        "thread_id",
        "run_id",
        "agent_name",
        "ts",
        "data",
    ] {
        assert!(obj.contains_key(field), "event lacks {field}: {ev}");
    }
    assert!(ev["type"].is_string(), "{ev}");
    assert!(ev["seq"].as_u64().is_some_and(|s| s >= 1), "seq >= 1: {ev}");
    assert_eq!(ev["user_id"], user, "{ev}");
    assert_eq!(ev["thread_id"], json!(thread), "{ev}");
    assert_eq!(ev["run_id"], run, "{ev}");
    assert_eq!(ev["agent_name"], agent, "{ev}");
    let ts = ev["ts"]
        .as_u64()
        .unwrap_or_else(|| panic!("ts is an integer: {ev}"));
    let now = now_ms();
    assert!(
        ts <= now + 1000 && ts + 60_000 >= now,
        "ts {ts} near now {now}: {ev}"
    );
}

/// Require `events` to carry seq `first`, `first + 1`, ...
pub fn assert_contiguous(events: &[Value], first: u64) {
    for (i, ev) in events.iter().enumerate() {
        assert_eq!(
            ev["seq"].as_u64(),
            Some(first + i as u64),
            "event {i} should have seq {}: {ev}",
            first + i as u64
        );
    }
}

// --------------------------------------------------------------------- HTTP

/// A plain HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Send raw request bytes on a new connection and read one response (the head of a
/// 101, or a head and its `Content-Length` body), within [`WAIT`].
pub fn http_request(addr: SocketAddr, raw: &[u8]) -> HttpResponse {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT).expect("tcp connect");
    stream.set_nodelay(true).expect("nodelay");
    stream.set_write_timeout(Some(WAIT)).expect("write timeout");
    stream.write_all(raw).expect("write request");
    read_response(&mut stream)
}

/// Read one HTTP response from `stream` within [`WAIT`]. For a 101 the bytes read
/// past the head are returned as the body.
pub fn read_response(stream: &mut TcpStream) -> HttpResponse {
    read_response_from(stream, &mut Vec::new())
}

/// As [`read_response`], starting with the bytes already in `buf` and leaving the
/// bytes past this response there (keep-alive, pipelining).
pub fn read_response_from(stream: &mut TcpStream, buf: &mut Vec<u8>) -> HttpResponse {
    let deadline = Instant::now() + WAIT;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let parsed = parse_response_head(buf);
        if let Some((status, headers, head_len, len)) = &parsed {
            let end = match len {
                Some(n) if buf.len() >= head_len + n => Some(head_len + n),
                None if *status == 101 => Some(buf.len()),
                _ => None,
            };
            if let Some(end) = end {
                let body = buf.get(*head_len..end).unwrap_or(&[]).to_vec();
                buf.drain(..end);
                return HttpResponse {
                    status: *status,
                    headers: headers.clone(),
                    body,
                };
            }
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        assert!(
            !remaining.is_zero(),
            "no complete HTTP response within {WAIT:?}; got {:?}",
            String::from_utf8_lossy(buf)
        );
        stream
            .set_read_timeout(Some(remaining))
            .expect("read timeout");
        match stream.read(&mut chunk) {
            Ok(0) => {
                // EOF: a response without Content-Length ends here.
                let (status, headers, head_len, _) = parsed.unwrap_or_else(|| {
                    panic!(
                        "connection closed before a response head: {:?}",
                        String::from_utf8_lossy(buf)
                    )
                });
                let body = buf.get(head_len..).unwrap_or(&[]).to_vec();
                buf.clear();
                return HttpResponse {
                    status,
                    headers,
                    body,
                };
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!(
                "reading the HTTP response failed ({e}); got so far: {:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }
}

type Head = (u16, Vec<(String, String)>, usize, Option<usize>);

fn parse_response_head(buf: &[u8]) -> Option<Head> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).expect("response head is UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next()?;
    assert!(
        version.starts_with("HTTP/1."),
        "status line {status_line:?}"
    );
    let status: u16 = parts.next()?.parse().expect("numeric status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().expect("numeric Content-Length"));
    Some((status, headers, end + 4, len))
}

/// `GET path` with `Connection: close`.
pub fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// `GET path`: (status, JSON body).
pub fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let r = get(addr, path);
    (r.status, r.json())
}

/// The head of a valid WebSocket upgrade of `path_and_query` with extra header lines
/// (each `Name: value`), version 13.
pub fn upgrade_head(addr: SocketAddr, path_and_query: &str, extra: &[String]) -> String {
    let mut head = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for line in extra {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head
}

/// Send a raw upgrade request (see [`upgrade_head`]) and read the answer.
pub fn upgrade(addr: SocketAddr, path_and_query: &str, extra: &[String]) -> HttpResponse {
    http_request(addr, upgrade_head(addr, path_and_query, extra).as_bytes())
}

/// `Authorization: Bearer <token>` as a header line.
pub fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// Check a refusal: `status`, a JSON body of exactly `{"error": code, "message": text}`.
pub fn assert_refusal(r: &HttpResponse, status: u16, code: &str) {
    assert_eq!(
        r.status,
        status,
        "expected {status} {code}, got {} with body {}",
        r.status,
        r.text()
    );
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "refusal content type; headers {:?}",
        r.headers
    );
    let body = r.json();
    let obj = body
        .as_object()
        .unwrap_or_else(|| panic!("refusal body is an object: {body}"));
    assert_eq!(body["error"], code, "refusal error code: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "refusal has a message: {body}"
    );
    assert_eq!(
        obj.len(),
        2,
        "refusal body has exactly error and message: {body}"
    );
}

// ------------------------------------------------------------------ publish

/// `POST /api/events` with an optional bearer key and a raw body.
pub fn publish_raw(addr: SocketAddr, key: Option<&str>, body: &[u8]) -> HttpResponse {
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let mut req = format!(
        "POST /api/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    http_request(addr, &req)
}

/// Publish `events` (an object or an array) with [`PUBLISH_KEY`].
pub fn publish(addr: SocketAddr, events: &Value) -> HttpResponse {
    publish_raw(addr, Some(PUBLISH_KEY), events.to_string().as_bytes())
}

/// Publish and require 202 `{"accepted": n}` for `n` events.
pub fn publish_ok(addr: SocketAddr, events: &Value) {
    let n = events.as_array().map_or(1, Vec::len);
    let r = publish(addr, events);
    assert_eq!(r.status, 202, "publish answered {} {}", r.status, r.text());
    assert_eq!(r.json(), json!({ "accepted": n }));
}

/// One publishable event.
pub fn pub_event(kind: &str, user: &str, thread: Option<&str>, run: &str, data: Value) -> Value {
    json!({"type": kind, "user_id": user, "thread_id": thread, "run_id": run, "agent_name": "pub_agent", "data": data})
}

/// Parse Prometheus text into `name{labels}` -> value.
pub fn prometheus(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("metric line {l:?}"));
            (
                name.to_owned(),
                value
                    .parse()
                    .unwrap_or_else(|_| panic!("metric value in {l:?}")),
            )
        })
        .collect()
}

/// The value of one sample (exact `name{labels}`), panicking when absent.
pub fn metric(samples: &[(String, f64)], name: &str) -> f64 {
    samples
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

/// Sum of every sample of a metric family (`name` and `name{...}`).
pub fn metric_sum(samples: &[(String, f64)], name: &str) -> f64 {
    samples
        .iter()
        .filter(|(n, _)| n == name || n.starts_with(&format!("{name}{{")))
        .map(|(_, v)| *v)
        .sum()
}

/// Poll `f` every 10 ms until it returns true, panicking after [`WAIT`].
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ------------------------------------------------------------ raw WebSocket

/// A WebSocket at the byte level, for what a well-behaved client library will not
/// do: unmasked or malformed frames, never answering pings.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// Upgrade as `user` over a plain socket; the `connected` frame is left unread.
pub fn raw_connect(addr: SocketAddr, user: &str) -> RawWs {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT).expect("tcp connect");
    stream.set_nodelay(true).expect("nodelay");
    stream.set_write_timeout(Some(WAIT)).expect("write timeout");
    stream
        .write_all(upgrade_head(addr, "/ws", &[bearer(&token(user))]).as_bytes())
        .expect("write upgrade");
    let r = read_response(&mut stream);
    assert_eq!(r.status, 101, "raw upgrade: {}", r.text());
    RawWs {
        stream,
        buf: r.body,
    }
}

/// A client frame: FIN set unless `fin` is false, masked with a fixed key unless
/// `masked` is false.
pub fn client_frame(opcode: u8, payload: &[u8], fin: bool, masked: bool) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | (opcode & 0x0f)];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key = [0x37u8, 0xfa, 0x21, 0x3d];
    if masked {
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

impl RawWs {
    /// Wrap a socket whose upgrade was already answered; `leftover` holds bytes read
    /// past the 101 head.
    pub fn from_parts(stream: TcpStream, leftover: Vec<u8>) -> RawWs {
        RawWs {
            stream,
            buf: leftover,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("raw write");
    }

    /// The next complete server frame `(opcode, payload)`, `None` at EOF or reset.
    /// Panics when `within` passes first.
    pub fn next_frame(&mut self, within: Duration) -> Option<(u8, Vec<u8>)> {
        let deadline = Instant::now() + within;
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            assert!(!remaining.is_zero(), "no complete frame within {within:?}");
            self.stream
                .set_read_timeout(Some(remaining))
                .expect("read timeout");
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => return None,
            }
        }
    }

    /// Skip frames until a close frame; returns its code. Panics at EOF or deadline.
    pub fn expect_close(&mut self, within: Duration) -> u16 {
        let deadline = Instant::now() + within;
        loop {
            match self.next_frame(deadline.saturating_duration_since(Instant::now())) {
                Some((0x8, payload)) => {
                    assert!(payload.len() >= 2, "close frame without a code");
                    return u16::from_be_bytes([payload[0], payload[1]]);
                }
                Some(_) => continue,
                None => panic!("connection ended without a close frame"),
            }
        }
    }
}

/// Parse one unmasked server frame at the start of `buf`.
fn parse_server_frame(buf: &[u8]) -> Option<((u8, Vec<u8>), usize)> {
    let b0 = *buf.first()?;
    let b1 = *buf.get(1)?;
    assert_eq!(b1 & 0x80, 0, "server frames are never masked");
    let (len, mut at) = match b1 & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => {
            let bytes: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(bytes) as usize, 10)
        }
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    at += len;
    Some(((b0 & 0x0f, payload), at))
}

// ------------------------------------------------- slow readers, raw polling

/// A client socket that drains slowly on purpose: a receive buffer of `rcvbuf` bytes
/// and, when given, a maximum segment size of `mss`, both set before connecting (the
/// window scale and the MSS are negotiated in the handshake).
///
/// Why the MSS: on loopback the gateway's send buffer autotunes to megabytes (it grows
/// with the congestion window, measured in 64 KiB segments), so a tiny receive buffer
/// alone still lets several MB pile up in the kernel before the gateway's own queue
/// grows. With 536-byte segments the gateway's socket stops taking data after some
/// tens of KiB, so `max_pending_bytes` is reached by a modest burst.
pub fn slow_reader_stream(addr: SocketAddr, rcvbuf: usize, mss: Option<u32>) -> TcpStream {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).expect("socket");
    socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
    if let Some(mss) = mss {
        socket.set_tcp_mss(mss).expect("TCP_MAXSEG");
    }
    socket
        .connect_timeout(&addr.into(), WAIT)
        .expect("tcp connect");
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true).expect("nodelay");
    stream.set_write_timeout(Some(WAIT)).expect("write timeout");
    stream
}

/// Upgrade an already connected `stream` as `user` to `path_and_query` (bearer token)
/// and read the `connected` frame. `Err` describes a refusal or a failure.
pub fn raw_upgrade(
    mut stream: TcpStream,
    addr: SocketAddr,
    user: &str,
    path_and_query: &str,
) -> Result<(RawWs, Value), String> {
    stream
        .write_all(upgrade_head(addr, path_and_query, &[bearer(&token(user))]).as_bytes())
        .map_err(|e| format!("write upgrade: {e}"))?;
    let r = read_response(&mut stream);
    if r.status != 101 {
        return Err(format!("upgrade answered {}: {}", r.status, r.text()));
    }
    let mut raw = RawWs::from_parts(stream, r.body);
    match raw.try_next(WAIT) {
        RawNext::Frame(0x1, payload) => {
            let v: Value = serde_json::from_slice(&payload)
                .map_err(|e| format!("connected frame is not JSON: {e}"))?;
            if v["type"] != "connected" {
                return Err(format!("first frame is not connected: {v}"));
            }
            Ok((raw, v))
        }
        other => Err(format!("expected the connected frame, got {other:?}")),
    }
}

/// What [`RawWs::try_next`] found.
#[derive(Debug)]
pub enum RawNext {
    /// A complete server frame: opcode and payload.
    Frame(u8, Vec<u8>),
    /// EOF, reset or another read error (the text says which).
    Eof(String),
    /// Nothing complete before the deadline.
    Timeout,
}

impl RawWs {
    /// The next complete server frame without panicking: a zero `within` only takes
    /// what the socket already holds (a non-blocking read).
    pub fn try_next(&mut self, within: Duration) -> RawNext {
        let deadline = Instant::now() + within;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(((op, payload), used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return RawNext::Frame(op, payload);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let read = if remaining.is_zero() {
                if let Err(e) = self.stream.set_nonblocking(true) {
                    return RawNext::Eof(format!("set_nonblocking: {e}"));
                }
                let r = self.stream.read(&mut chunk);
                let _ = self.stream.set_nonblocking(false);
                r
            } else {
                if let Err(e) = self.stream.set_read_timeout(Some(remaining)) {
                    return RawNext::Eof(format!("set_read_timeout: {e}"));
                }
                self.stream.read(&mut chunk)
            };
            match read {
                Ok(0) => return RawNext::Eof("eof".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if remaining.is_zero() || Instant::now() >= deadline {
                        return RawNext::Timeout;
                    }
                }
                Err(e) => return RawNext::Eof(format!("{e}")),
            }
        }
    }

    /// Answer a Ping (a masked Pong with the same payload); errors are ignored (the
    /// next read reports a dead socket).
    pub fn pong(&mut self, payload: &[u8]) {
        let _ = self
            .stream
            .write_all(&client_frame(0xA, payload, true, true));
    }
}

// -------------------------------------------------------- process figures

/// This process's resident set size in bytes (`VmRSS` of `/proc/self/status`). The
/// gateways of the tests run in-process, so their memory is in it.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmRSS in /proc/self/status")
}

/// CPU time (user + system) of one thread of this process, from
/// `/proc/self/task/TID/stat` (clock ticks of 10 ms).
pub fn thread_cpu(tid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .unwrap_or_else(|e| panic!("read stat of thread {tid}: {e}"));
    // Fields after the parenthesised name (which may hold spaces): state is field 3,
    // utime 14 and stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .expect("stat has a name");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11)
        .zip(fields.get(12))
        .map(|(u, s)| u.parse::<u64>().unwrap_or(0) + s.parse::<u64>().unwrap_or(0))
        .expect("utime and stime");
    Duration::from_millis(ticks * 10)
}

fn task_ids() -> std::collections::BTreeSet<u32> {
    std::fs::read_dir("/proc/self/task")
        .expect("list /proc/self/task")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

fn task_name(tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Serializes [`TestGateway::start_watched`], so the one new reactor thread between
/// two listings of `/proc/self/task` is this gateway's.
static WATCHED_START: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl TestGateway {
    /// As [`TestGateway::start`], also returning the OS thread id of this gateway's
    /// reactor thread, for [`thread_cpu`].
    pub fn start_watched(cfg: Config, agent: Agent) -> (TestGateway, u32) {
        let _one_at_a_time = WATCHED_START.lock().unwrap_or_else(|e| e.into_inner());
        let before = task_ids();
        let gw = TestGateway::start(cfg, agent);
        // The thread names itself once it runs ("agentwire-reactor", cut to 15 bytes).
        let deadline = Instant::now() + WAIT;
        loop {
            let new: Vec<u32> = task_ids()
                .difference(&before)
                .copied()
                .filter(|&t| task_name(t) == "agentwire-react")
                .collect();
            match new.as_slice() {
                [tid] => return (gw, *tid),
                [] => assert!(Instant::now() < deadline, "reactor thread not found"),
                many => panic!("more than one new reactor thread: {many:?}"),
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

// ------------------------------------------------------------ log capture

/// Every log record the gateways of this test binary write, kept for checking that no
/// token, token signature or query string is ever logged (PROTOCOL.md section 3).
///
/// [`install`] (called by every [`TestGateway::start`]) installs a `log` logger at
/// trace level that keeps, as one line each, every record whose target is the
/// gateway's (`agentwire::*`, from any thread) and every record another crate
/// (tungstenite, mio) writes on one of the gateway's own threads (named
/// `agentwire-*`), at the levels the `agentwire` binary lets through for it
/// ([`agentwire::log_level_allowed`]). Records of the test clients (which also use
/// tungstenite, on the test threads) are not the gateway's and are not kept.
///
/// Every token the harness mints is registered ([`register_secret`]): its segments
/// of 16 characters or more (the signature always is). [`violations`] lists the lines
/// holding a registered segment, `token=` or a `?`; [`assert_clean`] fails a test with
/// them, and a process-exit hook runs the same check over the log of the whole run
/// (every test of the binary), failing the run with exit status 1.
pub mod log_capture {
    use std::collections::HashSet;
    use std::sync::{Mutex, Once};

    use log::{Level, LevelFilter, Log, Metadata, Record};

    static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());
    static SECRETS: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    static INSTALL: Once = Once::new();

    /// Segments shorter than this are not registered (`a.b.c` would match any "a").
    const MIN_SEGMENT: usize = 16;

    struct Capture;

    fn kept(target: &str, level: Level) -> bool {
        if target.starts_with("agentwire") {
            return true;
        }
        let on_gateway_thread = std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("agentwire-"));
        if !on_gateway_thread {
            return false;
        }
        agentwire::log_level_allowed(target, level)
    }

    impl Log for Capture {
        fn enabled(&self, m: &Metadata) -> bool {
            kept(m.target(), m.level())
        }

        fn log(&self, r: &Record) {
            if !kept(r.target(), r.level()) {
                return;
            }
            let line = format!("{} {} {}", r.level(), r.target(), r.args());
            LINES.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }

        fn flush(&self) {}
    }

    static LOGGER: Capture = Capture;

    extern "C" {
        fn atexit(callback: extern "C" fn()) -> std::os::raw::c_int;
        fn _exit(status: std::os::raw::c_int) -> !;
    }

    /// At process exit: the check over the whole run's log. No panic may cross this
    /// `extern "C"` boundary, so nothing here unwraps.
    extern "C" fn check_at_exit() {
        let bad = violations();
        let lines = LINES.lock().map(|l| l.len()).unwrap_or(0);
        let secrets = SECRETS
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(HashSet::len))
            .unwrap_or(0);
        if bad.is_empty() {
            eprintln!(
                "log capture: {lines} gateway log lines checked against {secrets} token \
                 segments, token= and '?': clean"
            );
            return;
        }
        eprintln!(
            "log capture: {} of {lines} gateway log lines leak a token, a signature or a \
             query string:",
            bad.len()
        );
        for line in bad.iter().take(20) {
            eprintln!("  {line}");
        }
        // SAFETY: `_exit` ends the process at once; nothing runs after it.
        unsafe { _exit(1) }
    }

    /// Install the capturing logger (once per process; a no-op afterwards). If another
    /// logger was installed first, capture is off and the process-exit check says so.
    pub fn install() {
        INSTALL.call_once(|| {
            if log::set_logger(&LOGGER).is_ok() {
                log::set_max_level(LevelFilter::Trace);
                // SAFETY: registers a plain function with the C runtime's exit hooks.
                let rc = unsafe { atexit(check_at_exit) };
                assert_eq!(rc, 0, "atexit registration");
            } else {
                eprintln!("log capture: another logger is installed; gateway logs not checked");
            }
        });
    }

    /// Remember a token: none of its long segments may ever appear in a log line.
    pub fn register_secret(token: &str) {
        let mut secrets = SECRETS.lock().unwrap_or_else(|e| e.into_inner());
        let set = secrets.get_or_insert_with(HashSet::new);
        for segment in token.split('.').filter(|s| s.len() >= MIN_SEGMENT) {
            set.insert(segment.to_owned());
        }
    }

    /// Captured lines so far (a copy).
    pub fn lines() -> Vec<String> {
        LINES.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The captured lines holding a registered token segment (as a whole run of
    /// base64url characters, the way a token or its parts would be printed), the text
    /// `token=`, or a `?` (the start of a query string).
    pub fn violations() -> Vec<String> {
        let lines = LINES.lock().unwrap_or_else(|e| e.into_inner());
        let secrets = SECRETS.lock().unwrap_or_else(|e| e.into_inner());
        let empty = HashSet::new();
        let secrets = secrets.as_ref().unwrap_or(&empty);
        let is_b64url = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        lines
            .iter()
            .filter(|line| {
                line.contains("token=")
                    || line.contains('?')
                    || line
                        .split(|c: char| !is_b64url(c))
                        .any(|run| run.len() >= MIN_SEGMENT && secrets.contains(run))
            })
            .cloned()
            .collect()
    }

    /// Fail the calling test if any captured line so far leaks a secret.
    pub fn assert_clean() {
        let bad = violations();
        assert!(
            bad.is_empty(),
            "gateway log lines leak a token, a signature or a query string:\n{}",
            bad.join("\n")
        );
    }
}

// ------------------------------------------------------------ huge requests

/// Send `raw` (any size) from a writer thread while this thread reads one response,
/// so a gateway that answers before the request is complete (431) is read rather than
/// deadlocked against a full socket buffer. Write errors after the answer (the
/// gateway closed) are expected and ignored. Returns the response and how long it took
/// from the first byte written.
pub fn http_request_streamed(addr: SocketAddr, raw: Vec<u8>) -> (HttpResponse, Duration) {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT).expect("tcp connect");
    stream.set_nodelay(true).expect("nodelay");
    stream.set_write_timeout(Some(WAIT)).expect("write timeout");
    let mut writer = stream.try_clone().expect("clone socket");
    let started = Instant::now();
    let sender = std::thread::spawn(move || {
        for chunk in raw.chunks(64 * 1024) {
            if writer.write_all(chunk).is_err() {
                return;
            }
        }
    });
    let r = read_response(&mut stream);
    let took = started.elapsed();
    // Unblocks the writer if it is still sending.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = sender.join();
    (r, took)
}
