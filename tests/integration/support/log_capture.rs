//! Every log record the gateways of this test binary write, kept for checking that no
//! token, token signature or query string is ever logged (PROTOCOL.md section 3).
//!
//! [`install`] (called by every [`TestGateway::start`]) installs a `log` logger at
//! trace level that keeps, as one line each, every record whose target is the
//! gateway's (`agentwire::*`, from any thread) and every record another crate
//! (tungstenite, mio) writes on one of the gateway's own threads (named
//! `agentwire-*`), at the levels the `agentwire` binary lets through for it
//! ([`agentwire::log_level_allowed`]). Records of the test clients (which also use
//! tungstenite, on the test threads) are not the gateway's and are not kept.
//!
//! Every token the harness mints is registered ([`register_secret`]): its segments
//! of 16 characters or more (the signature always is). [`violations`] lists the lines
//! holding a registered segment, `token=` or a `?`; [`assert_clean`] fails a test with
//! them, and a process-exit hook runs the same check over the log of the whole run
//! (every test of the binary), failing the run with exit status 1.

use std::collections::HashSet;
use std::sync::{Mutex, Once};

use log::{Level, LevelFilter, Log, Metadata, Record};

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static SECRETS: Mutex<Option<HashSet<String>>> = Mutex::new(None);
static INSTALL: Once = Once::new();

/// Segments shorter than this are not registered (`a.b.c` would match any "a").
const MIN_SEGMENT: usize = 16;

struct Capture;

fn kept(target: &str, level: Level) -> bool {
    if target.starts_with("agentwire") {
        return true;
    }
    let on_gateway_thread = std::thread::current()
        .name()
        .is_some_and(|n| n.starts_with("agentwire-"));
    if !on_gateway_thread {
        return false;
    }
    agentwire::log_level_allowed(target, level)
}

impl Log for Capture {
    fn enabled(&self, m: &Metadata) -> bool {
        kept(m.target(), m.level())
    }

    fn log(&self, r: &Record) {
        if !kept(r.target(), r.level()) {
            return;
        }
        let line = format!("{} {} {}", r.level(), r.target(), r.args());
        LINES.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }

    fn flush(&self) {}
}

static LOGGER: Capture = Capture;

extern "C" {
    fn atexit(callback: extern "C" fn()) -> std::os::raw::c_int;
    fn _exit(status: std::os::raw::c_int) -> !;
}

/// At process exit: the check over the whole run's log. No panic may cross this
/// `extern "C"` boundary, so nothing here unwraps.
extern "C" fn check_at_exit() {
    let bad = violations();
    let lines = LINES.lock().map(|l| l.len()).unwrap_or(0);
    let secrets = SECRETS
        .lock()
        .ok()
        .and_then(|s| s.as_ref().map(HashSet::len))
        .unwrap_or(0);
    if bad.is_empty() {
        eprintln!(
            "log capture: {lines} gateway log lines checked against {secrets} token \
             segments, token= and '?': clean"
        );
        return;
    }
    eprintln!(
        "log capture: {} of {lines} gateway log lines leak a token, a signature or a \
         query string:",
        bad.len()
    );
    for line in bad.iter().take(20) {
        eprintln!("  {line}");
    }
    // SAFETY: `_exit` ends the process at once; nothing runs after it.
    unsafe { _exit(1) }
}

/// Install the capturing logger (once per process; a no-op afterwards). If another
/// logger was installed first, capture is off and the process-exit check says so.
pub fn install() {
    INSTALL.call_once(|| {
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(LevelFilter::Trace);
            // SAFETY: registers a plain function with the C runtime's exit hooks.
            let rc = unsafe { atexit(check_at_exit) };
            assert_eq!(rc, 0, "atexit registration");
        } else {
            eprintln!("log capture: another logger is installed; gateway logs not checked");
        }
    });
}

/// Remember a token: none of its long segments may ever appear in a log line.
pub fn register_secret(token: &str) {
    let mut secrets = SECRETS.lock().unwrap_or_else(|e| e.into_inner());
    let set = secrets.get_or_insert_with(HashSet::new);
    for segment in token.split('.').filter(|s| s.len() >= MIN_SEGMENT) {
        set.insert(segment.to_owned());
    }
}

/// Captured lines so far (a copy).
pub fn lines() -> Vec<String> {
    LINES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The captured lines holding a registered token segment (as a whole run of
/// base64url characters, the way a token or its parts would be printed), the text
/// `token=`, or a `?` (the start of a query string).
pub fn violations() -> Vec<String> {
    let lines = LINES.lock().unwrap_or_else(|e| e.into_inner()).clone();
    violations_in(&lines)
}

/// The same check as [`violations`] over other lines: the `agentwire` binary's stderr
/// (text or `log_format = json`).
pub fn violations_in(lines: &[String]) -> Vec<String> {
    let secrets = SECRETS.lock().unwrap_or_else(|e| e.into_inner());
    let empty = HashSet::new();
    let secrets = secrets.as_ref().unwrap_or(&empty);
    let is_b64url = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    lines
        .iter()
        .filter(|line| {
            line.contains("token=")
                || line.contains('?')
                || line
                    .split(|c: char| !is_b64url(c))
                    .any(|run| run.len() >= MIN_SEGMENT && secrets.contains(run))
        })
        .cloned()
        .collect()
}

/// Fail the calling test if any captured line so far leaks a secret.
pub fn assert_clean() {
    let bad = violations();
    assert!(
        bad.is_empty(),
        "gateway log lines leak a token, a signature or a query string:\n{}",
        bad.join("\n")
    );
}
