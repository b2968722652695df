//! Deadlines under hostile or broken peers (PROTOCOL.md sections 5 and 7): slowloris
//! handshakes are cut at `handshake_timeout_ms` without delaying a healthy upgrade; a
//! dead peer is closed after the heartbeat timeout and all its state freed; a slow
//! reader is closed with 1013 without delaying another user's events; a shutdown
//! while a client is mid-stream delivers everything emitted before it, then 1001.
//!
//! Timings are measured and printed; assertions on them are generous bounds (the
//! machine is shared and noisy), plus lower bounds that would catch a premature close.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{
    bearer, config, connect, get_json, raw_upgrade, read_response, slow_reader_stream, token,
    upgrade_head, Agent, RawNext, RawWs, TestGateway, WAIT,
};

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// 300 clients trickle one header byte every 100 ms and never finish their request.
/// With `handshake_timeout_ms` 1000 each is dropped (EOF, no answer) about a second
/// after it connected, and a healthy client's upgrade meanwhile completes long before
/// the first of them is dropped.
#[test]
fn slowloris_is_cut_at_the_handshake_deadline_and_does_not_delay_a_healthy_upgrade() {
    const SLOW: usize = 300;
    const TIMEOUT_MS: u64 = 1000;
    let mut cfg = config();
    cfg.handshake_timeout_ms = TIMEOUT_MS;
    let gw = TestGateway::start(cfg, Agent::None);
    let head = b"GET /ws HTTP/1.1\r\nHost: slowloris\r\nX-Slowloris: ";

    struct Slow {
        stream: TcpStream,
        connected: Instant,
        sent: usize,
        next_write: Instant,
        dropped: Option<Instant>,
        answered: usize,
    }
    let mut slow: Vec<Slow> = (0..SLOW)
        .map(|_| {
            let stream = TcpStream::connect_timeout(&gw.addr, WAIT).expect("connect");
            let connected = Instant::now();
            stream.set_nodelay(true).expect("nodelay");
            stream.set_nonblocking(true).expect("nonblocking");
            Slow {
                stream,
                connected,
                sent: 0,
                next_write: connected,
                dropped: None,
                answered: 0,
            }
        })
        .collect();
    let all_connected = Instant::now();

    // The healthy client starts once every slowloris socket is trickling.
    let (tx, rx) = crossbeam_channel::bounded(1);
    let addr = gw.addr;
    let healthy = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        let client = connect(addr, "dl-healthy");
        let done = Instant::now();
        let _ = tx.send((started, done));
        client
    });

    let deadline = all_connected + Duration::from_millis(TIMEOUT_MS) + WAIT;
    let mut buf = [0u8; 512];
    while slow.iter().any(|s| s.dropped.is_none()) {
        let now = Instant::now();
        assert!(
            now < deadline,
            "{} slowloris sockets still open {:?} after the last connected",
            slow.iter().filter(|s| s.dropped.is_none()).count(),
            now - all_connected
        );
        for s in slow.iter_mut().filter(|s| s.dropped.is_none()) {
            match s.stream.read(&mut buf) {
                Ok(0) => s.dropped = Some(now),
                Ok(n) => s.answered += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => s.dropped = Some(now),
            }
            if s.dropped.is_none() && now >= s.next_write {
                let byte = head.get(s.sent).copied().unwrap_or(b'a');
                match s.stream.write(&[byte]) {
                    Ok(_) => s.sent += 1,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => s.dropped = Some(now),
                }
                s.next_write += Duration::from_millis(100);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (h_started, h_done) = rx.recv_timeout(WAIT).expect("healthy client finished");
    let mut client = healthy.join().expect("healthy client thread");

    let lifetimes: Vec<Duration> = slow
        .iter()
        .map(|s| s.dropped.unwrap_or(deadline) - s.connected)
        .collect();
    let first_drop = slow.iter().filter_map(|s| s.dropped).min().expect("drops");
    let shortest = lifetimes.iter().min().copied().unwrap_or_default();
    let longest = lifetimes.iter().max().copied().unwrap_or_default();
    eprintln!(
        "slowloris: {SLOW} sockets dropped after {}..{} ms (timeout {TIMEOUT_MS} ms); \
         healthy upgrade took {} ms and finished {} ms before the first drop",
        ms(shortest),
        ms(longest),
        ms(h_done - h_started),
        ms(first_drop.saturating_duration_since(h_done))
    );
    for (i, s) in slow.iter().enumerate() {
        assert_eq!(s.answered, 0, "slowloris socket {i} got an answer");
        assert!(s.sent > 0, "slowloris socket {i} trickled");
    }
    assert!(
        shortest >= Duration::from_millis(TIMEOUT_MS - 100),
        "a slowloris socket was dropped before the handshake timeout: {shortest:?}"
    );
    assert!(
        longest <= Duration::from_millis(TIMEOUT_MS + 2000),
        "a slowloris socket outlived the handshake timeout by far: {longest:?}"
    );
    assert!(
        h_done < first_drop,
        "the healthy upgrade ({:?} after the last slowloris connected) finished only after \
         the first slowloris drop ({:?})",
        h_done - all_connected,
        first_drop - all_connected
    );
    client.ping_pong();
    gw.wait_open(1);
}

/// A peer that upgrades and then reads nothing and sends nothing is closed within
/// interval + timeout (+ margin), and afterwards nothing of it is left: no open
/// connection, no user online, `/health` counts 0. What it would have read: pings,
/// then close 1001.
#[test]
fn dead_peer_is_closed_after_the_heartbeat_timeout_and_fully_freed() {
    const INTERVAL_MS: u64 = 200;
    const TIMEOUT_MS: u64 = 600;
    let mut cfg = config();
    cfg.heartbeat_interval_ms = INTERVAL_MS;
    cfg.heartbeat_timeout_ms = TIMEOUT_MS;
    let gw = TestGateway::start(cfg, Agent::None);
    let mut stream = TcpStream::connect_timeout(&gw.addr, WAIT).expect("connect");
    stream
        .write_all(upgrade_head(gw.addr, "/ws", &[bearer(&token("dl-dead"))]).as_bytes())
        .expect("write upgrade");
    let sent = Instant::now();
    // From here on the peer is dead: it reads nothing and sends nothing.
    gw.wait_stats("the dead peer's session opened", |s| {
        s["connections"]["opened"] == 1
    });
    let s = gw.wait_stats("the dead peer closed and freed", |s| {
        s["connections"]["open"] == 0 && s["users"]["online"] == 0
    });
    let took = sent.elapsed();
    eprintln!(
        "dead peer: closed {} ms after its upgrade request (interval {INTERVAL_MS}, timeout \
         {TIMEOUT_MS})",
        ms(took)
    );
    assert!(
        took >= Duration::from_millis(TIMEOUT_MS - 100),
        "closed before the heartbeat timeout: {took:?}"
    );
    assert!(
        took <= Duration::from_millis(INTERVAL_MS + TIMEOUT_MS + 3000),
        "dead peer lingered: {took:?}"
    );
    assert_eq!(
        s["connections"]["closed_by_reason"]["heartbeat_timeout"], 1,
        "{s}"
    );
    assert_eq!(s["users_online"], 0, "{s}");
    let (status, health) = get_json(gw.addr, "/health");
    assert_eq!(status, 200);
    assert_eq!(health["connections"], 0, "{health}");

    // The bytes the gateway sent meanwhile: 101, connected, pings, close 1001, EOF.
    let r = read_response(&mut stream);
    assert_eq!(r.status, 101, "{}", r.text());
    let mut raw = RawWs::from_parts(stream, r.body);
    let mut pings = 0;
    let mut texts = 0;
    let code = loop {
        match raw.try_next(WAIT) {
            RawNext::Frame(0x9, _) => pings += 1,
            RawNext::Frame(0x1, _) => texts += 1,
            RawNext::Frame(0x8, p) => break u16::from_be_bytes([p[0], p[1]]),
            other => panic!("expected pings then close 1001, got {other:?}"),
        }
    };
    assert_eq!(code, 1001);
    assert_eq!(texts, 1, "only the connected frame");
    assert!(pings >= 1, "pinged before being closed");
    assert!(
        matches!(raw.try_next(WAIT), RawNext::Eof(_)),
        "EOF after the close frame"
    );
}

/// A reader with a 4 KiB receive buffer that gets a burst is closed with 1013 once its
/// unsent output passes `max_pending_bytes` (64 KiB), while another user's events,
/// emitted every 10 ms throughout, each arrive within a second.
#[test]
fn slow_reader_is_closed_with_1013_while_another_user_is_served_promptly() {
    let mut cfg = config();
    cfg.max_pending_bytes = 64 * 1024;
    let gw = TestGateway::start(cfg, Agent::None);
    let stream = slow_reader_stream(gw.addr, 4096, Some(536));
    let (mut slow, _) = raw_upgrade(stream, gw.addr, "dl-slow", "/ws").expect("slow upgrade");
    let mut fast = gw.connect("dl-fast");
    let base = Instant::now();

    const FAST_EVENTS: u64 = 150;
    let fast_emitter = {
        let emitter = gw.emitter.clone();
        std::thread::spawn(move || {
            let mut run = emitter
                .run("dl-fast", None, "r-fast", "dl_agent")
                .expect("run");
            for i in 0..FAST_EVENTS {
                let t_us = base.elapsed().as_micros() as u64;
                run.emit("text_delta", &json!({"i": i, "t_us": t_us}))
                    .expect("emit");
                std::thread::sleep(Duration::from_millis(10));
            }
            run.agent_completed(&json!({})).expect("emit");
        })
    };
    let burst = {
        let emitter = gw.emitter.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let blob = "s".repeat(8 * 1024);
            let mut run = emitter
                .run("dl-slow", None, "r-burst", "dl_agent")
                .expect("run");
            for i in 0..400 {
                run.emit("text_delta", &json!({"i": i, "blob": blob}))
                    .expect("emit");
                std::thread::sleep(Duration::from_micros(2500));
            }
            run.agent_completed(&json!({})).expect("emit");
        })
    };

    // As soon as the gateway counts the slow-consumer close, read what the slow reader
    // was sent (before the 2 s linger drops the socket with the close frame unsent).
    let addr = gw.addr;
    let slow_reader = std::thread::spawn(move || {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = get_json(addr, "/ws/stats").1;
            if s["connections"]["closed_by_reason"]["slow_consumer"] == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "no slow-consumer close: {s}");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut got = 0u64;
        let ending = loop {
            match slow.try_next(WAIT) {
                RawNext::Frame(0x1, payload) => {
                    let v: serde_json::Value = serde_json::from_slice(&payload).expect("json");
                    got += 1;
                    assert_eq!(
                        v["seq"], got,
                        "the slow reader's events are a gap-free prefix"
                    );
                }
                RawNext::Frame(0x8, p) => {
                    break format!("close {}", u16::from_be_bytes([p[0], p[1]]))
                }
                RawNext::Frame(_, _) => {}
                RawNext::Eof(why) => break format!("EOF without a close frame ({why})"),
                RawNext::Timeout => panic!("the slow reader was neither closed nor fed"),
            }
        };
        (got, ending)
    });

    let mut latencies: Vec<Duration> = Vec::new();
    for i in 0..FAST_EVENTS {
        let ev = fast.recv_json();
        assert_eq!(ev["data"]["i"], i, "{ev}");
        let t_us = ev["data"]["t_us"].as_u64().expect("t_us");
        latencies.push(base.elapsed() - Duration::from_micros(t_us));
    }
    assert_eq!(fast.recv_json()["type"], "agent_completed");
    fast_emitter.join().expect("fast emitter");
    burst.join().expect("burst emitter");
    let (got, ending) = slow_reader.join().expect("slow reader thread");
    let s = gw.stats();
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let max = *latencies.last().expect("latencies");
    eprintln!(
        "slow reader: {got} events then {ending}; the other user's {FAST_EVENTS} events: \
         latency p50 {p50:?}, max {max:?}; pending_out now {}",
        s["bytes"]["pending_out"]
    );
    assert!(
        ending == "close 1013" || ending.starts_with("EOF"),
        "slow reader ended with {ending}"
    );
    assert!(
        got < 402,
        "the slow reader cannot have received the whole burst"
    );
    assert!(
        max < Duration::from_secs(1),
        "another user's event waited {max:?} while a slow reader was being closed"
    );
    fast.ping_pong();
}

