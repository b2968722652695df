//! Counters and latency histograms owned by the reactor, and their two renderings:
//! JSON for `GET /ws/stats` and Prometheus text for `GET /metrics` (names prefixed
//! `agentwire_`). Only the reactor thread touches them: no atomics on the hot path.
//!
//! Every latency is kept twice, both fixed-size and allocation-free when recording: a
//! fine log-linear [`Histogram`] for the JSON percentiles (p50..max, exact to 1.6 %),
//! and [`Buckets`] with fixed upper bounds rendered as a Prometheus histogram
//! (`_bucket{le=...}`, `_sum`, `_count`, in seconds), which sums over nodes. The bounds
//! of each histogram are the `*_BUCKETS_US` constants below.
//!
//! Run metrics (PROTOCOL.md section 12) are recorded from a [`RunTransition`]: what one
//! routed event did to its run (began it, ended it with a [`RunOutcome`], finished a
//! tool call). The engine that owns the runs builds it (the memory engine in
//! `registry/runs.rs`); [`Stats::record_run`] is the one call, whichever engine.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};

use crate::close::CloseReason;
use crate::frames::ErrorCode;

/// Why an upgrade was refused (one counter each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    BadRequest,
    InvalidToken,
    Forbidden,
    NotFound,
    UpgradeRequired,
    TooManyConnections,
    HeadersTooLarge,
    ShuttingDown,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 8] = [
        RefusalReason::BadRequest,
        RefusalReason::InvalidToken,
        RefusalReason::Forbidden,
        RefusalReason::NotFound,
        RefusalReason::UpgradeRequired,
        RefusalReason::TooManyConnections,
        RefusalReason::HeadersTooLarge,
        RefusalReason::ShuttingDown,
    ];

    /// The refusal's `error` code, used as the label.
    /// The refusal's error code: the counter's label.
    pub const fn code(self) -> ErrorCode {
        match self {
            RefusalReason::BadRequest => ErrorCode::BadRequest,
            RefusalReason::InvalidToken => ErrorCode::InvalidToken,
            RefusalReason::Forbidden => ErrorCode::Forbidden,
            RefusalReason::NotFound => ErrorCode::NotFound,
            RefusalReason::UpgradeRequired => ErrorCode::UpgradeRequired,
            RefusalReason::TooManyConnections => ErrorCode::TooManyConnections,
            RefusalReason::HeadersTooLarge => ErrorCode::HeadersTooLarge,
            RefusalReason::ShuttingDown => ErrorCode::ShuttingDown,
        }
    }

    pub const fn as_str(self) -> &'static str {
        self.code().as_str()
    }

    pub fn from_status(status: u16) -> RefusalReason {
        match status {
            401 => RefusalReason::InvalidToken,
            403 => RefusalReason::Forbidden,
            404 => RefusalReason::NotFound,
            426 => RefusalReason::UpgradeRequired,
            429 => RefusalReason::TooManyConnections,
            431 => RefusalReason::HeadersTooLarge,
            503 => RefusalReason::ShuttingDown,
            _ => RefusalReason::BadRequest,
        }
    }
}

/// Why an event was not delivered (one counter each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The event's run had already ended.
    RunEnded,
    /// The user had no connection that takes it (still kept for replay).
    NoConnection,
    /// Refused at the publish API (bad event).
    Invalid,
    /// The connection was closed as a slow consumer before the event went out.
    SlowConsumer,
}

impl DropReason {
    pub const ALL: [DropReason; 4] = [
        DropReason::RunEnded,
        DropReason::NoConnection,
        DropReason::Invalid,
        DropReason::SlowConsumer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::RunEnded => "run_ended",
            DropReason::NoConnection => "no_connection",
            DropReason::Invalid => "invalid",
            DropReason::SlowConsumer => "slow_consumer",
        }
    }
}

/// Live figures the reactor passes in when rendering (they are not counters).
#[derive(Clone, Copy, Debug, Default)]
pub struct Gauges {
    pub connections_open: usize,
    pub users_online: usize,
    pub users_known: usize,
    pub active_runs: usize,
    pub timers: usize,
    pub pending_out_bytes: usize,
    /// Connections catching up on a resume, and the kept bytes they have yet to be sent.
    pub replaying: usize,
    pub replay_backlog_bytes: usize,
    pub uptime_s: u64,
    /// `max_pending_total_bytes` (used: `pending_out_bytes`).
    pub pending_total_limit: usize,
    /// `socket_send_buffer_bytes` (0: the kernel default), and the `SO_SNDBUF` the
    /// kernel reported for the last accepted socket (Linux doubles the request).
    pub send_buffer_limit: usize,
    pub send_buffer_effective: usize,
    /// Log lines dropped because the log writer could not keep up.
    pub log_lines_dropped: u64,
    /// Connections that have not upgraded (plain HTTP, handshakes in progress), and the
    /// request bytes they hold; with their limits (`max_http_connections`,
    /// `max_http_buffer_total_bytes`).
    pub http_open: usize,
    pub http_buffered_bytes: usize,
    pub http_open_limit: usize,
    pub http_buffer_limit: usize,
    /// An accept failed (descriptor limit) within the last few seconds.
    pub accept_degraded: bool,
    /// `user_message`s held by the reactor while the workers' channel is full (and the
    /// bytes charged for them, against the `inbound_held_bytes` budget's limit).
    pub inbound_held: usize,
    pub inbound_held_bytes: usize,
    pub inbound_held_limit: usize,
    /// Users revoked with `until` (some may have expired since the last sweep), against
    /// `max_revoked_users`.
    pub revoked_users: usize,
    pub revoked_users_limit: usize,
    /// The memory engine's registry: budgets, their use and what bounding them cost.
    pub memory: MemoryGauges,
    /// The inbound webhook's counters, when `inbound_url` is set.
    pub webhook: Option<crate::webhook::WebhookCounts>,
}

