//! One TCP connection owned by the reactor: its phase (HTTP head -> open WebSocket ->
//! closing), its bounded output queue, and the adapter that lets tungstenite parse
//! client frames while every byte the gateway sends goes through that one queue.
//!
//! Output design: event frames are built once per event and shared (`Bytes`) between
//! every recipient, so queuing an event for a connection is a reference-count bump.
//! tungstenite's own frames (pongs, close replies) are written through [`Wire`], which
//! appends them to the same queue, so byte order on the socket is always the order in
//! which frames were queued. [`OutQueue::write_to`] sends everything queued with
//! `writev`, many frames per syscall.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tungstenite::protocol::WebSocketContext;

use crate::mode::Mode;
use crate::timer_wheel::TimerId;
use crate::tls::Transport;

/// A connection's identity beyond one callback: its slab key plus a serial number that
/// is never reused, so a stale id (timer, registry entry, run owner) never reaches the
/// connection that took over the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub key: usize,
    pub serial: u64,
}

impl ConnId {
    /// The `connection_id` shown to clients.
    pub fn public_id(&self) -> String {
        format!("c{:08x}", self.serial)
    }
}

/// Most iovecs handed to one `writev`.
const MAX_IOVECS: usize = 64;

/// Bytes waiting to be written to one socket, as shared frames.
///
/// Every queue of a gateway also keeps one running total of unsent bytes over all of
/// them up to date (`max_pending_total_bytes`): added on push, taken off on write,
/// discard and drop, so reading the total costs nothing.
#[derive(Default)]
pub struct OutQueue {
    chunks: VecDeque<Bytes>,
    /// Bytes of the front chunk already written.
    head_written: usize,
    /// Unwritten bytes in total.
    pending: usize,
    /// Unwritten bytes over every queue sharing this counter (one per gateway; only the
    /// reactor thread touches it, the atomic just makes the reactor `Send`).
    total: Arc<AtomicUsize>,
}

impl Drop for OutQueue {
    fn drop(&mut self) {
        self.total.fetch_sub(self.pending, Ordering::Relaxed);
    }
}

impl OutQueue {
    /// An empty queue counted in `total` (the gateway's running total of unsent bytes).
    pub fn counted(total: Arc<AtomicUsize>) -> OutQueue {
        OutQueue {
            chunks: VecDeque::new(),
            head_written: 0,
            pending: 0,
            total,
        }
    }

    pub fn push(&mut self, frame: Bytes) {
        if frame.is_empty() {
            return;
        }
        self.pending += frame.len();
        self.total.fetch_add(frame.len(), Ordering::Relaxed);
        self.chunks.push_back(frame);
    }

    /// Unwritten bytes.
    pub fn pending(&self) -> usize {
        self.pending
    }

    pub fn is_empty(&self) -> bool {
        self.pending == 0
    }

    /// True when the front frame is partly written (it must be finished before anything
    /// else may be dropped from the queue).
    #[cfg(test)]
    pub fn mid_frame(&self) -> bool {
        self.head_written > 0
    }

    /// Drop every queued frame not yet started (used when a slow consumer is closed).
    pub fn discard_unstarted(&mut self) {
        let keep = usize::from(self.head_written > 0);
        while self.chunks.len() > keep {
            if let Some(c) = self.chunks.pop_back() {
                self.pending -= c.len();
                self.total.fetch_sub(c.len(), Ordering::Relaxed);
            }
        }
    }

    /// Write as much as the socket takes. Returns the bytes written; stops quietly at
    /// `WouldBlock` (the rest stays queued for the next writable edge).
    pub fn write_to<W: Write>(&mut self, sink: &mut W) -> io::Result<usize> {
        let mut total = 0;
        while self.pending > 0 {
            let mut slices: [IoSlice<'_>; MAX_IOVECS] = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (i, chunk) in self.chunks.iter().take(MAX_IOVECS).enumerate() {
                let part = if i == 0 {
                    chunk.get(self.head_written..).unwrap_or(&[])
                } else {
                    chunk
                };
                if let Some(slot) = slices.get_mut(n) {
                    *slot = IoSlice::new(part);
                    n += 1;
                }
            }
            let written = match sink.write_vectored(slices.get(..n).unwrap_or(&[])) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            total += written;
            self.consume(written);
        }
        if self.pending == 0 {
            self.give_back_memory();
        }
        Ok(total)
    }

