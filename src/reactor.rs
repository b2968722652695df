//! The reactor: one thread, one `mio::Poll`, owning every socket and all routing state.
//!
//! One loop iteration, in order:
//! 1. poll, with the timeout of the next timer (0 when the channel budget ran out);
//! 2. dispatch readiness: accept new sockets, read HTTP heads and WebSocket frames,
//!    write queued output on writable edges;
//! 3. drain the workers' channel up to [`DRAIN_BUDGET`] commands, routing each event to
//!    its user's connections (frames are shared, queued per connection);
//! 4. advance the timer wheel: handshake deadlines, heartbeats, token expiry, lingering
//!    closes, housekeeping (replay expiry, run watchdog);
//! 5. flush every connection that got output in this iteration: one `writev` each;
//! 6. record the iteration time.
//!
//! Every per-connection failure ends in [`Reactor::close`], which unregisters the
//! session, counts and logs the reason once, and sends the close frame when one is due.

use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::net::{TcpListener, TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Token};
use serde_json::{json, Value};
use slab::Slab;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tungstenite::Message;

use crate::auth::Authenticator;
use crate::client_message::{BadMessage, ClientMessage};
use crate::config::{Config, PerUserPolicy};
use crate::conn::{Budgeted, Conn, ConnId, OutQueue, Phase, Session, Wire};
use crate::emitter::{Command, Inbound, WakeSignal};
use crate::event::{control_frame, now_ms, Event, EventKind, RunKey};
use crate::http::{self, Method, Mode, Refusal, Route};
use crate::publish;
use crate::registry::{ConnEntry, Limits, Refused, Registry, Resume, Routed, Run};
use crate::stats::{DropReason, Gauges, MemoryGauges, RefusalReason, Stats};
use crate::timer_wheel::TimerWheel;

#[cfg(feature = "conformance")]
mod echo;

pub(crate) const LISTENER: Token = Token(usize::MAX - 1);
pub(crate) const WAKER: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);

/// Commands drained from the channel per iteration before polling again.
const DRAIN_BUDGET: usize = 4096;
/// Connections accepted per readiness event before serving others.
const ACCEPT_BUDGET: usize = 1024;
/// How long a closing connection may take to flush and see the peer's FIN.
const LINGER_MS: u64 = 2000;
/// Retry delay for accept after EMFILE/ENFILE.
const ACCEPT_RETRY_MS: u64 = 20;
/// Housekeeping period: replay expiry, run watchdog.
const HOUSEKEEPING_MS: u64 = 1000;
/// Most idle runs the watchdog ends per pass, so runs timing out together cannot stall
/// the loop; when a pass used it all, the next pass comes [`WATCHDOG_AGAIN_MS`] later
/// instead of at the next housekeeping tick.
const WATCHDOG_BUDGET: usize = 1000;
const WATCHDOG_AGAIN_MS: u64 = 50;
/// Most runs listed in a `connected` frame's `active_runs` (the most recently
/// started); `"active_runs_truncated": true` says when there were more.
const CONNECTED_RUNS_MAX: usize = 100;
/// tungstenite read buffer per connection. It grows on demand for larger frames (a
/// frame's header reserves its length, so a larger message costs one more `read`), and
/// tungstenite zero-fills it up to this size on every read. Client messages are rare and
/// small (pongs, pings, a user message), so idle memory wins: 256 -> 64 bytes took an
/// idle connection from 1,157 to 957 bytes at one user each (10,000 connections).
pub(crate) const READ_BUFFER_BYTES: usize = 64;
/// Most client messages (of any kind) one connection's read handles per iteration.
const MESSAGES_PER_READ: usize = 64;
/// Most bytes one connection's read takes from its socket per iteration.
const READ_BUDGET_BYTES: usize = 64 * 1024;
/// Bad client messages in a row before close 1008.
const MAX_BAD_IN_ROW: u8 = 10;
/// Most bytes of a plain HTTP request we buffer beyond the head (publish bodies are
/// bounded separately by `max_publish_bytes`).
const READ_CHUNK: usize = 16 * 1024;

/// What a timer on the wheel is for.
#[derive(Clone, Copy, Debug)]
enum Timer {
    /// The connection's phase timer: handshake deadline, heartbeat check or linger.
    Phase(ConnId),
    AcceptRetry,
    Housekeeping,
    /// Another run watchdog pass: the last one ended [`WATCHDOG_BUDGET`] runs.
    Watchdog,
    ShutdownDeadline,
}

/// What a session's reader does after `on_data` took one message ([`Reactor::read_turn`]).
enum Step {
    /// Read on.
    Go,
    /// Close the session.
    End(CloseReason),
}

/// Why a connection ended: decides the close code, the log line and the counter.
#[derive(Clone, Debug)]
pub(crate) enum CloseReason {
    /// The client sent a close frame or closed TCP.
    ClientClosed,
    /// The peer reset or an I/O error happened.
    Io(io::ErrorKind),
    /// No complete request within `handshake_timeout_ms`.
    HandshakeTimeout,
    /// A plain HTTP exchange finished (or was refused) and the socket is done.
    HttpDone,
    /// Nothing arrived for `heartbeat_timeout_ms` (1001).
    HeartbeatTimeout,
    /// Another connection of the user replaced this one (4002).
    Evicted,
    /// The token expired without a refresh (4001).
    TokenExpired,
    /// A refresh carried another user's token (4003).
    RefreshOtherUser,
    /// The gateway is shutting down (1001).
    Shutdown,
    /// A binary frame (1003).
    Binary,
    /// A message over `max_message_bytes` (1009).
    TooBig,
    /// A protocol violation (1002).
    Protocol,
    /// Invalid UTF-8 in a text message (1007).
    BadUtf8,
    /// Too many bad messages in a row (1008).
    PolicyViolation,
    /// Output over `max_pending_bytes` (1013).
    SlowConsumer,
}

impl CloseReason {
    fn label(&self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::Io(io::ErrorKind::ConnectionReset) => "connection_reset",
            CloseReason::Io(_) => "io_error",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::HttpDone => "http_done",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::Evicted => "evicted",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::RefreshOtherUser => "refresh_other_user",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Binary => "binary_frame",
            CloseReason::TooBig => "message_too_big",
            CloseReason::Protocol => "protocol_error",
            CloseReason::BadUtf8 => "invalid_utf8",
            CloseReason::PolicyViolation => "bad_messages",
            CloseReason::SlowConsumer => "slow_consumer",
        }
    }

    /// The close frame to send, if any.
    fn close_frame(&self) -> Option<(u16, &'static str)> {
        Some(match self {
            CloseReason::HeartbeatTimeout => (1001, "heartbeat timeout"),
            CloseReason::Shutdown => (1001, "going away"),
            CloseReason::Evicted => (4002, "evicted by a newer connection"),
            CloseReason::TokenExpired => (4001, "token_expired"),
            CloseReason::RefreshOtherUser => (4003, "refresh for another user"),
            CloseReason::Binary => (1003, "binary frames are not accepted"),
            CloseReason::TooBig => (1009, "message too big"),
            CloseReason::Protocol => (1002, "protocol error"),
            CloseReason::BadUtf8 => (1007, "invalid utf-8"),
            CloseReason::PolicyViolation => (1008, "too many bad messages"),
            CloseReason::SlowConsumer => (1013, "slow consumer"),
            _ => return None,
        })
    }
}

