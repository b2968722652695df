//! A connection's socket as the reactor reads and writes it: plain TCP, or TLS over TCP.
//!
//! The interface is small on purpose; the reactor uses nothing else:
//! - `Read` ([`Transport`] implements it): the HTTP-head reader and tungstenite read
//!   plaintext through it. On TLS a read first hands out plaintext already decrypted,
//!   then reads records from the socket, decrypts them and sends at once any handshake
//!   answer they call for.
//! - [`Transport::write_out`]: write the connection's [`OutQueue`]. Plain: the queue's
//!   own `writev`, exactly as without TLS (no copy, no allocation per frame). TLS: the
//!   queued frames are sealed into records of up to 16 KiB (many small frames a record)
//!   and the records written.
//! - [`Transport::end_output`], [`Transport::shutdown_write`]: the closing path (TLS
//!   sends `close_notify` after the last queued byte, before the FIN).
//!
//! # Memory: rustls's unbuffered API
//!
//! TLS uses rustls's unbuffered connection ([`UnbufferedServerConnection`]): rustls keeps
//! the protocol state and the keys, and this file owns the three byte buffers, each
//! allocated only while it holds something and given back as soon as it is empty, so an
//! idle TLS connection holds no buffer at all (rustls's buffered `ServerConnection` keeps
//! a 4 KiB read buffer for the life of the connection):
//! - `input`: records read from the socket and not yet processed: at most one read
//!   ([`READ_CHUNK`]) plus a partial record, or a handshake message being joined, up to
//!   [`MAX_INPUT`] (more is bad input: the connection is closed);
//! - `plain`: decrypted bytes the reader has not taken yet (at most the records one read
//!   completed);
//! - `sealed`: records not yet written to the socket: the handshake flights, and frames
//!   moved out of the [`OutQueue`] only while this holds under [`TLS_BUFFER_LIMIT`], so
//!   the slow-consumer rule (`max_pending_bytes`) and the total output budget
//!   (`max_pending_total_bytes`, counted over the queues) still see all unsent output
//!   but that constant.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;

use mio::net::TcpStream;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};

use crate::conn::OutQueue;

/// Most plaintext bytes one connection holds sealed and unsent (plus the records'
/// overhead, 22 bytes each with TLS 1.3); past it frames wait in its output queue.
pub const TLS_BUFFER_LIMIT: usize = 16 * 1024;

/// Bytes read from the socket per read: one full record (16 KiB of payload, header,
/// AEAD tag and padding allowance) ...
const READ_CHUNK: usize = 16 * 1024 + 512;
/// ... except the first read into an empty buffer: client messages are small, and the
/// buffer is allocated (and zeroed) for every read that finds it empty.
const FIRST_READ: usize = 4 * 1024;

/// Most unprocessed input held: a handshake message of up to 64 KiB (rustls's own bound
/// on them) being joined, plus one read.
pub const MAX_INPUT: usize = 64 * 1024 + READ_CHUNK;

/// Most plaintext sealed into one record at a time.
const MAX_RECORD_PLAINTEXT: usize = 16 * 1024;

/// The socket of one connection.
pub struct Transport {
    tcp: TcpStream,
    /// `None`: plain TCP.
    tls: Option<Box<TlsState>>,
}

/// rustls's state of one connection, the bytes in flight, and what the reactor has not
/// been told yet.
struct TlsState {
    conn: UnbufferedServerConnection,
    /// Records read and not yet processed (empty, unallocated, when idle).
    input: Vec<u8>,
    /// Decrypted bytes from `plain_at` on, not yet read (empty when idle).
    plain: Vec<u8>,
    plain_at: usize,
    /// Records from `sealed_at` on, not yet written (empty when idle).
    sealed: Vec<u8>,
    sealed_at: usize,
    /// The TCP stream ended, or the peer sent `close_notify`: the reader gets `Ok(0)`
    /// once `plain` is drained.
    input_ended: bool,
    /// `close_notify` queued (once).
    notified: bool,
    /// The handshake has finished.
    established: bool,
    /// The peer's input broke the TLS protocol (counted once by the close path).
    failed: bool,
    /// The handshake finished and nobody asked yet (counted once).
    handshake_done: bool,
}

