//! The kernel floor (`--server floor`): what delivering the same frames to the same
//! sockets costs with no gateway logic at all, so every server's figures can also be
//! given as a ratio to what the kernel allows on this machine.
//!
//! `loadgen floor-server --listen ADDR` (started by loadgen itself as the server under
//! test, like a comparison peer) is one thread on mio, like agentwire's reactor:
//! - `GET /ws`: the upgrade done simply: the token's `sub` is read from its middle
//!   part without checking the signature (the floor is not a server; it binds to
//!   loopback for a measurement), the accept key from `Sec-WebSocket-Key`, then a
//!   fixed `connected` frame;
//! - `POST /api/events` (publish key checked): a body of lines `USER_ID SP FRAME_JSON`,
//!   the frames already rendered by the publish driver (envelope, `seq` and all: the
//!   driver is the only publisher and knows each user's count). No JSON parsing, no
//!   seq logic: per line, a WebSocket header is put before the frame bytes (once per
//!   event), and after the whole request every connection of the lines' users gets its
//!   frames with one `writev` (contiguous frames merged into one iovec; more than
//!   [`MAX_IOV`] pieces take more calls); 202 `{"accepted":N}`;
//! - `GET /health`: 200.
//!
//! Bounds: a request (head and body) is at most [`MAX_REQUEST`] bytes (413 and the
//! connection closed beyond); a WebSocket connection with more than [`MAX_PENDING`]
//! bytes unsent is closed (agentwire's slow-consumer rule); client frames are parsed
//! only for close (answered, then the socket closed) and ping (answered with a pong).

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

/// Largest request accepted (head and body).
pub const MAX_REQUEST: usize = 16 * 1024 * 1024;
/// Unsent bytes after which a WebSocket connection is closed.
pub const MAX_PENDING: usize = 1024 * 1024;
/// iovecs per `writev` (Linux's IOV_MAX).
pub const MAX_IOV: usize = 1024;
/// Largest request head.
const MAX_HEAD: usize = 16 * 1024;

const LISTENER: Token = Token(usize::MAX);

#[derive(clap::Args, Debug)]
pub struct FloorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
}

enum Kind {
    /// HTTP requests (publish, health) until an upgrade.
    Http,
    /// An upgraded connection of this user.
    Ws { user: Vec<u8> },
}

struct Conn {
    stream: TcpStream,
    kind: Kind,
    /// Bytes read and not yet handled.
    inbuf: Vec<u8>,
    /// Bytes to write that the socket did not take yet.
    out: Vec<u8>,
    /// Close once `out` is written.
    closing: bool,
    /// This request's frames for this connection: (start, end) in the batch arena.
    batch: Vec<(usize, usize)>,
}

struct Floor {
    poll: Poll,
    conns: Slab<Conn>,
    /// User id -> the keys of its WebSocket connections (entries removed when empty).
    users: HashMap<Vec<u8>, Vec<usize>>,
    publish_key: Option<String>,
    next_conn: u64,
    /// The request's frames, each with its WebSocket header in front.
    arena: Vec<u8>,
    /// Connections with frames in this request.
    touched: Vec<usize>,
}

/// `loadgen floor-server`: serve until SIGTERM (the default action ends the process).
pub fn serve(a: FloorArgs) -> io::Result<()> {
    let poll = Poll::new()?;
    let mut listener = TcpListener::bind(a.listen)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    eprintln!(
        "loadgen floor-server: listening on {}",
        listener.local_addr()?
    );
    let mut floor = Floor {
        poll,
        conns: Slab::new(),
        users: HashMap::new(),
        publish_key: std::env::var("AGENTWIRE_PUBLISH_KEY").ok(),
        next_conn: 1,
        arena: Vec::with_capacity(1024 * 1024),
        touched: Vec::new(),
    };
    let mut events = Events::with_capacity(1024);
    loop {
        match floor.poll.poll(&mut events, Some(Duration::from_secs(1))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                floor.accept(&listener)?;
                continue;
            }
            let key = ev.token().0;
            if ev.is_writable() {
                floor.flush(key);
            }
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                floor.readable(key);
            }
        }
    }
}

