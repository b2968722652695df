//! Issue 9, rows F3 and F4: floods on an open WebSocket session. A connection that keeps
//! its socket full is read once per loop iteration (it was queued again on every edge,
//! so its share of each iteration grew for as long as the flood lasted); `refresh` is
//! checked at most once per second per connection and a refused one counts toward the
//! bad-message close; `user_message` is bounded per user (pending runs), fairly queued
//! across users when the workers' channel is full, and bounded in size.
//!
//! Bounds are asserted on structure (`client_messages.max_per_iteration`, busy counts,
//! held bytes from `/ws/stats`); latency bounds are generous backstops.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use agentwire::Inbound;
use serde_json::{json, Value};

use crate::support::*;

/// How long the ping flood runs: the effect it guards against built up over time.
const FLOOD: Duration = Duration::from_secs(11);

/// A session's read turn takes at most 64 messages (reactor `MESSAGES_PER_READ`).
const MESSAGES_PER_READ: u64 = 64;
/// A session's sustained input allowance (reactor `INPUT_US_PER_MESSAGE`) and burst
/// (`INPUT_BURST_US`), in messages.
const MESSAGES_PER_S: u64 = 1000;
const MESSAGES_BURST: u64 = 250;

/// Write `frame` back to back on `stream` until `stop`, draining the socket on
/// another thread so the gateway never sees a slow consumer. Returns the frames sent.
fn flood(stream: &TcpStream, frame: &[u8], stop: &AtomicBool) -> u64 {
    let mut reader = stream.try_clone().expect("clone attacker socket");
    reader
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let done = Arc::new(AtomicBool::new(false));
    let drain = {
        let done = done.clone();
        thread::spawn(move || {
            let mut sink = vec![0u8; 64 * 1024];
            while !done.load(Ordering::Acquire) {
                match reader.read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
        })
    };
    let per_write = 256;
    let batch: Vec<u8> = frame.repeat(per_write);
    let mut writer = stream.try_clone().expect("clone attacker socket");
    writer
        .set_write_timeout(Some(Duration::from_millis(500)))
        .expect("write timeout");
    let mut sent = 0u64;
    while !stop.load(Ordering::Acquire) {
        match writer.write_all(&batch) {
            Ok(()) => sent += per_write as u64,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    done.store(true, Ordering::Release);
    let _ = drain.join();
    sent
}

/// Emit an event to `user` every 10 ms until `stop`; the client measures each one's
/// delay from its `t` (ms since the epoch). Returns the sorted delays in ms.
fn measure_victim(gw: &TestGateway, user: &str, stop: &AtomicBool) -> Vec<u64> {
    let mut victim = gw.connect(user);
    let emitter = gw.emitter.clone();
    let user_owned = user.to_owned();
    let stop_emit = Arc::new(AtomicBool::new(false));
    let emit_thread = {
        let stop_emit = stop_emit.clone();
        thread::spawn(move || {
            let mut run = emitter
                .run(&user_owned, None, "r-victim", "victim_agent")
                .expect("run");
            let mut n = 0u64;
            while !stop_emit.load(Ordering::Acquire) {
                run.emit("text_delta", &json!({ "t": now_ms(), "n": n }))
                    .expect("emit");
                n += 1;
                thread::sleep(Duration::from_millis(10));
            }
            n
        })
    };
    let mut delays = Vec::new();
    while !stop.load(Ordering::Acquire) {
        match victim.next_frame(Duration::from_millis(500)) {
            Frame::Json(v) if v["type"] == "text_delta" => {
                let t = v["data"]["t"].as_u64().expect("t");
                delays.push(now_ms().saturating_sub(t));
            }
            Frame::Json(_) | Frame::Timeout => {}
            other => panic!("victim connection ended: {other:?}"),
        }
    }
    stop_emit.store(true, Ordering::Release);
    let emitted = emit_thread.join().expect("emitter thread");
    assert!(
        emitted > 100,
        "the victim's events kept flowing ({emitted})"
    );
    delays.sort_unstable();
    delays
}

fn p99(sorted: &[u64]) -> u64 {
    sorted
        .get(sorted.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or(0)
}

/// F3: one connection floods `{"type":"ping"}` for 11 s. Each loop iteration reads at
/// most one turn (64 messages) of it: `client_messages.max_per_iteration` stays within
/// two turns, where v1 grew without bound (2,637 to 77,344 per iteration in 34 s); the
/// session is paused once past its input allowance (1,000 messages a second), so the
/// messages handled stay within the allowance; another user's events keep arriving
/// promptly.
#[test]
fn redteam_f3_ping_flood_gets_one_read_turn_per_iteration() {
    let gw = TestGateway::plain();
    let started = Instant::now();
    let attacker = raw_connect(gw.addr, "rt-f3-attacker");
    let stop = Arc::new(AtomicBool::new(false));
    let attack = {
        let stop = stop.clone();
        let stream = attacker.stream.try_clone().expect("clone");
        thread::spawn(move || {
            let frame = client_frame(0x1, br#"{"type":"ping"}"#, true, true);
            flood(&stream, &frame, &stop)
        })
    };
    let watch = {
        let stop = stop.clone();
        thread::spawn(move || {
            thread::sleep(FLOOD);
            stop.store(true, Ordering::Release);
        })
    };
    let delays = measure_victim(&gw, "rt-f3-victim", &stop);
    watch.join().expect("timer");
    let sent = attack.join().expect("attacker");
    let elapsed_s = started.elapsed().as_secs() + 1;
    let s = gw.stats();
    let per_iteration = s["client_messages"]["max_per_iteration"]
        .as_u64()
        .expect("client_messages.max_per_iteration");
    let handled = s["client_messages"]["total"].as_u64().unwrap_or(0);
    eprintln!(
        "ping flood: {sent} sent, {handled} handled, max {per_iteration} per iteration, \
         victim p99 {} ms max {} ms over {} events, loop {}",
        p99(&delays),
        delays.last().copied().unwrap_or(0),
        delays.len(),
        s["loop"]["iteration_us"]
    );
    assert!(handled > 1_000, "the flood reached the gateway ({handled})");
    assert!(
        handled <= MESSAGES_PER_S * elapsed_s + MESSAGES_BURST + MESSAGES_PER_READ,
        "{handled} messages handled in {elapsed_s} s: over the input allowance"
    );
    assert!(
        s["client_messages"]["input_paused"].as_u64() > Some(0),
        "the flooder was paused: {s}"
    );
    assert!(
        per_iteration <= 2 * MESSAGES_PER_READ,
        "one iteration read {per_iteration} client messages: a flooding connection must \
         get one read turn per iteration"
    );
    assert!(!delays.is_empty(), "the victim received events");
    assert!(
        p99(&delays) < 500,
        "victim p99 {} ms during the flood",
        p99(&delays)
    );
}

/// F3: `refresh` with forged tokens. The first is checked (`invalid_token`), later ones
/// within a second are `rate_limited` without a check, even with a valid message in
/// between; every refused refresh counts toward the bad-message streak, so a flood of
/// them closes with 1008 after ten (v1: each was checked and reset the streak).
#[test]
fn redteam_f3_refresh_flood_is_rate_limited_and_closes_1008() {
    let gw = TestGateway::plain();
    let user = "rt-f3-refresh";
    let forged = token_alg(
        jsonwebtoken::Algorithm::HS256,
        "not-the-gateway-secret-0123456789",
        &json!({"sub": user, "exp": now_s() + 600}),
    );
    let refresh = json!({"type": "refresh", "token": forged});

    // Rate limited even when valid messages come in between.
    let mut c = gw.connect(user);
    c.send_json(&refresh);
    let v = c.expect_type("error");
    assert_eq!(v["code"], "invalid_token", "{v}");
    c.ping_pong();
    c.send_json(&refresh);
    let v = c.expect_type("error");
    assert_eq!(v["code"], "rate_limited", "{v}");
    c.ping_pong();

    // A flood: ten refused refreshes are answered, the eleventh closes with 1008.
    let mut f = gw.connect("rt-f3-refresh-flood");
    for _ in 0..40 {
        f.send_json(&refresh);
    }
    let before = f.expect_close(1008);
    let codes: Vec<&str> = before.iter().filter_map(|v| v["code"].as_str()).collect();
    assert_eq!(codes.len(), 10, "ten errors before the close: {before:?}");
    assert_eq!(codes.first(), Some(&"invalid_token"), "{codes:?}");
    assert!(
        codes.iter().skip(1).all(|c| *c == "rate_limited"),
        "{codes:?}"
    );
    let s = gw.wait_stats("the flood's close counted", |s| {
        s["connections"]["closed_by_reason"]["bad_messages"] == 1
    });
    // One on the first connection, nine answered and the closing one on the flood's.
    assert_eq!(s["client_messages"]["refresh_rate_limited"], 11, "{s}");
    c.ping_pong();
}

/// Send `n` user_messages (refs `p0`..) in one write and collect the `n` answers.
fn burst(c: &mut RawWs, prefix: &str, n: usize, text: &str) -> Vec<Value> {
    let mut bytes = Vec::new();
    for i in 0..n {
        let m = json!({"type": "user_message", "text": text, "ref": format!("{prefix}{i}")});
        bytes.extend(client_frame(0x1, m.to_string().as_bytes(), true, true));
    }
    c.send(&bytes);
    let mut answers = Vec::new();
    while answers.len() < n {
        match c.next_frame(WAIT) {
            Some((0x1, payload)) => {
                let v: Value = serde_json::from_slice(&payload).expect("json");
                if v["type"] == "ack" || v["type"] == "error" {
                    answers.push(v);
                }
            }
            Some(_) => {}
            None => panic!("connection ended after {} answers", answers.len()),
        }
    }
    answers
}

/// F4: a user floods `user_message` while no worker takes any: after
/// `max_pending_runs_per_user` (16) acks that user gets `busy` with its `ref`; another
/// user's message is acked; when the pending runs time out (run watchdog), the user
/// may send again. v1 acked 4,096 (the whole shared channel), then everyone got busy.
#[test]
fn redteam_f4_user_message_flood_is_busy_for_that_user_only() {
    let mut cfg = config();
    cfg.run_idle_timeout_ms = 1500;
    let mut gw = TestGateway::start(cfg, Agent::Test);
    let inbound = gw.inbound(); // held, never read: no worker starts a run
    let mut attacker = raw_connect(gw.addr, "rt-f4-attacker");
    let answers = burst(&mut attacker, "a", 200, "x");
    let acks = answers.iter().filter(|v| v["type"] == "ack").count();
    let busy: Vec<&Value> = answers.iter().filter(|v| v["code"] == "busy").collect();
    assert_eq!(acks, 16, "acks up to max_pending_runs_per_user");
    assert_eq!(busy.len(), 184, "the rest is busy: {:?}", answers.last());
    assert_eq!(busy.first().map(|v| v["ref"].clone()), Some(json!("a16")));
    let mut victim = gw.connect("rt-f4-victim");
    victim.user_message(None, "hello", "v0");
    let s = gw.stats();
    assert_eq!(s["client_messages"]["busy"], 184, "{s}");
    assert_eq!(inbound.len(), 17, "16 of the attacker's and the victim's");
    // The watchdog ends the pending runs; the attacker's bound frees up.
    let mut timed_out = 0;
    let deadline = Instant::now() + WAIT;
    while timed_out < 16 {
        assert!(
            Instant::now() < deadline,
            "pending runs timed out: {timed_out}"
        );
        if let Some((0x1, payload)) = attacker.next_frame(WAIT) {
            let v: Value = serde_json::from_slice(&payload).expect("json");
            if v["type"] == "agent_error" && v["data"]["reason"] == "run_timeout" {
                timed_out += 1;
            }
        }
    }
    let again = burst(&mut attacker, "b", 1, "x");
    assert_eq!(again[0]["type"], "ack", "{:?}", again);
}

/// F4: with the shared channel full (a large per-user bound lets one user fill it),
/// another user's message is acked, not `busy`, and reaches the worker ahead of the
/// flood's held rest: held messages are fed round-robin across users.
#[test]
fn redteam_f4_full_channel_is_shared_fairly() {
    let mut cfg = config();
    cfg.max_pending_runs_per_user = 10_000;
    let mut gw = TestGateway::start(cfg, Agent::Test);
    let inbound = gw.inbound();
    let capacity = agentwire::INBOUND_CAPACITY;
    let flood = capacity + 400;
    let mut attacker = raw_connect(gw.addr, "rt-f4-fill");
    let mut answers = Vec::new();
    for round in 0..(flood / 500 + 1) {
        let n = (flood - answers.len()).min(500);
        if n == 0 {
            break;
        }
        answers.extend(burst(&mut attacker, &format!("f{round}-"), n, "x"));
    }
    assert!(
        answers.iter().all(|v| v["type"] == "ack"),
        "the attacker's messages are all acked (held past the channel)"
    );
    let s = gw.stats();
    assert_eq!(s["inbound"]["held"], 400, "{s}");
    let mut victim = gw.connect("rt-f4-fair");
    victim.user_message(None, "me too", "v0");
    // The worker starts consuming: the victim's message comes out right after the
    // messages that were already in the channel, ahead of the attacker's held rest.
    let mut position = None;
    for i in 0..(flood + 1) {
        match inbound.recv_timeout(WAIT).expect("inbound message") {
            Inbound::UserMessage { user_id, .. } if user_id == "rt-f4-fair" => {
                position = Some(i);
                break;
            }
            _ => {}
        }
    }
    let position = position.expect("the victim's message reached the worker");
    assert!(
        position <= capacity + 2,
        "victim's message came out at {position}, behind the flood's held rest"
    );
}

/// F4: `user_message` text over `max_user_message_bytes` (32768) is refused with
/// `too_large` and its `ref`; the connection stays open and a message at the limit is
/// acked.
#[test]
fn redteam_f4_oversize_user_message_is_refused() {
    let mut gw = TestGateway::start(config(), Agent::Test);
    let _inbound = gw.inbound();
    let mut c = gw.connect("rt-f4-size");
    c.send_json(&json!({"type": "user_message", "text": "x".repeat(32 * 1024 + 1), "ref": "big"}));
    let v = c.expect_type("error");
    assert_eq!(v["code"], "too_large", "{v}");
    assert_eq!(v["ref"], "big", "{v}");
    c.ping_pong();
    c.user_message(None, &"x".repeat(32 * 1024), "limit");
}

/// Measurement, not a regression test (run it by name with `--ignored --nocapture`;
/// docs/SECURITY.md quotes it): F4 as the red team ran it. One user writes 4,500
/// `user_message`s of `RT_TEXT_BYTES` (default 32,000) as fast as the socket takes
/// them, for 10 s, to a worker that takes 1 s per message; reports the answers, the
/// gateway's resident growth (the whole test process), runs registered and another
/// user's answers to six `user_message`s.
#[test]
#[ignore]
fn redteam_f4_measure_slow_worker() {
    let text_bytes: usize = std::env::var("RT_TEXT_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32_000);
    let mut gw = TestGateway::start(config(), Agent::Test);
    let inbound = gw.inbound();
    let emitter = gw.emitter.clone();
    thread::spawn(move || {
        for msg in inbound.iter() {
            thread::sleep(Duration::from_secs(1));
            if let Inbound::UserMessage {
                user_id, run_id, ..
            } = msg
            {
                if let Ok(mut run) = emitter.run(&user_id, None, &run_id, "slow") {
                    let _ = run.agent_started(&json!({}));
                    let _ = run.agent_completed(&json!({}));
                }
            }
        }
    });
    let rss_before = rss_bytes();
    let mut attacker = raw_connect(gw.addr, "rt-f4-measure");
    let text = "x".repeat(text_bytes);
    let mut writer = attacker.stream.try_clone().expect("clone");
    writer
        .set_write_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut sent = 0;
            for i in 0..4500 {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let m = json!({"type": "user_message", "text": text, "ref": i});
                if writer
                    .write_all(&client_frame(0x1, m.to_string().as_bytes(), true, true))
                    .is_err()
                {
                    break;
                }
                sent += 1;
            }
            sent
        })
    };
    let started = Instant::now();
    let mut answers: std::collections::BTreeMap<String, u64> = Default::default();
    let mut peak = 0;
    while started.elapsed() < Duration::from_secs(10) {
        match attacker.try_next(Duration::from_millis(200)) {
            RawNext::Frame(0x1, p) => {
                let v: Value = serde_json::from_slice(&p).expect("json");
                let k = v["code"]
                    .as_str()
                    .unwrap_or(v["type"].as_str().unwrap_or("?"));
                *answers.entry(k.to_owned()).or_default() += 1;
            }
            RawNext::Frame(0x8, _) | RawNext::Eof(_) => {
                *answers.entry("closed".into()).or_default() += 1;
                break;
            }
            _ => {}
        }
        peak = peak.max(rss_bytes());
    }
    stop.store(true, Ordering::Release);
    let s = gw.stats();
    let mut victim = gw.connect("rt-f4-measure-victim");
    let mut victim_answers = Vec::new();
    for i in 0..6 {
        victim.send_json(&json!({"type": "user_message", "text": "hi", "ref": i}));
    }
    while victim_answers.len() < 6 {
        let v = victim.recv_json();
        if v["type"] == "ack" || v["type"] == "error" {
            victim_answers.push(v["code"].as_str().unwrap_or("ack").to_owned());
        }
    }
    let _ = attacker.stream.shutdown(std::net::Shutdown::Both);
    let sent = w.join().unwrap_or(0);
    eprintln!(
        "F4 measure ({text_bytes} B texts, 10 s): {sent} written, answers {answers:?}, RSS \
         +{} MiB (peak), runs registered {}, held {}, victim answers {victim_answers:?}",
        peak.saturating_sub(rss_before) / (1024 * 1024),
        s["runs"]["active"],
        s["inbound"]
    );
}
