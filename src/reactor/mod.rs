//! The reactor: one thread, one `mio::Poll`, owning every socket and all routing state.
//!
//! One loop iteration, in order:
//! 1. poll, with the timeout of the next timer (0 when the channel budget ran out);
//! 2. dispatch readiness: accept new sockets, read HTTP heads and WebSocket frames,
//!    write queued output on writable edges; then one read turn for each session the
//!    last iteration left unread (`read_again`: a session gets at most one turn per
//!    iteration, and none while it is over its input allowance); then feed held
//!    `user_message`s to the workers' channel, round-robin across users ([`Inbox`]);
//! 3. drain the workers' channel up to [`routing::DRAIN_BUDGET`] commands, routing each event to
//!    its user's connections (frames are shared, queued per connection); then the
//!    inbound webhook's answers (`ack`, `cancel_requested`, `no_agent`);
//! 4. advance the timer wheel: handshake deadlines, heartbeats, token expiry, lingering
//!    closes, housekeeping (replay expiry, run watchdog);
//! 5. flush every connection that got output in this iteration: one `writev` each;
//! 6. record the iteration time.
//!
//! Every per-connection failure ends in [`Reactor::close`], which unregisters the
//! session, counts and logs the reason once, and sends the close frame when one is due;
//! the socket is dropped by [`Reactor::finish`] once the output drained (or at once when
//! there is none). The path runs one way: `close`, then `finish`.
//!
//! This file holds the loop, accepting, readiness dispatch and the close path; each
//! phase's methods are in a file of their own (`impl Reactor` in each):
//! - [`endpoints`]: plain HTTP (reading requests, the GET endpoints, the publish API);
//! - [`session`]: upgrades, opening sessions and reading them;
//! - [`inbound`]: the client messages (`ping`, `user_message`, `cancel`, `refresh`);
//! - [`routing`]: draining the channel, delivering events, flushing, replay;
//! - [`timers`]: timer expiries, housekeeping, the run watchdog and shutdown;
//! - [`webhook`]: `user_message` and `cancel` sent to `inbound_url`, and the answers
//!   (after draining the channel, each iteration);
//! - [`engine_events`]: the answers of an engine that answers later (the Redis engine,
//!   [`crate::engine`]): `connected` frames after the engine's open answer, deliveries,
//!   gaps (1013), the publish API's deferred 202/503, the inbound stream;
//! - `echo` (conformance builds): the Autobahn echo session.
//!
//! Connections that have not upgraded (plain HTTP, handshakes) are bounded as a group
//! (`max_http_connections`, `max_http_buffer_total_bytes`, oldest closed first) and each
//! one by [`endpoints::HTTP_PENDING_LIMIT`] of unsent answers,
//! [`endpoints::HTTP_REQUESTS_PER_TURN`] and [`endpoints::HTTP_REQUESTS_PER_CONN`]; at the descriptor limit a reserve descriptor answers
//! waiting clients 503 `overloaded` (issue 9 F1, F2).

use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use mio::net::{TcpListener, TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::WebSocketConfig;

use crate::auth::Authenticator;
use crate::close::CloseReason;
use crate::config::Config;
use crate::conn::{Conn, ConnId, OutQueue, Phase, Wire};
use crate::emitter::{Command, Inbound, WakeSignal};
use crate::engine::Engine;
use crate::event::now_ms;
use crate::http::Refusal;
use crate::inbox::Inbox;
use crate::log_sink::{RateLog, Repeats};
use crate::registry::{Limits, Registry};
use crate::stats::{DropReason, Stats};
use crate::timer_wheel::TimerWheel;
use crate::tls::{Acceptor, Transport};

#[cfg(feature = "conformance")]
mod echo;
mod endpoints;
mod engine_events;
mod inbound;
mod reload;
mod revoke;
mod routing;
mod session;
mod timers;
mod webhook;

pub use reload::ConfigSource;
pub(crate) use session::READ_BUFFER_BYTES;

pub(crate) const LISTENER: Token = Token(usize::MAX - 1);
pub(crate) const WAKER: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);
pub(crate) const ADMIN_LISTENER: Token = Token(usize::MAX - 4);

