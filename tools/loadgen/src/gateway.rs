//! The gateway under test: started as a child (`agentwire serve`, the
//! `bench_gateway` example when events come from in-process emitters, or a comparison
//! peer from tools/peers) or an already running one (`--connect ADDR --pid PID`); and
//! the [`Monitor`] sampling its RSS and CPU time from /proc while the run goes on.

use std::io;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::driver::{self, BenchChild};
use crate::sys;

/// How the gateway process came to be.
pub enum Process {
    /// `agentwire serve` started by us.
    Binary(Child),
    /// `bench_gateway` started by us (it is also the emitter driver).
    Bench(Box<BenchChild>),
    /// Started by someone else.
    External,
}

pub struct Gateway {
    pub addr: SocketAddr,
    /// For /proc sampling (None: an external gateway without `--pid`).
    pub pid: Option<u32>,
    /// The reactor thread, when known (bench_gateway reports it).
    pub reactor_tid: Option<u32>,
    pub process: Process,
    pub log: Option<PathBuf>,
}

/// Every online CPU (to undo the load's affinity inherited by a child).
pub fn all_cpus() -> Vec<usize> {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    (0..n.max(1) as usize).collect()
}

/// Pin the child (all its future threads) to `cpus`, set its nice value, and have it
/// get SIGTERM if the load generator dies first (no orphaned gateway), before it runs.
pub fn pin_child(cmd: &mut Command, cpus: Vec<usize>, nice: Option<i32>) {
    // SAFETY: the closure only calls prctl, sched_setaffinity and setpriority, all
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            );
            sys::set_affinity(0, &cpus)?;
            if let Some(n) = nice {
                sys::set_own_nice(n)?;
            }
            Ok(())
        });
    }
}

/// A random secret (for the gateway's JWT secret, publish key and user prefix).
pub fn random_secret() -> Result<String, String> {
    agentwire::__internal::auth::try_generate_secret()
        .map_err(|e| format!("cannot draw a random secret: {e}"))
}

/// The HS256 token minter for the gateway's `secret` (the gateway checks with the same).
pub fn hs256_minter(secret: &str) -> Result<agentwire::Authenticator, String> {
    agentwire::Authenticator::new(&agentwire::AuthSettings {
        algorithm: agentwire::JwtAlgorithm::Hs256,
        secret: Some(secret.to_string()),
        public_key_pem: None,
        issuer: None,
        audience: None,
        leeway_s: 5,
    })
    .map_err(|e| format!("cannot build the token minter: {e}"))
}

/// `--gateway-set NAME=VALUE` settings as flags of `agentwire serve` (`--name VALUE`,
/// the name's `_` written `-`).
pub fn gateway_set_args(sets: &[String]) -> Result<Vec<String>, String> {
    let mut args = Vec::with_capacity(sets.len() * 2);
    for s in sets {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("--gateway-set {s:?}: expected NAME=VALUE"))?;
        args.push(format!("--{}", k.trim().replace('_', "-")));
        args.push(v.to_owned());
    }
    Ok(args)
}

/// A free loopback port (bound and released; the child binds it right after).
pub fn free_port() -> io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

pub fn log_file(scenario: &str, what: &str) -> io::Result<(std::fs::File, PathBuf)> {
    let dir = std::env::temp_dir().join("agentwire-loadgen");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{scenario}-{what}-{}.log", std::process::id()));
    Ok((std::fs::File::create(&path)?, path))
}

/// Start `agentwire serve` and wait until /health answers 200.
pub fn start_binary(
    bin: &Path,
    args: &[String],
    env: &[(&str, &str)],
    cpus: Vec<usize>,
    nice: Option<i32>,
    log: (std::fs::File, PathBuf),
    deadline: Instant,
) -> io::Result<Gateway> {
    let mut cmd = Command::new(bin);
    cmd.arg("serve").args(args);
    start_process(
        cmd,
        &bin.display().to_string(),
        env,
        cpus,
        nice,
        log,
        deadline,
    )
}

/// A comparison peer (tools/peers): which one, and where its pieces are.
#[derive(Clone, Debug)]
pub struct PeerCommand {
    /// `tokio`, `node` or `python`.
    pub name: &'static str,
    /// The program started (the peer binary, `node` or the venv's python).
    pub program: PathBuf,
    /// Arguments before `--listen` (the script, for node and python).
    pub args: Vec<String>,
    /// What to run when the program or script is missing.
    pub setup_hint: &'static str,
}