/// Settings derived once from [`Config`], in the units the loop uses.
pub(crate) struct Settings {
    pub config: Config,
    pub ws_config: WebSocketConfig,
    pub config_json: Bytes,
}

/// The event loop and everything it owns.
pub(crate) struct Reactor {
    poll: Poll,
    listener: TcpListener,
    signals: Option<UnixStream>,
    wake: Arc<WakeSignal>,
    rx: Receiver<Command>,
    inbound: Sender<Inbound>,
    auth: Authenticator,
    s: Settings,
    conns: Slab<Conn>,
    registry: Registry,
    wheel: TimerWheel<Timer>,
    stats: Stats,
    epoch: Arc<str>,
    start: Instant,
    next_serial: u64,
    open_sessions: usize,
    /// Connections with output queued in this iteration (each at most once).
    dirty: Vec<ConnId>,
    /// Emit instants of events routed in this iteration (latency recorded after flush).
    routed: Vec<Instant>,
    scratch_targets: Vec<ConnId>,
    /// Sessions with client input left unread after their per-iteration share.
    read_again: Vec<ConnId>,
    accept_paused: bool,
    /// A [`Timer::Watchdog`] pass is on the wheel.
    watchdog_armed: bool,
    draining: bool,
    drain_deadline_passed: bool,
}

/// A random epoch string, chosen once per gateway (PROTOCOL.md section 3).
pub(crate) fn new_epoch() -> String {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        let t = now_ms();
        b = (t as u32 ^ std::process::id()).to_be_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn new_run_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        b = now_ms().to_be_bytes();
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("r-{hex}")
}