/// What [`TlsState::advance`] seals once the connection may send application data.
enum Seal<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

impl Transport {
    /// A plain TCP connection.
    pub fn plain(tcp: TcpStream) -> Transport {
        Transport { tcp, tls: None }
    }

    /// A TLS connection whose handshake starts with the client's first bytes.
    pub fn tls(tcp: TcpStream, conn: UnbufferedServerConnection) -> Transport {
        Transport {
            tcp,
            tls: Some(Box::new(TlsState {
                conn,
                input: Vec::new(),
                plain: Vec::new(),
                plain_at: 0,
                sealed: Vec::new(),
                sealed_at: 0,
                input_ended: false,
                notified: false,
                established: false,
                failed: false,
                handshake_done: false,
            })),
        }
    }

    /// The TCP socket (registration with the poller, socket options, and reads that
    /// discard input on a closing connection).
    pub fn tcp(&mut self) -> &mut TcpStream {
        &mut self.tcp
    }

    /// Write what `out` holds, as much as the socket takes. Returns the bytes taken from
    /// `out` (plaintext); stops quietly at `WouldBlock`, the rest waiting for the next
    /// writable edge (on TLS, sealed records go first on that edge).
    ///
    /// # Errors
    /// A socket error, or (TLS) a connection that can no longer send; the connection is
    /// finished.
    pub fn write_out(&mut self, out: &mut OutQueue) -> io::Result<usize> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return out.write_to(&mut self.tcp);
        };
        if !tls.send_sealed(&mut self.tcp)? || !tls.established {
            // The socket is full, or application data must wait for the handshake
            // (the gateway writes none before it: requests come after it).
            return Ok(0);
        }
        let taken = out.write_to(&mut Sealer {
            tls,
            tcp: &mut self.tcp,
        })?;
        tls.send_sealed(&mut self.tcp)?;
        Ok(taken)
    }

    /// Whether TLS records are waiting for the socket (never on plain TCP).
    pub fn has_unsent(&self) -> bool {
        self.tls
            .as_deref()
            .is_some_and(|t| t.sealed_at < t.sealed.len())
    }

    /// The output queue is empty and the gateway is done: on TLS queue `close_notify`
    /// (once, when the handshake finished) and send it. True when nothing is left to
    /// send, so the write side may be shut down; false when the socket is full (call
    /// again on the next writable edge).
    pub fn end_output(&mut self) -> bool {
        let Some(tls) = self.tls.as_deref_mut() else {
            return true;
        };
        if !tls.notified && tls.established && !tls.failed {
            tls.notified = true;
            let _ = tls.advance(Seal::CloseNotify);
        }
        matches!(tls.send_sealed(&mut self.tcp), Ok(true))
    }

    pub fn shutdown_write(&mut self) -> io::Result<()> {
        self.tcp.shutdown(Shutdown::Write)
    }

    /// True once, after the peer's input broke the TLS protocol (bad record, bad
    /// handshake message, fatal alert, input over [`MAX_INPUT`]): for the close path's
    /// counter.
    pub fn take_tls_failure(&mut self) -> bool {
        self.tls
            .as_deref_mut()
            .is_some_and(|t| std::mem::take(&mut t.failed))
    }

    /// True once, after the TLS handshake finished: for the handshake counter.
    pub fn take_handshake_done(&mut self) -> bool {
        self.tls
            .as_deref_mut()
            .is_some_and(|t| std::mem::take(&mut t.handshake_done))
    }

    /// The TLS version and cipher suite negotiated (for a debug line), when TLS.
    pub fn tls_summary(&self) -> Option<String> {
        let conn = &self.tls.as_deref()?.conn;
        Some(format!(
            "{:?} {:?}",
            conn.protocol_version()?,
            conn.negotiated_cipher_suite()?.suite()
        ))
    }
}

