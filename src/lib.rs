//! agentwire: a real-time gateway that streams AI-agent run events to the right user's
//! browser tabs over WebSocket.
//!
//! # Architecture
//!
//! ```text
//! worker threads ──Emitter (bounded crossbeam channel)──┐  one mio::Waker, woken once per burst
//!                                                       ▼
//!                   ┌──────────── reactor thread (mio::Poll) ─────────────┐
//!   TcpListener ──► │ conns: Slab<Conn>      registry: user -> [ConnId]    │ ──► sockets
//!  (WebSocket and   │ wheel: TimerWheel      runs / replay / stats         │
//!   plain HTTP; the └──────────────────────────────────────────────────────┘
//!   publish API's           │ inbound channel (user_message, cancel)
//!   POST /api/events        ▼
//!   routes directly)   agent workers
//! ```
//!
//! There is no async runtime. One thread (`reactor`) owns every socket and all
//! routing state and passes `&mut` around; workers serialize events on their own
//! threads (`event`, `emitter`) so the loop only assigns the per-user `seq`, builds
//! one frame per event and queues that shared frame on each receiving connection
//! (`conn`); the loop flushes each connection once per iteration with `writev`.
//! The reactor is a folder of phases, one `impl Reactor` per file: `reactor/mod.rs`
//! (the struct, the loop, accept, readiness dispatch, the one close path),
//! `reactor/endpoints.rs` (plain HTTP and the publish API), `reactor/session.rs`
//! (upgrades, opening and reading sessions), `reactor/inbound.rs` (client messages and
//! the user-message inbox), `reactor/routing.rs` (draining the channel, delivering,
//! flushing, replay) and `reactor/timers.rs` (timers, housekeeping, watchdog,
//! shutdown). An event's path: worker -> `Event::new` -> channel ->
//! `Reactor::deliver` -> `registry::Registry::route` (seq, replay) -> targets ->
//! `OutQueue::push` -> `writev`; a publish API event skips the channel (parsed on the
//! loop, it goes straight to `Reactor::deliver`). What the gateway writes itself is typed in `frames`
//! (server frames, error codes, HTTP answer bodies) and why a connection ended in
//! `close` (close codes and the labels the stats count).
//! HTTP requests share the port (`http`: request parsing, routes, upgrade admission,
//! responses; origins in `origin`): health, config, stats, metrics (`stats`) and
//! the publish API (`publish`). A session's `mode` decides which events it gets; its
//! `encoding` how they are written: a session that asked for `encoding=agui` gets each
//! event translated into AG-UI events where it is queued (`agui`), the others the
//! shared frame.
//! Identifiers (user, thread, run, agent) are validated where they enter, by one rule
//! per kind (`ids`). Tokens are checked once at the upgrade
//! (`auth`; several keys picked by `kid`: `jwt_keys`; SIGHUP reloads them:
//! `reactor/reload.rs`), where revoked users (`revocation`, filled by
//! `POST /api/users/{user_id}/disconnect`: `reactor/revoke.rs`) are refused too; with
//! `admin_listen` the admin endpoints move to a second listener on the same loop
//! (`http::Port`). Heartbeats, handshake deadlines, token expiry and lingering closes run on
//! a hashed timer wheel (`timer_wheel`). Per-user state (connections, seq, replay
//! buffer, runs) lives in the `registry`, the memory engine; `engine` is the boundary
//! the reactor calls, with the Redis engine behind it for several nodes (PROTOCOL.md
//! section 9, docs/CLUSTER.md). With `inbound_url` set, `user_message` and `cancel` go
//! to the workers as HTTP POSTs from threads of their own (`webhook`, answered back to
//! the loop through a channel and its waker) instead of the inbound channel.
//!
//! # Library use
//!
//! ```no_run
//! use agentwire::{Config, Gateway};
//!
//! let config = Config {
//!     jwt_secret: Some("a-long-enough-development-secret".into()),
//!     ..Config::default()
//! };
//! let mut gateway = Gateway::new(config)?;
//! let emitter = gateway.emitter();
//! let inbound = gateway.inbound().expect("taken once");
//! let handle = gateway.spawn()?;
//! // A worker: answer each user message with a run.
//! while let Ok(agentwire::Inbound::UserMessage { user_id, thread_id, run_id, text, .. }) = inbound.recv() {
//!     let mut run = emitter.run(&user_id, thread_id.as_deref(), &run_id, "echo_agent")?;
//!     run.agent_started(&serde_json::json!({"message": text}))?;
//!     run.agent_completed(&serde_json::json!({"answer": text}))?;
//! }
//! handle.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// The API for embedders: the items re-exported below, `config`, `demo` (the built-in
// demo agent) and `log_sink` (the binary's logger). Every other module is internal;
// what the binary, the benches, the fuzz targets and the load generator need of them
// goes through `__internal`, which is not part of the API.
pub(crate) mod agui;
pub(crate) mod auth;
pub(crate) mod cli;
pub(crate) mod client_message;
pub(crate) mod close;
pub mod config;
pub(crate) mod conn;
pub mod demo;
pub(crate) mod demo_page;
pub(crate) mod emitter;
pub(crate) mod engine;
pub(crate) mod event;
pub(crate) mod frames;
pub(crate) mod http;
pub(crate) mod ids;
mod inbox;
pub(crate) mod jwt_keys;
pub mod log_sink;
pub(crate) mod mode;
pub(crate) mod origin;
pub(crate) mod publish;
mod reactor;
pub(crate) mod registry;
pub(crate) mod revocation;
pub(crate) mod stats;
pub(crate) mod timer_wheel;
pub(crate) mod tls;
pub(crate) mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use crossbeam_channel::Receiver;
use mio::net::TcpListener;
use mio::{Interest, Poll, Waker};
use tungstenite::protocol::WebSocketConfig;

