//! Fuzz target `frames`: client bytes -> tungstenite's frame reader configured the way
//! the gateway configures every session (`agentwire::websocket_config`), as the server,
//! over an in-memory stream: `WebSocket::from_partially_read` with the bytes pipelined
//! behind the upgrade, then `read` until an error, as the reactor's read loop does
//! (`WouldBlock` at the end of the input, then end of stream).
//!
//! Asserted:
//! - no panic and no busy loop: reads that return a message are bounded by the input
//!   (every frame costs at least two bytes);
//! - bounded memory: a counting global allocator tracks the heap while the reader runs;
//!   its peak stays under a few times `max_message_bytes` plus the input, however
//!   large a length a frame header announces;
//! - every message delivered is within `max_message_bytes`; the bytes the reader writes
//!   back (pongs, the close reply) are bounded by the input.
//!
//! Input: byte 0 picks `max_message_bytes` (64 KiB default, 1024, 125, 16), byte 1 the
//! largest read the stream returns at once, byte 2 how much of the rest was already
//! read with the upgrade request (`from_partially_read`'s `part`); the rest is the
//! client's byte stream.

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};

use agentwire::Config;
use libfuzzer_sys::fuzz_target;
use tungstenite::protocol::Role;
use tungstenite::{Error, Message, WebSocket};

/// Heap in use now, and the highest it has been since the last reset.
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call is forwarded to `System` unchanged; only counters are updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

fn grew(size: usize) {
    let now = CURRENT.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const LIMITS: [usize; 4] = [65_536, 1024, 125, 16];

/// The client side of a socket: hands out `input` at most `chunk` bytes per read, then
/// `WouldBlock` (no more data yet) or, once `eof`, end of stream. Collects what the
/// server writes.
struct Mem<'a> {
    input: &'a [u8],
    chunk: usize,
    eof: bool,
    written: usize,
}

impl Read for Mem<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return if self.eof {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = self.chunk.min(buf.len()).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Mem<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let [limit, chunk, split, rest @ ..] = data else {
        return;
    };
    let max_message_bytes = LIMITS[usize::from(*limit) % LIMITS.len()];
    let config = agentwire::websocket_config(&Config {
        max_message_bytes,
        ..Config::default()
    });
    let split = rest.len() * usize::from(*split) / 255;
    let (part, stream) = rest.split_at(split);
    let mem = Mem {
        input: stream,
        chunk: usize::from(*chunk).max(1),
        eof: false,
        written: 0,
    };

    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut ws = WebSocket::from_partially_read(mem, part.to_vec(), Role::Server, Some(config));
    let mut messages = 0usize;
    loop {
        match ws.read() {
            Ok(msg) => {
                messages += 1;
                assert!(
                    messages <= rest.len() / 2 + 2,
                    "{messages} messages out of {} bytes: the reader is spinning",
                    rest.len()
                );
                let len = match &msg {
                    Message::Text(t) => t.len(),
                    Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
                    Message::Close(_) => 0,
                    Message::Frame(f) => f.payload().len(),
                };
                assert!(
                    len <= max_message_bytes,
                    "{len}-byte message over the limit"
                );
            }
            Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                // The reactor waits for the next readable edge; here the client then
                // closes its side.
                let _ = ws.flush();
                if ws.get_ref().eof {
                    panic!("WouldBlock after end of stream");
                }
                ws.get_mut().eof = true;
            }
            Err(_) => break,
        }
    }
    let _ = ws.flush();
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let bound = 3 * max_message_bytes + 4 * rest.len() + 16 * 1024;
    assert!(
        peak <= bound,
        "reader peaked at {peak} heap bytes (bound {bound}, limit {max_message_bytes}, input {})",
        rest.len()
    );
    let written = ws.get_ref().written;
    assert!(
        written <= rest.len() + 256,
        "{written} bytes written back for {} bytes of input",
        rest.len()
    );
});
