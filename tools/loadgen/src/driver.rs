//! Event drivers: what publishes the events, at an open-loop paced rate.
//!
//! - [`BenchChild`]: `examples/bench_gateway` as a child process (gateway + in-process
//!   emitter threads), driven through its stdin/stdout line protocol.
//! - [`Publisher`]: `POST /api/events` over a few keep-alive HTTP/1.1 connections, one
//!   thread each, batching what is due every tick.
//!
//! Both stamp every event with its scheduled send time (`t_us`, CLOCK_REALTIME us), its
//! per-user index `n` and its phase `p`, never wait for the clients, and report the
//! per-user counts so the clients can check completeness.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::sys;

/// One phase of emission.
#[derive(Clone, Copy, Debug)]
pub struct PhaseSpec {
    pub id: u32,
    /// Events per second in total; 0 = as fast as possible (`events` of them).
    pub rate: f64,
    pub duration: Duration,
    pub events: u64,
}

/// What a driver reports after a phase.
#[derive(Clone, Debug, Default)]
pub struct PhaseDone {
    pub sent: u64,
    pub failed: u64,
    /// Most a send ran behind its schedule, microseconds.
    pub lag_max_us: u64,
    /// Events assigned to each user so far (cumulative over phases).
    pub counts: Vec<u64>,
    /// Why sends failed (publish driver), with counts.
    pub errors: Vec<String>,
}

/// The bench_gateway child: gateway + emitters.
pub struct BenchChild {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    pub pid: u32,
    pub addr: SocketAddr,
    pub reactor_tid: u32,
    pub emitter_tids: Vec<u32>,
    /// Events sent in the running phase (from the progress lines).
    pub phase_sent: Arc<AtomicU64>,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

impl BenchChild {
    /// Start the child (`cmd` fully built: binary, flags, affinity) and wait for its
    /// ready line.
    pub fn spawn(
        mut cmd: Command,
        log: std::fs::File,
        deadline: Instant,
    ) -> io::Result<BenchChild> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(log);
        let mut child = cmd.spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("no stdin pipe"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout pipe"))?;
        let (tx, lines) = crossbeam_channel::unbounded();
        let phase_sent = Arc::new(AtomicU64::new(0));
        let sent = phase_sent.clone();
        std::thread::Builder::new()
            .name("bench-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if line.starts_with("progress ") {
                        if let Some(v) = field(&line, "sent").and_then(|v| v.parse().ok()) {
                            sent.store(v, Ordering::Relaxed);
                        }
                        continue;
                    }
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })?;
        let pid = child.id();
        let ready = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(l) if l.starts_with("ready ") => break l,
                Ok(_) => {}
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(io::Error::other(format!(
                            "bench_gateway exited before it was ready ({status})"
                        )));
                    }
                    if Instant::now() >= deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(io::Error::other("bench_gateway was not ready in time"));
                    }
                }
            }
        };
        let bad = |what: &str| io::Error::other(format!("bad ready line ({what}): {ready}"));
        let addr = field(&ready, "addr")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("addr"))?;
        let reactor_tid = field(&ready, "reactor_tid")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("reactor_tid"))?;
        let emitter_tids = field(&ready, "emitter_tids")
            .map(|v| v.split(',').filter_map(|t| t.parse().ok()).collect())
            .unwrap_or_default();
        Ok(BenchChild {
            child,
            stdin,
            lines,
            pid,
            addr,
            reactor_tid,
            emitter_tids,
            phase_sent,
        })
    }

    pub fn start(&mut self, p: &PhaseSpec) -> io::Result<()> {
        self.phase_sent.store(0, Ordering::Relaxed);
        writeln!(
            self.stdin,
            "start phase={} rate={} duration_ms={} events={}",
            p.id,
            p.rate,
            p.duration.as_millis(),
            p.events
        )?;
        self.stdin.flush()
    }

    /// Wait for the phase's done line; `None` while it is not there yet.
    pub fn poll_done(&mut self, wait: Duration) -> io::Result<Option<PhaseDone>> {
        match self.lines.recv_timeout(wait) {
            Ok(l) if l.starts_with("done ") => {
                let num = |k: &str| field(&l, k).and_then(|v| v.parse().ok()).unwrap_or(0);
                let counts = field(&l, "counts")
                    .map(|v| v.split(',').filter_map(|c| c.parse().ok()).collect())
                    .unwrap_or_default();
                Ok(Some(PhaseDone {
                    sent: num("sent"),
                    failed: num("failed"),
                    lag_max_us: num("lag_max_us"),
                    counts,
                    errors: Vec::new(),
                }))
            }
            Ok(l) if l.starts_with("error ") => {
                Err(io::Error::other(format!("bench_gateway: {l}")))
            }
            Ok(_) => Ok(None),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Ok(None),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(io::Error::other(
                "bench_gateway's output ended (did it crash? see its log)",
            )),
        }
    }

    /// `quit`, then wait for the exit (SIGKILL after `wait`).
    pub fn stop(mut self, wait: Duration) -> String {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        drop(self.stdin);
        wait_child(&mut self.child, wait)
    }
}