impl Reactor {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        poll: Poll,
        listener: TcpListener,
        wake: Arc<WakeSignal>,
        rx: Receiver<Command>,
        inbound: Sender<Inbound>,
        auth: Authenticator,
        s: Settings,
        epoch: String,
    ) -> Reactor {
        let mut wheel = TimerWheel::new(4096, 0);
        wheel.insert(HOUSEKEEPING_MS, Timer::Housekeeping);
        let c = &s.config;
        let limits = Limits {
            replay_events: c.replay_events,
            replay_bytes_per_user: c.replay_bytes_per_user,
            replay_memory_bytes: c.replay_memory_bytes,
            max_active_runs_per_user: c.max_active_runs_per_user,
            max_active_runs: c.max_active_runs,
        };
        let epoch: Arc<str> = epoch.into();
        Reactor {
            poll,
            listener,
            signals: None,
            wake,
            rx,
            inbound,
            auth,
            s,
            conns: Slab::new(),
            registry: Registry::new(epoch.clone(), limits),
            wheel,
            stats: Stats::new(),
            epoch,
            start: Instant::now(),
            next_serial: 0,
            open_sessions: 0,
            dirty: Vec::new(),
            routed: Vec::new(),
            scratch_targets: Vec::new(),
            read_again: Vec::new(),
            accept_paused: false,
            watchdog_armed: false,
            draining: false,
            drain_deadline_passed: false,
        }
    }

    /// Install SIGTERM/SIGINT handling: a self-pipe read by the loop.
    pub(crate) fn handle_signals(&mut self) -> io::Result<()> {
        let (reader, writer) = std::os::unix::net::UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        let writer2 = writer.try_clone()?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGTERM, writer)?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGINT, writer2)?;
        let mut reader = UnixStream::from_std(reader);
        self.poll
            .registry()
            .register(&mut reader, SIGNALS, Interest::READABLE)?;
        self.signals = Some(reader);
        Ok(())
    }

    fn tick(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Run until a shutdown completes. Only setup-level failures return `Err`.
    pub(crate) fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut expired = Vec::new();
        let mut budget_exhausted = false;
        loop {
            let timeout =
                if budget_exhausted || !self.dirty.is_empty() || !self.read_again.is_empty() {
                    Some(Duration::ZERO)
                } else {
                    self.wheel.next_expiry().map(|at| {
                        let now = self.tick();
                        Duration::from_millis(at.saturating_sub(now))
                    })
                };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            let iteration = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    SIGNALS => self.on_signal(),
                    Token(key) => self.ready(key, event.is_readable(), event.is_writable()),
                }
            }
            for id in std::mem::take(&mut self.read_again) {
                self.read_ws(id);
            }
            budget_exhausted = self.drain_channel();
            let now = self.tick();
            let timers_started = Instant::now();
            self.wheel.advance(now, &mut expired);
            let fired = expired.len();
            for timer in expired.drain(..) {
                self.on_timer(timer);
            }
            if fired > 0 {
                self.stats
                    .record_timers(fired as u64, timers_started.elapsed().as_micros() as u64);
            }
            self.flush_dirty();
            self.stats
                .record_loop_us(iteration.elapsed().as_micros() as u64);
            if self.draining && (self.drain_deadline_passed || self.open_sessions_flushed()) {
                log::info!(
                    "shutdown complete; {} connections closed",
                    self.stats.connections_closed
                );
                return Ok(());
            }
        }
    }

    // ----------------------------------------------------------------- accept

    fn accept(&mut self) {
        if self.accept_paused {
            return;
        }
        for _ in 0..ACCEPT_BUDGET {
            match self.listener.accept() {
                Ok((stream, _peer)) => self.add_conn(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE/ENFILE and friends: the pending connection stays in the
                    // backlog with no new edge, so retry from a timer, not a busy loop.
                    log::warn!("accept failed ({e}); pausing accepts for {ACCEPT_RETRY_MS} ms");
                    self.accept_paused = true;
                    let at = self.tick() + ACCEPT_RETRY_MS;
                    self.wheel.insert(at, Timer::AcceptRetry);
                    return;
                }
            }
        }
        // Budget used up: more may be waiting with no new edge; come back next iteration.
        let at = self.tick();
        self.accept_paused = true;
        self.wheel.insert(at, Timer::AcceptRetry);
    }

    fn add_conn(&mut self, mut stream: TcpStream) {
        if let Err(e) = stream.set_nodelay(true) {
            log::debug!("set_nodelay failed: {e}");
        }
        self.next_serial += 1;
        let serial = self.next_serial;
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("register failed: {e}");
            return;
        }
        let now = self.start.elapsed().as_millis() as u64;
        let id = ConnId { key, serial };
        let timer = self
            .wheel
            .insert(now + self.s.config.handshake_timeout_ms, Timer::Phase(id));
        entry.insert(Conn {
            serial,
            tcp: stream,
            out: OutQueue::default(),
            phase: Phase::Http(Box::default()),
            timer: Some(timer),
            last_rx: now,
            bytes_in: 0,
            write_shut: false,
            flush_queued: false,
        });
    }

    // -------------------------------------------------------------- readiness

    fn ready(&mut self, key: usize, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        let id = ConnId {
            key,
            serial: conn.serial,
        };
        if writable {
            self.flush_conn(id);
        }
        if readable {
            match self.conns.get(key).map(|c| &c.phase) {
                Some(Phase::Http(_)) => self.read_http(id),
                Some(Phase::Open(_)) => self.read_ws(id),
                Some(Phase::Closing) => self.read_closing(id),
                None => {}
            }
        }
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        live(&mut self.conns, id)
    }

    fn mark_dirty(&mut self, id: ConnId) {
        if let Some(conn) = live(&mut self.conns, id) {
            mark(&mut conn.flush_queued, &mut self.dirty, id);
        }
    }

    // ------------------------------------------------------------------- HTTP

    fn read_http(&mut self, id: ConnId) {
        let now = self.tick();
        let max_body = self.s.config.max_publish_bytes;
        let mut chunk = [0u8; READ_CHUNK];
        let mut eof = false;
        let mut err = None;
        {
            let Some(conn) = live(&mut self.conns, id) else {
                return;
            };
            let Phase::Http(st) = &mut conn.phase else {
                return;
            };
            loop {
                // Cap what we buffer: the head limit plus the largest body we accept.
                let cap = http::MAX_HEAD_BYTES + max_body;
                if st.buf.len() >= cap {
                    break;
                }
                let room = (cap - st.buf.len()).min(READ_CHUNK);
                match conn.tcp.read(&mut chunk[..room]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        conn.bytes_in += n as u64;
                        self.stats.bytes_in += n as u64;
                        conn.last_rx = now;
                        st.buf.extend_from_slice(&chunk[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        err = Some(e.kind());
                        break;
                    }
                }
            }
        }
        if let Some(kind) = err {
            self.close(id, CloseReason::Io(kind));
            return;
        }
        self.process_http(id);
        if eof {
            // Half-closed client: answer what was complete, then finish.
            if matches!(self.conn_mut(id).map(|c| &c.phase), Some(Phase::Http(_))) {
                self.close(id, CloseReason::ClientClosed);
            }
        }
    }

    /// Answer every complete request in the buffer (keep-alive, pipelining).
    fn process_http(&mut self, id: ConnId) {
        let publish_enabled = self.s.config.publish_key.is_some();
        let max_publish = self.s.config.max_publish_bytes;
        loop {
            let Some(conn) = self.conn_mut(id) else {
                return;
            };
            let Phase::Http(st) = &mut conn.phase else {
                return;
            };
            let parsed = http::parse_head(&st.buf);
            let (req, head_len) = match parsed {
                Ok(None) => return,
                Ok(Some(done)) => done,
                Err(refusal) => {
                    self.refuse(id, &refusal);
                    return;
                }
            };
            let route = http::route(req.method, &req.path);
            match route {
                Route::WebSocket(path_mode) => {
                    let leftover = st.buf.get(head_len..).unwrap_or(&[]).to_vec();
                    st.buf = Vec::new();
                    self.upgrade(id, &req, path_mode, leftover);
                    return;
                }
                Route::Publish => {
                    let Some(len) = req.content_length else {
                        let r = if req.chunked {
                            Refusal::bad_request(
                                "chunked bodies are not supported; send Content-Length",
                            )
                        } else {
                            Refusal::bad_request("Content-Length required")
                        };
                        self.refuse(id, &r);
                        return;
                    };
                    if !publish_enabled {
                        self.refuse(id, &Refusal::not_found());
                        return;
                    }
                    if len > max_publish {
                        let body = json!({"error": "payload_too_large", "message": format!("body over max_publish_bytes ({max_publish})")});
                        self.respond_json(id, 413, &body, true, false);
                        return;
                    }
                    if st.buf.len() < head_len + len {
                        return; // wait for the rest of the body
                    }
                    let body: Vec<u8> =
                        st.buf.get(head_len..head_len + len).unwrap_or(&[]).to_vec();
                    st.buf.drain(..head_len + len);
                    st.served += 1;
                    let keep = http::keep_alive(&req);
                    let (status, answer) = self.publish(&req, &body);
                    self.respond_json(id, status, &answer, !keep, false);
                    if !keep {
                        return;
                    }
                }
                other => {
                    st.buf.drain(..head_len);
                    st.served += 1;
                    if req.content_length.unwrap_or(0) > 0 || req.chunked {
                        // Bodies on GET are not read: answer, then close.
                        self.answer_get(id, other, &req, true);
                        return;
                    }
                    let keep = http::keep_alive(&req);
                    self.answer_get(id, other, &req, !keep);
                    if !keep {
                        return;
                    }
                }
            }
            // Keep-alive: the idle deadline restarts after each answered request.
            self.rearm_phase(id, self.s.config.handshake_timeout_ms);
        }
    }

    fn answer_get(&mut self, id: ConnId, route: Route, req: &http::Request, close: bool) {
        self.stats.http_requests += 1;
        let head_only = req.method == Method::Head;
        match route {
            Route::Health => {
                let status = if self.draining { 503 } else { 200 };
                let body = json!({
                    "status": if self.draining { "draining" } else { "healthy" },
                    "version": env!("CARGO_PKG_VERSION"),
                    "uptime_s": self.start.elapsed().as_secs(),
                    "connections": self.open_sessions,
                    "epoch": &*self.epoch,
                });
                self.respond_json(id, status, &body, close, head_only);
            }
            Route::Config => {
                let body = self.s.config_json.clone();
                let resp = http::json_response(200, &body, close, head_only, &[]);
                self.respond_raw(id, resp, close);
            }
            Route::Stats => {
                let body = self.stats.to_json(&self.gauges());
                self.respond_json(id, 200, &body, close, head_only);
            }
            Route::Metrics => {
                let text = self.stats.to_prometheus(&self.gauges());
                let resp = http::text_response(
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    text.as_bytes(),
                    close,
                    head_only,
                );
                self.respond_raw(id, resp, close);
            }
            Route::MethodNotAllowed => {
                let resp = http::method_not_allowed_response(&req.path, head_only);
                self.respond_raw(id, resp, true);
            }
            Route::NotFound | Route::Publish | Route::WebSocket(_) => {
                self.refuse(id, &Refusal::not_found());
            }
        }
    }

    fn gauges(&self) -> Gauges {
        let replaying: Vec<(&str, u64)> = self
            .conns
            .iter()
            .filter_map(|(_, c)| match &c.phase {
                Phase::Open(s) => s.replay_next.map(|n| (&*s.user, n)),
                _ => None,
            })
            .collect();
        Gauges {
            connections_open: self.open_sessions,
            users_online: self.registry.online(),
            users_known: self.registry.len(),
            active_runs: self.registry.active_runs(),
            timers: self.wheel.len(),
            pending_out_bytes: self.conns.iter().map(|(_, c)| c.out.pending()).sum(),
            replaying: replaying.len(),
            replay_backlog_bytes: replaying
                .iter()
                .filter_map(|(user, next)| {
                    let kept = &self.registry.get(user)?.replay;
                    Some(
                        kept.iter()
                            .filter(|r| r.seq >= *next)
                            .map(|r| r.frame.len())
                            .sum::<usize>(),
                    )
                })
                .sum(),
            uptime_s: self.start.elapsed().as_secs(),
            memory: self.memory_gauges(),
        }
    }

    fn memory_gauges(&self) -> MemoryGauges {
        let r = &self.registry;
        let (events, bytes) = r.kept();
        MemoryGauges {
            replay_memory_used: r.memory_used(),
            replay_memory_limit: r.limits().replay_memory_bytes,
            active_runs_limit: r.limits().max_active_runs,
            replay_events: events,
            replay_bytes: bytes,
            replay_evicted: r.counters.replay_evicted,
            users_forgotten: r.counters.users_forgotten,
            runs_refused: r.counters.runs_refused,
        }
    }

    fn respond_json(
        &mut self,
        id: ConnId,
        status: u16,
        body: &Value,
        close: bool,
        head_only: bool,
    ) {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        let resp = http::json_response(status, &bytes, close, head_only, &[]);
        self.respond_raw(id, resp, close);
    }

    fn respond_raw(&mut self, id: ConnId, resp: Vec<u8>, close: bool) {
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        conn.out.push(Bytes::from(resp));
        self.mark_dirty(id);
        if close {
            self.close(id, CloseReason::HttpDone);
        }
    }

    /// Answer a refusal (status + JSON body) and close.
    fn refuse(&mut self, id: ConnId, refusal: &Refusal) {
        self.stats
            .refused(RefusalReason::from_status(refusal.status));
        log::info!(
            "conn={} refused status={} error={} reason={:?}",
            id.public_id(),
            refusal.status,
            refusal.code,
            refusal.message
        );
        if let Some(conn) = self.conn_mut(id) {
            conn.out.push(Bytes::from(refusal.to_response()));
            self.mark_dirty(id);
        }
        self.close(id, CloseReason::HttpDone);
    }

    // ---------------------------------------------------------------- publish

    fn publish(&mut self, req: &http::Request, body: &[u8]) -> (u16, Value) {
        self.stats.http_requests += 1;
        let key_ok = match (&self.s.config.publish_key, req.header("authorization")) {
            (Some(key), Some(h)) => {
                publish::bearer(h).is_some_and(|given| publish::key_matches(given, key))
            }
            _ => false,
        };
        if !key_ok {
            return (
                401,
                json!({"error": "invalid_key", "message": "missing or wrong publish key"}),
            );
        }
        let parsed = match publish::parse_batch(body) {
            Ok(events) => events,
            Err(publish::BatchError::TooMany(n)) => {
                return (
                    413,
                    json!({"error": "payload_too_large", "message": format!("{n} events; at most {} per request", publish::MAX_BATCH)}),
                );
            }
            Err(publish::BatchError::Bad { index, message }) => {
                self.stats.dropped(DropReason::Invalid, 1);
                return (
                    400,
                    json!({"error": "bad_event", "message": message, "index": index}),
                );
            }
        };
        // Refuse the whole batch when one event belongs to an ended run (simulating the
        // runs this batch itself ends), or would start a run past
        // max_active_runs_per_user / max_active_runs (counting the runs this batch
        // starts), so nothing of a bad request takes a seq.
        let mut ending: Vec<(&str, &str)> = Vec::new();
        let mut starting: Vec<(&str, &str)> = Vec::new();
        for (index, ev) in parsed.iter().enumerate() {
            let user = &*ev.key.user_id;
            let run = &*ev.key.run_id;
            let ended = self.registry.get(user).is_some_and(|u| u.run_ended(run))
                || ending.iter().any(|(u, r)| *u == user && *r == run);
            if ended {
                self.stats.dropped(DropReason::RunEnded, 1);
                return (
                    400,
                    json!({"error": "bad_event", "message": format!("run {run:?} already ended"), "index": index}),
                );
            }
            let known = self.registry.get(user);
            let starts = !ev.kind.ends_run()
                && !known.is_some_and(|u| u.runs.contains_key(run))
                && !starting.iter().any(|(u, r)| *u == user && *r == run);
            if starts {
                let user_runs = known.map_or(0, |u| u.runs.len());
                let batch_user = starting.iter().filter(|(u, _)| *u == user).count();
                if !self
                    .registry
                    .runs_fit(user_runs, batch_user + 1, starting.len() + 1)
                {
                    self.registry.counters.runs_refused += 1;
                    let limits = self.registry.limits();
                    return (
                        429,
                        json!({"error": "too_many_runs", "message": format!("run {run:?} refused: at most {} runs in progress per user (max_active_runs_per_user) and {} in all (max_active_runs)", limits.max_active_runs_per_user, limits.max_active_runs), "index": index}),
                    );
                }
                starting.push((user, run));
            }
            if ev.kind.ends_run() {
                ending.push((user, run));
            }
        }
        let n = parsed.len();
        for ev in parsed {
            self.stats.events_published += 1;
            self.route(ev);
        }
        (202, json!({"accepted": n}))
    }

    // ---------------------------------------------------------------- upgrade

    fn upgrade(
        &mut self,
        id: ConnId,
        req: &http::Request,
        path_mode: Option<Mode>,
        leftover: Vec<u8>,
    ) {
        if self.draining {
            self.refuse(id, &Refusal::shutting_down());
            return;
        }
        let c = &self.s.config;
        let admitted = http::admit_upgrade(
            req,
            path_mode,
            c.allow_query_token,
            &c.allowed_origins,
            &self.auth,
        );
        let (up, claims) = match admitted {
            Ok(admitted) => admitted,
            Err(r) => return self.refuse(id, &r),
        };
        #[cfg(feature = "conformance")]
        if up.mode == Mode::Echo {
            return self.open_echo(id, up, claims, leftover);
        }
        // Limits: the per-user policy first (eviction frees a slot), then the total.
        let per_user = self.s.config.max_connections_per_user;
        let user_conns: Vec<ConnId> = self
            .registry
            .get(&claims.sub)
            .map(|u| u.conns.iter().map(|c| c.id).collect())
            .unwrap_or_default();
        if user_conns.len() >= per_user {
            match self.s.config.per_user_policy {
                PerUserPolicy::Reject => {
                    return self
                        .refuse(id, &Refusal::too_many("per-user connection limit reached"));
                }
                PerUserPolicy::EvictOldest => {
                    let excess = user_conns.len() + 1 - per_user;
                    for old in user_conns.into_iter().take(excess) {
                        self.close(old, CloseReason::Evicted);
                    }
                }
            }
        }
        if self.open_sessions >= self.s.config.max_connections {
            return self.refuse(id, &Refusal::too_many("gateway connection limit reached"));
        }
        self.open_session(id, up, claims, leftover);
    }

    fn open_session(
        &mut self,
        id: ConnId,
        up: http::Upgrade,
        claims: crate::auth::Claims,
        leftover: Vec<u8>,
    ) {
        let resume_ask = up.last_seq.map(|n| (n, up.epoch.as_deref().unwrap_or("")));
        let thread: Option<Arc<str>> = up.thread_id.as_deref().map(Arc::from);
        let entry = ConnEntry {
            id,
            thread: thread.clone(),
            isolated: up.mode.is_isolated(),
        };
        let user = self.registry.entry(&claims.sub);
        let user_name = user.name.clone();
        let epoch = user.epoch.clone();
        let resume = user.resume(resume_ask);
        // A resume streams the kept events from the replay buffer as the socket drains
        // (see `pump_replay`), never more than half of max_pending_bytes queued at once.
        let replay_next = match (&resume, resume_ask) {
            (Resume::Exact, Some((after, _))) if after < user.seq => Some(after + 1),
            _ => None,
        };
        let replayed = user
            .seq
            .saturating_sub(replay_next.map_or(user.seq, |n| n - 1));
        let mut runs_truncated = false;
        let active_runs: Vec<Value> = if entry.isolated {
            Vec::new()
        } else {
            let mut runs: Vec<(&Arc<str>, &Run)> = user
                .runs
                .iter()
                .filter(|(_, r)| r.begun && r.owner.is_none())
                .filter(|(_, r)| match (&thread, &r.thread) {
                    (Some(want), Some(got)) => want == got,
                    _ => true,
                })
                .collect();
            // The most recently started CONNECTED_RUNS_MAX, oldest first (runs started
            // in the same millisecond: by their last event).
            runs.sort_by_key(|(_, r)| std::cmp::Reverse((r.started_ts, r.last_seq)));
            runs_truncated = runs.len() > CONNECTED_RUNS_MAX;
            runs.truncate(CONNECTED_RUNS_MAX);
            runs.reverse();
            runs.into_iter()
                .map(|(run_id, r)| {
                    json!({
                        "run_id": &**run_id,
                        "thread_id": r.thread.as_deref(),
                        "agent_name": &*r.agent_name,
                        "started_ts": r.started_ts,
                        "last_seq": r.last_seq,
                        "last_type": &*r.last_type,
                    })
                })
                .collect()
        };
        let mut connected = json!({
            "type": "connected",
            "connection_id": id.public_id(),
            "user_id": &*user_name,
            "mode": up.mode.as_str(),
            "thread_id": up.thread_id,
            "epoch": &*epoch,
            "last_seq": user.seq,
            "resumed": match resume { Resume::NotAsked => Value::Null, Resume::Exact => Value::Bool(true), Resume::Lost => Value::Bool(false) },
            "heartbeat_interval_ms": self.s.config.heartbeat_interval_ms,
            "token_exp": claims.exp,
            "active_runs": active_runs,
        });
        if runs_truncated {
            connected["active_runs_truncated"] = Value::Bool(true);
        }
        self.registry.add_conn(&claims.sub, entry);
        if !self.begin_session(
            id,
            &up,
            user_name,
            thread,
            claims.exp,
            replay_next,
            leftover,
        ) {
            return;
        }
        if let Some(conn) = live(&mut self.conns, id) {
            conn.out.push(control_frame(&connected));
        }
        log::info!(
            "conn={} user={:?} open mode={} resumed={} replayed={}",
            id.public_id(),
            claims.sub,
            up.mode.as_str(),
            match resume {
                Resume::NotAsked => "-",
                Resume::Exact => "true",
                Resume::Lost => "false",
            },
            replayed
        );
        self.pump_replay(id);
        self.mark_dirty(id);
        // Frames pipelined behind the upgrade request are already buffered: read them.
        self.read_ws(id);
    }

    /// The part of opening a session every kind shares: the 101 answer queued, one
    /// phase timer for the earlier of the next heartbeat and the token's expiry (`exp`,
    /// seconds), the tungstenite context over the bytes read past the request head, and
    /// the open-session counters. False when the connection is gone.
    #[allow(clippy::too_many_arguments)] // the session's fields, each from its caller
    fn begin_session(
        &mut self,
        id: ConnId,
        up: &http::Upgrade,
        user: Arc<str>,
        thread: Option<Arc<str>>,
        exp: u64,
        replay_next: Option<u64>,
        leftover: Vec<u8>,
    ) -> bool {
        self.open_sessions += 1;
        self.stats.connections_opened += 1;
        let now = self.tick();
        let token_at = now.saturating_add(exp.saturating_mul(1000).saturating_sub(now_ms()));
        let heartbeat_at = now + self.s.config.heartbeat_interval_ms;
        let ws_config = self.s.ws_config;
        let Some(conn) = live(&mut self.conns, id) else {
            return false;
        };
        if let Some(t) = conn.timer.take() {
            self.wheel.cancel(t);
        }
        // One timer per session: the earlier of the next heartbeat and token expiry.
        conn.timer = Some(
            self.wheel
                .insert(heartbeat_at.min(token_at), Timer::Phase(id)),
        );
        conn.out.push(Bytes::from(http::upgrade_response(
            &up.accept_key,
            up.subprotocol,
        )));
        conn.last_rx = now;
        conn.phase = Phase::Open(Box::new(Session {
            ws: WebSocketContext::from_partially_read(leftover, Role::Server, Some(ws_config)),
            user,
            mode: up.mode,
            thread,
            token_exp: exp,
            token_deadline: token_at,
            next_ping: heartbeat_at,
            bad_in_row: 0,
            opened: Instant::now(),
            replay_next,
        }));
        true
    }

    // -------------------------------------------------------------- WebSocket

    fn read_ws(&mut self, id: ConnId) {
        #[cfg(feature = "conformance")]
        if self.session(id).is_some_and(|s| s.mode == Mode::Echo) {
            return self.read_echo(id);
        }
        let mut texts = Vec::new();
        let Some((ending, more)) = self.read_turn(id, |_, _, msg| match msg {
            Message::Text(t) => {
                texts.push(t);
                Step::Go
            }
            _ => Step::End(CloseReason::Binary),
        }) else {
            return;
        };
        for text in texts {
            self.stats.client_messages += 1;
            self.client_message(id, text.as_str());
            if self
                .conn_mut(id)
                .is_none_or(|c| !matches!(c.phase, Phase::Open(_)))
            {
                return;
            }
        }
        if let Some(reason) = ending {
            self.close(id, reason);
        } else if more {
            self.read_again.push(id);
        }
    }

    /// One turn of reading open session `id`: every complete data message (text or
    /// binary) goes to `on_data` with the session's context and wire, in order; pings
    /// are answered and pongs taken by tungstenite, a close is answered and ends the
    /// read. At most [`MESSAGES_PER_READ`] messages of any kind and
    /// [`READ_BUDGET_BYTES`] from the socket per turn, so one chatty or flooding client
    /// cannot starve the others. Queues tungstenite's replies, records the arrival
    /// (`last_rx`, bytes in) and marks the connection for flushing. Returns why the
    /// session must end (if it must) and whether a budget stopped the read before the socket was drained (no new edge will come for what is left: read it
    /// again next iteration); `None` when the connection is gone or not open.
    fn read_turn<F>(&mut self, id: ConnId, mut on_data: F) -> Option<(Option<CloseReason>, bool)>
    where
        F: FnMut(&mut WebSocketContext, &mut Wire<'_>, Message) -> Step,
    {
        let now = self.tick();
        let mut ending: Option<CloseReason> = None;
        let mut handled = 0usize;
        let mut stopped_early = false;
        {
            let conn = live(&mut self.conns, id)?;
            let Phase::Open(session) = &mut conn.phase else {
                return None;
            };
            let before = conn.bytes_in;
            let mut read_left = READ_BUDGET_BYTES;
            loop {
                let mut wire = Budgeted {
                    wire: Wire {
                        tcp: &mut conn.tcp,
                        out: &mut conn.out,
                        bytes_in: &mut conn.bytes_in,
                    },
                    left: read_left,
                    exhausted: false,
                };
                let read = session.ws.read(&mut wire);
                read_left = wire.left;
                stopped_early |= wire.exhausted;
                handled += 1;
                match read {
                    Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                        match on_data(&mut session.ws, &mut wire.wire, msg) {
                            Step::Go => {}
                            Step::End(reason) => {
                                ending = Some(reason);
                                break;
                            }
                        }
                    }
                    Ok(Message::Close(_)) => {
                        // tungstenite queued the echo; the next read reports the end.
                        continue;
                    }
                    Ok(_) => {} // ping (answered by tungstenite), pong, raw frame
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        break
                    }
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {
                        continue
                    }
                    Err(e) => {
                        ending = Some(classify_ws_error(&e));
                        break;
                    }
                }
                if handled >= MESSAGES_PER_READ {
                    stopped_early = true;
                    break;
                }
            }
            if conn.bytes_in > before {
                conn.last_rx = now;
            }
            self.stats.bytes_in += conn.bytes_in - before;
            // Push queued pongs into the output queue.
            let mut wire = Wire {
                tcp: &mut conn.tcp,
                out: &mut conn.out,
                bytes_in: &mut conn.bytes_in,
            };
            let _ = session.ws.flush(&mut wire);
        }
        self.mark_dirty(id);
        let more = stopped_early && ending.is_none();
        Some((ending, more))
    }

    fn read_closing(&mut self, id: ConnId) {
        let mut done = false;
        {
            let Some(conn) = self.conn_mut(id) else {
                return;
            };
            let mut sink = [0u8; 4096];
            loop {
                match conn.tcp.read(&mut sink) {
                    Ok(0) => {
                        done = true;
                        break;
                    }
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        done = true;
                        break;
                    }
                }
            }
        }
        if done {
            self.finish(id);
        }
    }

    fn send_frame(&mut self, id: ConnId, frame: Bytes) {
        if let Some(conn) = self.conn_mut(id) {
            conn.out.push(frame);
            self.mark_dirty(id);
        }
    }

    fn send_error(&mut self, id: ConnId, code: &str, message: &str) {
        self.send_frame(
            id,
            control_frame(&json!({"type": "error", "code": code, "message": message})),
        );
    }

    fn bad_message(&mut self, id: ConnId, message: &str) {
        self.stats.bad_client_messages += 1;
        let too_many = match self.conn_mut(id).map(|c| &mut c.phase) {
            Some(Phase::Open(s)) => {
                s.bad_in_row = s.bad_in_row.saturating_add(1);
                s.bad_in_row > MAX_BAD_IN_ROW
            }
            _ => return,
        };
        if too_many {
            self.close(id, CloseReason::PolicyViolation);
        } else {
            self.send_error(id, "bad_message", message);
        }
    }

    fn client_message(&mut self, id: ConnId, text: &str) {
        let msg = match ClientMessage::parse(text) {
            Ok(msg) => msg,
            Err(BadMessage(why)) => return self.bad_message(id, why),
        };
        match msg {
            ClientMessage::Ping => {
                self.send_frame(id, control_frame(&json!({"type": "pong", "ts": now_ms()})))
            }
            ClientMessage::UserMessage {
                text,
                thread_id,
                reference,
            } => self.user_message(id, &text, thread_id, reference),
            ClientMessage::Cancel { run_id } => self.cancel(id, &run_id),
            ClientMessage::Refresh { token } => self.refresh(id, &token),
        }
        if let Some(Phase::Open(s)) = self.conn_mut(id).map(|c| &mut c.phase) {
            s.bad_in_row = 0;
        }
    }

    fn session(&self, id: ConnId) -> Option<&Session> {
        match self
            .conns
            .get(id.key)
            .filter(|c| c.serial == id.serial)
            .map(|c| &c.phase)
        {
            Some(Phase::Open(s)) => Some(s),
            _ => None,
        }
    }

    fn user_message(&mut self, id: ConnId, text: &str, thread: Option<String>, reference: Value) {
        let Some(session) = self.session(id) else {
            return;
        };
        let user = session.user.clone();
        let isolated = session.mode.is_isolated();
        let run_id = new_run_id();
        let msg = Inbound::UserMessage {
            user_id: user.to_string(),
            thread_id: thread.clone(),
            text: text.to_owned(),
            run_id: run_id.clone(),
            connection_id: id.public_id(),
        };
        match self.inbound.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Disconnected(_)) => {
                return self.send_error(id, "no_agent", "no agent is consuming user messages");
            }
            Err(TrySendError::Full(_)) => {
                return self.send_error(id, "busy", "agent queue full; try again");
            }
        }
        let now = self.tick();
        let u = self.registry.entry(&user);
        u.runs.insert(
            Arc::from(run_id.as_str()),
            Run::pending(
                thread.as_deref().map(Arc::from),
                isolated.then_some(id),
                now,
            ),
        );
        self.send_frame(
            id,
            control_frame(&json!({"type": "ack", "ref": reference, "run_id": run_id})),
        );
    }

    fn cancel(&mut self, id: ConnId, run_id: &str) {
        let Some(session) = self.session(id) else {
            return;
        };
        let user = session.user.clone();
        let found = match self
            .registry
            .get_mut(&user)
            .and_then(|u| u.runs.get_mut(run_id))
        {
            Some(run) => {
                if let Some(flag) = &run.cancel {
                    flag.store(true, Ordering::Release);
                }
                run.cancel_requested = true;
                true
            }
            None => false,
        };
        if !found {
            return self.send_error(id, "not_found", "no active run with this run_id");
        }
        let _ = self.inbound.try_send(Inbound::Cancel {
            user_id: user.to_string(),
            run_id: run_id.to_owned(),
        });
        self.send_frame(
            id,
            control_frame(&json!({"type": "cancel_requested", "run_id": run_id})),
        );
    }

    fn refresh(&mut self, id: ConnId, token: &str) {
        let Some(session) = self.session(id) else {
            return;
        };
        let user = session.user.clone();
        match self.auth.verify(token) {
            Err(e) => self.send_error(id, "invalid_token", &e.to_string()),
            Ok(claims) if *claims.sub != *user => self.close(id, CloseReason::RefreshOtherUser),
            Ok(claims) => {
                let now = self.tick();
                let at =
                    now.saturating_add(claims.exp.saturating_mul(1000).saturating_sub(now_ms()));
                let Some(conn) = live(&mut self.conns, id) else {
                    return;
                };
                if let Phase::Open(s) = &mut conn.phase {
                    s.token_exp = claims.exp;
                    s.token_deadline = at;
                }
                // A refresh normally extends the token: the phase timer then simply
                // finds the later deadline when it fires. Only an earlier one re-arms it.
                let armed = conn.timer.and_then(|t| self.wheel.deadline(t));
                if armed.is_none_or(|d| at < d) {
                    if let Some(old) = conn.timer.take() {
                        self.wheel.cancel(old);
                    }
                    conn.timer = Some(self.wheel.insert(at, Timer::Phase(id)));
                }
                self.send_frame(
                    id,
                    control_frame(&json!({"type": "refreshed", "exp": claims.exp})),
                );
            }
        }
    }

    // ---------------------------------------------------------------- routing

    /// Drain the channel up to the budget; true when the budget ran out.
    fn drain_channel(&mut self) -> bool {
        self.wake.reset();
        for _ in 0..DRAIN_BUDGET {
            match self.rx.try_recv() {
                Ok(Command::Event(ev)) => self.route(*ev),
                Ok(Command::Shutdown) => self.begin_shutdown(),
                Err(_) => return false,
            }
        }
        true
    }

    /// Assign the user's next seq, keep the event for replay, queue it on every
    /// connection that takes it.
    fn route(&mut self, ev: Event) {
        self.stats.events_emitted += 1;
        let now = self.tick();
        let (Routed { frame, owner }, user) = match self.registry.route(&ev, now) {
            Ok(routed) => routed,
            Err(Refused::RunEnded) => {
                self.stats.dropped(DropReason::RunEnded, 1);
                log::debug!(
                    "user={:?} run={:?} event after the run ended: dropped",
                    ev.key.user_id,
                    ev.key.run_id
                );
                return;
            }
            Err(Refused::TooManyRuns) => {
                if let Some(flag) = &ev.refused_flag {
                    flag.store(true, Ordering::Release);
                }
                self.stats.dropped(DropReason::Invalid, 1);
                log::debug!(
                    "user={:?} run={:?} too many active runs: run refused",
                    ev.key.user_id,
                    ev.key.run_id
                );
                return;
            }
        };
        self.scratch_targets.clear();
        self.scratch_targets
            .extend(user.targets(ev.key.thread_id.as_deref(), owner));
        let mut delivered = 0;
        for i in 0..self.scratch_targets.len() {
            let Some(&target) = self.scratch_targets.get(i) else {
                break;
            };
            if let Some(conn) = live(&mut self.conns, target) {
                if let Phase::Open(session) = &conn.phase {
                    // A connection still catching up on its replay takes this event
                    // from the replay buffer (it was just kept there), in order.
                    if session.replay_next.is_none() {
                        conn.out.push(frame.clone());
                        delivered += 1;
                    }
                    mark(&mut conn.flush_queued, &mut self.dirty, target);
                }
            }
        }
        self.stats.events_delivered += delivered;
        if delivered == 0 {
            self.stats.dropped(DropReason::NoConnection, 1);
        }
        self.routed.push(ev.emitted);
    }

    // ----------------------------------------------------------------- output

    fn flush_dirty(&mut self) {
        // Each connection is on the list at most once (its `flush_queued` flag), so
        // there is nothing to sort or dedupe.
        let mut dirty = std::mem::take(&mut self.dirty);
        for id in dirty.drain(..) {
            if let Some(conn) = live(&mut self.conns, id) {
                conn.flush_queued = false;
                self.flush_conn(id);
            }
        }
        // Flushing can queue more (a replay's next part, a close frame): keep those
        // for the next iteration, which then polls with a zero timeout.
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
        if !self.routed.is_empty() {
            let now = Instant::now();
            for t in self.routed.drain(..) {
                self.stats
                    .record_latency_us(now.saturating_duration_since(t).as_micros() as u64);
            }
        }
    }

    fn flush_conn(&mut self, id: ConnId) {
        let max_pending = self.s.config.max_pending_bytes;
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        let result = conn.out.write_to(&mut conn.tcp);
        let pending = conn.out.pending();
        let written = match result {
            Ok(n) => n,
            Err(e) => {
                let kind = e.kind();
                if matches!(conn.phase, Phase::Closing) {
                    self.finish(id);
                } else {
                    self.close(id, CloseReason::Io(kind));
                }
                return;
            }
        };
        self.stats.bytes_out += written as u64;
        match &mut conn.phase {
            Phase::Closing => {
                if pending == 0 && !conn.write_shut {
                    conn.write_shut = true;
                    let _ = conn.tcp.shutdown(Shutdown::Write);
                }
            }
            Phase::Open(session) => {
                if pending > max_pending {
                    self.close(id, CloseReason::SlowConsumer);
                } else if session.replay_next.is_some() {
                    self.pump_replay(id);
                }
            }
            Phase::Http(_) => {}
        }
    }

    /// Queue the next part of a resuming connection's replay: kept events after its
    /// cursor, until half of `max_pending_bytes` is queued. Live events for the
    /// connection wait in the replay buffer meanwhile, so a client that keeps reading
    /// is never closed as slow because of its replay. If the buffer dropped events the
    /// cursor has not reached, the connection cannot continue without a gap: 1013.
    fn pump_replay(&mut self, id: ConnId) {
        let limit = (self.s.config.max_pending_bytes / 2).max(1);
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        let Phase::Open(session) = &mut conn.phase else {
            return;
        };
        let Some(next) = session.replay_next else {
            return;
        };
        let Some(user) = self.registry.get(&session.user) else {
            session.replay_next = None;
            return;
        };
        if next > user.seq {
            session.replay_next = None;
            return;
        }
        if user.replay.front().is_none_or(|first| first.seq > next) {
            self.close(id, CloseReason::SlowConsumer);
            return;
        }
        let Some(entry) = user.conns.iter().find(|c| c.id == id) else {
            return;
        };
        let mut cursor = next;
        let mut sent = 0u64;
        let mut caught_up = true;
        for kept in user.replay_after(next - 1, entry) {
            if conn.out.pending() >= limit {
                caught_up = false;
                break;
            }
            conn.out.push(kept.frame.clone());
            cursor = kept.seq + 1;
            sent += 1;
        }
        session.replay_next = if caught_up { None } else { Some(cursor) };
        self.stats.events_replayed += sent;
        if sent > 0 {
            mark(&mut conn.flush_queued, &mut self.dirty, id);
        }
    }

    // ----------------------------------------------------------------- timers

    fn rearm_phase(&mut self, id: ConnId, after_ms: u64) {
        let at = self.tick() + after_ms;
        let timer = self.wheel.insert(at, Timer::Phase(id));
        if let Some(conn) = live(&mut self.conns, id) {
            if let Some(old) = conn.timer.replace(timer) {
                self.wheel.cancel(old);
            }
        } else {
            self.wheel.cancel(timer);
        }
    }

    fn on_timer(&mut self, timer: Timer) {
        match timer {
            Timer::Phase(id) => self.on_phase_timer(id),
            Timer::AcceptRetry => {
                self.accept_paused = false;
                self.accept();
            }
            Timer::Housekeeping => {
                self.housekeeping();
                let at = self.tick() + HOUSEKEEPING_MS;
                self.wheel.insert(at, Timer::Housekeeping);
            }
            Timer::Watchdog => self.watchdog(),
            Timer::ShutdownDeadline => {
                self.drain_deadline_passed = true;
            }
        }
    }

    fn on_phase_timer(&mut self, id: ConnId) {
        let now = self.tick();
        let interval = self.s.config.heartbeat_interval_ms;
        let timeout = self.s.config.heartbeat_timeout_ms;
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        conn.timer = None;
        let session = match &mut conn.phase {
            Phase::Http(_) => return self.close(id, CloseReason::HandshakeTimeout),
            Phase::Closing => return self.finish(id),
            Phase::Open(session) => session,
        };
        if now >= session.token_deadline {
            let left_ms = session
                .token_exp
                .saturating_mul(1000)
                .saturating_sub(now_ms());
            if left_ms <= 5 {
                return self.close(id, CloseReason::TokenExpired);
            }
            // The wall clock moved against the monotonic one: aim again.
            session.token_deadline = now + left_ms;
        }
        let silent = now.saturating_sub(conn.last_rx);
        if silent >= timeout {
            return self.close(id, CloseReason::HeartbeatTimeout);
        }
        // Lazy heartbeat: the timer fires once per interval whatever the traffic (a
        // frame only updates `last_rx`), so busy connections cost no timer work per frame.
        if now + 1 >= session.next_ping {
            let mut wire = Wire {
                tcp: &mut conn.tcp,
                out: &mut conn.out,
                bytes_in: &mut conn.bytes_in,
            };
            let _ = session.ws.write(&mut wire, Message::Ping(Bytes::new()));
            let _ = session.ws.flush(&mut wire);
            session.next_ping = now + interval;
            mark(&mut conn.flush_queued, &mut self.dirty, id);
        }
        let next = session
            .next_ping
            .min(conn.last_rx + timeout)
            .min(session.token_deadline)
            .max(now + 1);
        conn.timer = Some(self.wheel.insert(next, Timer::Phase(id)));
    }

    fn housekeeping(&mut self) {
        let now = self.tick();
        self.registry.sweep(now, self.s.config.replay_ttl_ms);
        if !self.watchdog_armed {
            self.watchdog();
        }
    }

    /// Run watchdog: end runs with no event for run_idle_timeout_ms, at most
    /// WATCHDOG_BUDGET per pass (another pass soon when there may be more).
    fn watchdog(&mut self) {
        let now = self.tick();
        self.watchdog_armed = false;
        let idle_cutoff = now.saturating_sub(self.s.config.run_idle_timeout_ms);
        let stale: Vec<RunKey> = self.registry.stale_runs(idle_cutoff, WATCHDOG_BUDGET);
        if stale.len() >= WATCHDOG_BUDGET {
            self.watchdog_armed = true;
            self.wheel.insert(now + WATCHDOG_AGAIN_MS, Timer::Watchdog);
        }
        if !stale.is_empty() {
            self.stats.watchdog_passes += 1;
            self.stats.runs_timed_out += stale.len() as u64;
        }
        for key in stale {
            log::info!(
                "user={:?} run={:?} idle for run_idle_timeout_ms: ending it",
                key.user_id,
                key.run_id
            );
            match Event::new(
                key,
                EventKind::AgentError,
                &json!({"reason": "run_timeout"}),
            ) {
                Ok(ev) => self.route(ev),
                Err(e) => log::error!("synthetic run_timeout event failed: {e}"),
            }
        }
    }

    // -------------------------------------------------------------- shutdown

    fn on_signal(&mut self) {
        let mut buf = [0u8; 64];
        if let Some(s) = self.signals.as_mut() {
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
        log::info!("signal received: draining");
        self.begin_shutdown();
    }

    fn begin_shutdown(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        let at = self.tick() + self.s.config.shutdown_grace_ms;
        self.wheel.insert(at, Timer::ShutdownDeadline);
        let open: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Open(_)))
            .map(|(key, c)| ConnId {
                key,
                serial: c.serial,
            })
            .collect();
        for id in open {
            self.close(id, CloseReason::Shutdown);
        }
    }

    fn open_sessions_flushed(&self) -> bool {
        self.conns.iter().all(|(_, c)| match c.phase {
            Phase::Open(_) => false,
            Phase::Closing => c.out.is_empty(),
            Phase::Http(_) => true,
        })
    }

    // ------------------------------------------------------------------ close

    /// The one close path: unregister the session, queue the close frame, count and
    /// log the reason once, then let the output drain (bounded by a linger timer).
    pub(crate) fn close(&mut self, id: ConnId, reason: CloseReason) {
        let linger_at = self.tick() + LINGER_MS;
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        let phase = std::mem::replace(&mut conn.phase, Phase::Closing);
        match phase {
            Phase::Closing => {
                conn.phase = Phase::Closing;
                return;
            }
            Phase::Http(_) => {}
            Phase::Open(mut session) => {
                if let Some((code, text)) = reason.close_frame() {
                    if matches!(reason, CloseReason::SlowConsumer) {
                        let dropped = conn.out.pending();
                        conn.out.discard_unstarted();
                        if dropped > conn.out.pending() {
                            self.stats.dropped(DropReason::SlowConsumer, 1);
                        }
                    }
                    let mut wire = Wire {
                        tcp: &mut conn.tcp,
                        out: &mut conn.out,
                        bytes_in: &mut conn.bytes_in,
                    };
                    let frame = CloseFrame {
                        code: CloseCode::from(code),
                        reason: text.into(),
                    };
                    let _ = session.ws.close(&mut wire, Some(frame));
                    let _ = session.ws.flush(&mut wire);
                }
                self.registry
                    .remove_conn(&session.user, id, linger_at - LINGER_MS);
                self.open_sessions -= 1;
                self.stats.closed(reason.label());
                log::info!(
                    "conn={} user={:?} closed reason={} code={} after_ms={}",
                    id.public_id(),
                    session.user,
                    reason.label(),
                    reason.close_frame().map_or(0, |(c, _)| c),
                    session.opened.elapsed().as_millis()
                );
            }
        }
        if let Some(t) = conn.timer.take() {
            self.wheel.cancel(t);
        }
        if matches!(
            reason,
            CloseReason::Io(_) | CloseReason::ClientClosed | CloseReason::HandshakeTimeout
        ) && conn.out.is_empty()
        {
            self.finish(id);
            return;
        }
        conn.timer = Some(self.wheel.insert(linger_at, Timer::Phase(id)));
        mark(&mut conn.flush_queued, &mut self.dirty, id);
    }

    /// Drop the socket and free the slot.
    fn finish(&mut self, id: ConnId) {
        if self.conns.get(id.key).is_none_or(|c| c.serial != id.serial) {
            return;
        }
        if matches!(
            self.conns.get(id.key).map(|c| &c.phase),
            Some(Phase::Open(_))
        ) {
            // Unregister the session first (this may already free the slot).
            self.close(id, CloseReason::ClientClosed);
            if self.conns.get(id.key).is_none_or(|c| c.serial != id.serial) {
                return;
            }
        }
        if let Some(mut conn) = self.conns.try_remove(id.key) {
            if let Some(t) = conn.timer.take() {
                self.wheel.cancel(t);
            }
            let _ = self.poll.registry().deregister(&mut conn.tcp);
        }
    }
}

/// Put connection `id` on the flush list unless it already is.
fn mark(flush_queued: &mut bool, list: &mut Vec<ConnId>, id: ConnId) {
    if !*flush_queued {
        *flush_queued = true;
        list.push(id);
    }
}

/// The connection `id` names, if its slot still holds it (a free function over the
/// slab so callers can borrow other reactor fields at the same time).
fn live(conns: &mut Slab<Conn>, id: ConnId) -> Option<&mut Conn> {
    conns.get_mut(id.key).filter(|c| c.serial == id.serial)
}

fn classify_ws_error(e: &tungstenite::Error) -> CloseReason {
    use tungstenite::error::ProtocolError;
    match e {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            CloseReason::ClientClosed
        }
        tungstenite::Error::Io(e) => CloseReason::Io(e.kind()),
        tungstenite::Error::Capacity(_) => CloseReason::TooBig,
        tungstenite::Error::Utf8(_) => CloseReason::BadUtf8,
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            CloseReason::ClientClosed
        }
        tungstenite::Error::Protocol(_) => CloseReason::Protocol,
        _ => CloseReason::Protocol,
    }
}
