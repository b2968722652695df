//! The values settings hold: one [`Value`] implementation per field type of the settings
//! table, which parses a setting's string form (the same parser for the TOML file, the
//! environment, the command line and [`Config::set`](super::Config::set)), shows it in
//! `--help` and `GET /ws/config`, and checks a value built in code. Also the parsers they
//! share: addresses, booleans, bounded integers, [`PerUserPolicy`], [`LogFormat`] and origin lists (each
//! origin parsed by [`crate::origin`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use serde_json::Value as Json;

use super::SettingKind;
use crate::auth::JwtAlgorithm;
use crate::origin;

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

/// How log lines are written to stderr (`log_format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// env_logger's line: `[2026-01-01T00:00:00.000Z INFO  target] message` (`text`, the
    /// default).
    #[default]
    Text,
    /// One JSON object per line: `ts`, `level`, `target`, `message` and the record's
    /// fields (`conn`, `user`, `reason`, `code`, `duration_ms`) when it has them (`json`).
    Json,
}

impl LogFormat {
    /// The configuration spelling: `text` or `json`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogFormat {
    type Err = String;

    /// Accepts `text` and `json`, case-insensitively.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(format!("unknown log format {s:?}")),
        }
    }
}

/// Where users' shared state lives (`engine`, PROTOCOL.md section 9).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineKind {
    /// This process alone (`memory`, the default).
    #[default]
    Memory,
    /// Redis, shared by every node (`redis`).
    Redis,
}

impl EngineKind {
    /// The configuration spelling: `memory` or `redis`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Redis => "redis",
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EngineKind {
    type Err = String;

    /// Accepts `memory` and `redis`, case-insensitively.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "memory" => Ok(Self::Memory),
            "redis" => Ok(Self::Redis),
            _ => Err(format!("unknown engine {s:?}")),
        }
    }
}

/// A field of the settings table, seen by the generic code (set, validate, `Debug`,
/// `--help`, `/ws/config`) through the row's accessors. One implementation per field type;
/// the row's [`SettingKind`] says how the string form reads where a type serves several
/// kinds (`Option<String>`: `Secret` verbatim, `Text` trimmed).
pub(super) trait Value: fmt::Debug {
    /// Parse `text`, written as `kind`, and store it; on error the value is unchanged and
    /// the message says what a valid value looks like (never repeating the value).
    fn set(&mut self, kind: SettingKind, text: &str) -> Result<(), String>;

    /// Set from a TOML array of strings; `None` when the type takes no list.
    fn set_list(&mut self, _items: &[&str]) -> Option<Result<(), String>> {
        None
    }

    /// Whether the type stores values written as `kind` (a unit test checks every row).
    fn fits(&self, kind: SettingKind) -> bool;

    /// The value in `GET /ws/config`.
    fn json(&self) -> Json;

    /// The value written as the setting is written, for the default in `--help`; `none`
    /// for an unset optional value.
    fn shown(&self) -> String;

    /// The value of an integer setting, for the range check; `None` for other types and
    /// for an unset optional integer.
    fn integer(&self) -> Option<u64> {
        None
    }

    /// False for an unset optional value: all that is shown of a secret.
    fn is_set(&self) -> bool {
        true
    }

