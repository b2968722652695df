//! Unit tests of the settings table, the parsers and the layering of sources.
//! Compiled only under `#[cfg(test)]` (declared so in `config/mod.rs`).

use std::path::Path;

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const SECRET: &str = "0123456789abcdef-secret";

/// A value (other than the default) for each setting, in string form, and a check. A
/// setting not listed gets [`generic_sample`].
fn sample(name: &str) -> String {
    let sample = match name {
        "listen" => "0.0.0.0:9000",
        "jwt_algorithm" => "es256",
        "jwt_secret" => SECRET,
        "jwt_public_key_file" => "/etc/agentwire/key.pem",
        "jwt_issuer" => "https://issuer.example",
        "jwt_audience" => "agentwire",
        "jwt_leeway_s" => "7",
        "allow_query_token" => "false",
        "allowed_origins" => "http://a.example, http://b.example:8080",
        "publish_key" => "pub-key-value-0123456789",
        "max_connections" => "500",
        "max_connections_per_user" => "9",
        "per_user_policy" => "reject",
        "log_format" => "json",
        "max_message_bytes" => "1000",
        "max_publish_bytes" => "2000",
        "max_pending_bytes" => "3000",
        "heartbeat_interval_ms" => "1000",
        "heartbeat_timeout_ms" => "2500",
        "handshake_timeout_ms" => "700",
        "replay_events" => "16",
        "replay_ttl_ms" => "121000",
        "run_idle_timeout_ms" => "9000",
        "shutdown_grace_ms" => "0",
        "demo_agent" => "true",
        "inbound_url" => "https://worker.example:8443/agentwire/inbound",
        "engine" => "redis",
        _ => return generic_sample(name),
    };
    sample.to_owned()
}

/// A value other than the default for a setting [`sample`] does not list, chosen from its
/// kind, so that a new row of the table is covered without a test edit. When the pick
/// fails a cross-setting check, give the setting a `sample` (or `companions`) entry.
fn generic_sample(name: &str) -> String {
    let setting = Config::setting(name).unwrap_or_else(|| panic!("no setting {name}"));
    let defaults = Config::default();
    let default = setting.value(&defaults);
    match setting.kind {
        SettingKind::Integer { min, max } | SettingKind::OptionalInteger { min, max } => {
            let pick = match default.integer() {
                Some(d) if d < max => d + 1,
                Some(d) => d - 1,
                None => max.min(min.max(3_600)),
            };
            pick.to_string()
        }
        SettingKind::Bool => (default.json() != serde_json::Value::Bool(true)).to_string(),
        SettingKind::AutoBool => "true".into(),
        SettingKind::Secret => "generic-sample-secret-0123456789".into(),
        SettingKind::Text => "generic sample".into(),
        SettingKind::Path => "/etc/agentwire/generic-sample".into(),
        SettingKind::OptionalAddress => "127.0.0.1:9100".into(),
        other => panic!("no generic sample for {name} of kind {other:?}: add one to `sample`"),
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
        "publish_key" => assert_eq!(c.publish_key.as_deref(), Some("pub-key-value-0123456789")),
        "max_connections" => assert_eq!(c.max_connections, 500),
        "max_connections_per_user" => assert_eq!(c.max_connections_per_user, 9),
        "per_user_policy" => assert_eq!(c.per_user_policy, PerUserPolicy::Reject),
        "log_format" => assert_eq!(c.log_format, LogFormat::Json),
        "max_message_bytes" => assert_eq!(c.max_message_bytes, 1000),
        "max_publish_bytes" => assert_eq!(c.max_publish_bytes, 2000),
        "max_pending_bytes" => assert_eq!(c.max_pending_bytes, 3000),
        "heartbeat_interval_ms" => assert_eq!(c.heartbeat_interval_ms, 1000),
        "heartbeat_timeout_ms" => assert_eq!(c.heartbeat_timeout_ms, 2500),
        "handshake_timeout_ms" => assert_eq!(c.handshake_timeout_ms, 700),
        "replay_events" => assert_eq!(c.replay_events, 16),
        "replay_ttl_ms" => assert_eq!(c.replay_ttl_ms, 121_000),
        "run_idle_timeout_ms" => assert_eq!(c.run_idle_timeout_ms, 9000),
        "shutdown_grace_ms" => assert_eq!(c.shutdown_grace_ms, 0),
        "demo_agent" => assert_eq!(c.demo_agent, Some(true)),
        // A setting without its own check: it holds what `Config::set` makes of its sample,
        // which is not the default.
        other => {
            let setting = Config::setting(other).unwrap_or_else(|| panic!("no setting {other}"));
            let mut want = Config::default();
            want.set(other, &sample(other)).unwrap();
            let got = setting.value(c).json();
            assert_eq!(got, setting.value(&want).json(), "{other}");
            assert_ne!(got, setting.value(&Config::default()).json(), "{other}");
        }
    }
}