impl Read for Transport {
    /// Plaintext from the peer. `Ok(0)` is the end of input (on TLS a `close_notify` or
    /// the TCP end, with or without one: a request cut short is the HTTP reader's
    /// concern); `WouldBlock` means nothing more now. A TLS protocol error is
    /// `InvalidData`.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.tls.as_deref_mut() {
            None => self.tcp.read(buf),
            Some(tls) => tls.read(&mut self.tcp, buf),
        }
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl TlsState {
    fn read(&mut self, tcp: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if let Some(ready) = self.plain.get(self.plain_at..).filter(|p| !p.is_empty()) {
                let n = ready.len().min(buf.len());
                if let (Some(dst), Some(src)) = (buf.get_mut(..n), ready.get(..n)) {
                    dst.copy_from_slice(src);
                }
                self.plain_at += n;
                if self.plain_at >= self.plain.len() {
                    self.plain = Vec::new();
                    self.plain_at = 0;
                }
                return Ok(n);
            }
            if self.input_ended {
                return Ok(0);
            }
            match self.fill(tcp) {
                Ok(0) => self.input_ended = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if let Err(e) = self.advance(Seal::Nothing) {
                // The alert for it, best effort.
                let _ = self.send_sealed(tcp);
                return Err(e);
            }
            // Handshake flights (and session tickets, key updates, alerts) go out at
            // once; what the socket does not take waits for the writable edge.
            self.send_sealed(tcp)?;
        }
    }

    /// Read one chunk of records from the socket into `input`.
    fn fill(&mut self, tcp: &mut TcpStream) -> io::Result<usize> {
        let start = self.input.len();
        if start >= MAX_INPUT {
            self.failed = true;
            return Err(invalid(
                "TLS input over its bound (a handshake message over 64 KiB)",
            ));
        }
        let chunk = if start == 0 { FIRST_READ } else { READ_CHUNK };
        self.input.resize(start + chunk, 0);
        let read = tcp.read(self.input.get_mut(start..).unwrap_or_default());
        self.input.truncate(start + read.as_ref().map_or(0, |n| *n));
        if self.input.is_empty() {
            self.input = Vec::new();
        }
        read
    }

    /// Let rustls process the input until it needs more (or the handshake is done and
    /// nothing is pending), collecting decrypted bytes into `plain` and records to send
    /// into `sealed`; then, when application data may be sent, seal `seal`. Returns the
    /// bytes of `seal` sealed.
    fn advance(&mut self, seal: Seal<'_>) -> io::Result<usize> {
        let mut sealed_bytes = 0;
        let mut seal = Some(seal);
        loop {
            let TlsState {
                conn,
                input,
                plain,
                sealed,
                input_ended,
                established,
                handshake_done,
                ..
            } = self;
            let UnbufferedStatus { mut discard, state } = conn.process_tls_records(input);
            let mut stop = false;
            let mut failure = None;
            match state {
                Err(e) => failure = Some(invalid(e)),
                Ok(ConnectionState::ReadTraffic(mut records)) => {
                    while let Some(record) = records.next_record() {
                        match record {
                            Ok(r) => {
                                discard += r.discard;
                                plain.extend_from_slice(r.payload);
                            }
                            Err(e) => {
                                failure = Some(invalid(e));
                                break;
                            }
                        }
                    }
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    let start = sealed.len();
                    let need = match encode.encode(&mut []) {
                        Err(EncodeError::InsufficientSize(s)) => s.required_size,
                        _ => 0,
                    };
                    sealed.resize(start + need, 0);
                    match encode.encode(sealed.get_mut(start..).unwrap_or_default()) {
                        Ok(n) => sealed.truncate(start + n),
                        Err(e) => failure = Some(invalid(e)),
                    }
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    // The records are in `sealed`, in order, ahead of anything sealed
                    // after them: they count as sent from rustls's point of view.
                    transmit.done();
                }
                // The peer's close_notify (reported once): no more input, but the
                // gateway may still send (its close frame), so go on to WriteTraffic.
                Ok(ConnectionState::PeerClosed) => *input_ended = true,
                Ok(ConnectionState::Closed) => {
                    *input_ended = true;
                    stop = true;
                }
                Ok(ConnectionState::BlockedHandshake) => stop = true,
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    if !*established {
                        *established = true;
                        *handshake_done = true;
                    }
                    let start = sealed.len();
                    let result = match seal.take() {
                        Some(Seal::Data(data)) => {
                            sealed_bytes = data.len();
                            seal_into(sealed, |out| traffic.encrypt(data, out))
                        }
                        Some(Seal::CloseNotify) => {
                            seal_into(sealed, |out| traffic.queue_close_notify(out))
                        }
                        Some(Seal::Nothing) | None => Ok(()),
                    };
                    if let Err(e) = result {
                        sealed.truncate(start);
                        sealed_bytes = 0;
                        failure = Some(invalid(e));
                    }
                    stop = true;
                }
                // Early data is off (rustls's default); anything newer: stop here.
                Ok(_) => stop = true,
            }
            if discard > 0 {
                input.drain(..discard.min(input.len()));
            }
            if input.is_empty() && input.capacity() > 0 {
                *input = Vec::new();
            }
            if let Some(e) = failure {
                self.failed = true;
                self.take_alert();
                return Err(e);
            }
            if stop {
                return Ok(sealed_bytes);
            }
        }
    }

    /// After an error: the records rustls queued before it and the alert for it into
    /// `sealed` (rustls hands out queued records before reporting the error again; a
    /// flight has a handful of them).
    fn take_alert(&mut self) {
        for _ in 0..16 {
            let status = self.conn.process_tls_records(&mut []);
            let Ok(ConnectionState::EncodeTlsData(mut encode)) = status.state else {
                return;
            };
            let need = match encode.encode(&mut []) {
                Err(EncodeError::InsufficientSize(s)) => s.required_size,
                _ => return,
            };
            let start = self.sealed.len();
            self.sealed.resize(start + need, 0);
            match encode.encode(self.sealed.get_mut(start..).unwrap_or_default()) {
                Ok(n) => self.sealed.truncate(start + n),
                Err(_) => self.sealed.truncate(start),
            }
        }
    }

    /// Write the sealed records. Ok(true) when all were written, Ok(false) when the
    /// socket is full.
    fn send_sealed(&mut self, tcp: &mut TcpStream) -> io::Result<bool> {
        while let Some(left) = self.sealed.get(self.sealed_at..).filter(|l| !l.is_empty()) {
            match tcp.write(left) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sealed_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.sealed.capacity() > 0 {
            self.sealed = Vec::new();
            self.sealed_at = 0;
        }
        Ok(true)
    }

    fn unsent(&self) -> usize {
        self.sealed.len() - self.sealed_at
    }
}

