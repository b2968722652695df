//! A connection's socket as the reactor reads and writes it: plain TCP, or TLS over TCP.
//!
//! The interface is small on purpose; the reactor uses nothing else:
//! - `Read` ([`Transport`] implements it): the HTTP-head reader and tungstenite read
//!   plaintext through it. On TLS a read first hands out plaintext rustls already
//!   decrypted, then reads records from the socket, decrypts them and sends any
//!   handshake answer they call for at once.
//! - [`Transport::write_out`]: write the connection's [`OutQueue`]. Plain: the queue's
//!   own `writev`, exactly as without TLS (no copy, no allocation per frame). TLS: the
//!   queued frames are sealed into records of up to 16 KiB (many frames a record) and
//!   the records written with `writev`.
//! - [`Transport::end_output`], [`Transport::shutdown_write`]: the closing path (TLS
//!   sends `close_notify` after the last queued byte, before the FIN).
//!
//! Bounds on TLS: rustls holds at most [`TLS_BUFFER_LIMIT`] bytes of sealed, unsent
//! records per connection (`set_buffer_limit`): queued bytes move from the [`OutQueue`]
//! into rustls only while it has room, so the slow-consumer rule (`max_pending_bytes`)
//! and the total output budget (`max_pending_total_bytes`, counted over the queues)
//! still see all but that constant. On input rustls keeps at most one read (4 KiB, more
//! only while a handshake message up to 64 KiB is being joined) of records and 16 KiB of
//! decrypted plaintext; the readers drain it, so an idle connection holds none of it but
//! rustls's 4 KiB read buffer.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;

use mio::net::TcpStream;
use rustls::server::ServerConnection;

use crate::conn::OutQueue;

/// Most bytes of sealed records rustls may hold unsent for one connection (and of
/// plaintext written before the handshake ends, which the gateway never does): one
/// full record.
pub const TLS_BUFFER_LIMIT: usize = 16 * 1024;

/// The socket of one connection.
pub struct Transport {
    tcp: TcpStream,
    /// `None`: plain TCP.
    tls: Option<Box<TlsState>>,
}

/// rustls's state of one connection and what the reactor has not been told yet.
struct TlsState {
    conn: ServerConnection,
    /// `close_notify` queued (once).
    notified: bool,
    /// The peer's input broke the TLS protocol (counted once by the close path).
    failed: bool,
    /// The handshake finished and nobody asked yet (counted once).
    handshake_done: bool,
}

impl Transport {
    /// A plain TCP connection.
    pub fn plain(tcp: TcpStream) -> Transport {
        Transport { tcp, tls: None }
    }

    /// A TLS connection whose handshake starts with the client's first bytes.
    pub fn tls(tcp: TcpStream, mut conn: ServerConnection) -> Transport {
        conn.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
        Transport {
            tcp,
            tls: Some(Box::new(TlsState {
                conn,
                notified: false,
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
    /// writable edge (on TLS, sealed records rustls holds go first on that edge).
    ///
    /// # Errors
    /// A socket error; the connection is finished.
    pub fn write_out(&mut self, out: &mut OutQueue) -> io::Result<usize> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return out.write_to(&mut self.tcp);
        };
        if !tls.send_records(&mut self.tcp)? || tls.conn.is_handshaking() {
            // The socket is full, or application data must wait for the handshake
            // (the gateway writes none before it: requests come after it).
            return Ok(0);
        }
        let taken = out.write_to(&mut Sealer {
            conn: &mut tls.conn,
            tcp: &mut self.tcp,
        })?;
        tls.send_records(&mut self.tcp)?;
        Ok(taken)
    }

    /// Whether TLS records are waiting for the socket (never on plain TCP).
    pub fn has_unsent(&self) -> bool {
        self.tls.as_deref().is_some_and(|t| t.conn.wants_write())
    }

    /// The output queue is empty and the gateway is done: on TLS queue `close_notify`
    /// (once) and send it. True when nothing is left to send, so the write side may be
    /// shut down; false when the socket is full (call again on the next writable edge).
    pub fn end_output(&mut self) -> bool {
        let Some(tls) = self.tls.as_deref_mut() else {
            return true;
        };
        if !tls.notified {
            tls.notified = true;
            tls.conn.send_close_notify();
        }
        matches!(tls.send_records(&mut self.tcp), Ok(true)) && !tls.conn.wants_write()
    }

    pub fn shutdown_write(&mut self) -> io::Result<()> {
        self.tcp.shutdown(Shutdown::Write)
    }

    /// True once, after the peer's input broke the TLS protocol (bad record, bad
    /// handshake message, alert): for the close path's counter.
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
    /// `InvalidData` (the alert rustls queued for it is sent first, best effort).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.tls.as_deref_mut() {
            None => self.tcp.read(buf),
            Some(tls) => tls.read(&mut self.tcp, buf),
        }
    }
}

impl TlsState {
    fn read(&mut self, tcp: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The TCP end without `close_notify`: an end like any other here.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            // Nothing decrypted is waiting: read records (rustls reads at most 4 KiB a
            // call into its own buffer; its `Other` error "buffer full" cannot happen,
            // the plaintext having just been drained).
            match self.conn.read_tls(tcp) {
                // End of input: rustls takes note, then the reader above reports it.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // `InvalidData`: a handshake message over rustls's 64 KiB bound.
                    self.failed |= e.kind() == io::ErrorKind::InvalidData;
                    return Err(e);
                }
            }
            if let Err(e) = self.process() {
                // The alert rustls queued for the error, best effort.
                let _ = self.send_records(tcp);
                return Err(e);
            }
            if self.conn.wants_write() {
                // Handshake flights (and session tickets, key updates) go out at once;
                // what the socket does not take waits for the writable edge.
                self.send_records(tcp)?;
            }
        }
    }

    /// Decrypt and handle the records read so far.
    fn process(&mut self) -> io::Result<()> {
        let was_handshaking = self.conn.is_handshaking();
        match self.conn.process_new_packets() {
            Ok(_) => {
                if was_handshaking && !self.conn.is_handshaking() {
                    self.handshake_done = true;
                }
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(io::Error::new(io::ErrorKind::InvalidData, e))
            }
        }
    }

    /// Write the sealed records rustls holds. Ok(true) when all were written,
    /// Ok(false) when the socket is full.
    fn send_records(&mut self, tcp: &mut TcpStream) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(tcp) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// The sink [`OutQueue::write_to`] writes into on TLS: frames are sealed into rustls
/// (many per record) while it has room; when it is full its records go to the socket,
/// and `WouldBlock` from the socket stops the queue's write like on plain TCP.
struct Sealer<'a> {
    conn: &'a mut ServerConnection,
    tcp: &'a mut TcpStream,
}

impl Write for Sealer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        loop {
            let taken = self.conn.writer().write_vectored(bufs)?;
            if taken > 0 || bufs.iter().all(|b| b.is_empty()) {
                return Ok(taken);
            }
            // rustls is at its buffer limit: make room by writing records out.
            match self.conn.write_tls(self.tcp) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
