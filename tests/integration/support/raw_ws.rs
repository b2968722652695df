//! A byte-level WebSocket for malformed frames and silent peers ([`RawWs`]), slow
//! readers and non-panicking raw reads.

#![allow(dead_code)] // each test module uses its own subset

use super::*;

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
