//! The command line: `agentwire [serve]` runs the gateway, `agentwire token` mints a
//! token. Built with clap's builder API from [`Config::SETTINGS`], so every setting of
//! PROTOCOL.md section 8 is a flag `--<name-with-dashes>` whose name, default and meaning
//! come from the same table as the config file and the environment, and cannot drift.
//!
//! Flags only collect strings; every value goes through [`Config::load`] (and so
//! [`Config::set`] and [`Config::validate`]), with the same parsing and messages as the
//! file and the environment. The config file is `--config FILE`, else the environment
//! variable `AGENTWIRE_CONFIG`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Arg, ArgAction, ArgMatches};

use crate::config::{Config, ConfigError, ENV_CONFIG_FILE};
use crate::ids::UserId;

/// Default lifetime of a token minted by `agentwire token`, in seconds.
pub const DEFAULT_TOKEN_TTL_S: u64 = 3600;

/// Longest accepted `--ttl-s`: ten years, in seconds.
pub const MAX_TOKEN_TTL_S: u64 = 10 * 365 * 24 * 3600;

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// `agentwire serve` (also the default when no subcommand is given): run the gateway.
    Serve {
        /// The validated configuration.
        config: Config,
        /// Things worth logging at start (ignored `AGENTWIRE_*` variables, settings the
        /// chosen algorithm ignores); they never contain values.
        warnings: Vec<String>,
    },
    /// `agentwire token --sub USER [--ttl-s N]`: print a token signed with the configured
    /// key. The caller checks that `config` has an HS256 `jwt_secret`.
    Token {
        /// The validated configuration, to find the key.
        config: Config,
        /// The token's `sub`.
        sub: UserId,
        /// Lifetime in seconds, 1 to ten years; default 3600.
        ttl_s: u64,
    },
}

/// Why the command line could not be turned into a [`Command`].
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// clap's own outcome: a usage error, or `--help` / `--version` (exit code 0). Call
    /// [`clap::Error::exit`] to print it and exit with the right code.
    #[error(transparent)]
    Clap(#[from] clap::Error),
    /// The config file (from `--config` or `AGENTWIRE_CONFIG`) could not be read.
    #[error("cannot read config file {}: {source}", .path.display())]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A bad setting: its value, an unknown file key, or a failed cross-field check.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl CliError {
    /// The process exit code: clap's (0 for `--help` / `--version`, 2 for usage errors),
    /// 2 for configuration errors.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Clap(e) => e.exit_code(),
            Self::ReadConfig { .. } | Self::Config(_) => 2,
        }
    }

    /// Print the message (help and version to stdout, errors to stderr) and exit with
    /// [`CliError::exit_code`].
    pub fn exit(&self) -> ! {
        match self {
            Self::Clap(e) => e.exit(),
            other => {
                eprintln!("error: {other}");
                std::process::exit(other.exit_code())
            }
        }
    }
}

/// Parse argv (including argv\[0\]) and the process environment (`std::env::vars()`
/// collected) into a [`Command`]. Reads the config file itself.
///
/// # Errors
/// [`CliError::Clap`] for usage errors and for `--help` / `--version`;
/// [`CliError::ReadConfig`] when the config file cannot be read; [`CliError::Config`] for
/// a bad setting from any source.
pub fn parse(args: Vec<OsString>, env: Vec<(String, String)>) -> Result<Command, CliError> {
    let matches = command().try_get_matches_from(attach_bare_bools(args))?;
    let (name, m) = match matches.subcommand() {
        Some((name, m)) => (name, m),
        None => ("serve", &matches),
    };

    let config_path = match string(m, "config")? {
        Some(p) => Some(PathBuf::from(p)),
        None => env
            .iter()
            .find(|(k, v)| k == ENV_CONFIG_FILE && !v.is_empty())
            .map(|(_, v)| PathBuf::from(v)),
    };
    let text = match &config_path {
        Some(path) => {
            Some(
                std::fs::read_to_string(path).map_err(|source| CliError::ReadConfig {
                    path: path.clone(),
                    source,
                })?,
            )
        }
        None => None,
    };

    let mut flags = Vec::new();
    for setting in Config::SETTINGS {
        if let Some(value) = string(m, setting.name)? {
            flags.push((setting.name.to_owned(), value));
        }
    }
    let file = config_path.as_deref().zip(text.as_deref());
    // `load` runs `Config::validate`: the config returned here has passed it.
    let (config, warnings) = Config::load(file, &env, &flags)?;

    match name {
        "serve" => Ok(Command::Serve { config, warnings }),
        "token" => {
            let sub = m
                .try_get_one::<UserId>("sub")
                .map_err(|e| internal(&e.to_string()))?
                .cloned()
                .ok_or_else(|| internal("--sub is missing"))?;
            let ttl_s = match m.try_get_one::<u64>("ttl_s") {
                Ok(Some(v)) => *v,
                Ok(None) => DEFAULT_TOKEN_TTL_S,
                Err(e) => return Err(internal(&e.to_string()).into()),
            };
            Ok(Command::Token { config, sub, ttl_s })
        }
        other => Err(internal(&format!("unexpected subcommand {other:?}")).into()),
    }
}

