//! A quick figure for the Redis engine (docs/CLUSTER.md, "Figures"): two nodes on one
//! Redis in this process, WebSocket clients on node 0, events published through node 1
//! with the publish API, and what it cost.
//!
//! ```text
//! redis-server --port 6390 --save '' --appendonly no &
//! cargo run --release --example bench_cluster -- --redis-url redis://127.0.0.1:6390 \
//!     --users 200 --events 20000 --batch 50 --publishers 4
//! ```
//!
//! Prints: publish requests' answer time (p50/p99/max: stored in Redis, 202), the time
//! until every client had every event (delivery through Redis pub/sub to the other
//! node), events per second end to end, and the store thread's pipelines (round trips)
//! per event from `/ws/stats`. Every client checks that its events came in seq order
//! without gap or duplicate and that each belongs to its user. `--encoding agui`: the
//! clients take AG-UI events (the node translates each delivery; docs/AGUI.md) and check
//! the seq order of their text frames (AG-UI frames carry no user id).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use agentwire::{Config, Gateway};
use clap::Parser;
use serde_json::{json, Value};
use tungstenite::Message;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// `redis_tls_ca_file` for a `rediss://` URL (docs/CLUSTER.md, "Sentinel and TLS").
    #[arg(long)]
    redis_tls_ca_file: Option<String>,
    /// Users (one WebSocket client each, on node 0).
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// Events in all, spread round-robin over the users.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Events per publish request.
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// Publishing threads (each its own keep-alive connection to node 1).
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// The clients' `encoding`: `agentwire`, or `agui` (AG-UI events: each client then
    /// checks its `TEXT_MESSAGE_CONTENT` frames' `metadata.seq` instead).
    #[arg(long, default_value = "agentwire")]
    encoding: String,
}

const SECRET: &str = "bench-cluster-secret-0123456789abcdef";
const KEY: &str = "bench-cluster-publish-key-0123";

fn node(args: &Args, name: &str, prefix: &str) -> SocketAddr {
    let mut c = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        jwt_secret: Some(SECRET.into()),
        publish_key: Some(KEY.into()),
        demo_agent: Some(false),
        max_connections_per_user: 3,
        ..Config::default()
    };
    for (k, v) in [
        ("engine", "redis"),
        ("redis_url", args.redis_url.as_str()),
        ("redis_prefix", prefix),
        ("node_id", name),
    ] {
        c.set(k, v).expect("setting");
    }
    if let Some(ca) = &args.redis_tls_ca_file {
        c.set("redis_tls_ca_file", ca).expect("redis_tls_ca_file");
    }
    let gw = Gateway::new(c).expect("gateway");
    let addr = gw.local_addr();
    std::mem::forget(gw.spawn().expect("spawn"));
    addr
}

fn token(sub: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token")
}

/// One HTTP/1.1 keep-alive request; the status.
fn post(stream: &mut TcpStream, addr: SocketAddr, body: &[u8]) -> u16 {
    let head = format!(
        "POST /api/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("write");
    stream.write_all(body).expect("write");
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).expect("read");
        assert!(n > 0, "node closed the publish connection");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = stream.read(&mut chunk).expect("read");
                buf.extend_from_slice(&chunk[..n]);
            }
            return head[9..12].parse().expect("status");
        }
    }
}