/// Regression guard for PROTOCOL.md section 5, "a client that keeps reading is never
/// closed as slow because its replay is large": a client resumes a replay of about
/// 6 MB and reads it steadily at up to 2 MB/s, ten times the user's live rate (100
/// events of 2 KB a second, for 4 s). Its receive buffer is pinned at 64 KiB, so the
/// kernel holds about 4 MB and the rest of the replay waits in the gateway's queue for
/// a second or more; live traffic starts once `/ws/stats` shows the gateway holding
/// over 1 MB of it (if the kernel took it all, the attempt is retried: the scenario
/// must really arise). The live events queued behind the replay must not get the
/// client closed with 1013: it catches up with the replay and the live stream,
/// gap-free.
#[test]
fn a_client_reading_a_large_replay_under_live_traffic_is_not_closed_as_slow() {
    let mut skipped = Vec::new();
    for attempt in 1..=3 {
        match replay_under_live_traffic() {
            ReplayRun::NotSetUp(why) => skipped.push(format!("attempt {attempt}: {why}")),
            ReplayRun::CaughtUp(report) => {
                eprintln!("replay under live traffic: {report}");
                return;
            }
            ReplayRun::CutOff(report) => panic!("{report}"),
        }
    }
    panic!(
        "could not set up a replay held by the gateway: {}",
        skipped.join("; ")
    );
}