/// Readiness events taken per poll.
const EVENTS_PER_POLL: usize = 1024;
/// Connections accepted per readiness event before serving others.
const ACCEPT_BUDGET: usize = 1024;
/// How long a closing connection may take to flush and see the peer's FIN.
const LINGER_MS: u64 = 2000;
/// Retry delay for accept after EMFILE/ENFILE.
const ACCEPT_RETRY_MS: u64 = 20;
/// Identical refusal lines (same status, error and reason) within this window: the
/// first [`REFUSAL_LOG_BURST`] are written, the rest counted and reported in one line,
/// so a flood of refused upgrades costs a few lines per second per kind.
const REFUSAL_LOG_WINDOW_MS: u64 = 1000;
const REFUSAL_LOG_BURST: u64 = 5;
/// Kinds of refusal lines collapsed at once (status, error, reason).
const REFUSAL_LOG_KINDS: usize = 32;
/// Period of the aggregated log lines (accept failures, publish key failures, slow
/// iterations).
const RATE_LOG_MS: u64 = 10_000;
/// A loop iteration longer than this is logged (at most one line per [`RATE_LOG_MS`])
/// with the time of each phase, so a stall can be told apart: readiness (accepts,
/// upgrades, reads), the channel drain, timers (housekeeping, watchdog), the flush.
const SLOW_ITERATION_US: u64 = 10_000;

/// What a timer on the wheel is for.
#[derive(Clone, Copy, Debug)]
enum Timer {
    /// The connection's phase timer: handshake deadline, heartbeat check or linger.
    Phase(ConnId),
    /// A session paused for its input allowance may be read again.
    Resume(ConnId),
    AcceptRetry,
    Housekeeping,
    /// Another run watchdog pass: the last one ended [`timers::WATCHDOG_BUDGET`] runs.
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

/// Settings derived once from [`Config`], in the units the loop uses.
pub(crate) struct Settings {
    pub config: Config,
    pub ws_config: WebSocketConfig,
    pub config_json: Bytes,
    pub demo: crate::demo_page::DemoPage,
    /// The demo agent runs (for `/ws/config`, rebuilt by a reload).
    pub demo_agent: bool,
}

/// The event loop and everything it owns.
pub(crate) struct Reactor {
    poll: Poll,
    listener: TcpListener,
    /// The admin listener (`admin_listen`), when configured.
    admin_listener: Option<TcpListener>,
    signals: Option<UnixStream>,
    wake: Arc<WakeSignal>,
    rx: Receiver<Command>,
    inbound: Sender<Inbound>,
    auth: Authenticator,
    /// TLS on `listen` (`tls_cert_file`, `tls_key_file`); `None`: plain TCP.
    tls: Option<Acceptor>,
    /// Where a SIGHUP reload reads its configuration (see `reload.rs`).
    reload_source: Option<ConfigSource>,
    s: Settings,
    conns: Slab<Conn>,
    registry: Registry,
    /// Users refused until a time (`POST /api/users/{user_id}/disconnect`, `revoke.rs`).
    revocations: crate::revocation::Revocations,
    /// Where users' shared state lives (seq, epoch, replay, runs): [`crate::engine`].
    engine: Engine,
    /// Answers an engine owes (opens, publish requests) and its state.
    waits: engine_events::EngineWaits,
    /// This node's name (`node_id`; the Redis engine's `connected` frames carry it).
    node_id: Arc<str>,
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
    slow_iteration_log: RateLog,
    /// The inbound webhook, when `inbound_url` is set ([`crate::webhook`]).
    webhook: Option<crate::webhook::Webhook>,
    webhook_log: RateLog,
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

impl Reactor {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        poll: Poll,
        listener: TcpListener,
        admin_listener: Option<TcpListener>,
        wake: Arc<WakeSignal>,
        rx: Receiver<Command>,
        inbound: Sender<Inbound>,
        auth: Authenticator,
        tls: Option<Acceptor>,
        s: Settings,
        epoch: String,
    ) -> Reactor {
        let mut wheel = TimerWheel::new(4096, 0);
        wheel.insert(timers::HOUSEKEEPING_MS, Timer::Housekeeping);
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
        let revocations = crate::revocation::Revocations::new(c.max_revoked_users);
        Reactor {
            poll,
            listener,
            admin_listener,
            signals: None,
            wake,
            rx,
            inbound,
            auth,
            tls,
            reload_source: None,
            s,
            conns: Slab::new(),
            registry: Registry::new(epoch.clone(), limits),
            revocations,
            engine: Engine::default(),
            waits: engine_events::EngineWaits::new(),
            node_id: Arc::from(""),
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
            inbox_prune_at: inbound::INBOX_PRUNE_MS,
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
            slow_iteration_log: RateLog::default(),
            webhook: None,
            webhook_log: RateLog::default(),
        }
    }

    /// Send `user_message` and `cancel` to this webhook instead of the inbound channel.
    pub(crate) fn set_webhook(&mut self, webhook: Option<crate::webhook::Webhook>) {
        self.webhook = webhook;
    }

