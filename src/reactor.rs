//! The reactor: one thread, one `mio::Poll`, owning every socket and all routing state.
//!
//! One loop iteration, in order:
//! 1. poll, with the timeout of the next timer (0 when the channel budget ran out);
//! 2. dispatch readiness: accept new sockets, read HTTP heads and WebSocket frames,
//!    write queued output on writable edges; then one read turn for each session the
//!    last iteration left unread (`read_again`: a session gets at most one turn per
//!    iteration, and none while it is over its input allowance); then feed held
//!    `user_message`s to the workers' channel, round-robin across users ([`Inbox`]);
//! 3. drain the workers' channel up to [`DRAIN_BUDGET`] commands, routing each event to
//!    its user's connections (frames are shared, queued per connection);
//! 4. advance the timer wheel: handshake deadlines, heartbeats, token expiry, lingering
//!    closes, housekeeping (replay expiry, run watchdog);
//! 5. flush every connection that got output in this iteration: one `writev` each;
//! 6. record the iteration time.
//!
//! Every per-connection failure ends in [`Reactor::close`], which unregisters the
//! session, counts and logs the reason once, and sends the close frame when one is due.
//!
//! Connections that have not upgraded (plain HTTP, handshakes) are bounded as a group
//! (`max_http_connections`, `max_http_buffer_total_bytes`, oldest closed first) and each
//! one by [`HTTP_PENDING_LIMIT`] of unsent answers, [`HTTP_REQUESTS_PER_TURN`] and
//! [`HTTP_REQUESTS_PER_CONN`]; at the descriptor limit a reserve descriptor answers
//! waiting clients 503 `overloaded` (issue 9 F1, F2).

use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
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
use crate::http::{self, Method, Refusal, Route};
use crate::inbox::{self, Admit, Inbox};
use crate::log_sink::Repeats;
use crate::mode::Mode;
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
/// Identical refusal lines (same status, error and reason) within this window: the
/// first [`REFUSAL_LOG_BURST`] are written, the rest counted and reported in one line,
/// so a flood of refused upgrades costs a few lines per second per kind.
const REFUSAL_LOG_WINDOW_MS: u64 = 1000;
const REFUSAL_LOG_BURST: u64 = 5;
/// Kinds of refusal lines collapsed at once (status, error, reason).
const REFUSAL_LOG_KINDS: usize = 32;
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
/// At most one `refresh` token check per connection per this many milliseconds; a
/// `refresh` sooner is answered `rate_limited` without a check and counts as a bad
/// message. A check costs a signature verification (tens of microseconds for ES256,
/// about a millisecond for RSA-8192), so a refresh flood must not buy one per message.
const REFRESH_INTERVAL_MS: u64 = 1000;
/// Input allowance of one session (not the conformance echo): a read turn costs
/// [`INPUT_US_PER_MESSAGE`] per data message (the JSON the gateway parses and acts on)
/// plus [`INPUT_US_PER_KIB`] per KiB read (control frames and fragments cost their
/// bytes), against a virtual clock that may run at most [`INPUT_BURST_US`] ahead of
/// real time; past it the session is not read (the kernel buffer fills and TCP pushes
/// back on the sender) until the allowance refills. That is about 1,000 messages and
/// 1 MiB per second sustained, 250 messages or 256 KiB in a burst: far above what a
/// client of this protocol sends, and a flood of any kind from one connection then
/// costs the loop a small share of its time (issue 9, F3).
const INPUT_US_PER_MESSAGE: u64 = 1000;
const INPUT_US_PER_KIB: u64 = 1000;
const INPUT_BURST_US: u64 = 250_000;
/// While `user_message`s are held for room in the workers' channel, the loop polls
/// at least this often to feed them (the channel has no readiness to wait on).
const INBOX_RETRY_MS: u64 = 5;
/// How often users with nothing pending any more are forgotten by the inbox.
const INBOX_PRUNE_MS: u64 = 10_000;
/// Most bytes discarded from a closing connection per readable event.
const CLOSING_DISCARD_BYTES: usize = 1024 * 1024;
/// Size of one read from a plain HTTP connection.
const READ_CHUNK: usize = 16 * 1024;
/// Unsent output past which a connection that has not upgraded is neither read nor
/// answered until the client reads (issue 9 F1: a client that pipelines requests and
/// never reads their answers costs at most this much output, plus one answer).
const HTTP_PENDING_LIMIT: usize = 64 * 1024;
/// Most pipelined requests answered per connection per loop iteration; the rest wait
/// for the next iteration, so one connection cannot hold the loop.
const HTTP_REQUESTS_PER_TURN: usize = 16;
/// Most requests answered on one keep-alive connection; the last answer carries
/// `Connection: close`.
const HTTP_REQUESTS_PER_CONN: u32 = 1000;
/// Most bytes read from one connection that has not upgraded per loop iteration.
const HTTP_READ_BUDGET: usize = 64 * 1024;
/// A buffer this much larger than what it holds is given back after a turn.
const HTTP_BUF_KEEP: usize = 4 * 1024;
/// Period of the aggregated log lines (accept failures, publish key failures).
const RATE_LOG_MS: u64 = 10_000;
/// How long after an accept failure `/health` says `degraded`.
const DEGRADED_MS: u64 = 10_000;

