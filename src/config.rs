//! Gateway configuration: every setting of PROTOCOL.md section 8, its default, its parser
//! and the checks between settings.
//!
//! One table, [`Config::SETTINGS`], describes each setting (name, flag, environment
//! variable, default, meaning, kind). One string parser, [`Config::set`], serves the TOML
//! file, the environment and the command line, so a value means the same thing wherever
//! it comes from and a bad one is reported with the setting's name. [`Config::load`]
//! layers the sources (defaults < file < environment < flags) and then runs
//! [`Config::validate`], which checks the combinations no single value can.
//!
//! Choices this module makes where the protocol is silent:
//! - An empty string unsets an optional setting (`jwt_secret`, `jwt_public_key_file`,
//!   `jwt_issuer`, `jwt_audience`, `publish_key`); `demo_agent` also takes `auto`.
//! - `heartbeat_timeout_ms` left unset by every source is twice `heartbeat_interval_ms`
//!   (section 5), which is 60000 with the default interval; a timeout given alone at or
//!   below the default interval halves the interval instead of failing the start.
//! - Numbers are plain decimal digits within a per-setting range (see [`SettingKind`]);
//!   `replay_events`, `replay_ttl_ms`, `jwt_leeway_s` and `shutdown_grace_ms` may be 0.
//! - Origins are stored lower-cased with the scheme's default port dropped, the way
//!   browsers send them; `*` is refused (leave the list empty to accept any origin).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::auth::JwtAlgorithm;

/// Prefix of the environment variables that carry settings: `AGENTWIRE_<NAME>`.
pub const ENV_PREFIX: &str = "AGENTWIRE_";

/// Environment variable naming the TOML file (the `--config` flag wins over it). Not a
/// setting, so [`Config::load`] skips it without a warning.
pub const ENV_CONFIG_FILE: &str = "AGENTWIRE_CONFIG";

/// Shortest accepted HS256 `jwt_secret`, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// What to do when a user opens one connection more than `max_connections_per_user`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PerUserPolicy {
    /// Close the user's oldest connection with close code 4002 and accept the new one
    /// (`evict_oldest`, the default).
    EvictOldest,
    /// Refuse the new connection with 429 `too_many_connections` (`reject`).
    Reject,
}

impl PerUserPolicy {
    /// The configuration spelling: `evict_oldest` or `reject`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::EvictOldest => "evict_oldest",
            Self::Reject => "reject",
        }
    }
}

impl fmt::Display for PerUserPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PerUserPolicy {
    type Err = String;

    /// Accepts `evict_oldest` and `reject`, case-insensitively, with `-` for `_`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "evict_oldest" => Ok(Self::EvictOldest),
            "reject" => Ok(Self::Reject),
            _ => Err(format!("unknown per-user policy {s:?}")),
        }
    }
}

/// Every setting of PROTOCOL.md section 8. Units are in the field names; build one with
/// [`Config::default`] and [`Config::set`], or with [`Config::load`]. Its `Debug` output
/// shows whether `jwt_secret` and `publish_key` are set, never their values.
#[derive(Clone)]
pub struct Config {
    /// Address to bind. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Algorithm every token must use; any other `alg` is refused. Default HS256.
    pub jwt_algorithm: JwtAlgorithm,
    /// HS256 shared secret, at least 16 bytes. Default none (dev mode when no key at all).
    pub jwt_secret: Option<String>,
    /// PEM public key for RS256/ES256. Default none.
    pub jwt_public_key_file: Option<PathBuf>,
    /// When set, tokens must carry this `iss`. Default none.
    pub jwt_issuer: Option<String>,
    /// When set, tokens must carry this `aud`. Default none.
    pub jwt_audience: Option<String>,
    /// Clock-skew allowance for `exp`/`nbf`, in seconds. Default 5.
    pub jwt_leeway_s: u64,
    /// Accept the token from the `?token=` query parameter. Default true.
    pub allow_query_token: bool,
    /// Exact origins allowed to connect (lower-case, default port dropped). Default empty:
    /// any origin.
    pub allowed_origins: Vec<String>,
    /// Bearer key for `POST /api/events`; without one the endpoint answers 404. Default none.
    pub publish_key: Option<String>,
    /// Open connections in total. Default 10000.
    pub max_connections: usize,
    /// Open connections per user. Default 3.
    pub max_connections_per_user: usize,
    /// What happens when a user exceeds `max_connections_per_user`. Default evict_oldest.
    pub per_user_policy: PerUserPolicy,
    /// Largest client message, in bytes; larger ones close with 1009. Default 65536.
    pub max_message_bytes: usize,
    /// Largest `POST /api/events` body, in bytes; larger ones get 413. Default 1048576.
    pub max_publish_bytes: usize,
    /// Unsent output per connection, in bytes, before it is closed with 1013.
    /// Default 1048576.
    pub max_pending_bytes: usize,
    /// Interval between WebSocket Pings, in milliseconds. Default 30000.
    pub heartbeat_interval_ms: u64,
    /// Silence after which a connection is closed, in milliseconds. Default 60000 (twice the
    /// interval when loaded without an explicit value).
    pub heartbeat_timeout_ms: u64,
    /// Time allowed to finish the HTTP upgrade, in milliseconds. Default 5000.
    pub handshake_timeout_ms: u64,
    /// Events kept per user for resume; 0 disables replay. Default 1024.
    pub replay_events: usize,
    /// How long kept events stay replayable, in milliseconds. Default 120000.
    pub replay_ttl_ms: u64,
    /// A run with no event for this long is ended with `agent_error`, in milliseconds.
    /// Default 300000.
    pub run_idle_timeout_ms: u64,
    /// Runs in progress per user; past it new runs are refused (publish 429
    /// `too_many_runs`, [`crate::EmitError::TooManyRuns`]). Default 256.
    pub max_active_runs_per_user: usize,
    /// Runs in progress over all users; past it new runs are refused as above.
    /// Default 100000.
    pub max_active_runs: usize,
    /// Bytes of kept events per user (the oldest go first). Default 4194304.
    pub replay_bytes_per_user: usize,
    /// Bytes of kept events over all users, plus a fixed overhead per known user
    /// (memory engine); the oldest events go first, then idle users. Default 268435456.
    pub replay_memory_bytes: usize,
    /// Time to flush on shutdown before exiting, in milliseconds. Default 5000.
    pub shutdown_grace_ms: u64,
    /// Built-in demo agent. Default none: auto, on in dev mode (no JWT key configured),
    /// off otherwise; see [`Config::demo_agent_effective`].
    pub demo_agent: Option<bool>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hand-written so a `{:?}` in a log line can never leak a secret.
        let redacted = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("jwt_algorithm", &self.jwt_algorithm)
            .field("jwt_secret", &redacted(&self.jwt_secret))
            .field("jwt_public_key_file", &self.jwt_public_key_file)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("jwt_leeway_s", &self.jwt_leeway_s)
            .field("allow_query_token", &self.allow_query_token)
            .field("allowed_origins", &self.allowed_origins)
            .field("publish_key", &redacted(&self.publish_key))
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_user", &self.max_connections_per_user)
            .field("per_user_policy", &self.per_user_policy)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_publish_bytes", &self.max_publish_bytes)
            .field("max_pending_bytes", &self.max_pending_bytes)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("heartbeat_timeout_ms", &self.heartbeat_timeout_ms)
            .field("handshake_timeout_ms", &self.handshake_timeout_ms)
            .field("replay_events", &self.replay_events)
            .field("replay_ttl_ms", &self.replay_ttl_ms)
            .field("run_idle_timeout_ms", &self.run_idle_timeout_ms)
            .field("max_active_runs_per_user", &self.max_active_runs_per_user)
            .field("max_active_runs", &self.max_active_runs)
            .field("replay_bytes_per_user", &self.replay_bytes_per_user)
            .field("replay_memory_bytes", &self.replay_memory_bytes)
            .field("shutdown_grace_ms", &self.shutdown_grace_ms)
            .field("demo_agent", &self.demo_agent)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080),
            jwt_algorithm: JwtAlgorithm::Hs256,
            jwt_secret: None,
            jwt_public_key_file: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway_s: 5,
            allow_query_token: true,
            allowed_origins: Vec::new(),
            publish_key: None,
            max_connections: 10_000,
            max_connections_per_user: 3,
            per_user_policy: PerUserPolicy::EvictOldest,
            max_message_bytes: 65_536,
            max_publish_bytes: 1_048_576,
            max_pending_bytes: 1_048_576,
            heartbeat_interval_ms: 30_000,
            heartbeat_timeout_ms: 60_000,
            handshake_timeout_ms: 5_000,
            replay_events: 1_024,
            replay_ttl_ms: 120_000,
            run_idle_timeout_ms: 300_000,
            max_active_runs_per_user: 256,
            max_active_runs: 100_000,
            replay_bytes_per_user: 4_194_304,
            replay_memory_bytes: 268_435_456,
            shutdown_grace_ms: 5_000,
            demo_agent: None,
        }
    }
}

