//! The `agentwire` binary: parse configuration (file, env, flags), set up logging,
//! then either run the gateway (`serve`, the default) or print a token (`token`).
//! Exit codes: 0 on a clean shutdown, 2 for bad configuration or usage, 1 when the
//! gateway could not start or its loop failed.

use std::io::Write as _;
use std::process::ExitCode;

use agentwire::__internal::auth;
use agentwire::__internal::cli::{self, Command};
use agentwire::{Config, Gateway};

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let parsed = cli::parse(args.clone(), env.clone());
    // The log format is a setting: the sink starts once the configuration is read (a bad
    // configuration is reported on stderr by `CliError::exit`, not as a log line).
    init_logging(match &parsed {
        Ok(Command::Serve { config, .. }) | Ok(Command::Token { config, .. }) => config.log_format,
        Err(_) => agentwire::LogFormat::Text,
    });
    let code = match parsed {
        Ok(Command::Serve { config, warnings }) => {
            for w in warnings {
                log::warn!("{w}");
            }
            serve(config, Invocation { args, env })
        }
        Ok(Command::Token { config, sub, ttl_s }) => token(&config, &sub, ttl_s),
        Err(e) => e.exit(),
    };
    // Let the log writer finish the last lines (bounded: a stalled stderr cannot hold
    // the exit).
    log::logger().flush();
    code
}

/// The non-blocking log sink ([`agentwire::log_sink`]) configured by `RUST_LOG`
/// (default `info`), behind the level caps of [`agentwire::LOG_LEVEL_CAPS`], which no
/// `RUST_LOG` directive can lift, writing `format` lines (`log_format`). A full log pipe
/// drops lines, never stalls the loop.
fn init_logging(format: agentwire::LogFormat) {
    if let Err(e) = agentwire::log_sink::init_from_env_as("info", format) {
        eprintln!("agentwire: logging disabled: {e}");
    }
}

fn token(config: &Config, sub: &str, ttl_s: u64) -> ExitCode {
    let minted = agentwire::authenticator(config)
        .map_err(|e| e.to_string())
        .and_then(|a| a.mint(sub, ttl_s).map_err(|e| e.to_string()));
    match minted {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agentwire token: {e} (token needs jwt_secret with jwt_algorithm HS256)");
            ExitCode::from(2)
        }
    }
}

/// The command line and environment of the start, read again by each SIGHUP reload.
struct Invocation {
    args: Vec<std::ffi::OsString>,
    env: Vec<(String, String)>,
}

impl Invocation {
    /// The configuration as the start would read it now: the config file named at
    /// start (`--config` / `AGENTWIRE_CONFIG`) is read again; the environment and flags
    /// are those of the start (a running process's environment cannot be changed from
    /// outside). What the start decided itself is carried over: the demo agent and page,
    /// and in dev mode the generated secret and publish key.
    fn reload_source(self, start: &Config) -> impl FnMut() -> Result<Config, String> + Send {
        let start = start.clone();
        move || match cli::parse(self.args.clone(), self.env.clone()) {
            Ok(Command::Serve {
                mut config,
                warnings,
            }) => {
                for w in warnings {
                    log::warn!("{w}");
                }
                config.demo_agent = start.demo_agent;
                config.demo_page = start.demo_page;
                if config.dev_mode() {
                    config.jwt_secret.clone_from(&start.jwt_secret);
                    config.publish_key.clone_from(&start.publish_key);
                }
                Ok(config)
            }
            Ok(Command::Token { .. }) => Err("the command line is not `serve`".to_owned()),
            Err(e) => Err(e.to_string().trim().to_owned()),
        }
    }
}

fn serve(mut config: Config, invocation: Invocation) -> ExitCode {
    let dev = config.dev_mode();
    if dev && !config.dev && !config.listen.ip().is_loopback() {
        eprintln!(
            "agentwire: invalid dev: no JWT key is configured (dev mode: a generated secret, \
             the publish key printed below) and listen {} is not loopback; set jwt_secret or \
             jwt_public_key_file, listen on 127.0.0.1, or pass --dev (AGENTWIRE_DEV=true) to \
             run dev mode on this address",
            config.listen
        );
        return ExitCode::from(2);
    }
    // Decide the demo agent before a dev secret makes the config look configured.
    config.demo_agent = Some(config.demo_agent_effective());
    config.demo_page = Some(config.demo_page_effective());
    if dev {
        let secret = auth::try_generate_secret().and_then(|secret| {
            let publish_key = match config.publish_key.take() {
                Some(key) => key,
                None => format!("pk-dev-{}", &auth::try_generate_secret()?[..24]),
            };
            Ok((secret, publish_key))
        });
        match secret {
            Ok((secret, publish_key)) => {
                config.jwt_secret = Some(secret);
                config.publish_key = Some(publish_key);
            }
            Err(e) => {
                eprintln!("agentwire: {e}");
                return ExitCode::from(1);
            }
        }
    }
    check_open_file_limit(&config);
    let built = if dev {
        Gateway::new_dev(config.clone())
    } else {
        Gateway::new(config.clone())
    };
    let mut gateway = match built {
        Ok(g) => g,
        Err(e) => {
            eprintln!("agentwire: {e}");
            return ExitCode::from(match e {
                agentwire::Error::Config(_) | agentwire::Error::Tls(_) => 2,
                _ => 1,
            });
        }
    };
    gateway.reload_config_with(invocation.reload_source(&config));
    if let Err(e) = gateway.handle_signals() {
        eprintln!("agentwire: cannot install signal handlers: {e}");
        return ExitCode::from(1);
    }
    let addr = gateway.local_addr();
    if gateway.demo_agent_enabled() {
        if let Some(inbound) = gateway.inbound() {
            if let Err(e) = agentwire::demo::spawn(gateway.emitter(), inbound) {
                eprintln!("agentwire: cannot start the demo agent: {e}");
                return ExitCode::from(1);
            }
            log::info!("demo agent on: every user_message gets a demo run");
        }
    }
    if dev {
        print_dev_banner(&config, addr, gateway.admin_addr().unwrap_or(addr));
    } else if config.demo_page == Some(true) {
        let http = if config.tls_cert_file.is_some() {
            "https"
        } else {
            "http"
        };
        log::info!("demo page on: {http}://{addr}/ (log in needs POST /dev/token: dev mode only)");
    }
    if config.publish_key.is_some() {
        log::info!("publish API enabled: POST /api/events with the publish key");
    } else {
        log::info!("publish API disabled (POST /api/events answers 404): set publish_key");
    }
    if let Some(cert) = &config.tls_cert_file {
        log::info!(
            "TLS on: wss:// and https:// only, certificate {} (SIGHUP reloads it)",
            cert.display()
        );
    }
    log::info!(
        "agentwire {} listening on {addr} (epoch {})",
        env!("CARGO_PKG_VERSION"),
        gateway.epoch()
    );
    if let Some(admin) = gateway.admin_addr() {
        log::info!(
            "admin listener on {admin}: /metrics, /ws/stats, /ws/config and /health \
             (the first three answer 404 on {addr})"
        );
    }
    match gateway.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(1)
        }
    }
}

