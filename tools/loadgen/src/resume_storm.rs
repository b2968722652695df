//! `loadgen resume-storm`: a Redis-engine node holding thousands of connections is
//! killed (`kill -9`); its clients reconnect to the survivors at once and resume from
//! Redis (issue 11, "Resume storm"). (`loadgen storm` is the older connect/close churn
//! on one gateway, src/main.rs.)
//!
//! Set-up: a `redis-server` and `--nodes` gateway nodes (3). Node 0 holds `--conns`
//! storm clients (5,000; one user each), the survivors hold `--others` other users
//! (spread). Two paced publishers post through the survivors only: `--storm-rate`
//! events/s spread over the storm users, `--other-rate` over the other users. After
//! `--before-s`, node 0 gets SIGKILL. Each storm client sees its connection end and
//! reconnects to a survivor (spread by user) after a random delay below
//! `--reconnect-jitter-ms`, with `last_seq` + `epoch`; a failed attempt is retried after
//! a full-jitter exponential backoff (`--backoff-ms` doubling, at most 5 s, at most
//! `--max-attempts`): the shape of clients/js, with shorter defaults (clients/js: first
//! attempt within 1 s, base 1 s, at most 30 s; `--reconnect-jitter-ms 1000
//! --backoff-ms 1000` for its first steps). A client has caught up when its
//! connection says `"resumed":true` and it holds every event acknowledged (202) for its
//! user by the time its `connected` frame arrived. When every storm client has caught
//! up (or `--converge-timeout-s` passed) the run goes on for `--after-s`, the
//! publishers stop, the clients drain.
//!
//! Checks, per user over all its connections: `seq` +1 per frame and the generator's
//! index `n` +1 per frame (nothing lost, nothing twice, in order), and at the end every
//! acknowledged event received. Reported: time from the kill until every storm client
//! reconnected and caught up (and their distributions), failed handshakes before
//! retries and clients that never got back after retries (must be 0), and the other
//! users' emit-to-receive latency before / during / after the storm (by the phase the
//! event was published in). Exit 1 when an event was lost/duplicated/reordered, a
//! client never caught up or gave up, or a publish failed.
//!
//! Client threads (`--threads`) are mio loops with the small client of src/client.rs
//! (its socket, upgrade check and frame masking) and src/resume.rs's frame parser. One
//! process holds every connection: keep `--conns` + `--others` under the 20,000 open
//! files limit.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde_json::{json, Value};

use crate::client::{check_upgrade, find, find_u64, new_histogram, open_socket, push_frame};
use crate::report::{lat_line, percentiles, us};
use crate::resume::{
    event_batch, parse_connected, parse_frame, publish, upgrade_request, ws_path, NodeArgs, Nodes,
    WS_KEY,
};
use crate::sys;

/// A handshake not done in this time has failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest retry backoff.
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Phases of the other users' latency: before the kill, during the storm, after it.
const PHASES: [&str; 3] = ["before", "during", "after"];

#[derive(Args, Debug)]
pub struct StormArgs {
    /// Gateway nodes on one redis-server; node 0 is killed.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Storm clients (one user each) on node 0.
    #[arg(long, default_value_t = 5000)]
    pub conns: usize,
    /// Other users (one connection each) on the survivors, whose latency is measured.
    #[arg(long, default_value_t = 500)]
    pub others: usize,
    /// Events per second to the storm users, through the survivors.
    #[arg(long, default_value_t = 2000.0)]
    pub storm_rate: f64,
    /// Events per second to the other users, through the survivors.
    #[arg(long, default_value_t = 1000.0)]
    pub other_rate: f64,
    /// Seconds of steady load before the kill.
    #[arg(long, default_value_t = 5.0)]
    pub before_s: f64,
    /// Seconds of steady load after every storm client caught up.
    #[arg(long, default_value_t = 5.0)]
    pub after_s: f64,
    /// Most seconds from the kill until every storm client caught up.
    #[arg(long, default_value_t = 60.0)]
    pub converge_timeout_s: f64,
    /// A storm client's first reconnect waits a random time below this.
    #[arg(long, default_value_t = 250)]
    pub reconnect_jitter_ms: u64,
    /// Retry n waits a random time below backoff x 2^n (at most 5 s).
    #[arg(long, default_value_t = 100)]
    pub backoff_ms: u64,
    /// Attempts per storm client before it gives up.
    #[arg(long, default_value_t = 12)]
    pub max_attempts: u32,
    /// Client threads (mio loops).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Publisher threads per kind (storm users, other users).
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Padding bytes in every event's data.
    #[arg(long, default_value_t = 0)]
    pub payload_bytes: usize,
    #[command(flatten)]
    pub node: NodeArgs,
    /// Also write the JSON record to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress lines.
    #[arg(long, short)]
    pub quiet: bool,
}