/// How a setting's value is written. Drives parsing, error messages and the shape of its
/// command-line flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettingKind {
    /// A socket address, `IP:port` (`localhost:port` means `127.0.0.1:port`).
    Address,
    /// `HS256`, `RS256` or `ES256`, any case.
    Algorithm,
    /// A secret string, taken verbatim and never echoed; empty unsets it.
    Secret,
    /// A file path; empty unsets it.
    Path,
    /// Free text, trimmed; empty unsets it.
    Text,
    /// `true`/`false`, also `1`/`0`, `yes`/`no`, `on`/`off`, any case.
    Bool,
    /// A boolean, or `auto` (also empty) for "decide from the rest of the config".
    AutoBool,
    /// Comma-separated exact origins; empty means any origin.
    Origins,
    /// `evict_oldest` or `reject`.
    Policy,
    /// A decimal integer within `min..=max`.
    Integer {
        /// Smallest accepted value.
        min: u64,
        /// Largest accepted value.
        max: u64,
    },
}

impl SettingKind {
    /// What a valid value looks like, for error messages.
    pub fn expected(&self) -> String {
        match self {
            Self::Address => "expected IP:port, such as 127.0.0.1:8080 or [::]:8080".into(),
            Self::Algorithm => "expected HS256, RS256 or ES256".into(),
            Self::Secret | Self::Path | Self::Text => "expected a string".into(),
            Self::Bool => "expected true or false (also 1/0, yes/no, on/off)".into(),
            Self::AutoBool => "expected true, false or auto".into(),
            Self::Origins => {
                "expected comma-separated origins such as https://app.example.com".into()
            }
            Self::Policy => "expected evict_oldest or reject".into(),
            Self::Integer { min: 0, max } => format!("expected a whole number from 0 to {max}"),
            Self::Integer { min: 1, max } => format!("expected a positive integer up to {max}"),
            Self::Integer { min, max } => format!("expected an integer from {min} to {max}"),
        }
    }
}

/// Which field a [`Setting`] row stands for; private so matches over it stay exhaustive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Listen,
    JwtAlgorithm,
    JwtSecret,
    JwtPublicKeyFile,
    JwtIssuer,
    JwtAudience,
    JwtLeewayS,
    AllowQueryToken,
    AllowedOrigins,
    PublishKey,
    MaxConnections,
    MaxConnectionsPerUser,
    PerUserPolicy,
    MaxMessageBytes,
    MaxPublishBytes,
    MaxPendingBytes,
    HeartbeatIntervalMs,
    HeartbeatTimeoutMs,
    HandshakeTimeoutMs,
    ReplayEvents,
    ReplayTtlMs,
    RunIdleTimeoutMs,
    MaxActiveRunsPerUser,
    MaxActiveRuns,
    ReplayBytesPerUser,
    ReplayMemoryBytes,
    ShutdownGraceMs,
    DemoAgent,
}

/// One row of section 8: a setting's names, default and meaning.
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    /// The section 8 name (snake_case); also the TOML key.
    pub name: &'static str,
    /// The long flag, without `--`: the name with dashes.
    pub flag: &'static str,
    /// The environment variable: `AGENTWIRE_` and the name in upper case.
    pub env: &'static str,
    /// The default, as shown in `--help`.
    pub default: &'static str,
    /// One line saying what the setting does.
    pub help: &'static str,
    /// How the value is written.
    pub kind: SettingKind,
    key: Field,
}

impl Setting {
    /// Placeholder for the value in `--help`.
    pub fn value_name(&self) -> &'static str {
        match self.kind {
            SettingKind::Address => "ADDR",
            SettingKind::Algorithm => "ALG",
            SettingKind::Secret => "SECRET",
            SettingKind::Path => "FILE",
            SettingKind::Text => "TEXT",
            SettingKind::Bool => "BOOL",
            SettingKind::AutoBool => "BOOL|auto",
            SettingKind::Origins => "ORIGINS",
            SettingKind::Policy => "POLICY",
            SettingKind::Integer { .. } => "N",
        }
    }

    /// True for the boolean settings, whose flag may be given bare (`--demo-agent`).
    pub fn is_bool(&self) -> bool {
        matches!(self.kind, SettingKind::Bool | SettingKind::AutoBool)
    }

    /// True for settings whose value must never be shown (`jwt_secret`, `publish_key`).
    pub fn is_secret(&self) -> bool {
        self.kind == SettingKind::Secret
    }
}

const DAY_MS: u64 = 86_400_000;
const GIB: u64 = 1 << 30;

const fn int(min: u64, max: u64) -> SettingKind {
    SettingKind::Integer { min, max }
}

/// Where a value came from, so an error can point at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// [`Config::set`] called directly, or [`Config::validate`] on a built config.
    Code,
    /// A key of the TOML file at this path.
    File(PathBuf),
    /// This environment variable.
    Env(String),
    /// This long flag, without `--`.
    Flag(String),
}

impl Source {
    /// " in config file X" / " from environment variable X" / " from flag --x" / "".
    fn suffix(&self) -> String {
        match self {
            Self::Code => String::new(),
            Self::File(path) => format!(" in config file {}", path.display()),
            Self::Env(var) => format!(" from environment variable {var}"),
            Self::Flag(flag) => format!(" from flag --{flag}"),
        }
    }
}

/// Bad configuration. Every message names the setting (or the unknown key) at fault and,
/// when known, where the value came from; secret values are never included.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that does not parse, or is out of range for its setting. `value` is the
    /// offending value quoted (or `<redacted>` for secrets).
    #[error("invalid value for {name}{}: {value} ({expected})", .origin.suffix())]
    InvalidValue {
        /// The setting.
        name: &'static str,
        /// The value as given, quoted; `<redacted>` for secrets.
        value: String,
        /// What a valid value looks like.
        expected: String,
        /// Where the value came from.
        origin: Source,
    },
    /// A name that is not a setting of section 8: passed to [`Config::set`], a flag name
    /// given to [`Config::load`], or a key of the TOML file.
    #[error(
        "unknown setting {name:?}{}; known settings: {}",
        .origin.suffix(),
        Config::NAMES.join(", ")
    )]
    UnknownSetting {
        /// The name as given.
        name: String,
        /// Where it came from.
        origin: Source,
    },
    /// The config file is not valid TOML.
    #[error("config file {}: invalid TOML: {message}", .path.display())]
    FileSyntax {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message, with line and column.
        message: String,
    },
    /// The config file gives one setting twice, once snake_case and once dashed.
    #[error(
        "config file {}: {name} is given twice, as {first:?} and as {second:?}",
        .path.display()
    )]
    DuplicateKey {
        /// The file.
        path: PathBuf,
        /// The setting.
        name: &'static str,
        /// The first spelling.
        first: String,
        /// The second spelling.
        second: String,
    },
    /// Settings that are each valid but cannot work together; `name` is the setting to
    /// change.
    #[error("invalid {name}: {message}")]
    Inconsistent {
        /// The setting to change.
        name: &'static str,
        /// What is wrong, naming the other settings involved.
        message: String,
    },
}

