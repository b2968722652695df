//! What a row of the settings table says, and the `settings!` macro that turns the rows
//! in `config/mod.rs` into the [`Config`] struct, its `Default`, [`Config::NAMES`] and
//! [`Config::SETTINGS`].
//!
//! A row is `name: Type = default, Kind, "help"` (see the module documentation of
//! [`crate::config`]); everything else about the setting is derived here: the flag
//! `--name-with-dashes` and the environment variable `AGENTWIRE_NAME` (computed at compile
//! time from the name), the default shown in `--help` (the default value, written the way
//! the setting is written), and two accessors through which the generic code parses,
//! shows, checks and renders the field (the [`Value`] trait of `config/value.rs`).

use super::value::Value;
use super::{Config, ENV_PREFIX};

/// How a setting's value is written. Drives parsing, error messages and the shape of its
/// command-line flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettingKind {
    /// A socket address, `IP:port` (`localhost:port` means `127.0.0.1:port`).
    Address,
    /// `none` (also empty) or a socket address written as for `Address`.
    OptionalAddress,
    /// `HS256`, `RS256` or `ES256`, any case.
    Algorithm,
    /// A secret string, taken verbatim and never echoed; empty unsets it. Its value never
    /// appears in errors, `Debug` output or `GET /ws/config` (which shows `<name>_set`).
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
    /// `text` or `json`.
    LogFormat,
    /// `memory` or `redis`.
    Engine,
    /// A decimal integer within `min..=max`.
    Integer {
        /// Smallest accepted value.
        min: u64,
        /// Largest accepted value.
        max: u64,
    },
    /// `none` (also empty) or a decimal integer within `min..=max`.
    OptionalInteger {
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
            Self::OptionalAddress => {
                "expected none or IP:port, such as 127.0.0.1:9090 or [::]:9090".into()
            }
            Self::Algorithm => "expected HS256, RS256 or ES256".into(),
            Self::Secret | Self::Path | Self::Text => "expected a string".into(),
            Self::Bool => "expected true or false (also 1/0, yes/no, on/off)".into(),
            Self::AutoBool => "expected true, false or auto".into(),
            Self::Origins => {
                "expected comma-separated origins such as https://app.example.com".into()
            }
            Self::Policy => "expected evict_oldest or reject".into(),
            Self::LogFormat => "expected text or json".into(),
            Self::Engine => "expected memory or redis".into(),
            Self::Integer { min, max } => format!("expected {}", integer_range(*min, *max)),
            Self::OptionalInteger { min, max } => {
                format!("expected none or {}", integer_range(*min, *max))
            }
        }
    }

    /// The accepted range of an integer setting; `None` for the others.
    pub fn bounds(&self) -> Option<(u64, u64)> {
        match *self {
            Self::Integer { min, max } | Self::OptionalInteger { min, max } => Some((min, max)),
            _ => None,
        }
    }
}

/// "a whole number from 0 to N" / "a positive integer up to N" / "an integer from A to B".
fn integer_range(min: u64, max: u64) -> String {
    match min {
        0 => format!("a whole number from 0 to {max}"),
        1 => format!("a positive integer up to {max}"),
        _ => format!("an integer from {min} to {max}"),
    }
}

/// One row of the settings table: a setting's names, meaning, kind and field.
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    /// The section 8 name (snake_case); also the TOML key and the field of [`Config`].
    pub name: &'static str,
    /// The long flag, without `--`: the name with dashes.
    pub flag: &'static str,
    /// The environment variable: `AGENTWIRE_` and the name in upper case.
    pub env: &'static str,
    /// One line saying what the setting does.
    pub help: &'static str,
    /// How the value is written.
    pub kind: SettingKind,
    /// The default as `--help` shows it, when the row says more than the value.
    pub(super) shown_default: Option<&'static str>,
    /// The field in a [`Config`].
    pub(super) get: fn(&Config) -> &dyn Value,
    /// The field in a [`Config`], to store a parsed value.
    pub(super) get_mut: fn(&mut Config) -> &mut dyn Value,
}

impl Setting {
    /// The default, as shown in `--help`: the row's own text when it has one (such as
    /// `60000 (2 x interval)`), else the default value written as the setting is written
    /// (`none` for an unset optional value).
    pub fn default_text(&self) -> String {
        match self.shown_default {
            Some(text) => text.to_owned(),
            None => self.value(&Config::default()).shown(),
        }
    }

