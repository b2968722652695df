//! Chaos on a cluster (issue 11): three real node processes on one `redis-server`;
//! numbered events of several users published through random nodes (each retried with
//! its idempotency key until a node answers 202); meanwhile a chaos thread kills a
//! random node with `kill -9` and starts it again on the same address, over and over,
//! and pauses Redis once (`SIGSTOP`, 1 s). One client per user reads on a random node
//! and, whenever its connection ends (its node was killed, or 1013), resumes on a
//! random live node with `last_seq` + `epoch`.
//!
//! At the end every client has caught up, and per event: every published event of its
//! user arrived exactly once, in one contiguous seq order across all its connections,
//! and nothing of another user; a `resumed: false` would be counted and must not
//! happen (no Redis data was lost). Bounded in time: every wait has a deadline.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;

const USERS: usize = 6;
const NODES: usize = 3;
const EVENTS: u64 = 800;
/// Pause between two events: the run lasts several seconds of chaos.
const PACE: Duration = Duration::from_millis(8);
const DEADLINE: Duration = Duration::from_secs(60);

/// A small deterministic generator (xorshift), so a failure replays the same choices.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// What one user's client saw, across all its connections.
#[derive(Default)]
struct Seen {
    events: Vec<Value>,
    epoch: String,
    resumed_false: u64,
    reconnects: u64,
}

