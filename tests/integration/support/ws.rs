//! A blocking WebSocket client with a deadline on every wait ([`Client`]) and the
//! assertions on what it receives.

#![allow(dead_code)] // each test module uses its own subset

use super::*;

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
    let request = upgrade_request(&format!("ws://{addr}{path_and_query}"), headers)?;
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

/// The client's upgrade request to `url` (`ws://` or `wss://`) with `headers` added
/// (a header may repeat). `Err` names a bad URL, header name or value.
pub fn upgrade_request(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<tungstenite::handshake::client::Request, String> {
    let mut request = url
        .into_client_request()
        .map_err(|e| format!("request: {e}"))?;
    for (name, value) in headers {
        request.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?,
            HeaderValue::from_str(value).map_err(|e| e.to_string())?,
        );
    }
    Ok(request)
}