/// Wait for a child to exit within `wait`, else kill it; says how it ended.
pub fn wait_child(child: &mut Child, wait: Duration) -> String {
    let deadline = Instant::now() + wait;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return format!("exited ({status})"),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return format!("killed after {wait:?}");
            }
        }
    }
}

/// Publishing through `POST /api/events`.
pub struct Publisher {
    txs: Vec<Sender<PhaseSpec>>,
    results: Receiver<(usize, PhaseDone)>,
    handles: Vec<JoinHandle<()>>,
    users: usize,
    acc: PhaseDone,
    got: usize,
    /// Events sent in the running phase.
    pub phase_sent: Arc<AtomicU64>,
}

/// Settings of the publisher threads.
#[derive(Clone)]
pub struct PublishConfig {
    pub addr: SocketAddr,
    /// Several nodes (a cluster run): publisher connection `i` posts to node
    /// `i % nodes`. Empty: `addr` only.
    pub nodes: Vec<SocketAddr>,
    pub key: String,
    pub user_ids: Arc<Vec<String>>,
    /// Users (indices) that get events.
    pub users: usize,
    pub connections: usize,
    /// Batch tick: what is due is sent every `tick`.
    pub tick: Duration,
    /// Events per request in the unpaced mode (rate 0).
    pub burst_batch: usize,
    pub pad: String,
    /// Run the publisher threads in SCHED_FIFO at this priority.
    pub rt_prio: Option<i32>,
    /// The kernel floor (src/floor.rs) is the server: the body is one line per event,
    /// `USER_ID SP FRAME`, the frame rendered here as agentwire would write it (the
    /// envelope with `seq` = this user's count + 1: each user has one publisher thread).
    pub floor: bool,
}

impl Publisher {
    pub fn start(cfg: PublishConfig) -> io::Result<Publisher> {
        let phase_sent = Arc::new(AtomicU64::new(0));
        let (res_tx, results) = crossbeam_channel::unbounded();
        let mut txs = Vec::new();
        let mut handles = Vec::new();
        let conns = cfg.connections.max(1).min(cfg.users.max(1));
        for t in 0..conns {
            let (tx, rx) = crossbeam_channel::unbounded::<PhaseSpec>();
            let mine: Vec<usize> = (0..cfg.users).filter(|u| u % conns == t).collect();
            let mut cfg_t = cfg.clone();
            if let Some(a) = cfg.nodes.get(t % cfg.nodes.len().max(1)) {
                cfg_t.addr = *a;
            }
            let mut worker = PubThread {
                share: mine.len() as f64 / cfg.users.max(1) as f64,
                counts: vec![0; mine.len()],
                users: mine,
                cfg: cfg_t,
                stream: None,
                sent: phase_sent.clone(),
                next_user: 0,
            };
            let res_tx = res_tx.clone();
            let rt_prio = cfg.rt_prio;
            handles.push(
                std::thread::Builder::new()
                    .name(format!("publish-{t}"))
                    .spawn(move || {
                        sys::set_own_timerslack(1000);
                        if let Some(p) = rt_prio {
                            if let Err(e) = sys::set_fifo(0, p) {
                                eprintln!("loadgen: publisher thread: SCHED_FIFO {p}: {e}");
                            }
                        }
                        for phase in rx.iter() {
                            let done = worker.phase(&phase);
                            if res_tx.send((t, done)).is_err() {
                                break;
                            }
                        }
                    })?,
            );
            txs.push(tx);
        }
        Ok(Publisher {
            txs,
            results,
            handles,
            users: cfg.users,
            acc: PhaseDone::default(),
            got: 0,
            phase_sent,
        })
    }