fn get_json(addr: SocketAddr, path: &str) -> Value {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("{}");
    serde_json::from_str(body).expect("json")
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args = Args::parse();
    let prefix = format!("bench{}", std::process::id());
    let n0 = node(&args, "bench-n0", &prefix);
    let n1 = node(&args, "bench-n1", &prefix);
    // Ready once node 0 takes connections (its feed thread connected: a TLS connect
    // takes a moment after start).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while tungstenite::connect(format!("ws://{n0}/ws?token={}", token("bench-probe"))).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "node 0 never took a connection"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let per_user = args.events / args.users;
    let total = per_user * args.users;
    // Clients on node 0, each counting its user's events.
    let received = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for u in 0..args.users {
        let user = format!("bench-u{u}");
        let url = format!(
            "ws://{n0}/ws?token={}&encoding={}",
            token(&user),
            args.encoding
        );
        let agui = args.encoding == "agui";
        let (mut ws, _) = tungstenite::connect(url).expect("ws connect");
        let connected = ws.read().expect("connected");
        assert!(connected.to_text().unwrap_or("").contains("\"connected\""));
        let received = received.clone();
        readers.push(std::thread::spawn(move || {
            let mut next = 1u64;
            while next <= per_user as u64 {
                match ws.read().expect("read") {
                    Message::Text(t) => {
                        let v: Value = serde_json::from_str(t.as_str()).expect("json");
                        if agui {
                            // RUN_STARTED and TEXT_MESSAGE_START come with the first.
                            if v["type"] != "TEXT_MESSAGE_CONTENT" {
                                continue;
                            }
                            assert_eq!(v["runId"], "r-1");
                            let seq = v["metadata"]["seq"].as_u64();
                            assert_eq!(seq, Some(next), "order, gap or duplicate");
                        } else {
                            assert_eq!(v["user_id"], user.as_str(), "cross-user delivery");
                            assert_eq!(v["seq"].as_u64(), Some(next), "order, gap or duplicate");
                        }
                        next += 1;
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Message::Close(f) => panic!("closed: {f:?}"),
                    _ => {}
                }
            }
        }));
    }
    let stats_before = get_json(n1, "/ws/stats");
    let started = Instant::now();
    let batches_per = total / args.batch / args.publishers;
    let publishers: Vec<_> = (0..args.publishers)
        .map(|p| {
            let (users, batch) = (args.users, args.batch);
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(n1).expect("connect");
                s.set_nodelay(true).ok();
                let mut times = Vec::with_capacity(batches_per);
                for b in 0..batches_per {
                    let events: Vec<Value> = (0..batch)
                        .map(|i| {
                            let k = (p * batches_per + b) * batch + i;
                            json!({"type": "text_delta", "user_id": format!("bench-u{}", k % users),
                                   "run_id": "r-1", "agent_name": "bench", "data": {"k": k}})
                        })
                        .collect();
                    let body = serde_json::to_vec(&events).expect("body");
                    let t = Instant::now();
                    assert_eq!(post(&mut s, n1, &body), 202);
                    times.push(t.elapsed().as_micros() as u64);
                }
                times
            })
        })
        .collect();
    let mut times: Vec<u64> = publishers
        .into_iter()
        .flat_map(|p| p.join().expect("publisher"))
        .collect();
    let published = started.elapsed();
    for r in readers {
        r.join().expect("reader");
    }
    let delivered = started.elapsed();
    times.sort_unstable();
    let stats = get_json(n1, "/ws/stats");
    let rt = |s: &Value| s["engine"]["round_trips"].as_u64().unwrap_or(0);
    let round_trips = rt(&stats) - rt(&stats_before);
    let sent = (times.len() * args.batch) as f64;
    println!(
        "events={} users={} batch={} publishers={} encoding={}",
        sent, args.users, args.batch, args.publishers, args.encoding
    );
    println!(
        "publish answer (202, stored) us: p50={} p99={} max={}",
        pct(&times, 0.5),
        pct(&times, 0.99),
        times.last().copied().unwrap_or(0)
    );
    println!(
        "all published in {:.3} s ({:.0} events/s); all delivered to node 0's clients in {:.3} s ({:.0} events/s)",
        published.as_secs_f64(),
        sent / published.as_secs_f64(),
        delivered.as_secs_f64(),
        sent / delivered.as_secs_f64()
    );
    println!(
        "store pipelines (round trips) on node 1: {round_trips} = {:.3} per event; avg round trip {} us, max {} us",
        round_trips as f64 / sent,
        stats["engine"]["round_trip_us_avg"],
        stats["engine"]["round_trip_us_max"]
    );
    println!(
        "every client: seq 1..={per_user} in order{}: ok ({} events)",
        if args.encoding == "agui" {
            ""
        } else {
            ", own user only"
        },
        received.load(Ordering::Relaxed)
    );
}