/// The clap command: settings and `--config` on the top level, `serve` and `token`
/// (settings are global, so they are accepted before or after the subcommand).
pub fn command() -> clap::Command {
    clap::Command::new("agentwire")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Real-time gateway streaming AI-agent events to users over WebSocket")
        .long_about(
            "Real-time gateway streaming AI-agent events to users over WebSocket.\n\n\
             Runs `serve` when no command is given. With no JWT key configured it starts in \
             dev mode: a generated secret, a demo agent, not for production.",
        )
        .after_help(
            "Every setting can also come from the TOML file given by --config (keys are the \
             setting names) or from AGENTWIRE_<NAME>; flags win over the environment, the \
             environment over the file, the file over defaults.",
        )
        .propagate_version(true)
        .args_override_self(true)
        .arg(
            Arg::new("config")
                .long("config")
                .value_name("FILE")
                .global(true)
                .action(ArgAction::Set)
                .help(format!("TOML file with settings [env: {ENV_CONFIG_FILE}]")),
        )
        .args(setting_args())
        .subcommand(
            clap::Command::new("serve")
                .about("Run the gateway (the default command)")
                .args_override_self(true),
        )
        .subcommand(
            clap::Command::new("token")
                .about("Print a token signed with the configured HS256 jwt_secret")
                .args_override_self(true)
                .arg(
                    Arg::new("sub")
                        .long("sub")
                        .value_name("USER")
                        .required(true)
                        .action(ArgAction::Set)
                        .value_parser(parse_sub)
                        .help("User id, the token's sub claim (at most 128 bytes)"),
                )
                .arg(
                    Arg::new("ttl_s")
                        .long("ttl-s")
                        .value_name("SECONDS")
                        .action(ArgAction::Set)
                        .value_parser(clap::value_parser!(u64).range(1..=MAX_TOKEN_TTL_S))
                        .default_value("3600")
                        .help("Token lifetime in seconds"),
                ),
        )
}

/// One global flag per setting. No clap defaults: an absent flag must leave the lower
/// layers (environment, file) in charge, so the default is shown in the help text instead.
fn setting_args() -> Vec<Arg> {
    Config::SETTINGS
        .iter()
        .map(|s| {
            let arg = Arg::new(s.name)
                .long(s.flag)
                .value_name(s.value_name())
                .help(format!(
                    "{} [default: {}] [env: {}]",
                    s.help,
                    s.default_text(),
                    s.env
                ))
                .help_heading("Settings")
                .global(true)
                .action(ArgAction::Set);
            if s.is_bool() {
                // `--demo-agent` alone means true; `--demo-agent false` still works.
                arg.num_args(0..=1).default_missing_value("true")
            } else {
                // Let `-5` or a secret starting with `-` reach Config::set, which names the
                // setting in its error, instead of clap reading it as a flag.
                arg.allow_hyphen_values(true)
            }
        })
        .collect()
}

/// Rewrite a bare boolean flag followed by a subcommand name (`--demo-agent serve`) to
/// `--demo-agent=true`: clap would otherwise take the subcommand name as the flag's value.
/// Stops at `--`.
fn attach_bare_bools(args: Vec<OsString>) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::with_capacity(args.len());
    let mut rest = args.into_iter().peekable();
    while let Some(arg) = rest.next() {
        if arg == "--" {
            out.push(arg);
            out.extend(rest);
            break;
        }
        let is_bare_bool = arg
            .to_str()
            .and_then(|a| a.strip_prefix("--"))
            .is_some_and(|flag| {
                Config::SETTINGS
                    .iter()
                    .any(|s| s.is_bool() && s.flag == flag)
            });
        let next_is_subcommand = rest
            .peek()
            .is_some_and(|next| next == "serve" || next == "token");
        if is_bare_bool && next_is_subcommand {
            let mut attached = arg;
            attached.push("=true");
            out.push(attached);
        } else {
            out.push(arg);
        }
    }
    out
}

/// `--sub`: a [`UserId`], as the gateway will verify it.
fn parse_sub(value: &str) -> Result<UserId, String> {
    UserId::parse(value).map_err(|_| format!("must be {}", UserId::RULE))
}

