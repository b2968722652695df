//! Gateway configuration: every setting of PROTOCOL.md section 8, declared once in the
//! table below, and the checks between settings.
//!
//! # The table
//!
//! Each setting is one row of the `settings!` table in this file, written like a struct
//! field with three more columns:
//!
//! ```text
//! /// Doc of the field: meaning, unit, default.
//! name: Type = default, Kind, "one-line help for --help";
//! name: Type = default, Integer(min, max), "help", shown "default as --help shows it";
//! ```
//!
//! From the rows the macro (`config/setting.rs`) makes the [`Config`] struct (fields with
//! their docs, public, names and types as written), `Default`, [`Config::NAMES`] and
//! [`Config::SETTINGS`]: per setting its flag `--name-with-dashes`, its environment
//! variable `AGENTWIRE_NAME`, its help line, its [`SettingKind`], its default as shown in
//! `--help` (the default value written as the setting is written, unless `shown` says
//! more) and accessors to its field. Everything else is generic over the table: parsing
//! from strings ([`Config::set`], the same for the TOML file, the environment and the
//! flags, `config/value.rs`), range checks against the row's bounds and the cross-setting
//! checks ([`Config::validate`], run once by [`Config::load`]), `Debug` (secrets shown only
//! as set or unset), the `--help` settings (`src/cli.rs`) and `GET /ws/config`
//! ([`Config::to_public_json`], secrets only as `<name>_set`).
//!
//! Kinds and the field types that store them: `Address` (`SocketAddr`), `Algorithm`
//! (`JwtAlgorithm`), `Secret` and `Text` (`Option<String>`), `Path` (`Option<PathBuf>`),
//! `Bool` (`bool`), `AutoBool` (`Option<bool>`), `Origins` (`Vec<String>`), `Policy`
//! ([`PerUserPolicy`]), `LogFormat` ([`LogFormat`]), `Integer(min, max)` (`u64` or `usize`) and
//! `OptionalInteger(min, max)` (`Option<u64>`, default `None` shown as `none`). A unit test
//! checks that every row's type stores its kind.
//!
//! # Adding a setting
//!
//! Add one row where it belongs in the table, with its `///` doc, for example
//!
//! ```text
//! /// Open HTTP connections (not yet upgraded) in total. Default 1024.
//! max_http_connections: usize = 1_024, Integer(1, 10_000_000), "Open HTTP connections";
//! ```
//!
//! and it is a field of [`Config`], a flag, an environment variable, a TOML key, a line of
//! `--help` and a key of `GET /ws/config`. A check involving other settings goes in
//! [`Config::validate`]. The unit tests cover every row generically; the README's settings
//! table is written by hand.
//!
//! Choices this module makes where the protocol is silent:
//! - An empty string unsets an optional setting (`jwt_secret`, `jwt_public_key_file`,
//!   `jwt_issuer`, `jwt_audience`, `publish_key`); `demo_agent` and `demo_page` also take `auto`.
//! - `heartbeat_timeout_ms` left unset by every source is twice `heartbeat_interval_ms`
//!   (section 5), which is 60000 with the default interval; a timeout given alone at or
//!   below the default interval halves the interval instead of failing the start.
//! - Numbers are plain decimal digits within a per-setting range (see [`SettingKind`]);
//!   `replay_events`, `replay_ttl_ms`, `jwt_leeway_s` and `shutdown_grace_ms` may be 0.
//! - Origins are stored lower-cased with the scheme's default port dropped, the way
//!   browsers send them; `*` is refused (leave the list empty to accept any origin).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use crate::auth::JwtAlgorithm;

#[macro_use]
mod setting;
mod load;
mod value;

#[cfg(test)]
mod tests;

pub use load::{ConfigError, Source};
pub use setting::{Setting, SettingKind};
pub use value::{EngineKind, LogFormat, PerUserPolicy};

use load::invalid_value;
use setting::{env_name, flag_name};
use value::Value;

/// Prefix of the environment variables that carry settings: `AGENTWIRE_<NAME>`.
pub const ENV_PREFIX: &str = "AGENTWIRE_";

/// Environment variable naming the TOML file (the `--config` flag wins over it). Not a
/// setting, so [`Config::load`] skips it without a warning.
pub const ENV_CONFIG_FILE: &str = "AGENTWIRE_CONFIG";