    fn consume(&mut self, mut n: usize) {
        self.pending -= n;
        self.total.fetch_sub(n, Ordering::Relaxed);
        while n > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let left = front.len() - self.head_written;
            if n >= left {
                n -= left;
                self.head_written = 0;
                self.chunks.pop_front();
            } else {
                self.head_written += n;
                n = 0;
            }
        }
    }

    /// After a burst the deque may hold a large allocation: give it back.
    fn give_back_memory(&mut self) {
        if self.chunks.capacity() > 0 {
            self.chunks = VecDeque::new();
        }
    }
}

/// The stream handed to tungstenite for one call: reads come from the socket (plaintext,
/// through the [`Transport`]), writes go to the connection's [`OutQueue`] (never
/// blocking, never interleaving with events).
pub struct Wire<'a> {
    pub io: &'a mut Transport,
    pub out: &'a mut OutQueue,
    pub bytes_in: &'a mut u64,
}

impl Read for Wire<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.io.read(buf)?;
        *self.bytes_in += n as u64;
        Ok(n)
    }
}

impl Write for Wire<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.push(Bytes::copy_from_slice(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A [`Wire`] that reads at most `left` more bytes, then reports `WouldBlock` and sets
/// `exhausted`: bounds what one connection reads per loop iteration even inside a
/// single tungstenite `read` (a message of a million tiny fragments, a ping flood).
/// Safe because tungstenite keeps its partial state across `WouldBlock`, as it does
/// for a real one.
pub struct Budgeted<'a> {
    pub wire: Wire<'a>,
    pub left: usize,
    pub exhausted: bool,
}

impl Read for Budgeted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            self.exhausted = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let cap = buf.len().min(self.left);
        let n = self.wire.read(buf.get_mut(..cap).unwrap_or_default())?;
        self.left -= n;
        Ok(n)
    }
}

impl Write for Budgeted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.wire.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.wire.flush()
    }
}

/// Where a connection is in its life.
pub enum Phase {
    /// Reading an HTTP request head (and, for the publish API, its body).
    Http(Box<HttpState>),
    /// An authenticated WebSocket session.
    Open(Box<Session>),
    /// The gateway is done with it: flush what is queued (close frame, HTTP answer),
    /// then shut the socket down; a linger timer bounds the wait.
    Closing,
}

/// Bytes of a request read so far.
#[derive(Default)]
pub struct HttpState {
    pub buf: Vec<u8>,
    /// Offset of the first unanswered byte in `buf`: pipelined requests advance it, and
    /// the answered prefix is dropped once per read turn (never one `drain` per request).
    pub start: usize,
    /// Bytes the request at `start` needs in all (head and body) once its head is
    /// known; 0 while the head is incomplete. Only an authorized publish sets it past
    /// the head limit.
    pub need: usize,
    /// Requests answered on this connection (keep-alive).
    pub served: u32,
    /// Not read (nor its buffered requests answered) until its unsent output drains.
    pub paused: bool,
    /// On the reactor's `http_again` list for the next iteration.
    pub again_queued: bool,
    /// The client shut its side down: answer what is complete, then close.
    pub eof: bool,
    /// A publish request waits for the engine's answer (Redis engine): no other
    /// request of the connection is answered before it.
    pub engine_wait: bool,
}

/// An open WebSocket session of one user.
pub struct Session {
    pub ws: WebSocketContext,
    pub user: Arc<str>,
    pub mode: Mode,
    /// Token `exp` (seconds since the Unix epoch).
    pub token_exp: u64,
    /// Tick (ms) at which the token expires; the phase timer fires no later.
    pub token_deadline: u64,
    /// Tick (ms) of the next heartbeat Ping.
    pub next_ping: u64,
    /// Consecutive bad client messages (close 1008 after 10).
    pub bad_in_row: u8,
    /// On the reactor's `read_again` list for the next iteration (each session at most
    /// once, like `flush_queued` for the flush list).
    pub read_queued: bool,
    /// Tick (ms) before which a `refresh` is answered `rate_limited` without checking
    /// its token: at most one token verification per connection per interval.
    pub refresh_not_before: u64,
    /// Input allowance: a virtual clock (microseconds since the reactor started) that
    /// each read turn advances by its cost; the session is read while it runs at most a
    /// burst ahead of real time.
    pub input_clock_us: u64,
    /// Not read until its resume timer fires (input allowance used up).
    pub input_paused: bool,
    pub opened: Instant,
    /// While resuming: the next seq to send from the user's replay buffer (live events
    /// wait there until the connection has caught up); `None` once live.
    pub replay_next: Option<u64>,
    /// `encoding=agui`: the connection's AG-UI translation state (every event it gets,
    /// live or replayed, goes through it); `None` for agentwire JSON, whose frames are
    /// queued as shared.
    pub agui: Option<Box<crate::agui::Stream>>,
    /// Its place in the user's stream under an engine that answers later (Redis).
    pub engine: crate::engine::Cursor,
}

