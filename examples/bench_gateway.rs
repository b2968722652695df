//! A gateway with in-process emitter threads, paced at a given rate, for load tests.
//!
//! The load generator (`tools/loadgen`) starts this as a child process, opens its
//! WebSocket connections, then drives the emitters through a line protocol:
//!
//! ```text
//! cargo build --release --example bench_gateway
//! target/release/examples/bench_gateway --jwt-secret S --users 1000 --emitter-threads 2
//! ```
//!
//! stdout (one line each, `key=value` fields):
//! - `ready addr=IP:PORT pid=P reactor_tid=T emitter_tids=A,B epoch=E` once the gateway
//!   listens;
//! - `progress phase=K sent=N` once a second while a phase runs;
//! - `done phase=K sent=N failed=F lag_max_us=L elapsed_us=E counts=C0,C1,...` when a
//!   phase ended: `counts` are the events assigned to each user so far (cumulative over
//!   phases, one per user in user order), `failed` the emits that gave up;
//! - `bye` after `quit`.
//!
//! stdin:
//! - `start phase=K rate=R duration_ms=D` emits `R` events per second in total for `D`
//!   ms, round-robin over the users; `rate=0 events=N` emits `N` events as fast as the
//!   channel takes them (a burst);
//! - `quit` (or end of input) ends every run, shuts the gateway down and exits.
//!
//! Every event is a `text_delta` of run `r-<user>` whose `data` is
//! `{"t_us":T,"n":N,"p":K}`: `T` the time the schedule meant it to be emitted
//! (CLOCK_REALTIME microseconds; late emits keep their scheduled time, so a lagging
//! emitter shows as latency instead of hiding it), `N` the event's index for its user
//! (0, 1, 2, ...), `K` the phase. User `i` is `<user-prefix><i>`; user `i` belongs to
//! emitter thread `i % emitter-threads`, so the events of one user come from one thread
//! in order.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentwire::{Config, EmitError, Emitter, Gateway, RunHandle};
use clap::Parser;
use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;

/// How long one emit may wait for room in the channel before it is retried.
const EMIT_WAIT: Duration = Duration::from_secs(1);
/// How long past a phase's end an emitter keeps retrying a full channel.
const GIVE_UP_AFTER: Duration = Duration::from_secs(10);
/// Time allowed for the gateway to shut down on `quit`.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(15);

#[derive(Parser, Debug)]
#[command(about = "agentwire gateway with paced in-process emitter threads (for tools/loadgen)")]
struct Args {
    /// Address to bind (port 0: any free port; the ready line says which).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// HS256 secret the clients' tokens are signed with (also from the environment, so
    /// it stays out of `ps`).
    #[arg(long, env = "AGENTWIRE_JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// Enables POST /api/events with this key.
    #[arg(long, env = "AGENTWIRE_PUBLISH_KEY", hide_env_values = true)]
    publish_key: Option<String>,
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    #[arg(long, default_value_t = 3)]
    max_connections_per_user: usize,
    /// Any other gateway setting, `name=value` (PROTOCOL.md section 8); repeatable.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    settings: Vec<String>,
    /// Number of users the events go to.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// User ids are this prefix followed by the user's index.
    #[arg(long, default_value = "u")]
    user_prefix: String,
    /// Emitter threads (users are split between them).
    #[arg(long, default_value_t = 2)]
    emitter_threads: usize,
    /// Extra bytes of padding in each event's data (a `pad` string).
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
}

/// One phase of emission, as given on stdin.
#[derive(Clone, Copy, Debug)]
struct Phase {
    id: u32,
    /// Events per second in total; 0 means as fast as possible.
    rate: f64,
    duration: Duration,
    /// For `rate=0`: total events to emit.
    events: u64,
}

/// What one emitter thread reports after a phase.
struct PhaseReport {
    thread: usize,
    sent: u64,
    failed: u64,
    lag_max_us: u64,
    /// (user index, cumulative count).
    counts: Vec<(usize, u64)>,
}