/// Start a comparison peer (`PROGRAM ARGS --listen ADDR`, secrets in the environment
/// as `AGENTWIRE_JWT_SECRET` / `AGENTWIRE_PUBLISH_KEY`) and wait for /health.
pub fn start_peer(
    peer: &PeerCommand,
    env: &[(&str, &str)],
    cpus: Vec<usize>,
    nice: Option<i32>,
    log: (std::fs::File, PathBuf),
    deadline: Instant,
) -> io::Result<Gateway> {
    let missing = |p: &Path| {
        io::Error::other(format!(
            "{} not found: run `{}`",
            p.display(),
            peer.setup_hint
        ))
    };
    // A bare program name (`node`) is looked up in PATH by the spawn itself.
    if peer.program.components().count() > 1 && !peer.program.exists() {
        return Err(missing(&peer.program));
    }
    for a in &peer.args {
        let p = Path::new(a);
        if (a.ends_with(".js") || a.ends_with(".py")) && !p.exists() {
            return Err(missing(p));
        }
    }
    let mut cmd = Command::new(&peer.program);
    cmd.args(&peer.args);
    let what = format!("peer {} ({})", peer.name, peer.program.display());
    start_process(cmd, &what, env, cpus, nice, log, deadline)
}

/// Start `cmd --listen ADDR` on a free port (pinned, niced, output to `log`) and wait
/// until /health answers 200.
fn start_process(
    mut cmd: Command,
    what: &str,
    env: &[(&str, &str)],
    cpus: Vec<usize>,
    nice: Option<i32>,
    log: (std::fs::File, PathBuf),
    deadline: Instant,
) -> io::Result<Gateway> {
    let port = free_port()?;
    let addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
    cmd.arg("--listen")
        .arg(addr.to_string())
        .envs(env.iter().copied())
        .env(
            "RUST_LOG",
            std::env::var("LOADGEN_GATEWAY_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.0.try_clone()?)
        .stderr(log.0);
    pin_child(&mut cmd, cpus, nice);
    let mut child = cmd
        .spawn()
        .map_err(|e| io::Error::other(format!("cannot start {what}: {e}")))?;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(io::Error::other(format!(
                "{what} exited at start ({status}); see {}",
                log.1.display()
            )));
        }
        if matches!(driver::http_get(addr, "/health"), Ok((200, _))) {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other(format!(
                "{what} did not answer /health in time; see {}",
                log.1.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Gateway {
        addr,
        pid: Some(child.id()),
        reactor_tid: None,
        process: Process::Binary(child),
        log: Some(log.1),
    })
}

impl Gateway {
    /// Stop a gateway we started (SIGTERM / quit, then SIGKILL after `wait`).
    pub fn stop(self, wait: Duration) -> String {
        match self.process {
            Process::Binary(mut child) => {
                sys::terminate(child.id());
                driver::wait_child(&mut child, wait)
            }
            Process::Bench(b) => b.stop(wait),
            Process::External => "left running (external)".into(),
        }
    }

    pub fn bench(&mut self) -> Option<&mut BenchChild> {
        match &mut self.process {
            Process::Bench(b) => Some(b),
            _ => None,
        }
    }
}

/// CPU-time and clock readings at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Mark {
    pub at: Instant,
    pub proc_ticks: u64,
    /// The processes of `Monitor::also_count`, together.
    pub also_ticks: u64,
    pub reactor_ticks: Option<u64>,
    pub own_cpu_us: u64,
    /// Busy ticks of the whole machine.
    pub machine_busy: u64,
    /// The reactor thread's run-queue wait (ns) and involuntary switches.
    pub reactor_sched: Option<(u64, u64)>,
}

/// CPU use between two marks, in percent of one core.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuUse {
    /// The gateway process (with bench_gateway: reactor and emitters).
    pub gateway_proc: Option<f64>,
    /// The reactor thread alone, when known.
    pub reactor: Option<f64>,
    pub loadgen: f64,
    /// Everything else on the machine (other processes, kernel threads): noise.
    pub other: f64,
    /// A cluster run: the nodes after node 0 and redis-server (0 otherwise); not in
    /// `other`.
    pub cluster_rest: f64,
    /// Time the reactor thread was runnable but waited for a CPU, in ms.
    pub reactor_wait_ms: Option<f64>,
    /// Times the reactor thread was preempted.
    pub reactor_preempted: Option<u64>,
}

/// Samples the gateway's RSS every 100 ms (latest and peak) on its own thread.
pub struct Monitor {
    pid: Option<u32>,
    /// Processes of the run besides the gateway (a cluster's other nodes and Redis):
    /// their CPU is kept out of "everything else".
    also: Vec<u32>,
    reactor_tid: Option<u32>,
    latest_rss: Arc<AtomicU64>,
    peak_rss: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    tck: u64,
}

impl Monitor {
    pub fn start(pid: Option<u32>, reactor_tid: Option<u32>) -> Monitor {
        let latest_rss = Arc::new(AtomicU64::new(0));
        let peak_rss = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = pid.and_then(|pid| {
            let (l, p, s) = (latest_rss.clone(), peak_rss.clone(), stop.clone());
            std::thread::Builder::new()
                .name("rss-sampler".into())
                .spawn(move || {
                    while !s.load(Ordering::Relaxed) {
                        if let Some(kib) = sys::rss_kib(pid) {
                            l.store(kib, Ordering::Relaxed);
                            p.fetch_max(kib, Ordering::Relaxed);
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                })
                .ok()
        });
        Monitor {
            pid,
            also: Vec::new(),
            reactor_tid,
            latest_rss,
            peak_rss,
            stop,
            thread,
            tck: sys::clk_tck(),
        }
    }

    /// Count these processes as part of the run (a cluster's other nodes and Redis).
    pub fn also_count(&mut self, pids: Vec<u32>) {
        self.also = pids;
    }

    /// Current RSS in KiB (read now).
    pub fn rss_now(&self) -> Option<u64> {
        self.pid.and_then(sys::rss_kib)
    }

    pub fn latest_rss(&self) -> u64 {
        self.latest_rss.load(Ordering::Relaxed)
    }

    pub fn peak_rss(&self) -> u64 {
        self.peak_rss.load(Ordering::Relaxed)
    }

    pub fn mark(&self) -> Mark {
        Mark {
            at: Instant::now(),
            proc_ticks: self.pid.and_then(|p| sys::cpu_ticks(p, None)).unwrap_or(0),
            also_ticks: self
                .also
                .iter()
                .filter_map(|p| sys::cpu_ticks(*p, None))
                .sum(),
            reactor_ticks: self
                .pid
                .zip(self.reactor_tid)
                .and_then(|(p, t)| sys::cpu_ticks(p, Some(t))),
            own_cpu_us: sys::own_cpu_us(),
            machine_busy: sys::machine_ticks().map_or(0, |t| t.0),
            reactor_sched: self
                .pid
                .zip(self.reactor_tid)
                .and_then(|(p, t)| sys::sched_wait(p, t)),
        }
    }

    /// CPU use between two marks.
    pub fn cpu(&self, a: &Mark, b: &Mark) -> CpuUse {
        let wall = b.at.duration_since(a.at).as_secs_f64().max(1e-6);
        let pct = |t: u64| t as f64 / self.tck as f64 / wall * 100.0;
        let gateway_proc = self
            .pid
            .map(|_| pct(b.proc_ticks.saturating_sub(a.proc_ticks)));
        let reactor = a
            .reactor_ticks
            .zip(b.reactor_ticks)
            .map(|(x, y)| pct(y.saturating_sub(x)));
        let loadgen = b.own_cpu_us.saturating_sub(a.own_cpu_us) as f64 / 1e6 / wall * 100.0;
        let machine = pct(b.machine_busy.saturating_sub(a.machine_busy));
        let cluster_rest = pct(b.also_ticks.saturating_sub(a.also_ticks));
        let other = (machine - gateway_proc.unwrap_or(0.0) - loadgen - cluster_rest).max(0.0);
        let sched = a.reactor_sched.zip(b.reactor_sched);
        CpuUse {
            gateway_proc,
            reactor,
            loadgen,
            other,
            cluster_rest,
            reactor_wait_ms: sched.map(|(x, y)| y.0.saturating_sub(x.0) as f64 / 1e6),
            reactor_preempted: sched.map(|(x, y)| y.1.saturating_sub(x.1)),
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_set_becomes_serve_flags_and_a_setting_without_a_value_is_refused() {
        let sets = [
            "replay_events=5".to_owned(),
            " redis_url =redis://h:1".to_owned(),
        ];
        assert_eq!(
            gateway_set_args(&sets).unwrap(),
            ["--replay-events", "5", "--redis-url", "redis://h:1"]
        );
        let err = gateway_set_args(&["replay_events".to_owned()]).unwrap_err();
        assert!(err.contains("expected NAME=VALUE"), "{err}");
    }
}