/// What a timer on the wheel is for.
#[derive(Clone, Copy, Debug)]
enum Timer {
    /// The connection's phase timer: handshake deadline, heartbeat check or linger.
    Phase(ConnId),
    /// A session paused for its input allowance may be read again.
    Resume(ConnId),
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
    /// Unsent output over all connections passed `max_pending_total_bytes` and this
    /// connection held the most (1013).
    OverBudget,
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
            CloseReason::OverBudget => "pending_total_budget",
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
            CloseReason::OverBudget => (1013, "gateway output budget exceeded"),
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
    /// Sessions with client input left unread after their per-iteration share (each
    /// at most once: its `read_queued` flag).
    read_again: Vec<ConnId>,
    /// Client messages read in this iteration (for the per-iteration maximum stat).
    read_in_iteration: u64,
    /// Pending runs per user and `user_message`s held for room in the inbound channel.
    inbox: Inbox,
    /// Tick (ms) of the next inbox prune.
    inbox_prune_at: u64,
    accept_paused: bool,
    /// A [`Timer::Watchdog`] pass is on the wheel.
    watchdog_armed: bool,
    draining: bool,
    drain_deadline_passed: bool,
    /// Sessions closed by the shutdown (for the "shutdown complete" line).
    shutdown_closed: usize,
    /// Unsent output bytes over every connection (kept by the [`OutQueue`]s).
    pending_total: Arc<AtomicUsize>,
    /// `SO_SNDBUF` the kernel reported for the last accepted socket (0 when not set).
    send_buffer_effective: usize,
    /// Collapses repeated refusal lines.
    refusal_log: Repeats,
    /// Set by the signal handlers: SIGHUP seen / SIGTERM or SIGINT seen.
    got_hup: Arc<AtomicBool>,
    got_term: Arc<AtomicBool>,
    /// Connections that have not upgraded (phase `Http`), and the request bytes their
    /// buffers hold (bounded by `max_http_connections` / `max_http_buffer_total_bytes`).
    http_open: usize,
    http_buffered: usize,
    /// Not-upgraded connections in accept order, oldest first (entries of connections
    /// that since upgraded or closed are skipped, and swept when they pile up).
    http_order: std::collections::VecDeque<ConnId>,
    /// Not-upgraded connections with input left after their per-iteration share.
    http_again: Vec<ConnId>,
    /// A descriptor held in reserve: at the descriptor limit it is closed to accept one
    /// waiting client and answer it 503 `overloaded`, then reopened.
    reserve_fd: Option<std::fs::File>,
    /// Tick of the last failed accept (for `/health`), and the aggregated log lines.
    last_accept_failure: Option<u64>,
    accept_log: RateLog,
    publish_auth_log: RateLog,
}

/// A log line aggregated over a period: [`RateLog::hit`] counts an occurrence and says
/// how many to report when a line is due (at most one per period).
#[derive(Default)]
struct RateLog {
    last: Option<u64>,
    count: u64,
}

impl RateLog {
    fn hit(&mut self, now: u64, period: u64) -> Option<u64> {
        self.count += 1;
        if self.last.is_some_and(|t| now < t + period) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// What one pass over a connection's buffered requests ended on.
enum HttpTurn {
    /// Waiting for more bytes from the client.
    Wait,
    /// Output over [`HTTP_PENDING_LIMIT`]: paused until it drains.
    Paused,
    /// [`HTTP_REQUESTS_PER_TURN`] answered: more next iteration.
    Budget,
    /// The connection left the HTTP phase (upgraded, closed or refused).
    Done,
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
        let inbox = Inbox::new(
            s.config.max_pending_runs_per_user,
            s.config.max_user_message_bytes,
        );
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
            read_in_iteration: 0,
            inbox,
            inbox_prune_at: INBOX_PRUNE_MS,
            accept_paused: false,
            watchdog_armed: false,
            draining: false,
            drain_deadline_passed: false,
            shutdown_closed: 0,
            pending_total: Arc::new(AtomicUsize::new(0)),
            send_buffer_effective: 0,
            refusal_log: Repeats::new(REFUSAL_LOG_WINDOW_MS, REFUSAL_LOG_BURST, REFUSAL_LOG_KINDS),
            got_hup: Arc::new(AtomicBool::new(false)),
            got_term: Arc::new(AtomicBool::new(false)),
            http_open: 0,
            http_buffered: 0,
            http_order: std::collections::VecDeque::new(),
            http_again: Vec::new(),
            reserve_fd: std::fs::File::open("/dev/null").ok(),
            last_accept_failure: None,
            accept_log: RateLog::default(),
            publish_auth_log: RateLog::default(),
        }
    }

