//! A `log` sink that never blocks its caller: the line is formatted on the calling
//! thread (the reactor, a worker) and handed to a bounded queue; one writer thread
//! copies the queue to stderr. When stderr stalls (a log shipper that stopped reading
//! the pipe) the queue fills, further lines are dropped and counted
//! (`dropped_lines`, reported in `/ws/stats` and `/metrics`), and once the writer gets
//! going again it writes one `WARN` line saying how many were lost. Before this, one
//! `eprintln`-style write per refused upgrade froze the event loop on a full pipe.
//!
//! `Repeats` collapses repeated lines (the reactor uses it for refusals): within a
//! window the first few lines of a kind are written in full and the others are only
//! counted; when the window has passed, one line reports how many were left out.
//! `RateLog` aggregates one kind of line over a period (accept failures, publish key
//! failures): at most one line per period, with the count since the last.
//!
//! The text format (`log_format = text`, the default) is env_logger's default line
//! (`[2026-01-01T00:00:00.000Z INFO  target] message`, UTC with milliseconds), which tests
//! and log tools read. The JSON format (`log_format = json`) writes one object per line:
//! `{"ts":"2026-01-01T00:00:00.000Z","level":"INFO","target":"...","message":"..."}`
//! followed by the record's key-values (`log::info!(conn = id, ...; "...")`: `conn`,
//! `user`, `reason`, `code`, `duration_ms` on connection lines), numbers as numbers,
//! every string escaped by serde_json, so a message can never break the line. The level
//! caps of [`crate::LOG_LEVEL_CAPS`] apply whatever the filter says, so token-bearing
//! library logs never get through.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

pub use crate::config::LogFormat;