/// A string argument, or `None` when absent.
fn string(m: &ArgMatches, id: &str) -> Result<Option<String>, clap::Error> {
    m.try_get_one::<String>(id)
        .map(|v| v.cloned())
        .map_err(|e| internal(&e.to_string()))
}

/// An error for a state clap's own checks rule out; reported rather than panicking.
fn internal(message: &str) -> clap::Error {
    command().error(
        ErrorKind::InvalidValue,
        format!("internal argument error: {message}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::JwtAlgorithm;
    use crate::config::{PerUserPolicy, SettingKind};

    const SECRET: &str = "0123456789abcdef-secret";

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Command, CliError> {
        let args = std::iter::once("agentwire")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(args, env)
    }

    fn serve(args: &[&str]) -> Config {
        match run(args, &[]) {
            Ok(Command::Serve { config, .. }) => config,
            Ok(other) => panic!("expected serve, got {other:?}"),
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    /// A unique scratch file holding `text`; removed by the caller.
    fn temp_file(tag: &str, text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("agentwire-cli-{}-{tag}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn command_is_well_formed() {
        command().debug_assert();
    }

    #[test]
    fn serve_is_the_default_command() {
        let c = serve(&[]);
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        let c = serve(&["--max-connections", "7"]);
        assert_eq!(c.max_connections, 7);
        let c = serve(&["serve", "--max-connections", "8"]);
        assert_eq!(c.max_connections, 8);
        // Settings are global: accepted before the subcommand too.
        let c = serve(&["--max-connections", "9", "serve"]);
        assert_eq!(c.max_connections, 9);
    }

    #[test]
    fn harness_style_command_line() {
        let c = serve(&[
            "serve",
            "--listen",
            "127.0.0.1:45123",
            "--jwt-secret",
            SECRET,
            "--publish-key",
            "K-0123456789abcdef",
            "--per-user-policy",
            "reject",
            "--allowed-origins",
            "http://a.example,http://b.example:8080",
            "--replay-ttl-ms",
            "121000",
            "--demo-agent",
            "true",
            "--allow-query-token",
            "false",
        ]);
        assert_eq!(c.listen.to_string(), "127.0.0.1:45123");
        assert_eq!(c.jwt_secret.as_deref(), Some(SECRET));
        assert_eq!(c.publish_key.as_deref(), Some("K-0123456789abcdef"));
        assert_eq!(c.per_user_policy, PerUserPolicy::Reject);
        assert_eq!(
            c.allowed_origins,
            ["http://a.example", "http://b.example:8080"]
        );
        assert_eq!(c.replay_ttl_ms, 121_000);
        assert_eq!(c.demo_agent, Some(true));
        assert!(!c.allow_query_token);
        assert!(!c.dev_mode());
    }

    #[test]
    fn every_setting_has_a_flag() {
        for s in Config::SETTINGS {
            // Settings without their own value below: 42 within the row's range, or false.
            let fallback = match s.kind {
                SettingKind::Integer { min, max } | SettingKind::OptionalInteger { min, max } => {
                    min.max(42).min(max).to_string()
                }
                SettingKind::Bool | SettingKind::AutoBool => "false".to_owned(),
                SettingKind::OptionalAddress => "127.0.0.1:42".to_owned(),
                _ => "42".to_owned(),
            };
            let value = match s.name {
                "listen" => "0.0.0.0:1",
                "admin_listen" => "127.0.0.1:42",
                "jwt_algorithm" => "HS256",
                "jwt_secret"
                | "publish_key"
                | "inbound_key"
                | "jwt_issuer"
                | "jwt_audience"
                | "redis_url"
                | "redis_sentinel_password"
                | "redis_prefix"
                | "node_id" => SECRET,
                "engine" => "memory",
                "inbound_url" => "http://127.0.0.1:9/inbound",
                // Checked only with engine = "redis" and a rediss:// URL.
                "redis_tls_ca_file" => "/etc/redis/ca.pem",
                // Alone they fail the start (TLS needs both): shown unset.
                "jwt_public_key_file" | "tls_cert_file" | "tls_key_file" => "",
                "allow_query_token" | "demo_agent" | "dev" => "false",
                "allowed_origins" => "https://x.example",
                "per_user_policy" => "reject",
                "log_format" => "json",
                "heartbeat_timeout_ms" => "70000",
                _ => &fallback,
            };
            let flag = format!("--{}", s.flag);
            // inbound_url needs a key to start with.
            let c = if s.name == "inbound_url" {
                serve(&[&flag, value, "--inbound-key", SECRET])
            } else {
                serve(&[&flag, value])
            };
            let json = c.to_public_json(false);
            match s.name {
                "jwt_secret"
                | "publish_key"
                | "inbound_key"
                | "redis_url"
                | "redis_sentinel_password" => {
                    assert_eq!(json[format!("{}_set", s.name)], true)
                }
                "inbound_url" | "redis_tls_ca_file" => assert_eq!(json[s.name], value),
                "jwt_public_key_file" | "tls_cert_file" | "tls_key_file" => {
                    assert!(json[s.name].is_null())
                }
                "listen" | "admin_listen" | "jwt_algorithm" | "jwt_issuer" | "jwt_audience"
                | "per_user_policy" | "log_format" | "engine" | "redis_prefix" | "node_id" => {
                    assert_eq!(json[s.name], value, "{}", s.name)
                }
                "allow_query_token" | "demo_agent" | "dev" => {
                    assert_eq!(json[s.name], false, "{}", s.name)
                }
                "allowed_origins" => assert_eq!(json[s.name][0], value),
                "heartbeat_timeout_ms" => assert_eq!(json[s.name], 70_000),
                _ => assert_eq!(json[s.name].to_string(), fallback, "{}", s.name),
            }
        }
    }

    #[test]
    fn bare_bool_flag_means_true() {
        let c = serve(&["--demo-agent"]);
        assert_eq!(c.demo_agent, Some(true));
        let c = serve(&["serve", "--demo-agent", "--listen", "127.0.0.1:9"]);
        assert_eq!(c.demo_agent, Some(true));
        assert_eq!(c.listen.to_string(), "127.0.0.1:9");
        let c = serve(&["--allow-query-token", "--demo-agent", "false"]);
        assert!(c.allow_query_token);
        assert_eq!(c.demo_agent, Some(false));
        let c = serve(&["--demo-agent=off"]);
        assert_eq!(c.demo_agent, Some(false));
        // Before the subcommand, the subcommand's name is not taken as the flag's value.
        let c = serve(&["--demo-agent", "serve", "--listen", "127.0.0.1:10"]);
        assert_eq!(c.demo_agent, Some(true));
        assert_eq!(c.listen.to_string(), "127.0.0.1:10");
        let result = run(&["--allow-query-token", "token", "--sub", "u"], &[]);
        let Ok(Command::Token { config, .. }) = result else {
            panic!("{result:?}")
        };
        assert!(config.allow_query_token);
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let path = temp_file(
            "layers",
            "max_connections = 100\nmax-connections-per-user = 5\nreplay_events = 7\n",
        );
        let p = path.to_str().unwrap();
        let env = [
            ("AGENTWIRE_MAX_CONNECTIONS", "200"),
            ("AGENTWIRE_MAX_CONNECTIONS_PER_USER", "6"),
        ];
        let result = run(&["serve", "--config", p, "--max-connections", "300"], &env);
        std::fs::remove_file(&path).unwrap();
        let Ok(Command::Serve {
            config: c,
            warnings,
        }) = result
        else {
            panic!("{result:?}")
        };
        assert!(warnings.is_empty());
        assert_eq!(c.max_connections, 300);
        assert_eq!(c.max_connections_per_user, 6);
        assert_eq!(c.replay_events, 7);
        assert_eq!(c.shutdown_grace_ms, 5_000);
    }

    #[test]
    fn config_file_from_env_and_unreadable_file() {
        let path = temp_file("envfile", "replay_events = 3\n");
        let result = run(&[], &[("AGENTWIRE_CONFIG", path.to_str().unwrap())]);
        std::fs::remove_file(&path).unwrap();
        let Ok(Command::Serve { config, warnings }) = result else {
            panic!("{result:?}")
        };
        assert_eq!(config.replay_events, 3);
        assert!(
            warnings.is_empty(),
            "AGENTWIRE_CONFIG is not an unknown variable"
        );

        let err = run(&["--config", "/nonexistent/agentwire.toml"], &[]).unwrap_err();
        assert!(matches!(err, CliError::ReadConfig { .. }));
        assert!(err.to_string().contains("/nonexistent/agentwire.toml"));
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn bad_flag_values_name_the_setting() {
        for (flag, value, name) in [
            ("--max-connections", "abc", "max_connections"),
            ("--max-connections", "-5", "max_connections"),
            ("--allow-query-token", "maybe", "allow_query_token"),
            ("--per-user-policy", "drop", "per_user_policy"),
            ("--listen", "nowhere", "listen"),
            ("--jwt-algorithm", "none", "jwt_algorithm"),
        ] {
            let err = run(&[flag, value], &[]).unwrap_err();
            assert!(matches!(err, CliError::Config(_)), "{flag}: {err}");
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("invalid value for {name} from flag {flag}: ")),
                "{msg}"
            );
            assert_eq!(err.exit_code(), 2);
        }
        // Cross-field checks run too.
        let err = run(&["--jwt-algorithm", "RS256"], &[]).unwrap_err();
        assert!(err.to_string().contains("jwt_public_key_file"), "{err}");
        let err = run(&["--jwt-secret", "short"], &[]).unwrap_err();
        assert!(
            err.to_string().contains("jwt_secret") && !err.to_string().contains("short\""),
            "{err}"
        );
    }

    #[test]
    fn env_values_go_through_the_same_parser() {
        let err = run(&[], &[("AGENTWIRE_REPLAY_TTL_MS", "soon")]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid value for replay_ttl_ms from environment variable"),
            "{err}"
        );
        let Ok(Command::Serve { config, warnings }) = run(
            &[],
            &[("AGENTWIRE_DEMO_AGENT", "yes"), ("AGENTWIRE_NOPE", "1")],
        ) else {
            panic!()
        };
        assert_eq!(config.demo_agent, Some(true));
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn repeated_flag_last_wins() {
        let c = serve(&["--max-connections", "5", "--max-connections", "6"]);
        assert_eq!(c.max_connections, 6);
    }

    #[test]
    fn token_subcommand() {
        let result = run(&["token", "--sub", "u1", "--jwt-secret", SECRET], &[]);
        let Ok(Command::Token { config, sub, ttl_s }) = result else {
            panic!("{result:?}")
        };
        assert_eq!(sub, "u1");
        assert_eq!(ttl_s, DEFAULT_TOKEN_TTL_S);
        assert_eq!(config.jwt_secret.as_deref(), Some(SECRET));
        assert_eq!(config.jwt_algorithm, JwtAlgorithm::Hs256);

        let result = run(
            &["token", "--sub", "u2", "--ttl-s", "60"],
            &[("AGENTWIRE_JWT_SECRET", SECRET)],
        );
        let Ok(Command::Token { sub, ttl_s, config }) = result else {
            panic!("{result:?}")
        };
        assert_eq!((sub.as_str(), ttl_s), ("u2", 60));
        assert_eq!(config.jwt_secret.as_deref(), Some(SECRET));

        // No secret: the config comes back, the caller reports it.
        let result = run(&["token", "--sub", "u3"], &[]);
        let Ok(Command::Token { config, .. }) = result else {
            panic!("{result:?}")
        };
        assert!(config.jwt_secret.is_none());

        for bad in [
            &["token"][..],
            &["token", "--sub", ""],
            &["token", "--sub", "u", "--ttl-s", "0"],
            &["token", "--sub", "u", "--ttl-s", "-1"],
        ] {
            assert!(matches!(run(bad, &[]), Err(CliError::Clap(_))), "{bad:?}");
        }
        let long = "x".repeat(UserId::MAX_BYTES + 1);
        assert!(matches!(
            run(&["token", "--sub", &long], &[]),
            Err(CliError::Clap(_))
        ));
    }

    #[test]
    fn help_and_version_exit_zero() {
        for args in [
            &["--help"][..],
            &["serve", "--help"],
            &["token", "--help"],
            &["--version"],
            &["serve", "--version"],
        ] {
            match run(args, &[]) {
                Err(CliError::Clap(e)) => assert_eq!(e.exit_code(), 0, "{args:?}"),
                other => panic!("{args:?}: {other:?}"),
            }
        }
        let help = command().render_long_help().to_string();
        for s in Config::SETTINGS {
            assert!(help.contains(&format!("--{}", s.flag)), "{}", s.flag);
            assert!(
                help.contains(&format!("[default: {}]", s.default_text())),
                "{}",
                s.name
            );
        }
        assert!(help.contains("--config"));
        // Rendered through parsing, so the global setting flags are propagated.
        let Err(CliError::Clap(e)) = run(&["token", "--help"], &[]) else {
            panic!()
        };
        let token_help = e.to_string();
        assert!(
            token_help.contains("--ttl-s") && token_help.contains("[default: 3600]"),
            "{token_help}"
        );
        assert!(token_help.contains("--max-connections"));
    }

    #[test]
    fn unknown_flag_and_subcommand_are_usage_errors() {
        let err = run(&["--max-conections", "5"], &[]).unwrap_err();
        assert!(matches!(&err, CliError::Clap(e) if e.exit_code() == 2));
        assert!(matches!(run(&["frobnicate"], &[]), Err(CliError::Clap(_))));
    }
}