impl Config {
    /// Names of all settings, in section 8 order (snake_case).
    pub const NAMES: &'static [&'static str] = &[
        "listen",
        "jwt_algorithm",
        "jwt_secret",
        "jwt_public_key_file",
        "jwt_issuer",
        "jwt_audience",
        "jwt_leeway_s",
        "allow_query_token",
        "allowed_origins",
        "publish_key",
        "max_connections",
        "max_connections_per_user",
        "per_user_policy",
        "max_message_bytes",
        "max_publish_bytes",
        "max_pending_bytes",
        "heartbeat_interval_ms",
        "heartbeat_timeout_ms",
        "handshake_timeout_ms",
        "replay_events",
        "replay_ttl_ms",
        "run_idle_timeout_ms",
        "max_active_runs_per_user",
        "max_active_runs",
        "replay_bytes_per_user",
        "replay_memory_bytes",
        "shutdown_grace_ms",
        "demo_agent",
    ];

    /// Every setting with its flag, environment variable, default, meaning and kind, in
    /// section 8 order (the same order as [`Config::NAMES`]).
    pub const SETTINGS: &'static [Setting] = &[
        Setting {
            name: "listen",
            flag: "listen",
            env: "AGENTWIRE_LISTEN",
            default: "127.0.0.1:8080",
            kind: SettingKind::Address,
            help: "Address to bind",
            key: Field::Listen,
        },
        Setting {
            name: "jwt_algorithm",
            flag: "jwt-algorithm",
            env: "AGENTWIRE_JWT_ALGORITHM",
            default: "HS256",
            kind: SettingKind::Algorithm,
            help: "JWT algorithm every token must use: HS256, RS256 or ES256",
            key: Field::JwtAlgorithm,
        },
        Setting {
            name: "jwt_secret",
            flag: "jwt-secret",
            env: "AGENTWIRE_JWT_SECRET",
            default: "none",
            kind: SettingKind::Secret,
            help: "HS256 shared secret, at least 16 bytes; no JWT key at all means dev mode",
            key: Field::JwtSecret,
        },
        Setting {
            name: "jwt_public_key_file",
            flag: "jwt-public-key-file",
            env: "AGENTWIRE_JWT_PUBLIC_KEY_FILE",
            default: "none",
            kind: SettingKind::Path,
            help: "PEM public key file for RS256/ES256",
            key: Field::JwtPublicKeyFile,
        },
        Setting {
            name: "jwt_issuer",
            flag: "jwt-issuer",
            env: "AGENTWIRE_JWT_ISSUER",
            default: "none",
            kind: SettingKind::Text,
            help: "When set, tokens must carry this iss",
            key: Field::JwtIssuer,
        },
        Setting {
            name: "jwt_audience",
            flag: "jwt-audience",
            env: "AGENTWIRE_JWT_AUDIENCE",
            default: "none",
            kind: SettingKind::Text,
            help: "When set, tokens must carry this aud",
            key: Field::JwtAudience,
        },
        Setting {
            name: "jwt_leeway_s",
            flag: "jwt-leeway-s",
            env: "AGENTWIRE_JWT_LEEWAY_S",
            default: "5",
            kind: int(0, 86_400),
            help: "Clock-skew allowance for exp/nbf, in seconds",
            key: Field::JwtLeewayS,
        },
        Setting {
            name: "allow_query_token",
            flag: "allow-query-token",
            env: "AGENTWIRE_ALLOW_QUERY_TOKEN",
            default: "true",
            kind: SettingKind::Bool,
            help: "Accept the token from the ?token= query parameter",
            key: Field::AllowQueryToken,
        },
        Setting {
            name: "allowed_origins",
            flag: "allowed-origins",
            env: "AGENTWIRE_ALLOWED_ORIGINS",
            default: "empty (any origin)",
            kind: SettingKind::Origins,
            help: "Comma-separated exact origins allowed to connect",
            key: Field::AllowedOrigins,
        },
        Setting {
            name: "publish_key",
            flag: "publish-key",
            env: "AGENTWIRE_PUBLISH_KEY",
            default: "none",
            kind: SettingKind::Secret,
            help: "Bearer key that enables POST /api/events",
            key: Field::PublishKey,
        },
        Setting {
            name: "max_connections",
            flag: "max-connections",
            env: "AGENTWIRE_MAX_CONNECTIONS",
            default: "10000",
            kind: int(1, 10_000_000),
            help: "Open connections in total",
            key: Field::MaxConnections,
        },
        Setting {
            name: "max_connections_per_user",
            flag: "max-connections-per-user",
            env: "AGENTWIRE_MAX_CONNECTIONS_PER_USER",
            default: "3",
            kind: int(1, 10_000_000),
            help: "Open connections per user",
            key: Field::MaxConnectionsPerUser,
        },
        Setting {
            name: "per_user_policy",
            flag: "per-user-policy",
            env: "AGENTWIRE_PER_USER_POLICY",
            default: "evict_oldest",
            kind: SettingKind::Policy,
            help: "Over the per-user limit: evict_oldest (close 4002) or reject (429)",
            key: Field::PerUserPolicy,
        },
        Setting {
            name: "max_message_bytes",
            flag: "max-message-bytes",
            env: "AGENTWIRE_MAX_MESSAGE_BYTES",
            default: "65536",
            kind: int(1, GIB),
            help: "Largest client message, in bytes",
            key: Field::MaxMessageBytes,
        },
        Setting {
            name: "max_publish_bytes",
            flag: "max-publish-bytes",
            env: "AGENTWIRE_MAX_PUBLISH_BYTES",
            default: "1048576",
            kind: int(1, GIB),
            help: "Largest publish request body, in bytes",
            key: Field::MaxPublishBytes,
        },
        Setting {
            name: "max_pending_bytes",
            flag: "max-pending-bytes",
            env: "AGENTWIRE_MAX_PENDING_BYTES",
            default: "1048576",
            kind: int(1, GIB),
            help: "Unsent output per connection, in bytes, before it is closed",
            key: Field::MaxPendingBytes,
        },
        Setting {
            name: "heartbeat_interval_ms",
            flag: "heartbeat-interval-ms",
            env: "AGENTWIRE_HEARTBEAT_INTERVAL_MS",
            default: "30000",
            kind: int(1, DAY_MS),
            help: "Interval between WebSocket Pings, in milliseconds",
            key: Field::HeartbeatIntervalMs,
        },
        Setting {
            name: "heartbeat_timeout_ms",
            flag: "heartbeat-timeout-ms",
            env: "AGENTWIRE_HEARTBEAT_TIMEOUT_MS",
            default: "60000 (2 x interval)",
            kind: int(1, 2 * DAY_MS),
            help: "Silence after which a connection is closed, in milliseconds",
            key: Field::HeartbeatTimeoutMs,
        },
        Setting {
            name: "handshake_timeout_ms",
            flag: "handshake-timeout-ms",
            env: "AGENTWIRE_HANDSHAKE_TIMEOUT_MS",
            default: "5000",
            kind: int(1, DAY_MS),
            help: "Time allowed to finish the WebSocket handshake, in milliseconds",
            key: Field::HandshakeTimeoutMs,
        },
        Setting {
            name: "replay_events",
            flag: "replay-events",
            env: "AGENTWIRE_REPLAY_EVENTS",
            default: "1024",
            kind: int(0, 1_000_000),
            help: "Events kept per user for resume (0 disables replay)",
            key: Field::ReplayEvents,
        },
        Setting {
            name: "replay_ttl_ms",
            flag: "replay-ttl-ms",
            env: "AGENTWIRE_REPLAY_TTL_MS",
            default: "120000",
            kind: int(0, 7 * DAY_MS),
            help: "How long kept events stay replayable, in milliseconds",
            key: Field::ReplayTtlMs,
        },
        Setting {
            name: "run_idle_timeout_ms",
            flag: "run-idle-timeout-ms",
            env: "AGENTWIRE_RUN_IDLE_TIMEOUT_MS",
            default: "300000",
            kind: int(1, 7 * DAY_MS),
            help: "A run with no event for this long is ended with agent_error, in milliseconds",
            key: Field::RunIdleTimeoutMs,
        },
        Setting {
            name: "max_active_runs_per_user",
            flag: "max-active-runs-per-user",
            env: "AGENTWIRE_MAX_ACTIVE_RUNS_PER_USER",
            default: "256",
            kind: int(1, 1_000_000),
            help: "Runs in progress per user; past it new runs are refused (429 too_many_runs)",
            key: Field::MaxActiveRunsPerUser,
        },
        Setting {
            name: "max_active_runs",
            flag: "max-active-runs",
            env: "AGENTWIRE_MAX_ACTIVE_RUNS",
            default: "100000",
            kind: int(1, 100_000_000),
            help: "Runs in progress over all users; past it new runs are refused (429 too_many_runs)",
            key: Field::MaxActiveRuns,
        },
        Setting {
            name: "replay_bytes_per_user",
            flag: "replay-bytes-per-user",
            env: "AGENTWIRE_REPLAY_BYTES_PER_USER",
            default: "4194304",
            kind: int(1, 1 << 40),
            help: "Bytes of kept events per user; the oldest go first",
            key: Field::ReplayBytesPerUser,
        },
        Setting {
            name: "replay_memory_bytes",
            flag: "replay-memory-bytes",
            env: "AGENTWIRE_REPLAY_MEMORY_BYTES",
            default: "268435456",
            kind: int(1, 1 << 40),
            help: "Bytes of kept events and known users over all users; the oldest events go first, then idle users",
            key: Field::ReplayMemoryBytes,
        },
        Setting {
            name: "shutdown_grace_ms",
            flag: "shutdown-grace-ms",
            env: "AGENTWIRE_SHUTDOWN_GRACE_MS",
            default: "5000",
            kind: int(0, DAY_MS),
            help: "Time to flush on shutdown before exiting, in milliseconds",
            key: Field::ShutdownGraceMs,
        },
        Setting {
            name: "demo_agent",
            flag: "demo-agent",
            env: "AGENTWIRE_DEMO_AGENT",
            default: "auto (on in dev mode)",
            kind: SettingKind::AutoBool,
            help: "Built-in demo agent answering user_message with a realistic run",
            key: Field::DemoAgent,
        },
    ];

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

    /// Parse `value` for `setting` and store it; errors carry `origin`.
    fn set_from(
        &mut self,
        setting: &Setting,
        value: &str,
        origin: Source,
    ) -> Result<(), ConfigError> {
        let invalid = |expected: String| invalid_value(setting, value, expected, origin.clone());
        match setting.key {
            Field::Listen => self.listen = parse_listen(value).map_err(invalid)?,
            Field::JwtAlgorithm => {
                self.jwt_algorithm = value
                    .trim()
                    .parse::<JwtAlgorithm>()
                    .map_err(|_| invalid(setting.kind.expected()))?;
            }
            Field::JwtSecret => self.jwt_secret = optional_verbatim(value),
            Field::JwtPublicKeyFile => {
                self.jwt_public_key_file = optional_trimmed(value).map(PathBuf::from)
            }
            Field::JwtIssuer => self.jwt_issuer = optional_trimmed(value),
            Field::JwtAudience => self.jwt_audience = optional_trimmed(value),
            Field::JwtLeewayS => {
                self.jwt_leeway_s = parse_integer(setting.kind, value).map_err(invalid)?
            }
            Field::AllowQueryToken => {
                self.allow_query_token =
                    parse_bool(value).ok_or_else(|| invalid(setting.kind.expected()))?
            }
            Field::AllowedOrigins => {
                self.allowed_origins = parse_origin_list(value.split(',')).map_err(invalid)?
            }
            Field::PublishKey => self.publish_key = optional_verbatim(value),
            Field::MaxConnections => {
                self.max_connections = parse_usize(setting.kind, value).map_err(invalid)?
            }
            Field::MaxConnectionsPerUser => {
                self.max_connections_per_user =
                    parse_usize(setting.kind, value).map_err(invalid)?;
            }
            Field::PerUserPolicy => {
                self.per_user_policy = value
                    .parse::<PerUserPolicy>()
                    .map_err(|_| invalid(setting.kind.expected()))?;
            }
            Field::MaxMessageBytes => {
                self.max_message_bytes = parse_usize(setting.kind, value).map_err(invalid)?
            }
            Field::MaxPublishBytes => {
                self.max_publish_bytes = parse_usize(setting.kind, value).map_err(invalid)?
            }
            Field::MaxPendingBytes => {
                self.max_pending_bytes = parse_usize(setting.kind, value).map_err(invalid)?
            }
            Field::HeartbeatIntervalMs => {
                self.heartbeat_interval_ms = parse_integer(setting.kind, value).map_err(invalid)?
            }
            Field::HeartbeatTimeoutMs => {
                self.heartbeat_timeout_ms = parse_integer(setting.kind, value).map_err(invalid)?
            }
            Field::HandshakeTimeoutMs => {
                self.handshake_timeout_ms = parse_integer(setting.kind, value).map_err(invalid)?
            }
            Field::ReplayEvents => {
                self.replay_events = parse_usize(setting.kind, value).map_err(invalid)?
            }
            Field::ReplayTtlMs => {
                self.replay_ttl_ms = parse_integer(setting.kind, value).map_err(invalid)?
            }
            Field::RunIdleTimeoutMs => {
                self.run_idle_timeout_ms = parse_integer(setting.kind, value).map_err(invalid)?
            }
            Field::MaxActiveRunsPerUser => {
                self.max_active_runs_per_user = parse_usize(setting.kind, value).map_err(invalid)?
            }
            Field::MaxActiveRuns => {
                self.max_active_runs = parse_usize(setting.kind, value).map_err(invalid)?
            }
            Field::ReplayBytesPerUser => {
                self.replay_bytes_per_user = parse_usize(setting.kind, value).map_err(invalid)?
            }
            Field::ReplayMemoryBytes => {
                self.replay_memory_bytes = parse_usize(setting.kind, value).map_err(invalid)?
            }
            Field::ShutdownGraceMs => {
                self.shutdown_grace_ms = parse_integer(setting.kind, value).map_err(invalid)?
            }
            Field::DemoAgent => {
                let v = value.trim();
                self.demo_agent = if v.is_empty() || v.eq_ignore_ascii_case("auto") {
                    None
                } else {
                    Some(parse_bool(v).ok_or_else(|| invalid(setting.kind.expected()))?)
                };
            }
        }
        Ok(())
    }

    /// Build the configuration from its layers, lowest to highest: defaults < TOML file <
    /// environment `AGENTWIRE_<NAME>` < flags; then [`Config::validate`] it.
    ///
    /// - `file`: the path (for messages) and contents of the TOML file. Top-level keys are
    ///   setting names, snake_case or dashed; values are strings, integers or booleans,
    ///   and `allowed_origins` may also be an array of strings.
    /// - `env`: the process environment. Only upper-case `AGENTWIRE_<NAME>` variables are
    ///   read; other `AGENTWIRE_*` variables (except [`ENV_CONFIG_FILE`]) are ignored with a
    ///   warning.
    /// - `flags`: `(name, value)` pairs, name snake_case or dashed.
    ///
    /// When no layer sets `heartbeat_timeout_ms`, it becomes twice `heartbeat_interval_ms`
    /// (section 5); when only the timeout is set and the default interval is not below it,
    /// the interval becomes half the timeout.
    /// Warnings (ignored variables, settings that the chosen algorithm ignores) are
    /// returned for the caller to log; they never contain values.
    ///
    /// # Errors
    /// The first bad value, unknown file key or flag, TOML syntax error, or failed
    /// cross-field check.
    pub fn load(
        file: Option<(&Path, &str)>,
        env: &[(String, String)],
        flags: &[(String, String)],
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let mut config = Config::default();
        let mut warnings = Vec::new();
        let mut given: Vec<Field> = Vec::new();

        if let Some((path, text)) = file {
            given.extend(config.apply_file(path, text)?);
        }
        for (var, value) in env {
            if !var.starts_with(ENV_PREFIX) || var == ENV_CONFIG_FILE {
                continue;
            }
            match Self::SETTINGS.iter().find(|s| s.env == var) {
                Some(setting) => {
                    config.set_from(setting, value, Source::Env(var.clone()))?;
                    given.push(setting.key);
                }
                None => {
                    let upper = var.to_ascii_uppercase();
                    let hint = match Self::SETTINGS.iter().find(|s| s.env == upper) {
                        Some(s) => format!(" (did you mean {}?)", s.env),
                        None => String::new(),
                    };
                    warnings.push(format!(
                        "ignoring environment variable {var}: not an agentwire setting{hint}"
                    ));
                }
            }
        }
        for (name, value) in flags {
            let setting = Self::setting(name).ok_or_else(|| ConfigError::UnknownSetting {
                name: name.clone(),
                origin: Source::Flag(name.replace('_', "-")),
            })?;
            config.set_from(setting, value, Source::Flag(setting.flag.to_owned()))?;
            given.push(setting.key);
        }
        config.derive_heartbeat(
            given.contains(&Field::HeartbeatIntervalMs),
            given.contains(&Field::HeartbeatTimeoutMs),
        );

        config.validate()?;
        match config.jwt_algorithm {
            JwtAlgorithm::Hs256 => {
                if config.jwt_public_key_file.is_some() {
                    warnings.push(
                        "jwt_public_key_file is ignored: HS256 verifies with jwt_secret".into(),
                    );
                }
            }
            alg @ (JwtAlgorithm::Rs256 | JwtAlgorithm::Es256) => {
                if config.jwt_secret.is_some() {
                    warnings.push(format!(
                        "jwt_secret is ignored: jwt_algorithm {} verifies with jwt_public_key_file",
                        alg.as_str()
                    ));
                }
            }
        }
        Ok((config, warnings))
    }

    /// Fill in the heartbeat setting no source gave from the one that was given, so that
    /// setting either alone cannot fail the `timeout > interval` check: the timeout
    /// defaults to twice the interval (section 5); an interval left at its default that is
    /// not below a given timeout becomes half of it.
    fn derive_heartbeat(&mut self, interval_given: bool, timeout_given: bool) {
        if !timeout_given {
            self.heartbeat_timeout_ms = self.heartbeat_interval_ms.saturating_mul(2);
        } else if !interval_given && self.heartbeat_interval_ms >= self.heartbeat_timeout_ms {
            self.heartbeat_interval_ms = (self.heartbeat_timeout_ms / 2).max(1);
        }
    }

    /// Apply the TOML file; returns the settings it gave.
    fn apply_file(&mut self, path: &Path, text: &str) -> Result<Vec<Field>, ConfigError> {
        let table = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::FileSyntax {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let origin = Source::File(path.to_path_buf());
        let mut seen: Vec<(Field, &str)> = Vec::with_capacity(table.len());
        for (key, value) in &table {
            let setting = Self::setting(key).ok_or_else(|| ConfigError::UnknownSetting {
                name: key.clone(),
                origin: origin.clone(),
            })?;
            if let Some((_, first)) = seen.iter().find(|(k, _)| *k == setting.key) {
                return Err(ConfigError::DuplicateKey {
                    path: path.to_path_buf(),
                    name: setting.name,
                    first: (*first).to_owned(),
                    second: key.clone(),
                });
            }
            seen.push((setting.key, key.as_str()));
            match value {
                toml::Value::String(s) => self.set_from(setting, s, origin.clone())?,
                toml::Value::Integer(i) => {
                    self.set_from(setting, &i.to_string(), origin.clone())?
                }
                toml::Value::Boolean(b) => {
                    self.set_from(setting, if *b { "true" } else { "false" }, origin.clone())?
                }
                toml::Value::Array(items) if setting.key == Field::AllowedOrigins => {
                    let mut strings = Vec::with_capacity(items.len());
                    for item in items {
                        match item {
                            toml::Value::String(s) => strings.push(s.as_str()),
                            other => {
                                return Err(invalid_value(
                                    setting,
                                    &other.to_string(),
                                    "expected an array of origin strings".into(),
                                    origin.clone(),
                                ))
                            }
                        }
                    }
                    self.allowed_origins =
                        parse_origin_list(strings.into_iter()).map_err(|expected| {
                            invalid_value(setting, &value.to_string(), expected, origin.clone())
                        })?;
                }
                other => {
                    let expected = match setting.kind {
                        SettingKind::Origins => format!(
                            "{}, as a string or an array of strings",
                            setting.kind.expected()
                        ),
                        kind => kind.expected(),
                    };
                    return Err(invalid_value(
                        setting,
                        &other.to_string(),
                        expected,
                        origin.clone(),
                    ));
                }
            }
        }
        Ok(seen.into_iter().map(|(field, _)| field).collect())
    }

    /// Cross-field and range checks; a config from [`Config::load`] has passed them.
    ///
    /// Checks every number against its setting's range (so limits that make no sense at 0
    /// are at least 1), the form of `allowed_origins`, `heartbeat_timeout_ms >
    /// heartbeat_interval_ms`, `max_connections_per_user <= max_connections`, that RS256
    /// and ES256 have a `jwt_public_key_file`, that HS256 has a `jwt_secret` when a public
    /// key file is given, that an HS256 `jwt_secret` has at least 16 bytes, and that no
    /// optional string is set to the empty string. Does not touch the file system.
    ///
    /// # Errors
    /// The first failed check, naming the setting to change.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for setting in Self::SETTINGS {
            if let (SettingKind::Integer { min, max }, Some(v)) =
                (setting.kind, self.integer(setting.key))
            {
                if v < min || v > max {
                    return Err(invalid_value(
                        setting,
                        &v.to_string(),
                        setting.kind.expected(),
                        Source::Code,
                    ));
                }
            }
        }
        for origin in &self.allowed_origins {
            match parse_origin(origin) {
                Ok(Some(normal)) if normal == *origin => {}
                Ok(_) => {
                    let why = "expected lower case, no default port, no blanks";
                    return Err(ConfigError::Inconsistent {
                        name: "allowed_origins",
                        message: format!("{origin:?} is not in normal form: {why}"),
                    });
                }
                Err(expected) => {
                    return Err(ConfigError::Inconsistent {
                        name: "allowed_origins",
                        message: expected,
                    })
                }
            }
        }
        let empty = |name: &'static str| ConfigError::Inconsistent {
            name,
            message: "must not be empty; leave it unset instead".into(),
        };
        if self.jwt_issuer.as_deref() == Some("") {
            return Err(empty("jwt_issuer"));
        }
        if self.jwt_audience.as_deref() == Some("") {
            return Err(empty("jwt_audience"));
        }
        if self.publish_key.as_deref() == Some("") {
            return Err(empty("publish_key"));
        }
        if self.jwt_public_key_file.as_deref() == Some(Path::new("")) {
            return Err(empty("jwt_public_key_file"));
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
        if self.max_connections_per_user > self.max_connections {
            return Err(ConfigError::Inconsistent {
                name: "max_connections_per_user",
                message: format!(
                    "{} must not exceed max_connections ({})",
                    self.max_connections_per_user, self.max_connections
                ),
            });
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
                    if secret.len() < MIN_SECRET_BYTES {
                        return Err(ConfigError::Inconsistent {
                            name: "jwt_secret",
                            message: format!(
                                "must be at least {MIN_SECRET_BYTES} bytes for HS256, got {} bytes",
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

    /// The effective configuration for `GET /ws/config`: every setting by its section 8
    /// name with its value, except the secrets `jwt_secret` and `publish_key`, which are
    /// replaced by `jwt_secret_set` and `publish_key_set` booleans. `listen` and
    /// `jwt_public_key_file` are strings (the latter or null), `allowed_origins` an array,
    /// `demo_agent` the effective boolean passed in.
    pub fn to_public_json(&self, demo_agent_effective: bool) -> serde_json::Value {
        use serde_json::Value;
        let opt = |s: &Option<String>| s.as_ref().map_or(Value::Null, |s| Value::String(s.clone()));
        let mut map = serde_json::Map::new();
        for setting in Self::SETTINGS {
            let value = match setting.key {
                Field::Listen => Value::String(self.listen.to_string()),
                Field::JwtAlgorithm => Value::String(self.jwt_algorithm.as_str().into()),
                Field::JwtSecret => {
                    map.insert(
                        "jwt_secret_set".into(),
                        Value::Bool(self.jwt_secret.is_some()),
                    );
                    continue;
                }
                Field::JwtPublicKeyFile => self
                    .jwt_public_key_file
                    .as_ref()
                    .map_or(Value::Null, |p| Value::String(p.display().to_string())),
                Field::JwtIssuer => opt(&self.jwt_issuer),
                Field::JwtAudience => opt(&self.jwt_audience),
                Field::AllowQueryToken => Value::Bool(self.allow_query_token),
                Field::AllowedOrigins => Value::Array(
                    self.allowed_origins
                        .iter()
                        .cloned()
                        .map(Value::String)
                        .collect(),
                ),
                Field::PublishKey => {
                    map.insert(
                        "publish_key_set".into(),
                        Value::Bool(self.publish_key.is_some()),
                    );
                    continue;
                }
                Field::PerUserPolicy => Value::String(self.per_user_policy.as_str().into()),
                Field::DemoAgent => Value::Bool(demo_agent_effective),
                Field::JwtLeewayS
                | Field::MaxConnections
                | Field::MaxConnectionsPerUser
                | Field::MaxMessageBytes
                | Field::MaxPublishBytes
                | Field::MaxPendingBytes
                | Field::HeartbeatIntervalMs
                | Field::HeartbeatTimeoutMs
                | Field::HandshakeTimeoutMs
                | Field::ReplayEvents
                | Field::ReplayTtlMs
                | Field::RunIdleTimeoutMs
                | Field::MaxActiveRunsPerUser
                | Field::MaxActiveRuns
                | Field::ReplayBytesPerUser
                | Field::ReplayMemoryBytes
                | Field::ShutdownGraceMs => {
                    self.integer(setting.key).map_or(Value::Null, Value::from)
                }
            };
            map.insert(setting.name.into(), value);
        }
        Value::Object(map)
    }

    /// The value of an integer setting; `None` for the others.
    fn integer(&self, key: Field) -> Option<u64> {
        let wide = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        match key {
            Field::JwtLeewayS => Some(self.jwt_leeway_s),
            Field::MaxConnections => Some(wide(self.max_connections)),
            Field::MaxConnectionsPerUser => Some(wide(self.max_connections_per_user)),
            Field::MaxMessageBytes => Some(wide(self.max_message_bytes)),
            Field::MaxPublishBytes => Some(wide(self.max_publish_bytes)),
            Field::MaxPendingBytes => Some(wide(self.max_pending_bytes)),
            Field::HeartbeatIntervalMs => Some(self.heartbeat_interval_ms),
            Field::HeartbeatTimeoutMs => Some(self.heartbeat_timeout_ms),
            Field::HandshakeTimeoutMs => Some(self.handshake_timeout_ms),
            Field::ReplayEvents => Some(wide(self.replay_events)),
            Field::ReplayTtlMs => Some(self.replay_ttl_ms),
            Field::RunIdleTimeoutMs => Some(self.run_idle_timeout_ms),
            Field::MaxActiveRunsPerUser => Some(wide(self.max_active_runs_per_user)),
            Field::MaxActiveRuns => Some(wide(self.max_active_runs)),
            Field::ReplayBytesPerUser => Some(wide(self.replay_bytes_per_user)),
            Field::ReplayMemoryBytes => Some(wide(self.replay_memory_bytes)),
            Field::ShutdownGraceMs => Some(self.shutdown_grace_ms),
            Field::Listen
            | Field::JwtAlgorithm
            | Field::JwtSecret
            | Field::JwtPublicKeyFile
            | Field::JwtIssuer
            | Field::JwtAudience
            | Field::AllowQueryToken
            | Field::AllowedOrigins
            | Field::PublishKey
            | Field::PerUserPolicy
            | Field::DemoAgent => None,
        }
    }
}

/// An [`ConfigError::InvalidValue`] for `setting`, with the value quoted or redacted.
fn invalid_value(setting: &Setting, value: &str, expected: String, origin: Source) -> ConfigError {
    let value = if setting.is_secret() {
        "<redacted>".to_owned()
    } else {
        format!("{value:?}")
    };
    ConfigError::InvalidValue {
        name: setting.name,
        value,
        expected,
        origin,
    }
}

fn optional_verbatim(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

fn optional_trimmed(value: &str) -> Option<String> {
    let value = value.trim();
    (!value.is_empty()).then(|| value.to_owned())
}

/// `IP:port`, `[v6]:port`, or `localhost:port` (127.0.0.1).
fn parse_listen(value: &str) -> Result<SocketAddr, String> {
    let value = value.trim();
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let port = value
        .strip_prefix("localhost:")
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|p| p.parse::<u16>().ok());
    match port {
        Some(port) => Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)),
        None => Err(SettingKind::Address.expected()),
    }
}

/// true/false/1/0/yes/no/on/off, any case, surrounding blanks ignored.
fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Plain decimal digits (no sign, no separators) within the kind's range.
fn parse_integer(kind: SettingKind, value: &str) -> Result<u64, String> {
    let value = value.trim();
    let (min, max) = match kind {
        SettingKind::Integer { min, max } => (min, max),
        other => return Err(other.expected()),
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(kind.expected());
    }
    // Digits only, so the one failure left is overflow: out of range like any other.
    match value.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(kind.expected()),
    }
}

fn parse_usize(kind: SettingKind, value: &str) -> Result<usize, String> {
    let n = parse_integer(kind, value)?;
    usize::try_from(n).map_err(|_| kind.expected())
}

/// Parse each item as an origin; blank items are skipped and duplicates dropped.
fn parse_origin_list<'a>(items: impl Iterator<Item = &'a str>) -> Result<Vec<String>, String> {
    let mut origins: Vec<String> = Vec::new();
    for item in items {
        if let Some(origin) = parse_origin(item)? {
            if !origins.contains(&origin) {
                origins.push(origin);
            }
        }
    }
    Ok(origins)
}

/// One origin, `scheme://host[:port]`, normalized as browsers send it: lower case, the
/// scheme's default port dropped. `Ok(None)` for a blank item.
fn parse_origin(item: &str) -> Result<Option<String>, String> {
    let item = item.trim();
    if item.is_empty() {
        return Ok(None);
    }
    let not_origin = |why: &str| format!("{item:?} is not an origin: {why}");
    if item == "*" {
        return Err(not_origin(
            "leave allowed_origins empty to accept any origin",
        ));
    }
    let lower = item.to_ascii_lowercase();
    let (scheme, rest) = lower.split_once("://").ok_or_else(|| {
        not_origin("expected scheme://host[:port], such as https://app.example.com")
    })?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return Err(not_origin("bad scheme"));
    }
    if rest
        .chars()
        .any(|c| matches!(c, '/' | '?' | '#' | '@' | '\\') || c.is_whitespace() || c.is_control())
    {
        return Err(not_origin(
            "an origin has no path, query, user info or trailing slash",
        ));
    }
    let (host, port) = if let Some(after) = rest.strip_prefix('[') {
        let (inside, tail) = after
            .split_once(']')
            .ok_or_else(|| not_origin("unclosed [ in IPv6 host"))?;
        if inside.is_empty()
            || !inside
                .chars()
                .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '.'))
        {
            return Err(not_origin("bad IPv6 host"));
        }
        let port = match tail {
            "" => None,
            t => Some(
                t.strip_prefix(':')
                    .ok_or_else(|| not_origin("unexpected text after ]"))?,
            ),
        };
        (format!("[{inside}]"), port)
    } else {
        let (host, port) = match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        };
        if host.is_empty() || host.contains(['[', ']']) {
            return Err(not_origin("missing or bad host"));
        }
        (host.to_owned(), port)
    };
    let port = match port {
        None => None,
        Some(p) => {
            let n = if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                None
            } else {
                p.parse::<u16>().ok().filter(|n| *n != 0)
            };
            Some(n.ok_or_else(|| not_origin("bad port"))?)
        }
    };
    let default_port = match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    };
    Ok(Some(match port {
        Some(p) if Some(p) != default_port => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const SECRET: &str = "0123456789abcdef-secret";

    /// A value (other than the default) for each setting, in string form, and a check.
    fn sample(name: &str) -> &'static str {
        match name {
            "listen" => "0.0.0.0:9000",
            "jwt_algorithm" => "es256",
            "jwt_secret" => SECRET,
            "jwt_public_key_file" => "/etc/agentwire/key.pem",
            "jwt_issuer" => "https://issuer.example",
            "jwt_audience" => "agentwire",
            "jwt_leeway_s" => "7",
            "allow_query_token" => "false",
            "allowed_origins" => "http://a.example, http://b.example:8080",
            "publish_key" => "pub-key-value",
            "max_connections" => "500",
            "max_connections_per_user" => "9",
            "per_user_policy" => "reject",
            "max_message_bytes" => "1000",
            "max_publish_bytes" => "2000",
            "max_pending_bytes" => "3000",
            "heartbeat_interval_ms" => "1000",
            "heartbeat_timeout_ms" => "2500",
            "handshake_timeout_ms" => "700",
            "replay_events" => "16",
            "replay_ttl_ms" => "121000",
            "run_idle_timeout_ms" => "9000",
            "max_active_runs_per_user" => "17",
            "max_active_runs" => "1700",
            "replay_bytes_per_user" => "70000",
            "replay_memory_bytes" => "7000000",
            "shutdown_grace_ms" => "0",
            "demo_agent" => "true",
            _ => "",
        }
    }

    /// Asserts that `config` holds `sample(name)` for `name` (and only checks that one).
    fn assert_sample(config: &Config, name: &str) {
        let c = config;
        match name {
            "listen" => assert_eq!(c.listen, "0.0.0.0:9000".parse::<SocketAddr>().unwrap()),
            "jwt_algorithm" => assert_eq!(c.jwt_algorithm, JwtAlgorithm::Es256),
            "jwt_secret" => assert_eq!(c.jwt_secret.as_deref(), Some(SECRET)),
            "jwt_public_key_file" => {
                assert_eq!(
                    c.jwt_public_key_file.as_deref(),
                    Some(Path::new("/etc/agentwire/key.pem"))
                )
            }
            "jwt_issuer" => assert_eq!(c.jwt_issuer.as_deref(), Some("https://issuer.example")),
            "jwt_audience" => assert_eq!(c.jwt_audience.as_deref(), Some("agentwire")),
            "jwt_leeway_s" => assert_eq!(c.jwt_leeway_s, 7),
            "allow_query_token" => assert!(!c.allow_query_token),
            "allowed_origins" => assert_eq!(
                c.allowed_origins,
                ["http://a.example", "http://b.example:8080"]
            ),
            "publish_key" => assert_eq!(c.publish_key.as_deref(), Some("pub-key-value")),
            "max_connections" => assert_eq!(c.max_connections, 500),
            "max_connections_per_user" => assert_eq!(c.max_connections_per_user, 9),
            "per_user_policy" => assert_eq!(c.per_user_policy, PerUserPolicy::Reject),
            "max_message_bytes" => assert_eq!(c.max_message_bytes, 1000),
            "max_publish_bytes" => assert_eq!(c.max_publish_bytes, 2000),
            "max_pending_bytes" => assert_eq!(c.max_pending_bytes, 3000),
            "heartbeat_interval_ms" => assert_eq!(c.heartbeat_interval_ms, 1000),
            "heartbeat_timeout_ms" => assert_eq!(c.heartbeat_timeout_ms, 2500),
            "handshake_timeout_ms" => assert_eq!(c.handshake_timeout_ms, 700),
            "replay_events" => assert_eq!(c.replay_events, 16),
            "replay_ttl_ms" => assert_eq!(c.replay_ttl_ms, 121_000),
            "run_idle_timeout_ms" => assert_eq!(c.run_idle_timeout_ms, 9000),
            "max_active_runs_per_user" => assert_eq!(c.max_active_runs_per_user, 17),
            "max_active_runs" => assert_eq!(c.max_active_runs, 1700),
            "replay_bytes_per_user" => assert_eq!(c.replay_bytes_per_user, 70_000),
            "replay_memory_bytes" => assert_eq!(c.replay_memory_bytes, 7_000_000),
            "shutdown_grace_ms" => assert_eq!(c.shutdown_grace_ms, 0),
            "demo_agent" => assert_eq!(c.demo_agent, Some(true)),
            other => panic!("no sample for {other}"),
        }
    }

    /// Settings a lone sample would fail validation for, and what makes it valid.
    fn companions(name: &str) -> Vec<(&'static str, &'static str)> {
        match name {
            "jwt_algorithm" => vec![("jwt_public_key_file", "/etc/agentwire/key.pem")],
            "jwt_public_key_file" => vec![("jwt_algorithm", "RS256")],
            _ => vec![],
        }
    }

    #[test]
    fn names_match_settings_table() {
        let names: Vec<&str> = Config::SETTINGS.iter().map(|s| s.name).collect();
        assert_eq!(names, Config::NAMES);
        for s in Config::SETTINGS {
            assert_eq!(s.flag, s.name.replace('_', "-"));
            assert_eq!(s.env, format!("AGENTWIRE_{}", s.name.to_ascii_uppercase()));
            assert!(!s.help.is_empty() && !s.default.is_empty());
        }
        assert_eq!(Config::NAMES.len(), 28);
    }

    #[test]
    fn defaults_equal_section_8() {
        let c = Config::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.jwt_algorithm, JwtAlgorithm::Hs256);
        assert_eq!(c.jwt_secret, None);
        assert_eq!(c.jwt_public_key_file, None);
        assert_eq!(c.jwt_issuer, None);
        assert_eq!(c.jwt_audience, None);
        assert_eq!(c.jwt_leeway_s, 5);
        assert!(c.allow_query_token);
        assert!(c.allowed_origins.is_empty());
        assert_eq!(c.publish_key, None);
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.max_connections_per_user, 3);
        assert_eq!(c.per_user_policy, PerUserPolicy::EvictOldest);
        assert_eq!(c.max_message_bytes, 65_536);
        assert_eq!(c.max_publish_bytes, 1_048_576);
        assert_eq!(c.max_pending_bytes, 1_048_576);
        assert_eq!(c.heartbeat_interval_ms, 30_000);
        assert_eq!(c.heartbeat_timeout_ms, 60_000);
        assert_eq!(c.handshake_timeout_ms, 5_000);
        assert_eq!(c.replay_events, 1_024);
        assert_eq!(c.replay_ttl_ms, 120_000);
        assert_eq!(c.run_idle_timeout_ms, 300_000);
        assert_eq!(c.max_active_runs_per_user, 256);
        assert_eq!(c.max_active_runs, 100_000);
        assert_eq!(c.replay_bytes_per_user, 4_194_304);
        assert_eq!(c.replay_memory_bytes, 268_435_456);
        assert_eq!(c.shutdown_grace_ms, 5_000);
        assert_eq!(c.demo_agent, None);
        assert!(c.dev_mode());
        assert!(c.demo_agent_effective());
        c.validate().unwrap();

        // Loading nothing gives the same, including the derived heartbeat timeout.
        let (loaded, warnings) = Config::load(None, &[], &[]).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(format!("{loaded:?}"), format!("{c:?}"));
    }

    #[test]
    fn every_setting_from_set_flag_env_and_file() {
        for s in Config::SETTINGS {
            let value = sample(s.name);
            assert!(!value.is_empty(), "sample for {}", s.name);
            let extra = companions(s.name);
            let extra_flags: Vec<(String, String)> = extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();

            let mut direct = Config::default();
            direct.set(s.name, value).unwrap();
            assert_sample(&direct, s.name);

            let mut flags = extra_flags.clone();
            flags.push((s.name.to_owned(), value.to_owned()));
            let (c, _) =
                Config::load(None, &[], &flags).unwrap_or_else(|e| panic!("flag {}: {e}", s.name));
            assert_sample(&c, s.name);

            let (c, _) = Config::load(None, &env(&[(s.env, value)]), &extra_flags)
                .unwrap_or_else(|e| panic!("env {}: {e}", s.name));
            assert_sample(&c, s.name);

            let toml = format!("{} = {}\n", s.name, toml::Value::String(value.to_owned()));
            let (c, _) = Config::load(Some((Path::new("a.toml"), &toml)), &[], &extra_flags)
                .unwrap_or_else(|e| panic!("file {}: {e}", s.name));
            assert_sample(&c, s.name);
        }
    }

    #[test]
    fn file_takes_native_toml_types_and_dashed_names() {
        let text = r#"
            max-connections = 500
            max_connections_per_user = 9
            allow-query-token = false
            demo_agent = true
            allowed_origins = ["http://a.example", "HTTP://B.example:8080"]
            per-user-policy = "reject"
            replay_ttl_ms = 121000
        "#;
        let (c, _) = Config::load(Some((Path::new("a.toml"), text)), &[], &[]).unwrap();
        for name in [
            "max_connections",
            "max_connections_per_user",
            "allow_query_token",
            "demo_agent",
            "allowed_origins",
            "per_user_policy",
            "replay_ttl_ms",
        ] {
            assert_sample(&c, name);
        }
    }

    #[test]
    fn file_giving_one_setting_twice_is_an_error() {
        let text = "max-connections = 5\nmax_connections = 6\n";
        let err = Config::load(Some((Path::new("a.toml"), text)), &[], &[]).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::DuplicateKey {
                    name: "max_connections",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn precedence_flags_over_env_over_file_over_defaults() {
        let file = "max_connections = 100\nmax_connections_per_user = 5\n\
                    replay_events = 7\nlisten = \"0.0.0.0:1\"\n";
        let env = env(&[
            ("AGENTWIRE_MAX_CONNECTIONS", "200"),
            ("AGENTWIRE_MAX_CONNECTIONS_PER_USER", "6"),
        ]);
        let flags = vec![("max_connections".to_owned(), "300".to_owned())];
        let (c, _) = Config::load(Some((Path::new("a.toml"), file)), &env, &flags).unwrap();
        assert_eq!(c.max_connections, 300, "flag beats env and file");
        assert_eq!(c.max_connections_per_user, 6, "env beats file");
        assert_eq!(c.replay_events, 7, "file beats default");
        assert_eq!(c.listen.to_string(), "0.0.0.0:1", "file beats default");
        assert_eq!(c.handshake_timeout_ms, 5_000, "default when nobody sets it");
    }

    #[test]
    fn env_can_unset_an_optional_setting_from_the_file() {
        let file = format!("jwt_secret = \"{SECRET}\"\n");
        let (c, _) = Config::load(
            Some((Path::new("a.toml"), &file)),
            &env(&[("AGENTWIRE_JWT_SECRET", "")]),
            &[],
        )
        .unwrap();
        assert_eq!(c.jwt_secret, None);
        assert!(c.dev_mode());
    }

    #[test]
    fn heartbeat_timeout_defaults_to_twice_the_interval() {
        let flags = vec![("heartbeat_interval_ms".to_owned(), "40000".to_owned())];
        let (c, _) = Config::load(None, &[], &flags).unwrap();
        assert_eq!(c.heartbeat_timeout_ms, 80_000);
        let flags = vec![
            ("heartbeat_interval_ms".to_owned(), "40000".to_owned()),
            ("heartbeat_timeout_ms".to_owned(), "45000".to_owned()),
        ];
        let (c, _) = Config::load(None, &[], &flags).unwrap();
        assert_eq!(c.heartbeat_timeout_ms, 45_000);
        // Only a short timeout: the default interval would not fit under it, so it halves.
        let flags = vec![("heartbeat_timeout_ms".to_owned(), "1000".to_owned())];
        let (c, _) = Config::load(None, &[], &flags).unwrap();
        assert_eq!(
            (c.heartbeat_interval_ms, c.heartbeat_timeout_ms),
            (500, 1000)
        );
        // Only a long timeout: the default interval stays.
        let flags = vec![("heartbeat_timeout_ms".to_owned(), "90000".to_owned())];
        let (c, _) = Config::load(None, &[], &flags).unwrap();
        assert_eq!(
            (c.heartbeat_interval_ms, c.heartbeat_timeout_ms),
            (30_000, 90_000)
        );
        // Both given and inconsistent: an error naming the timeout.
        let flags = vec![
            ("heartbeat_interval_ms".to_owned(), "5000".to_owned()),
            ("heartbeat_timeout_ms".to_owned(), "5000".to_owned()),
        ];
        let err = Config::load(None, &[], &flags).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid heartbeat_timeout_ms: "),
            "{err}"
        );
    }

    #[test]
    fn bad_number_names_the_setting() {
        let mut c = Config::default();
        for bad in [
            "abc",
            "-5",
            "",
            "1.5",
            "+5",
            "99999999999999999999999",
            "0",
            "1 000",
        ] {
            let err = c.set("max_connections", bad).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with("invalid value for max_connections: "),
                "{msg}"
            );
            assert!(msg.contains("expected a positive integer"), "{msg}");
        }
        assert_eq!(
            c.set("max_connections", "abc").unwrap_err().to_string(),
            "invalid value for max_connections: \"abc\" \
             (expected a positive integer up to 10000000)"
        );
        // Range above the maximum.
        assert!(c.set("replay_events", "1000001").is_err());
        // Zero is fine where it means "off".
        c.set("replay_events", "0").unwrap();
        c.set("jwt_leeway_s", " 0 ").unwrap();
        assert_eq!(c.max_connections, 10_000, "unchanged after errors");
    }

    #[test]
    fn bad_bool_names_the_setting() {
        let mut c = Config::default();
        for (v, want) in [
            ("TRUE", true),
            ("0", false),
            ("yes", true),
            ("off", false),
            (" On ", true),
            ("no", false),
        ] {
            c.set("allow_query_token", v).unwrap();
            assert_eq!(c.allow_query_token, want, "{v}");
        }
        let msg = c.set("allow_query_token", "maybe").unwrap_err().to_string();
        assert!(
            msg.starts_with("invalid value for allow_query_token: \"maybe\""),
            "{msg}"
        );
        c.set("demo_agent", "auto").unwrap();
        assert_eq!(c.demo_agent, None);
        c.set("demo_agent", "off").unwrap();
        assert_eq!(c.demo_agent, Some(false));
        let msg = c.set("demo_agent", "2").unwrap_err().to_string();
        assert!(msg.contains("demo_agent"), "{msg}");
    }

    #[test]
    fn bad_enum_names_the_setting() {
        let mut c = Config::default();
        c.set("per_user_policy", "Evict-Oldest").unwrap();
        assert_eq!(c.per_user_policy, PerUserPolicy::EvictOldest);
        let msg = c.set("per_user_policy", "drop").unwrap_err().to_string();
        assert_eq!(
            msg,
            "invalid value for per_user_policy: \"drop\" (expected evict_oldest or reject)"
        );
    }

    #[test]
    fn bad_address_names_the_setting() {
        let mut c = Config::default();
        c.set("listen", "[::1]:0").unwrap();
        c.set("listen", "localhost:9001").unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9001");
        for bad in ["127.0.0.1", "nowhere:80", "127.0.0.1:70000", ""] {
            let msg = c.set("listen", bad).unwrap_err().to_string();
            assert!(msg.starts_with("invalid value for listen: "), "{msg}");
        }
    }

    #[test]
    fn bad_algorithm_names_the_setting() {
        let mut c = Config::default();
        c.set("jwt_algorithm", "es256").unwrap();
        assert_eq!(c.jwt_algorithm, JwtAlgorithm::Es256);
        let msg = c.set("jwt_algorithm", "none").unwrap_err().to_string();
        assert_eq!(
            msg,
            "invalid value for jwt_algorithm: \"none\" (expected HS256, RS256 or ES256)"
        );
    }

    #[test]
    fn errors_say_where_the_value_came_from() {
        let msg = Config::load(None, &env(&[("AGENTWIRE_MAX_CONNECTIONS", "lots")]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with(
                "invalid value for max_connections \
                 from environment variable AGENTWIRE_MAX_CONNECTIONS: \"lots\""
            ),
            "{msg}"
        );
        let flags = vec![("per_user_policy".to_owned(), "x".to_owned())];
        let msg = Config::load(None, &[], &flags).unwrap_err().to_string();
        assert!(
            msg.starts_with("invalid value for per_user_policy from flag --per-user-policy"),
            "{msg}"
        );
        let msg = Config::load(
            Some((Path::new("/etc/aw.toml"), "max_connections = -3")),
            &[],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.starts_with(
                "invalid value for max_connections in config file /etc/aw.toml: \"-3\""
            ),
            "{msg}"
        );
        let msg = Config::load(
            Some((Path::new("a.toml"), "max_connections = 1.5")),
            &[],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.starts_with("invalid value for max_connections in config file a.toml"),
            "{msg}"
        );
        let msg = Config::load(Some((Path::new("a.toml"), "listen = [1]")), &[], &[])
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("invalid value for listen in config file a.toml"),
            "{msg}"
        );
    }

    #[test]
    fn secret_values_never_appear_in_errors() {
        let file = "publish_key = [\"hunter2-publish\"]\n";
        let msg = Config::load(Some((Path::new("a.toml"), file)), &[], &[])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("publish_key") && !msg.contains("hunter2"),
            "{msg}"
        );
        let msg = Config::load(None, &env(&[("AGENTWIRE_JWT_SECRET", "hunter2")]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("jwt_secret") && !msg.contains("hunter2"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_names_are_errors_except_in_the_environment() {
        let err = Config::default().set("max_conections", "1").unwrap_err();
        assert!(matches!(err, ConfigError::UnknownSetting { .. }));
        assert!(err.to_string().contains("\"max_conections\""));

        let err = Config::load(
            Some((
                Path::new("a.toml"),
                "listen = \"127.0.0.1:1\"\nlsiten = \"x\"\n",
            )),
            &[],
            &[],
        )
        .unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnknownSetting { name, .. } if name == "lsiten"),
            "{err}"
        );
        assert!(err.to_string().contains("a.toml"), "{err}");

        let err = Config::load(
            Some((Path::new("a.toml"), "[server]\nlisten = \"127.0.0.1:1\"\n")),
            &[],
            &[],
        )
        .unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnknownSetting { name, .. } if name == "server"),
            "{err}"
        );

        let err = Config::load(Some((Path::new("a.toml"), "listen = ")), &[], &[]).unwrap_err();
        assert!(matches!(err, ConfigError::FileSyntax { .. }), "{err}");

        let flags = vec![("bogus".to_owned(), "1".to_owned())];
        assert!(matches!(
            Config::load(None, &[], &flags),
            Err(ConfigError::UnknownSetting { .. })
        ));

        let vars = env(&[
            ("AGENTWIRE_BOGUS", "1"),
            ("AGENTWIRE_listen", "x"),
            ("AGENTWIRE_CONFIG", "/etc/aw.toml"),
            ("PATH", "/bin"),
        ]);
        let (c, warnings) = Config::load(None, &vars, &[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("AGENTWIRE_BOGUS"));
        assert!(warnings[1].contains("did you mean AGENTWIRE_LISTEN?"));
    }

    #[test]
    fn origins_are_parsed_and_normalized() {
        let mut c = Config::default();
        c.set(
            "allowed_origins",
            " http://a.example , HTTPS://B.Example:443,http://a.example,, http://[::1]:8080 ,chrome-extension://abc",
        )
        .unwrap();
        assert_eq!(
            c.allowed_origins,
            [
                "http://a.example",
                "https://b.example",
                "http://[::1]:8080",
                "chrome-extension://abc"
            ]
        );
        c.set("allowed_origins", "").unwrap();
        assert!(c.allowed_origins.is_empty());
        for bad in [
            "*",
            "a.example",
            "http://a.example/",
            "http://a.example/path",
            "http://:80",
            "http://a:0",
            "http://a:x",
        ] {
            let msg = c.set("allowed_origins", bad).unwrap_err().to_string();
            assert!(
                msg.starts_with("invalid value for allowed_origins: "),
                "{msg}"
            );
        }
        c.allowed_origins = vec!["http://A.example".into()];
        assert!(c.validate().is_err());
    }

    #[test]
    fn validate_checks_combinations() {
        let check = |edit: &dyn Fn(&mut Config), name: &str| {
            let mut c = Config::default();
            edit(&mut c);
            match c.validate() {
                Err(e) => assert!(e.to_string().contains(name), "{name}: {e}"),
                Ok(()) => panic!("{name}: expected an error"),
            }
        };
        check(
            &|c| c.heartbeat_timeout_ms = c.heartbeat_interval_ms,
            "heartbeat_timeout_ms",
        );
        check(&|c| c.max_connections = 0, "max_connections");
        check(
            &|c| c.max_connections_per_user = 0,
            "max_connections_per_user",
        );
        check(&|c| c.max_message_bytes = 0, "max_message_bytes");
        check(&|c| c.max_publish_bytes = 0, "max_publish_bytes");
        check(&|c| c.max_pending_bytes = 0, "max_pending_bytes");
        check(&|c| c.heartbeat_interval_ms = 0, "heartbeat_interval_ms");
        check(&|c| c.handshake_timeout_ms = 0, "handshake_timeout_ms");
        check(&|c| c.run_idle_timeout_ms = 0, "run_idle_timeout_ms");
        check(
            &|c| {
                c.max_connections = 2;
                c.max_connections_per_user = 3;
            },
            "max_connections_per_user",
        );
        check(
            &|c| c.jwt_algorithm = JwtAlgorithm::Rs256,
            "jwt_public_key_file",
        );
        check(
            &|c| c.jwt_algorithm = JwtAlgorithm::Es256,
            "jwt_public_key_file",
        );
        check(
            &|c| c.jwt_public_key_file = Some("k.pem".into()),
            "jwt_algorithm",
        );
        check(&|c| c.jwt_secret = Some("short".into()), "jwt_secret");
        check(&|c| c.jwt_issuer = Some(String::new()), "jwt_issuer");
        check(&|c| c.publish_key = Some(String::new()), "publish_key");

        let mut ok = Config {
            jwt_algorithm: JwtAlgorithm::Rs256,
            jwt_public_key_file: Some("k.pem".into()),
            ..Config::default()
        };
        ok.validate().unwrap();
        assert!(!ok.dev_mode());
        assert!(!ok.demo_agent_effective());
        ok.jwt_algorithm = JwtAlgorithm::Hs256;
        ok.jwt_secret = Some(SECRET.into());
        ok.validate().unwrap();

        // The secret's value never shows in the message about its length.
        let c = Config {
            jwt_secret: Some("tiny-secret".into()),
            ..Config::default()
        };
        assert!(!c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("tiny-secret"));
    }

    #[test]
    fn load_warns_about_keys_the_algorithm_ignores() {
        let flags = vec![
            ("jwt_algorithm".to_owned(), "RS256".to_owned()),
            ("jwt_public_key_file".to_owned(), "k.pem".to_owned()),
            ("jwt_secret".to_owned(), SECRET.to_owned()),
        ];
        let (_, warnings) = Config::load(None, &[], &flags).unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("jwt_secret is ignored") && !warnings[0].contains(SECRET));
    }

    #[test]
    fn public_json_has_every_setting_but_no_secret() {
        let mut c = Config::default();
        c.set("jwt_secret", SECRET).unwrap();
        c.set("publish_key", "pub-key-value").unwrap();
        c.set("allowed_origins", "http://a.example").unwrap();
        let json = c.to_public_json(false);
        let obj = json.as_object().unwrap();
        for name in Config::NAMES {
            match *name {
                "jwt_secret" | "publish_key" => assert!(!obj.contains_key(*name)),
                _ => assert!(obj.contains_key(*name), "{name} missing"),
            }
        }
        assert_eq!(obj.len(), Config::NAMES.len());
        assert_eq!(obj["jwt_secret_set"], true);
        assert_eq!(obj["publish_key_set"], true);
        assert_eq!(obj["listen"], "127.0.0.1:8080");
        assert_eq!(obj["jwt_algorithm"], "HS256");
        assert_eq!(obj["max_connections"], 10_000);
        assert_eq!(obj["heartbeat_timeout_ms"], 60_000);
        assert_eq!(obj["per_user_policy"], "evict_oldest");
        assert_eq!(
            obj["allowed_origins"],
            serde_json::json!(["http://a.example"])
        );
        assert_eq!(obj["demo_agent"], false);
        assert_eq!(obj["jwt_issuer"], serde_json::Value::Null);
        let text = json.to_string();
        assert!(
            !text.contains(SECRET) && !text.contains("pub-key-value"),
            "{text}"
        );
        let debug = format!("{c:?}");
        assert!(
            !debug.contains(SECRET) && !debug.contains("pub-key-value"),
            "{debug}"
        );
        assert!(
            debug.contains("jwt_secret: Some(\"<redacted>\")"),
            "{debug}"
        );

        let obj = Config::default().to_public_json(true);
        assert_eq!(obj["jwt_secret_set"], false);
        assert_eq!(obj["publish_key_set"], false);
        assert_eq!(obj["demo_agent"], true);
    }
}