/// State shared by the controller, the client threads and the publishers.
struct Shared {
    /// Events acknowledged (202) per user index.
    acked: Vec<AtomicU64>,
    /// Phase stamped into new events (0 before, 1 during, 2 after).
    phase: AtomicU8,
    killed_at: OnceLock<Instant>,
    /// Storm clients connected at the start.
    opened: AtomicU64,
    /// Other users connected at the start.
    others_opened: AtomicU64,
    /// Storm clients reconnected (resumed) after the kill.
    reconnected: AtomicU64,
    caught_up: AtomicU64,
    gave_up: AtomicU64,
    /// Handshakes after the kill that failed (every attempt counts).
    failed_attempts: AtomicU64,
    /// Handshakes of the first connections (before the kill) that failed.
    initial_failed: AtomicU64,
    /// Frames that broke the order/once check.
    bad_frames: AtomicU64,
    frames: AtomicU64,
    /// Publishers stopped: threads report when their users hold every acked event.
    draining: AtomicBool,
    /// Client threads whose users are complete (while draining).
    complete: AtomicU64,
    stop: AtomicBool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SockState {
    Connecting,
    Handshake,
    Open,
}

struct Sock {
    stream: TcpStream,
    state: SockState,
    started: Instant,
    input: Vec<u8>,
    out: Vec<u8>,
}

struct Client {
    user: u32,
    storm: bool,
    token: String,
    path_node: usize,
    sock: Option<Sock>,
    /// Resume point: the epoch and last seq seen (None before the first `connected`).
    epoch: Option<String>,
    last_seq: u64,
    /// Next generator index expected.
    next_n: u64,
    /// Attempts since the connection was lost.
    attempts: u32,
    retry_at: Option<Instant>,
    /// After a reconnect: caught up once `next_n` reaches this.
    target: Option<u64>,
    reconnected: bool,
    caught_up: bool,
    gave_up: bool,
}

/// A client thread's findings.
#[derive(Default)]
struct ThreadOut {
    latency: Vec<Histogram<u64>>,
    /// Kill to reconnected (`connected` frame), storm clients, us.
    reconnect: Option<Histogram<u64>>,
    /// Kill to caught up, us.
    catch_up: Option<Histogram<u64>>,
    /// Attempts per storm client that got back (1 = the first one worked).
    attempts: Option<Histogram<u64>>,
    failures: std::collections::BTreeMap<String, u64>,
    /// Why connections ended (before/after the kill, storm/other).
    losses: std::collections::BTreeMap<String, u64>,
    bad: Vec<String>,
    lost: u64,
    unexpected_resets: u64,
}

struct Worker {
    shared: Arc<Shared>,
    nodes: Vec<SocketAddr>,
    clients: Vec<Client>,
    poll: Poll,
    out: ThreadOut,
    rng: u64,
    args: WorkerArgs,
    queue: VecDeque<usize>,
    accept_key: String,
    reported_complete: bool,
}

#[derive(Clone, Copy)]
struct WorkerArgs {
    jitter_ms: u64,
    backoff_ms: u64,
    max_attempts: u32,
}

impl Worker {
    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn run(mut self) -> ThreadOut {
        let mut events = Events::with_capacity(4096);
        self.queue = (0..self.clients.len()).collect();
        let mut last_sweep = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            // Start what is due, a few hundred at a time (the listen backlogs).
            let mut in_flight = if self.queue.is_empty() {
                0
            } else {
                self.clients
                    .iter()
                    .filter(|c| c.sock.as_ref().is_some_and(|s| s.state != SockState::Open))
                    .count()
            };
            while in_flight < 256 {
                let Some(i) = self.queue.pop_front() else {
                    break;
                };
                self.connect(i);
                in_flight += 1;
            }
            if let Err(e) = self.poll.poll(&mut events, Some(Duration::from_millis(10))) {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.out.bad.push(format!("poll: {e}"));
                    break;
                }
            }
            for ev in events.iter() {
                let i = ev.token().0;
                if let Err(why) = self.step(i) {
                    self.lost_conn(i, why);
                }
            }
            if last_sweep.elapsed() >= Duration::from_millis(20) {
                last_sweep = Instant::now();
                self.sweep();
            }
        }
        self.finish()
    }

    fn connect(&mut self, i: usize) {
        let Some(c) = self.clients.get_mut(i) else {
            return;
        };
        let Some(&addr) = self.nodes.get(c.path_node) else {
            return;
        };
        c.retry_at = None;
        c.attempts += 1;
        match open_socket(addr, None) {
            Ok(mut stream) => {
                match self.poll.registry().register(
                    &mut stream,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    Ok(()) => {
                        c.sock = Some(Sock {
                            stream,
                            state: SockState::Connecting,
                            started: Instant::now(),
                            input: Vec::new(),
                            out: Vec::new(),
                        });
                    }
                    Err(e) => self.attempt_failed(i, format!("register: {}", e.kind())),
                }
            }
            Err(e) => self.attempt_failed(i, format!("connect: {}", e.kind())),
        }
    }

    /// A handshake failed: retry after a full-jitter exponential backoff.
    fn attempt_failed(&mut self, i: usize, why: String) {
        if self.shared.killed_at.get().is_some() {
            self.shared.failed_attempts.fetch_add(1, Ordering::Relaxed);
            *self.out.failures.entry(why).or_insert(0) += 1;
        } else {
            self.shared.initial_failed.fetch_add(1, Ordering::Relaxed);
            *self
                .out
                .failures
                .entry(format!("before the kill: {why}"))
                .or_insert(0) += 1;
        }
        let r = self.rand();
        let (backoff, max) = (self.args.backoff_ms, self.args.max_attempts);
        let survivors = self.nodes.len().saturating_sub(1).max(1);
        let Some(c) = self.clients.get_mut(i) else {
            return;
        };
        if let Some(mut s) = c.sock.take() {
            let _ = self.poll.registry().deregister(&mut s.stream);
        }
        if c.attempts >= max {
            c.gave_up = true;
            self.shared.gave_up.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let cap = (backoff.saturating_mul(1 << c.attempts.min(16)))
            .min(BACKOFF_CAP.as_millis() as u64)
            .max(1);
        c.retry_at = Some(Instant::now() + Duration::from_millis(r % cap));
        if c.storm && self.shared.killed_at.get().is_some() {
            // The next survivor.
            c.path_node = 1 + (c.user as usize + c.attempts as usize) % survivors;
        }
    }

    /// An open connection ended: resume, after a jittered delay.
    fn lost_conn(&mut self, i: usize, why: String) {
        let open = self
            .clients
            .get(i)
            .and_then(|c| c.sock.as_ref())
            .is_some_and(|s| s.state == SockState::Open);
        if !open {
            return self.attempt_failed(i, why);
        }
        let killed = self.shared.killed_at.get().is_some();
        let r = self.rand();
        let jitter = self.args.jitter_ms.max(1);
        let survivors = self.nodes.len().saturating_sub(1).max(1);
        let Some(c) = self.clients.get_mut(i) else {
            return;
        };
        if let Some(mut s) = c.sock.take() {
            let _ = self.poll.registry().deregister(&mut s.stream);
        }
        if c.gave_up {
            return;
        }
        let what = format!(
            "{} {} the kill: {why}",
            if c.storm { "storm" } else { "other" },
            if killed { "after" } else { "before" }
        );
        *self.out.losses.entry(what).or_insert(0) += 1;
        if !c.storm || !killed || c.reconnected {
            self.out.unexpected_resets += 1;
        }
        c.attempts = 0;
        if c.storm && killed {
            c.path_node = 1 + c.user as usize % survivors;
        }
        c.retry_at = Some(Instant::now() + Duration::from_millis(r % jitter));
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        for i in 0..self.clients.len() {
            let Some(c) = self.clients.get(i) else {
                continue;
            };
            if c.retry_at.is_some_and(|t| t <= now) {
                if let Some(c) = self.clients.get_mut(i) {
                    c.retry_at = None;
                }
                self.queue.push_back(i);
            } else if c.sock.as_ref().is_some_and(|s| {
                s.state != SockState::Open && now.duration_since(s.started) > HANDSHAKE_TIMEOUT
            }) {
                self.attempt_failed(i, "handshake timeout".into());
            }
        }
        if !self.reported_complete && self.shared.draining.load(Ordering::Relaxed) {
            let acked = &self.shared.acked;
            let done = self.clients.iter().all(|c| {
                c.gave_up
                    || c.next_n
                        >= acked
                            .get(c.user as usize)
                            .map_or(0, |a| a.load(Ordering::Relaxed))
            });
            if done {
                self.reported_complete = true;
                self.shared.complete.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Readiness on client `i`'s socket: connect, write, read until WouldBlock.
    fn step(&mut self, i: usize) -> Result<(), String> {
        let mask = (self.rand() as u32).to_be_bytes();
        let nodes = &self.nodes;
        let Some(c) = self.clients.get_mut(i) else {
            return Ok(());
        };
        let Some(s) = c.sock.as_mut() else {
            return Ok(());
        };
        if s.state == SockState::Connecting {
            match s.stream.take_error() {
                Ok(Some(e)) | Err(e) => return Err(format!("connect: {}", e.kind())),
                Ok(None) => {}
            }
            match s.stream.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(format!("connect: {}", e.kind())),
            }
            let resume = c.epoch.as_deref().map(|e| (c.last_seq, e));
            let addr = nodes.get(c.path_node).copied().ok_or("no node")?;
            s.out
                .extend_from_slice(upgrade_request(addr, &ws_path(resume), &c.token).as_bytes());
            s.state = SockState::Handshake;
        }
        flush(s)?;
        let mut buf = [0u8; 64 * 1024];
        loop {
            let Some(s) = self.clients.get_mut(i).and_then(|c| c.sock.as_mut()) else {
                return Ok(());
            };
            match s.stream.read(&mut buf) {
                Ok(0) => return Err("eof".into()),
                Ok(n) => {
                    s.input.extend_from_slice(buf.get(..n).unwrap_or(&[]));
                    self.consume(i, mask)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("io: {}", e.kind())),
            }
        }
        if let Some(s) = self.clients.get_mut(i).and_then(|c| c.sock.as_mut()) {
            flush(s)?;
        }
        Ok(())
    }

    /// Parse what client `i` received: the upgrade answer, then frames.
    fn consume(&mut self, i: usize, mask: [u8; 4]) -> Result<(), String> {
        let Some(c) = self.clients.get_mut(i) else {
            return Ok(());
        };
        let Some(s) = c.sock.as_mut() else {
            return Ok(());
        };
        let mut pos = 0;
        if s.state == SockState::Handshake {
            let Some(end) = find(&s.input, b"\r\n\r\n") else {
                return if s.input.len() > 16 * 1024 {
                    Err("response head too large".to_owned())
                } else {
                    Ok(())
                };
            };
            check_upgrade(
                s.input.get(..end).unwrap_or(&[]),
                s.input.get(end + 4..).unwrap_or(&[]),
                &self.accept_key,
            )?;
            s.state = SockState::Open;
            pos = end + 4;
        }
        let mut input = std::mem::take(&mut s.input);
        let now_us = sys::realtime_us();
        loop {
            let rest = input.get(pos..).unwrap_or(&[]);
            let Some((f, used)) = parse_frame(rest)? else {
                break;
            };
            pos += used;
            match (f.opcode, f.fin) {
                (0x1, true) => {
                    let payload = f.payload.to_vec();
                    self.on_text(i, &payload, now_us)?;
                }
                (0x9, _) => {
                    if let Some(s) = self.clients.get_mut(i).and_then(|c| c.sock.as_mut()) {
                        push_frame(&mut s.out, 0xA, f.payload, mask);
                    }
                }
                (0xA, _) => {}
                (0x8, _) => {
                    let code = match f.payload {
                        [a, b, ..] => u16::from_be_bytes([*a, *b]),
                        _ => 1005,
                    };
                    return Err(format!("closed by the gateway ({code})"));
                }
                (op, fin) => return Err(format!("unexpected frame (opcode {op}, fin {fin})")),
            }
        }
        input.drain(..pos.min(input.len()));
        if let Some(s) = self.clients.get_mut(i).and_then(|c| c.sock.as_mut()) {
            s.input = input;
        }
        Ok(())
    }

    fn on_text(&mut self, i: usize, payload: &[u8], now_us: u64) -> Result<(), String> {
        let shared = self.shared.clone();
        let Some(c) = self.clients.get_mut(i) else {
            return Ok(());
        };
        if let Some(conn) = parse_connected(payload) {
            match &c.epoch {
                None => {
                    c.epoch = Some(conn.epoch);
                    c.last_seq = conn.last_seq;
                    let n = if c.storm {
                        &shared.opened
                    } else {
                        &shared.others_opened
                    };
                    n.fetch_add(1, Ordering::Relaxed);
                }
                Some(e) => {
                    if conn.resumed != Some(true) {
                        let why = format!(
                            "user {}: resume answered resumed={:?} (epoch {e} -> {})",
                            c.user, conn.resumed, conn.epoch
                        );
                        self.out.bad.push(why.clone());
                        c.gave_up = true;
                        shared.gave_up.fetch_add(1, Ordering::Relaxed);
                        return Err(why);
                    }
                    let killed = shared.killed_at.get().copied();
                    if c.storm && !c.reconnected {
                        if let Some(k) = killed {
                            c.reconnected = true;
                            let at = k.elapsed().as_micros() as u64;
                            shared.reconnected.fetch_add(1, Ordering::Relaxed);
                            self.out
                                .reconnect
                                .get_or_insert_with(new_histogram)
                                .saturating_record(at.max(1));
                            self.out
                                .attempts
                                .get_or_insert_with(new_histogram)
                                .saturating_record(u64::from(c.attempts.max(1)));
                            let target = shared
                                .acked
                                .get(c.user as usize)
                                .map_or(0, |a| a.load(Ordering::Relaxed));
                            c.target = Some(target);
                        }
                    }
                }
            }
            c.attempts = 0;
            self.check_caught_up(i);
            return Ok(());
        }
        let Some(seq) = find_u64(payload, b"\"seq\":") else {
            return Ok(()); // pong, error: not an event
        };
        let at = find(payload, b"\"data\":{\"t_us\":").ok_or("an event without our data")?;
        let data = payload.get(at..).unwrap_or(&[]);
        let (t_us, n, p) = (
            find_u64(data, b"\"t_us\":").unwrap_or(0),
            find_u64(data, b"\"n\":").ok_or("an event without n")?,
            find_u64(data, b"\"p\":").unwrap_or(0) as usize,
        );
        shared.frames.fetch_add(1, Ordering::Relaxed);
        if seq != c.last_seq + 1 || n != c.next_n {
            shared.bad_frames.fetch_add(1, Ordering::Relaxed);
            if self.out.bad.len() < 20 {
                self.out.bad.push(format!(
                    "user {}: expected seq {} n {}, got seq {seq} n {n} ({})",
                    c.user,
                    c.last_seq + 1,
                    c.next_n,
                    if n < c.next_n {
                        "duplicate"
                    } else if n > c.next_n {
                        "gap: lost"
                    } else {
                        "seq gap"
                    }
                ));
            }
        }
        c.last_seq = c.last_seq.max(seq);
        c.next_n = c.next_n.max(n + 1);
        if !c.storm {
            while self.out.latency.len() <= p.min(PHASES.len() - 1) {
                self.out.latency.push(new_histogram());
            }
            if let Some(h) = self.out.latency.get_mut(p.min(PHASES.len() - 1)) {
                h.saturating_record(now_us.saturating_sub(t_us).max(1));
            }
        }
        self.check_caught_up(i);
        Ok(())
    }

    fn check_caught_up(&mut self, i: usize) {
        let Some(c) = self.clients.get_mut(i) else {
            return;
        };
        let (Some(target), false) = (c.target, c.caught_up) else {
            return;
        };
        if c.next_n >= target {
            c.caught_up = true;
            self.shared.caught_up.fetch_add(1, Ordering::Relaxed);
            if let Some(k) = self.shared.killed_at.get() {
                self.out
                    .catch_up
                    .get_or_insert_with(new_histogram)
                    .saturating_record((k.elapsed().as_micros() as u64).max(1));
            }
        }
    }

    fn finish(mut self) -> ThreadOut {
        for c in &self.clients {
            let acked = self
                .shared
                .acked
                .get(c.user as usize)
                .map_or(0, |a| a.load(Ordering::Relaxed));
            self.out.lost += acked.saturating_sub(c.next_n);
        }
        self.out
    }
}

/// Write queued output until done or WouldBlock.
fn flush(s: &mut Sock) -> Result<(), String> {
    while !s.out.is_empty() {
        match s.stream.write(&s.out) {
            Ok(0) => return Err("write returned 0".into()),
            Ok(n) => {
                s.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("io: {}", e.kind())),
        }
    }
    Ok(())
}

/// A paced publisher thread: `rate` events/s over `users`, each request to the next of
/// `nodes`; `acked` counts what was answered 202.
struct PubThread {
    shared: Arc<Shared>,
    users: Vec<(u32, String)>,
    nodes: Vec<SocketAddr>,
    key: String,
    rate: f64,
    pad: String,
    stop: Arc<AtomicBool>,
}

#[derive(Default)]
struct PubOut {
    /// POST to 202 answer, us, per phase the request was sent in.
    rtt: Vec<Histogram<u64>>,
    sent: u64,
    failed: u64,
    errors: Vec<String>,
    lag_max_us: u64,
}

impl PubThread {
    fn run(self) -> PubOut {
        let mut out = PubOut {
            rtt: PHASES.iter().map(|_| new_histogram()).collect(),
            ..PubOut::default()
        };
        if self.users.is_empty() || self.rate <= 0.0 {
            return out;
        }
        let mut conns: Vec<Option<StdTcpStream>> = self.nodes.iter().map(|_| None).collect();
        let mut counts = vec![0u64; self.users.len()];
        let start = Instant::now();
        let tick = Duration::from_millis(10);
        let (mut sent_idx, mut next_user, mut req) = (0u64, 0usize, 0usize);
        while !self.stop.load(Ordering::Relaxed) {
            let el = start.elapsed();
            let due = (el.as_secs_f64() * self.rate) as u64;
            if due <= sent_idx {
                std::thread::sleep(tick);
                continue;
            }
            out.lag_max_us = out
                .lag_max_us
                .max(((due - sent_idx) as f64 / self.rate * 1e6) as u64);
            // One request: at most 1,000 events; events of one user keep their order.
            let k = (due - sent_idx).min(1000);
            let t_us = sys::realtime_us();
            let p = self.shared.phase.load(Ordering::Relaxed);
            let mut body = Vec::new();
            let mut took: Vec<usize> = Vec::with_capacity(k as usize);
            for _ in 0..k {
                let slot = next_user % self.users.len();
                next_user = slot + 1;
                let (Some((_, id)), Some(n)) = (self.users.get(slot), counts.get_mut(slot)) else {
                    continue;
                };
                let one = event_batch(id, *n, 1, t_us, p, &self.pad);
                body.push(if body.is_empty() { b'[' } else { b',' });
                body.extend_from_slice(one.get(1..one.len() - 1).unwrap_or(&[]));
                *n += 1;
                took.push(slot);
            }
            body.push(b']');
            let node = req % self.nodes.len();
            req += 1;
            let (Some(addr), Some(conn)) = (self.nodes.get(node), conns.get_mut(node)) else {
                break;
            };
            let sent_at = Instant::now();
            let answer = publish(conn, *addr, &self.key, &body);
            if let Some(h) = out.rtt.get_mut(usize::from(p).min(PHASES.len() - 1)) {
                h.saturating_record((sent_at.elapsed().as_micros() as u64).max(1));
            }
            match answer {
                Ok(202) => {
                    for slot in &took {
                        if let Some((u, _)) = self.users.get(*slot) {
                            if let Some(a) = self.shared.acked.get(*u as usize) {
                                a.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    out.sent += took.len() as u64;
                }
                other => {
                    out.failed += took.len() as u64;
                    if out.errors.len() < 10 {
                        out.errors
                            .push(format!("POST /api/events to {addr}: {other:?}"));
                    }
                    // The events may or may not be stored: their n are used up, so the
                    // check would see a gap; stop this publisher (the run fails).
                    break;
                }
            }
            sent_idx += k;
        }
        out
    }
}

fn progress(shared: &Shared, what: &str, t0: Instant) {
    eprintln!(
        "  {:>6.1} s {what}: opened {} + {} others, reconnected {}, caught up {}, failed handshakes {}, gave up {}, frames {}, bad {}",
        t0.elapsed().as_secs_f64(),
        shared.opened.load(Ordering::Relaxed),
        shared.others_opened.load(Ordering::Relaxed),
        shared.reconnected.load(Ordering::Relaxed),
        shared.caught_up.load(Ordering::Relaxed),
        shared.failed_attempts.load(Ordering::Relaxed),
        shared.gave_up.load(Ordering::Relaxed),
        shared.frames.load(Ordering::Relaxed),
        shared.bad_frames.load(Ordering::Relaxed),
    );
}

/// Wait until `done()` or `limit` passed, printing progress every second; whether done.
fn wait_for(
    shared: &Shared,
    what: &str,
    t0: Instant,
    limit: Duration,
    quiet: bool,
    done: impl Fn() -> bool,
) -> bool {
    let until = Instant::now() + limit;
    let mut last = Instant::now();
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        if !quiet && last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            progress(shared, what, t0);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `loadgen resume-storm`.
pub fn storm(a: StormArgs) -> Result<bool, String> {
    if a.nodes < 2 {
        return Err("--nodes must be at least 2 (node 0 is killed)".into());
    }
    if a.conns == 0 || a.threads == 0 || a.publishers == 0 {
        return Err("--conns, --threads and --publishers must be at least 1".into());
    }
    sys::pin_load(a.node.pin_load.as_deref())?;
    let total = a.conns + a.others;
    let (soft, hard) = sys::raise_nofile().map_err(|e| format!("open-files limit: {e}"))?;
    if soft < total as u64 + 256 {
        return Err(format!(
            "open-files limit {soft} (hard {hard}) is below the {} this run needs: fewer --conns/--others",
            total + 256
        ));
    }
    let extra = [
        ("max_connections", (total + 1000).to_string()),
        ("max_connections_per_user", "3".to_string()),
    ];
    let t0 = Instant::now();
    let mut nodes = Nodes::start("resume-storm", &a.node, true, a.nodes, &extra)?;
    let r = run(&a, &mut nodes, t0);
    nodes.stop();
    r
}

fn run(a: &StormArgs, nodes: &mut Nodes, t0: Instant) -> Result<bool, String> {
    let total = a.conns + a.others;
    let survivors = a.nodes - 1;
    let shared = Arc::new(Shared {
        acked: (0..total).map(|_| AtomicU64::new(0)).collect(),
        phase: AtomicU8::new(0),
        killed_at: OnceLock::new(),
        opened: AtomicU64::new(0),
        others_opened: AtomicU64::new(0),
        reconnected: AtomicU64::new(0),
        caught_up: AtomicU64::new(0),
        gave_up: AtomicU64::new(0),
        failed_attempts: AtomicU64::new(0),
        initial_failed: AtomicU64::new(0),
        bad_frames: AtomicU64::new(0),
        frames: AtomicU64::new(0),
        draining: AtomicBool::new(false),
        complete: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    // Client threads: user u on thread u % threads.
    let mut per_thread: Vec<Vec<Client>> = (0..a.threads).map(|_| Vec::new()).collect();
    for u in 0..total {
        let id = nodes.user(u);
        let storm = u < a.conns;
        let client = Client {
            user: u as u32,
            storm,
            token: nodes.token(&id)?,
            path_node: if storm { 0 } else { 1 + u % survivors },
            sock: None,
            epoch: None,
            last_seq: 0,
            next_n: 0,
            attempts: 0,
            retry_at: None,
            target: None,
            reconnected: false,
            caught_up: false,
            gave_up: false,
        };
        if let Some(t) = per_thread.get_mut(u % a.threads) {
            t.push(client);
        }
    }
    let args = WorkerArgs {
        jitter_ms: a.reconnect_jitter_ms,
        backoff_ms: a.backoff_ms,
        max_attempts: a.max_attempts.max(1),
    };
    let mut handles: Vec<JoinHandle<ThreadOut>> = Vec::new();
    for (t, clients) in per_thread.into_iter().enumerate() {
        let w = Worker {
            shared: shared.clone(),
            nodes: nodes.addrs.clone(),
            clients,
            poll: Poll::new().map_err(|e| format!("poll: {e}"))?,
            out: ThreadOut::default(),
            rng: 0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407),
            args,
            queue: VecDeque::new(),
            accept_key: tungstenite::handshake::derive_accept_key(WS_KEY.as_bytes()),
            reported_complete: false,
        };
        handles.push(
            std::thread::Builder::new()
                .name(format!("storm-client-{t}"))
                .spawn(move || w.run())
                .map_err(|e| format!("spawn: {e}"))?,
        );
    }
    let opened_all = wait_for(
        &shared,
        "connecting",
        t0,
        Duration::from_secs(120),
        a.quiet,
        || {
            shared.opened.load(Ordering::Relaxed) == a.conns as u64
                && shared.others_opened.load(Ordering::Relaxed) == a.others as u64
        },
    );
    let open_s = t0.elapsed().as_secs_f64();
    if !opened_all {
        shared.stop.store(true, Ordering::Relaxed);
        for h in handles {
            let _ = h.join();
        }
        return Err(format!(
            "only {} of {} storm clients and {} of {} others connected in 120 s",
            shared.opened.load(Ordering::Relaxed),
            a.conns,
            shared.others_opened.load(Ordering::Relaxed),
            a.others
        ));
    }
    // Publishers, through the survivors only.
    let survivors_addrs: Vec<SocketAddr> = nodes.addrs.iter().skip(1).copied().collect();
    let pub_stop = Arc::new(AtomicBool::new(false));
    let pad = "x".repeat(a.payload_bytes);
    let mut pubs: Vec<JoinHandle<PubOut>> = Vec::new();
    for (range, rate) in [(0..a.conns, a.storm_rate), (a.conns..total, a.other_rate)] {
        let len = range.len();
        for p in 0..a.publishers {
            let users: Vec<(u32, String)> = range
                .clone()
                .filter(|u| u % a.publishers == p)
                .map(|u| (u as u32, nodes.user(u)))
                .collect();
            let share = users.len() as f64 / len.max(1) as f64;
            let th = PubThread {
                shared: shared.clone(),
                users,
                nodes: survivors_addrs.clone(),
                key: nodes.publish_key.clone(),
                rate: rate * share,
                pad: pad.clone(),
                stop: pub_stop.clone(),
            };
            pubs.push(
                std::thread::Builder::new()
                    .name("storm-publish".into())
                    .spawn(move || th.run())
                    .map_err(|e| format!("spawn: {e}"))?,
            );
        }
    }
    if !a.quiet {
        eprintln!(
            "loadgen resume-storm: {} storm clients on node 0, {} others on {survivors} survivors, connected in {open_s:.1} s; {} s of load before the kill",
            a.conns, a.others, a.before_s
        );
    }
    wait_for(
        &shared,
        "before",
        t0,
        Duration::from_secs_f64(a.before_s),
        a.quiet,
        || false,
    );
    // The kill.
    // Marked first, so that every connection end from here on counts as the storm's.
    let kill_at = Instant::now();
    let _ = shared.killed_at.set(kill_at);
    shared.phase.store(1, Ordering::Relaxed);
    let killed_pid = nodes.kill(0);
    if !a.quiet {
        eprintln!("loadgen resume-storm: node 0 (pid {killed_pid:?}) killed with SIGKILL");
    }
    let conns = a.conns as u64;
    let converged = wait_for(
        &shared,
        "storm",
        t0,
        Duration::from_secs_f64(a.converge_timeout_s),
        a.quiet,
        || {
            shared.caught_up.load(Ordering::Relaxed) == conns
                || shared.caught_up.load(Ordering::Relaxed) + shared.gave_up.load(Ordering::Relaxed)
                    == conns
        },
    );
    let converge_us = kill_at.elapsed().as_micros() as u64;
    shared.phase.store(2, Ordering::Relaxed);
    wait_for(
        &shared,
        "after",
        t0,
        Duration::from_secs_f64(a.after_s),
        a.quiet,
        || false,
    );
    pub_stop.store(true, Ordering::Relaxed);
    let mut pub_out = PubOut {
        rtt: PHASES.iter().map(|_| new_histogram()).collect(),
        ..PubOut::default()
    };
    for h in pubs {
        if let Ok(o) = h.join() {
            for (acc, h) in pub_out.rtt.iter_mut().zip(&o.rtt) {
                let _ = acc.add(h);
            }
            pub_out.sent += o.sent;
            pub_out.failed += o.failed;
            pub_out.errors.extend(o.errors);
            pub_out.lag_max_us = pub_out.lag_max_us.max(o.lag_max_us);
        }
    }
    shared.draining.store(true, Ordering::Relaxed);
    let threads = a.threads as u64;
    let drained = wait_for(
        &shared,
        "drain",
        t0,
        Duration::from_secs(15),
        a.quiet,
        || shared.complete.load(Ordering::Relaxed) == threads,
    );
    // Survivors' `/ws/stats` (before the clients go): loop iterations, engine figures.
    let mut node_stats = Vec::new();
    for addr in &survivors_addrs {
        let v = match crate::driver::http_get(*addr, "/ws/stats") {
            Ok((200, body)) => serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null),
            _ => Value::Null,
        };
        node_stats.push(v);
    }
    shared.stop.store(true, Ordering::Relaxed);
    let mut outs = Vec::new();
    for h in handles {
        outs.push(
            h.join()
                .map_err(|_| "a client thread panicked".to_owned())?,
        );
    }
    report(
        a,
        &shared,
        outs,
        pub_out,
        node_stats,
        converged,
        converge_us,
        drained,
        open_s,
    )
}

#[allow(clippy::too_many_arguments)]
fn report(
    a: &StormArgs,
    shared: &Shared,
    outs: Vec<ThreadOut>,
    pub_out: PubOut,
    node_stats: Vec<Value>,
    converged: bool,
    converge_us: u64,
    drained: bool,
    open_s: f64,
) -> Result<bool, String> {
    let mut lat: Vec<Histogram<u64>> = PHASES.iter().map(|_| new_histogram()).collect();
    let (mut reconnect, mut catch_up, mut attempts) =
        (new_histogram(), new_histogram(), new_histogram());
    let mut failures = std::collections::BTreeMap::new();
    let mut losses = std::collections::BTreeMap::new();
    let (mut bad, mut lost, mut unexpected) = (Vec::new(), 0u64, 0u64);
    for o in outs {
        for (slot, h) in lat.iter_mut().zip(&o.latency) {
            let _ = slot.add(h);
        }
        for (acc, h) in [
            (&mut reconnect, &o.reconnect),
            (&mut catch_up, &o.catch_up),
            (&mut attempts, &o.attempts),
        ] {
            if let Some(h) = h {
                let _ = acc.add(h);
            }
        }
        for (k, v) in o.failures {
            *failures.entry(k).or_insert(0u64) += v;
        }
        for (k, v) in o.losses {
            *losses.entry(k).or_insert(0u64) += v;
        }
        bad.extend(o.bad);
        lost += o.lost;
        unexpected += o.unexpected_resets;
    }
    let get = |x: &AtomicU64| x.load(Ordering::Relaxed);
    let (reconnected, caught_up, gave_up) = (
        get(&shared.reconnected),
        get(&shared.caught_up),
        get(&shared.gave_up),
    );
    let bad_frames = get(&shared.bad_frames);
    let failed_attempts = get(&shared.failed_attempts);
    let initial_failed = get(&shared.initial_failed);
    let conns = a.conns as u64;
    let ok = converged
        && drained
        && caught_up == conns
        && gave_up == 0
        && bad_frames == 0
        && lost == 0
        && pub_out.failed == 0
        && unexpected == 0;
    let flag = |good: bool| if good { "ok  " } else { "FAIL" };
    println!(
        "resume-storm: {} nodes on one redis-server; node 0 held {} clients (one user each), {} other users on the survivors; {} ev/s to the storm users, {} ev/s to the others, through the survivors",
        a.nodes, a.conns, a.others, a.storm_rate, a.other_rate
    );
    println!(
        "  connected       all {} in {open_s:.1} s",
        a.conns + a.others
    );
    println!(
        "{} converged     kill -> every storm client reconnected and caught up: {} ({caught_up}/{conns} caught up)",
        flag(converged && caught_up == conns),
        us(converge_us)
    );
    println!(
        "  reconnected     kill -> connected frame (resumed): {}",
        lat_line(&percentiles(&reconnect))
    );
    println!(
        "  caught up       kill -> every missed event held:    {}",
        lat_line(&percentiles(&catch_up))
    );
    println!(
        "  attempts        per client that got back: p50 {} p99 {} max {} ({reconnected} reconnected)",
        attempts.value_at_quantile(0.5),
        attempts.value_at_quantile(0.99),
        attempts.max()
    );
    println!(
        "  handshakes      failed before retries: {failed_attempts} after the kill ({initial_failed} at the start) {failures:?}"
    );
    println!(
        "{} after retries   clients that never got back (retries spent, or resumed:false): {gave_up}",
        flag(gave_up == 0)
    );
    println!(
        "{} checks          frames {}, lost {lost}, out of order or twice {bad_frames}, unexpected connection ends {unexpected}",
        flag(bad_frames == 0 && lost == 0 && unexpected == 0 && drained),
        get(&shared.frames)
    );
    println!("  connection ends {losses:?}");
    for b in bad.iter().take(10) {
        println!("    {b}");
    }
    println!(
        "{} publish         {} events acknowledged, {} failed, most behind schedule {} {:?}",
        flag(pub_out.failed == 0),
        pub_out.sent,
        pub_out.failed,
        us(pub_out.lag_max_us),
        pub_out.errors
    );
    for (name, h) in PHASES.iter().zip(&lat) {
        println!("  others {name:<7} {}", lat_line(&percentiles(h)));
    }
    for (name, h) in PHASES.iter().zip(&pub_out.rtt) {
        println!(
            "  publish {name:<6} POST -> 202: {}",
            lat_line(&percentiles(h))
        );
    }
    let record = json!({
        "scenario": "resume-storm",
        "nodes": a.nodes,
        "storm_conns": a.conns,
        "others": a.others,
        "storm_rate": a.storm_rate,
        "other_rate": a.other_rate,
        "before_s": a.before_s,
        "after_s": a.after_s,
        "reconnect_jitter_ms": a.reconnect_jitter_ms,
        "backoff_ms": a.backoff_ms,
        "pin_gateway": a.node.pin_gateway,
        "pin_load": a.node.pin_load,
        "connect_s": (open_s * 10.0).round() / 10.0,
        "converged": converged,
        "converge_us": converge_us,
        "reconnected": reconnected,
        "caught_up": caught_up,
        "reconnect_us": percentiles(&reconnect),
        "catch_up_us": percentiles(&catch_up),
        "attempts": {"p50": attempts.value_at_quantile(0.5), "p99": attempts.value_at_quantile(0.99), "max": attempts.max()},
        "failed_handshakes_before_retries": failed_attempts,
        "failed_handshakes_at_start": initial_failed,
        "failed_handshakes_by_reason": failures,
        "gave_up_after_retries": gave_up,
        "frames": get(&shared.frames),
        "lost": lost,
        "bad_frames": bad_frames,
        "unexpected_connection_ends": unexpected,
        "connection_ends": losses,
        "drained": drained,
        "published": pub_out.sent,
        "publish_failed": pub_out.failed,
        "publish_errors": pub_out.errors,
        "publish_rtt_us": PHASES.iter().zip(&pub_out.rtt).map(|(n, h)| (n.to_string(), percentiles(h))).collect::<serde_json::Map<_, _>>(),
        "others_latency_us": PHASES.iter().zip(&lat).map(|(n, h)| (n.to_string(), percentiles(h))).collect::<serde_json::Map<_, _>>(),
        "survivors": node_stats,
        "pass": ok,
    });
    println!("JSON {record}");
    if let Some(p) = &a.json {
        std::fs::write(p, format!("{record:#}\n")).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(ok)
}