impl Floor {
    fn accept(&mut self, listener: &TcpListener) -> io::Result<()> {
        loop {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    self.poll.registry().register(
                        &mut stream,
                        Token(key),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    entry.insert(Conn {
                        stream,
                        kind: Kind::Http,
                        inbuf: Vec::new(),
                        out: Vec::new(),
                        closing: false,
                        batch: Vec::new(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // Out of descriptors and the like: try again on the next event.
                Err(e) => {
                    eprintln!("loadgen floor-server: accept: {e}");
                    return Ok(());
                }
            }
        }
    }

    /// Read everything there is (edge-triggered), then handle it. Reading stops at
    /// [`MAX_REQUEST`] + [`MAX_HEAD`] buffered bytes; after handling, it goes on while
    /// the handling made room (a pass that made none closes the connection: nothing
    /// there is complete or small enough to handle).
    fn readable(&mut self, key: usize) {
        let mut scratch = vec![0u8; 64 * 1024];
        loop {
            let mut eof = false;
            let mut capped = false;
            let before;
            {
                let Some(c) = self.conns.get_mut(key) else {
                    return;
                };
                loop {
                    match c.stream.read(&mut scratch) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) => {
                            c.inbuf.extend_from_slice(&scratch[..n]);
                            if c.inbuf.len() > MAX_REQUEST + MAX_HEAD {
                                capped = true;
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => {
                            eof = true;
                            break;
                        }
                    }
                }
                before = c.inbuf.len();
            }
            let is_ws = matches!(self.conns.get(key).map(|c| &c.kind), Some(Kind::Ws { .. }));
            if is_ws {
                self.ws_input(key);
            } else {
                self.http_input(key);
            }
            if eof {
                self.drop_conn(key);
                return;
            }
            if !capped {
                return;
            }
            match self.conns.get(key) {
                Some(c) if c.inbuf.len() < before && !c.closing => {}
                Some(_) => {
                    self.drop_conn(key);
                    return;
                }
                None => return,
            }
        }
    }

    /// Client frames on an upgraded connection: pings answered, a close answered and
    /// the connection closed, everything else dropped.
    fn ws_input(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let mut at = 0;
        let mut close = false;
        while let Some((op, payload, used)) = client_frame(&c.inbuf[at..]) {
            match op {
                0x8 => {
                    c.out.extend_from_slice(&[0x88, 0x02, 0x03, 0xE8]);
                    close = true;
                }
                0x9 => {
                    push_header(&mut c.out, 0xA, payload.len());
                    c.out.extend_from_slice(&payload);
                }
                _ => {}
            }
            at += used;
            if close {
                break;
            }
        }
        c.inbuf.drain(..at);
        if c.inbuf.len() > MAX_HEAD + 64 * 1024 {
            // A client frame larger than anything the load clients send.
            close = true;
        }
        if close {
            c.closing = true;
        }
        self.flush(key);
    }

    /// HTTP requests: as many complete ones as there are.
    fn http_input(&mut self, key: usize) {
        loop {
            let Some(c) = self.conns.get_mut(key) else {
                return;
            };
            if !matches!(c.kind, Kind::Http) || c.closing {
                return;
            }
            let Some(head_end) = memchr::memmem::find(&c.inbuf, b"\r\n\r\n") else {
                if c.inbuf.len() > MAX_HEAD {
                    self.respond(key, 431, r#"{"error":"bad_request"}"#, true);
                }
                return;
            };
            let head = String::from_utf8_lossy(&c.inbuf[..head_end]).into_owned();
            let mut lines = head.split("\r\n");
            let first = lines.next().unwrap_or("");
            let mut parts = first.split(' ');
            let method = parts.next().unwrap_or("").to_owned();
            let target = parts.next().unwrap_or("").to_owned();
            let mut length = 0usize;
            let mut auth = None;
            let mut ws_key = None;
            for l in lines {
                let Some((k, v)) = l.split_once(':') else {
                    continue;
                };
                let v = v.trim();
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.parse().unwrap_or(usize::MAX);
                } else if k.eq_ignore_ascii_case("authorization") {
                    auth = v.strip_prefix("Bearer ").map(|t| t.trim().to_owned());
                } else if k.eq_ignore_ascii_case("sec-websocket-key") {
                    ws_key = Some(v.to_owned());
                }
            }
            if length > MAX_REQUEST {
                self.respond(key, 413, r#"{"error":"payload_too_large"}"#, true);
                return;
            }
            let body_at = head_end + 4;
            if c.inbuf.len() < body_at + length {
                return;
            }
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            match (method.as_str(), path) {
                ("GET", "/health" | "/ws/health") => {
                    c.inbuf.drain(..body_at + length);
                    self.respond(key, 200, r#"{"status":"healthy"}"#, false);
                }
                ("GET", "/ws") => {
                    c.inbuf.drain(..body_at + length);
                    let token = auth.or_else(|| {
                        query
                            .split('&')
                            .find_map(|kv| kv.strip_prefix("token="))
                            .map(str::to_owned)
                    });
                    match (token.as_deref().and_then(token_sub), ws_key) {
                        (Some(user), Some(k)) => self.upgrade(key, user, &k),
                        _ => self.respond(key, 401, r#"{"error":"invalid_token"}"#, true),
                    }
                    return;
                }
                ("POST", "/api/events") => {
                    let ok = match (&self.publish_key, &auth) {
                        (Some(want), Some(got)) => want == got,
                        (None, _) => true,
                        _ => false,
                    };
                    let body: Vec<u8> = c.inbuf.drain(..body_at + length).skip(body_at).collect();
                    if ok {
                        let n = self.publish(&body);
                        self.respond(key, 202, &format!(r#"{{"accepted":{n}}}"#), false);
                    } else {
                        self.respond(key, 401, r#"{"error":"invalid_key"}"#, false);
                    }
                }
                _ => {
                    c.inbuf.drain(..body_at + length);
                    self.respond(key, 404, r#"{"error":"not_found"}"#, false);
                }
            }
        }
    }

    fn respond(&mut self, key: usize, status: u16, body: &str, close: bool) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let reason = match status {
            200 => "OK",
            202 => "Accepted",
            401 => "Unauthorized",
            404 => "Not Found",
            413 => "Payload Too Large",
            _ => "Bad Request",
        };
        let _ = write!(
            c.out,
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if close {
            c.closing = true;
        }
        self.flush(key);
    }

    fn upgrade(&mut self, key: usize, user: Vec<u8>, ws_key: &str) {
        let id = self.next_conn;
        self.next_conn += 1;
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let accept = tungstenite::handshake::derive_accept_key(ws_key.as_bytes());
        let _ = write!(
            c.out,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        let mut hello = Vec::with_capacity(200);
        hello.extend_from_slice(br#"{"type":"connected","connection_id":"c"#);
        let _ = write!(hello, "{id:08x}");
        hello.extend_from_slice(br#"","user_id":""#);
        hello.extend_from_slice(&user);
        hello.extend_from_slice(
            br#"","mode":"main","thread_id":null,"epoch":"floor","last_seq":0,"resumed":null}"#,
        );
        push_header(&mut c.out, 0x1, hello.len());
        c.out.extend_from_slice(&hello);
        self.users.entry(user.clone()).or_default().push(key);
        c.kind = Kind::Ws { user };
        // Anything the client sent after the request head is WebSocket input.
        self.ws_input(key);
    }

    /// One request's lines: frames to every connection of each line's user, then one
    /// `writev` per connection. The number of lines.
    fn publish(&mut self, body: &[u8]) -> usize {
        self.arena.clear();
        let mut n = 0;
        for line in body.split(|b| *b == b'\n') {
            let Some(sp) = memchr::memchr(b' ', line) else {
                continue;
            };
            let (user, frame) = (&line[..sp], &line[sp + 1..]);
            n += 1;
            let Some(keys) = self.users.get(user) else {
                continue;
            };
            let start = self.arena.len();
            push_header(&mut self.arena, 0x1, frame.len());
            self.arena.extend_from_slice(frame);
            let end = self.arena.len();
            for &k in keys {
                let Some(c) = self.conns.get_mut(k) else {
                    continue;
                };
                if c.batch.is_empty() {
                    self.touched.push(k);
                }
                match c.batch.last_mut() {
                    // Contiguous with the previous frame: one iovec.
                    Some(last) if last.1 == start => last.1 = end,
                    _ => c.batch.push((start, end)),
                }
            }
        }
        let touched = std::mem::take(&mut self.touched);
        for &k in &touched {
            self.send_batch(k);
        }
        self.touched = touched;
        self.touched.clear();
        n
    }

    /// Write this request's frames to connection `key`: `writev` straight from the
    /// arena when nothing is queued, the rest queued.
    fn send_batch(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let mut batch = std::mem::take(&mut c.batch);
        if c.closing {
            // Closing (a close frame queued): nothing more goes after it.
            batch.clear();
            c.batch = batch;
            return;
        }
        let mut from = 0; // first range not fully written
        let mut skip = 0; // bytes of it already written
        if c.out.is_empty() {
            'write: while from < batch.len() {
                let upto = (from + MAX_IOV).min(batch.len());
                let iov: Vec<IoSlice<'_>> = batch[from..upto]
                    .iter()
                    .enumerate()
                    .map(|(i, &(s, e))| {
                        IoSlice::new(&self.arena[s + if i == 0 { skip } else { 0 }..e])
                    })
                    .collect();
                let want: usize = iov.iter().map(|v| v.len()).sum();
                match c.stream.write_vectored(&iov) {
                    Ok(mut n) => {
                        if n == want {
                            from = upto;
                            skip = 0;
                            continue;
                        }
                        // Partial: find where it stopped.
                        while n > 0 {
                            let (s, e) = batch[from];
                            let left = e - s - skip;
                            if n >= left {
                                n -= left;
                                from += 1;
                                skip = 0;
                            } else {
                                skip += n;
                                n = 0;
                            }
                        }
                        break 'write;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 'write,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.drop_conn(key);
                        return;
                    }
                }
            }
        }
        for (i, &(s, e)) in batch.iter().enumerate().skip(from) {
            let s = if i == from { s + skip } else { s };
            c.out.extend_from_slice(&self.arena[s..e]);
        }
        batch.clear();
        c.batch = batch;
        if c.out.len() > MAX_PENDING {
            self.drop_conn(key);
        }
    }

    /// Write what is queued; close a closing connection once done.
    fn flush(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => break,
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_conn(key);
                    return;
                }
            }
        }
        if c.closing && c.out.is_empty() {
            self.drop_conn(key);
        }
    }

    fn drop_conn(&mut self, key: usize) {
        if !self.conns.contains(key) {
            return;
        }
        let mut c = self.conns.remove(key);
        let _ = self.poll.registry().deregister(&mut c.stream);
        if let Kind::Ws { user } = &c.kind {
            if let Some(keys) = self.users.get_mut(user) {
                keys.retain(|k| *k != key);
                if keys.is_empty() {
                    self.users.remove(user);
                }
            }
        }
    }
}

/// A server-to-client frame header (FIN, opcode, unmasked length).
fn push_header(out: &mut Vec<u8>, op: u8, len: usize) {
    out.push(0x80 | op);
    if len < 126 {
        out.push(len as u8);
    } else if len <= 0xFFFF {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// One complete client frame at the start of `buf`: (opcode, unmasked payload, bytes
/// used); None while incomplete.
fn client_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let op = buf[0] & 0x0F;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7F {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => {
            let b: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            (usize::try_from(u64::from_be_bytes(b)).ok()?, 10)
        }
        n => (n as usize, 2),
    };
    let mask: [u8; 4] = if masked {
        let m = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        m
    } else {
        [0; 4]
    };
    let end = at.checked_add(len)?;
    let payload = buf.get(at..end)?;
    let unmasked = payload
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    Some((op, unmasked, end))
}

/// The `sub` claim of a JWT, read without checking anything else (base64url of the
/// middle part, then the string after `"sub":"`); None when there is none or it has
/// escapes or characters a user id of the load clients never has.
fn token_sub(token: &str) -> Option<Vec<u8>> {
    let mid = token.split('.').nth(1)?;
    let claims = base64url(mid)?;
    let at = memchr::memmem::find(&claims, b"\"sub\":\"")? + 7;
    let len = memchr::memchr(b'"', &claims[at..])?;
    let sub = &claims[at..at + len];
    let plain = !sub.is_empty()
        && sub.len() <= 128
        && sub
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    plain.then(|| sub.to_vec())
}

fn base64url(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for b in s.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_sub_reads_the_claim_and_refuses_odd_ones() {
        // {"sub":"lg1-7","exp":1}
        let mid = "eyJzdWIiOiJsZzEtNyIsImV4cCI6MX0";
        assert_eq!(token_sub(&format!("h.{mid}.s")), Some(b"lg1-7".to_vec()));
        // {"sub":"a\"b"}
        assert_eq!(token_sub("h.eyJzdWIiOiJhXCJiIn0.s"), None);
        assert_eq!(token_sub("no-dots"), None);
    }

    #[test]
    fn client_frames_are_unmasked_and_incomplete_ones_wait() {
        // A masked close with code 1000.
        let mask = [1u8, 2, 3, 4];
        let mut f = vec![0x88, 0x82];
        f.extend_from_slice(&mask);
        f.extend_from_slice(&[0x03 ^ 1, 0xE8 ^ 2]);
        assert_eq!(client_frame(&f), Some((0x8, vec![0x03, 0xE8], 8)));
        assert_eq!(client_frame(&f[..5]), None);
    }

    #[test]
    fn headers_use_the_three_length_forms() {
        for (len, want) in [(5usize, 2usize), (200, 4), (70_000, 10)] {
            let mut h = Vec::new();
            push_header(&mut h, 0x1, len);
            assert_eq!(h.len(), want);
            assert_eq!(h[0], 0x81);
        }
    }
}