#[derive(Serialize)]
struct Stamp<'a> {
    t_us: u64,
    n: u64,
    p: u32,
    #[serde(skip_serializing_if = "str::is_empty")]
    pad: &'a str,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_gateway: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.users == 0 || args.emitter_threads == 0 {
        return Err("--users and --emitter-threads must be at least 1".into());
    }
    let mut config = Config {
        listen: args.listen,
        jwt_secret: Some(args.jwt_secret.clone()),
        publish_key: args.publish_key.clone(),
        max_connections: args.max_connections,
        max_connections_per_user: args.max_connections_per_user,
        demo_agent: Some(false),
        ..Config::default()
    };
    for s in &args.settings {
        let (name, value) = s
            .split_once('=')
            .ok_or_else(|| format!("--set {s:?}: expected NAME=VALUE"))?;
        config.set(name, value)?;
    }
    let gateway = Gateway::new(config)?;
    let addr = gateway.local_addr();
    let epoch = gateway.epoch().to_owned();
    let emitter = gateway.emitter().with_max_wait(EMIT_WAIT);

    // The reactor runs on a thread of ours so its thread id can be reported (the load
    // generator pins it apart from the emitters).
    let (tid_tx, tid_rx) = crossbeam_channel::bounded::<String>(64);
    let reactor = {
        let tid_tx = tid_tx.clone();
        thread::Builder::new()
            .name("agentwire-reactor".into())
            .spawn(move || {
                let _ = tid_tx.send(thread_id());
                gateway.run()
            })?
    };
    let reactor_tid = tid_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "reactor thread did not start")?;

    let users: Vec<String> = (0..args.users)
        .map(|i| format!("{}{i}", args.user_prefix))
        .collect();
    let pad = "x".repeat(args.payload_bytes);
    let sent_total = Arc::new(AtomicU64::new(0));
    let (report_tx, report_rx) = crossbeam_channel::bounded::<PhaseReport>(args.emitter_threads);
    let mut phase_txs: Vec<Sender<Phase>> = Vec::new();
    let mut workers = Vec::new();
    for t in 0..args.emitter_threads {
        let (phase_tx, phase_rx) = crossbeam_channel::bounded::<Phase>(4);
        phase_txs.push(phase_tx);
        let mine: Vec<(usize, String)> = users
            .iter()
            .enumerate()
            .filter(|(i, _)| i % args.emitter_threads == t)
            .map(|(i, u)| (i, u.clone()))
            .collect();
        let worker = EmitterThread {
            index: t,
            share: mine.len() as f64 / args.users as f64,
            users: mine,
            emitter: emitter.clone(),
            pad: pad.clone(),
            sent_total: sent_total.clone(),
        };
        let report_tx = report_tx.clone();
        let tid_tx = tid_tx.clone();
        workers.push(
            thread::Builder::new()
                .name(format!("emitter-{t}"))
                .spawn(move || {
                    let _ = tid_tx.send(thread_id());
                    worker.serve(phase_rx, report_tx)
                })?,
        );
    }
    let mut emitter_tids = Vec::new();
    for _ in 0..args.emitter_threads {
        emitter_tids.push(
            tid_rx
                .recv_timeout(Duration::from_secs(5))
                .map_err(|_| "emitter thread did not start")?,
        );
    }

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "ready addr={addr} pid={} reactor_tid={reactor_tid} emitter_tids={} epoch={epoch}",
        std::process::id(),
        emitter_tids.join(",")
    )?;
    out.flush()?;

    let stdin = std::io::stdin();
    let mut counts = vec![0u64; args.users];
    let mut result = Ok(());
    for line in stdin.lock().lines() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "quit" {
            break;
        }
        let phase = match parse_start(line) {
            Ok(p) => p,
            Err(e) => {
                writeln!(out, "error {e}")?;
                out.flush()?;
                continue;
            }
        };
        if let Err(e) = run_phase(
            &mut out,
            phase,
            &phase_txs,
            &report_rx,
            &sent_total,
            &mut counts,
        ) {
            result = Err(e);
            break;
        }
    }

    // End: stop the emitters (their drop ends every run), then shut the gateway down.
    drop(phase_txs);
    for w in workers {
        let _ = w.join();
    }
    let _ = emitter.shutdown();
    let deadline = Instant::now() + SHUTDOWN_WAIT;
    while !reactor.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    if reactor.is_finished() {
        match reactor.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("bench_gateway: gateway loop failed: {e}"),
            Err(_) => eprintln!("bench_gateway: reactor thread panicked"),
        }
    } else {
        eprintln!("bench_gateway: gateway did not shut down within {SHUTDOWN_WAIT:?}");
    }
    writeln!(out, "bye")?;
    out.flush()?;
    result
}