/// Shortest accepted HS256 `jwt_secret` and `publish_key`, in bytes: shorter ones are
/// refused by [`Config::validate`]. (`Authenticator` warns below 32 bytes of `jwt_secret`.)
pub const MIN_ACCEPTED_SECRET_BYTES: usize = 16;

/// `redis_url` unless set.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

const DAY_MS: u64 = 86_400_000;
const GIB: u64 = 1 << 30;
const LOCALHOST_8080: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);

settings! {
    /// Every setting of PROTOCOL.md section 8. Units are in the field names; build one with
    /// [`Config::default`] and [`Config::set`], or with [`Config::load`]. Its `Debug` output
    /// shows whether `jwt_secret` and `publish_key` are set, never their values.
    #[derive(Clone)]
    pub struct Config {
        /// Address to bind. Default `127.0.0.1:8080`.
        listen: SocketAddr = LOCALHOST_8080, Address, "Address to bind";
        /// Address of the admin listener (PROTOCOL.md section 12): when set, `/metrics`,
        /// `/ws/stats` and `/ws/config` are served there (with `/health`) and answer 404
        /// on `listen`. Default none: everything on `listen`.
        admin_listen: Option<SocketAddr> = None, OptionalAddress,
            "Admin address for /metrics, /ws/stats, /ws/config (then 404 on listen)";
        /// Algorithm every token must use; any other `alg` is refused. Default HS256.
        jwt_algorithm: JwtAlgorithm = JwtAlgorithm::Hs256, Algorithm,
            "JWT algorithm every token must use: HS256, RS256 or ES256";
        /// HS256 shared secret, at least 16 bytes. Default none (dev mode when no key at all).
        jwt_secret: Option<String> = None, Secret,
            "HS256 shared secret, at least 16 bytes; no JWT key at all means dev mode";
        /// PEM public key for RS256/ES256. Default none.
        jwt_public_key_file: Option<PathBuf> = None, Path, "PEM public key file for RS256/ES256";
        /// When set, tokens must carry this `iss`. Default none.
        jwt_issuer: Option<String> = None, Text, "When set, tokens must carry this iss";
        /// When set, tokens must carry this `aud`. Default none.
        jwt_audience: Option<String> = None, Text, "When set, tokens must carry this aud";
        /// Clock-skew allowance for `exp`/`nbf`, in seconds. Default 5.
        jwt_leeway_s: u64 = 5, Integer(0, crate::auth::MAX_LEEWAY_S), "Clock-skew allowance for exp/nbf, in seconds";
        /// Longest token lifetime accepted, in seconds: tokens whose `exp` lies further
        /// ahead than this (plus the leeway), or whose `exp - iat` exceeds it, are refused.
        /// Default none (any lifetime).
        jwt_max_lifetime_s: Option<u64> = None, OptionalInteger(1, 10 * 365 * 86_400),
            "When set, tokens whose exp lies further ahead (or exp - iat) than this many seconds are refused";
        /// Accept the token from the `?token=` query parameter. Default true.
        allow_query_token: bool = true, Bool, "Accept the token from the ?token= query parameter";
        /// Exact origins allowed to connect (lower-case, default port dropped). Default empty:
        /// any origin.
        allowed_origins: Vec<String> = Vec::new(), Origins,
            "Comma-separated exact origins allowed to connect", shown "empty (any origin)";
        /// Bearer key for `POST /api/events`; without one the endpoint answers 404. Default none.
        publish_key: Option<String> = None, Secret, "Bearer key that enables POST /api/events";
        /// PEM certificate chain (end-entity first) served on `listen`; with
        /// `tls_key_file`, `listen` speaks only TLS (`wss://`, `https://`). Reloaded on
        /// `SIGHUP`. Default none (plain TCP).
        tls_cert_file: Option<PathBuf> = None, Path,
            "PEM certificate chain: with tls_key_file, listen serves wss:// and https:// (reloaded on SIGHUP)";
        /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert_file`. Default none.
        tls_key_file: Option<PathBuf> = None, Path, "PEM private key of tls_cert_file";
        /// Worker endpoint that receives every `user_message` and `cancel` as an HTTP POST
        /// (PROTOCOL.md section 6b; `src/webhook/`): `http://` or `https://`, with a host,
        /// no user:password. When set, it replaces the in-process inbound channel for
        /// those messages. Default none.
        inbound_url: Option<String> = None, Text,
            "Worker URL that receives each user_message and cancel as a POST (http:// or https://)";
        /// Bearer key sent to `inbound_url` (`Authorization: Bearer <key>`), at least 16
        /// bytes. Default none: the publish key.
        inbound_key: Option<String> = None, Secret,
            "Bearer key sent to inbound_url; default: publish_key", shown "none (publish_key)";
        /// Time the `inbound_url` endpoint has to answer, counted from the client's
        /// message, in milliseconds; later is `no_agent`. Default 5000.
        inbound_timeout_ms: u64 = 5_000, Integer(1, 600_000),
            "Time inbound_url has to answer a message, in milliseconds; later is no_agent";
        /// Requests to `inbound_url` sent or queued and not yet answered; past it a client's
        /// message gets `no_agent` at once. Default 1024.
        inbound_max_in_flight: usize = 1_024, Integer(1, 1_000_000),
            "Requests to inbound_url waiting for an answer; past it no_agent at once";
        /// Users revoked with `until` at once (`POST /api/users/{user_id}/disconnect`);
        /// expired revocations go first, and past it a new one is refused with 503
        /// `too_many_revocations` (none in force is dropped). Default 10000.
        max_revoked_users: usize = 10_000, Integer(1, 10_000_000),
            "Users revoked with until at once; past it new revocations get 503";
        /// Open connections in total. Default 10000.
        max_connections: usize = 10_000, Integer(1, 10_000_000), "Open connections in total";
        /// Open connections per user. Default 3.
        max_connections_per_user: usize = 3, Integer(1, 10_000_000), "Open connections per user";
        /// What happens when a user exceeds `max_connections_per_user`. Default evict_oldest.
        per_user_policy: PerUserPolicy = PerUserPolicy::EvictOldest, Policy,
            "Over the per-user limit: evict_oldest (close 4002) or reject (429)";
        /// Largest client message, in bytes; larger ones close with 1009. Default 65536.
        max_message_bytes: usize = 65_536, Integer(1, GIB), "Largest client message, in bytes";
        /// Largest `text` of a `user_message`, in bytes; larger ones get `error` code
        /// `too_large` (the connection stays open). Default 32768.
        max_user_message_bytes: usize = 32_768, Integer(1, GIB),
            "Largest user_message text, in bytes; larger ones get error too_large";
        /// Runs one user may have acked by `user_message` and not yet begun (no first
        /// event yet); past it that user gets `error` code `busy`. Default 16.
        max_pending_runs_per_user: usize = 16, Integer(1, 1_000_000),
            "Runs a user may have acked and not yet begun; past it error busy";
        /// Largest `POST /api/events` body, in bytes; larger ones get 413. Default 1048576.
        max_publish_bytes: usize = 1_048_576, Integer(1, GIB),
            "Largest publish request body, in bytes";
        /// Unsent output per connection, in bytes, before it is closed with 1013.
        /// Default 1048576.
        max_pending_bytes: usize = 1_048_576, Integer(1, GIB),
            "Unsent output per connection, in bytes, before it is closed";
        /// Unsent output over all connections, in bytes; past it the connections holding
        /// the most are closed with 1013 until the total is back under. Default 536870912.
        max_pending_total_bytes: usize = 536_870_912, Integer(1, 1 << 40),
            "Unsent output over all connections, in bytes; past it the largest holders are closed (1013)";
        /// `SO_SNDBUF` of accepted sockets, in bytes: bounds what the kernel holds per
        /// connection; 0 leaves the kernel default (autotuning). Default 262144.
        socket_send_buffer_bytes: usize = 262_144, Integer(0, GIB),
            "SO_SNDBUF of accepted sockets, in bytes (0: the kernel default)";
        /// Connections that have not upgraded (HTTP requests, handshakes in progress); over
        /// it the oldest is closed. Default 1024.
        max_http_connections: usize = 1_024, Integer(1, 10_000_000),
            "Connections not yet upgraded (HTTP, handshakes); over it the oldest is closed";
        /// Request bytes buffered by all connections that have not upgraded, in bytes; over
        /// it the oldest holding any is closed. Default 67108864.
        max_http_buffer_total_bytes: usize = 67_108_864, Integer(1, 64 * GIB),
            "Request bytes buffered by all connections not yet upgraded, in bytes";
        /// Interval between WebSocket Pings, in milliseconds. Default 30000.
        heartbeat_interval_ms: u64 = 30_000, Integer(1, DAY_MS),
            "Interval between WebSocket Pings, in milliseconds";
        /// Silence after which a connection is closed, in milliseconds. Default 60000 (twice the
        /// interval when loaded without an explicit value).
        heartbeat_timeout_ms: u64 = 60_000, Integer(1, 2 * DAY_MS),
            "Silence after which a connection is closed, in milliseconds",
            shown "60000 (2 x interval)";
        /// Time allowed to finish the HTTP upgrade, in milliseconds. Default 5000.
        handshake_timeout_ms: u64 = 5_000, Integer(1, DAY_MS),
            "Time allowed to finish the WebSocket handshake, in milliseconds";
        /// Events kept per user for resume; 0 disables replay. Default 1024.
        replay_events: usize = 1_024, Integer(0, 1_000_000),
            "Events kept per user for resume (0 disables replay)";
        /// How long kept events stay replayable, in milliseconds. Default 120000.
        replay_ttl_ms: u64 = 120_000, Integer(0, 7 * DAY_MS),
            "How long kept events stay replayable, in milliseconds";
        /// Bytes of kept events per user (the oldest go first). Default 4194304.
        replay_bytes_per_user: usize = 4_194_304, Integer(1, 1 << 40),
            "Bytes of kept events per user (the oldest go first)";
        /// Bytes of kept events over all users, plus a fixed overhead per known user
        /// (memory engine); the oldest events go first, then idle users. Default 268435456.
        replay_memory_bytes: usize = 268_435_456, Integer(1, 1 << 40),
            "Bytes of kept events over all users (memory engine); the oldest go first";
        /// A run with no event for this long is ended with `agent_error`, in milliseconds.
        /// Default 300000.
        run_idle_timeout_ms: u64 = 300_000, Integer(1, 7 * DAY_MS),
            "A run with no event for this long is ended with agent_error, in milliseconds";
        /// Runs in progress per user; past it new runs are refused (publish 429
        /// `too_many_runs`, [`crate::EmitError::TooManyRuns`]). Default 256.
        max_active_runs_per_user: usize = 256, Integer(1, 1_000_000),
            "Runs in progress per user; past it new runs are refused (429 too_many_runs)";
        /// Runs in progress over all users; past it new runs are refused as above.
        /// Default 100000.
        max_active_runs: usize = 100_000, Integer(1, 100_000_000),
            "Runs in progress over all users; past it new runs are refused";
        /// Time to flush on shutdown before exiting, in milliseconds. Default 5000.
        shutdown_grace_ms: u64 = 5_000, Integer(0, DAY_MS),
            "Time to flush on shutdown before exiting, in milliseconds";
        /// Log lines on stderr: `text` (env_logger's line) or `json` (one object per line:
        /// `ts`, `level`, `target`, `message`, and `conn`, `user`, `reason`, `code`,
        /// `duration_ms` when the line has them). Default text.
        log_format: LogFormat = LogFormat::Text, LogFormat,
            "Log lines on stderr: text or json (one object per line)";
        /// Built-in demo agent. Default none: auto, on in dev mode (no JWT key configured),
        /// off otherwise; see [`Config::demo_agent_effective`].
        demo_agent: Option<bool> = None, AutoBool,
            "Built-in demo agent answering user_message with a realistic run",
            shown "auto (on in dev mode)";
        /// The demo page at `GET /` (PROTOCOL.md section 10.2). Default none: auto, on in
        /// dev mode, off otherwise (then `GET /` is 404).
        demo_page: Option<bool> = None, AutoBool,
            "Demo chat page at GET / (static, built in)", shown "auto (on in dev mode)";
        /// Allow dev mode (no JWT key) on a listen address that is not loopback. Default false.
        dev: bool = false, Bool,
            "Allow dev mode (no JWT key) on a listen address that is not loopback";
        /// Where users' seq, epoch, kept events and ended runs live: `memory` (this
        /// process) or `redis` (shared by every node; PROTOCOL.md section 9). Default memory.
        engine: EngineKind = EngineKind::Memory, Engine,
            "Where users' shared state lives: memory (this process) or redis (every node)";
        /// The Redis of the Redis engine (a secret: it may hold a password):
        /// `redis://[user:password@]host:port[/db]`, `rediss://...` (TLS) or
        /// `redis+sentinel://[user:password@]host[:port][,host[:port]...]/<master_name>[/db]`
        /// (`rediss+sentinel://` with TLS; docs/CLUSTER.md, "Sentinel and TLS").
        /// Default `redis://127.0.0.1:6379`.
        redis_url: Option<String> = Some(DEFAULT_REDIS_URL.to_owned()), Secret,
            "Redis of the redis engine: redis://[user:password@]host:port[/db], rediss:// \
             (TLS) or redis+sentinel://host[:port][,host[:port]...]/<master_name>[/db]",
            shown "redis://127.0.0.1:6379";
        /// PEM file of the CA that signs the Redis servers' certificates (`rediss://`,
        /// `rediss+sentinel://`); unset: the system's trust store. Default none.
        redis_tls_ca_file: Option<PathBuf> = None, Path,
            "PEM CA of the Redis servers' TLS certificates (rediss://); unset: system store";
        /// The sentinels' password (their `requirepass`), with a `redis+sentinel://` URL
        /// (a secret). Default none: the sentinels are asked without AUTH.
        redis_sentinel_password: Option<String> = None, Secret,
            "Password of the sentinels (their requirepass), with redis+sentinel://";
        /// Prefix of every Redis key and channel (several gateways can share one Redis).
        /// Default `agentwire`.
        redis_prefix: Option<String> = Some("agentwire".to_owned()), Text,
            "Prefix of every Redis key and channel";
        /// This node's name in logs, stats and the `connected` frame. Default none: random
        /// at start.
        node_id: Option<String> = None, Text,
            "This node's name in logs, stats and connected frames", shown "random at start";
        /// A Redis call not answered within this counts as Redis unavailable, in
        /// milliseconds. Default 2000.
        redis_timeout_ms: u64 = 2_000, Integer(1, 600_000),
            "A Redis call not answered within this means Redis is unavailable, in milliseconds";
        /// Bind with `SO_REUSEPORT`, so several nodes on one machine share `listen`.
        /// Default false.
        reuse_port: bool = false, Bool,
            "Bind with SO_REUSEPORT (several nodes on one machine share listen)";
    }
}

