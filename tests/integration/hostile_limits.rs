//! Connection limits under hostile load (PROTOCOL.md section 3, docs/HOSTILE.md): 50
//! simultaneous handshakes for one user, under `evict_oldest` and `reject`; 50 users
//! at once against the total limit; and slot release on every close path, checked by
//! the gateway's own counters after 1,000 connect/kill cycles. `limits.rs` covers the
//! sequential cases (the fourth connection, one over the total).

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use agentwire::PerUserPolicy;
use serde_json::json;

use crate::support::{
    bearer, client_frame, config, log_capture, raw_upgrade, read_response, token, upgrade_head,
    Agent, RawNext, RawWs, TestGateway, WAIT,
};

const BURST: usize = 50;

/// What one of the simultaneous handshakes got.
enum Outcome {
    Open(RawWs),
    Refused(u16, String),
}

/// Start `BURST` handshakes at once (a barrier releases them together), the i-th as
/// `user(i)`; returns what each got.
fn burst(addr: SocketAddr, user: impl Fn(usize) -> String) -> Vec<Outcome> {
    let barrier = Arc::new(Barrier::new(BURST));
    let threads: Vec<_> = (0..BURST)
        .map(|i| {
            let (barrier, user) = (barrier.clone(), user(i));
            let t = token(&user);
            std::thread::spawn(move || {
                let mut s = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
                s.set_nodelay(true).expect("nodelay");
                let head = upgrade_head(addr, "/ws", &[bearer(&t)]);
                barrier.wait();
                s.write_all(head.as_bytes()).expect("write upgrade");
                let r = read_response(&mut s);
                if r.status == 101 {
                    Outcome::Open(RawWs::from_parts(s, r.body))
                } else {
                    let code = serde_json::from_slice::<serde_json::Value>(&r.body)
                        .map(|v| v["error"].as_str().unwrap_or("").to_owned())
                        .unwrap_or_default();
                    Outcome::Refused(r.status, code)
                }
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("handshake thread"))
        .collect()
}

/// Read a session's frames: `Some(code)` if it was closed, `None` if it is still open
/// (nothing but its `connected` frame and pings within `quiet`).
fn ended(raw: &mut RawWs, quiet: Duration) -> Option<u16> {
    loop {
        match raw.try_next(quiet) {
            RawNext::Frame(0x8, p) => return Some(u16::from_be_bytes([p[0], p[1]])),
            RawNext::Frame(0x9, p) => raw.pong(&p),
            RawNext::Frame(_, _) => {}
            RawNext::Timeout => return None,
            RawNext::Eof(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

/// 50 handshakes of one user at once under `evict_oldest` (limit 3): all 50 upgrade,
/// exactly 3 stay open, the other 47 are closed with 4002.
#[test]
fn hostile_burst_of_one_user_under_evict_oldest_leaves_exactly_the_limit() {
    let mut cfg = config();
    cfg.max_connections_per_user = 3;
    cfg.per_user_policy = PerUserPolicy::EvictOldest;
    let gw = TestGateway::start(cfg, Agent::None);
    let outcomes = burst(gw.addr, |_| "lim-burst-evict".into());
    let s = gw.wait_stats("47 evictions", |s| {
        s["connections"]["closed_by_reason"]["evicted"] == 47 && s["connections"]["open"] == 3
    });
    let mut open = Vec::new();
    let mut codes = std::collections::BTreeMap::new();
    for o in outcomes {
        match o {
            Outcome::Open(mut raw) => match ended(&mut raw, Duration::from_millis(300)) {
                Some(code) => *codes.entry(code).or_insert(0) += 1,
                None => open.push(raw),
            },
            Outcome::Refused(status, code) => panic!("refused {status} {code} under evict_oldest"),
        }
    }
    assert_eq!(codes.get(&4002), Some(&47), "close codes {codes:?}; {s}");
    assert_eq!(open.len(), 3, "survivors");
    for raw in open.iter_mut() {
        raw.send(&client_frame(0x1, br#"{"type":"ping"}"#, true, true));
        let deadline = Instant::now() + WAIT;
        loop {
            match raw.try_next(deadline.saturating_duration_since(Instant::now())) {
                RawNext::Frame(0x1, p)
                    if serde_json::from_slice::<serde_json::Value>(&p)
                        .is_ok_and(|v| v["type"] == "pong") =>
                {
                    break
                }
                RawNext::Frame(0x9, p) => raw.pong(&p),
                RawNext::Frame(_, _) => {}
                other => panic!("a survivor is not served: {other:?}"),
            }
        }
    }
    assert_eq!(gw.stats()["users"]["online"], 1);
    log_capture::assert_clean();
}

/// 50 handshakes of one user at once under `reject` (limit 3): exactly 3 upgrade, 47
/// get 429 `too_many_connections`.
#[test]
fn hostile_burst_of_one_user_under_reject_admits_exactly_the_limit() {
    let mut cfg = config();
    cfg.max_connections_per_user = 3;
    cfg.per_user_policy = PerUserPolicy::Reject;
    let gw = TestGateway::start(cfg, Agent::None);
    let outcomes = burst(gw.addr, |_| "lim-burst-reject".into());
    let mut open = 0;
    let mut refused = 0;
    for o in &outcomes {
        match o {
            Outcome::Open(_) => open += 1,
            Outcome::Refused(429, code) if code == "too_many_connections" => refused += 1,
            Outcome::Refused(status, code) => panic!("unexpected refusal {status} {code}"),
        }
    }
    assert_eq!((open, refused), (3, 47));
    let s = gw.wait_open(3);
    assert_eq!(
        s["connections"]["refused"]["too_many_connections"], 47,
        "{s}"
    );
    assert_eq!(s["connections"]["closed"], 0, "{s}");
    log_capture::assert_clean();
}

/// 50 different users at once against `max_connections` 10: exactly 10 upgrade, 40
/// get 429.
#[test]
fn hostile_burst_of_users_against_the_total_limit() {
    let mut cfg = config();
    cfg.max_connections = 10;
    let gw = TestGateway::start(cfg, Agent::None);
    let outcomes = burst(gw.addr, |i| format!("lim-burst-total-{i}"));
    let open = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Open(_)))
        .count();
    let refused = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Refused(429, c) if c == "too_many_connections"))
        .count();
    assert_eq!((open, refused), (10, 40));
    let s = gw.wait_open(10);
    assert_eq!(s["users"]["online"], 10, "{s}");
    log_capture::assert_clean();
}

/// How one cycle ends its connection.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// SO_LINGER 0: the socket is reset.
    Reset,
    /// The socket is dropped without a close frame (FIN).
    Fin,
    /// A client close frame, then the socket is dropped.
    CloseFrame,
    /// The gateway closes it: a binary frame (1003).
    ServerClose,
    /// The gateway closes it: an unmasked frame (1002).
    ProtocolError,
    /// The gateway closes it: a second connection of the user evicts it (4002).
    Evicted,
    /// The client goes silent; the gateway closes it at the heartbeat timeout (1001).
    Silent,
    /// Half a request head, then a reset (never upgraded).
    HalfHandshake,
    /// A refused upgrade (bad token), then a reset.
    Refused,
}

const KILLS: [Kill; 9] = [
    Kill::Reset,
    Kill::Fin,
    Kill::CloseFrame,
    Kill::ServerClose,
    Kill::ProtocolError,
    Kill::Evicted,
    Kill::Silent,
    Kill::HalfHandshake,
    Kill::Refused,
];

fn reset(stream: &TcpStream) {
    socket2::SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
}

/// One connect/kill cycle. Silent sessions are returned to be checked later (the
/// gateway closes them on its heartbeat timer).
fn cycle(addr: SocketAddr, i: usize, kill: Kill) -> Option<RawWs> {
    let user = format!("lim-cycle-{i}");
    let connect = || {
        let s = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let (raw, _) = raw_upgrade(s, addr, &user, "/ws").expect("upgrade");
        raw
    };
    match kill {
        Kill::Reset => {
            let raw = connect();
            reset(&raw.stream);
        }
        Kill::Fin => drop(connect()),
        Kill::CloseFrame => {
            let mut raw = connect();
            raw.send(&client_frame(0x8, &1000u16.to_be_bytes(), true, true));
            assert_eq!(raw.expect_close(WAIT), 1000);
        }
        Kill::ServerClose => {
            let mut raw = connect();
            raw.send(&client_frame(0x2, b"bin", true, true));
            assert_eq!(raw.expect_close(WAIT), 1003);
        }
        Kill::ProtocolError => {
            let mut raw = connect();
            raw.send(&client_frame(0x1, b"{}", true, false));
            assert_eq!(raw.expect_close(WAIT), 1002);
        }
        Kill::Evicted => {
            let mut first = connect();
            let second = connect();
            assert_eq!(first.expect_close(WAIT), 4002);
            reset(&second.stream);
        }
        Kill::Silent => return Some(connect()),
        Kill::HalfHandshake => {
            let mut s = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
            let head = upgrade_head(addr, "/ws", &[bearer(&token(&user))]);
            s.write_all(&head.as_bytes()[..head.len() / 2])
                .expect("write");
            reset(&s);
        }
        Kill::Refused => {
            let mut s = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
            s.write_all(upgrade_head(addr, "/ws", &[bearer("not.a.token")]).as_bytes())
                .expect("write");
            assert_eq!(read_response(&mut s).status, 401);
            reset(&s);
        }
    }
    None
}

/// 1,000 connect/kill cycles, mixing every close path (reset, FIN, close frame, server
/// closes for a binary frame, a protocol error and an eviction, heartbeat timeout, a
/// half handshake, a refusal), 8 at a time: afterwards the gateway's counters are back
/// to zero: no open connection, no user online or known, no output pending, and no
/// timer beyond the idle baseline (every live socket holds one).
#[test]
fn hostile_slots_are_released_on_every_close_path() {
    const CYCLES: usize = 1000;
    const THREADS: usize = 8;
    let mut cfg = config();
    cfg.max_connections_per_user = 1;
    cfg.heartbeat_interval_ms = 100;
    cfg.heartbeat_timeout_ms = 300;
    cfg.handshake_timeout_ms = 1000;
    let gw = TestGateway::start(cfg, Agent::None);
    let baseline_timers = gw.stats()["timers"]["armed"]
        .as_u64()
        .expect("timers.armed");
    let started = Instant::now();
    let addr = gw.addr;
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut silent = Vec::new();
                for i in (t..CYCLES).step_by(THREADS) {
                    if let Some(raw) = cycle(addr, i, KILLS[i % KILLS.len()]) {
                        silent.push(raw);
                    }
                }
                silent
            })
        })
        .collect();
    let mut silent: Vec<RawWs> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("cycle thread"))
        .collect();
    let cycles_took = started.elapsed();
    for raw in silent.iter_mut() {
        // A silent peer reads nothing while it waits; now it drains: pings, then 1001.
        let deadline = Instant::now() + WAIT;
        let code = loop {
            match raw.try_next(deadline.saturating_duration_since(Instant::now())) {
                RawNext::Frame(0x8, p) => break u16::from_be_bytes([p[0], p[1]]),
                RawNext::Frame(_, _) => {}
                other => panic!("a silent session was not closed: {other:?}"),
            }
        };
        assert_eq!(code, 1001);
    }
    let s = gw.wait_stats("every slot released", |s| {
        s["connections"]["open"] == 0
            && s["users"]["online"] == 0
            && s["users"]["known"] == 0
            && s["bytes"]["pending_out"] == 0
            && s["timers"]["armed"].as_u64() <= Some(baseline_timers)
    });
    let per_kill = CYCLES / KILLS.len();
    eprintln!(
        "{CYCLES} connect/kill cycles ({THREADS} threads, ~{per_kill} per close path) in \
         {cycles_took:?}; after: {}",
        json!({"connections": s["connections"], "users": s["users"], "timers": s["timers"]})
    );
    let closed = &s["connections"]["closed_by_reason"];
    let at_least = |label: &str, n: u64| {
        assert!(
            closed[label].as_u64().unwrap_or(0) >= n,
            "closed_by_reason.{label} < {n}: {closed}"
        );
    };
    at_least("binary_frame", per_kill as u64);
    at_least("protocol_error", per_kill as u64);
    at_least("evicted", per_kill as u64);
    at_least("heartbeat_timeout", per_kill as u64);
    assert_eq!(
        s["connections"]["opened"], s["connections"]["closed"],
        "every session opened was closed: {}",
        s["connections"]
    );
    assert!(s["connections"]["refused"]["invalid_token"].as_u64() >= Some(per_kill as u64));
    let (status, health) = crate::support::get_json(gw.addr, "/health");
    assert_eq!((status, health["connections"].clone()), (200, json!(0)));
    log_capture::assert_clean();
}