pub use crate::auth::{
    AuthError, AuthSettings, AuthSetupError, Authenticator, Claims, JwtAlgorithm,
};
pub use crate::config::{Config, ConfigError, LogFormat, PerUserPolicy};
pub use crate::emitter::{EmitError, Emitter, Inbound, RunHandle};
pub use crate::event::{EventError, EventKind};
pub use crate::tls::TlsError;

/// The README's Rust snippets compile as doc tests (`cargo test --doc`), so the README
/// cannot drift from the API; its other snippets run in the client suites.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// Internals for the binary (`src/bin/agentwire.rs`), the benches, the fuzz targets
/// and `tools/loadgen`: NOT part of the API, hidden from the docs, and free to change
/// in any release. One submodule per internal module, so a user writes
/// `agentwire::__internal::http::parse_head` where the crate writes `http::parse_head`.
#[doc(hidden)]
pub mod __internal {
    pub mod agui {
        pub use crate::agui::{json_payload, RunInProgress, Source, Stream};
    }
    pub mod auth {
        pub use crate::auth::try_generate_secret;
    }
    pub mod cli {
        pub use crate::cli::{parse, CliError, Command};
    }
    pub mod client_message {
        pub use crate::client_message::{BadMessage, ClientMessage};
    }
    pub mod conn {
        pub use crate::conn::{ConnId, OutQueue};
    }
    pub mod ids {
        pub use crate::ids::{AgentName, RunId, ThreadId, UserId};
    }
    pub mod event {
        pub use crate::event::{control_frame, Event, RunKey};
    }
    pub mod http {
        pub use crate::http::{
            admit_upgrade, allowed_methods, check_upgrade, json_response, keep_alive,
            method_not_allowed_response, parse_head, upgrade_response, Method, Refusal, Request,
            Route, TokenSource, MAX_HEAD_BYTES,
        };
    }
    pub mod mode {
        pub use crate::mode::Mode;
    }
    pub mod origin {
        pub use crate::origin::allowed;
    }
    pub mod publish {
        pub use crate::publish::{parse_batch, BatchError, MAX_BATCH};
    }
    pub mod registry {
        pub use crate::registry::{ConnEntry, Limits, Registry, Routed};
    }
    pub mod timer_wheel {
        pub use crate::timer_wheel::TimerWheel;
    }
}