fn run_phase(
    out: &mut impl Write,
    phase: Phase,
    phase_txs: &[Sender<Phase>],
    report_rx: &Receiver<PhaseReport>,
    sent_total: &AtomicU64,
    counts: &mut [u64],
) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let sent_before = sent_total.load(Ordering::Relaxed);
    for tx in phase_txs {
        tx.send(phase).map_err(|_| "an emitter thread ended")?;
    }
    // Bounded: the emitters give up GIVE_UP_AFTER past the phase's end.
    let deadline = started + phase.duration + GIVE_UP_AFTER + Duration::from_secs(30);
    let mut reports: Vec<Option<PhaseReport>> = phase_txs.iter().map(|_| None).collect();
    let mut got = 0;
    let mut next_progress = started + Duration::from_secs(1);
    while got < phase_txs.len() {
        let now = Instant::now();
        if now >= deadline {
            return Err(format!("phase {} did not finish in time", phase.id).into());
        }
        match report_rx.recv_timeout(next_progress.saturating_duration_since(now)) {
            Ok(r) => {
                let slot = reports.get_mut(r.thread).ok_or("bad emitter index")?;
                *slot = Some(r);
                got += 1;
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                let sent = sent_total.load(Ordering::Relaxed) - sent_before;
                writeln!(out, "progress phase={} sent={sent}", phase.id)?;
                out.flush()?;
                next_progress += Duration::from_secs(1);
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return Err("emitter threads ended".into());
            }
        }
    }
    let (mut sent, mut failed, mut lag) = (0, 0, 0);
    for r in reports.into_iter().flatten() {
        sent += r.sent;
        failed += r.failed;
        lag = lag.max(r.lag_max_us);
        for (user, c) in r.counts {
            if let Some(slot) = counts.get_mut(user) {
                *slot = c;
            }
        }
    }
    let list: Vec<String> = counts.iter().map(u64::to_string).collect();
    writeln!(
        out,
        "done phase={} sent={sent} failed={failed} lag_max_us={lag} elapsed_us={} counts={}",
        phase.id,
        started.elapsed().as_micros(),
        list.join(",")
    )?;
    out.flush()?;
    Ok(())
}

fn parse_start(line: &str) -> Result<Phase, String> {
    let mut words = line.split_whitespace();
    if words.next() != Some("start") {
        return Err(format!("unknown command {line:?}"));
    }
    let mut phase = Phase {
        id: 0,
        rate: 0.0,
        duration: Duration::ZERO,
        events: 0,
    };
    for w in words {
        let (k, v) = w
            .split_once('=')
            .ok_or_else(|| format!("bad field {w:?}"))?;
        let bad = |_| format!("bad value in {w:?}");
        match k {
            "phase" => phase.id = v.parse().map_err(bad)?,
            "rate" => phase.rate = v.parse().map_err(|_| format!("bad value in {w:?}"))?,
            "duration_ms" => phase.duration = Duration::from_millis(v.parse().map_err(bad)?),
            "events" => phase.events = v.parse().map_err(bad)?,
            _ => return Err(format!("unknown field {k:?}")),
        }
    }
    if !(phase.rate >= 0.0 && phase.rate.is_finite()) {
        return Err("rate must be >= 0".into());
    }
    if phase.rate == 0.0 && phase.events == 0 {
        return Err("rate=0 needs events=N".into());
    }
    Ok(phase)
}

