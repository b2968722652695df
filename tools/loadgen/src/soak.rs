//! `soak` and `startup`: does the gateway give back what a long churn took, and how
//! fast does it start.
//!
//! `soak` holds steady connections receiving a paced event rate and, cycle after
//! cycle, runs a connect/close churn beside them (half the churn connections dropped
//! without a close handshake, like the `storm` scenario). After each cycle's churn and
//! events it lets the gateway settle and samples its resident memory (`/proc/PID`),
//! open descriptors (`/proc/PID/fd`) and armed timers (`timers.armed` of `/ws/stats`),
//! printing one line per cycle. It fails (exit 1) when:
//!
//! - descriptors or timers do not return to their baseline (sampled after the steady
//!   connections opened, before the first cycle) within the cycle's settle time;
//! - RSS does not return to its plateau: the plateau is the highest end-of-cycle RSS
//!   of the warm-up cycles; each of the last three cycles must end at or below
//!   plateau + max(`--rss-tolerance-pct` % of it, `--rss-tolerance-kib`). The warm-up
//!   (`--warmup-cycles`; by default the cycles covering twice the gateway's
//!   `replay_ttl_ms`, read from `/ws/config`) must let the kept events reach their
//!   steady amount (one TTL) and the heap its steady layout: measured here, the
//!   allocator's footprint kept growing for about a second TTL after the kept bytes
//!   stopped (frames freed in arrival order, churn buffers in between), then stayed
//!   flat;
//! - the steady connections lose, duplicate or reorder events (`--strict`).
//!
//! `startup` spawns `agentwire serve` several times and measures, per run, the time
//! from spawn to the first TCP connect that succeeds (the socket listens) and to the
//! first `GET /health` answered (the loop accepted and served a connection), with the
//! connect retried in a tight loop; it prints each run and the medians.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use crate::client::{self, ChurnPlan};
use crate::driver::{self, PhaseSpec};
use crate::report::mib;
use crate::{announce, io_err, sys, Common, Run, RunResult, Shape};

#[derive(Args, Debug)]
pub struct SoakArgs {
    #[command(flatten)]
    pub common: Common,
    /// Whole soak: seconds, or with a unit (90s, 5m, 1h).
    #[arg(long, default_value = "30m")]
    pub duration: String,
    /// One cycle: churn and events for 70 % of it, then settle and sample.
    #[arg(long, default_value_t = 60.0)]
    pub cycle_s: f64,
    /// Cycles whose highest RSS is the plateau (default: those covering twice the
    /// gateway's replay_ttl_ms, from /ws/config; 240 s with its default).
    #[arg(long)]
    pub warmup_cycles: Option<usize>,
    /// Steady connections receiving events the whole time.
    #[arg(long, default_value_t = 300)]
    pub conns: usize,
    #[arg(long, default_value_t = 3)]
    pub conns_per_user: usize,
    /// Events per second to the steady connections' users.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Churn connections in flight per client thread.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Distinct users the churn connections cycle through.
    #[arg(long, default_value_t = 2000)]
    pub churn_users: usize,
    /// Percentage of churn connections dropped without a close handshake.
    #[arg(long, default_value_t = 50)]
    pub abrupt_pct: u32,
    /// RSS may end a late cycle this much above the plateau (percent of it)...
    #[arg(long, default_value_t = 5.0)]
    pub rss_tolerance_pct: f64,
    /// ...or this many KiB, whichever is larger.
    #[arg(long, default_value_t = 2048)]
    pub rss_tolerance_kib: u64,
}

/// Seconds from `90`, `90s`, `5m`, `1h`.
fn parse_duration_s(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        's' => (&s[..s.len() - 1], 1.0),
        'm' => (&s[..s.len() - 1], 60.0),
        'h' => (&s[..s.len() - 1], 3600.0),
        _ => (s, 1.0),
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v > 0.0).then_some(v * mult)
}

/// Open descriptors of `pid`.
fn fd_count(pid: u32) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64)
}

/// What one sample saw.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Sample {
    rss_kib: u64,
    fds: u64,
    timers: u64,
    conns: u64,
    replay_bytes: u64,
}

/// The gateway's figures now: `/ws/stats` first (its own connection is closed by the
/// time the descriptors are counted), then /proc.
fn sample(addr: SocketAddr, pid: u32) -> Option<Sample> {
    let (status, body) = driver::http_get(addr, "/ws/stats").ok()?;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_slice(&body).ok()?;
    Some(Sample {
        timers: v.pointer("/timers/armed")?.as_u64()?,
        conns: v.pointer("/connections/open")?.as_u64()?,
        replay_bytes: v
            .pointer("/replay/bytes")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        fds: fd_count(pid)?,
        rss_kib: sys::rss_kib(pid)?,
    })
}