use crate::emitter::WakeSignal;
use crate::reactor::{Reactor, Settings};

/// Capacity of the workers' channel into the reactor (events).
pub const CHANNEL_CAPACITY: usize = 65_536;
/// Capacity of the inbound channel to the workers (client messages).
pub const INBOUND_CAPACITY: usize = 4096;
/// Listen backlog: large enough for reconnect storms.
pub const LISTEN_BACKLOG: i32 = 4096;
/// Most verbose level the `agentwire` binary lets other crates log at, whatever
/// `RUST_LOG` asks. tungstenite's trace records print every client message verbatim
/// (a `refresh` carries a JWT) and logs never hold a token; mio's trace records
/// (`token=Token(n)` per registration) are per-socket noise that log scanners read as
/// a leaked token. An embedder installing its own logger should apply the same caps.
pub const LOG_LEVEL_CAPS: &[(&str, log::LevelFilter)] = &[
    ("tungstenite", log::LevelFilter::Info),
    ("mio", log::LevelFilter::Info),
];

/// True when a record of `target` at `level` passes [`LOG_LEVEL_CAPS`] (a cap applies
/// to its crate and every module under it).
pub fn log_level_allowed(target: &str, level: log::Level) -> bool {
    LOG_LEVEL_CAPS
        .iter()
        .find(|(krate, _)| {
            target
                .strip_prefix(krate)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
        .is_none_or(|(_, cap)| level <= *cap)
}

/// Setup failures: the only errors that leave [`Gateway::new`] or [`Gateway::run`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Auth(#[from] auth::AuthSetupError),
    #[error("cannot read jwt_public_key_file {path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
    /// `tls_cert_file` / `tls_key_file`: one without the other, unreadable, bad PEM,
    /// or a key that does not match the certificate.
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("event loop failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A configured gateway, bound to its address, not yet running.
pub struct Gateway {
    reactor: Reactor,
    emitter: Emitter,
    inbound: Option<Receiver<Inbound>>,
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    epoch: String,
    demo_agent: bool,
}

/// Build the authenticator settings from the configuration (reads the key file).
pub fn auth_settings(config: &Config) -> Result<AuthSettings, Error> {
    let public_key_pem = match &config.jwt_public_key_file {
        Some(path) => Some(read_key_file(path).map_err(|source| Error::KeyFile {
            path: path.display().to_string(),
            source,
        })?),
        None => None,
    };
    Ok(AuthSettings {
        algorithm: config.jwt_algorithm,
        secret: config.jwt_secret.clone(),
        public_key_pem,
        issuer: config.jwt_issuer.clone(),
        audience: config.jwt_audience.clone(),
        leeway_s: config.jwt_leeway_s,
    })
}

/// Read `jwt_public_key_file`, at most [`jwt_keys::MAX_KEY_FILE_BYTES`] (a key file is
/// small; SIGHUP reads it on the event loop, see `reactor/reload.rs`).
fn read_key_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(jwt_keys::MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > jwt_keys::MAX_KEY_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {} bytes",
            jwt_keys::MAX_KEY_FILE_BYTES
        )));
    }
    Ok(bytes)
}

/// The authenticator the configuration describes (also what `agentwire token` and dev
/// mode mint with).
pub fn authenticator(config: &Config) -> Result<Authenticator, Error> {
    Ok(Authenticator::new(&auth_settings(config)?)?.with_max_lifetime_s(config.jwt_max_lifetime_s))
}