/// Settings a lone sample would fail validation for, and what makes it valid.
fn companions(name: &str) -> Vec<(&'static str, &'static str)> {
    match name {
        "jwt_algorithm" => vec![("jwt_public_key_file", "/etc/agentwire/key.pem")],
        "jwt_public_key_file" => vec![("jwt_algorithm", "RS256")],
        "tls_cert_file" => vec![("tls_key_file", "/etc/agentwire/tls.key")],
        "tls_key_file" => vec![("tls_cert_file", "/etc/agentwire/tls.crt")],
        "inbound_url" => vec![("inbound_key", "inbound-key-0123456789")],
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
        assert!(!s.help.is_empty() && !s.default_text().is_empty());
    }
    for (i, name) in Config::NAMES.iter().enumerate() {
        assert!(
            !Config::NAMES[..i].contains(name),
            "{name} is declared twice"
        );
    }
    // The settings of section 8 in v1; later issues add more.
    for name in [
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
        "shutdown_grace_ms",
        "demo_agent",
    ] {
        assert!(Config::NAMES.contains(&name), "{name} missing");
    }
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
    assert_eq!(c.log_format, LogFormat::Text);
    assert_eq!(c.max_message_bytes, 65_536);
    assert_eq!(c.max_publish_bytes, 1_048_576);
    assert_eq!(c.max_pending_bytes, 1_048_576);
    assert_eq!(c.heartbeat_interval_ms, 30_000);
    assert_eq!(c.heartbeat_timeout_ms, 60_000);
    assert_eq!(c.handshake_timeout_ms, 5_000);
    assert_eq!(c.replay_events, 1_024);
    assert_eq!(c.replay_ttl_ms, 120_000);
    assert_eq!(c.run_idle_timeout_ms, 300_000);
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
        let value = &sample(s.name);
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
        msg.starts_with("invalid value for max_connections in config file /etc/aw.toml: \"-3\""),
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
    // Issue 9 F11: a publish key as short as one character is refused.
    check(&|c| c.publish_key = Some("k".into()), "publish_key");
    check(
        &|c| c.publish_key = Some("x".repeat(MIN_ACCEPTED_SECRET_BYTES - 1)),
        "publish_key",
    );

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
    c.set("publish_key", "pub-key-value-0123456789").unwrap();
    c.set("allowed_origins", "http://a.example").unwrap();
    let json = c.to_public_json(false);
    let obj = json.as_object().unwrap();
    for s in Config::SETTINGS {
        if s.is_secret() {
            assert!(!obj.contains_key(s.name), "{}", s.name);
            assert!(obj.contains_key(&format!("{}_set", s.name)), "{}", s.name);
        } else {
            assert!(obj.contains_key(s.name), "{} missing", s.name);
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
        !text.contains(SECRET) && !text.contains("pub-key-value-0123456789"),
        "{text}"
    );
    let debug = format!("{c:?}");
    assert!(
        !debug.contains(SECRET) && !debug.contains("pub-key-value-0123456789"),
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

#[test]
fn every_row_type_stores_its_kind() {
    let c = Config::default();
    for s in Config::SETTINGS {
        assert!(s.value(&c).fits(s.kind), "{}: {:?}", s.name, s.kind);
    }
}

#[test]
fn default_text_reads_back_as_the_default() {
    let defaults = Config::default();
    for s in Config::SETTINGS {
        let text = s.default_text();
        let value = s.value(&defaults);
        if s.shown_default.is_some() || !value.is_set() {
            // `none`, `auto`, or a note such as "60000 (2 x interval)".
            continue;
        }
        let mut c = Config::default();
        c.set(s.name, &text)
            .unwrap_or_else(|e| panic!("{}: {text}: {e}", s.name));
        assert_eq!(s.value(&c).json(), value.json(), "{}", s.name);
    }
    let text = |name: &str| Config::setting(name).unwrap().default_text();
    assert_eq!(text("listen"), "127.0.0.1:8080");
    assert_eq!(text("jwt_algorithm"), "HS256");
    assert_eq!(text("jwt_secret"), "none");
    assert_eq!(text("max_pending_bytes"), "1048576");
    assert_eq!(text("per_user_policy"), "evict_oldest");
    assert_eq!(text("allowed_origins"), "empty (any origin)");
    assert_eq!(text("heartbeat_timeout_ms"), "60000 (2 x interval)");
}

#[test]
fn optional_integer_kind() {
    // No v1 setting has this kind yet (the next issues add some); its value type directly.
    let kind = SettingKind::OptionalInteger {
        min: 1,
        max: 86_400,
    };
    let mut v: Option<u64> = None;
    assert_eq!(v.shown(), "none");
    assert_eq!(v.json(), serde_json::Value::Null);
    assert_eq!(v.integer(), None);
    v.set(kind, " 600 ").unwrap();
    assert_eq!(v, Some(600));
    assert_eq!((v.integer(), v.json()), (Some(600), serde_json::json!(600)));
    for bad in ["0", "86401", "-1", "x", "1.5"] {
        assert_eq!(
            v.set(kind, bad).unwrap_err(),
            "expected none or a positive integer up to 86400"
        );
    }
    assert_eq!(v, Some(600), "unchanged after errors");
    v.set(kind, "NONE").unwrap();
    assert_eq!(v, None);
    v.set(kind, "5").unwrap();
    v.set(kind, "").unwrap();
    assert_eq!(v, None);
    assert!(v.fits(kind) && !v.fits(SettingKind::Integer { min: 1, max: 2 }));
    // A type asked for a kind it does not store refuses every value.
    let mut n: u64 = 5;
    assert!(n.set(kind, "6").is_err());
    assert_eq!(n, 5);
}

#[test]
fn jwt_max_lifetime_is_optional_and_positive() {
    let mut c = Config::default();
    c.set("jwt_max_lifetime_s", "3600").unwrap();
    assert_eq!(c.jwt_max_lifetime_s, Some(3600));
    for unset in ["", " none ", "NONE"] {
        c.set("jwt_max_lifetime_s", "60").unwrap();
        c.set("jwt_max_lifetime_s", unset).unwrap();
        assert_eq!(c.jwt_max_lifetime_s, None, "{unset:?}");
    }
    for bad in ["0", "-1", "1h", "315360001"] {
        assert!(c.set("jwt_max_lifetime_s", bad).is_err(), "{bad:?}");
    }
    c.set("socket_send_buffer_bytes", "0").unwrap();
    assert!(c.set("max_pending_total_bytes", "0").is_err());
    let public = c.to_public_json(false);
    assert_eq!(public["jwt_max_lifetime_s"], serde_json::Value::Null);
    assert_eq!(public["socket_send_buffer_bytes"], 0);
}

#[test]
fn inbound_url_is_checked_at_start() {
    let with = |url: &str, key: Option<&str>| {
        let mut c = Config {
            jwt_secret: Some(SECRET.into()),
            inbound_url: Some(url.into()),
            ..Config::default()
        };
        c.inbound_key = key.map(Into::into);
        c.validate()
    };
    let key = Some("inbound-key-0123456789");
    for good in [
        "http://127.0.0.1:9000/inbound",
        "https://worker.example/agentwire",
        "HTTP://worker.example",
        "http://[::1]:9000/",
    ] {
        assert!(with(good, key).is_ok(), "{good}: {:?}", with(good, key));
    }
    for (bad, why) in [
        ("ftp://worker.example/", "http:// or https://"),
        ("worker.example/inbound", "http:// or https://"),
        ("/inbound", "http:// or https://"),
        ("http://user:secret-pass@worker.example/", "user:password"),
        ("http://", "not a valid URL"),
        ("not a url at all", "http:// or https://"),
        ("http://bad host/", "not a valid URL"),
    ] {
        let err = with(bad, key).expect_err(bad).to_string();
        assert!(
            err.contains("inbound_url") && err.contains(why),
            "{bad}: {err}"
        );
        assert!(
            !err.contains("secret-pass"),
            "the value is never repeated: {err}"
        );
    }
    // A key is needed: inbound_key, or publish_key as its default.
    let err = with("http://127.0.0.1:9000/", None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("inbound_key"), "{err}");
    // ... except in dev mode, which generates the publish key.
    let dev = Config {
        inbound_url: Some("http://127.0.0.1:9000/".into()),
        ..Config::default()
    };
    assert!(dev.validate().is_ok(), "{:?}", dev.validate());
    let mut c = Config {
        jwt_secret: Some(SECRET.into()),
        inbound_url: Some("http://127.0.0.1:9000/".into()),
        publish_key: Some("pub-key-value-0123456789".into()),
        ..Config::default()
    };
    assert!(c.validate().is_ok());
    c.inbound_key = Some("short".into());
    let err = c.validate().unwrap_err().to_string();
    assert!(
        err.contains("inbound_key") && err.contains("16 bytes"),
        "{err}"
    );
}

#[test]
fn the_redis_engine_needs_a_redis_url_and_a_prefix_and_a_plain_node_id() {
    let mut c = Config {
        jwt_secret: Some(SECRET.into()),
        ..Config::default()
    };
    assert_eq!(c.engine, EngineKind::Memory);
    c.set("engine", " Redis ").unwrap();
    assert_eq!(c.engine, EngineKind::Redis);
    c.validate()
        .expect("the defaults are valid with engine redis");
    let fails_on = |c: &Config| match c.validate() {
        Err(ConfigError::Inconsistent { name, .. }) => name,
        other => panic!("expected a refusal, got {other:?}"),
    };
    // TLS (rediss://) and Sentinel are accepted; a CA file only with TLS.
    c.set("redis_url", "rediss://h:6380").unwrap();
    c.validate().unwrap();
    c.set("redis_tls_ca_file", "/etc/redis/ca.pem").unwrap();
    c.validate().unwrap();
    c.set("redis_url", "redis+sentinel://s1,s2:26380,[::1]/mymaster/1")
        .unwrap();
    assert_eq!(fails_on(&c), "redis_tls_ca_file");
    c.set("redis_url", "rediss+sentinel://s1,s2:26380/mymaster")
        .unwrap();
    c.validate().unwrap();
    c.set("redis_tls_ca_file", "").unwrap();
    // The sentinels' password only with sentinels.
    c.set("redis_sentinel_password", "pw").unwrap();
    c.validate().unwrap();
    c.set("redis_url", "redis://h:6379").unwrap();
    assert_eq!(fails_on(&c), "redis_sentinel_password");
    c.set("redis_sentinel_password", "").unwrap();
    for bad in [
        "redis+sentinel://s1",
        "redis+sentinel://s1/",
        "redis+sentinel://s1:x/m",
        "rediss://h:6380/#insecure",
    ] {
        c.set("redis_url", bad).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("redis_url"), "{bad}: {err}");
    }
    c.set("redis_url", "http://h").unwrap();
    assert_eq!(fails_on(&c), "redis_url");
    c.set("redis_url", "").unwrap();
    assert_eq!(fails_on(&c), "redis_url");
    c.set("redis_url", "redis://:pw@h:6380/2").unwrap();
    c.set("redis_prefix", "").unwrap();
    assert_eq!(fails_on(&c), "redis_prefix");
    c.set("redis_prefix", "gw1").unwrap();
    c.set("node_id", "has space").unwrap();
    assert_eq!(fails_on(&c), "node_id");
    c.set("node_id", "node-1").unwrap();
    c.validate().unwrap();
    assert!(c.set("engine", "etcd").is_err());
    assert!(c.set("redis_timeout_ms", "0").is_err());
    // The URL may hold a password: /ws/config says only whether it is set.
    let public = c.to_public_json(false);
    assert_eq!(public["redis_url_set"], true);
    assert!(public.get("redis_url").is_none());
    assert_eq!(public["engine"], "redis");
    // The memory engine does not look at the Redis settings.
    c.set("engine", "memory").unwrap();
    c.set("node_id", "has space").unwrap();
    c.validate().unwrap();
}

/// Every setting has its row in the README's settings table (the reference of every
/// setting), so a new setting cannot land undocumented.
#[test]
fn every_setting_is_documented_in_the_readme() {
    let readme = include_str!("../../README.md");
    let table: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `")).collect();
    let missing: Vec<&str> = Config::SETTINGS
        .iter()
        .map(|s| s.name)
        .filter(|name| {
            let cell = format!("`{name}`");
            // A row names its setting(s) in its first cell: "| `a` |" or "| `a`, `b` |".
            !table
                .iter()
                .any(|row| row.split('|').nth(1).is_some_and(|c| c.contains(&cell)))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "settings missing from README.md's table: {missing:?}"
    );
}
