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
//! The line format is env_logger's default one (`[2026-01-01T00:00:00.000Z INFO
//! target] message`, UTC with milliseconds), which tests and log tools read. The level
//! caps of [`crate::LOG_LEVEL_CAPS`] apply whatever the filter says, so token-bearing
//! library logs never get through.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

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
}

impl log::Log for Sink {
    fn enabled(&self, m: &log::Metadata) -> bool {
        crate::log_level_allowed(m.target(), m.level()) && log::Log::enabled(&self.filter, m)
    }

    fn log(&self, r: &log::Record) {
        if !crate::log_level_allowed(r.target(), r.level()) || !self.filter.matches(r) {
            return;
        }
        let line = format_line(SystemTime::now(), r.level(), r.target(), r.args());
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
    install(env_logger::Builder::new().filter_level(level).build())
}

/// Install the sink with `RUST_LOG`-style directives read from the environment
/// variable `RUST_LOG` (`default` when it is unset), as the `agentwire` binary does.
///
/// # Errors
/// As [`init`].
pub fn init_from_env(default: &str) -> Result<(), InitError> {
    install(
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
            .build(),
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

fn install(filter: env_logger::Logger) -> Result<(), InitError> {
    let max = filter.filter();
    let (tx, rx) = crossbeam_channel::bounded(QUEUE_LINES);
    let sink = Sink { filter, tx };
    log::set_boxed_logger(Box::new(sink)).map_err(|_| InitError::AlreadySet)?;
    std::thread::Builder::new()
        .name("agentwire-log".into())
        .spawn(move || write_lines(&rx, &mut std::io::stderr()))?;
    log::set_max_level(max);
    Ok(())
}

/// The writer thread: copy queued lines to `out`; after a write, report lines dropped
/// meanwhile. Ends when every sender is gone.
fn write_lines<W: std::io::Write>(rx: &Receiver<Msg>, out: &mut W) {
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
            let line = format_line(
                SystemTime::now(),
                log::Level::Warn,
                "agentwire::log_sink",
                &format_args!(
                    "{lost} log lines dropped: the log output (stderr) did not keep up; \
                     {} dropped since start",
                    dropped_lines()
                ),
            );
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
        write_lines(&rx, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("one\n"), "{text}");
        assert!(text.contains("log lines dropped"), "{text}");
    }
}