    /// Install SIGTERM/SIGINT (drain and exit) and SIGHUP (logged and ignored until
    /// reload exists, PROTOCOL.md section 12) handling: each sets its flag, then wakes
    /// the loop through a self-pipe.
    pub(crate) fn handle_signals(&mut self) -> io::Result<()> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let (reader, writer) = std::os::unix::net::UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        for (signal, flag) in [
            (SIGTERM, &self.got_term),
            (SIGINT, &self.got_term),
            (SIGHUP, &self.got_hup),
        ] {
            // The flag first: handlers run in registration order, so the loop woken by
            // the pipe always sees it.
            signal_hook::flag::register(signal, Arc::clone(flag))?;
            signal_hook::low_level::pipe::register(signal, writer.try_clone()?)?;
        }
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
            let timeout = if budget_exhausted
                || !self.dirty.is_empty()
                || !self.read_again.is_empty()
                || !self.http_again.is_empty()
            {
                Some(Duration::ZERO)
            } else {
                let timer = self.wheel.next_expiry().map(|at| {
                    let now = self.tick();
                    Duration::from_millis(at.saturating_sub(now))
                });
                if self.inbox.held().0 > 0 {
                    let retry = Duration::from_millis(INBOX_RETRY_MS);
                    Some(timer.map_or(retry, |t| t.min(retry)))
                } else {
                    timer
                }
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            let iteration = Instant::now();
            self.read_in_iteration = 0;
            // Sessions queued by the last iteration get their turn in this one; those
            // that a readiness event below leaves unfinished wait for the next, so no
            // session is read twice in one iteration.
            let again = std::mem::take(&mut self.read_again);
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    SIGNALS => self.on_signal(),
                    Token(key) => self.ready(key, event.is_readable(), event.is_writable()),
                }
            }
            for id in again {
                if let Some(Phase::Open(s)) = live(&mut self.conns, id).map(|c| &mut c.phase) {
                    s.read_queued = false;
                    self.read_ws(id);
                }
            }
            for id in std::mem::take(&mut self.http_again) {
                self.read_http(id);
            }
            self.stats
                .record_client_messages_in_iteration(self.read_in_iteration);
            self.feed_inbox();
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
                    self.shutdown_closed
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
        // Connections accepted from here on are not evicted to make room in this call.
        let first_new = self.next_serial + 1;
        for _ in 0..ACCEPT_BUDGET {
            match self.listener.accept() {
                Ok((stream, _peer)) => self.add_conn(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let now = self.tick();
                    self.stats.accept_failures += 1;
                    self.last_accept_failure = Some(now);
                    let out_of_fds = matches!(e.raw_os_error(), Some(23 | 24)); // ENFILE, EMFILE
                                                                                // At the descriptor limit, first free the oldest connection that has
                                                                                // not upgraded (idle sockets must not lock out upgrades), else answer
                                                                                // one waiting client 503 through the reserve descriptor.
                    if out_of_fds && (self.evict_oldest_http(first_new) || self.refuse_overloaded())
                    {
                        continue;
                    }
                    // The pending connection stays in the backlog with no new edge, so
                    // retry from a timer, not a busy loop.
                    if let Some(n) = self.accept_log.hit(now, RATE_LOG_MS) {
                        log::warn!(
                            "accept failed ({e}); {n} failure(s) since the last line; \
                             pausing accepts for {ACCEPT_RETRY_MS} ms (raise `ulimit -n`?)"
                        );
                    }
                    self.accept_paused = true;
                    let at = now + ACCEPT_RETRY_MS;
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

    /// Close the oldest connection that has not upgraded and was accepted before serial
    /// `before`, freeing its descriptor now. False when there is none.
    fn evict_oldest_http(&mut self, before: u64) -> bool {
        let Some(victim) = self.http_order.iter().copied().find(|id| {
            id.serial < before
                && self
                    .conns
                    .get(id.key)
                    .is_some_and(|c| c.serial == id.serial && matches!(c.phase, Phase::Http(_)))
        }) else {
            return false;
        };
        self.evict_http(victim, "out of file descriptors");
        true
    }

    /// Close a connection that has not upgraded at once (no linger: its descriptor and
    /// buffers are what is short).
    fn evict_http(&mut self, id: ConnId, why: &str) {
        self.stats.http_evicted += 1;
        log::debug!("conn={} closed before upgrade: {why}", id.public_id());
        self.close(id, CloseReason::HttpDone);
        self.finish(id);
    }

    /// At the descriptor limit with no connection to free: close the reserve descriptor,
    /// accept one waiting client, answer it 503 `overloaded` and close it, then take the
    /// reserve again. False when there is no reserve or nothing was accepted.
    fn refuse_overloaded(&mut self) -> bool {
        if self.reserve_fd.take().is_none() {
            return false;
        }
        let accepted = self.listener.accept();
        let refused = match accepted {
            Ok((mut stream, _)) => {
                use std::io::Write as _;
                // Read what the client sent so the close is a FIN, not a reset that
                // could destroy the answer before the client reads it.
                let mut sink = [0u8; 4096];
                for _ in 0..4 {
                    if !matches!(stream.read(&mut sink), Ok(n) if n > 0) {
                        break;
                    }
                }
                let refusal = Refusal::overloaded();
                let _ = stream.write_all(&refusal.to_response());
                let _ = stream.shutdown(Shutdown::Write);
                self.stats.overload_refused += 1;
                true
            }
            Err(_) => false,
        };
        self.reserve_fd = std::fs::File::open("/dev/null").ok();
        refused
    }

    fn add_conn(&mut self, mut stream: TcpStream) {
        if let Err(e) = stream.set_nodelay(true) {
            log::debug!("set_nodelay failed: {e}");
        }
        self.bound_send_buffer(&stream);
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
            out: OutQueue::counted(Arc::clone(&self.pending_total)),
            phase: Phase::Http(Box::default()),
            timer: Some(timer),
            last_rx: now,
            bytes_in: 0,
            write_shut: false,
            flush_queued: false,
        });
        self.http_open += 1;
        self.http_order.push_back(id);
        // Over `max_http_connections`: the oldest not-upgraded connection goes first.
        while self.http_open > self.s.config.max_http_connections {
            if !self.evict_oldest_http(u64::MAX) {
                break;
            }
        }
        self.sweep_http_order();
    }

    /// Drop the entries of `http_order` that no longer name a connection that has not
    /// upgraded, once they outnumber the live ones (amortized O(1) per accept).
    fn sweep_http_order(&mut self) {
        while let Some(front) = self.http_order.front() {
            if self
                .conns
                .get(front.key)
                .is_some_and(|c| c.serial == front.serial && matches!(c.phase, Phase::Http(_)))
            {
                break;
            }
            self.http_order.pop_front();
        }
        if self.http_order.len() > 2 * self.http_open + 64 {
            let conns = &self.conns;
            self.http_order.retain(|id| {
                conns
                    .get(id.key)
                    .is_some_and(|c| c.serial == id.serial && matches!(c.phase, Phase::Http(_)))
            });
        }
    }

    /// `SO_SNDBUF` from `socket_send_buffer_bytes` (0: leave the kernel's): bounds the
    /// bytes the kernel holds for a client that does not read, which the slow-consumer
    /// rule cannot see. Reads the value back for stats (Linux doubles it).
    fn bound_send_buffer(&mut self, stream: &TcpStream) {
        let want = self.s.config.socket_send_buffer_bytes;
        if want == 0 {
            return;
        }
        let sock = socket2::SockRef::from(stream);
        if let Err(e) = sock.set_send_buffer_size(want) {
            log::debug!("setting SO_SNDBUF failed: {e}");
            return;
        }
        if let Ok(got) = sock.send_buffer_size() {
            self.send_buffer_effective = got;
        }
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
                // A session already on `read_again` is read there, once per iteration.
                Some(Phase::Open(s)) if s.read_queued => {}
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

    /// One turn of a connection that has not upgraded: read what its budget allows, then
    /// answer the complete requests ([`Reactor::process_http`]). Reading stops while
    /// the unsent output is over [`HTTP_PENDING_LIMIT`] (the flush resumes it), past
    /// [`HTTP_READ_BUDGET`] bytes (the next iteration resumes it), and once the buffer
    /// holds a whole head limit, or the whole of an authorized publish request.
    fn read_http(&mut self, id: ConnId) {
        let now = self.tick();
        let mut chunk = [0u8; READ_CHUNK];
        let mut eof = false;
        let mut err = None;
        let mut stopped_early = false;
        {
            let Some(conn) = live(&mut self.conns, id) else {
                return;
            };
            let pending = conn.out.pending();
            let Phase::Http(st) = &mut conn.phase else {
                return;
            };
            st.again_queued = false;
            let before = st.buf.len();
            if st.eof {
                eof = true;
            } else if pending >= HTTP_PENDING_LIMIT {
                st.paused = true;
            } else {
                let mut budget = HTTP_READ_BUDGET;
                loop {
                    let cap = st.need.max(http::MAX_HEAD_BYTES) + st.start;
                    if st.buf.len() >= cap || budget == 0 {
                        stopped_early = true;
                        break;
                    }
                    let room = (cap - st.buf.len()).min(READ_CHUNK).min(budget);
                    match conn.tcp.read(chunk.get_mut(..room).unwrap_or_default()) {
                        Ok(0) => {
                            eof = true;
                            st.eof = true;
                            break;
                        }
                        Ok(n) => {
                            budget -= n;
                            conn.bytes_in += n as u64;
                            self.stats.bytes_in += n as u64;
                            conn.last_rx = now;
                            st.buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
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
            self.http_buffered += st.buf.len() - before;
        }
        if let Some(kind) = err {
            self.close(id, CloseReason::Io(kind));
            return;
        }
        if self.http_buffered > self.s.config.max_http_buffer_total_bytes {
            self.shed_http_buffers();
        }
        let turn = self.process_http(id);
        if eof && matches!(turn, HttpTurn::Wait) {
            // Half-closed client: every complete request is answered; finish.
            if matches!(self.conn_mut(id).map(|c| &c.phase), Some(Phase::Http(_))) {
                self.close(id, CloseReason::ClientClosed);
            }
            return;
        }
        // (A half-closed client with requests left is resumed like any other.)
        let again = match turn {
            HttpTurn::Budget => true,
            HttpTurn::Wait => stopped_early,
            HttpTurn::Paused | HttpTurn::Done => false,
        };
        if again {
            if let Some(conn) = live(&mut self.conns, id) {
                if let Phase::Http(st) = &mut conn.phase {
                    if !st.again_queued {
                        st.again_queued = true;
                        self.http_again.push(id);
                    }
                }
            }
        }
    }

    /// Over `max_http_buffer_total_bytes`: close not-upgraded connections that hold
    /// request bytes, oldest first, until the total is within the budget again.
    fn shed_http_buffers(&mut self) {
        let limit = self.s.config.max_http_buffer_total_bytes;
        let mut i = 0;
        while self.http_buffered > limit {
            let Some(&id) = self.http_order.get(i) else {
                break;
            };
            i += 1;
            let holds = self.conns.get(id.key).is_some_and(|c| {
                c.serial == id.serial && matches!(&c.phase, Phase::Http(st) if !st.buf.is_empty())
            });
            if holds {
                self.evict_http(id, "max_http_buffer_total_bytes passed");
            }
        }
    }

    /// Answer the complete requests in the buffer (keep-alive, pipelining), at most
    /// [`HTTP_REQUESTS_PER_TURN`] of them and only while the unsent output is under
    /// [`HTTP_PENDING_LIMIT`]. An offset walks the buffer; the answered prefix is dropped
    /// once at the end of the turn.
    fn process_http(&mut self, id: ConnId) -> HttpTurn {
        let max_publish = self.s.config.max_publish_bytes;
        let mut answered = 0;
        let turn = loop {
            let Some(conn) = live(&mut self.conns, id) else {
                return HttpTurn::Done;
            };
            let pending = conn.out.pending();
            let Phase::Http(st) = &mut conn.phase else {
                return HttpTurn::Done;
            };
            if pending >= HTTP_PENDING_LIMIT {
                st.paused = true;
                break HttpTurn::Paused;
            }
            if answered == HTTP_REQUESTS_PER_TURN {
                break HttpTurn::Budget;
            }
            let unread = st.buf.get(st.start..).unwrap_or_default();
            let (req, head_len) = match http::parse_head(unread) {
                Ok(None) => break HttpTurn::Wait,
                Ok(Some(done)) => done,
                Err(refusal) => {
                    self.refuse(id, &refusal);
                    return HttpTurn::Done;
                }
            };
            answered += 1;
            // The last request a connection may make is answered with `Connection: close`.
            let last = st.served + 1 >= HTTP_REQUESTS_PER_CONN;
            match Route::of(req.method, &req.path) {
                Route::WebSocket(path_mode) => {
                    let leftover = unread.get(head_len..).unwrap_or_default().to_vec();
                    self.http_buffered = self
                        .http_buffered
                        .saturating_sub(st.buf.len().saturating_sub(st.start));
                    st.buf = Vec::new();
                    st.start = 0;
                    self.upgrade(id, &req, path_mode, leftover);
                    return HttpTurn::Done;
                }
                Route::Publish => {
                    // Everything that needs no body is decided on the head, before a
                    // byte of the body is buffered: disabled, key, length.
                    if self.s.config.publish_key.is_none() {
                        self.refuse(id, &Refusal::publish_disabled());
                        return HttpTurn::Done;
                    }
                    if !self.publish_key_ok(&req) {
                        self.publish_auth_failed(id);
                        return HttpTurn::Done;
                    }
                    let len = match http::body_length(&req, max_publish) {
                        Ok(len) => len,
                        // Too large: answered, not counted as a refused connection.
                        Err(r) if r.status == 413 => {
                            self.respond_raw(id, r.to_response(), true);
                            return HttpTurn::Done;
                        }
                        Err(r) => {
                            self.refuse(id, &r);
                            return HttpTurn::Done;
                        }
                    };
                    let Some(conn) = live(&mut self.conns, id) else {
                        return HttpTurn::Done;
                    };
                    let Phase::Http(st) = &mut conn.phase else {
                        return HttpTurn::Done;
                    };
                    let unread = st.buf.get(st.start..).unwrap_or_default();
                    if unread.len() < head_len + len {
                        st.need = head_len + len;
                        break HttpTurn::Wait; // wait for the rest of the body
                    }
                    let body: Vec<u8> = unread
                        .get(head_len..head_len + len)
                        .unwrap_or_default()
                        .to_vec();
                    st.start += head_len + len;
                    self.http_buffered = self.http_buffered.saturating_sub(head_len + len);
                    st.need = 0;
                    st.served += 1;
                    let keep = http::keep_alive(&req) && !last;
                    let (status, answer) = self.publish(&body);
                    self.respond_json(id, status, &answer, !keep, false);
                    if !keep {
                        return HttpTurn::Done;
                    }
                }
                other => {
                    st.start += head_len;
                    self.http_buffered = self.http_buffered.saturating_sub(head_len);
                    st.served += 1;
                    if req.content_length.unwrap_or(0) > 0 || req.chunked {
                        // Bodies on GET are not read: answer, then close.
                        self.answer_get(id, other, &req, true);
                        return HttpTurn::Done;
                    }
                    let keep = http::keep_alive(&req) && !last;
                    self.answer_get(id, other, &req, !keep);
                    if !keep {
                        return HttpTurn::Done;
                    }
                }
            }
            // Keep-alive: the idle deadline restarts after each answered request.
            self.rearm_phase(id, self.s.config.handshake_timeout_ms);
        };
        self.compact_http(id);
        turn
    }

    /// Drop the answered prefix of a connection's request buffer (once per turn) and
    /// give back a buffer much larger than what it still holds.
    fn compact_http(&mut self, id: ConnId) {
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        let Phase::Http(st) = &mut conn.phase else {
            return;
        };
        // (`http_buffered` already went down as `start` moved.)
        let answered = st.start.min(st.buf.len());
        if answered > 0 {
            st.buf.drain(..answered);
            st.start = 0;
        }
        if st.buf.capacity() > st.buf.len().max(st.need) + HTTP_BUF_KEEP {
            if st.buf.is_empty() {
                st.buf = Vec::new();
            } else {
                st.buf.shrink_to(st.buf.len().max(st.need));
            }
        }
    }

    /// The publish key check, on the request head.
    fn publish_key_ok(&self, req: &http::Request) -> bool {
        match (&self.s.config.publish_key, req.bearer()) {
            (Some(key), Ok(Some(given))) => publish::key_matches(given, key),
            _ => false,
        }
    }

    /// A publish request with a missing or wrong key: 401 and close (issue 9 F11), one
    /// counter, and at most one log line per [`RATE_LOG_MS`] with the count since the
    /// last one (never the key).
    fn publish_auth_failed(&mut self, id: ConnId) {
        self.stats.http_requests += 1;
        self.stats.publish_auth_failures += 1;
        if let Some(n) = self.publish_auth_log.hit(self.tick(), RATE_LOG_MS) {
            log::warn!(
                "conn={} publish API: missing or wrong publish key; {n} such request(s) \
                 since the last line ({} in all)",
                id.public_id(),
                self.stats.publish_auth_failures
            );
        }
        let body = json!({"error": "invalid_key", "message": "missing or wrong publish key"});
        self.respond_json(id, 401, &body, true, false);
    }

    fn answer_get(&mut self, id: ConnId, route: Route, req: &http::Request, close: bool) {
        self.stats.http_requests += 1;
        let head_only = req.method == Method::Head;
        match route {
            Route::Health => {
                let status = if self.draining { 503 } else { 200 };
                // Degraded (still 200: it serves) while accepts fail at the descriptor
                // limit, with the reason.
                let degraded = !self.draining && self.accept_degraded();
                let mut body = json!({
                    "status": if self.draining { "draining" } else if degraded { "degraded" } else { "healthy" },
                    "version": env!("CARGO_PKG_VERSION"),
                    "uptime_s": self.start.elapsed().as_secs(),
                    "connections": self.open_sessions,
                    "epoch": &*self.epoch,
                    "accept_failures": self.stats.accept_failures,
                });
                if degraded {
                    body["reason"] = json!("accept failed within the last 10 s: file descriptor limit reached (see ulimit -n)");
                }
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
            pending_out_bytes: self.pending_total.load(Ordering::Relaxed),
            pending_total_limit: self.s.config.max_pending_total_bytes,
            send_buffer_limit: self.s.config.socket_send_buffer_bytes,
            send_buffer_effective: self.send_buffer_effective,
            log_lines_dropped: crate::log_sink::dropped_lines(),
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
            http_open: self.http_open,
            http_buffered_bytes: self.http_buffered,
            http_open_limit: self.s.config.max_http_connections,
            http_buffer_limit: self.s.config.max_http_buffer_total_bytes,
            accept_degraded: self.accept_degraded(),
            inbound_held: self.inbox.held().0,
            inbound_held_bytes: self.inbox.held().1,
            inbound_held_limit: self.inbox.held_limit(),
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

    /// True when an accept failed within the last [`DEGRADED_MS`].
    fn accept_degraded(&self) -> bool {
        self.last_accept_failure
            .is_some_and(|t| self.tick() < t + DEGRADED_MS)
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
        self.log_refusal(id, refusal);
        if let Some(conn) = self.conn_mut(id) {
            conn.out.push(Bytes::from(refusal.to_response()));
            self.mark_dirty(id);
        }
        self.close(id, CloseReason::HttpDone);
    }

    /// The refusal's log line; identical ones (status, error, reason) within
    /// [`REFUSAL_LOG_WINDOW_MS`] are counted and reported in one line when the window
    /// has passed ([`Reactor::report_repeats`]).
    fn log_refusal(&mut self, id: ConnId, refusal: &Refusal) {
        let kind = format!(
            "status={} error={} reason={:?}",
            refusal.status, refusal.code, refusal.message
        );
        let mut ended = Vec::new();
        if self.refusal_log.admit(&kind, self.tick(), &mut ended) {
            log::info!("conn={} refused {kind}", id.public_id());
        }
        log_repeats(&ended);
    }

    /// Report the refusal lines left out in windows that have passed.
    fn report_repeats(&mut self) {
        let mut ended = Vec::new();
        self.refusal_log.expired(self.tick(), &mut ended);
        log_repeats(&ended);
    }

    // ---------------------------------------------------------------- publish

    /// Route an authorized publish request's batch (the key was checked on the head).
    fn publish(&mut self, body: &[u8]) -> (u16, Value) {
        self.stats.http_requests += 1;
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
        // Leaves the HTTP phase (its buffer was emptied by `process_http`).
        self.http_open = self.http_open.saturating_sub(1);
        conn.phase = Phase::Open(Box::new(Session {
            ws: WebSocketContext::from_partially_read(leftover, Role::Server, Some(ws_config)),
            user,
            mode: up.mode,
            thread,
            token_exp: exp,
            token_deadline: token_at,
            next_ping: heartbeat_at,
            bad_in_row: 0,
            read_queued: false,
            refresh_not_before: 0,
            input_clock_us: 0,
            input_paused: false,
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
        if self.input_exhausted(id) {
            return;
        }
        let bytes_before = self.conn_mut(id).map_or(0, |c| c.bytes_in);
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
        let messages = texts.len() as u64;
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
            return self.close(id, reason);
        }
        let now_us = self.start.elapsed().as_micros() as u64;
        if let Some(conn) = self.conn_mut(id) {
            let bytes = conn.bytes_in - bytes_before;
            if let Phase::Open(s) = &mut conn.phase {
                let cost = messages * INPUT_US_PER_MESSAGE + bytes * INPUT_US_PER_KIB / 1024;
                s.input_clock_us = s.input_clock_us.max(now_us) + cost;
            }
        }
        if more {
            self.queue_read_again(id);
        }
    }

    /// True when session `id` used up its input allowance: it is then not read until a
    /// [`Timer::Resume`] (armed here, once) says the allowance has refilled.
    fn input_exhausted(&mut self, id: ConnId) -> bool {
        let now_us = self.start.elapsed().as_micros() as u64;
        let tick = self.tick();
        let Some(Phase::Open(s)) = live(&mut self.conns, id).map(|c| &mut c.phase) else {
            return false;
        };
        let ahead = s.input_clock_us.saturating_sub(now_us);
        if ahead <= INPUT_BURST_US {
            return false;
        }
        if !s.input_paused {
            s.input_paused = true;
            self.stats.client_input_paused += 1;
            let wait_ms = (ahead - INPUT_BURST_US).div_ceil(1000).max(1);
            self.wheel.insert(tick + wait_ms, Timer::Resume(id));
        }
        true
    }

    /// Put open session `id` on `read_again` unless it already is: each session gets
    /// one read turn per iteration however often it is queued (issue 9, F3: queued once
    /// per edge, a flooding connection's share grew every iteration).
    fn queue_read_again(&mut self, id: ConnId) {
        if let Some(Phase::Open(s)) = live(&mut self.conns, id).map(|c| &mut c.phase) {
            if !s.read_queued {
                s.read_queued = true;
                self.read_again.push(id);
            }
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
                if read.is_ok() {
                    self.read_in_iteration += 1;
                }
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
            let mut sink = [0u8; 16 * 1024];
            // A peer that keeps sending to a closing connection (a pipelining flood cut
            // off by the request cap) does not hold the loop: at most this many bytes
            // per readable event (its next bytes raise a new edge; the linger timer
            // still ends the connection).
            let mut left = CLOSING_DISCARD_BYTES;
            loop {
                match conn.tcp.read(&mut sink) {
                    Ok(0) => {
                        done = true;
                        break;
                    }
                    Ok(n) if n >= left => break,
                    Ok(n) => left -= n,
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

    /// `error` frame answering a `user_message`: carries its `ref`.
    fn send_error_ref(&mut self, id: ConnId, code: &str, message: &str, reference: &Value) {
        self.send_frame(
            id,
            control_frame(
                &json!({"type": "error", "code": code, "message": message, "ref": reference}),
            ),
        );
    }

    /// A client message refused as the client's fault: `error` with `code` (and the
    /// `ref` of a `user_message`), counted toward the bad-message streak; more than
    /// [`MAX_BAD_IN_ROW`] in a row close the connection with 1008.
    fn bad_message(&mut self, id: ConnId, code: &str, message: &str, reference: Option<&Value>) {
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
        } else if let Some(r) = reference {
            self.send_error_ref(id, code, message, r);
        } else {
            self.send_error(id, code, message);
        }
    }

    /// Act on one client text message. A message that was the client's fault (not a
    /// valid message, an oversized `user_message` text, a refused or rate-limited
    /// `refresh`) counts toward the bad-message streak; any other resets it.
    fn client_message(&mut self, id: ConnId, text: &str) {
        let msg = match ClientMessage::parse(text) {
            Ok(msg) => msg,
            Err(BadMessage(why)) => return self.bad_message(id, "bad_message", why, None),
        };
        let good = match msg {
            ClientMessage::Ping => {
                self.send_frame(id, control_frame(&json!({"type": "pong", "ts": now_ms()})));
                true
            }
            ClientMessage::UserMessage {
                text,
                thread_id,
                reference,
            } => self.user_message(id, text, thread_id, reference),
            ClientMessage::Cancel { run_id } => {
                self.cancel(id, &run_id);
                true
            }
            ClientMessage::Refresh { token } => self.refresh(id, &token),
        };
        if good {
            if let Some(Phase::Open(s)) = self.conn_mut(id).map(|c| &mut c.phase) {
                s.bad_in_row = 0;
            }
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

    /// `user_message`: text over `max_user_message_bytes` is a bad message (`too_large`);
    /// a user with `max_pending_runs_per_user` runs acked and not yet begun gets `busy`
    /// (only that user: the bound is per user, and while the workers' channel is full
    /// messages wait in per-user queues fed round-robin, see [`Inbox`]). Otherwise the
    /// run is registered as pending and acked. False when it counted as a bad message.
    fn user_message(
        &mut self,
        id: ConnId,
        text: String,
        thread: Option<crate::ids::ThreadId>,
        reference: Value,
    ) -> bool {
        let max_text = self.s.config.max_user_message_bytes;
        if text.len() > max_text {
            let why = format!("user_message text over max_user_message_bytes ({max_text})");
            self.bad_message(id, "too_large", &why, Some(&reference));
            return false;
        }
        let Some(session) = self.session(id) else {
            return true;
        };
        let user = session.user.clone();
        let isolated = session.mode.is_isolated();
        let run_id = new_run_id();
        let run: Arc<str> = Arc::from(run_id.as_str());
        let msg = Inbound::UserMessage {
            user_id: user.to_string(),
            thread_id: thread.as_deref().map(str::to_owned),
            text,
            run_id: run_id.clone(),
            connection_id: id.public_id(),
        };
        let registry = &self.registry;
        let inbound = &self.inbound;
        let admitted = self.inbox.admit(
            &user,
            &run,
            msg,
            |r| still_pending(registry, &user, r),
            |m| inbox::offer(inbound, m),
        );
        let refused = match admitted {
            Admit::Sent | Admit::Held => None,
            Admit::NoAgent => Some(("no_agent", "no agent is consuming user messages")),
            Admit::UserBusy => Some((
                "busy",
                "too many of your runs are waiting to start (max_pending_runs_per_user); try again",
            )),
            Admit::GatewayBusy => Some(("busy", "agent queue full; try again")),
        };
        if let Some((code, why)) = refused {
            if code == "busy" {
                self.stats.user_messages_busy += 1;
            }
            self.send_error_ref(id, code, why, &reference);
            return true;
        }
        let now = self.tick();
        let u = self.registry.entry(&user);
        u.runs.insert(
            run,
            Run::pending(thread.map(Into::into), isolated.then_some(id), now),
        );
        self.send_frame(
            id,
            control_frame(&json!({"type": "ack", "ref": reference, "run_id": run_id})),
        );
        true
    }

    /// Feed held `user_message`s into the workers' channel as it has room, one user at
    /// a time; runs whose message can never go out (no consumer any more) end with
    /// `agent_error {"reason":"no_agent"}`. Now and then, forget users with nothing
    /// pending.
    fn feed_inbox(&mut self) {
        let now = self.tick();
        if now >= self.inbox_prune_at {
            self.inbox_prune_at = now + INBOX_PRUNE_MS;
            let registry = &self.registry;
            self.inbox
                .prune(|user, run| still_pending(registry, user, run));
        }
        if self.inbox.held().0 == 0 {
            return;
        }
        let registry = &self.registry;
        let inbound = &self.inbound;
        let orphans = self.inbox.feed(
            |user, run| still_pending(registry, user, run),
            |m| inbox::offer(inbound, m),
        );
        for o in orphans {
            let key = RunKey::new(&o.user_id, o.thread_id.as_deref(), &o.run_id, "");
            match key
                .and_then(|k| Event::new(k, EventKind::AgentError, &json!({"reason": "no_agent"})))
            {
                Ok(ev) => self.route(ev),
                Err(e) => log::error!("synthetic no_agent event failed: {e}"),
            }
        }
    }

    /// `cancel`: flags the run (its handle sees it) and tells the workers once per run,
    /// so repeated cancels of one run cost no channel slot.
    fn cancel(&mut self, id: ConnId, run_id: &str) {
        let Some(session) = self.session(id) else {
            return;
        };
        let user = session.user.clone();
        let first = match self
            .registry
            .get_mut(&user)
            .and_then(|u| u.runs.get_mut(run_id))
        {
            Some(run) => {
                if let Some(flag) = &run.cancel {
                    flag.store(true, Ordering::Release);
                }
                !std::mem::replace(&mut run.cancel_requested, true)
            }
            None => return self.send_error(id, "not_found", "no active run with this run_id"),
        };
        if first {
            let _ = self.inbound.try_send(Inbound::Cancel {
                user_id: user.to_string(),
                run_id: run_id.to_owned(),
            });
        }
        self.send_frame(
            id,
            control_frame(&json!({"type": "cancel_requested", "run_id": run_id})),
        );
    }

    /// `refresh`: at most one token check per connection per [`REFRESH_INTERVAL_MS`]
    /// (sooner: `rate_limited`, no check); an invalid token is `invalid_token`. Both
    /// count as bad messages (they never reset the streak, so a refresh flood closes
    /// with 1008). False when it counted as a bad message.
    fn refresh(&mut self, id: ConnId, token: &str) -> bool {
        let now = self.tick();
        let Some(Phase::Open(session)) = self.conn_mut(id).map(|c| &mut c.phase) else {
            return true;
        };
        if now < session.refresh_not_before {
            self.stats.refresh_rate_limited += 1;
            let why = "at most one refresh per second per connection; retry later";
            self.bad_message(id, "rate_limited", why, None);
            return false;
        }
        session.refresh_not_before = now + REFRESH_INTERVAL_MS;
        let user = session.user.clone();
        match self.auth.verify(token) {
            Err(e) => {
                self.bad_message(id, "invalid_token", &e.to_string(), None);
                false
            }
            Ok(claims) if *claims.sub != *user => {
                self.close(id, CloseReason::RefreshOtherUser);
                true
            }
            Ok(claims) => {
                let at =
                    now.saturating_add(claims.exp.saturating_mul(1000).saturating_sub(now_ms()));
                let Some(conn) = live(&mut self.conns, id) else {
                    return true;
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
                true
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
        if self.pending_total.load(Ordering::Relaxed) > self.s.config.max_pending_total_bytes {
            self.shed_pending();
        }
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
            Phase::Http(st) => {
                // A paused connection (output over the bound) resumes once it drains.
                if st.paused && pending < HTTP_PENDING_LIMIT {
                    st.paused = false;
                    if !st.again_queued {
                        st.again_queued = true;
                        self.http_again.push(id);
                    }
                }
            }
        }
    }

    /// Unsent output over all connections is over `max_pending_total_bytes`: close the
    /// connections holding the most (sessions with 1013; plain HTTP ones without a
    /// frame), dropping their unstarted output, until the total is back under. Runs only when over the budget; the running total
    /// itself costs nothing to read.
    fn shed_pending(&mut self) {
        let limit = self.s.config.max_pending_total_bytes;
        let mut holders: Vec<(usize, ConnId)> = self
            .conns
            .iter()
            .filter(|(_, c)| !matches!(c.phase, Phase::Closing) && c.out.pending() > 0)
            .map(|(key, c)| {
                (
                    c.out.pending(),
                    ConnId {
                        key,
                        serial: c.serial,
                    },
                )
            })
            .collect();
        holders.sort_unstable_by_key(|h| std::cmp::Reverse(h.0));
        let mut closed = 0;
        for (held, id) in holders {
            if self.pending_total.load(Ordering::Relaxed) <= limit {
                break;
            }
            log::debug!(
                "conn={} holds {held} unsent bytes with the total over max_pending_total_bytes",
                id.public_id()
            );
            // A plain HTTP connection (answers it does not read) gets no close frame:
            // drop what it has not started receiving, then close it.
            if let Some(conn) = live(&mut self.conns, id) {
                if matches!(conn.phase, Phase::Http(_)) {
                    conn.out.discard_unstarted();
                }
            }
            self.close(id, CloseReason::OverBudget);
            closed += 1;
        }
        log::warn!(
            "unsent output over max_pending_total_bytes ({limit}): closed the {closed} \
             largest holders with 1013; {} bytes left",
            self.pending_total.load(Ordering::Relaxed)
        );
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
            Timer::Resume(id) => {
                if let Some(Phase::Open(s)) = live(&mut self.conns, id).map(|c| &mut c.phase) {
                    s.input_paused = false;
                    self.read_ws(id);
                }
            }
            Timer::AcceptRetry => {
                self.accept_paused = false;
                self.accept();
            }
            Timer::Housekeeping => {
                self.housekeeping();
                self.report_repeats();
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
        if self.got_hup.swap(false, Ordering::Relaxed) {
            log::info!(
                "SIGHUP received: configuration reload is not supported yet; ignored \
                 (connections kept)"
            );
        }
        if self.got_term.swap(false, Ordering::Relaxed) {
            log::info!("signal received: draining");
            self.begin_shutdown();
        }
    }

    fn begin_shutdown(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        let at = self.tick() + self.s.config.shutdown_grace_ms;
        self.wheel.insert(at, Timer::ShutdownDeadline);
        self.end_runs_for_shutdown();
        let open: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Open(_)))
            .map(|(key, c)| ConnId {
                key,
                serial: c.serial,
            })
            .collect();
        self.shutdown_closed = open.len();
        for id in open {
            self.close(id, CloseReason::Shutdown);
        }
    }

    /// Runs in progress end with the gateway (memory engine): each gets an
    /// `agent_error {"reason":"shutdown"}`, routed like any event, so it is queued
    /// before the 1001 close frame and its users learn why the run stopped.
    fn end_runs_for_shutdown(&mut self) {
        let mut active: Vec<RunKey> = Vec::new();
        for (name, user) in self.registry.users() {
            for (run_id, run) in user.runs.iter() {
                active.push(RunKey {
                    user_id: name.clone(),
                    thread_id: run.thread.clone(),
                    run_id: run_id.clone(),
                    agent_name: run.agent_name.clone(),
                });
            }
        }
        if !active.is_empty() {
            log::info!("shutdown: ending {} runs in progress", active.len());
        }
        for key in active {
            match Event::new(key, EventKind::AgentError, &json!({"reason": "shutdown"})) {
                Ok(ev) => self.route(ev),
                Err(e) => log::error!("synthetic shutdown agent_error failed: {e}"),
            }
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
            Phase::Http(st) => {
                self.http_open = self.http_open.saturating_sub(1);
                self.http_buffered = self
                    .http_buffered
                    .saturating_sub(st.buf.len().saturating_sub(st.start));
            }
            Phase::Open(mut session) => {
                if let Some((code, text)) = reason.close_frame() {
                    if matches!(reason, CloseReason::SlowConsumer | CloseReason::OverBudget) {
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
                // `code=-`: no close frame was sent (the peer closed or the socket failed).
                let code = reason
                    .close_frame()
                    .map_or_else(|| "-".to_owned(), |(c, _)| c.to_string());
                log::info!(
                    "conn={} user={:?} closed reason={} code={code} after_ms={}",
                    id.public_id(),
                    session.user,
                    reason.label(),
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

/// One line per kind of refusal left out of the log by [`Repeats`].
fn log_repeats(ended: &[(String, u64)]) {
    for (kind, n) in ended {
        log::info!(
            "refused {n} more times within {REFUSAL_LOG_WINDOW_MS} ms (lines collapsed): {kind}"
        );
    }
}

/// Put connection `id` on the flush list unless it already is.
fn mark(flush_queued: &mut bool, list: &mut Vec<ConnId>, id: ConnId) {
    if !*flush_queued {
        *flush_queued = true;
        list.push(id);
    }
}

/// True while `user`'s run `run_id` is registered and has not begun (a pending run of
/// a `user_message`).
fn still_pending(registry: &Registry, user: &str, run_id: &str) -> bool {
    registry
        .get(user)
        .and_then(|u| u.runs.get(run_id))
        .is_some_and(|r| !r.begun)
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