impl fmt::Debug for Config {
    /// Every setting in table order; a secret shows as `Some("<redacted>")` or `None`, so a
    /// `{:?}` in a log line can never leak it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("Config");
        for setting in Self::SETTINGS {
            let value = setting.value(self);
            if setting.is_secret() {
                out.field(setting.name, &value.is_set().then_some("<redacted>"));
            } else {
                out.field(setting.name, &value);
            }
        }
        out.finish()
    }
}

impl Config {
    /// The setting called `name`, snake_case or dashed; `None` when there is none.
    pub fn setting(name: &str) -> Option<&'static Setting> {
        let name = name.trim();
        Self::SETTINGS
            .iter()
            .find(|s| s.name == name || s.flag == name)
    }

    /// Set one setting from its string form (the same parser serves file, env and flags).
    ///
    /// `name` is snake_case or dashed. Booleans accept true/false/1/0/yes/no/on/off;
    /// `allowed_origins` splits on commas and trims, and an empty string is the empty list;
    /// an empty string unsets an optional string setting. Numbers reject negatives,
    /// garbage and values out of the setting's range.
    ///
    /// # Errors
    /// [`ConfigError::UnknownSetting`] for an unknown name, [`ConfigError::InvalidValue`]
    /// for a bad value; the config is unchanged on error.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), ConfigError> {
        let setting = Self::setting(name).ok_or_else(|| ConfigError::UnknownSetting {
            name: name.to_owned(),
            origin: Source::Code,
        })?;
        self.set_from(setting, value, Source::Code)
    }

    /// Range, form and cross-setting checks; a config from [`Config::load`] has passed
    /// them.
    ///
    /// Checks every number against its row's range (so limits that make no sense at 0
    /// are at least 1), that no optional string is set to the empty string, the form of
    /// `allowed_origins`, `heartbeat_timeout_ms > heartbeat_interval_ms`,
    /// `max_connections_per_user <= max_connections`, that `tls_cert_file` and
    /// `tls_key_file` are set together, that RS256 and ES256 have a
    /// `jwt_public_key_file`, that HS256 has a `jwt_secret` when a public key file is
    /// given, and that an HS256 `jwt_secret` has at least 16 bytes. Does not touch the
    /// file system.
    ///
    /// # Errors
    /// The first failed check, naming the setting to change.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for setting in Self::SETTINGS {
            let value = setting.value(self);
            if !value.fits(setting.kind) {
                // A row of the table whose type cannot store its kind: caught by any test.
                return Err(ConfigError::Inconsistent {
                    name: setting.name,
                    message: format!("the settings table gives it kind {:?}", setting.kind),
                });
            }
            if let (Some((min, max)), Some(v)) = (setting.kind.bounds(), value.integer()) {
                if !(min..=max).contains(&v) {
                    return Err(invalid_value(
                        setting,
                        &v.to_string(),
                        setting.kind.expected(),
                        Source::Code,
                    ));
                }
            }
            value
                .check_form()
                .map_err(|message| ConfigError::Inconsistent {
                    name: setting.name,
                    message,
                })?;
        }
        if self.admin_listen == Some(self.listen) && self.listen.port() != 0 {
            return Err(ConfigError::Inconsistent {
                name: "admin_listen",
                message: format!(
                    "{} is also listen: give the admin listener its own address",
                    self.listen
                ),
            });
        }
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms {
            return Err(ConfigError::Inconsistent {
                name: "heartbeat_timeout_ms",
                message: format!(
                    "{} must be greater than heartbeat_interval_ms ({})",
                    self.heartbeat_timeout_ms, self.heartbeat_interval_ms
                ),
            });
        }
        if let Some(key) = &self.publish_key {
            if key.len() < MIN_ACCEPTED_SECRET_BYTES {
                return Err(ConfigError::Inconsistent {
                    name: "publish_key",
                    message: format!(
                        "must be at least {MIN_ACCEPTED_SECRET_BYTES} bytes, got {} bytes",
                        key.len()
                    ),
                });
            }
        }
        if let Some(url) = &self.inbound_url {
            check_inbound_url(url).map_err(|message| ConfigError::Inconsistent {
                name: "inbound_url",
                message,
            })?;
            // Dev mode (no JWT key) generates a publish key before the gateway starts.
            if self.inbound_key.is_none() && self.publish_key.is_none() && !self.dev_mode() {
                return Err(ConfigError::Inconsistent {
                    name: "inbound_key",
                    message: "inbound_url needs a key to send: set inbound_key (or publish_key, \
                              its default)"
                        .into(),
                });
            }
        }
        if let Some(key) = &self.inbound_key {
            if key.len() < MIN_ACCEPTED_SECRET_BYTES {
                return Err(ConfigError::Inconsistent {
                    name: "inbound_key",
                    message: format!(
                        "must be at least {MIN_ACCEPTED_SECRET_BYTES} bytes, got {} bytes",
                        key.len()
                    ),
                });
            }
        }
        if self.max_connections_per_user > self.max_connections {
            return Err(ConfigError::Inconsistent {
                name: "max_connections_per_user",
                message: format!(
                    "{} must not exceed max_connections ({})",
                    self.max_connections_per_user, self.max_connections
                ),
            });
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) | (None, Some(_)) => {
                let (name, other) = if self.tls_cert_file.is_some() {
                    ("tls_key_file", "tls_cert_file")
                } else {
                    ("tls_cert_file", "tls_key_file")
                };
                return Err(ConfigError::Inconsistent {
                    name,
                    message: format!("required when {other} is set (TLS needs both)"),
                });
            }
            _ => {}
        }
        match self.jwt_algorithm {
            JwtAlgorithm::Hs256 => {
                if self.jwt_secret.is_none() && self.jwt_public_key_file.is_some() {
                    let message = "HS256 verifies with jwt_secret, but only \
                                   jwt_public_key_file is set; set jwt_algorithm to RS256 or \
                                   ES256, or set jwt_secret";
                    return Err(ConfigError::Inconsistent {
                        name: "jwt_algorithm",
                        message: message.into(),
                    });
                }
                if let Some(secret) = &self.jwt_secret {
                    if secret.len() < MIN_ACCEPTED_SECRET_BYTES {
                        return Err(ConfigError::Inconsistent {
                            name: "jwt_secret",
                            message: format!(
                                "must be at least {MIN_ACCEPTED_SECRET_BYTES} bytes for HS256, got {} bytes",
                                secret.len()
                            ),
                        });
                    }
                }
            }
            alg @ (JwtAlgorithm::Rs256 | JwtAlgorithm::Es256) => {
                if self.jwt_public_key_file.is_none() {
                    return Err(ConfigError::Inconsistent {
                        name: "jwt_public_key_file",
                        message: format!("required when jwt_algorithm is {}", alg.as_str()),
                    });
                }
            }
        }
        if self.engine == EngineKind::Redis {
            self.validate_redis()?;
        }
        Ok(())
    }

    /// The Redis engine's settings: a `redis_url` of one of its forms (a CA file only
    /// with TLS), a prefix, and a `node_id` of at most 64 printable ASCII bytes.
    fn validate_redis(&self) -> Result<(), ConfigError> {
        let bad = |name, message: &str| ConfigError::Inconsistent {
            name,
            message: message.to_owned(),
        };
        match self.redis_url.as_deref() {
            None => return Err(bad("redis_url", "required when engine is redis")),
            Some(url) => {
                let form =
                    crate::engine::redis::parse_url(url).map_err(|e| bad("redis_url", &e))?;
                let (tls, sentinel) = match form {
                    crate::engine::redis::UrlForm::Single { tls } => (tls, false),
                    crate::engine::redis::UrlForm::Sentinel(s) => (s.tls, true),
                };
                if self.redis_sentinel_password.is_some() && !sentinel {
                    return Err(bad(
                        "redis_sentinel_password",
                        "set, but redis_url does not name sentinels (redis+sentinel://)",
                    ));
                }
                if self.redis_tls_ca_file.is_some() && !tls {
                    return Err(bad(
                        "redis_tls_ca_file",
                        "set, but redis_url does not use TLS (rediss:// or rediss+sentinel://)",
                    ));
                }
            }
        }
        if self.redis_prefix.is_none() {
            return Err(bad("redis_prefix", "required when engine is redis"));
        }
        if let Some(node) = self.node_id.as_deref() {
            if node.len() > 64 || !node.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad(
                    "node_id",
                    "expected 1 to 64 printable ASCII characters without spaces",
                ));
            }
        }
        Ok(())
    }

    /// True when no JWT key is configured (no `jwt_secret` and no `jwt_public_key_file`):
    /// dev mode, where the gateway generates a secret at start.
    pub fn dev_mode(&self) -> bool {
        self.jwt_secret.is_none() && self.jwt_public_key_file.is_none()
    }

    /// Whether the demo agent runs: `demo_agent` when set, else [`Config::dev_mode`].
    /// Call it before filling in a generated dev-mode secret.
    pub fn demo_agent_effective(&self) -> bool {
        self.demo_agent.unwrap_or_else(|| self.dev_mode())
    }

    /// Whether the demo page is served: `demo_page` when set, else [`Config::dev_mode`].
    /// Call it before filling in a generated dev-mode secret.
    pub fn demo_page_effective(&self) -> bool {
        self.demo_page.unwrap_or_else(|| self.dev_mode())
    }

    /// The effective configuration for `GET /ws/config`: every setting by its section 8
    /// name with its value, except the secrets (`jwt_secret`, `publish_key`), which are
    /// replaced by `<name>_set` booleans. Addresses, algorithms, policies and paths are
    /// strings, unset optional values null, `allowed_origins` an array, `demo_agent` the
    /// effective boolean passed in.
    pub fn to_public_json(&self, demo_agent_effective: bool) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for setting in Self::SETTINGS {
            let value = setting.value(self);
            if setting.is_secret() {
                let set = serde_json::Value::Bool(value.is_set());
                map.insert(format!("{}_set", setting.name), set);
            } else {
                map.insert(setting.name.into(), value.json());
            }
        }
        // What runs, rather than `auto`.
        map.insert(
            "demo_agent".into(),
            serde_json::Value::Bool(demo_agent_effective),
        );
        serde_json::Value::Object(map)
    }
}

/// The form `inbound_url` must have: `http://` or `https://` (any letter case), a host,
/// and no `user:password@` (the credential is `inbound_key`, and the URL is shown in
/// `GET /ws/config`). The error says what is wrong, never repeating the value.
fn check_inbound_url(url: &str) -> Result<(), String> {
    if !url.contains("://") {
        return Err("must be an absolute URL starting with http:// or https://".into());
    }
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|e| format!("not a valid URL ({e}); expected http://host[:port]/path"))?;
    match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("http" | "https") => {}
        Some(_) => return Err("must start with http:// or https://".into()),
        None => return Err("must be an absolute URL starting with http:// or https://".into()),
    }
    let Some(authority) = uri.authority() else {
        return Err("has no host".into());
    };
    if authority.as_str().contains('@') {
        return Err("must not carry user:password@; the key goes in inbound_key".into());
    }
    if authority.host().is_empty() {
        return Err("has no host".into());
    }
    Ok(())
}
