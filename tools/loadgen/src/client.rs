//! The WebSocket client side: a pool of threads, each one mio reactor owning many
//! client connections. A hand-rolled RFC 6455 client (upgrade request, unmasked server
//! frames, masked pong/close) keeps the per-connection cost to a few hundred bytes, so
//! one process can hold ~19,000 connections and read 100k+ frames a second.
//!
//! Every event frame is checked on arrival: `seq` strictly increasing on its
//! connection, the generator's per-user index `n` (in `data`) increasing, never seen
//! twice; its `t_us` (the scheduled send time) gives the emit-to-receive latency,
//! recorded in a histogram per phase `p`. At the end each connection's set of `n` is
//! compared with what was published for its user: lost, duplicates, out of order.
//!
//! Churn connections (the reconnect storm) connect, wait for `connected`, then close
//! (half with a close handshake, half by dropping the socket) and start again.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::sys;

/// Most phases a run may have (ramp steps); events of a higher phase count in the last.
pub const MAX_PHASES: usize = 64;
/// Connections a thread has connecting/handshaking at once while opening tracked ones.
const MAX_IN_FLIGHT: usize = 256;
/// A handshake (TCP connect to `connected` frame) not done in this time has failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// A close handshake not answered (server close + EOF) in this time is cut.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest frame accepted from the gateway.
const MAX_FRAME: usize = 16 << 20;
/// Any 16 bytes, base64: the gateway only echoes its hash.
const WS_KEY: &str = "bG9hZGdlbi1hZ2VudHdpcg==";

/// Where and how to connect.
pub struct Target {
    pub addr: SocketAddr,
    /// Several nodes (a cluster run): each thread opens its connections on them in
    /// turn, so a user's connections sit on different nodes. Empty: `addr` only.
    pub nodes: Vec<SocketAddr>,
    /// Path and query of the upgrade request, e.g. `/ws`.
    pub path: String,
    /// One token per user index.
    pub tokens: Arc<Vec<String>>,
}

/// A tracked connection to open: its user, and an optional source address.
#[derive(Clone, Copy, Debug)]
pub struct OpenPlan {
    pub user: u32,
    pub src: Option<IpAddr>,
}

/// A reconnect storm for one thread.
#[derive(Clone, Debug)]
pub struct ChurnPlan {
    pub until: Instant,
    /// Connections in flight at once (closed loop: a new one starts when one ends).
    pub concurrency: usize,
    /// User indices this thread cycles through.
    pub users: Vec<u32>,
    /// Percentage of churn connections closed by dropping the socket (no close frame).
    pub abrupt_pct: u32,
    pub src: Option<IpAddr>,
    /// Open loop: start this many connections per second (still at most
    /// `concurrency` in flight); `None`: closed loop at `concurrency`.
    pub rate: Option<f64>,
    pub start: Instant,
}

pub enum Command {
    Open(Vec<OpenPlan>),
    Churn(ChurnPlan),
    /// End: check every tracked connection against `expected[user]` events, report,
    /// drop every connection and stop.
    Finish {
        expected: Arc<Vec<u64>>,
    },
    /// A copy of the latency histogram of one phase so far.
    Latency {
        phase: usize,
        reply: Sender<Histogram<u64>>,
    },
}

/// Live counters of one client thread (read by the progress printer).
pub struct Counters {
    /// Tracked connections that received `connected`.
    pub opened: AtomicU64,
    /// Handshakes that failed (tracked and churn).
    pub failed: AtomicU64,
    /// Tracked connections that ended before the finish.
    pub closed: AtomicU64,
    /// Event frames received on tracked connections.
    pub frames: AtomicU64,
    /// Event frames per phase.
    pub phase_frames: [AtomicU64; MAX_PHASES],
    /// Churn connections that reached `connected`.
    pub churned: AtomicU64,
    pub bytes_in: AtomicU64,
    /// CLOCK_REALTIME us of the last event frame.
    pub last_frame_us: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            opened: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            phase_frames: std::array::from_fn(|_| AtomicU64::new(0)),
            churned: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            last_frame_us: AtomicU64::new(0),
        }
    }
}

/// One thread's findings at the finish.
pub struct ThreadResult {
    /// Emit-to-receive latency per phase, microseconds.
    pub latency: Vec<Histogram<u64>>,
    /// TCP connect to `connected` frame, microseconds: tracked connections.
    pub handshake: Histogram<u64>,
    /// The same for churn connections.
    pub churn_handshake: Histogram<u64>,
    pub check: Check,
    /// Why handshakes failed, with counts.
    pub failures: BTreeMap<String, u64>,
    /// How tracked connections ended early (close code or "eof"/"error"), with counts.
    pub closes: BTreeMap<String, u64>,
    /// Churn closes that did not complete the close handshake in time.
    pub close_timeouts: u64,
}