    /// Install SIGTERM/SIGINT (drain and exit) and SIGHUP ([`Reactor::reload`] and
    /// [`Reactor::tls_reload`], PROTOCOL.md section 12) handling: each sets its flag, then wakes the loop through
    /// a self-pipe.
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

    /// Set where a SIGHUP reload reads its configuration (see `reload.rs`).
    pub(crate) fn set_reload_source(&mut self, source: ConfigSource) {
        self.reload_source = Some(source);
    }

    pub(super) fn tick(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Run until a shutdown completes. Only setup-level failures return `Err`.
    pub(crate) fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_PER_POLL);
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
                    let retry = Duration::from_millis(inbound::INBOX_RETRY_MS);
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
                    LISTENER => self.accept(false),
                    ADMIN_LISTENER => self.accept(true),
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
            let drain_started = Instant::now();
            budget_exhausted = self.drain_channel();
            // After the channel: `drain_channel` reset the wake flag, so an answer that
            // arrives from here on wakes the next poll.
            self.webhook_answers();
            budget_exhausted |= self.drain_engine();
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
            let flush_started = Instant::now();
            self.flush_dirty();
            let took = iteration.elapsed();
            self.stats.record_loop_us(took.as_micros() as u64);
            if took.as_micros() as u64 > SLOW_ITERATION_US {
                let phases = [iteration, drain_started, timers_started, flush_started];
                self.log_slow_iteration(took, phases, events.iter().count(), fired);
            }
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

    /// One line for an iteration over [`SLOW_ITERATION_US`]: how long each phase took
    /// (`phases`: the instants the iteration, the drain, the timers and the flush
    /// started), what it handled, and how many slow iterations the line stands for.
    fn log_slow_iteration(
        &mut self,
        took: Duration,
        phases: [Instant; 4],
        readiness: usize,
        timers: usize,
    ) {
        self.stats.slow_iterations += 1;
        let Some(count) = self.slow_iteration_log.hit(self.tick(), RATE_LOG_MS) else {
            return;
        };
        let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
        let [start, drain, timers_at, flush] = phases;
        log::warn!(
            "slow loop iteration: {:.1} ms (readiness {:.1} ms for {readiness} events, \
             channel drain {:.1} ms, timers {:.1} ms for {timers} expiries, flush {:.1} ms); \
             {count} iteration(s) over {} ms since the last such line",
            took.as_secs_f64() * 1e3,
            ms(start, drain),
            ms(drain, timers_at),
            ms(timers_at, flush),
            ms(flush, start + took),
            SLOW_ITERATION_US / 1000,
        );
    }