    /// For a value built in code: `Err(message)` when it has a form the parser never
    /// produces (an empty optional string, an origin not in normal form).
    fn check_form(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The error for a type asked to parse a kind it does not store.
fn wrong_kind(kind: SettingKind) -> Result<(), String> {
    Err(kind.expected())
}

impl Value for SocketAddr {
    fn set(&mut self, kind: SettingKind, text: &str) -> Result<(), String> {
        match kind {
            SettingKind::Address => *self = parse_listen(text)?,
            _ => return wrong_kind(kind),
        }
        Ok(())
    }
    fn fits(&self, kind: SettingKind) -> bool {
        kind == SettingKind::Address
    }
    fn json(&self) -> Json {
        Json::String(self.to_string())
    }
    fn shown(&self) -> String {
        self.to_string()
    }
}

/// `OptionalAddress`: `None` is `none` (also the empty string).
impl Value for Option<SocketAddr> {
    fn set(&mut self, kind: SettingKind, text: &str) -> Result<(), String> {
        if kind != SettingKind::OptionalAddress {
            return wrong_kind(kind);
        }
        let text = text.trim();
        *self = if text.is_empty() || text.eq_ignore_ascii_case("none") {
            None
        } else {
            Some(parse_listen(text).map_err(|_| kind.expected())?)
        };
        Ok(())
    }
    fn fits(&self, kind: SettingKind) -> bool {
        kind == SettingKind::OptionalAddress
    }
    fn json(&self) -> Json {
        self.map_or(Json::Null, |a| Json::String(a.to_string()))
    }
    fn shown(&self) -> String {
        self.map_or_else(|| "none".into(), |a| a.to_string())
    }
    fn is_set(&self) -> bool {
        self.is_some()
    }
}

/// `Algorithm`, `Policy` and `LogFormat`: enums read with `FromStr` and shown by their `as_str`.
macro_rules! named_value {
    ($($ty:ty => $kind:ident),*) => {$(
        impl Value for $ty {
            fn set(&mut self, kind: SettingKind, text: &str) -> Result<(), String> {
                if kind != SettingKind::$kind {
                    return wrong_kind(kind);
                }
                *self = text.trim().parse().map_err(|_| kind.expected())?;
                Ok(())
            }
            fn fits(&self, kind: SettingKind) -> bool {
                kind == SettingKind::$kind
            }
            fn json(&self) -> Json {
                Json::String(self.as_str().into())
            }
            fn shown(&self) -> String {
                self.as_str().into()
            }
        }
    )*};
}

named_value!(
    JwtAlgorithm => Algorithm,
    PerUserPolicy => Policy,
    LogFormat => LogFormat,
    EngineKind => Engine
);

/// `Secret` (verbatim) or `Text` (trimmed); empty unsets.
impl Value for Option<String> {
    fn set(&mut self, kind: SettingKind, text: &str) -> Result<(), String> {
        *self = match kind {
            SettingKind::Secret => optional(text),
            SettingKind::Text => optional(text.trim()),
            _ => return wrong_kind(kind),
        };
        Ok(())
    }
    fn fits(&self, kind: SettingKind) -> bool {
        matches!(kind, SettingKind::Secret | SettingKind::Text)
    }
    fn json(&self) -> Json {
        self.as_ref()
            .map_or(Json::Null, |s| Json::String(s.clone()))
    }
    fn shown(&self) -> String {
        self.clone().unwrap_or_else(|| "none".into())
    }
    fn is_set(&self) -> bool {
        self.is_some()
    }
    fn check_form(&self) -> Result<(), String> {
        match self.as_deref() {
            Some("") => Err(MUST_NOT_BE_EMPTY.into()),
            _ => Ok(()),
        }
    }
}

/// `Path`, trimmed; empty unsets.
impl Value for Option<PathBuf> {
    fn set(&mut self, kind: SettingKind, text: &str) -> Result<(), String> {
        match kind {
            SettingKind::Path => *self = optional(text.trim()).map(PathBuf::from),
            _ => return wrong_kind(kind),
        }
        Ok(())
    }
    fn fits(&self, kind: SettingKind) -> bool {
        kind == SettingKind::Path
    }
    fn json(&self) -> Json {
        self.as_ref()
            .map_or(Json::Null, |p| Json::String(p.display().to_string()))
    }
    fn shown(&self) -> String {
        self.as_ref()
            .map_or_else(|| "none".into(), |p| p.display().to_string())
    }
    fn is_set(&self) -> bool {
        self.is_some()
    }
    fn check_form(&self) -> Result<(), String> {
        match self {
            Some(path) if path.as_os_str().is_empty() => Err(MUST_NOT_BE_EMPTY.into()),
            _ => Ok(()),
        }
    }
}

const MUST_NOT_BE_EMPTY: &str = "must not be empty; leave it unset instead";

impl Value for bool {
    fn set(&mut self, kind: SettingKind, text: &str) -> Result<(), String> {
        match kind {
            SettingKind::Bool => *self = parse_bool(text).ok_or_else(|| kind.expected())?,
            _ => return wrong_kind(kind),
        }
        Ok(())
    }
    fn fits(&self, kind: SettingKind) -> bool {
        kind == SettingKind::Bool
    }
    fn json(&self) -> Json {
        Json::Bool(*self)
    }
    fn shown(&self) -> String {
        self.to_string()
    }
}

/// `AutoBool`: `None` is `auto` (also the empty string).
impl Value for Option<bool> {
    fn set(&mut self, kind: SettingKind, text: &str) -> Result<(), String> {
        if kind != SettingKind::AutoBool {
            return wrong_kind(kind);
        }
        let text = text.trim();
        *self = if text.is_empty() || text.eq_ignore_ascii_case("auto") {
            None
        } else {
            Some(parse_bool(text).ok_or_else(|| kind.expected())?)
        };
        Ok(())
    }
    fn fits(&self, kind: SettingKind) -> bool {
        kind == SettingKind::AutoBool
    }
    fn json(&self) -> Json {
        self.map_or(Json::Null, Json::Bool)
    }
    fn shown(&self) -> String {
        self.map_or_else(|| "auto".into(), |b| b.to_string())
    }
}

/// `Integer`: `u64` and `usize` fields read, show and check alike.
macro_rules! integer_value {
    ($($ty:ty),*) => {$(
        impl Value for $ty {
            fn set(&mut self, kind: SettingKind, text: &str) -> Result<(), String> {
                match kind {
                    SettingKind::Integer { .. } => {
                        let n = parse_integer(kind, text)?;
                        *self = <$ty>::try_from(n).map_err(|_| kind.expected())?;
                    }
                    _ => return wrong_kind(kind),
                }
                Ok(())
            }
            fn fits(&self, kind: SettingKind) -> bool {
                matches!(kind, SettingKind::Integer { .. })
            }
            fn json(&self) -> Json {
                Json::from(*self)
            }
            fn shown(&self) -> String {
                self.to_string()
            }
            fn integer(&self) -> Option<u64> {
                Some(u64::try_from(*self).unwrap_or(u64::MAX))
            }
        }
    )*};
}

integer_value!(u64, usize);

/// `OptionalInteger`: `None` is `none` (also the empty string).
impl Value for Option<u64> {
    fn set(&mut self, kind: SettingKind, text: &str) -> Result<(), String> {
        if !matches!(kind, SettingKind::OptionalInteger { .. }) {
            return wrong_kind(kind);
        }
        let text = text.trim();
        *self = if text.is_empty() || text.eq_ignore_ascii_case("none") {
            None
        } else {
            Some(parse_integer(kind, text)?)
        };
        Ok(())
    }
    fn fits(&self, kind: SettingKind) -> bool {
        matches!(kind, SettingKind::OptionalInteger { .. })
    }
    fn json(&self) -> Json {
        self.map_or(Json::Null, Json::from)
    }
    fn shown(&self) -> String {
        self.map_or_else(|| "none".into(), |n| n.to_string())
    }
    fn integer(&self) -> Option<u64> {
        *self
    }
}

/// `Origins`: a comma-separated list, or a TOML array of strings.
impl Value for Vec<String> {
    fn set(&mut self, kind: SettingKind, text: &str) -> Result<(), String> {
        match kind {
            SettingKind::Origins => *self = origin::parse_list(text.split(','))?,
            _ => return wrong_kind(kind),
        }
        Ok(())
    }
    fn set_list(&mut self, items: &[&str]) -> Option<Result<(), String>> {
        Some(origin::parse_list(items.iter().copied()).map(|origins| *self = origins))
    }
    fn fits(&self, kind: SettingKind) -> bool {
        kind == SettingKind::Origins
    }
    fn json(&self) -> Json {
        Json::Array(self.iter().cloned().map(Json::String).collect())
    }
    fn shown(&self) -> String {
        if self.is_empty() {
            "empty".into()
        } else {
            self.join(",")
        }
    }
    fn check_form(&self) -> Result<(), String> {
        self.iter().try_for_each(|o| origin::check_normal(o))
    }
}

fn optional(value: &str) -> Option<String> {
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
    let Some((min, max)) = kind.bounds() else {
        return Err(kind.expected());
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