    /// Placeholder for the value in `--help`.
    pub fn value_name(&self) -> &'static str {
        match self.kind {
            SettingKind::Address => "ADDR",
            SettingKind::OptionalAddress => "ADDR|none",
            SettingKind::Algorithm => "ALG",
            SettingKind::Secret => "SECRET",
            SettingKind::Path => "FILE",
            SettingKind::Text => "TEXT",
            SettingKind::Bool => "BOOL",
            SettingKind::AutoBool => "BOOL|auto",
            SettingKind::Origins => "ORIGINS",
            SettingKind::Policy => "POLICY",
            SettingKind::LogFormat => "FORMAT",
            SettingKind::Engine => "ENGINE",
            SettingKind::Integer { .. } => "N",
            SettingKind::OptionalInteger { .. } => "N|none",
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

    /// This setting's field in `config`.
    pub(super) fn value<'a>(&self, config: &'a Config) -> &'a dyn Value {
        (self.get)(config)
    }

    /// This setting's field in `config`, to store into.
    pub(super) fn value_mut<'a>(&self, config: &'a mut Config) -> &'a mut dyn Value {
        (self.get_mut)(config)
    }
}

/// `name` with each `_` replaced by `-`: the flag. `N` is the length of `name`.
pub(super) const fn flag_name<const N: usize>(name: &str) -> [u8; N] {
    let name = name.as_bytes();
    let mut out = [0; N];
    let mut i = 0;
    while i < N {
        out[i] = if name[i] == b'_' { b'-' } else { name[i] };
        i += 1;
    }
    out
}

/// [`ENV_PREFIX`] and `name` in upper case: the environment variable. `N` is the length
/// of both.
pub(super) const fn env_name<const N: usize>(name: &str) -> [u8; N] {
    let prefix = ENV_PREFIX.as_bytes();
    let name = name.as_bytes();
    let mut out = [0; N];
    let mut i = 0;
    while i < N {
        out[i] = if i < prefix.len() {
            prefix[i]
        } else {
            name[i - prefix.len()].to_ascii_uppercase()
        };
        i += 1;
    }
    out
}

/// Builds the [`Config`] struct and its table from the rows in `config/mod.rs`; see the
/// module documentation of [`crate::config`] for the row syntax.
macro_rules! settings {
    // The kind column: `Integer(min, max)` and `OptionalInteger(min, max)` carry bounds,
    // the other kinds are a bare [`SettingKind`] variant.
    (@kind Integer($min:expr, $max:expr)) => {
        SettingKind::Integer { min: $min, max: $max }
    };
    (@kind OptionalInteger($min:expr, $max:expr)) => {
        SettingKind::OptionalInteger { min: $min, max: $max }
    };
    (@kind $kind:ident) => {
        SettingKind::$kind
    };
    (@shown) => {
        None
    };
    (@shown $text:literal) => {
        Some($text)
    };
    // A name derived from the setting's name at compile time (`flag_name`, `env_name`).
    (@derived $derive:ident, $len:expr, $name:expr) => {{
        const BYTES: [u8; $len] = $derive($name);
        match ::std::str::from_utf8(&BYTES) {
            Ok(name) => name,
            Err(_) => panic!("setting names are ASCII"),
        }
    }};
    (
        $(#[$attr:meta])*
        pub struct Config {
            $(
                $(#[$doc:meta])*
                $name:ident: $ty:ty = $default:expr,
                    $kind:ident $(($min:expr, $max:expr))?,
                    $help:literal $(, shown $shown:literal)?;
            )*
        }
    ) => {
        $(#[$attr])*
        pub struct Config {
            $(
                $(#[$doc])*
                pub $name: $ty,
            )*
        }

        impl Default for Config {
            fn default() -> Self {
                Self {
                    $($name: $default,)*
                }
            }
        }

        impl Config {
            /// Names of all settings, in table order (snake_case).
            pub const NAMES: &'static [&'static str] = &[$(stringify!($name)),*];

            /// Every setting with its flag, environment variable, meaning and kind, in
            /// table order (the same order as [`Config::NAMES`]).
            pub const SETTINGS: &'static [Setting] = &[$(
                Setting {
                    name: stringify!($name),
                    flag: settings!(@derived flag_name, stringify!($name).len(), stringify!($name)),
                    env: settings!(
                        @derived env_name,
                        ENV_PREFIX.len() + stringify!($name).len(),
                        stringify!($name)
                    ),
                    help: $help,
                    kind: settings!(@kind $kind $(($min, $max))?),
                    shown_default: settings!(@shown $($shown)?),
                    get: {
                        fn get(config: &Config) -> &dyn Value {
                            &config.$name
                        }
                        get
                    },
                    get_mut: {
                        fn get_mut(config: &mut Config) -> &mut dyn Value {
                            &mut config.$name
                        }
                        get_mut
                    },
                }
            ),*];
        }
    };
}