/// Order and completeness, summed over connections.
#[derive(Clone, Copy, Debug, Default)]
pub struct Check {
    /// Tracked connections checked.
    pub conns: u64,
    /// Events published for a connection's user and never received on it.
    pub lost: u64,
    /// Events received more than once on one connection.
    pub duplicates: u64,
    /// Frames whose seq or n was not above the previous one on the connection.
    pub out_of_order: u64,
    /// Frames with an n at or above what was published (should never happen).
    pub unexpected: u64,
    /// Event frames received.
    pub received: u64,
    /// Other frames (errors, pongs, events without our stamp).
    pub other: u64,
    /// Frames received per connection: fewest and most.
    pub min_per_conn: u64,
    pub max_per_conn: u64,
}

impl Check {
    pub fn add(&mut self, o: &Check) {
        if o.conns > 0 {
            self.min_per_conn = if self.conns == 0 {
                o.min_per_conn
            } else {
                self.min_per_conn.min(o.min_per_conn)
            };
            self.max_per_conn = self.max_per_conn.max(o.max_per_conn);
        }
        self.conns += o.conns;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.unexpected += o.unexpected;
        self.received += o.received;
        self.other += o.other;
    }
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 us .. 1 h at 3 significant digits: bounds are constant and valid.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| unreachable!())
}

/// The client threads.
pub struct Pool {
    txs: Vec<Sender<Command>>,
    results: Receiver<io::Result<ThreadResult>>,
    pub counters: Vec<Arc<Counters>>,
    handles: Vec<JoinHandle<()>>,
}

impl Pool {
    /// `rt_prio`: run the client threads in SCHED_FIFO at that priority.
    pub fn start(threads: usize, target: Arc<Target>, rt_prio: Option<i32>) -> io::Result<Pool> {
        let (res_tx, results) = crossbeam_channel::bounded(threads);
        let mut txs = Vec::new();
        let mut counters = Vec::new();
        let mut handles = Vec::new();
        for i in 0..threads {
            let (tx, rx) = crossbeam_channel::unbounded();
            let c = Arc::new(Counters::default());
            let worker = Worker::new(target.clone(), c.clone(), i as u64)?;
            let res_tx = res_tx.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("client-{i}"))
                    .spawn(move || {
                        sys::set_own_timerslack(1000);
                        if let Some(p) = rt_prio {
                            if let Err(e) = sys::set_fifo(0, p) {
                                eprintln!("loadgen: client thread: SCHED_FIFO {p}: {e}");
                            }
                        }
                        let r = worker.run(rx);
                        let _ = res_tx.send(r);
                    })?,
            );
            txs.push(tx);
            counters.push(c);
        }
        Ok(Pool {
            txs,
            results,
            counters,
            handles,
        })
    }

    pub fn threads(&self) -> usize {
        self.txs.len()
    }

    pub fn send(&self, thread: usize, cmd: Command) -> io::Result<()> {
        self.txs
            .get(thread)
            .ok_or_else(|| io::Error::other("no such client thread"))?
            .send(cmd)
            .map_err(|_| io::Error::other("client thread ended"))
    }

    pub fn sum(&self, f: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        self.counters
            .iter()
            .map(|c| f(c).load(Ordering::Relaxed))
            .sum()
    }

    pub fn phase_frames(&self, phase: usize) -> u64 {
        let p = phase.min(MAX_PHASES - 1);
        self.counters
            .iter()
            .map(|c| c.phase_frames[p].load(Ordering::Relaxed))
            .sum()
    }

    pub fn last_frame_us(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.last_frame_us.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// The latency histogram of `phase` so far, merged over the threads.
    pub fn phase_latency(&self, phase: usize, deadline: Instant) -> io::Result<Histogram<u64>> {
        let (tx, rx) = crossbeam_channel::bounded(self.txs.len());
        for t in 0..self.txs.len() {
            self.send(
                t,
                Command::Latency {
                    phase,
                    reply: tx.clone(),
                },
            )?;
        }
        let mut merged = new_histogram();
        for _ in 0..self.txs.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let h = rx
                .recv_timeout(left)
                .map_err(|_| io::Error::other("client threads did not answer in time"))?;
            merged
                .add(&h)
                .map_err(|e| io::Error::other(format!("histogram: {e:?}")))?;
        }
        Ok(merged)
    }

    /// Finish every thread and collect their results (bounded by `deadline`).
    pub fn finish(
        self,
        expected: Arc<Vec<u64>>,
        deadline: Instant,
    ) -> io::Result<Vec<ThreadResult>> {
        for tx in &self.txs {
            let _ = tx.send(Command::Finish {
                expected: expected.clone(),
            });
        }
        let mut out = Vec::new();
        for _ in 0..self.txs.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.results.recv_timeout(left) {
                Ok(r) => out.push(r?),
                Err(_) => return Err(io::Error::other("client threads did not finish in time")),
            }
        }
        for h in self.handles {
            let _ = h.join();
        }
        Ok(out)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Connecting,
    Handshake,
    Open,
    /// We sent a close frame (or answered one); waiting for EOF.
    Closing,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tracked,
    Churn,
}

