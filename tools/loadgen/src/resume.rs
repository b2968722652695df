//! `loadgen resume`: the cost of a resume (issue 11, "Resume cost"): a client that
//! was away while N events (1,000 by default) were published for its user comes back
//! with `last_seq` + `epoch`; how long until its `connected` frame, and until the last
//! missed event arrived.
//!
//! One round, repeated `--repeat` times, each with a fresh user: connect and read the
//! `connected` frame (its `epoch` and `last_seq`), close; publish N events for the user
//! through `POST /api/events` (every answer 202); then reconnect with `last_seq` and
//! `epoch` and time, from before the TCP connect, the `connected` frame (it must say
//! `"resumed":true`) and the last of the N events. Every seq must arrive once and in
//! order (seq and the generator's index `n` both +1 per frame); a round that misses,
//! repeats or reorders one fails the run. Reported per server: median and p99 of both
//! times and the replay cost per event ((last - connected) / N).
//!
//! Servers (`--servers`, run in turn): `memory` (one `agentwire serve`), `redis1` (one
//! node on a `redis-server` started for the run), `redis2` (two nodes; the client is
//! away from node 0, the events go through node 0, it comes back on node 1: the replay
//! comes from Redis, not from the node's memory).
//!
//! Also the shared pieces of the resume storm (src/resume_storm.rs): [`Nodes`] (Redis
//! and gateway nodes for one run, tokens, the publish key), [`parse_frame`] (one server
//! frame), [`publish`] (one `POST /api/events`).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use crate::client::{check_upgrade, find, find_u64, new_histogram};
use crate::cluster::{self, Redis};
use crate::gateway::{self, Gateway};
use crate::report::us;
use crate::sys;

/// Any 16 bytes, base64 (the gateway only echoes its hash).
pub const WS_KEY: &str = "bG9hZGdlbi1yZXN1bWUhIQ==";

#[derive(Args, Debug)]
pub struct ResumeArgs {
    /// Servers to measure, comma-separated, in this order: memory, redis1, redis2.
    #[arg(long, default_value = "memory,redis1,redis2")]
    pub servers: String,
    /// Events published while the client is away (the gateway's `replay_events` is
    /// raised to at least this).
    #[arg(long, default_value_t = 1000)]
    pub events: u64,
    /// Rounds per server (a fresh user each).
    #[arg(long, default_value_t = 50)]
    pub repeat: usize,
    /// Padding bytes in every event's data.
    #[arg(long, default_value_t = 0)]
    pub payload_bytes: usize,
    /// Wait this long after the last publish before coming back (0: at once; the
    /// nodes may still be busy with the events just published).
    #[arg(long, default_value_t = 0)]
    pub away_ms: u64,
    #[command(flatten)]
    pub nodes: NodeArgs,
    /// Also write the JSON record to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress lines.
    #[arg(long, short)]
    pub quiet: bool,
}

/// How to start the gateway nodes and Redis of a run.
#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// `agentwire` binary.
    #[arg(long, default_value = "target/release/agentwire")]
    pub gateway_bin: PathBuf,
    /// `redis-server` binary (started on a free port, in memory only).
    #[arg(long, default_value = "redis-server")]
    pub redis_server: PathBuf,
    /// Pin the gateway nodes and Redis to these CPUs, e.g. 0.
    #[arg(long, value_name = "CPUS")]
    pub pin_gateway: Option<String>,
    /// Pin the load generator to these CPUs, e.g. 1.
    #[arg(long, value_name = "CPUS")]
    pub pin_load: Option<String>,
    /// Extra gateway setting NAME=VALUE (PROTOCOL.md section 8), repeatable.
    #[arg(long = "gateway-set", value_name = "NAME=VALUE")]
    pub gateway_set: Vec<String>,
}

/// A run's Redis (when on the Redis engine) and gateway nodes, with tokens to match.
pub struct Nodes {
    pub redis: Option<Redis>,
    pub nodes: Vec<Option<Gateway>>,
    pub addrs: Vec<SocketAddr>,
    pub publish_key: String,
    pub auth: agentwire::Authenticator,
    /// User ids are this and an index.
    pub prefix: String,
}