    pub fn connections(&self) -> usize {
        self.txs.len()
    }

    /// Start one phase on every publisher thread.
    pub fn start_phase(&mut self, p: &PhaseSpec) -> io::Result<()> {
        self.phase_sent.store(0, Ordering::Relaxed);
        self.acc = PhaseDone {
            counts: vec![0; self.users],
            ..PhaseDone::default()
        };
        self.got = 0;
        for tx in &self.txs {
            tx.send(*p)
                .map_err(|_| io::Error::other("publisher thread ended"))?;
        }
        Ok(())
    }

    /// The phase's summary once every thread finished; `None` while not yet.
    pub fn poll_done(&mut self, wait: Duration) -> io::Result<Option<PhaseDone>> {
        match self.results.recv_timeout(wait) {
            Ok((_, d)) => {
                self.got += 1;
                self.acc.sent += d.sent;
                self.acc.failed += d.failed;
                self.acc.lag_max_us = self.acc.lag_max_us.max(d.lag_max_us);
                self.acc.errors.extend(d.errors);
                for (slot, c) in self.acc.counts.iter_mut().zip(d.counts) {
                    *slot += c;
                }
                if self.got == self.txs.len() {
                    return Ok(Some(std::mem::take(&mut self.acc)));
                }
                Ok(None)
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Ok(None),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                Err(io::Error::other("publisher threads ended"))
            }
        }
    }

    pub fn stop(self) {
        drop(self.txs);
        for h in self.handles {
            let _ = h.join();
        }
    }
}

struct PubThread {
    share: f64,
    /// User indices of this thread.
    users: Vec<usize>,
    counts: Vec<u64>,
    cfg: PublishConfig,
    stream: Option<TcpStream>,
    sent: Arc<AtomicU64>,
    next_user: usize,
}

impl PubThread {
    fn phase(&mut self, p: &PhaseSpec) -> PhaseDone {
        let mut done = PhaseDone::default();
        if self.users.is_empty() {
            done.counts = vec![0; self.cfg.users];
            return done;
        }
        let start = Instant::now();
        let start_wall = sys::realtime_us();
        let mut body = Vec::with_capacity(256 * 1024);
        let mut in_body = 0usize;
        if p.rate > 0.0 {
            let rate = p.rate * self.share;
            let total = (rate * p.duration.as_secs_f64()).round() as u64;
            let tick_s = self.cfg.tick.as_secs_f64();
            let due = |k: u64| ((k as f64 * tick_s * rate).ceil() as u64).min(total);
            let mut next = 0u64; // next event index
            let mut k = 1u64; // next tick
            while next < total {
                let at = Duration::from_secs_f64(k as f64 * tick_s);
                let el = start.elapsed();
                if at > el {
                    std::thread::sleep(at - el);
                }
                // Catch up: every tick already due goes now, each with its own stamp.
                let el = start.elapsed();
                let k_last = k.max((el.as_secs_f64() / tick_s) as u64);
                let late = el.saturating_sub(at).as_micros() as u64;
                done.lag_max_us = done.lag_max_us.max(late);
                for j in k..=k_last {
                    let stamp = start_wall + (j as f64 * tick_s * 1e6) as u64;
                    while next < due(j) {
                        self.push_event(&mut body, &mut in_body, stamp, p.id);
                        next += 1;
                        if in_body >= 1000 {
                            self.post(&mut body, &mut in_body, &mut done);
                        }
                    }
                }
                if in_body > 0 {
                    self.post(&mut body, &mut in_body, &mut done);
                }
                k = k_last + 1;
            }
        } else {
            let total = (p.events as f64 * self.share).round() as u64;
            let batch = self.cfg.burst_batch.clamp(1, 1000) as u64;
            let mut next = 0;
            while next < total {
                let stamp = sys::realtime_us();
                let upto = (next + batch).min(total);
                while next < upto {
                    self.push_event(&mut body, &mut in_body, stamp, p.id);
                    next += 1;
                }
                self.post(&mut body, &mut in_body, &mut done);
            }
        }
        let mut counts = vec![0; self.cfg.users];
        for (u, c) in self.users.iter().zip(&self.counts) {
            if let Some(slot) = counts.get_mut(*u) {
                *slot = *c;
            }
        }
        done.counts = counts;
        done
    }