/// Append one sealed record (or alert) to `sealed`: `write` fills the slice it is given
/// and says how much it wrote, or how much room it needs.
fn seal_into(
    sealed: &mut Vec<u8>,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> Result<(), EncryptError> {
    let start = sealed.len();
    // Room for a record's header, tag and padding allowance; retried once with what
    // rustls says it needs.
    let mut room = 64;
    loop {
        sealed.resize(start + room, 0);
        match write(sealed.get_mut(start..).unwrap_or_default()) {
            Ok(n) => {
                sealed.truncate(start + n);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(s)) if s.required_size > room => {
                room = s.required_size;
            }
            Err(e) => {
                sealed.truncate(start);
                return Err(e);
            }
        }
    }
}

/// The sink [`OutQueue::write_to`] writes into on TLS: frames are sealed (many small
/// ones a record) while fewer than [`TLS_BUFFER_LIMIT`] sealed bytes wait; past it
/// they go to the socket, and `WouldBlock` from the socket stops the queue's write as
/// on plain TCP.
struct Sealer<'a> {
    tls: &'a mut TlsState,
    tcp: &'a mut TcpStream,
}

impl Write for Sealer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        while self.tls.unsent() >= TLS_BUFFER_LIMIT {
            if !self.tls.send_sealed(self.tcp)? {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        // Within the limit: sealed bytes stay under it plus one record's overhead.
        let take = total
            .min(MAX_RECORD_PLAINTEXT)
            .min(TLS_BUFFER_LIMIT - self.tls.unsent());
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        if first.len() >= take {
            // One frame fills the record: sealed from where it is.
            return self
                .tls
                .advance(Seal::Data(first.get(..take).unwrap_or_default()));
        }
        // Small frames: gathered into one record (a copy of a few KiB beats a record,
        // an AEAD call and 22 bytes on the wire per frame).
        let mut gathered = Vec::with_capacity(take);
        for b in bufs {
            let room = take - gathered.len();
            if room == 0 {
                break;
            }
            gathered.extend_from_slice(b.get(..room.min(b.len())).unwrap_or_default());
        }
        self.tls.advance(Seal::Data(&gathered))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