impl Nodes {
    /// Start Redis (when `redis`) and `n` nodes on it (or one memory-engine gateway),
    /// with `extra` settings (`--name value` pairs) on top of `a.gateway_set`.
    pub fn start(
        scenario: &str,
        a: &NodeArgs,
        redis: bool,
        n: usize,
        extra: &[(&str, String)],
    ) -> Result<Nodes, String> {
        if !a.gateway_bin.exists() {
            return Err(format!(
                "{} not found: build it with `cargo build --release` (or pass --gateway-bin)",
                a.gateway_bin.display()
            ));
        }
        let cpus = a
            .pin_gateway
            .as_deref()
            .map(sys::parse_cpus)
            .transpose()?
            .unwrap_or_else(gateway::all_cpus);
        let random = gateway::random_secret;
        let secret = format!("lg-{}", random()?);
        let publish_key = format!("pk-lg-{}", &random()?[..24]);
        let prefix = format!("lg{}-", &random()?[..6]);
        let auth = gateway::hs256_minter(&secret)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let redis = if redis {
            Some(
                Redis::start(&a.redis_server, cpus.clone(), None, scenario, deadline)
                    .map_err(|e| format!("starting redis-server: {e}"))?,
            )
        } else {
            None
        };
        let mut common: Vec<String> = vec!["--demo-agent".into(), "false".into()];
        for (k, v) in extra {
            common.push(format!("--{}", k.replace('_', "-")));
            common.push(v.clone());
        }
        common.extend(gateway::gateway_set_args(&a.gateway_set)?);
        let env = [
            ("AGENTWIRE_JWT_SECRET", secret.as_str()),
            ("AGENTWIRE_PUBLISH_KEY", publish_key.as_str()),
        ];
        let mut out = Nodes {
            redis,
            nodes: Vec::new(),
            addrs: Vec::new(),
            publish_key: publish_key.clone(),
            auth,
            prefix,
        };
        let prefix_key = format!("lgr{}", &random()?[..6]);
        for i in 0..n.max(1) {
            let mut args = common.clone();
            if let Some(r) = &out.redis {
                args.extend(cluster::node_args(&r.url, &prefix_key, i));
            }
            let log =
                gateway::log_file(scenario, &format!("node{i}")).map_err(|e| e.to_string())?;
            let g = gateway::start_binary(
                &a.gateway_bin,
                &args,
                &env,
                cpus.clone(),
                None,
                log,
                deadline,
            )
            .map_err(|e| format!("starting node {i}: {e}"))?;
            out.addrs.push(g.addr);
            out.nodes.push(Some(g));
        }
        Ok(out)
    }

    pub fn user(&self, i: usize) -> String {
        format!("{}{i}", self.prefix)
    }

    pub fn token(&self, user: &str) -> Result<String, String> {
        self.auth
            .mint(user, 24 * 3600)
            .map_err(|e| format!("minting a token: {e}"))
    }

    /// kill -9 node `i` (the resume storm); its pid.
    pub fn kill(&mut self, i: usize) -> Option<u32> {
        let g = self.nodes.get_mut(i)?.take()?;
        let pid = g.pid?;
        // SAFETY: kill has no memory preconditions; pid is our child's.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
        if let gateway::Process::Binary(mut c) = g.process {
            let _ = c.wait();
        }
        Some(pid)
    }

    pub fn stop(self) {
        for g in self.nodes.into_iter().flatten() {
            g.stop(Duration::from_secs(5));
        }
        if let Some(r) = self.redis {
            // Its child handle is private to cluster.rs: SIGTERM by pid (it also
            // gets SIGTERM when loadgen exits: PR_SET_PDEATHSIG).
            if let Some(pid) = r.pid() {
                sys::terminate(pid);
            }
        }
    }
}