impl Gauges {
    /// Every budget as (name, limit, used): `pending_total` is unsent output over all
    /// connections against `max_pending_total_bytes`; `socket_send_buffer` is the
    /// per-socket `SO_SNDBUF` asked for against what the kernel applied;
    /// `http_connections` and `http_buffer_bytes` are the connections that have not
    /// upgraded and the request bytes they hold, against `max_http_connections` and
    /// `max_http_buffer_total_bytes`; `inbound_held_bytes` is what the `user_message`s
    /// held for room in the workers' channel are charged; `replay_memory_bytes` is kept
    /// events plus the per-user overhead against `replay_memory_bytes`; `active_runs`
    /// against `max_active_runs`; with `inbound_url` set, `inbound_in_flight` is the
    /// webhook requests out against `inbound_max_in_flight`.
    pub fn budgets(&self) -> Vec<(&'static str, u64, u64)> {
        let wide = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let mut budgets = vec![
            (
                "pending_total",
                wide(self.pending_total_limit),
                wide(self.pending_out_bytes),
            ),
            (
                "socket_send_buffer",
                wide(self.send_buffer_limit),
                wide(self.send_buffer_effective),
            ),
            (
                "http_connections",
                wide(self.http_open_limit),
                wide(self.http_open),
            ),
            (
                "http_buffer_bytes",
                wide(self.http_buffer_limit),
                wide(self.http_buffered_bytes),
            ),
            (
                "inbound_held_bytes",
                wide(self.inbound_held_limit),
                wide(self.inbound_held_bytes),
            ),
            (
                "replay_memory_bytes",
                wide(self.memory.replay_memory_limit),
                wide(self.memory.replay_memory_used),
            ),
            (
                "active_runs",
                wide(self.memory.active_runs_limit),
                wide(self.active_runs),
            ),
            (
                "revoked_users",
                wide(self.revoked_users_limit),
                wide(self.revoked_users),
            ),
        ];
        if let Some(w) = &self.webhook {
            budgets.push((
                "inbound_in_flight",
                wide(w.max_in_flight),
                wide(w.in_flight),
            ));
        }
        budgets
    }
}

/// The registry's budgets (`replay_memory_bytes`, `max_active_runs`), their use, and
/// the counters of what keeping within them dropped.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryGauges {
    /// Kept events' bytes plus the per-user overhead, and its limit.
    pub replay_memory_used: usize,
    pub replay_memory_limit: usize,
    pub active_runs_limit: usize,
    /// Kept events over all users, and their bytes (without the per-user overhead).
    pub replay_events: usize,
    pub replay_bytes: usize,
    /// Kept events dropped to stay within `replay_memory_bytes`.
    pub replay_evicted: u64,
    /// Users forgotten (idle for `replay_ttl_ms`, or idle when the budget needed room).
    pub users_forgotten: u64,
    /// New runs refused past `max_active_runs_per_user` / `max_active_runs`.
    pub runs_refused: u64,
    /// Idempotency keys remembered over all users, their bytes as counted in
    /// `replay_memory_bytes`, and keys dropped before expiry (per-user bound, budget).
    pub idempotency_keys: usize,
    pub idempotency_key_bytes: usize,
    pub idempotency_keys_dropped: u64,
}

/// Every counter of PROTOCOL.md section 6.
pub struct Stats {
    pub connections_opened: u64,
    pub connections_closed: u64,
    /// Closed sessions per [`CloseReason`] (indexed by it).
    closed_by_reason: [u64; CloseReason::ALL.len()],
    refused: [u64; RefusalReason::ALL.len()],
    pub http_requests: u64,
    pub events_emitted: u64,
    pub events_published: u64,
    /// Repeats of an accepted idempotency key, acknowledged but not routed (section 6a).
    pub events_deduplicated: u64,
    pub events_delivered: u64,
    pub events_replayed: u64,
    dropped: [u64; DropReason::ALL.len()],
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub client_messages: u64,
    pub bad_client_messages: u64,
    /// `user_message`s answered `busy` (the user's pending-run bound or the held budget).
    pub user_messages_busy: u64,
    /// `refresh` messages answered `rate_limited` without a token check.
    pub refresh_rate_limited: u64,
    /// Most client messages (any kind, control frames too) read in one loop iteration.
    pub client_messages_max_per_iteration: u64,
    /// Times a session was paused for using up its input allowance.
    pub client_input_paused: u64,
    pub loop_iterations: u64,
    /// Loop iterations longer than 10 ms (each logged with its phases, rate-limited).
    pub slow_iterations: u64,
    /// Timers fired, and microseconds spent advancing the wheel and handling them.
    pub timers_fired: u64,
    pub timer_handling_us: u64,
    /// `accept` failures (EMFILE/ENFILE and other errors).
    pub accept_failures: u64,
    /// Connections answered 503 `overloaded` at the descriptor limit (reserve descriptor).
    pub overload_refused: u64,
    /// Not-upgraded connections closed because `max_http_connections` or
    /// `max_http_buffer_total_bytes` was passed (oldest first) or descriptors ran out.
    pub http_evicted: u64,
    /// Publish requests with a missing or wrong key.
    pub publish_auth_failures: u64,
    /// SIGHUP reloads applied, and refused (the old keys kept).
    pub reloads: u64,
    pub reloads_failed: u64,
    /// `POST /api/users/{user_id}/disconnect` requests that were carried out.
    pub user_disconnects: u64,
    /// TLS (`tls_cert_file` set): handshakes finished, connections closed for bad TLS
    /// input (a broken record or handshake, a fatal alert), and `SIGHUP` reloads of the
    /// certificate that took effect / were refused (the old one kept).
    pub tls_handshakes: u64,
    pub tls_failures: u64,
    pub tls_reloads: u64,
    pub tls_reload_failures: u64,
    /// Runs the watchdog ended (`run_timeout`), and its passes that ended any.
    pub runs_timed_out: u64,
    pub watchdog_passes: u64,
    latency_us: Histogram,
    loop_us: Histogram,
    latency_buckets: Buckets,
    loop_buckets: Buckets,
    /// Runs begun (their first event routed) and ended, by [`RunOutcome`].
    runs_started: u64,
    runs_ended: [u64; RunOutcome::ALL.len()],
    run_duration: Buckets,
    run_first_event: Buckets,
    tool_duration: Buckets,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

/// A log-linear latency histogram: exact below 64, then 64 linear sub-buckets per
/// power of two (relative error under 1.6 %). Fixed size (about 11 KiB), never
/// allocates after construction, never fails.
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    sum: u64,
    max: u64,
}

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Values are clamped to 2^27 - 1 us (~134 s).
const MAX_VALUE: u64 = (1 << 27) - 1;

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram {
            buckets: vec![0; Self::index(MAX_VALUE) + 1],
            count: 0,
            sum: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= SUB_BITS
        let sub = (v >> (e - SUB_BITS)) & (SUB - 1);
        ((e - SUB_BITS + 1) as u64 * SUB + sub) as usize
    }

    /// Highest value that maps to bucket `i`.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let e = i / SUB + SUB_BITS as u64 - 1;
        let sub = i % SUB;
        let shift = e - SUB_BITS as u64;
        ((SUB + sub) << shift) + (1 << shift) - 1
    }

    pub fn record(&mut self, v: u64) {
        let v = v.min(MAX_VALUE);
        if let Some(b) = self.buckets.get_mut(Self::index(v)) {
            *b += 1;
        }
        self.count += 1;
        self.sum = self.sum.saturating_add(v);
        self.max = self.max.max(v);
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn sum(&self) -> u64 {
        self.sum
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// The value at quantile `q` (0..=1): the upper bound of the bucket holding it,
    /// never above the maximum seen.
    pub fn value_at_quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::upper(i).min(self.max);
            }
        }
        self.max
    }
}