    /// Accept on the client listener, or on the admin listener when `admin`.
    pub(super) fn accept(&mut self, admin: bool) {
        if self.accept_paused {
            return;
        }
        // Connections accepted from here on are not evicted to make room in this call.
        let first_new = self.next_serial + 1;
        for _ in 0..ACCEPT_BUDGET {
            let accepted = match (admin, &self.admin_listener) {
                (false, _) => self.listener.accept(),
                (true, Some(l)) => l.accept(),
                (true, None) => return,
            };
            match accepted {
                Ok((stream, _peer)) => self.add_conn(stream, admin),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let now = self.tick();
                    self.stats.accept_failures += 1;
                    self.last_accept_failure = Some(now);
                    // ENFILE, EMFILE. At the descriptor limit, first free the oldest
                    // connection that has not upgraded (idle sockets must not lock out
                    // upgrades), else answer one waiting client 503 through the reserve
                    // descriptor.
                    let out_of_fds = matches!(e.raw_os_error(), Some(23 | 24));
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
            // A TLS client could not read a plain answer: it is closed unanswered.
            Ok((stream, _)) if self.tls.is_some() => {
                drop(stream);
                self.stats.overload_refused += 1;
                true
            }
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

    fn add_conn(&mut self, stream: TcpStream, admin: bool) {
        if let Err(e) = stream.set_nodelay(true) {
            log::debug!("set_nodelay failed: {e}");
        }
        self.bound_send_buffer(&stream);
        // TLS is for `listen`; the admin listener (`admin_listen`) stays plain HTTP.
        let tls = if admin { None } else { self.tls.as_ref() };
        let stream = match tls.map(Acceptor::session) {
            None => Transport::plain(stream),
            Some(Ok(session)) => Transport::tls(stream, session),
            Some(Err(e)) => {
                log::warn!("TLS session could not be created ({e}): connection dropped");
                return;
            }
        };
        let mut stream = stream;
        self.next_serial += 1;
        let serial = self.next_serial;
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            stream.tcp(),
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
            io: stream,
            out: OutQueue::counted(Arc::clone(&self.pending_total)),
            phase: Phase::Http(Box::default()),
            timer: Some(timer),
            last_rx: now,
            bytes_in: 0,
            write_shut: false,
            flush_queued: false,
            admin,
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

    /// `SIGHUP`: read `tls_cert_file` and `tls_key_file` again; new handshakes use them,
    /// established connections keep theirs. A bad file keeps the old pair, and says why.
    pub(super) fn tls_reload(&mut self) {
        let Some(acceptor) = self.tls.as_mut() else {
            return;
        };
        match acceptor.reload() {
            Ok(()) => {
                self.stats.tls_reloads += 1;
                log::info!(
                    "TLS certificate reloaded from {} (new handshakes use it; connections kept)",
                    acceptor.cert_file().display()
                );
            }
            Err(e) => {
                self.stats.tls_reload_failures += 1;
                log::error!("TLS reload failed, the certificate in force is kept: {e}");
            }
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

    pub(super) fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        live(&mut self.conns, id)
    }

    pub(super) fn mark_dirty(&mut self, id: ConnId) {
        if let Some(conn) = live(&mut self.conns, id) {
            mark(&mut conn.flush_queued, &mut self.dirty, id);
        }
    }

    // ------------------------------------------------------------------ close

    /// The one close path: unregister the session, queue the close frame, count and
    /// log the reason once, then let the output drain (bounded by a linger timer).
    pub(crate) fn close(&mut self, id: ConnId, reason: CloseReason) {
        self.forget_pending_open(id);
        let linger_at = self.tick() + LINGER_MS;
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        let phase = std::mem::replace(&mut conn.phase, Phase::Closing);
        if conn.io.take_tls_failure() {
            self.stats.tls_failures += 1;
            log::debug!("conn={} bad TLS input: closed", id.public_id());
        }
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
                        io: &mut conn.io,
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
                self.engine.release(&session.user, id);
                self.waits.replays.remove(&id);
                self.open_sessions -= 1;
                self.stats.closed(reason);
                // `code=-`: no close frame was sent (the peer closed or the socket failed).
                let code_num = reason.close_frame().map(|(c, _)| c);
                let code = code_num.map_or_else(|| "-".to_owned(), |c| c.to_string());
                let conn_id = id.public_id();
                let duration_ms =
                    u64::try_from(session.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
                // The fields again as key-values: keys of the line in `log_format = json`.
                log::info!(
                    conn = conn_id.as_str(),
                    user:% = session.user,
                    reason = reason.label(),
                    code = code_num,
                    duration_ms = duration_ms;
                    "conn={conn_id} user={:?} closed reason={} code={code} after_ms={duration_ms}",
                    session.user,
                    reason.label(),
                );
            }
        }
        if let Some(t) = conn.timer.take() {
            self.wheel.cancel(t);
        }
        if matches!(
            reason,
            CloseReason::ConnectionReset
                | CloseReason::IoError
                | CloseReason::ClientClosed
                | CloseReason::HandshakeTimeout
        ) && conn.out.is_empty()
        {
            self.finish(id);
            return;
        }
        conn.timer = Some(self.wheel.insert(linger_at, Timer::Phase(id)));
        mark(&mut conn.flush_queued, &mut self.dirty, id);
    }

    /// The end of [`Reactor::close`]'s path: drop the socket and free the slot of a
    /// connection `close` has already taken out of its phase ([`Phase::Closing`]),
    /// reached from `close` itself (nothing left to send) or when the linger ends
    /// (output flushed and the peer's FIN, a write error, the linger timer). The path
    /// runs one way, `close` then `finish`: a connection still open or not upgraded is
    /// never dropped here, so no session leaves without being unregistered and counted.
    pub(super) fn finish(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get(id.key).filter(|c| c.serial == id.serial) else {
            return;
        };
        if !matches!(conn.phase, Phase::Closing) {
            log::error!("conn={} finish before close: ignored", id.public_id());
            return;
        }
        if let Some(mut conn) = self.conns.try_remove(id.key) {
            if let Some(t) = conn.timer.take() {
                self.wheel.cancel(t);
            }
            let _ = self.poll.registry().deregister(conn.io.tcp());
        }
    }
}

/// Put connection `id` on `list` (the flush list, a read-again list) unless its
/// `queued` flag says it already is.
pub(super) fn mark(queued: &mut bool, list: &mut Vec<ConnId>, id: ConnId) {
    if !*queued {
        *queued = true;
        list.push(id);
    }
}

/// The connection `id` names, if its slot still holds it (a free function over the
/// slab so callers can borrow other reactor fields at the same time).
pub(super) fn live(conns: &mut Slab<Conn>, id: ConnId) -> Option<&mut Conn> {
    conns.get_mut(id.key).filter(|c| c.serial == id.serial)
}
