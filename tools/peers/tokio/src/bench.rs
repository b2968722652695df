//! `peer-tokio --bench`: the peer with in-process emitter threads, for the load
//! generator's `emitter` driver. It speaks the stdin/stdout line protocol of agentwire's
//! `examples/bench_gateway.rs`, so `loadgen --server tokio --driver emitter` drives it
//! exactly as it drives agentwire's:
//!
//! - stdout: `ready addr=IP:PORT pid=P reactor_tid=T emitter_tids=A,B epoch=E` once it
//!   listens; `progress phase=K sent=N` once a second while a phase runs;
//!   `done phase=K sent=N failed=F lag_max_us=L elapsed_us=E counts=C0,C1,...` at the end
//!   of a phase (`counts`: events assigned to each user so far, in user order); `bye`.
//! - stdin: `start phase=K rate=R duration_ms=D` (or `rate=0 events=N`), `quit`.
//!
//! Every event is a `text_delta` of run `r-<user>` whose `data` is
//! `{"t_us":T,"n":N,"p":K}` (T: the scheduled emit time, CLOCK_REALTIME microseconds).
//! User `i` is `<user-prefix><i>` and belongs to emitter thread `i % emitter-threads`.
//!
//! An emit is what a tokio application's worker threads would do: take the users lock,
//! assign the seq, serialize, `try_send` to each connection's channel. It never blocks,
//! so `failed` is always 0 (a full channel closes that connection with 1013 instead).
//! `reactor_tid` is the runtime's first worker thread (pinned to one CPU, the runtime has
//! one worker).

use std::fmt::Write as _;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::value::RawValue;
use tokio::net::TcpListener;

use super::{accept_loop, deliver, new_hub, now_ms, Args, Envelope, Hub};

/// Options of the emitter mode (as examples/bench_gateway.rs has them).
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
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

#[derive(Clone, Copy, Debug)]
struct Phase {
    id: u32,
    rate: f64,
    duration: Duration,
    events: u64,
}

struct Report {
    sent: u64,
    lag_max_us: u64,
    /// (user index, cumulative count).
    counts: Vec<(usize, u64)>,
}

fn realtime_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// This thread's kernel id, from /proc/thread-self; "0" if unknown.
fn thread_id() -> String {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "0".into())
}

pub fn run(runtime: &tokio::runtime::Runtime, args: Args) -> Result<(), String> {
    let b = &args.bench_args;
    if b.users == 0 || b.emitter_threads == 0 {
        return Err("--users and --emitter-threads must be at least 1".into());
    }
    let hub = new_hub(&args)?;
    let listener = runtime
        .block_on(TcpListener::bind(args.listen))
        .map_err(|e| format!("cannot bind {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    runtime.spawn(accept_loop(listener, hub.clone()));
    let reactor_tid = runtime
        .block_on(runtime.spawn(async { thread_id() }))
        .map_err(|e| format!("runtime: {e}"))?;

    let users: Vec<String> = (0..b.users)
        .map(|i| format!("{}{i}", b.user_prefix))
        .collect();
    let pad = "x".repeat(b.payload_bytes);
    let sent_total = Arc::new(AtomicU64::new(0));
    let (report_tx, report_rx) = mpsc::channel::<Report>();
    let (tid_tx, tid_rx) = mpsc::channel::<String>();
    let mut phase_txs = Vec::new();
    let mut workers = Vec::new();
    for t in 0..b.emitter_threads {
        let (phase_tx, phase_rx) = mpsc::channel::<Phase>();
        phase_txs.push(phase_tx);
        let mine: Vec<(usize, String)> = users
            .iter()
            .enumerate()
            .filter(|(i, _)| i % b.emitter_threads == t)
            .map(|(i, u)| (i, u.clone()))
            .collect();
        let emitter = Emitter {
            share: mine.len() as f64 / b.users as f64,
            users: mine,
            hub: hub.clone(),
            pad: pad.clone(),
            sent_total: sent_total.clone(),
        };
        let (report_tx, tid_tx) = (report_tx.clone(), tid_tx.clone());
        workers.push(
            thread::Builder::new()
                .name(format!("emitter-{t}"))
                .spawn(move || {
                    let _ = tid_tx.send(thread_id());
                    emitter.serve(phase_rx, report_tx)
                })
                .map_err(|e| format!("emitter thread: {e}"))?,
        );
    }
    let mut emitter_tids = Vec::new();
    for _ in 0..b.emitter_threads {
        emitter_tids.push(
            tid_rx
                .recv_timeout(Duration::from_secs(5))
                .map_err(|_| "emitter thread did not start")?,
        );
    }
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| format!("stdout: {e}");
    writeln!(
        out,
        "ready addr={addr} pid={} reactor_tid={reactor_tid} emitter_tids={} epoch={}",
        std::process::id(),
        emitter_tids.join(","),
        hub.epoch
    )
    .map_err(io)?;
    out.flush().map_err(io)?;

    let mut counts = vec![0u64; b.users];
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("stdin: {e}"))?;
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
                writeln!(out, "error {e}").map_err(io)?;
                out.flush().map_err(io)?;
                continue;
            }
        };
        let started = Instant::now();
        let before = sent_total.load(Ordering::Relaxed);
        for tx in &phase_txs {
            tx.send(phase).map_err(|_| "an emitter thread ended")?;
        }
        let (mut sent, mut lag, mut got) = (0, 0, 0);
        let mut next_progress = started + Duration::from_secs(1);
        let deadline = started + phase.duration + Duration::from_secs(60);
        while got < phase_txs.len() {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("phase {} did not finish in time", phase.id));
            }
            match report_rx.recv_timeout(next_progress.saturating_duration_since(now)) {
                Ok(r) => {
                    got += 1;
                    sent += r.sent;
                    lag = lag.max(r.lag_max_us);
                    for (u, c) in r.counts {
                        if let Some(slot) = counts.get_mut(u) {
                            *slot = c;
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let n = sent_total.load(Ordering::Relaxed) - before;
                    writeln!(out, "progress phase={} sent={n}", phase.id).map_err(io)?;
                    out.flush().map_err(io)?;
                    next_progress += Duration::from_secs(1);
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("emitter threads ended".into());
                }
            }
        }
        let mut list = String::with_capacity(counts.len() * 4);
        for (i, c) in counts.iter().enumerate() {
            if i > 0 {
                list.push(',');
            }
            let _ = write!(list, "{c}");
        }
        writeln!(
            out,
            "done phase={} sent={sent} failed=0 lag_max_us={lag} elapsed_us={} counts={list}",
            phase.id,
            started.elapsed().as_micros()
        )
        .map_err(io)?;
        out.flush().map_err(io)?;
    }
    drop(phase_txs);
    for w in workers {
        let _ = w.join();
    }
    writeln!(out, "bye").map_err(io)?;
    out.flush().map_err(io)?;
    Ok(())
}