/// One frame from the gateway: (fin, opcode, payload), and the bytes it took.
pub struct Frame<'a> {
    pub fin: bool,
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// Parse one unmasked server frame at the start of `buf`: `Ok(None)` when incomplete.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, String> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if b1 & 0x80 != 0 {
        return Err("masked frame from the server".into());
    }
    let (hdr, len) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(&[x, y]) => (4, u64::from(u16::from_be_bytes([x, y]))),
            _ => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                (10, u64::from_be_bytes(a))
            }
            None => return Ok(None),
        },
        l => (2, u64::from(l)),
    };
    if len > 16 << 20 {
        return Err("frame over 16 MiB".into());
    }
    let end = hdr + len as usize;
    let Some(payload) = buf.get(hdr..end) else {
        return Ok(None);
    };
    Ok(Some((
        Frame {
            fin: b0 & 0x80 != 0,
            opcode: b0 & 0x0f,
            payload,
        },
        end,
    )))
}

/// The upgrade request of a client connection.
pub fn upgrade_request(addr: SocketAddr, path: &str, token: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    )
}

/// `/ws`, or `/ws?last_seq=N&epoch=E` to resume.
pub fn ws_path(resume: Option<(u64, &str)>) -> String {
    match resume {
        None => "/ws".into(),
        Some((seq, epoch)) => format!("/ws?last_seq={seq}&epoch={}", url_escape(epoch)),
    }
}

fn url_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What a `connected` frame says about resuming.
#[derive(Clone, Debug, Default)]
pub struct Connected {
    pub epoch: String,
    pub last_seq: u64,
    pub resumed: Option<bool>,
}

/// Read the fields of a `connected` frame (None: not one).
pub fn parse_connected(payload: &[u8]) -> Option<Connected> {
    find(payload, b"\"type\":\"connected\"")?;
    let v: Value = serde_json::from_slice(payload).ok()?;
    Some(Connected {
        epoch: v.get("epoch")?.as_str()?.to_owned(),
        last_seq: v.get("last_seq")?.as_u64()?,
        resumed: v.get("resumed").and_then(Value::as_bool),
    })
}