/// Per-connection order/completeness state.
#[derive(Default)]
struct ConnCheck {
    last_seq: u64,
    last_n: Option<u64>,
    bits: Vec<u64>,
    received: u64,
    duplicates: u64,
    out_of_order: u64,
    other: u64,
}

impl ConnCheck {
    /// Record event `n` with `seq`; false when it is a duplicate.
    fn record(&mut self, seq: u64, n: Option<u64>) {
        let mut ooo = seq <= self.last_seq;
        self.last_seq = self.last_seq.max(seq);
        let Some(n) = n else {
            self.other += 1;
            if ooo {
                self.out_of_order += 1;
            }
            return;
        };
        self.received += 1;
        if self.last_n.is_some_and(|l| n <= l) {
            ooo = true;
        }
        self.last_n = Some(self.last_n.map_or(n, |l| l.max(n)));
        let word = (n / 64) as usize;
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        if let Some(w) = self.bits.get_mut(word) {
            let bit = 1u64 << (n % 64);
            if *w & bit != 0 {
                self.duplicates += 1;
                return; // a duplicate is not also counted out of order
            }
            *w |= bit;
        }
        if ooo {
            self.out_of_order += 1;
        }
    }

    /// Distinct events below `expected`, and at or above it.
    fn distinct(&self, expected: u64) -> (u64, u64) {
        let (mut below, mut above) = (0, 0);
        for (i, w) in self.bits.iter().enumerate() {
            let base = i as u64 * 64;
            if base + 64 <= expected {
                below += u64::from(w.count_ones());
            } else if base >= expected {
                above += u64::from(w.count_ones());
            } else {
                let k = expected - base; // 1..63 bits below
                let mask = (1u64 << k) - 1;
                below += u64::from((w & mask).count_ones());
                above += u64::from((w & !mask).count_ones());
            }
        }
        (below, above)
    }
}

struct Conn {
    stream: TcpStream,
    state: State,
    kind: Kind,
    user: u32,
    started: Instant,
    got_connected: bool,
    /// Unconsumed input (an incomplete head or frame).
    partial: Vec<u8>,
    /// Fragmented text message being assembled.
    frag: Option<Vec<u8>>,
    /// Output not yet written (request, pongs, close).
    out: Vec<u8>,
    check: ConnCheck,
    /// Closing: when we started to close.
    closing_since: Option<Instant>,
}

/// What a read did to the connection.
enum Outcome {
    Keep,
    /// Drop the connection; `Some(reason)` when it failed.
    Drop(Option<String>),
}

struct Worker {
    poll: Poll,
    target: Arc<Target>,
    /// The node of the last connection opened (cluster runs: `target.nodes`).
    next_node: usize,
    counters: Arc<Counters>,
    conns: Slab<Conn>,
    pending: VecDeque<OpenPlan>,
    in_flight: usize,
    churn: Option<ChurnPlan>,
    churn_in_flight: usize,
    churn_next: usize,
    churn_seq: u64,
    latency: Vec<Histogram<u64>>,
    handshake: Histogram<u64>,
    churn_handshake: Histogram<u64>,
    failures: BTreeMap<String, u64>,
    closes: BTreeMap<String, u64>,
    close_timeouts: u64,
    /// Finished tracked connections' checks (kept for the final count).
    done_checks: Vec<(u32, ConnCheck)>,
    request_head: String,
    accept_key: String,
    scratch: Vec<u8>,
    rng: u64,
}