/// The tungstenite settings of every session: a small read buffer (it grows for larger
/// frames), no write buffering (the gateway queues output itself, see `conn`), and
/// `max_message_bytes` as the largest frame and message. Public for the fuzz targets.
#[doc(hidden)]
pub fn websocket_config(config: &Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(reactor::READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_write_buffer_size(usize::MAX)
        .max_message_size(Some(config.max_message_bytes))
        .max_frame_size(Some(config.max_message_bytes))
}

impl Gateway {
    /// Validate the configuration, build the authenticator and bind the listener.
    ///
    /// # Errors
    /// A bad setting, unreadable key material, or an address that cannot be bound.
    pub fn new(config: Config) -> Result<Gateway, Error> {
        Self::build(config, false)
    }

    /// As [`Gateway::new`], in dev mode (PROTOCOL.md section 10.2): `POST /dev/token`
    /// mints a token for any user with the configured HS256 `jwt_secret`, and the demo
    /// page is on unless `demo_page` is false. The binary uses it when no JWT key was
    /// configured (it generates the secret). Never for production: anyone who reaches
    /// the port can log in as anyone.
    ///
    /// # Errors
    /// As [`Gateway::new`].
    pub fn new_dev(config: Config) -> Result<Gateway, Error> {
        Self::build(config, true)
    }

    fn build(config: Config, dev: bool) -> Result<Gateway, Error> {
        config.validate()?;
        let auth = authenticator(&config)?;
        let tls = tls::Acceptor::from_settings(
            config.tls_cert_file.as_deref(),
            config.tls_key_file.as_deref(),
        )?;
        let poll = Poll::new()?;
        let listener = bind(config.listen, config.reuse_port).map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, reactor::LISTENER, Interest::READABLE)?;
        let local_addr = listener.local_addr()?;
        let mut admin_listener = match config.admin_listen {
            Some(addr) => Some(TcpListener::from_std(
                bind(addr, false).map_err(|source| Error::Bind { addr, source })?,
            )),
            None => None,
        };
        if let Some(admin) = admin_listener.as_mut() {
            poll.registry()
                .register(admin, reactor::ADMIN_LISTENER, Interest::READABLE)?;
        }
        let admin_addr = admin_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?;
        let waker = Waker::new(poll.registry(), reactor::WAKER)?;
        let wake = Arc::new(WakeSignal::new(waker));
        let (tx, rx) = crossbeam_channel::bounded(CHANNEL_CAPACITY);
        let (in_tx, in_rx) = crossbeam_channel::bounded(INBOUND_CAPACITY);
        let mut demo_agent = config.demo_agent.unwrap_or_else(|| config.dev_mode());
        if demo_agent && config.inbound_url.is_some() {
            log::warn!("demo agent off: inbound_url takes every user_message and cancel");
            demo_agent = false;
        }
        let webhook = webhook::Webhook::start(&config, wake.clone())?;
        let ws_config = websocket_config(&config);
        let config_json =
            Bytes::from(serde_json::to_vec(&config.to_public_json(demo_agent)).unwrap_or_default());
        let epoch = reactor::new_epoch();
        let demo = demo_page::DemoPage::new(&config, dev, authenticator(&config).ok());
        let settings = Settings {
            demo,
            demo_agent,
            config,
            ws_config,
            config_json,
        };
        let engine_down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let engine = start_engine(&settings.config, &wake, &engine_down)?;
        let mut reactor = Reactor::new(
            poll,
            listener,
            admin_listener,
            wake.clone(),
            rx,
            in_tx,
            auth,
            tls,
            settings,
            epoch.clone(),
        );
        reactor.set_webhook(webhook);
        if let Some((engine, node_id)) = engine {
            reactor.use_engine(engine, node_id);
        }
        Ok(Gateway {
            reactor,
            emitter: Emitter::new(tx, wake, engine_down),
            inbound: Some(in_rx),
            local_addr,
            admin_addr,
            epoch,
            demo_agent,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound admin address when `admin_listen` is set (`/metrics`, `/ws/stats`,
    /// `/ws/config` and `/health` are served there, and no longer on `listen`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The random epoch of this gateway process (PROTOCOL.md section 3). Users get it
    /// until the first user is forgotten; users created later get
    /// `"<this epoch>-<users forgotten so far>"` (a user's epoch is in its `connected`
    /// frame; see `registry`).
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// True when the configuration asks for the built-in demo agent (explicitly, or
    /// by dev mode).
    pub fn demo_agent_enabled(&self) -> bool {
        self.demo_agent
    }

    /// A cloneable handle for worker threads.
    pub fn emitter(&self) -> Emitter {
        self.emitter.clone()
    }

    /// The channel of client messages for the workers (`user_message`, `cancel`).
    /// Returns `None` after the first call. If it is never taken, or every receiver
    /// is dropped, clients get `error` `no_agent` for `user_message`. With
    /// `inbound_url` set, those messages go to the webhook instead and nothing arrives
    /// here (run handles still see cancels through `RunHandle::is_cancelled`).
    pub fn inbound(&mut self) -> Option<Receiver<Inbound>> {
        self.inbound.take()
    }

    /// Handle the process's signals the way the `agentwire` binary does: SIGTERM and
    /// SIGINT drain (new upgrades get 503, every session gets close 1001, output is
    /// flushed within `shutdown_grace_ms`, then [`Gateway::run`] returns `Ok` and the
    /// reactor thread of [`Gateway::spawn`] ends); SIGHUP reloads the JWT keys,
    /// `jwt_secret` and `allowed_origins` (see [`Gateway::reload_config_with`]) and the
    /// TLS certificate and key (when `tls_cert_file` is set). The
    /// handlers only set a flag and wake the loop; they replace the default actions
    /// (SIGTERM, SIGINT and SIGHUP no longer end the process), for the whole process:
    /// call it for one gateway per process.
    ///
    /// # Errors
    /// When the handlers or their wake-up pipe cannot be installed.
    pub fn handle_signals(&mut self) -> Result<(), Error> {
        Ok(self.reactor.handle_signals()?)
    }

    /// Where a SIGHUP reload reads the configuration: `source` is called on the event
    /// loop at each SIGHUP (keep it to reading small files), and of what it returns only
    /// `jwt_secret`, `jwt_public_key_file` and `allowed_origins` are applied (other
    /// changed settings are named in a warning: they need a restart). An `Err` (a
    /// message) keeps the keys, secret and origins in force. Without a source a reload
    /// reads `jwt_public_key_file` again from the same path and keeps the rest.
    pub fn reload_config_with(
        &mut self,
        source: impl FnMut() -> Result<Config, String> + Send + 'static,
    ) {
        self.reactor.set_reload_source(Box::new(source));
    }

    /// Run the reactor on this thread until a shutdown completes.
    ///
    /// # Errors
    /// Only if the poller itself fails.
    pub fn run(mut self) -> Result<(), Error> {
        // Not taken by the embedder: nobody consumes user messages.
        self.inbound = None;
        Ok(self.reactor.run()?)
    }

    /// Run the reactor on its own thread, handling the process's signals as the
    /// `agentwire` binary does ([`Gateway::handle_signals`]): SIGTERM or SIGINT drains
    /// the gateway (503 to new upgrades, runs in progress end with `agent_error`
    /// `shutdown`, close 1001 to every session, output flushed within
    /// `shutdown_grace_ms`) and then the reactor thread ends, the inbound channel closes
    /// (so workers looping on it finish) and [`GatewayHandle::join`] returns `Ok`;
    /// SIGHUP reloads the JWT keys, `jwt_secret` and `allowed_origins`. An embedding
    /// program that joins its workers and then the handle exits as cleanly as the
    /// binary (`examples/worker.rs`).
    ///
    /// # Errors
    /// When the signal handlers cannot be installed or the thread cannot start.
    pub fn spawn_with_signals(mut self) -> Result<GatewayHandle, Error> {
        self.handle_signals()?;
        self.spawn()
    }

    /// Run the reactor on its own thread.
    pub fn spawn(self) -> Result<GatewayHandle, Error> {
        let emitter = self.emitter.clone();
        let local_addr = self.local_addr;
        let admin_addr = self.admin_addr;
        let thread = std::thread::Builder::new()
            .name("agentwire-reactor".into())
            .spawn(move || self.run())?;
        Ok(GatewayHandle {
            emitter,
            local_addr,
            admin_addr,
            thread,
        })
    }
}

/// A running gateway (see [`Gateway::spawn`]).
pub struct GatewayHandle {
    emitter: Emitter,
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    thread: JoinHandle<Result<(), Error>>,
}

impl GatewayHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound admin address when `admin_listen` is set ([`Gateway::admin_addr`]).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn emitter(&self) -> Emitter {
        self.emitter.clone()
    }

    /// Graceful shutdown: close 1001 to every client, flush within
    /// `shutdown_grace_ms`, then wait for the reactor thread to end.
    pub fn shutdown(self) -> Result<(), Error> {
        let _ = self.emitter.shutdown();
        self.join()
    }

    /// Whether the reactor thread has ended (a drain completed, or the loop failed):
    /// [`GatewayHandle::join`] then returns at once.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Wait for the reactor thread to end.
    pub fn join(self) -> Result<(), Error> {
        match self.thread.join() {
            Ok(r) => r,
            Err(_) => Err(Error::Io(std::io::Error::other("reactor thread panicked"))),
        }
    }
}

/// The Redis engine and this node's name when `engine = "redis"` (its threads start
/// here; they connect on their own); `None` for the memory engine.
fn start_engine(
    config: &Config,
    wake: &Arc<WakeSignal>,
    engine_down: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<Option<(engine::Engine, Arc<str>)>, Error> {
    if config.engine != config::EngineKind::Redis {
        return Ok(None);
    }
    let node_id: Arc<str> = match &config.node_id {
        Some(id) => Arc::from(id.as_str()),
        None => Arc::from(format!("n-{}", reactor::new_epoch())),
    };
    let settings = engine::redis::RedisSettings {
        url: config.redis_url.clone().unwrap_or_default(),
        tls_ca_file: config.redis_tls_ca_file.clone(),
        sentinel_password: config.redis_sentinel_password.clone(),
        prefix: config.redis_prefix.clone().unwrap_or_default(),
        timeout: std::time::Duration::from_millis(config.redis_timeout_ms),
        replay_events: config.replay_events,
        replay_ttl_ms: config.replay_ttl_ms,
        max_active_runs_per_user: config.max_active_runs_per_user,
        max_active_runs: config.max_active_runs,
        run_idle_timeout_ms: config.run_idle_timeout_ms,
        node_id: node_id.to_string(),
        max_connections_per_user: config.max_connections_per_user,
        evict_oldest: config.per_user_policy == config::PerUserPolicy::EvictOldest,
        max_revoked_users: config.max_revoked_users,
    };
    let wake = Arc::clone(wake);
    let redis = engine::redis::RedisEngine::start(
        settings,
        Arc::new(move || wake.wake()),
        Arc::clone(engine_down),
    )
    .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
    log::info!(
        "engine redis: node_id={node_id} prefix={:?}",
        config.redis_prefix
    );
    Ok(Some((engine::Engine::Redis(Box::new(redis)), node_id)))
}

/// Bind with a large backlog (mio's `bind` uses 128) and SO_REUSEADDR; with
/// `reuse_port` also SO_REUSEPORT (several nodes on one machine share the address and
/// the kernel spreads connections over them).
fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}