/// The body of one publish request: events `n0..n0+count` of `user` (stamped with
/// `t_us` and phase `p`), with `pad` in their data.
pub fn event_batch(user: &str, n0: u64, count: u64, t_us: u64, p: u8, pad: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(count as usize * (160 + pad.len()) + 2);
    body.push(b'[');
    for n in n0..n0 + count {
        if n > n0 {
            body.push(b',');
        }
        // User ids are [a-z0-9-]: no escaping needed.
        let _ = write!(
            body,
            r#"{{"type":"text_delta","user_id":"{user}","run_id":"r-{user}","agent_name":"loadgen","data":{{"t_us":{t_us},"n":{n},"p":{p}"#
        );
        if !pad.is_empty() {
            let _ = write!(body, r#","pad":"{pad}""#);
        }
        body.extend_from_slice(b"}}");
    }
    body.push(b']');
    body
}

/// One `POST /api/events` on a keep-alive connection (opened when `None`); the status.
/// The connection is dropped after an error or a `Connection: close`.
pub fn publish(
    conn: &mut Option<TcpStream>,
    addr: SocketAddr,
    key: &str,
    body: &[u8],
) -> io::Result<u16> {
    if conn.is_none() {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        *conn = Some(s);
    }
    let Some(s) = conn.as_mut() else {
        return Err(io::Error::other("no connection"));
    };
    let head = format!(
        "POST /api/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let r = s
        .write_all(head.as_bytes())
        .and_then(|()| s.write_all(body))
        .and_then(|()| crate::driver::read_response_full(s));
    match r {
        Ok((status, _, close)) => {
            if close {
                *conn = None;
            }
            Ok(status)
        }
        Err(e) => {
            *conn = None;
            Err(e)
        }
    }
}

/// A blocking WebSocket client connection, enough to time a resume.
struct Ws {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
}

impl Ws {
    /// Connect and upgrade; the leftover after the 101 head is kept.
    fn connect(addr: SocketAddr, path: &str, token: &str) -> Result<Ws, String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(upgrade_request(addr, path, token).as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::with_capacity(256 * 1024);
        let accept = tungstenite::handshake::derive_accept_key(WS_KEY.as_bytes());
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = buf.get(..end).unwrap_or(&[]);
                let body = buf.get(end + 4..).unwrap_or(&[]);
                check_upgrade(head, body, &accept)?;
                return Ok(Ws {
                    stream,
                    buf,
                    pos: end + 4,
                });
            }
            if buf.len() > 16 * 1024 {
                return Err("response head too large".into());
            }
            let n = stream
                .read(&mut chunk)
                .map_err(|e| format!("read head: {e}"))?;
            if n == 0 {
                return Err("eof during the handshake".into());
            }
            buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
        }
    }

    /// The next text message's payload (pings and pongs skipped).
    fn next_text(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        loop {
            let rest = self.buf.get(self.pos..).unwrap_or(&[]);
            if let Some((f, used)) = parse_frame(rest)? {
                let (fin, op) = (f.fin, f.opcode);
                out.clear();
                out.extend_from_slice(f.payload);
                self.pos += used;
                match (op, fin) {
                    (0x1, true) => return Ok(()),
                    (0x9 | 0xA, _) => continue,
                    (0x8, _) => {
                        let code = match out.as_slice() {
                            [a, b, ..] => u16::from_be_bytes([*a, *b]),
                            _ => 1005,
                        };
                        return Err(format!("closed by the gateway ({code})"));
                    }
                    _ => return Err(format!("unexpected frame (opcode {op}, fin {fin})")),
                }
            }
            if self.pos > 0 {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            let len = self.buf.len();
            self.buf.resize(len + 64 * 1024, 0);
            let n = match self.stream.read(self.buf.get_mut(len..).unwrap_or(&mut [])) {
                Ok(n) => n,
                Err(e) => {
                    self.buf.truncate(len);
                    return Err(format!("read: {e}"));
                }
            };
            self.buf.truncate(len + n);
            if n == 0 {
                return Err("eof".into());
            }
        }
    }

    /// Close with 1000 (masked, as a client must) and drop the socket.
    fn close(mut self) {
        let mask = [0x11u8, 0x22, 0x33, 0x44];
        let code = 1000u16.to_be_bytes();
        let frame = [
            0x88,
            0x82,
            mask[0],
            mask[1],
            mask[2],
            mask[3],
            code[0] ^ mask[0],
            code[1] ^ mask[1],
        ];
        let _ = self.stream.write_all(&frame);
        let _ = self
            .stream
            .set_read_timeout(Some(Duration::from_millis(500)));
        let mut sink = [0u8; 4096];
        // Wait for the gateway's close and EOF, so the connection is gone on its side
        // (the user's connection count) before the next step.
        while matches!(self.stream.read(&mut sink), Ok(n) if n > 0) {}
    }
}

/// One server's figures.
struct ServerResult {
    name: String,
    /// Reconnect start to `connected`, us.
    connected: hdrhistogram::Histogram<u64>,
    /// Reconnect start to the last missed event, us.
    caught_up: hdrhistogram::Histogram<u64>,
    /// (last event - connected) / events, ns per event.
    per_event_ns: hdrhistogram::Histogram<u64>,
    rounds: usize,
}

fn pct(h: &hdrhistogram::Histogram<u64>, q: f64) -> u64 {
    h.value_at_quantile(q)
}

/// One round: away, N events, back; (to connected, to last event) in us.
fn round(
    nodes: &Nodes,
    user_index: usize,
    a: &ResumeArgs,
    (away_on, back_on): (SocketAddr, SocketAddr),
    pad: &str,
    conn: &mut Option<TcpStream>,
) -> Result<(u64, u64), String> {
    let (events, away_ms) = (a.events, a.away_ms);
    let user = nodes.user(user_index);
    let token = nodes.token(&user)?;
    let mut msg = Vec::new();
    let mut ws = Ws::connect(away_on, &ws_path(None), &token)?;
    ws.next_text(&mut msg)?;
    let first = parse_connected(&msg).ok_or("the first frame is not `connected`")?;
    ws.close();
    // The events it misses, at most 1,000 per request.
    let mut n = 0;
    while n < events {
        let k = (events - n).min(1000);
        let body = event_batch(&user, n, k, sys::realtime_us(), 0, pad);
        let status = publish(conn, away_on, &nodes.publish_key, &body)
            .map_err(|e| format!("POST /api/events: {e}"))?;
        if status != 202 {
            return Err(format!("POST /api/events answered {status}"));
        }
        n += k;
    }
    if away_ms > 0 {
        std::thread::sleep(Duration::from_millis(away_ms));
    }
    let path = ws_path(Some((first.last_seq, &first.epoch)));
    let t0 = Instant::now();
    let mut ws = Ws::connect(back_on, &path, &token)?;
    ws.next_text(&mut msg)?;
    let t_conn = t0.elapsed();
    let c = parse_connected(&msg).ok_or("the first frame on resume is not `connected`")?;
    if c.resumed != Some(true) {
        return Err(format!(
            "resume answered resumed={:?} (epoch {} -> {})",
            c.resumed, first.epoch, c.epoch
        ));
    }
    let mut seq = first.last_seq;
    for want_n in 0..events {
        ws.next_text(&mut msg)?;
        let s = find_u64(&msg, b"\"seq\":").ok_or("an event without seq")?;
        let got_n = find_u64(&msg, b"\"n\":").ok_or("an event without n")?;
        if s != seq + 1 || got_n != want_n {
            return Err(format!(
                "expected seq {} (n {want_n}), got seq {s} (n {got_n}): lost, duplicated or out of order",
                seq + 1
            ));
        }
        seq = s;
    }
    let t_last = t0.elapsed();
    ws.close();
    Ok((t_conn.as_micros() as u64, t_last.as_micros() as u64))
}

fn measure(a: &ResumeArgs, server: &str) -> Result<ServerResult, String> {
    let (redis, n) = match server {
        "memory" => (false, 1),
        "redis1" => (true, 1),
        "redis2" => (true, 2),
        other => {
            return Err(format!(
                "--servers: unknown server {other:?} (memory, redis1, redis2)"
            ))
        }
    };
    let replay = a.events.max(1024);
    let extra = [
        ("replay_events", replay.to_string()),
        ("max_connections_per_user", "3".to_string()),
    ];
    let nodes = Nodes::start("resume", &a.nodes, redis, n, &extra)?;
    let away_on = nodes.addrs.first().copied().ok_or("no node")?;
    let back_on = nodes.addrs.last().copied().ok_or("no node")?;
    let pad = "x".repeat(a.payload_bytes);
    let mut res = ServerResult {
        name: server.into(),
        connected: new_histogram(),
        caught_up: new_histogram(),
        per_event_ns: new_histogram(),
        rounds: 0,
    };
    let mut conn = None;
    let mut err = None;
    for i in 0..a.repeat.max(1) {
        match round(&nodes, i, a, (away_on, back_on), &pad, &mut conn) {
            Ok((tc, tl)) => {
                res.connected.saturating_record(tc.max(1));
                res.caught_up.saturating_record(tl.max(1));
                let per = (tl.saturating_sub(tc) * 1000) / a.events.max(1);
                res.per_event_ns.saturating_record(per.max(1));
                res.rounds += 1;
                if !a.quiet && (i + 1) % 10 == 0 {
                    eprintln!(
                        "  {server}: round {}/{}: connected {}, last event {}",
                        i + 1,
                        a.repeat,
                        us(tc),
                        us(tl)
                    );
                }
            }
            Err(e) => {
                err = Some(format!("{server} round {i}: {e}"));
                break;
            }
        }
    }
    nodes.stop();
    match err {
        Some(e) => Err(e),
        None => Ok(res),
    }
}

/// `loadgen resume`.
pub fn resume(a: ResumeArgs) -> Result<bool, String> {
    if a.events == 0 {
        return Err("--events must be at least 1".into());
    }
    sys::pin_load(a.nodes.pin_load.as_deref())?;
    let mut results = Vec::new();
    let mut failures = Vec::new();
    for s in a
        .servers
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        if !a.quiet {
            eprintln!(
                "loadgen resume: {s}: {} rounds of {} missed events",
                a.repeat, a.events
            );
        }
        match measure(&a, s) {
            Ok(r) => results.push(r),
            Err(e) => failures.push(e),
        }
    }
    println!(
        "resume: {} missed events, {} rounds per server (reconnect start -> connected frame -> last missed event)",
        a.events, a.repeat
    );
    println!(
        "  {:<8} {:>12} {:>12} {:>14} {:>14} {:>16} {:>16}",
        "server",
        "conn p50",
        "conn p99",
        "caught-up p50",
        "caught-up p99",
        "per event p50",
        "per event p99"
    );
    let mut out = Vec::new();
    for r in &results {
        println!(
            "  {:<8} {:>12} {:>12} {:>14} {:>14} {:>13.2} us {:>13.2} us",
            r.name,
            us(pct(&r.connected, 0.5)),
            us(pct(&r.connected, 0.99)),
            us(pct(&r.caught_up, 0.5)),
            us(pct(&r.caught_up, 0.99)),
            pct(&r.per_event_ns, 0.5) as f64 / 1000.0,
            pct(&r.per_event_ns, 0.99) as f64 / 1000.0,
        );
        out.push(json!({
            "server": r.name,
            "rounds": r.rounds,
            "connected_us": {"p50": pct(&r.connected, 0.5), "p99": pct(&r.connected, 0.99), "max": r.connected.max()},
            "caught_up_us": {"p50": pct(&r.caught_up, 0.5), "p99": pct(&r.caught_up, 0.99), "max": r.caught_up.max()},
            "per_event_us": {"p50": pct(&r.per_event_ns, 0.5) as f64 / 1000.0, "p99": pct(&r.per_event_ns, 0.99) as f64 / 1000.0},
        }));
    }
    for f in &failures {
        println!("FAIL {f}");
    }
    let record = json!({
        "scenario": "resume",
        "events": a.events,
        "repeat": a.repeat,
        "payload_bytes": a.payload_bytes,
        "away_ms": a.away_ms,
        "pin_gateway": a.nodes.pin_gateway,
        "pin_load": a.nodes.pin_load,
        "servers": out,
        "failures": failures,
    });
    println!("JSON {record}");
    if let Some(p) = &a.json {
        std::fs::write(p, format!("{record:#}\n")).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(failures.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_whole_or_not_at_all() {
        let f = [0x81, 0x03, b'a', b'b', b'c', 0x89];
        let (fr, used) = parse_frame(&f).unwrap().unwrap();
        assert_eq!(
            (fr.fin, fr.opcode, fr.payload, used),
            (true, 1, &b"abc"[..], 5)
        );
        assert!(parse_frame(&f[..4]).unwrap().is_none());
        assert!(parse_frame(&[0x81, 0x83, 0, 0]).is_err());
        let mut long = vec![0x81, 126, 0x01, 0x00];
        long.extend(std::iter::repeat_n(b'x', 256));
        assert_eq!(parse_frame(&long).unwrap().unwrap().1, 260);
    }

    #[test]
    fn connected_frames_give_epoch_and_seq() {
        let c =
            parse_connected(br#"{"type":"connected","epoch":"9f/2","last_seq":42,"resumed":true}"#)
                .unwrap();
        assert_eq!(
            (c.epoch.as_str(), c.last_seq, c.resumed),
            ("9f/2", 42, Some(true))
        );
        assert!(parse_connected(br#"{"type":"text_delta","seq":1}"#).is_none());
        assert_eq!(ws_path(Some((3, "a/b"))), "/ws?last_seq=3&epoch=a%2Fb");
    }

    #[test]
    fn batches_are_json_arrays_of_numbered_events() {
        let b = event_batch("u1", 5, 2, 7, 1, "");
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v[0]["data"]["n"], 5);
        assert_eq!(v[1]["data"]["n"], 6);
        assert_eq!(v[1]["data"]["p"], 1);
    }
}