/// Sample until descriptors, timers and connections are back to `base` (or `until`
/// passed); the last sample and whether it got back.
fn settle(addr: SocketAddr, pid: u32, base: &Sample, until: Instant) -> (Sample, bool) {
    let mut last = Sample::default();
    loop {
        if let Some(s) = sample(addr, pid) {
            last = s;
            if s.fds == base.fds && s.timers == base.timers && s.conns == base.conns {
                return (s, true);
            }
        }
        if Instant::now() >= until {
            return (last, false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn soak(a: SoakArgs) -> RunResult<bool> {
    let total_s = parse_duration_s(&a.duration)
        .ok_or_else(|| format!("--duration {:?}: expected e.g. 60s, 5m, 30m", a.duration))?;
    if !(a.cycle_s.is_finite() && a.cycle_s >= 3.0) {
        return Err("--cycle-s must be at least 3".into());
    }
    let cycles = (total_s / a.cycle_s).floor() as usize;
    let max_cycles = client::MAX_PHASES - 1;
    if cycles < 2 || cycles > max_cycles {
        return Err(format!(
            "--duration / --cycle-s gives {cycles} cycles: need 2 to {max_cycles}"
        ));
    }
    let per_user = a.conns_per_user.max(1);
    let users = a.conns.div_ceil(per_user).max(1);
    let driver = Some(a.common.default_driver());
    let threads = a.common.threads.max(1);
    let churn_max = threads * a.concurrency;
    let mut run = Run::setup(
        "soak",
        a.common,
        driver,
        Shape {
            event_users: users,
            churn_users: a.churn_users.max(1),
            conns_per_user: per_user,
            planned_conns: a.conns + churn_max,
        },
    )?;
    let (addr, pid) = match &run.gateway {
        Some(gw) => (
            gw.addr,
            gw.pid.ok_or("soak needs the gateway's pid (--pid)")?,
        ),
        None => return Err("no gateway".into()),
    };
    let warmup = match a.warmup_cycles {
        Some(n) => n.max(1),
        None => {
            let ttl_ms = driver::http_get(addr, "/ws/config")
                .ok()
                .filter(|(status, _)| *status == 200)
                .and_then(|(_, body)| serde_json::from_slice::<Value>(&body).ok())
                .and_then(|v| v.get("replay_ttl_ms").and_then(Value::as_u64))
                .ok_or("cannot read replay_ttl_ms from /ws/config: pass --warmup-cycles")?;
            ((2 * ttl_ms) as f64 / 1000.0 / a.cycle_s).ceil().max(1.0) as usize
        }
    };
    if cycles <= warmup {
        return Err(format!(
            "{cycles} cycles leave none after the {warmup} warm-up cycles: a longer --duration, or --warmup-cycles"
        ));
    }
    let cycle = Duration::from_secs_f64(a.cycle_s);
    let active = Duration::from_secs_f64(a.cycle_s * 0.7);
    let mut lines = vec![format!(
        "loadgen soak: {cycles} cycles of {} s ({} s churn + events, then settle): {} steady connections ({users} users, {per_user}/user) at {} events/s; churn closed loop, {churn_max} in flight over {} users ({}% dropped without close); warm-up {} cycles",
        a.cycle_s,
        active.as_secs_f64(),
        a.conns,
        a.rate,
        a.churn_users,
        a.abrupt_pct,
        warmup
    )];
    lines.push(format!(
        "  {}",
        announce(&mut run, "opening steady connections")
    ));
    let mut plans = run.plans(0..users, per_user);
    plans.truncate(a.conns);
    let (ok, failed, _) = run.open(plans)?;
    let base_until = Instant::now() + Duration::from_secs(5);
    let want = Sample {
        conns: ok,
        ..Sample::default()
    };
    // The baseline: the steady connections open, nothing else (two equal samples).
    let mut base = sample(addr, pid).ok_or("cannot sample the gateway (/ws/stats, /proc)")?;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let s = sample(addr, pid).ok_or("cannot sample the gateway")?;
        if (s.fds == base.fds && s.timers == base.timers && s.conns == want.conns)
            || Instant::now() >= base_until
        {
            base = s;
            break;
        }
        base = s;
    }
    lines.push(format!(
        "  baseline   {ok} steady connections ({failed} failed): RSS {}, {} fds, {} timers",
        mib(base.rss_kib),
        base.fds,
        base.timers
    ));
    let churn_users: Vec<u32> = (users..users + a.churn_users.max(1))
        .map(|u| u as u32)
        .collect();
    let src = run.source_addrs.first().copied();
    let mut samples: Vec<(Sample, bool, u64, u64)> = Vec::new();
    let mut counts = Vec::new();
    let mut sent_total = 0;
    let mut events_failed = 0;
    let mut prev_frames_expected = 0u64;
    let mut failed_cycles = Vec::new();
    for c in 0..cycles {
        let start = Instant::now();
        let until = start + active;
        let churned_before = run.pool()?.sum(|x| &x.churned);
        {
            let pool = run.pool()?;
            for t in 0..pool.threads() {
                let mine: Vec<u32> = churn_users
                    .iter()
                    .copied()
                    .filter(|u| *u as usize % threads == t)
                    .collect();
                pool.send(
                    t,
                    client::Command::Churn(ChurnPlan {
                        until,
                        concurrency: a.concurrency,
                        users: mine,
                        abrupt_pct: a.abrupt_pct.min(100),
                        src,
                        rate: None,
                        start,
                    }),
                )
                .map_err(io_err("client thread"))?;
            }
        }
        let done = run.phase(&PhaseSpec {
            id: c as u32,
            rate: a.rate.max(1.0),
            duration: active,
            events: 0,
        })?;
        sent_total += done.sent;
        events_failed += done.failed;
        let expected: u64 = done.counts.iter().map(|n| n * per_user as u64).sum();
        let phase_frames = expected - prev_frames_expected.min(expected);
        prev_frames_expected = expected;
        run.drain(phase_frames, Some(c))?;
        counts = done.counts;
        let churned = run.pool()?.sum(|x| &x.churned) - churned_before;
        let settle_until = (start + cycle).max(Instant::now() + Duration::from_secs(2));
        let (s, back) = settle(addr, pid, &base, settle_until);
        let rest = (start + cycle).saturating_duration_since(Instant::now());
        std::thread::sleep(rest);
        let line = format!(
            "  cycle {:>2}/{cycles}  RSS {:>9}  fds {:>5} (base {})  timers {:>5} (base {})  conns {:>5}  replay {:>9}  churned {churned:>6}  events {:>7}{}",
            c + 1,
            mib(s.rss_kib),
            s.fds,
            base.fds,
            s.timers,
            base.timers,
            s.conns,
            mib(s.replay_bytes / 1024),
            done.sent,
            if back { "" } else { "  NOT BACK TO BASELINE" }
        );
        if !run.common.quiet {
            eprintln!("{line}");
        }
        lines.push(line);
        if !back {
            failed_cycles.push(c + 1);
        }
        samples.push((s, back, churned, done.sent));
    }
    run.gateway_stats();
    // Handshake failures of the steady and the churn connections.
    let handshake_failures = run.pool()?.sum(|x| &x.failed);
    let churned_total: u64 = samples.iter().map(|s| s.2).sum();
    lines.push(format!(
        "  churn      {churned_total} connections opened and closed beside the steady ones, {handshake_failures} failed handshakes in all; {sent_total} events sent, {events_failed} failed"
    ));
    let fin = run.finish_clients(&counts)?;
    lines.push(fin.record_checks(&mut run));

    // The verdicts.
    let rss: Vec<u64> = samples.iter().map(|s| s.0.rss_kib).collect();
    let RssVerdict {
        plateau,
        tolerance,
        measured,
        last,
        ok: rss_ok,
    } = rss_verdict(&rss, warmup, a.rss_tolerance_pct, a.rss_tolerance_kib);
    let slope = slope_kib_per_cycle(&measured);
    let mut soak_ok = rss_ok && failed_cycles.is_empty();
    lines.push(format!(
        "  rss        plateau {} (highest of the {} warm-up cycles), tolerance {} KiB; last cycles {}; after warm-up max {}, trend {slope:+.1} KiB/cycle",
        mib(plateau),
        warmup,
        tolerance,
        last.iter().map(|r| mib(*r)).collect::<Vec<_>>().join(", "),
        mib(measured.iter().copied().max().unwrap_or(0)),
    ));
    if !rss_ok {
        lines.push(format!(
            "FAIL rss: a last cycle ended above plateau + tolerance ({} KiB)",
            plateau + tolerance
        ));
    }
    if !failed_cycles.is_empty() {
        lines.push(format!(
            "FAIL baseline: descriptors, timers or connections not back to the baseline after cycles {failed_cycles:?}"
        ));
    }
    if ok == 0 {
        soak_ok = false;
        lines.push("FAIL setup: no steady connection opened".into());
    }
    run.put("connections", json!(ok));
    run.put("handshake_failures", json!(handshake_failures));
    run.put("events_sent", json!(sent_total));
    run.put("events_failed", json!(events_failed));
    run.put("churned", json!(churned_total));
    run.put(
        "soak",
        json!({
            "cycles": cycles,
            "cycle_s": a.cycle_s,
            "warmup_cycles": warmup,
            "baseline": {"rss_kib": base.rss_kib, "fds": base.fds, "timers": base.timers, "conns": base.conns},
            "per_cycle": samples.iter().map(|(s, back, churned, sent)| json!({
                "rss_kib": s.rss_kib, "fds": s.fds, "timers": s.timers, "conns": s.conns,
                "replay_bytes": s.replay_bytes, "back_to_baseline": back,
                "churned": churned, "events": sent,
            })).collect::<Vec<_>>(),
            "plateau_kib": plateau,
            "tolerance_kib": tolerance,
            "trend_kib_per_cycle": (slope * 10.0).round() / 10.0,
            "rss_ok": rss_ok,
            "baseline_ok": failed_cycles.is_empty(),
        }),
    );
    let pass = run.conclude(lines)?;
    Ok(pass && soak_ok)
}

/// The RSS check over the end-of-cycle samples (KiB).
struct RssVerdict {
    /// Highest RSS of the warm-up cycles.
    plateau: u64,
    /// max(`pct` % of the plateau, `kib`).
    tolerance: u64,
    /// The samples after the warm-up.
    measured: Vec<u64>,
    /// The last (at most) three of them.
    last: Vec<u64>,
    /// Each of `last` is at most plateau + tolerance.
    ok: bool,
}

fn rss_verdict(rss: &[u64], warmup: usize, pct: f64, kib: u64) -> RssVerdict {
    let plateau = rss.iter().take(warmup).copied().max().unwrap_or(0);
    let tolerance = ((plateau as f64 * pct / 100.0) as u64).max(kib);
    let measured: Vec<u64> = rss.iter().skip(warmup).copied().collect();
    let last: Vec<u64> = measured.iter().rev().take(3).rev().copied().collect();
    let ok = !last.is_empty() && last.iter().all(|r| *r <= plateau + tolerance);
    RssVerdict {
        plateau,
        tolerance,
        measured,
        last,
        ok,
    }
}

/// Least-squares slope of `ys` over their index (KiB per cycle); 0 for fewer than 2.
fn slope_kib_per_cycle(ys: &[u64]) -> f64 {
    let n = ys.len() as f64;
    if ys.len() < 2 {
        return 0.0;
    }
    let mx = (n - 1.0) / 2.0;
    let my = ys.iter().map(|y| *y as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (i, y) in ys.iter().enumerate() {
        let dx = i as f64 - mx;
        num += dx * (*y as f64 - my);
        den += dx * dx;
    }
    num / den
}

#[derive(Args, Debug)]
pub struct StartupArgs {
    /// `agentwire` binary to start.
    #[arg(long, default_value = "target/release/agentwire")]
    pub gateway_bin: PathBuf,
    /// Starts to measure.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Give up on one start after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    pub timeout_s: f64,
}

/// Milliseconds of a duration, to 0.01.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 100_000.0).round() / 100.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn startup(a: StartupArgs) -> RunResult<bool> {
    if !a.gateway_bin.exists() {
        return Err(format!(
            "{} not found: build it with `cargo build --release` (or pass --gateway-bin)",
            a.gateway_bin.display()
        ));
    }
    let secret = agentwire::__internal::auth::try_generate_secret()
        .map_err(|e| format!("cannot draw a random secret: {e}"))?;
    let limit = Duration::from_secs_f64(a.timeout_s.max(0.1));
    let (mut to_connect, mut to_health) = (Vec::new(), Vec::new());
    println!(
        "loadgen startup: {} starts of {} serve (spawn to first TCP connect, spawn to first GET /health answered; connect retried in a tight loop)",
        a.runs,
        a.gateway_bin.display()
    );
    for i in 0..a.runs.max(1) {
        let port = crate::gateway::free_port().map_err(io_err("free port"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = Command::new(&a.gateway_bin);
        cmd.args(["serve", "--listen", &addr.to_string()])
            .env("AGENTWIRE_JWT_SECRET", &secret)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let t0 = Instant::now();
        let mut child = cmd.spawn().map_err(io_err("spawning the gateway"))?;
        let measured = (|| -> RunResult<(Duration, Duration)> {
            let mut stream = loop {
                match TcpStream::connect(addr) {
                    Ok(s) => break s,
                    Err(e) => {
                        if t0.elapsed() > limit {
                            return Err(format!("no connect within {limit:?}: {e}"));
                        }
                        if let Ok(Some(status)) = child.try_wait() {
                            return Err(format!("the gateway exited ({status}) before listening"));
                        }
                        std::hint::spin_loop();
                    }
                }
            };
            let connected = t0.elapsed();
            stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .map_err(io_err("writing GET /health"))?;
            stream
                .set_read_timeout(Some(limit))
                .map_err(io_err("read timeout"))?;
            let mut head = [0u8; 12];
            stream
                .read_exact(&mut head)
                .map_err(io_err("reading the /health answer"))?;
            let answered = t0.elapsed();
            if &head[..9] != b"HTTP/1.1 " {
                return Err(format!(
                    "unexpected answer {:?}",
                    String::from_utf8_lossy(&head)
                ));
            }
            Ok((connected, answered))
        })();
        sys::terminate(child.id());
        let _ = child.wait();
        let (c, h) = measured?;
        println!(
            "  run {:>2}: listening (connect) {:>7.2} ms, first request answered {:>7.2} ms",
            i + 1,
            ms(c),
            ms(h)
        );
        to_connect.push(ms(c));
        to_health.push(ms(h));
    }
    let (connect_ms, health_ms) = (to_connect.clone(), to_health.clone());
    let (mc, mh) = (median(&mut to_connect), median(&mut to_health));
    let max_h = to_health.iter().copied().fold(0.0, f64::max);
    println!(
        "  median: listening {mc:.2} ms, first request answered {mh:.2} ms (max {max_h:.2} ms) over {} runs",
        to_health.len()
    );
    println!(
        "JSON {}",
        json!({"scenario": "startup", "runs": to_health.len(), "connect_ms": connect_ms, "health_ms": health_ms,
               "median_connect_ms": mc, "median_health_ms": mh, "max_health_ms": max_h})
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_slopes() {
        assert_eq!(parse_duration_s("60s"), Some(60.0));
        assert_eq!(parse_duration_s("5m"), Some(300.0));
        assert_eq!(parse_duration_s("90"), Some(90.0));
        assert_eq!(parse_duration_s("1h"), Some(3600.0));
        assert_eq!(parse_duration_s("0"), None);
        assert_eq!(parse_duration_s("x"), None);
        assert_eq!(slope_kib_per_cycle(&[5, 5, 5]), 0.0);
        assert!((slope_kib_per_cycle(&[10, 20, 30, 40]) - 10.0).abs() < 1e-9);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn rss_must_come_back_to_the_warm_up_plateau() {
        // The 5-minute run of docs/BENCHMARKS.md (KiB per 20 s cycle): flat from cycle 12.
        let run = [
            10624, 13312, 15368, 18700, 20896, 22828, 24236, 25748, 27292, 28544, 29536, 30788,
            31008, 31008, 31008,
        ];
        let v = rss_verdict(&run, 12, 5.0, 2048);
        assert!(v.ok);
        assert_eq!((v.plateau, v.tolerance), (30788, 2048));
        assert_eq!(v.last, vec![31008, 31008, 31008]);
        // The same run with a warm-up of one TTL (7 cycles) still saw the heap grow.
        let v = rss_verdict(&run, 7, 5.0, 2048);
        assert!(!v.ok);
        assert_eq!(v.plateau, 24236);
        // A leak: steady growth after any warm-up fails.
        let leak: Vec<u64> = (0..20).map(|i| 10_000 + i * 600).collect();
        assert!(!rss_verdict(&leak, 8, 5.0, 2048).ok);
        // Nothing after the warm-up: no verdict can pass.
        assert!(!rss_verdict(&run, 15, 5.0, 2048).ok);
        // The percentage wins when larger.
        assert_eq!(
            rss_verdict(&[100_000, 100_000], 1, 5.0, 2048).tolerance,
            5_000
        );
    }
}