/// Prometheus bucket bounds, microseconds, of the gateway's own latencies (emit to
/// write, loop iteration): 25 us to 10 s. A healthy gateway writes an event within a
/// millisecond; the upper buckets show stalls (a blocked loop, an overloaded machine).
pub const LATENCY_BUCKETS_US: &[u64] = &[
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];
/// Bounds of agent run durations: 100 ms to 1 h (runs last seconds to minutes; the
/// watchdog ends silent ones after `run_idle_timeout_ms`, 5 min by default).
pub const RUN_DURATION_BUCKETS_US: &[u64] = &[
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
    300_000_000,
    600_000_000,
    1_800_000_000,
    3_600_000_000,
];
/// Bounds of the time from a `user_message` to its run's first event: 1 ms to 60 s
/// (a worker picking the message up, a model's first token).
pub const FIRST_EVENT_BUCKETS_US: &[u64] = &[
    1_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000, 30_000_000, 60_000_000,
];
/// Bounds of tool call durations: 5 ms to 5 min.
pub const TOOL_DURATION_BUCKETS_US: &[u64] = &[
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
];

/// Most bounds a [`Buckets`] holds (longer bound lists are cut to it).
pub const MAX_BUCKETS: usize = 20;

/// A Prometheus histogram: counts per fixed upper bound (microseconds) plus the
/// overflow (`+Inf`), the count and the sum. Fixed size, no allocation when recording
/// (a binary search over at most [`MAX_BUCKETS`] bounds).
#[derive(Clone, Debug)]
pub struct Buckets {
    bounds: &'static [u64],
    /// Not cumulative: `counts[i]` holds values in `(bounds[i-1], bounds[i]]`.
    counts: [u64; MAX_BUCKETS],
    over: u64,
    count: u64,
    sum_us: u64,
}

impl Buckets {
    /// Empty, with these ascending upper bounds in microseconds.
    pub fn new(bounds: &'static [u64]) -> Buckets {
        Buckets {
            bounds: &bounds[..bounds.len().min(MAX_BUCKETS)],
            counts: [0; MAX_BUCKETS],
            over: 0,
            count: 0,
            sum_us: 0,
        }
    }