impl Worker {
    fn new(target: Arc<Target>, counters: Arc<Counters>, seed: u64) -> io::Result<Worker> {
        let request_head = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer ",
            target.path, target.addr
        );
        Ok(Worker {
            poll: Poll::new()?,
            target,
            counters,
            conns: Slab::new(),
            pending: VecDeque::new(),
            in_flight: 0,
            churn: None,
            churn_in_flight: 0,
            churn_next: 0,
            churn_seq: 0,
            next_node: seed as usize,
            latency: Vec::new(),
            handshake: new_histogram(),
            churn_handshake: new_histogram(),
            failures: BTreeMap::new(),
            closes: BTreeMap::new(),
            close_timeouts: 0,
            done_checks: Vec::new(),
            request_head,
            accept_key: tungstenite::handshake::derive_accept_key(WS_KEY.as_bytes()),
            scratch: vec![0u8; 256 * 1024],
            rng: 0x9E37_79B9_7F4A_7C15 ^ (seed + 1).wrapping_mul(0xA24B_AED4_963E_E407),
        })
    }

    fn run(mut self, rx: Receiver<Command>) -> io::Result<ThreadResult> {
        let mut events = Events::with_capacity(4096);
        let mut last_sweep = Instant::now();
        loop {
            self.start_connections();
            let busy = !self.pending.is_empty() || self.churn.is_some();
            let timeout = if busy { 2 } else { 20 };
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(Duration::from_millis(timeout)))
            {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            for ev in events.iter() {
                self.on_event(ev.token().0, ev.is_read_closed());
            }
            if last_sweep.elapsed() >= Duration::from_millis(100) {
                last_sweep = Instant::now();
                self.sweep_deadlines();
            }
            loop {
                match rx.try_recv() {
                    Ok(Command::Open(plans)) => self.pending.extend(plans),
                    Ok(Command::Churn(plan)) => {
                        self.churn_next = 0;
                        self.churn = Some(plan);
                    }
                    Ok(Command::Finish { expected }) => return Ok(self.finish(&expected)),
                    Ok(Command::Latency { phase, reply }) => {
                        let h = self
                            .latency
                            .get(phase)
                            .cloned()
                            .unwrap_or_else(new_histogram);
                        let _ = reply.send(h);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        return Err(io::Error::other("controller went away"))
                    }
                }
            }
        }
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64*: mask keys and the churn's abrupt/graceful choice.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn start_connections(&mut self) {
        while self.in_flight < MAX_IN_FLIGHT {
            let Some(plan) = self.pending.pop_front() else {
                break;
            };
            self.connect(plan.user, plan.src, Kind::Tracked);
        }
        let Some(plan) = &self.churn else { return };
        if Instant::now() >= plan.until {
            if self.churn_in_flight == 0 {
                self.churn = None;
            }
            return;
        }
        let (concurrency, src) = (plan.concurrency, plan.src);
        let due = plan
            .rate
            .map(|r| (plan.start.elapsed().as_secs_f64() * r) as usize);
        while self.churn_in_flight < concurrency && due.is_none_or(|d| self.churn_next < d) {
            let Some(plan) = &self.churn else { return };
            if plan.users.is_empty() {
                return;
            }
            let user = plan
                .users
                .get(self.churn_next % plan.users.len())
                .copied()
                .unwrap_or(0);
            self.churn_next = self.churn_next.wrapping_add(1);
            self.churn_in_flight += 1;
            self.connect(user, src, Kind::Churn);
        }
    }

    fn fail(&mut self, reason: String) {
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        *self.failures.entry(reason).or_insert(0) += 1;
    }

    fn connect(&mut self, user: u32, src: Option<IpAddr>, kind: Kind) {
        if kind == Kind::Tracked {
            self.in_flight += 1;
        }
        let addr = match self.target.nodes.len() {
            0 => self.target.addr,
            n => {
                self.next_node = self.next_node.wrapping_add(1);
                self.target.nodes[self.next_node % n]
            }
        };
        match open_socket(addr, src) {
            Ok(stream) => {
                let entry = self.conns.vacant_entry();
                let key = entry.key();
                let mut conn = Conn {
                    stream,
                    state: State::Connecting,
                    kind,
                    user,
                    started: Instant::now(),
                    got_connected: false,
                    partial: Vec::new(),
                    frag: None,
                    out: Vec::new(),
                    check: ConnCheck::default(),
                    closing_since: None,
                };
                match self.poll.registry().register(
                    &mut conn.stream,
                    Token(key),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    Ok(()) => {
                        entry.insert(conn);
                    }
                    Err(e) => {
                        self.end_in_flight(kind);
                        self.fail(format!("register: {}", e.kind()));
                    }
                }
            }
            Err(e) => {
                self.end_in_flight(kind);
                self.fail(format!("connect: {e}"));
            }
        }
    }

    fn end_in_flight(&mut self, kind: Kind) {
        match kind {
            Kind::Tracked => self.in_flight = self.in_flight.saturating_sub(1),
            Kind::Churn => self.churn_in_flight = self.churn_in_flight.saturating_sub(1),
        }
    }

    fn on_event(&mut self, key: usize, read_closed: bool) {
        let outcome = self.step(key, read_closed);
        if let Outcome::Drop(reason) = outcome {
            self.remove(key, reason);
        }
    }

    /// Handle readiness; `read_closed`: the peer's FIN is known to be there.
    fn step(&mut self, key: usize, read_closed: bool) -> Outcome {
        let Some(conn) = self.conns.get_mut(key) else {
            return Outcome::Keep;
        };
        if conn.state == State::Connecting {
            match conn.stream.take_error() {
                Ok(Some(e)) | Err(e) => return Outcome::Drop(Some(format!("connect: {e}"))),
                Ok(None) => {}
            }
            match conn.stream.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Outcome::Keep,
                Err(e) => return Outcome::Drop(Some(format!("connect: {e}"))),
            }
            let token = self
                .target
                .tokens
                .get(conn.user as usize)
                .map_or("", String::as_str);
            conn.out.extend_from_slice(self.request_head.as_bytes());
            conn.out.extend_from_slice(token.as_bytes());
            conn.out.extend_from_slice(b"\r\n\r\n");
            conn.state = State::Handshake;
        }
        if let Err(e) = flush(conn) {
            return self.io_end(key, &e);
        }
        // Read until WouldBlock (edge-triggered).
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return Outcome::Keep;
            };
            match conn.stream.read(&mut self.scratch) {
                Ok(0) => return self.eof(key),
                Ok(n) => {
                    self.counters
                        .bytes_in
                        .fetch_add(n as u64, Ordering::Relaxed);
                    let outcome = self.input(key, n);
                    if let Outcome::Drop(_) = outcome {
                        return outcome;
                    }
                    // A short read drained the socket: data (or a FIN) arriving later
                    // raises a new edge, so skip the read that would only say
                    // WouldBlock; it halves the syscalls per frame. Not when the FIN
                    // may already be queued behind the data (read-closed event, or
                    // a close handshake under way): then read on to the EOF.
                    let open = self.conns.get(key).is_some_and(|c| c.state == State::Open);
                    if n < self.scratch.len() && open && !read_closed {
                        return Outcome::Keep;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.io_end(key, &e),
            }
        }
    }

    fn io_end(&mut self, key: usize, e: &io::Error) -> Outcome {
        let Some(conn) = self.conns.get(key) else {
            return Outcome::Keep;
        };
        match conn.state {
            State::Connecting | State::Handshake => {
                Outcome::Drop(Some(format!("io: {}", e.kind())))
            }
            State::Closing => Outcome::Drop(None),
            State::Open => {
                if conn.got_connected {
                    self.note_close(key, format!("io {}", e.kind()));
                    Outcome::Drop(None)
                } else {
                    Outcome::Drop(Some(format!("io before connected: {}", e.kind())))
                }
            }
        }
    }

    fn eof(&mut self, key: usize) -> Outcome {
        let Some(conn) = self.conns.get(key) else {
            return Outcome::Keep;
        };
        match conn.state {
            State::Closing => Outcome::Drop(None),
            State::Open if conn.got_connected => {
                self.note_close(key, "eof".into());
                Outcome::Drop(None)
            }
            _ => Outcome::Drop(Some("eof during handshake".into())),
        }
    }

    /// A tracked connection ended before the finish.
    fn note_close(&mut self, key: usize, how: String) {
        if let Some(conn) = self.conns.get(key) {
            if conn.kind == Kind::Tracked {
                self.counters.closed.fetch_add(1, Ordering::Relaxed);
                *self.closes.entry(how).or_insert(0) += 1;
            }
        }
    }

    fn remove(&mut self, key: usize, failure: Option<String>) {
        if !self.conns.contains(key) {
            return;
        }
        let mut conn = self.conns.remove(key);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        if !conn.got_connected {
            self.end_in_flight(conn.kind);
            self.fail(failure.unwrap_or_else(|| "closed before connected".into()));
        } else if conn.kind == Kind::Churn {
            self.churn_in_flight = self.churn_in_flight.saturating_sub(1);
        } else {
            self.done_checks
                .push((conn.user, std::mem::take(&mut conn.check)));
        }
    }

    /// Handle `n` fresh bytes in the scratch buffer.
    fn input(&mut self, key: usize, n: usize) -> Outcome {
        let Some(conn) = self.conns.get_mut(key) else {
            return Outcome::Keep;
        };
        let mut buf = std::mem::take(&mut conn.partial);
        let outcome = if buf.is_empty() {
            let (consumed, outcome) = self.consume(key, None, n);
            if let (Some(conn), Some(rest)) =
                (self.conns.get_mut(key), self.scratch.get(consumed..n))
            {
                conn.partial.extend_from_slice(rest);
            }
            outcome
        } else {
            buf.extend_from_slice(self.scratch.get(..n).unwrap_or(&[]));
            let len = buf.len();
            let (consumed, outcome) = self.consume(key, Some(&buf), len);
            buf.drain(..consumed.min(len));
            if let Some(conn) = self.conns.get_mut(key) {
                conn.partial = buf;
                if conn.partial.capacity() > 64 * 1024 && conn.partial.len() < 4096 {
                    conn.partial.shrink_to_fit();
                }
            }
            outcome
        };
        if let Some(conn) = self.conns.get_mut(key) {
            if let Err(e) = flush(conn) {
                return self.io_end(key, &e);
            }
        }
        outcome
    }

    /// Parse heads and frames from `data` (or the scratch buffer); returns the bytes
    /// consumed.
    fn consume(&mut self, key: usize, data: Option<&[u8]>, len: usize) -> (usize, Outcome) {
        // Split the borrow: the scratch buffer is read while connection state changes.
        let scratch = std::mem::take(&mut self.scratch);
        let data = data.unwrap_or_else(|| scratch.get(..len).unwrap_or(&[]));
        let r = self.consume_inner(key, data);
        self.scratch = scratch;
        r
    }

    fn consume_inner(&mut self, key: usize, data: &[u8]) -> (usize, Outcome) {
        let mut pos = 0;
        let now_us = sys::realtime_us();
        loop {
            let Some(state) = self.conns.get(key).map(|c| c.state) else {
                return (pos, Outcome::Keep);
            };
            let rest = data.get(pos..).unwrap_or(&[]);
            if state == State::Handshake {
                let Some(end) = find(rest, b"\r\n\r\n") else {
                    if rest.len() > 16 * 1024 {
                        return (pos, Outcome::Drop(Some("response head too large".into())));
                    }
                    return (pos, Outcome::Keep);
                };
                let head = rest.get(..end).unwrap_or(&[]);
                let body = rest.get(end + 4..).unwrap_or(&[]);
                if let Err(reason) = check_upgrade(head, body, &self.accept_key) {
                    return (pos, Outcome::Drop(Some(reason)));
                }
                if let Some(conn) = self.conns.get_mut(key) {
                    conn.state = State::Open;
                }
                pos += end + 4;
                continue;
            }
            // A frame: 2-byte header, extended length, unmasked payload.
            let (Some(&b0), Some(&b1)) = (rest.first(), rest.get(1)) else {
                return (pos, Outcome::Keep);
            };
            if b1 & 0x80 != 0 {
                return (pos, self.protocol_error(key, "masked frame from server"));
            }
            let (hdr, plen) = match b1 & 0x7f {
                126 => match rest.get(2..4) {
                    Some(&[x, y]) => (4, u64::from(u16::from_be_bytes([x, y]))),
                    _ => return (pos, Outcome::Keep),
                },
                127 => match rest.get(2..10) {
                    Some(b) => {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(b);
                        (10, u64::from_be_bytes(a))
                    }
                    None => return (pos, Outcome::Keep),
                },
                l => (2, u64::from(l)),
            };
            if plen > MAX_FRAME as u64 {
                return (pos, self.protocol_error(key, "frame too large"));
            }
            let plen = plen as usize;
            let Some(payload) = rest.get(hdr..hdr + plen) else {
                return (pos, Outcome::Keep);
            };
            pos += hdr + plen;
            let fin = b0 & 0x80 != 0;
            let outcome = match b0 & 0x0f {
                0x1 if fin => self.on_text(key, payload, now_us),
                0x1 => {
                    if let Some(conn) = self.conns.get_mut(key) {
                        conn.frag = Some(payload.to_vec());
                    }
                    Outcome::Keep
                }
                0x0 => match self.conns.get_mut(key).and_then(|c| c.frag.take()) {
                    None => self.protocol_error(key, "continuation without start"),
                    Some(mut f) => {
                        f.extend_from_slice(payload);
                        if fin {
                            self.on_text(key, &f, now_us)
                        } else {
                            if let Some(conn) = self.conns.get_mut(key) {
                                conn.frag = Some(f);
                            }
                            Outcome::Keep
                        }
                    }
                },
                0x2 => self.protocol_error(key, "binary frame"),
                0x8 => {
                    let code = match payload {
                        [a, b, ..] => u16::from_be_bytes([*a, *b]),
                        _ => 1005,
                    };
                    if state == State::Open {
                        // Closed by the gateway: answer, then wait for its EOF.
                        self.note_close(key, format!("close {code}"));
                        let mask = self.rng_mask();
                        if let Some(conn) = self.conns.get_mut(key) {
                            push_frame(&mut conn.out, 0x8, payload.get(..2).unwrap_or(&[]), mask);
                            conn.state = State::Closing;
                            conn.closing_since = Some(Instant::now());
                        }
                    }
                    // Closing: the gateway answered our close; its EOF follows.
                    Outcome::Keep
                }
                0x9 => {
                    let mask = self.rng_mask();
                    if let Some(conn) = self.conns.get_mut(key) {
                        if conn.state == State::Open {
                            push_frame(&mut conn.out, 0xA, payload, mask);
                        }
                    }
                    Outcome::Keep
                }
                0xA => Outcome::Keep,
                _ => self.protocol_error(key, "unknown opcode"),
            };
            if let Outcome::Drop(r) = outcome {
                return (pos, Outcome::Drop(r));
            }
        }
    }

    fn rng_mask(&mut self) -> [u8; 4] {
        (self.next_rand() as u32).to_be_bytes()
    }

    fn protocol_error(&mut self, key: usize, what: &str) -> Outcome {
        let connected = self.conns.get(key).is_some_and(|c| c.got_connected);
        if connected {
            self.note_close(key, format!("protocol error: {what}"));
            Outcome::Drop(None)
        } else {
            Outcome::Drop(Some(format!("protocol error: {what}")))
        }
    }

    fn on_text(&mut self, key: usize, payload: &[u8], now_us: u64) -> Outcome {
        let mask = self.rng_mask();
        let abrupt_roll = (self.next_rand() % 100) as u32;
        let Some(conn) = self.conns.get_mut(key) else {
            return Outcome::Keep;
        };
        if !conn.got_connected {
            if find(payload, b"\"type\":\"connected\"").is_none() {
                return Outcome::Drop(Some("first frame is not connected".into()));
            }
            conn.got_connected = true;
            let took = conn.started.elapsed().as_micros() as u64;
            match conn.kind {
                Kind::Tracked => {
                    self.handshake.saturating_record(took.max(1));
                    self.in_flight = self.in_flight.saturating_sub(1);
                    self.counters.opened.fetch_add(1, Ordering::Relaxed);
                }
                Kind::Churn => {
                    self.churn_handshake.saturating_record(took.max(1));
                    self.counters.churned.fetch_add(1, Ordering::Relaxed);
                    self.churn_seq += 1;
                    let abrupt_pct = self.churn.as_ref().map_or(0, |c| c.abrupt_pct);
                    if abrupt_roll < abrupt_pct {
                        // A tab killed: drop the socket, no close frame.
                        return Outcome::Drop(None);
                    }
                    push_frame(&mut conn.out, 0x8, &1000u16.to_be_bytes(), mask);
                    conn.state = State::Closing;
                    conn.closing_since = Some(Instant::now());
                }
            }
            return Outcome::Keep;
        }
        if conn.state != State::Open {
            return Outcome::Keep;
        }
        let Some(seq) = find_u64(payload, b"\"seq\":") else {
            conn.check.other += 1;
            return Outcome::Keep;
        };
        let (t_us, n) = match find(payload, b"\"data\":{\"t_us\":") {
            Some(at) => {
                let data = payload.get(at..).unwrap_or(&[]);
                (find_u64(data, b"\"t_us\":"), find_u64(data, b"\"n\":"))
            }
            None => (None, None),
        };
        conn.check.record(seq, n);
        if conn.kind != Kind::Tracked {
            return Outcome::Keep;
        }
        if let (Some(t), Some(_)) = (t_us, n) {
            let phase = find(payload, b"\"data\":{\"t_us\":")
                .and_then(|at| payload.get(at..))
                .and_then(|d| find_u64(d, b"\"p\":"))
                .unwrap_or(0)
                .min(MAX_PHASES as u64 - 1) as usize;
            while self.latency.len() <= phase {
                self.latency.push(new_histogram());
            }
            if let Some(h) = self.latency.get_mut(phase) {
                h.saturating_record(now_us.saturating_sub(t));
            }
            self.counters.frames.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = self.counters.phase_frames.get(phase) {
                c.fetch_add(1, Ordering::Relaxed);
            }
            self.counters.last_frame_us.store(now_us, Ordering::Relaxed);
        }
        Outcome::Keep
    }

    fn sweep_deadlines(&mut self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        for (key, conn) in self.conns.iter() {
            match conn.state {
                State::Connecting | State::Handshake => {
                    if now.duration_since(conn.started) > HANDSHAKE_TIMEOUT {
                        expired.push((key, Some("handshake timeout".to_owned())));
                    }
                }
                State::Open if !conn.got_connected => {
                    if now.duration_since(conn.started) > HANDSHAKE_TIMEOUT {
                        expired.push((key, Some("no connected frame".to_owned())));
                    }
                }
                State::Closing => {
                    if conn
                        .closing_since
                        .is_some_and(|t| now.duration_since(t) > CLOSE_TIMEOUT)
                    {
                        expired.push((key, None));
                    }
                }
                State::Open => {}
            }
        }
        for (key, reason) in expired {
            if reason.is_none() {
                self.close_timeouts += 1;
            }
            self.remove(key, reason);
        }
    }

    fn finish(mut self, expected: &[u64]) -> ThreadResult {
        // Connections still pending or in flight never opened.
        let never = self.pending.len() as u64;
        if never > 0 {
            self.counters.failed.fetch_add(never, Ordering::Relaxed);
            *self.failures.entry("not started".into()).or_insert(0) += never;
        }
        let mut checks = std::mem::take(&mut self.done_checks);
        for (_, conn) in self.conns.iter_mut() {
            if conn.kind == Kind::Tracked && conn.got_connected {
                checks.push((conn.user, std::mem::take(&mut conn.check)));
            }
        }
        let mut total = Check::default();
        for (user, c) in &checks {
            let exp = expected.get(*user as usize).copied().unwrap_or(0);
            let (below, above) = c.distinct(exp);
            let one = Check {
                conns: 1,
                lost: exp - below.min(exp),
                duplicates: c.duplicates,
                out_of_order: c.out_of_order,
                unexpected: above,
                received: c.received,
                other: c.other,
                min_per_conn: c.received,
                max_per_conn: c.received,
            };
            total.add(&one);
        }
        ThreadResult {
            latency: self.latency,
            handshake: self.handshake,
            churn_handshake: self.churn_handshake,
            check: total,
            failures: self.failures,
            closes: self.closes,
            close_timeouts: self.close_timeouts,
        }
        // Dropping the worker closes every socket.
    }
}