/// Connect as `user` to some live node (trying them in a random order), resuming
/// after `last` when there is one.
fn reconnect(addrs: &[SocketAddr], user: &str, last: Option<(u64, &str)>, rng: &mut Rng) -> Client {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let addr = addrs[rng.below(addrs.len())];
        let path = match last {
            Some((seq, epoch)) => format!("/ws?last_seq={seq}&epoch={epoch}"),
            None => "/ws".to_owned(),
        };
        let auth = format!("Bearer {}", token(user));
        if let Ok(c) = connect_with(addr, &path, &[("Authorization", &auth)]) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "no node took {user}'s connection"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `POST /api/events` that reports a killed node as `None` instead of panicking.
fn try_publish(addr: SocketAddr, body: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(WAIT)).ok()?;
    let req = format!(
        "POST /api/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {PUBLISH_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

#[test]
fn chaos_kills_restarts_and_a_redis_pause_lose_duplicate_and_misroute_nothing() {
    let redis = Arc::new(Mutex::new(RedisServer::start()));
    let addrs: Vec<SocketAddr> = (0..NODES)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect();
    let nodes: Arc<Mutex<Vec<BinaryNode>>> = Arc::new(Mutex::new(
        addrs
            .iter()
            .enumerate()
            .map(|(i, a)| BinaryNode::start_at(&redis.lock().unwrap(), &format!("c{i}"), *a))
            .collect(),
    ));
    let users: Vec<String> = (0..USERS).map(|u| format!("chaos-u{u}")).collect();
    let published: Arc<Vec<AtomicU64>> = Arc::new((0..USERS).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));

    // Clients: one per user, reading until told the total and having it all.
    let totals: Arc<Vec<AtomicU64>> =
        Arc::new((0..USERS).map(|_| AtomicU64::new(u64::MAX)).collect());
    // Every client is connected before the first event: a first connection gets the
    // events after it (its `last_seq` is 0), a resume the ones after its last.
    let all_connected = Arc::new(std::sync::Barrier::new(USERS + 1));
    let clients: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(u, user)| {
            let (user, addrs, totals) = (user.clone(), addrs.clone(), totals.clone());
            let all_connected = all_connected.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (u as u64 + 1));
                let mut seen = Seen::default();
                let mut c = reconnect(&addrs, &user, None, &mut rng);
                seen.epoch = c.connected["epoch"].as_str().unwrap_or("").to_owned();
                assert_eq!(c.connected["last_seq"], 0, "{user} connects before any event");
                all_connected.wait();
                let deadline = Instant::now() + DEADLINE;
                loop {
                    let want = totals[u].load(Ordering::Acquire);
                    if seen.events.len() as u64 >= want {
                        return seen;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{user}: {} of {want} events; last {:?} on node {} (connection {}), {} reconnects",
                        seen.events.len(),
                        seen.events.last().map(|e| e["seq"].clone()),
                        c.connected["node_id"],
                        c.connected["connection_id"],
                        seen.reconnects
                    );
                    match c.next_frame(Duration::from_millis(500)) {
                        Frame::Json(v) if v["seq"].is_u64() => seen.events.push(v),
                        Frame::Json(_) | Frame::Timeout => {}
                        Frame::Close(_) | Frame::Gone(_) => {
                            seen.reconnects += 1;
                            let last = seen.events.last().and_then(|e| e["seq"].as_u64()).unwrap_or(0);
                            c = reconnect(&addrs, &user, Some((last, &seen.epoch)), &mut rng);
                            if c.connected["resumed"] == false {
                                seen.resumed_false += 1;
                            }
                        }
                    }
                }
            })
        })
        .collect();

    all_connected.wait();
    // Chaos: kill -9 and restart a random node, again and again; one Redis pause.
    let chaos = {
        let (nodes, redis, addrs, done) =
            (nodes.clone(), redis.clone(), addrs.clone(), done.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(0x2545_f491_4f6c_dd1d);
            let mut kills = 0;
            let mut paused = false;
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(300));
                let i = rng.below(NODES);
                let mut nodes = nodes.lock().unwrap();
                nodes[i].kill9();
                kills += 1;
                let r = redis.lock().unwrap();
                nodes[i] = BinaryNode::start_at(&r, &format!("c{i}-{kills}"), addrs[i]);
                if kills == 3 && !paused {
                    paused = true;
                    r.pause();
                    std::thread::sleep(Duration::from_secs(1));
                    r.resume();
                }
            }
            kills
        })
    };

    // Publishing: each event through a random node until one answers 202.
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut retries = 0u64;
    let deadline = Instant::now() + DEADLINE;
    for i in 0..EVENTS {
        let u = rng.below(USERS);
        let mut ev = pub_event("text_delta", &users[u], None, "r-1", json!({ "i": i }));
        ev["idempotency_key"] = json!(format!("e-{i}"));
        let body = json!([ev]).to_string();
        loop {
            let addr = addrs[rng.below(NODES)];
            if try_publish(addr, &body) == Some(202) {
                break;
            }
            retries += 1;
            assert!(Instant::now() < deadline, "event {i} never accepted");
            std::thread::sleep(Duration::from_millis(20));
        }
        published[u].fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(PACE);
    }
    done.store(true, Ordering::Release);
    let kills = chaos.join().expect("chaos thread");
    for (u, p) in published.iter().enumerate() {
        totals[u].store(p.load(Ordering::Relaxed), Ordering::Release);
    }
    let mut all = HashSet::new();
    for (u, client) in clients.into_iter().enumerate() {
        let seen = client.join().expect("client thread");
        let user = &users[u];
        assert_eq!(
            seen.resumed_false, 0,
            "{user}: resumed false without data loss"
        );
        assert_contiguous(&seen.events, 1);
        let mut ids = HashSet::new();
        for e in &seen.events {
            assert_eq!(e["user_id"], user.as_str(), "cross-user delivery: {e}");
            let i = e["data"]["i"].as_u64().expect("data.i");
            assert!(ids.insert(i), "{user}: event {i} twice");
            all.insert(i);
        }
        assert_eq!(
            ids.len() as u64,
            published[u].load(Ordering::Relaxed),
            "{user}"
        );
        eprintln!(
            "chaos: {user} {} events over {} reconnects",
            seen.events.len(),
            seen.reconnects
        );
    }
    assert_eq!(all.len() as u64, EVENTS, "every published event arrived");
    eprintln!("chaos: {kills} node kills, one Redis pause, {retries} publish retries");
}