/// Lines waiting for the writer before new ones are dropped.
pub(crate) const QUEUE_LINES: usize = 4096;
/// How long [`log::Log::flush`] (called at exit) waits for the writer.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Lines dropped since the process started because the queue was full.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Lines dropped that the writer has not reported yet.
static UNREPORTED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped so far because the log writer could not keep up (0 when this sink
/// is not the installed logger).
pub(crate) fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

enum Msg {
    Line(String),
    Flush(Sender<()>),
}

/// The installed logger: a filter, then a formatted line into the queue.
struct Sink {
    filter: env_logger::Logger,
    tx: Sender<Msg>,
    format: LogFormat,
}

impl log::Log for Sink {
    fn enabled(&self, m: &log::Metadata) -> bool {
        crate::log_level_allowed(m.target(), m.level()) && log::Log::enabled(&self.filter, m)
    }

    fn log(&self, r: &log::Record) {
        if !crate::log_level_allowed(r.target(), r.level()) || !self.filter.matches(r) {
            return;
        }
        let line = match self.format {
            LogFormat::Text => format_line(SystemTime::now(), r.level(), r.target(), r.args()),
            LogFormat::Json => format_json_line(
                SystemTime::now(),
                r.level(),
                r.target(),
                r.args(),
                r.key_values(),
            ),
        };
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
                UNREPORTED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Waits (at most 2 s) until the writer has written every queued line: called at
    /// exit so the last lines are not lost; a stalled stderr cannot hold the exit.
    fn flush(&self) {
        let (ack_tx, ack_rx) = crossbeam_channel::bounded(1);
        if self.tx.send_timeout(Msg::Flush(ack_tx), FLUSH_WAIT).is_ok() {
            let _ = ack_rx.recv_timeout(FLUSH_WAIT);
        }
    }
}

/// Install the sink as the `log` logger, everything at `level` and below (behind
/// [`crate::LOG_LEVEL_CAPS`]). For embedders: `agentwire::log_sink::init(LevelFilter::Info)`.
///
/// # Errors
/// When a logger is already installed, or the writer thread cannot be started.
pub fn init(level: log::LevelFilter) -> Result<(), InitError> {
    install(
        env_logger::Builder::new().filter_level(level).build(),
        LogFormat::Text,
    )
}

/// Install the sink with `RUST_LOG`-style directives read from the environment
/// variable `RUST_LOG` (`default` when it is unset), text lines.
///
/// # Errors
/// As [`init`].
pub fn init_from_env(default: &str) -> Result<(), InitError> {
    init_from_env_as(default, LogFormat::Text)
}

/// As [`init_from_env`], lines written in `format` (`log_format`), as the `agentwire`
/// binary does.
///
/// # Errors
/// As [`init`].
pub fn init_from_env_as(default: &str, format: LogFormat) -> Result<(), InitError> {
    install(
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
            .build(),
        format,
    )
}

/// Why [`init`] failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// Another logger was installed first.
    #[error("a logger is already installed")]
    AlreadySet,
    /// The writer thread could not be spawned.
    #[error("cannot start the log writer thread: {0}")]
    Thread(#[from] std::io::Error),
}

fn install(filter: env_logger::Logger, format: LogFormat) -> Result<(), InitError> {
    let max = filter.filter();
    let (tx, rx) = crossbeam_channel::bounded(QUEUE_LINES);
    let sink = Sink { filter, tx, format };
    log::set_boxed_logger(Box::new(sink)).map_err(|_| InitError::AlreadySet)?;
    std::thread::Builder::new()
        .name("agentwire-log".into())
        .spawn(move || write_lines(&rx, &mut std::io::stderr(), format))?;
    log::set_max_level(max);
    Ok(())
}

/// The writer thread: copy queued lines to `out`; after a write, report lines dropped
/// meanwhile. Ends when every sender is gone.
fn write_lines<W: std::io::Write>(rx: &Receiver<Msg>, out: &mut W, format: LogFormat) {
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(Msg::Line(line)) => {
                let _ = out.write_all(line.as_bytes());
            }
            Ok(Msg::Flush(ack)) => {
                let _ = out.flush();
                let _ = ack.try_send(());
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let lost = UNREPORTED.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let (at, level, target) = (SystemTime::now(), log::Level::Warn, "agentwire::log_sink");
            let args = format_args!(
                "{lost} log lines dropped: the log output (stderr) did not keep up; \
                 {} dropped since start",
                dropped_lines()
            );
            let line = match format {
                LogFormat::Text => format_line(at, level, target, &args),
                LogFormat::Json => {
                    format_json_line(at, level, target, &args, &[] as &[(&str, u64); 0])
                }
            };
            let _ = out.write_all(line.as_bytes());
        }
    }
}

/// env_logger's default line: `[2026-01-01T00:00:00.000Z INFO  target] message\n`.
pub(crate) fn format_line(
    at: SystemTime,
    level: log::Level,
    target: &str,
    args: &std::fmt::Arguments<'_>,
) -> String {
    let mut line = String::with_capacity(96);
    line.push('[');
    push_utc_millis(&mut line, at);
    let _ = writeln!(line, " {level:<5} {target}] {args}");
    line
}

/// One JSON object and `\n`: `ts`, `level`, `target`, `message`, then the record's
/// key-values in order (a key named like one of the first four is left out). Integers
/// and booleans stay JSON numbers and booleans, a missing value (`None`) is `null`,
/// anything else is its `Display` text as a JSON string.
pub(crate) fn format_json_line(
    at: SystemTime,
    level: log::Level,
    target: &str,
    args: &std::fmt::Arguments<'_>,
    kvs: &dyn log::kv::Source,
) -> String {
    let mut line = String::with_capacity(160);
    let mut ts = String::with_capacity(24);
    push_utc_millis(&mut ts, at);
    line.push_str("{\"ts\":");
    push_json_str(&mut line, &ts);
    line.push_str(",\"level\":");
    push_json_str(&mut line, level.as_str());
    line.push_str(",\"target\":");
    push_json_str(&mut line, target);
    line.push_str(",\"message\":");
    match args.as_str() {
        Some(s) => push_json_str(&mut line, s),
        None => push_json_str(&mut line, &args.to_string()),
    }
    let _ = kvs.visit(&mut JsonFields(&mut line));
    line.push_str("}\n");
    line
}

/// A JSON string literal, escaped by serde_json.
fn push_json_str(out: &mut String, s: &str) {
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        Err(_) => out.push_str("\"\""),
    }
}

/// Appends `,"key":value` per key-value of a record.
struct JsonFields<'a>(&'a mut String);

impl<'kvs> log::kv::VisitSource<'kvs> for JsonFields<'_> {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        let key = key.as_str();
        if matches!(key, "ts" | "level" | "target" | "message") {
            return Ok(());
        }
        self.0.push(',');
        push_json_str(self.0, key);
        self.0.push(':');
        value.visit(JsonValue(self.0))
    }
}

/// One key-value's value as JSON.
struct JsonValue<'a>(&'a mut String);