/// Write queued output until it is gone or the socket would block.
fn flush(conn: &mut Conn) -> io::Result<()> {
    while !conn.out.is_empty() {
        match conn.stream.write(&conn.out) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0")),
            Ok(n) => {
                conn.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if conn.out.capacity() > 4096 {
        conn.out.shrink_to_fit();
    }
    Ok(())
}

/// Queue one masked client frame.
pub fn push_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len().min(125); // control frames only
    out.push(0x80 | len as u8);
    out.extend_from_slice(&mask);
    for (i, b) in payload.iter().take(len).enumerate() {
        out.push(b ^ mask[i % 4]);
    }
}

/// A non-blocking socket connecting to `addr`, from `src` when given.
pub fn open_socket(addr: SocketAddr, src: Option<IpAddr>) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = src {
        // Port chosen at connect time, so the 4-tuple (not the port) must be unique.
        set_bind_no_port(&socket)?;
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

fn set_bind_no_port(socket: &socket2::Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int of the given size from a valid pointer.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Check a response head: 101 with the right accept key; else the reason, with the
/// gateway's error code when the body carries one.
pub fn check_upgrade(head: &[u8], body: &[u8], accept_key: &str) -> Result<(), String> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or("");
    let code = status.split_whitespace().nth(1).unwrap_or("?");
    if code != "101" {
        let body = String::from_utf8_lossy(body);
        let err = body
            .split("\"error\":\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("");
        return Err(format!("http {code} {err}").trim_end().to_owned());
    }
    let accepted = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == accept_key
        })
    });
    if accepted {
        Ok(())
    } else {
        Err("101 without the right Sec-WebSocket-Accept".into())
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// The unsigned integer right after `key` in `hay`.
pub fn find_u64(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(hay, key)? + key.len();
    let digits = hay.get(at..)?;
    let mut v: u64 = 0;
    let mut any = false;
    for &b in digits {
        if !b.is_ascii_digit() {
            break;
        }
        any = true;
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    any.then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_check_counts_duplicates_gaps_and_disorder() {
        let mut c = ConnCheck::default();
        for (seq, n) in [(1, 0), (2, 1), (4, 3), (3, 2), (5, 3), (6, 70)] {
            c.record(seq, Some(n));
        }
        assert_eq!(c.received, 6);
        assert_eq!(c.duplicates, 1);
        assert_eq!(c.out_of_order, 1);
        assert_eq!(c.distinct(5), (4, 1));
        assert_eq!(c.distinct(71), (5, 0));
        assert_eq!(c.distinct(64), (4, 1));
    }

    #[test]
    fn finds_numbers_after_keys() {
        let f = br#"{"type":"text_delta","seq":42,"user_id":"u1","data":{"t_us":1763800000123456,"n":7,"p":2}}"#;
        assert_eq!(find_u64(f, b"\"seq\":"), Some(42));
        assert_eq!(find_u64(f, b"\"t_us\":"), Some(1_763_800_000_123_456));
        assert_eq!(find_u64(f, b"\"n\":"), Some(7));
        assert_eq!(find_u64(f, b"\"p\":"), Some(2));
        assert_eq!(find_u64(f, b"\"x\":"), None);
    }

    #[test]
    fn refused_upgrade_reports_status_and_code() {
        let head = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 10";
        let body = br#"{"error":"too_many_connections","message":"x"}"#;
        assert_eq!(
            check_upgrade(head, body, "k").unwrap_err(),
            "http 429 too_many_connections"
        );
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: k";
        assert!(check_upgrade(ok, b"", "k").is_ok());
    }
}