    fn push_event(&mut self, body: &mut Vec<u8>, in_body: &mut usize, t_us: u64, phase: u32) {
        let slot = self.next_user % self.users.len();
        self.next_user = slot + 1;
        let (Some(&u), Some(n)) = (self.users.get(slot), self.counts.get_mut(slot)) else {
            return;
        };
        let user = self.cfg.user_ids.get(u).map_or("", String::as_str);
        if self.cfg.floor {
            let seq = *n + 1;
            let ts = t_us / 1000;
            let _ = write!(
                body,
                r#"{user} {{"type":"text_delta","seq":{seq},"user_id":"{user}","thread_id":null,"run_id":"r-{user}","agent_name":"loadgen","ts":{ts},"data":{{"t_us":{t_us},"n":{n},"p":{phase}"#
            );
            if !self.cfg.pad.is_empty() {
                let _ = write!(body, r#","pad":"{}""#, self.cfg.pad);
            }
            body.extend_from_slice(b"}}\n");
            *n += 1;
            *in_body += 1;
            return;
        }
        body.push(if *in_body == 0 { b'[' } else { b',' });
        // User ids are generated as [a-z0-9-]: no JSON escaping needed.
        let _ = write!(
            body,
            r#"{{"type":"text_delta","user_id":"{user}","run_id":"r-{user}","agent_name":"loadgen","data":{{"t_us":{t_us},"n":{n},"p":{phase}"#
        );
        if !self.cfg.pad.is_empty() {
            let _ = write!(body, r#","pad":"{}""#, self.cfg.pad);
        }
        body.extend_from_slice(b"}}");
        *n += 1;
        *in_body += 1;
    }

    fn post(&mut self, body: &mut Vec<u8>, in_body: &mut usize, done: &mut PhaseDone) {
        if !self.cfg.floor {
            body.push(b']');
        }
        let n = *in_body as u64;
        match self.request(body) {
            Ok(202) => {
                done.sent += n;
                self.sent.fetch_add(n, Ordering::Relaxed);
            }
            Ok(status) => {
                done.failed += n;
                if done.errors.len() < 10 {
                    done.errors
                        .push(format!("POST /api/events answered {status}"));
                }
            }
            Err(e) => {
                self.stream = None;
                done.failed += n;
                if done.errors.len() < 10 {
                    done.errors.push(format!("POST /api/events failed: {e}"));
                }
            }
        }
        body.clear();
        *in_body = 0;
    }

    /// One request on the keep-alive connection (reconnecting when needed); the status.
    fn request(&mut self, body: &[u8]) -> io::Result<u16> {
        if self.stream.is_none() {
            let s = TcpStream::connect_timeout(&self.cfg.addr, Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            self.stream = Some(s);
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err(io::Error::other("no connection"));
        };
        let head = format!(
            "POST /api/events HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.cfg.addr,
            self.cfg.key,
            body.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let (status, _, close) = read_response_full(stream)?;
        if close {
            // The gateway ends a keep-alive connection after a number of requests (and
            // says so with `Connection: close`): the next request takes a new one.
            self.stream = None;
        }
        Ok(status)
    }
}

/// Read one HTTP response; status and body.
pub fn read_response_body(stream: &mut TcpStream) -> io::Result<(u16, Vec<u8>)> {
    let (status, body, _) = read_response_full(stream)?;
    Ok((status, body))
}

/// Read one HTTP response; status, body, and whether it says `Connection: close`.
pub fn read_response_full(stream: &mut TcpStream) -> io::Result<(u16, Vec<u8>, bool)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = crate::client::find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::other("response head too large"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
    };
    let head = String::from_utf8_lossy(buf.get(..head_end).unwrap_or(&[])).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other("bad status line"))?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let close = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close")
        })
    });
    let mut body = buf.get(head_end + 4..).unwrap_or(&[]).to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "body cut short",
            ));
        }
        body.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
    }
    Ok((status, body, close))
}

/// `GET path` on a fresh connection: status and body (bounded by a 5 s timeout).
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    read_response_body(&mut s)
}