    pub fn record(&mut self, us: u64) {
        let i = self.bounds.partition_point(|&b| b < us);
        match self.counts.get_mut(i) {
            Some(n) if i < self.bounds.len() => *n += 1,
            _ => self.over += 1,
        }
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// (upper bound in microseconds, values at or below it), ascending; `+Inf` not
    /// included (it is the count).
    pub fn cumulative(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut seen = 0;
        self.bounds
            .iter()
            .zip(self.counts.iter())
            .map(move |(b, n)| {
                seen += n;
                (*b, seen)
            })
    }

    /// `{"count", "sum_ms"}` for the JSON stats.
    fn to_json_ms(&self) -> Value {
        json!({"count": self.count, "sum_ms": self.sum_us / 1_000})
    }

    /// The histogram in the text exposition format, values in seconds.
    pub fn write_prometheus(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (bound, n) in self.cumulative() {
            let le = bound as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum_us as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// How a run ended (the `outcome` label of `agentwire_runs_ended_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// `agent_completed`.
    Completed,
    /// `agent_error` for any other reason (the worker's own failures, and the
    /// gateway's `no_agent` and `shutdown`).
    Error,
    /// The watchdog's `agent_error {"reason":"run_timeout"}`.
    RunTimeout,
    /// A run handle dropped before its run ended: `{"reason":"worker_dropped"}`.
    WorkerDropped,
    /// `agent_error {"reason":"cancelled"}`, or any `agent_error` but `run_timeout` and
    /// `worker_dropped` of a run a client asked to cancel.
    Cancelled,
}

impl RunOutcome {
    pub const ALL: [RunOutcome; 5] = [
        RunOutcome::Completed,
        RunOutcome::Error,
        RunOutcome::RunTimeout,
        RunOutcome::WorkerDropped,
        RunOutcome::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Completed => "completed",
            RunOutcome::Error => "error",
            RunOutcome::RunTimeout => "run_timeout",
            RunOutcome::WorkerDropped => "worker_dropped",
            RunOutcome::Cancelled => "cancelled",
        }
    }

    /// The outcome of a run ended by `agent_error` whose `data.reason` is `reason`,
    /// `cancel_requested` when a client asked to cancel the run.
    pub fn of_error(reason: Option<&str>, cancel_requested: bool) -> RunOutcome {
        match reason {
            Some("run_timeout") => RunOutcome::RunTimeout,
            Some("worker_dropped") => RunOutcome::WorkerDropped,
            Some("cancelled") => RunOutcome::Cancelled,
            _ if cancel_requested => RunOutcome::Cancelled,
            _ => RunOutcome::Error,
        }
    }
}

/// What one routed event did to its run, for the run metrics: built by the engine
/// that keeps the runs, recorded with [`Stats::record_run`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunTransition {
    /// The event is its run's first.
    pub began: bool,
    /// With `began`: the time since the `user_message` whose ack named the run (none
    /// for runs a worker started by itself).
    pub since_message: Option<Duration>,
    /// A `tool_completed` paired with its `tool_executing`: the tool call's duration.
    pub tool: Option<Duration>,
    /// The event ended its run: how, and the run's duration from its first event.
    pub ended: Option<(RunOutcome, Duration)>,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            connections_opened: 0,
            connections_closed: 0,
            closed_by_reason: [0; CloseReason::ALL.len()],
            refused: [0; RefusalReason::ALL.len()],
            http_requests: 0,
            events_emitted: 0,
            events_published: 0,
            events_deduplicated: 0,
            events_delivered: 0,
            events_replayed: 0,
            dropped: [0; DropReason::ALL.len()],
            bytes_in: 0,
            bytes_out: 0,
            client_messages: 0,
            bad_client_messages: 0,
            user_messages_busy: 0,
            refresh_rate_limited: 0,
            client_messages_max_per_iteration: 0,
            client_input_paused: 0,
            loop_iterations: 0,
            slow_iterations: 0,
            timers_fired: 0,
            timer_handling_us: 0,
            accept_failures: 0,
            overload_refused: 0,
            http_evicted: 0,
            tls_handshakes: 0,
            tls_failures: 0,
            tls_reloads: 0,
            tls_reload_failures: 0,
            publish_auth_failures: 0,
            reloads: 0,
            reloads_failed: 0,
            user_disconnects: 0,
            runs_timed_out: 0,
            watchdog_passes: 0,
            latency_us: Histogram::new(),
            loop_us: Histogram::new(),
            latency_buckets: Buckets::new(LATENCY_BUCKETS_US),
            loop_buckets: Buckets::new(LATENCY_BUCKETS_US),
            runs_started: 0,
            runs_ended: [0; RunOutcome::ALL.len()],
            run_duration: Buckets::new(RUN_DURATION_BUCKETS_US),
            run_first_event: Buckets::new(FIRST_EVENT_BUCKETS_US),
            tool_duration: Buckets::new(TOOL_DURATION_BUCKETS_US),
        }
    }

    pub fn refused(&mut self, reason: RefusalReason) {
        if let Some(c) = self.refused.get_mut(reason as usize) {
            *c += 1;
        }
    }

    pub fn refused_count(&self, reason: RefusalReason) -> u64 {
        self.refused.get(reason as usize).copied().unwrap_or(0)
    }

    pub fn dropped(&mut self, reason: DropReason, n: u64) {
        if let Some(c) = self.dropped.get_mut(reason as usize) {
            *c += n;
        }
    }

    pub fn dropped_count(&self, reason: DropReason) -> u64 {
        self.dropped.get(reason as usize).copied().unwrap_or(0)
    }

    /// Count one closed session under its close reason.
    pub fn closed(&mut self, reason: CloseReason) {
        self.connections_closed += 1;
        if let Some(n) = self.closed_by_reason.get_mut(reason as usize) {
            *n += 1;
        }
    }

    /// Sessions closed for `reason`.
    pub fn closed_count(&self, reason: CloseReason) -> u64 {
        self.closed_by_reason
            .get(reason as usize)
            .copied()
            .unwrap_or(0)
    }

    /// The reasons sessions were closed for, with their counts (reasons never seen are
    /// left out).
    /// Closes by label, the reasons seen so far only (the JSON and the metrics list the
    /// same).
    fn closed_seen(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        CloseReason::ALL
            .iter()
            .map(|r| (r.label(), self.closed_count(*r)))
            .filter(|(_, n)| *n > 0)
    }

    /// Refusals by reason, every reason.
    fn refused_by_reason(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        RefusalReason::ALL
            .iter()
            .map(|r| (r.as_str(), self.refused_count(*r)))
    }

    /// Drops by reason, every reason.
    fn dropped_by_reason(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (r.as_str(), self.dropped_count(*r)))
    }

    /// One event's emit-to-write latency.
    pub fn record_latency_us(&mut self, us: u64) {
        self.latency_us.record(us);
        self.latency_buckets.record(us);
    }

    /// What one routed event did to its run (see [`RunTransition`]).
    pub fn record_run(&mut self, t: &RunTransition) {
        if t.began {
            self.runs_started += 1;
            if let Some(d) = t.since_message {
                self.run_first_event.record(micros(d));
            }
        }
        if let Some(d) = t.tool {
            self.tool_duration.record(micros(d));
        }
        if let Some((outcome, d)) = t.ended {
            if let Some(n) = self.runs_ended.get_mut(outcome as usize) {
                *n += 1;
            }
            self.run_duration.record(micros(d));
        }
    }

    /// Runs ended with `outcome` so far.
    pub fn runs_ended(&self, outcome: RunOutcome) -> u64 {
        self.runs_ended.get(outcome as usize).copied().unwrap_or(0)
    }

    /// Runs begun and not yet ended.
    pub fn runs_in_flight(&self) -> u64 {
        self.runs_started
            .saturating_sub(self.runs_ended.iter().sum::<u64>())
    }

    fn runs_ended_by_outcome(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        RunOutcome::ALL
            .iter()
            .map(|o| (o.as_str(), self.runs_ended(*o)))
    }

    /// One loop iteration's timer work: `fired` timers handled in `us` microseconds.
    pub fn record_timers(&mut self, fired: u64, us: u64) {
        self.timers_fired += fired;
        self.timer_handling_us += us;
    }

    /// One loop iteration read `n` client messages.
    pub fn record_client_messages_in_iteration(&mut self, n: u64) {
        self.client_messages_max_per_iteration = self.client_messages_max_per_iteration.max(n);
    }

    pub fn record_loop_us(&mut self, us: u64) {
        self.loop_iterations += 1;
        self.loop_us.record(us);
        self.loop_buckets.record(us);
    }

    fn percentiles(h: &Histogram) -> Value {
        if h.is_empty() {
            return json!({"count": 0, "p50": 0, "p90": 0, "p99": 0, "p999": 0, "max": 0, "mean": 0.0});
        }
        json!({
            "count": h.len(),
            "p50": h.value_at_quantile(0.5),
            "p90": h.value_at_quantile(0.9),
            "p99": h.value_at_quantile(0.99),
            "p999": h.value_at_quantile(0.999),
            "max": h.max(),
            "mean": (h.mean() * 10.0).round() / 10.0,
        })
    }

    /// `GET /ws/stats`.
    pub fn to_json(&self, g: &Gauges) -> Value {
        let by_name = |counts: &mut dyn Iterator<Item = (&'static str, u64)>| {
            counts
                .map(|(name, n)| (name.to_owned(), json!(n)))
                .collect::<serde_json::Map<String, Value>>()
        };
        let refused = by_name(&mut self.refused_by_reason());
        let dropped = by_name(&mut self.dropped_by_reason());
        let closed = by_name(&mut self.closed_seen());
        let budgets: serde_json::Map<String, Value> = g
            .budgets()
            .into_iter()
            .map(|(name, limit, used)| (name.to_owned(), json!({"limit": limit, "used": used})))
            .collect();
        json!({
            "budgets": budgets,
            "log": {"lines_dropped": g.log_lines_dropped},
            "uptime_s": g.uptime_s,
            "connections": {
                "open": g.connections_open,
                "replaying": g.replaying,
                "opened": self.connections_opened,
                "closed": self.connections_closed,
                "closed_by_reason": closed,
                "refused": refused,
                "refused_total": self.refused.iter().sum::<u64>(),
            },
            "users": {"online": g.users_online, "known": g.users_known, "forgotten": g.memory.users_forgotten},
            "users_online": g.users_online,
            "runs": {
                "active": g.active_runs,
                "refused": g.memory.runs_refused,
                "timed_out": self.runs_timed_out,
                "watchdog_passes": self.watchdog_passes,
                "started": self.runs_started,
                "ended": by_name(&mut self.runs_ended_by_outcome()),
                "in_flight": self.runs_in_flight(),
                "duration_ms": self.run_duration.to_json_ms(),
                "first_event_ms": self.run_first_event.to_json_ms(),
                "tool_duration_ms": self.tool_duration.to_json_ms(),
            },
            "replay": {"events": g.memory.replay_events, "bytes": g.memory.replay_bytes, "evicted": g.memory.replay_evicted},
            "idempotency": {"keys": g.memory.idempotency_keys, "bytes": g.memory.idempotency_key_bytes, "dropped": g.memory.idempotency_keys_dropped, "per_user_limit": crate::registry::KEYS_PER_USER, "key_overhead_bytes": crate::registry::KEY_OVERHEAD_BYTES},
            "events": {
                "emitted": self.events_emitted,
                "published": self.events_published,
                "deduplicated": self.events_deduplicated,
                "delivered": self.events_delivered,
                "replayed": self.events_replayed,
                "dropped": dropped,
                "dropped_total": self.dropped.iter().sum::<u64>(),
            },
            "client_messages": {
                "total": self.client_messages,
                "bad": self.bad_client_messages,
                "busy": self.user_messages_busy,
                "refresh_rate_limited": self.refresh_rate_limited,
                "max_per_iteration": self.client_messages_max_per_iteration,
                "input_paused": self.client_input_paused,
            },
            "inbound": {"held": g.inbound_held, "held_bytes": g.inbound_held_bytes},
            "http_requests": self.http_requests,
            "bytes": {"in": self.bytes_in, "out": self.bytes_out, "pending_out": g.pending_out_bytes, "replay_backlog": g.replay_backlog_bytes},
            "latency_us": Self::percentiles(&self.latency_us),
            "loop": {
                "iterations": self.loop_iterations,
                "slow": self.slow_iterations,
                "busy_us": self.loop_us.sum(),
                "iteration_us": Self::percentiles(&self.loop_us),
            },
            "timers": {
                "armed": g.timers,
                "fired": self.timers_fired,
                "handling_us": self.timer_handling_us,
            },
            "http": {
                "open": g.http_open,
                "buffered_bytes": g.http_buffered_bytes,
                "evicted": self.http_evicted,
            },
            "accept": {
                "failures": self.accept_failures,
                "overload_refused": self.overload_refused,
                "degraded": g.accept_degraded,
            },
            "publish": {"auth_failures": self.publish_auth_failures},
            "webhook": g.webhook.map(|w| w.to_json()),
            "reload": {"done": self.reloads, "failed": self.reloads_failed},
            "revocation": {
                "disconnects": self.user_disconnects,
                "revoked_users": g.revoked_users,
            },
            "tls": {
                "handshakes": self.tls_handshakes,
                "failures": self.tls_failures,
                "reloads": self.tls_reloads,
                "reload_failures": self.tls_reload_failures,
            },
        })
    }

    /// `GET /metrics`, Prometheus text exposition format 0.0.4.
    pub fn to_prometheus(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP agentwire_{name} {help}");
            let _ = writeln!(out, "# TYPE agentwire_{name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "agentwire_{name}{labels} {v}");
            }
        };
        let one = |v: f64| vec![(String::new(), v)];
        // One sample per (value, count), the value under the label `label`.
        let labelled = |label: &str, counts: &mut dyn Iterator<Item = (&'static str, u64)>| {
            counts
                .map(|(value, n)| (format!("{{{label}=\"{value}\"}}"), n as f64))
                .collect::<Vec<(String, f64)>>()
        };
        for (name, kind, help, v) in [
            (
                "uptime_seconds",
                "gauge",
                "Seconds since the gateway started.",
                g.uptime_s as f64,
            ),
            (
                "connections_open",
                "gauge",
                "Open WebSocket connections.",
                g.connections_open as f64,
            ),
            (
                "users_online",
                "gauge",
                "Users with at least one open connection.",
                g.users_online as f64,
            ),
            (
                "runs_active",
                "gauge",
                "Agent runs started and not yet ended.",
                g.active_runs as f64,
            ),
            (
                "users_known",
                "gauge",
                "Users the gateway keeps state for (online or not).",
                g.users_known as f64,
            ),
            (
                "users_forgotten_total",
                "counter",
                "Users whose state was forgotten (idle expiry or memory budget).",
                g.memory.users_forgotten as f64,
            ),
            (
                "runs_timed_out_total",
                "counter",
                "Runs ended by the watchdog (run_idle_timeout_ms).",
                self.runs_timed_out as f64,
            ),
            (
                "runs_refused_total",
                "counter",
                "New runs refused past max_active_runs_per_user or max_active_runs.",
                g.memory.runs_refused as f64,
            ),
            (
                "replay_events",
                "gauge",
                "Events kept for resume, all users.",
                g.memory.replay_events as f64,
            ),
            (
                "replay_bytes",
                "gauge",
                "Bytes of events kept for resume, all users.",
                g.memory.replay_bytes as f64,
            ),
            (
                "replay_evicted_total",
                "counter",
                "Kept events dropped to stay within replay_memory_bytes.",
                g.memory.replay_evicted as f64,
            ),
            (
                "timers",
                "gauge",
                "Timers armed on the reactor's wheel.",
                g.timers as f64,
            ),
            (
                "connections_opened_total",
                "counter",
                "WebSocket connections accepted.",
                self.connections_opened as f64,
            ),
        ] {
            metric(name, kind, help, &one(v));
        }
        metric(
            "connections_closed_total",
            "counter",
            "WebSocket connections closed, by reason.",
            &labelled("reason", &mut self.closed_seen()),
        );
        metric(
            "connections_refused_total",
            "counter",
            "Upgrades refused before the handshake, by reason.",
            &labelled("reason", &mut self.refused_by_reason()),
        );
        for (name, kind, help, v) in [
            (
                "http_requests_total",
                "counter",
                "Plain HTTP requests answered.",
                self.http_requests as f64,
            ),
            (
                "events_emitted_total",
                "counter",
                "Events accepted from workers and the publish API.",
                self.events_emitted as f64,
            ),
            (
                "events_published_total",
                "counter",
                "Events accepted through POST /api/events.",
                self.events_published as f64,
            ),
            (
                "events_deduplicated_total",
                "counter",
                "Repeats of an accepted idempotency key: acknowledged, not routed again.",
                self.events_deduplicated as f64,
            ),
            (
                "idempotency_keys",
                "gauge",
                "Idempotency keys remembered, all users.",
                g.memory.idempotency_keys as f64,
            ),
            (
                "idempotency_key_bytes",
                "gauge",
                "Bytes of remembered idempotency keys, counted in replay_memory_bytes.",
                g.memory.idempotency_key_bytes as f64,
            ),
            (
                "idempotency_keys_dropped_total",
                "counter",
                "Idempotency keys dropped before expiry (per-user bound or budget).",
                g.memory.idempotency_keys_dropped as f64,
            ),
            (
                "events_delivered_total",
                "counter",
                "Event frames queued to connections (one per connection).",
                self.events_delivered as f64,
            ),
            (
                "events_replayed_total",
                "counter",
                "Event frames sent from the replay buffer on resume.",
                self.events_replayed as f64,
            ),
        ] {
            metric(name, kind, help, &one(v));
        }
        metric(
            "events_dropped_total",
            "counter",
            "Events not delivered, by reason.",
            &labelled("reason", &mut self.dropped_by_reason()),
        );
        for (name, kind, help, v) in [
            ("client_messages_total", "counter", "Text messages received from clients.", self.client_messages as f64),
            ("client_messages_bad_total", "counter", "Client messages counted as bad (bad_message, too_large, invalid_token, rate_limited).", self.bad_client_messages as f64),
            ("client_messages_busy_total", "counter", "user_message answered busy (per-user pending runs or the held budget).", self.user_messages_busy as f64),
            ("refresh_rate_limited_total", "counter", "refresh answered rate_limited without a token check.", self.refresh_rate_limited as f64),
            ("loop_slow_iterations_total", "counter", "Loop iterations longer than 10 ms (each logged with the time of its phases).", self.slow_iterations as f64),
            ("client_messages_max_per_iteration", "gauge", "Most client messages read in one loop iteration since start.", self.client_messages_max_per_iteration as f64),
            ("client_input_paused_total", "counter", "Sessions paused for using up their input allowance (1,000 messages/s, 1 MiB/s).", self.client_input_paused as f64),
            ("inbound_held", "gauge", "user_message held by the gateway while the workers' channel is full.", g.inbound_held as f64),
            ("bytes_in_total", "counter", "Bytes read from sockets.", self.bytes_in as f64),
            ("bytes_out_total", "counter", "Bytes written to sockets.", self.bytes_out as f64),
            ("pending_out_bytes", "gauge", "Bytes queued and not yet written, all connections.", g.pending_out_bytes as f64),
            ("http_connections_open", "gauge", "Connections not yet upgraded (plain HTTP, handshakes in progress).", g.http_open as f64),
            ("http_buffered_bytes", "gauge", "Request bytes buffered by connections not yet upgraded.", g.http_buffered_bytes as f64),
            ("http_evicted_total", "counter", "Not-upgraded connections closed, oldest first, over an HTTP limit.", self.http_evicted as f64),
            ("accept_failures_total", "counter", "Failed accepts (descriptor limit and other errors).", self.accept_failures as f64),
            ("overload_refused_total", "counter", "Connections answered 503 overloaded at the descriptor limit.", self.overload_refused as f64),
            ("publish_auth_failures_total", "counter", "Publish requests with a missing or wrong key.", self.publish_auth_failures as f64),
            ("reloads_total", "counter", "SIGHUP reloads of the JWT keys, jwt_secret and allowed_origins applied.", self.reloads as f64),
            ("reloads_failed_total", "counter", "SIGHUP reloads refused (the keys in force kept).", self.reloads_failed as f64),
            ("user_disconnects_total", "counter", "POST /api/users/{user_id}/disconnect requests carried out.", self.user_disconnects as f64),
            ("tls_handshakes_total", "counter", "TLS handshakes finished.", self.tls_handshakes as f64),
            ("tls_failures_total", "counter", "Connections closed for bad TLS input.", self.tls_failures as f64),
            ("tls_reloads_total", "counter", "SIGHUP reloads of the TLS certificate that took effect.", self.tls_reloads as f64),
            ("tls_reload_failures_total", "counter", "SIGHUP reloads of the TLS certificate refused (the old one kept).", self.tls_reload_failures as f64),
        ] {
            metric(name, kind, help, &one(v));
        }
        if let Some(w) = &g.webhook {
            for (name, kind, help, v) in [
                (
                    "webhook_requests_total",
                    "counter",
                    "Requests sent to inbound_url (user_message and cancel).",
                    w.sent as f64,
                ),
                (
                    "webhook_ok_total",
                    "counter",
                    "Requests to inbound_url answered 2xx.",
                    w.ok as f64,
                ),
                (
                    "webhook_in_flight",
                    "gauge",
                    "Requests to inbound_url waiting for an answer.",
                    w.in_flight as f64,
                ),
            ] {
                metric(name, kind, help, &one(v));
            }
            metric(
                "webhook_failed_total",
                "counter",
                "Client messages for inbound_url answered no_agent, by cause (status: non-2xx, connect, timeout, tls, io; full: inbound_max_in_flight reached, not sent).",
                &labelled("cause", &mut w.failed().into_iter()),
            );
        }
        let budgets = g.budgets();
        // The HELP text names every budget from the list itself, so it cannot fall behind.
        let names: Vec<&str> = budgets.iter().map(|b| b.0).collect();
        let names = names.join(", ");
        let limit_help = format!(
            "Configured limit of each budget ({names}); in bytes except the counts \
             http_connections and active_runs."
        );
        let used_help = format!("Current use of each budget ({names}); units as in budget_limit.");
        for (name, help, pick) in [
            (
                "budget_limit",
                limit_help.as_str(),
                (|b: &(&str, u64, u64)| b.1) as fn(&(&str, u64, u64)) -> u64,
            ),
            ("budget_used", used_help.as_str(), |b: &(&str, u64, u64)| {
                b.2
            }),
        ] {
            let samples: Vec<(String, f64)> = budgets
                .iter()
                .map(|b| (format!("{{budget=\"{}\"}}", b.0), pick(b) as f64))
                .collect();
            metric(name, "gauge", help, &samples);
        }
        metric(
            "log_lines_dropped_total",
            "counter",
            "Log lines dropped because the log output did not keep up.",
            &one(g.log_lines_dropped as f64),
        );
        metric(
            "runs_started_total",
            "counter",
            "Agent runs begun (their first event routed).",
            &one(self.runs_started as f64),
        );
        metric(
            "runs_ended_total",
            "counter",
            "Agent runs ended, by outcome (completed, error, run_timeout, worker_dropped, cancelled).",
            &labelled("outcome", &mut self.runs_ended_by_outcome()),
        );
        metric(
            "runs_in_flight",
            "gauge",
            "Agent runs begun and not yet ended (runs_started_total minus runs_ended_total).",
            &one(self.runs_in_flight() as f64),
        );
        for (name, help, h) in [
            (
                "emit_to_write_latency_seconds",
                "Latency from an event's emit to its write to a socket.",
                &self.latency_buckets,
            ),
            (
                "loop_iteration_seconds",
                "Reactor loop iteration time.",
                &self.loop_buckets,
            ),
            (
                "run_duration_seconds",
                "Agent run duration, from its first event to its end.",
                &self.run_duration,
            ),
            (
                "run_first_event_seconds",
                "Time from a user_message to the first event of the run its ack named.",
                &self.run_first_event,
            ),
            (
                "tool_duration_seconds",
                "Tool call duration, from tool_executing to its tool_completed.",
                &self.tool_duration,
            ),
        ] {
            h.write_prometheus(&mut out, &format!("agentwire_{name}"), help);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_within_two_percent() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        for (q, want) in [(0.5, 50_000.0), (0.99, 99_000.0), (0.999, 99_900.0)] {
            let got = h.value_at_quantile(q) as f64;
            assert!((got - want).abs() / want < 0.02, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.value_at_quantile(1.0), 100_000);
        assert_eq!(h.max(), 100_000);
        for v in [0u64, 1, 63, 64, 65, 127, 128, 1000, 123_456, MAX_VALUE] {
            let i = Histogram::index(v);
            assert!(Histogram::upper(i) >= v, "{v}");
            if i > 0 {
                assert!(Histogram::upper(i - 1) < v, "{v}");
            }
        }
    }

    #[test]
    fn json_and_prometheus_reflect_counters() {
        let mut s = Stats::new();
        s.connections_opened = 3;
        s.closed(CloseReason::ClientClosed);
        s.closed(CloseReason::ClientClosed);
        s.closed(CloseReason::Evicted);
        s.refused(RefusalReason::InvalidToken);
        s.dropped(DropReason::RunEnded, 2);
        for us in 1..=100 {
            s.record_latency_us(us);
        }
        let g = Gauges {
            webhook: Some(crate::webhook::WebhookCounts {
                sent: 5,
                ok: 3,
                timeout: 1,
                full: 2,
                in_flight: 1,
                max_in_flight: 8,
                ..Default::default()
            }),
            connections_open: 1,
            users_online: 1,
            pending_out_bytes: 7,
            pending_total_limit: 100,
            send_buffer_limit: 50,
            send_buffer_effective: 100,
            log_lines_dropped: 4,
            active_runs: 4,
            memory: MemoryGauges {
                replay_memory_used: 5,
                replay_memory_limit: 6,
                active_runs_limit: 7,
                ..MemoryGauges::default()
            },
            ..Gauges::default()
        };
        let j = s.to_json(&g);
        assert_eq!(j["webhook"]["sent"], 5);
        assert_eq!(j["webhook"]["failed"]["timeout"], 1);
        assert_eq!(j["webhook"]["failed"]["full"], 2);
        assert_eq!(j["webhook"]["failed_total"], 3);
        assert_eq!(j["budgets"]["inbound_in_flight"]["limit"], 8);
        assert_eq!(j["budgets"]["inbound_in_flight"]["used"], 1);
        let p = s.to_prometheus(&g);
        assert!(
            p.contains("agentwire_webhook_failed_total{cause=\"timeout\"} 1\n"),
            "{p}"
        );
        assert!(p.contains("agentwire_webhook_requests_total 5\n"));
        assert!(p.contains("agentwire_webhook_in_flight 1\n"));
        assert_eq!(j["connections"]["opened"], 3);
        assert_eq!(j["connections"]["closed"], 3);
        assert_eq!(j["connections"]["closed_by_reason"]["client_closed"], 2);
        assert_eq!(j["connections"]["refused"]["invalid_token"], 1);
        assert_eq!(j["events"]["dropped"]["run_ended"], 2);
        assert_eq!(j["latency_us"]["p50"], 50);
        assert_eq!(j["latency_us"]["max"], 100);
        assert_eq!(j["budgets"]["replay_memory_bytes"]["used"], 5);
        assert_eq!(j["budgets"]["replay_memory_bytes"]["limit"], 6);
        assert_eq!(j["budgets"]["active_runs"]["used"], 4);
        assert_eq!(j["budgets"]["active_runs"]["limit"], 7);
        let p = s.to_prometheus(&g);
        assert!(p.contains("agentwire_budget_used{budget=\"replay_memory_bytes\"} 5\n"));
        assert!(p.contains("agentwire_budget_limit{budget=\"active_runs\"} 7\n"));
        let help = p
            .lines()
            .find(|l| l.starts_with("# HELP agentwire_budget_used "))
            .expect("budget_used has a HELP line");
        for (name, _, _) in g.budgets() {
            assert!(help.contains(name), "{name} missing from {help}");
        }
        assert!(p.contains("agentwire_connections_open 1\n"));
        assert!(p.contains("agentwire_connections_refused_total{reason=\"invalid_token\"} 1\n"));
        assert!(p.contains("agentwire_events_dropped_total{reason=\"run_ended\"} 2\n"));
        assert!(p.contains("agentwire_emit_to_write_latency_seconds_count 100\n"));
        assert!(p.contains("agentwire_emit_to_write_latency_seconds_bucket{le=\"0.000025\"} 25\n"));
        assert!(p.contains("agentwire_emit_to_write_latency_seconds_bucket{le=\"0.0001\"} 100\n"));
        assert!(p.contains("agentwire_emit_to_write_latency_seconds_sum 0.00505\n"));
        assert!(!p.contains("quantile"), "no summaries left");
        assert_eq!(
            j["budgets"]["pending_total"],
            json!({"limit": 100, "used": 7})
        );
        assert_eq!(
            j["budgets"]["socket_send_buffer"],
            json!({"limit": 50, "used": 100})
        );
        assert_eq!(j["log"]["lines_dropped"], 4);
        assert!(p.contains("agentwire_budget_limit{budget=\"pending_total\"} 100\n"));
        assert!(p.contains("agentwire_budget_used{budget=\"pending_total\"} 7\n"));
        assert!(p.contains("agentwire_budget_used{budget=\"socket_send_buffer\"} 100\n"));
        assert!(p.contains("agentwire_log_lines_dropped_total 4\n"));
        for line in p.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("agentwire_"), "{line}");
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn buckets_count_each_value_once_at_its_bound() {
        let mut b = Buckets::new(&[10, 100, 1_000]);
        for v in [0, 10, 11, 100, 101, 1_000, 1_001, u64::MAX] {
            b.record(v);
        }
        let cum: Vec<(u64, u64)> = b.cumulative().collect();
        assert_eq!(cum, vec![(10, 2), (100, 4), (1_000, 6)]);
        assert_eq!(b.over, 2);
        assert_eq!(b.count, 8);
        assert_eq!(b.sum_us, u64::MAX, "the sum saturates");
        let long: &'static [u64] = &[1; 30];
        assert_eq!(Buckets::new(long).bounds.len(), MAX_BUCKETS);
        for bounds in [
            LATENCY_BUCKETS_US,
            RUN_DURATION_BUCKETS_US,
            FIRST_EVENT_BUCKETS_US,
            TOOL_DURATION_BUCKETS_US,
        ] {
            assert!(bounds.len() <= MAX_BUCKETS);
            assert!(
                bounds.windows(2).all(|w| w[0] < w[1]),
                "{bounds:?} ascending"
            );
        }
    }

    /// Every histogram in `/metrics`: buckets cumulative with ascending `le`, the last
    /// `+Inf` equal to `_count`, then `_sum` and `_count`.
    #[test]
    fn prometheus_histograms_are_well_formed() {
        let mut s = Stats::new();
        for us in [3, 70, 900, 40_000, 20_000_000] {
            s.record_latency_us(us);
            s.record_loop_us(us);
        }
        s.record_run(&RunTransition {
            began: true,
            since_message: Some(Duration::from_millis(30)),
            tool: Some(Duration::from_millis(700)),
            ended: Some((RunOutcome::Cancelled, Duration::from_secs(4))),
        });
        let p = s.to_prometheus(&Gauges::default());
        let mut histograms = 0;
        for line in p.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut parts = line.split(' ').skip(2);
            let (Some(name), Some("histogram")) = (parts.next(), parts.next()) else {
                continue;
            };
            histograms += 1;
            let mut last_le = f64::NEG_INFINITY;
            let mut last_n = 0u64;
            let mut inf = None;
            let bucket = format!("{name}_bucket{{le=\"");
            for l in p.lines().filter(|l| l.starts_with(&bucket)) {
                let rest = &l[bucket.len()..];
                let (le, n) = rest.split_once("\"} ").unwrap();
                let n: u64 = n.parse().unwrap();
                assert!(n >= last_n, "{l}: not cumulative");
                last_n = n;
                if le == "+Inf" {
                    inf = Some(n);
                } else {
                    let le: f64 = le.parse().unwrap();
                    assert!(le > last_le && inf.is_none(), "{l}: le order");
                    last_le = le;
                }
            }
            let count_line = format!("{name}_count ");
            let count: u64 = p
                .lines()
                .find_map(|l| l.strip_prefix(&count_line))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(inf, Some(count), "{name}: +Inf == count");
            assert!(p.contains(&format!("{name}_sum ")), "{name}_sum");
        }
        assert_eq!(histograms, 5, "{p}");
        assert!(p.contains("agentwire_runs_started_total 1\n"));
        assert!(p.contains("agentwire_runs_ended_total{outcome=\"cancelled\"} 1\n"));
        assert!(p.contains("agentwire_runs_ended_total{outcome=\"completed\"} 0\n"));
        assert!(p.contains("agentwire_runs_in_flight 0\n"));
        assert!(p.contains("agentwire_run_duration_seconds_bucket{le=\"2.5\"} 0\n"));
        assert!(p.contains("agentwire_run_duration_seconds_bucket{le=\"5\"} 1\n"));
        assert!(p.contains("agentwire_run_first_event_seconds_bucket{le=\"0.05\"} 1\n"));
        assert!(p.contains("agentwire_tool_duration_seconds_bucket{le=\"1\"} 1\n"));
        assert!(p.contains("agentwire_emit_to_write_latency_seconds_bucket{le=\"10\"} 4\n"));
        assert!(p.contains("agentwire_emit_to_write_latency_seconds_bucket{le=\"+Inf\"} 5\n"));
        let j = s.to_json(&Gauges::default());
        assert_eq!(j["runs"]["started"], 1);
        assert_eq!(j["runs"]["ended"]["cancelled"], 1);
        assert_eq!(j["runs"]["in_flight"], 0);
        assert_eq!(j["runs"]["duration_ms"]["sum_ms"], 4000);
        assert_eq!(j["latency_us"]["max"], 20_000_000, "JSON percentiles kept");
    }

    #[test]
    fn run_outcomes_follow_the_ending_reason() {
        use RunOutcome::*;
        assert_eq!(RunOutcome::of_error(Some("run_timeout"), true), RunTimeout);
        assert_eq!(
            RunOutcome::of_error(Some("worker_dropped"), true),
            WorkerDropped
        );
        assert_eq!(RunOutcome::of_error(Some("cancelled"), false), Cancelled);
        assert_eq!(RunOutcome::of_error(Some("boom"), true), Cancelled);
        assert_eq!(RunOutcome::of_error(None, false), Error);
        assert_eq!(RunOutcome::of_error(Some("shutdown"), false), Error);
        let mut s = Stats::new();
        s.record_run(&RunTransition {
            began: true,
            ..RunTransition::default()
        });
        assert_eq!(s.runs_in_flight(), 1);
        assert_eq!(s.run_first_event.count, 0, "no user_message: not measured");
    }
}