struct EmitterThread {
    index: usize,
    /// This thread's fraction of all users (its fraction of the rate).
    share: f64,
    /// (user index, user id).
    users: Vec<(usize, String)>,
    emitter: Emitter,
    pad: String,
    sent_total: Arc<AtomicU64>,
}

impl EmitterThread {
    fn serve(self, phases: Receiver<Phase>, reports: Sender<PhaseReport>) {
        let mut runs: Vec<Option<RunHandle>> = self.users.iter().map(|_| None).collect();
        let mut counts = vec![0u64; self.users.len()];
        // Round-robin position, kept across phases so users get even counts.
        let mut next_user = 0usize;
        for phase in phases.iter() {
            let report = self.phase(phase, &mut runs, &mut counts, &mut next_user);
            if reports.send(report).is_err() {
                break;
            }
        }
        for run in runs.iter_mut().flatten() {
            let _ = run.agent_completed(&serde_json::json!({"end": true}));
        }
    }

    fn phase(
        &self,
        phase: Phase,
        runs: &mut [Option<RunHandle>],
        counts: &mut [u64],
        next_user: &mut usize,
    ) -> PhaseReport {
        let mut report = PhaseReport {
            thread: self.index,
            sent: 0,
            failed: 0,
            lag_max_us: 0,
            counts: Vec::new(),
        };
        let total: u64 = if phase.rate > 0.0 {
            (phase.rate * self.share * phase.duration.as_secs_f64()).round() as u64
        } else {
            (phase.events as f64 * self.share).round() as u64
        };
        let interval_s = if phase.rate > 0.0 {
            1.0 / (phase.rate * self.share)
        } else {
            0.0
        };
        let start_wall = realtime_us();
        let start = Instant::now();
        let give_up = start + phase.duration + GIVE_UP_AFTER;
        if self.users.is_empty() {
            return report;
        }
        for i in 0..total {
            let offset = Duration::from_secs_f64(i as f64 * interval_s);
            let due = start + offset;
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            } else if phase.rate > 0.0 {
                report.lag_max_us = report.lag_max_us.max((now - due).as_micros() as u64);
            }
            let t_us = if phase.rate > 0.0 {
                start_wall + offset.as_micros() as u64
            } else {
                realtime_us()
            };
            let slot = *next_user % self.users.len();
            *next_user = slot + 1;
            let (Some((_, user)), Some(run), Some(n)) = (
                self.users.get(slot),
                runs.get_mut(slot),
                counts.get_mut(slot),
            ) else {
                continue;
            };
            let stamp = Stamp {
                t_us,
                n: *n,
                p: phase.id,
                pad: &self.pad,
            };
            *n += 1;
            if emit(&self.emitter, run, user, &stamp, give_up) {
                report.sent += 1;
                self.sent_total.fetch_add(1, Ordering::Relaxed);
            } else {
                report.failed += 1;
            }
        }
        report.counts = self
            .users
            .iter()
            .zip(counts.iter())
            .map(|((i, _), c)| (*i, *c))
            .collect();
        report
    }
}

/// Emit one event, retrying a full channel until `give_up`. True when it was queued.
fn emit(
    emitter: &Emitter,
    run: &mut Option<RunHandle>,
    user: &str,
    stamp: &Stamp<'_>,
    give_up: Instant,
) -> bool {
    if run.is_none() {
        match emitter.run(user, None, &format!("r-{user}"), "bench") {
            Ok(h) => *run = Some(h),
            Err(e) => {
                eprintln!("bench_gateway: user {user}: {e}");
                return false;
            }
        }
    }
    let Some(handle) = run.as_mut() else {
        return false;
    };
    loop {
        match handle.emit("text_delta", stamp) {
            Ok(()) => return true,
            Err(EmitError::ChannelFull(_)) if Instant::now() < give_up => continue,
            Err(e) => {
                eprintln!("bench_gateway: user {user}: emit failed: {e}");
                return false;
            }
        }
    }
}

fn realtime_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// This thread's kernel id, from /proc/thread-self (`PID/task/TID`); "0" if unknown.
fn thread_id() -> String {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "0".into())
}
