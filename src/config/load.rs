//! Layering the sources of settings (defaults < TOML file < environment < flags) into one
//! [`Config`], and the errors that name the setting and where its value came from.

use std::path::{Path, PathBuf};

use super::{Config, Setting, SettingKind, ENV_CONFIG_FILE, ENV_PREFIX};
use crate::auth::JwtAlgorithm;

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

/// An [`ConfigError::InvalidValue`] for `setting`, with the value quoted or redacted.
pub(super) fn invalid_value(
    setting: &Setting,
    value: &str,
    expected: String,
    origin: Source,
) -> ConfigError {
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

impl Config {
    /// Parse `value` for `setting` and store it; errors carry `origin`.
    pub(super) fn set_from(
        &mut self,
        setting: &Setting,
        value: &str,
        origin: Source,
    ) -> Result<(), ConfigError> {
        setting
            .value_mut(self)
            .set(setting.kind, value)
            .map_err(|expected| invalid_value(setting, value, expected, origin))
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
        // Names of the settings some layer gave, for the heartbeat defaults.
        let mut given: Vec<&'static str> = Vec::new();

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
                    given.push(setting.name);
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
            given.push(setting.name);
        }
        config.derive_heartbeat(
            given.contains(&"heartbeat_interval_ms"),
            given.contains(&"heartbeat_timeout_ms"),
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

    /// Apply the TOML file; returns the names of the settings it gave.
    fn apply_file(&mut self, path: &Path, text: &str) -> Result<Vec<&'static str>, ConfigError> {
        let table = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::FileSyntax {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let origin = Source::File(path.to_path_buf());
        let mut seen: Vec<(&'static str, &str)> = Vec::with_capacity(table.len());
        for (key, value) in &table {
            let setting = Self::setting(key).ok_or_else(|| ConfigError::UnknownSetting {
                name: key.clone(),
                origin: origin.clone(),
            })?;
            if let Some((_, first)) = seen.iter().find(|(name, _)| *name == setting.name) {
                return Err(ConfigError::DuplicateKey {
                    path: path.to_path_buf(),
                    name: setting.name,
                    first: (*first).to_owned(),
                    second: key.clone(),
                });
            }
            seen.push((setting.name, key.as_str()));
            match value {
                toml::Value::String(s) => self.set_from(setting, s, origin.clone())?,
                toml::Value::Integer(i) => {
                    self.set_from(setting, &i.to_string(), origin.clone())?
                }
                toml::Value::Boolean(b) => {
                    self.set_from(setting, if *b { "true" } else { "false" }, origin.clone())?
                }
                toml::Value::Array(items) if setting.kind == SettingKind::Origins => {
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
                    setting
                        .value_mut(self)
                        .set_list(&strings)
                        .unwrap_or_else(|| Err(setting.kind.expected()))
                        .map_err(|expected| {
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
        Ok(seen.into_iter().map(|(name, _)| name).collect())
    }
}