enum ReplayRun {
    /// The gateway never held the replay (the kernel took it): nothing was tested.
    NotSetUp(String),
    CaughtUp(String),
    CutOff(String),
}

fn replay_under_live_traffic() -> ReplayRun {
    const KEPT: u64 = 1500;
    const LIVE: u64 = 400;
    const HELD: u64 = 1_000_000;
    let mut cfg = config();
    cfg.max_pending_bytes = 64 * 1024;
    cfg.replay_events = 4096;
    cfg.replay_bytes_per_user = 64 << 20;
    let gw = TestGateway::start(cfg, Agent::None);
    let user = "dl-replay-live";
    let blob = "b".repeat(4000);
    let mut run = gw
        .emitter
        .run(user, None, "r-missed", "dl_agent")
        .expect("run");
    for i in 0..KEPT - 1 {
        run.emit("text_delta", &json!({"i": i, "blob": blob}))
            .expect("emit");
    }
    run.agent_completed(&json!({})).expect("emit");
    gw.wait_stats("missed events routed", |s| s["events"]["emitted"] == KEPT);
    let stream = slow_reader_stream(gw.addr, 64 * 1024, None);
    let path = format!("/ws?last_seq=0&epoch={}", gw.epoch);
    let (mut raw, connected) = raw_upgrade(stream, gw.addr, user, &path).expect("resume");
    assert_eq!(connected["resumed"], true, "{connected}");
    assert_eq!(connected["last_seq"], KEPT, "{connected}");
    // Live traffic, once the gateway is seen holding a good part of the replay.
    let (held_tx, held_rx) = crossbeam_channel::bounded(1);
    let live = {
        let emitter = gw.emitter.clone();
        let addr = gw.addr;
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(1);
            let held = loop {
                let s = get_json(addr, "/ws/stats").1;
                // Held by the gateway: queued on the socket, or kept and not yet
                // queued (a replay is streamed as the socket drains).
                let held = s["bytes"]["pending_out"].as_u64().unwrap_or(0)
                    + s["bytes"]["replay_backlog"].as_u64().unwrap_or(0);
                if held >= HELD || Instant::now() >= deadline {
                    break held;
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            let _ = held_tx.send(held);
            if held < HELD {
                return;
            }
            let mut run = emitter.run(user, None, "r-live", "dl_agent").expect("run");
            let small = "l".repeat(2000);
            for i in 0..LIVE - 1 {
                run.emit("text_delta", &json!({"i": i, "s": small}))
                    .expect("emit");
                std::thread::sleep(Duration::from_millis(10));
            }
            run.agent_completed(&json!({})).expect("emit");
        })
    };
    // Read steadily: a budget of 20 KiB every 10 ms.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    let (mut got, mut bytes, mut budget) = (0u64, 0usize, 0usize);
    let mut refill = started;
    let mut held_at_start = None;
    let outcome = loop {
        let now = Instant::now();
        assert!(now < deadline, "stuck after {got} events ({bytes} bytes)");
        if held_at_start.is_none() {
            if let Ok(held) = held_rx.try_recv() {
                if held < HELD {
                    live.join().expect("live thread");
                    return ReplayRun::NotSetUp(format!(
                        "the gateway held at most {held} bytes of the replay"
                    ));
                }
                held_at_start = Some(held);
            }
        }
        if now >= refill {
            budget += 20 * 1024;
            refill += Duration::from_millis(10);
        }
        if budget == 0 {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        match raw.try_next(Duration::from_millis(50)) {
            RawNext::Frame(0x1, payload) => {
                let v: serde_json::Value = serde_json::from_slice(&payload).expect("json");
                got += 1;
                assert_eq!(v["seq"], got, "gap-free");
                bytes += payload.len();
                budget = budget.saturating_sub(payload.len());
                if got == KEPT + LIVE {
                    break Ok(started.elapsed());
                }
            }
            RawNext::Frame(0x8, p) => {
                break Err(format!("close {}", u16::from_be_bytes([p[0], p[1]])))
            }
            RawNext::Frame(_, _) | RawNext::Timeout => {}
            RawNext::Eof(why) => break Err(format!("EOF ({why})")),
        }
    };
    live.join().expect("live emitter");
    let held = held_at_start.unwrap_or(0);
    match outcome {
        Ok(took) => ReplayRun::CaughtUp(format!(
            "{got} events ({bytes} bytes) caught up in {took:?}; the gateway held {held} \
             bytes of the replay when live traffic began"
        )),
        Err(ending) => {
            let took = started.elapsed();
            ReplayRun::CutOff(format!(
                "a client reading steadily at {:.1} MB/s (the live rate is 0.2 MB/s) was cut \
                 off by {ending} after {got} of {KEPT} replayed + {LIVE} live events ({bytes} \
                 bytes in {took:?}; the gateway held {held} bytes of the replay when live \
                 traffic began): the live events queued behind its large replay counted \
                 against max_pending_bytes",
                bytes as f64 / took.as_secs_f64() / 1e6
            ))
        }
    }
}

/// The library's shutdown (what SIGTERM triggers) while a client is mid-stream: the
/// client receives every event emitted before the shutdown, in order, then close 1001.
/// The client reads through a slow-reader socket and pauses, so when the shutdown
/// arrives most of the stream is still in the gateway's own queue, which the drain
/// must flush within `shutdown_grace_ms`.
#[test]
fn shutdown_mid_stream_delivers_everything_emitted_before_it_then_1001() {
    const EVENTS: u64 = 1000;
    const PAUSE_AFTER: u64 = 100;
    let mut cfg = config();
    cfg.shutdown_grace_ms = 8000;
    cfg.max_pending_bytes = 64 * 1024 * 1024;
    let mut gw = TestGateway::start(cfg, Agent::None);
    let stream = slow_reader_stream(gw.addr, 4096, Some(536));
    let (mut raw, _) = raw_upgrade(stream, gw.addr, "dl-shut", "/ws").expect("upgrade");
    let read = Arc::new(AtomicU64::new(0));
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    let reader = {
        let read = read.clone();
        std::thread::spawn(move || {
            let mut seqs = Vec::new();
            loop {
                if seqs.len() as u64 == PAUSE_AFTER {
                    // Mid-stream: the rest stays queued until the shutdown was asked.
                    go_rx.recv_timeout(WAIT).expect("go");
                }
                match raw.try_next(WAIT) {
                    RawNext::Frame(0x1, payload) => {
                        let v: serde_json::Value = serde_json::from_slice(&payload).expect("json");
                        seqs.push(v["seq"].as_u64().expect("an event"));
                        read.fetch_add(1, Ordering::Relaxed);
                    }
                    RawNext::Frame(0x8, p) => {
                        let code = u16::from_be_bytes([p[0], p[1]]);
                        let after = match raw.try_next(WAIT) {
                            RawNext::Eof(_) => "EOF",
                            _ => "no EOF",
                        };
                        return (seqs, format!("close {code}, then {after}"));
                    }
                    RawNext::Frame(_, _) => {}
                    other => return (seqs, format!("{other:?}")),
                }
            }
        })
    };
    let blob = "m".repeat(4096);
    let mut run = gw
        .emitter
        .run("dl-shut", None, "r-stream", "dl_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    for i in 1..EVENTS - 1 {
        run.emit("text_delta", &json!({"i": i, "blob": blob}))
            .expect("emit");
    }
    run.agent_completed(&json!({})).expect("emit");
    let s = gw.wait_stats("every event routed", |s| s["events"]["emitted"] == EVENTS);
    let queued = s["bytes"]["pending_out"].as_u64().unwrap_or(0);
    // What SIGTERM does: the loop begins draining.
    gw.emitter.shutdown().expect("shutdown requested");
    let read_at_shutdown = read.load(Ordering::Relaxed);
    go_tx.send(()).expect("reader waiting");
    let (result, took) = gw.shutdown_and_join(WAIT + Duration::from_secs(8));
    let (seqs, ending) = reader.join().expect("reader thread");
    eprintln!(
        "shutdown mid-stream: client had read {read_at_shutdown} of {EVENTS} events and \
         {queued} bytes were queued in the gateway when the shutdown was asked; it then got \
         {} in all and {ending}; the reactor ended after {took:?}",
        seqs.len()
    );
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(
        seqs.len() as u64,
        EVENTS,
        "every event emitted before the shutdown; {ending}"
    );
    assert!(
        seqs.iter().zip(1..).all(|(s, want)| *s == want),
        "in order without gaps"
    );
    assert_eq!(ending, "close 1001, then EOF");
}