fn parse_start(line: &str) -> Result<Phase, String> {
    let mut words = line.split_whitespace();
    if words.next() != Some("start") {
        return Err(format!("unknown command {line:?}"));
    }
    let mut p = Phase {
        id: 0,
        rate: 0.0,
        duration: Duration::ZERO,
        events: 0,
    };
    for w in words {
        let (k, v) = w
            .split_once('=')
            .ok_or_else(|| format!("bad field {w:?}"))?;
        let bad = || format!("bad value in {w:?}");
        match k {
            "phase" => p.id = v.parse().map_err(|_| bad())?,
            "rate" => p.rate = v.parse().map_err(|_| bad())?,
            "duration_ms" => p.duration = Duration::from_millis(v.parse().map_err(|_| bad())?),
            "events" => p.events = v.parse().map_err(|_| bad())?,
            _ => return Err(format!("unknown field {k:?}")),
        }
    }
    if !(p.rate >= 0.0 && p.rate.is_finite()) {
        return Err("rate must be >= 0".into());
    }
    if p.rate == 0.0 && p.events == 0 {
        return Err("rate=0 needs events=N".into());
    }
    Ok(p)
}

struct Emitter {
    /// This thread's fraction of all users (its fraction of the rate).
    share: f64,
    /// (user index, user id).
    users: Vec<(usize, String)>,
    hub: Arc<Hub>,
    pad: String,
    sent_total: Arc<AtomicU64>,
}

impl Emitter {
    fn serve(self, phases: mpsc::Receiver<Phase>, reports: mpsc::Sender<Report>) {
        let mut counts = vec![0u64; self.users.len()];
        let mut next_user = 0usize;
        let runs: Vec<String> = self.users.iter().map(|(_, u)| format!("r-{u}")).collect();
        for phase in phases.iter() {
            let report = self.phase(phase, &runs, &mut counts, &mut next_user);
            if reports.send(report).is_err() {
                break;
            }
        }
    }

    fn phase(
        &self,
        phase: Phase,
        runs: &[String],
        counts: &mut [u64],
        next_user: &mut usize,
    ) -> Report {
        let mut report = Report {
            sent: 0,
            lag_max_us: 0,
            counts: Vec::new(),
        };
        if self.users.is_empty() {
            return report;
        }
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
        let mut data = String::with_capacity(64 + self.pad.len());
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
            let (Some((_, user)), Some(run), Some(n)) =
                (self.users.get(slot), runs.get(slot), counts.get_mut(slot))
            else {
                continue;
            };
            data.clear();
            let _ = write!(data, r#"{{"t_us":{t_us},"n":{n},"p":{}"#, phase.id);
            if !self.pad.is_empty() {
                let _ = write!(data, r#","pad":"{}""#, self.pad);
            }
            data.push('}');
            *n += 1;
            let Ok(raw) = serde_json::from_str::<&RawValue>(&data) else {
                continue;
            };
            let env = Envelope {
                kind: "text_delta",
                seq: 0,
                user_id: user,
                thread_id: None,
                run_id: run,
                agent_name: "bench",
                ts: now_ms(),
                data: raw,
            };
            if let Ok(mut users) = self.hub.users.lock() {
                deliver(&mut users, env);
            }
            report.sent += 1;
            self.sent_total.fetch_add(1, Ordering::Relaxed);
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