/// One connection in the reactor's slab.
pub struct Conn {
    pub serial: u64,
    /// The socket, plain or TLS (`crate::tls`).
    pub io: Transport,
    pub out: OutQueue,
    pub phase: Phase,
    /// The phase timer: handshake deadline, heartbeat check, or closing linger.
    pub timer: Option<TimerId>,
    /// Tick (ms) when something last arrived from the peer.
    pub last_rx: u64,
    /// Bytes read from the socket (for stats).
    pub bytes_in: u64,
    /// The write side was shut down (closing): done once, since every `shutdown`
    /// raises a new writable edge.
    pub write_shut: bool,
    /// On the reactor's flush list for this iteration.
    pub flush_queued: bool,
    /// Accepted on the admin listener (`admin_listen`): only the admin endpoints.
    pub admin: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that takes at most `cap` bytes per call, then WouldBlock after `budget`.
    struct Trickle {
        got: Vec<u8>,
        cap: usize,
        budget: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                for &byte in b.iter() {
                    if n == self.cap || self.budget == 0 {
                        return Ok(n);
                    }
                    self.got.push(byte);
                    n += 1;
                    self.budget -= 1;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_keep_byte_order() {
        let mut q = OutQueue::default();
        let mut want = Vec::new();
        for i in 0..200u32 {
            let chunk: Vec<u8> = (0..(i % 13 + 1)).map(|j| (i + j) as u8).collect();
            want.extend_from_slice(&chunk);
            q.push(Bytes::from(chunk));
        }
        let mut sink = Trickle {
            got: Vec::new(),
            cap: 7,
            budget: 100,
        };
        q.write_to(&mut sink).unwrap();
        assert_eq!(sink.got.len(), 100);
        assert_eq!(q.pending(), want.len() - 100);
        sink.budget = usize::MAX;
        q.write_to(&mut sink).unwrap();
        assert_eq!(sink.got, want);
        assert!(q.is_empty());
        assert_eq!(q.chunks.capacity(), 0);
    }

    #[test]
    fn the_shared_total_follows_push_write_discard_and_drop() {
        let total = Arc::new(AtomicUsize::new(0));
        let mut a = OutQueue::counted(total.clone());
        let mut b = OutQueue::counted(total.clone());
        a.push(Bytes::from_static(b"0123456789"));
        a.push(Bytes::from_static(b"abc"));
        b.push(Bytes::from_static(b"xyz"));
        assert_eq!(total.load(Ordering::Relaxed), 16);
        let mut sink = Trickle {
            got: Vec::new(),
            cap: 4,
            budget: 4,
        };
        a.write_to(&mut sink).unwrap();
        assert_eq!(total.load(Ordering::Relaxed), 12);
        a.discard_unstarted();
        assert_eq!(total.load(Ordering::Relaxed), 9);
        drop(a);
        assert_eq!(total.load(Ordering::Relaxed), 3);
        drop(b);
        assert_eq!(total.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn discard_keeps_a_started_frame() {
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"abcdef"));
        q.push(Bytes::from_static(b"ghi"));
        let mut sink = Trickle {
            got: Vec::new(),
            cap: 2,
            budget: 2,
        };
        q.write_to(&mut sink).unwrap();
        assert!(q.mid_frame());
        q.discard_unstarted();
        assert_eq!(q.pending(), 4);
        q.push(Bytes::from_static(b"XY"));
        sink.budget = usize::MAX;
        q.write_to(&mut sink).unwrap();
        assert_eq!(sink.got, b"abcdefXY");
    }
}