impl<'v> log::kv::VisitValue<'v> for JsonValue<'_> {
    fn visit_any(&mut self, value: log::kv::Value) -> Result<(), log::kv::Error> {
        push_json_str(self.0, &value.to_string());
        Ok(())
    }
    fn visit_null(&mut self) -> Result<(), log::kv::Error> {
        self.0.push_str("null");
        Ok(())
    }
    fn visit_u64(&mut self, value: u64) -> Result<(), log::kv::Error> {
        let _ = write!(self.0, "{value}");
        Ok(())
    }
    fn visit_i64(&mut self, value: i64) -> Result<(), log::kv::Error> {
        let _ = write!(self.0, "{value}");
        Ok(())
    }
    fn visit_bool(&mut self, value: bool) -> Result<(), log::kv::Error> {
        self.0.push_str(if value { "true" } else { "false" });
        Ok(())
    }
    fn visit_str(&mut self, value: &str) -> Result<(), log::kv::Error> {
        push_json_str(self.0, value);
        Ok(())
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC), without a date crate.
fn push_utc_millis(out: &mut String, at: SystemTime) {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    );
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Collapses repeated log lines of one kind: per key, the first `burst` lines in a
/// window of `window_ms` are written, the rest are counted, and the count is reported
/// once the window has passed ([`Repeats::admit`] or [`Repeats::expired`]). At most
/// `max_keys` kinds are tracked; a new kind past that ends the oldest window early.
pub(crate) struct Repeats {
    window_ms: u64,
    burst: u64,
    max_keys: usize,
    /// (kind, window start, lines seen in the window).
    windows: Vec<(String, u64, u64)>,
}

impl Repeats {
    pub fn new(window_ms: u64, burst: u64, max_keys: usize) -> Repeats {
        Repeats {
            window_ms,
            burst: burst.max(1),
            max_keys: max_keys.max(1),
            windows: Vec::new(),
        }
    }

    /// One line of kind `key` at `now_ms`: true when it should be written in full,
    /// false when it was counted. Windows that ended are appended to `ended` as
    /// (kind, lines left out) when some were.
    pub fn admit(&mut self, key: &str, now_ms: u64, ended: &mut Vec<(String, u64)>) -> bool {
        self.expired(now_ms, ended);
        if let Some(w) = self.windows.iter_mut().find(|w| w.0 == key) {
            w.2 += 1;
            return w.2 <= self.burst;
        }
        if self.windows.len() >= self.max_keys {
            let oldest = self
                .windows
                .iter()
                .enumerate()
                .min_by_key(|(_, w)| w.1)
                .map(|(i, _)| i);
            if let Some(i) = oldest {
                let (k, _, n) = self.windows.swap_remove(i);
                if n > self.burst {
                    ended.push((k, n - self.burst));
                }
            }
        }
        self.windows.push((key.to_owned(), now_ms, 1));
        true
    }

    /// Close the windows that have passed by `now_ms`, reporting their counts.
    pub fn expired(&mut self, now_ms: u64, ended: &mut Vec<(String, u64)>) {
        let (window, burst) = (self.window_ms, self.burst);
        self.windows.retain(|(k, start, n)| {
            if now_ms.saturating_sub(*start) < window {
                return true;
            }
            if *n > burst {
                ended.push((k.clone(), *n - burst));
            }
            false
        });
    }
}

/// A log line aggregated over a period: [`RateLog::hit`] counts an occurrence and says
/// how many to report when a line is due (at most one per period).
#[derive(Default)]
pub(crate) struct RateLog {
    last: Option<u64>,
    count: u64,
}