/// Descriptors needed beyond the connections: listener, poll, waker, signal pipe, the
/// reserve descriptor, log and demo threads, files.
const FD_HEADROOM: u64 = 64;

/// Compare the open-file limit (`RLIMIT_NOFILE`) with what the settings need
/// (`max_connections + max_http_connections +` [`FD_HEADROOM`]): raise the soft limit
/// toward the hard limit when it is lower, and warn when even that is not enough
/// (connections past the limit are then answered 503 `overloaded`).
fn check_open_file_limit(config: &Config) {
    let need = (config.max_connections as u64)
        .saturating_add(config.max_http_connections as u64)
        .saturating_add(FD_HEADROOM);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        log::warn!("cannot read the open-file limit (RLIMIT_NOFILE)");
        return;
    }
    let soft: u64 = lim.rlim_cur;
    let hard: u64 = lim.rlim_max;
    if soft >= need {
        return;
    }
    let mut have = soft;
    let target = need.min(hard);
    if target > soft {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit through a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            log::info!("raised the open-file limit (ulimit -n) from {soft} to {target}");
            have = target;
        } else {
            log::warn!("cannot raise the open-file limit (ulimit -n) from {soft} to {target}");
        }
    }
    if have < need {
        log::warn!(
            "open-file limit (ulimit -n) is {have}, below max_connections + \
             max_http_connections + {FD_HEADROOM} = {need}: past it new connections are \
             answered 503 overloaded; raise the hard limit or lower max_connections"
        );
    }
}

fn print_dev_banner(config: &Config, addr: std::net::SocketAddr, admin: std::net::SocketAddr) {
    let token = agentwire::authenticator(config)
        .ok()
        .and_then(|a| a.mint("demo-user", 24 * 3600).ok())
        .unwrap_or_default();
    let secret = config.jwt_secret.as_deref().unwrap_or("");
    let key = config.publish_key.as_deref().unwrap_or("");
    // With tls_cert_file the port speaks only TLS (the certificate must name the host).
    let (http, ws) = if config.tls_cert_file.is_some() {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    // The admin listener (admin_listen) is plain HTTP; without one the admin endpoints
    // are on `listen`, TLS or not.
    let admin_http = if admin == addr { http } else { "http" };
    let page = if config.demo_page == Some(true) {
        format!("Demo page: open {http}://{addr}/ in a browser")
    } else {
        "Demo page off (demo_page = false)".to_owned()
    };
    let answered_by = if config.inbound_url.is_some() {
        "the worker at inbound_url answers every user_message; its key is the publish key"
    } else {
        "the demo agent answers every user_message with a run"
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        r#"
================================================================================
 agentwire DEV MODE: NOT FOR PRODUCTION
 No JWT key was configured, so a random secret was generated for this run.
 Set --jwt-secret (or AGENTWIRE_JWT_SECRET / jwt_public_key_file) in production.
================================================================================
 {page}
================================================================================
 jwt secret : {secret}
 publish key: {key}
 token (sub=demo-user, 24 h):
   {token}

 Try it ({answered_by}):
   python3 -m websockets "{ws}://{addr}/ws?token={token}"
   then type:  {{"type":"user_message","thread_id":"t1","text":"hello"}}

 Publish a whole run from another process (log in on the page as demo-user to see it):
   curl -s -X POST {http}://{addr}/api/events -H 'Authorization: Bearer {key}' \
     -H 'Content-Type: application/json' -d '[
       {{"type":"agent_started","user_id":"demo-user","run_id":"r-curl-1","agent_name":"cli","data":{{}}}},
       {{"type":"text_delta","user_id":"demo-user","run_id":"r-curl-1","agent_name":"cli","data":{{"delta":"Hello from curl."}}}},
       {{"type":"agent_completed","user_id":"demo-user","run_id":"r-curl-1","agent_name":"cli","data":{{"answer":"Hello from curl."}}}}]'
   (the README's snippets read the key from AGENTWIRE_PUBLISH_KEY: export AGENTWIRE_PUBLISH_KEY={key})

 Health and figures:  curl {http}://{addr}/health   curl {admin_http}://{admin}/ws/stats
================================================================================
"#
    );
}