impl RateLog {
    pub fn hit(&mut self, now: u64, period: u64) -> Option<u64> {
        self.count += 1;
        if self.last.is_some_and(|t| now < t + period) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_log_writes_one_line_per_period_with_the_count() {
        let mut log = RateLog::default();
        assert_eq!(log.hit(100, 10), Some(1));
        assert_eq!(log.hit(105, 10), None);
        assert_eq!(log.hit(109, 10), None);
        assert_eq!(log.hit(110, 10), Some(3));
        assert_eq!(log.hit(500, 10), Some(1));
    }

    #[test]
    fn timestamps_match_env_logger() {
        let at = UNIX_EPOCH + Duration::from_millis(1_796_590_727_631);
        let line = format_line(
            at,
            log::Level::Info,
            "agentwire::reactor",
            &format_args!("x={}", 1),
        );
        assert_eq!(
            line,
            "[2026-12-06T20:58:47.631Z INFO  agentwire::reactor] x=1\n"
        );
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        let mut s = String::new();
        push_utc_millis(&mut s, leap);
        assert_eq!(s, "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn json_lines_are_one_object_with_the_fields() {
        let at = UNIX_EPOCH + Duration::from_millis(1_796_590_727_631);
        let user = "al\"ice\n\u{1}";
        let code: Option<u16> = Some(1000);
        let none: Option<u16> = None;
        let kvs: [(&str, log::kv::Value); 6] = [
            ("conn", log::kv::Value::from_display(&"c0000002a")),
            ("user", log::kv::Value::from_display(&user)),
            ("reason", log::kv::Value::from("client_closed")),
            ("code", log::kv::ToValue::to_value(&code)),
            ("duration_ms", log::kv::Value::from(1234u64)),
            ("nothing", log::kv::ToValue::to_value(&none)),
        ];
        let line = format_json_line(
            at,
            log::Level::Info,
            "agentwire::reactor",
            &format_args!("conn={} user={user:?} closed \"quoted\"\ttab", "c0000002a"),
            &kvs,
        );
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1, "one line: {line}");
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["ts"], "2026-12-06T20:58:47.631Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "agentwire::reactor");
        assert_eq!(
            v["message"],
            format!("conn=c0000002a user={user:?} closed \"quoted\"\ttab")
        );
        assert_eq!(v["conn"], "c0000002a");
        assert_eq!(v["user"], user);
        assert_eq!(v["reason"], "client_closed");
        assert_eq!(v["code"], 1000);
        assert_eq!(v["duration_ms"], 1234);
        assert!(v["nothing"].is_null());
        assert!(line.starts_with("{\"ts\":"), "{line}");
    }

    #[test]
    fn json_lines_keep_the_fixed_keys() {
        let kvs: [(&str, log::kv::Value); 2] = [
            ("level", log::kv::Value::from("forged")),
            ("message", log::kv::Value::from("forged")),
        ];
        let line = format_json_line(
            UNIX_EPOCH,
            log::Level::Warn,
            "t",
            &format_args!("plain"),
            &kvs,
        );
        assert_eq!(
            line,
            "{\"ts\":\"1970-01-01T00:00:00.000Z\",\"level\":\"WARN\",\"target\":\"t\",\"message\":\"plain\"}\n"
        );
    }

    #[test]
    fn repeats_collapse_within_a_window() {
        let mut r = Repeats::new(1000, 3, 4);
        let mut ended = Vec::new();
        for t in 0..3 {
            assert!(r.admit("401", t, &mut ended), "the first 3 are written");
        }
        for t in 3..500 {
            assert!(!r.admit("401", t, &mut ended));
        }
        assert!(r.admit("403", 10, &mut ended));
        assert!(ended.is_empty());
        assert!(r.admit("401", 1000, &mut ended));
        assert_eq!(ended, vec![("401".to_owned(), 497)]);
        ended.clear();
        r.expired(5000, &mut ended);
        assert!(
            ended.is_empty(),
            "nothing was left out of the later windows"
        );
    }

    #[test]
    fn repeats_track_a_bounded_number_of_kinds() {
        let mut r = Repeats::new(1000, 1, 2);
        let mut ended = Vec::new();
        assert!(r.admit("a", 0, &mut ended));
        assert!(!r.admit("a", 1, &mut ended));
        assert!(r.admit("b", 2, &mut ended));
        assert!(r.admit("c", 3, &mut ended));
        assert_eq!(ended, vec![("a".to_owned(), 1)]);
        assert!(r.windows.len() <= 2);
    }

    #[test]
    fn writer_reports_dropped_lines_after_catching_up() {
        let (tx, rx) = crossbeam_channel::bounded(4);
        UNREPORTED.fetch_add(3, Ordering::Relaxed);
        DROPPED.fetch_add(3, Ordering::Relaxed);
        tx.send(Msg::Line("one\n".into())).unwrap();
        drop(tx);
        let mut out = Vec::new();
        write_lines(&rx, &mut out, LogFormat::Text);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("one\n"), "{text}");
        assert!(text.contains("log lines dropped"), "{text}");
    }
}
