//! Hostile WebSocket frames (RFC 6455 section 5, PROTOCOL.md section 4,
//! docs/HOSTILE.md): reserved opcodes, oversized and fragmented control frames, close
//! frames with invalid codes or reasons, broken fragmentation and UTF-8 across
//! fragments, a length field announcing 2^63 bytes on 1,000 connections (1009, with
//! the process's resident memory bounded), a million one-byte continuation frames, a
//! message never finished, and a ping flood (memory flat, another user's events still
//! prompt). Unmasked frames, invalid UTF-8 in one frame and an orphan continuation are
//! covered in `session.rs`.
//!
//! Memory and time figures are measured and printed; the assertions are gross bounds
//! (the machine is shared and the gateway runs in this very process with the other
//! tests, whose allocations are in the same resident set).

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{
    client_frame, config, log_capture, raw_connect, rss_bytes, Agent, RawNext, RawWs, TestGateway,
    WAIT,
};

const MIB: u64 = 1024 * 1024;
/// Resident-memory growth allowed for a whole hostile scenario.
const RSS_BOUND: u64 = 50 * MIB;

/// Tests that measure this process's resident memory run one at a time, so at least
/// they do not count each other's allocations.
static MEMORY_TESTS: Mutex<()> = Mutex::new(());

/// A raw session of `user` with the `connected` frame already read.
fn open(gw: &TestGateway, user: &str) -> RawWs {
    let mut raw = raw_connect(gw.addr, user);
    let (op, payload) = raw.next_frame(WAIT).expect("connected frame");
    assert_eq!(op, 0x1);
    let v: serde_json::Value = serde_json::from_slice(&payload).expect("connected is JSON");
    assert_eq!(v["type"], "connected", "{v}");
    raw
}

/// Send `bytes` on a fresh session and return the close code the gateway sends, or
/// what happened instead (no close within 3 s, the socket ended without one).
fn close_code_for(gw: &TestGateway, user: &str, bytes: &[u8]) -> Result<u16, String> {
    let mut raw = open(gw, user);
    raw.send(bytes);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut seen = Vec::new();
    loop {
        match raw.try_next(deadline.saturating_duration_since(Instant::now())) {
            RawNext::Frame(0x8, p) if p.len() >= 2 => return Ok(u16::from_be_bytes([p[0], p[1]])),
            RawNext::Frame(op, p) => seen.push(format!("opcode {op:#x} ({} bytes)", p.len())),
            other => return Err(format!("no close frame: {other:?} after {seen:?}")),
        }
    }
}

/// The next text frame as JSON, answering pings on the way; panics on anything else.
fn next_json(raw: &mut RawWs, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        match raw.try_next(deadline.saturating_duration_since(Instant::now())) {
            RawNext::Frame(0x1, p) => return serde_json::from_slice(&p).expect("JSON text"),
            RawNext::Frame(0x9, p) => raw.pong(&p),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Every way a frame can break RFC 6455's framing rules, each on its own connection,
/// with the close code the gateway answers.
#[test]
fn hostile_frame_matrix_closes_with_the_rfc_code() {
    let gw = TestGateway::plain();
    let text = |p: &[u8], fin: bool| client_frame(0x1, p, fin, true);
    let cont = |p: &[u8], fin: bool| client_frame(0x0, p, fin, true);
    let close = |p: &[u8]| client_frame(0x8, p, true, true);
    let close_code = |c: u16| close(&c.to_be_bytes());
    let mut cases: Vec<(String, Vec<u8>, u16)> = Vec::new();
    for op in [0x3u8, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF] {
        cases.push((
            format!("reserved opcode {op:#x}"),
            client_frame(op, b"x", true, true),
            1002,
        ));
    }
    cases.extend([
        (
            "ping of 126 bytes".into(),
            client_frame(0x9, &[b'p'; 126], true, true),
            1002,
        ),
        (
            "pong of 126 bytes".into(),
            client_frame(0xA, &[b'p'; 126], true, true),
            1002,
        ),
        ("close of 126 bytes".into(), close(&[b'c'; 126]), 1002),
        (
            "fragmented ping (FIN clear)".into(),
            client_frame(0x9, b"p", false, true),
            1002,
        ),
        (
            "fragmented close (FIN clear)".into(),
            client_frame(0x8, &1000u16.to_be_bytes(), false, true),
            1002,
        ),
        ("close with a 1-byte payload".into(), close(&[0x03]), 1002),
        (
            "close reason not UTF-8".into(),
            close(&[0x03, 0xE8, 0xFF, 0xFE]),
            1007,
        ),
        (
            "a new text frame inside a fragmented message".into(),
            [text(br#"{"type":"#, false), text(br#""ping"}"#, true)].concat(),
            1002,
        ),
        (
            "a binary frame inside a fragmented text message".into(),
            [
                text(br#"{"type":"#, false),
                client_frame(0x2, b"x", true, true),
            ]
            .concat(),
            1002,
        ),
        (
            "invalid UTF-8 in a continuation frame".into(),
            [text(br#"{"type":""#, false), cont(b"\xC3\x28\"}", true)].concat(),
            1007,
        ),
        (
            "a message ending inside a UTF-8 sequence".into(),
            [
                text(br#"{"type":"ping","x":""#, false),
                cont(b"\"}\xE2\x82", true),
            ]
            .concat(),
            1007,
        ),
        (
            "overlong UTF-8 encoding".into(),
            text(b"{\"type\":\"\xC0\xAF\"}", true),
            1007,
        ),
        (
            "UTF-16 surrogate encoded in UTF-8".into(),
            text(b"{\"type\":\"\xED\xA0\x80\"}", true),
            1007,
        ),
    ]);
    for code in [
        0u16, 999, 1004, 1005, 1006, 1014, 1015, 1016, 2000, 2999, 5000, 65535,
    ] {
        cases.push((format!("close code {code}"), close_code(code), 1002));
    }
    // Valid codes are echoed (a normal close, not a violation).
    for code in [1000u16, 1001, 1003, 1007, 1011, 3000, 3999, 4000, 4999] {
        cases.push((
            format!("valid close code {code} is echoed"),
            close_code(code),
            code,
        ));
    }
    let mut failures = Vec::new();
    for (i, (name, bytes, want)) in cases.iter().enumerate() {
        match close_code_for(&gw, &format!("fr-matrix-{i}"), bytes) {
            Ok(got) if got == *want => {}
            Ok(got) => failures.push(format!("{name}: expected close {want}, got {got}")),
            Err(e) => failures.push(format!("{name}: expected close {want}, {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} frame cases answered wrongly:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    gw.wait_open(0);
    log_capture::assert_clean();
}

/// The valid counterparts: a code point split across fragments, control frames of
/// exactly 125 bytes, and a ping between the fragments of a message are all fine. A
/// ping whose 5-byte length is written in the 16-bit form (RFC 6455 asks senders for
/// the minimal form but names no receiver action; tungstenite accepts it, and the
/// length is still within the control-frame limit) is answered like any ping.
#[test]
fn hostile_frame_edge_cases_that_are_valid() {
    let gw = TestGateway::plain();
    let mut raw = open(&gw, "fr-valid-length");
    let mut f = vec![0x89, 0x80 | 126, 0, 5, 1, 2, 3, 4];
    f.extend([b'h' ^ 1, b'e' ^ 2, b'l' ^ 3, b'l' ^ 4, b'o' ^ 1]);
    raw.send(&f);
    assert_eq!(raw.next_frame(WAIT), Some((0xA, b"hello".to_vec())));

    let mut raw = open(&gw, "fr-valid");
    let mut bytes = client_frame(0x1, b"{\"type\":\"ping\",\"x\":\"\xE2", false, true);
    bytes.extend(client_frame(0x9, &[b'p'; 125], true, true));
    bytes.extend(client_frame(0x0, b"\x82", false, true));
    bytes.extend(client_frame(0xA, &[b'q'; 125], true, true));
    bytes.extend(client_frame(0x0, b"\xAC\"}", true, true));
    raw.send(&bytes);
    // The 125-byte ping is answered with a 125-byte pong, then the message (with its
    // euro sign reassembled) gets its pong.
    let (op, payload) = raw.next_frame(WAIT).expect("pong");
    assert_eq!((op, payload.len()), (0xA, 125));
    let v = next_json(&mut raw, WAIT);
    assert_eq!(v["type"], "pong", "{v}");
    log_capture::assert_clean();
}

/// 1,000 connections each send a frame header announcing 2^63 (half of them 2^63 - 1)
/// bytes and nothing more: every one is closed with 1009 at once, and the process's
/// resident memory grows by less than [`RSS_BOUND`] (a gateway that reserved the
/// announced length would abort or use gigabytes).
#[test]
fn hostile_frame_announcing_2_63_bytes_is_1009_without_allocating() {
    let _serial = MEMORY_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    const CONNS: usize = 1000;
    let gw = TestGateway::plain();
    let mut conns: Vec<RawWs> = (0..CONNS)
        .map(|i| open(&gw, &format!("fr-huge-{i}")))
        .collect();
    gw.wait_open(CONNS as u64);
    let rss_before = rss_bytes();
    let started = Instant::now();
    for (i, raw) in conns.iter_mut().enumerate() {
        let len: u64 = if i % 2 == 0 { 1 << 63 } else { (1 << 63) - 1 };
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&len.to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        header.extend_from_slice(b"{\"ty"); // a few payload bytes, then silence
        raw.send(&header);
    }
    let mut codes = std::collections::BTreeMap::new();
    for raw in conns.iter_mut() {
        *codes.entry(raw.expect_close(WAIT)).or_insert(0usize) += 1;
    }
    let took = started.elapsed();
    let rss_after = rss_bytes();
    let growth = rss_after.saturating_sub(rss_before);
    eprintln!(
        "2^63-byte headers on {CONNS} connections: close codes {codes:?} within {took:?}; \
         RSS {} -> {} MiB (+{} KiB)",
        rss_before / MIB,
        rss_after / MIB,
        growth / 1024
    );
    assert_eq!(codes.get(&1009), Some(&CONNS), "close codes {codes:?}");
    assert!(
        growth < RSS_BOUND,
        "resident memory grew by {} MiB",
        growth / MIB
    );
    gw.wait_open(0);
    let s = gw.stats();
    assert_eq!(
        s["connections"]["closed_by_reason"]["message_too_big"], CONNS,
        "{s}"
    );
    log_capture::assert_clean();
}

/// Write `frames` from a thread as fast as the socket takes them; returns how many
/// bytes were written before the gateway stopped reading (an error ends the thread).
fn blast(stream: &TcpStream, bytes: Vec<u8>) -> std::thread::JoinHandle<usize> {
    let mut w = stream.try_clone().expect("clone");
    std::thread::spawn(move || {
        let mut sent = 0;
        for chunk in bytes.chunks(64 * 1024) {
            if w.write_all(chunk).is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    })
}

/// The frames of one text message made of `n` one-byte fragments: `{` then `n - 1`
/// continuation frames, the last with FIN. `fill` is the byte of the middle fragments;
/// the message text is `head` + fill... + `tail`, each piece one byte per frame.
fn one_byte_fragments(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() * 7);
    for (i, b) in text.iter().enumerate() {
        let op = if i == 0 { 0x1 } else { 0x0 };
        out.extend(client_frame(
            op,
            std::slice::from_ref(b),
            i + 1 == text.len(),
            true,
        ));
    }
    out
}

/// Another user's events, emitted every 20 ms from a worker thread while `during`
/// runs, and their emit-to-receive latencies.
fn latencies_while(gw: &TestGateway, user: &str, during: impl FnOnce()) -> Vec<Duration> {
    let mut victim = gw.connect(user);
    let stop = Arc::new(AtomicBool::new(false));
    let base = Instant::now();
    let emitter = gw.emitter.clone();
    let (stop2, user2) = (stop.clone(), user.to_owned());
    let worker = std::thread::spawn(move || {
        let mut run = emitter
            .run(&user2, None, "r-victim", "victim_agent")
            .expect("run");
        let mut n = 0u64;
        while !stop2.load(Ordering::Acquire) {
            let t_us = base.elapsed().as_micros() as u64;
            run.emit("text_delta", &json!({ "t_us": t_us }))
                .expect("emit");
            n += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        run.agent_completed(&json!({})).expect("emit");
        n
    });
    let reader = std::thread::spawn(move || {
        let mut lat = Vec::new();
        loop {
            let v = victim.recv_json_within(Duration::from_secs(30));
            if v["type"] == "agent_completed" {
                return lat;
            }
            let sent = Duration::from_micros(v["data"]["t_us"].as_u64().expect("t_us"));
            lat.push(base.elapsed().saturating_sub(sent));
        }
    });
    during();
    stop.store(true, Ordering::Release);
    let emitted = worker.join().expect("worker");
    let lat = reader.join().expect("victim reader");
    assert_eq!(
        lat.len() as u64,
        emitted,
        "every event of the other user arrived"
    );
    lat
}

fn summary(lat: &[Duration]) -> (Duration, Duration) {
    let mut v = lat.to_vec();
    v.sort();
    let p50 = v.get(v.len() / 2).copied().unwrap_or_default();
    let max = v.last().copied().unwrap_or_default();
    (p50, max)
}

/// A million one-byte continuation frames. With the default `max_message_bytes`
/// (64 KiB) the message is cut with 1009 once the reassembled text passes it; with a
/// limit above the message (2 MiB) the million frames assemble into one valid `ping`,
/// answered with a `pong`. Both within a bounded time, with resident memory bounded,
/// and another user's events keep arriving meanwhile.
#[test]
fn hostile_a_million_one_byte_continuation_frames() {
    let _serial = MEMORY_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    const FRAMES: usize = 1_000_000;
    let pad = FRAMES - r#"{"type":"ping","pad":""}"#.len();
    let text = format!(r#"{{"type":"ping","pad":"{}"}}"#, " ".repeat(pad));
    assert_eq!(text.len(), FRAMES);
    let wire = one_byte_fragments(text.as_bytes());

    // Default limit: 1009.
    let gw = TestGateway::plain();
    let rss_before = rss_bytes();
    let mut raw = open(&gw, "fr-million-default");
    let started = Instant::now();
    let writer = blast(&raw.stream, wire.clone());
    let code = raw.expect_close(Duration::from_secs(60));
    let took = started.elapsed();
    let _ = raw.stream.shutdown(std::net::Shutdown::Both);
    let sent = writer.join().expect("writer");
    let growth = rss_bytes().saturating_sub(rss_before);
    eprintln!(
        "1M one-byte fragments, 64 KiB limit: close {code} after {took:?} ({sent} bytes \
         written); RSS +{} KiB",
        growth / 1024
    );
    assert_eq!(code, 1009);
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(
        growth < RSS_BOUND,
        "resident memory grew by {} MiB",
        growth / MIB
    );
    drop(gw);

    // A 2 MiB limit: the million fragments are one valid message.
    let mut cfg = config();
    cfg.max_message_bytes = 2 * MIB as usize;
    let gw = TestGateway::start(cfg, Agent::None);
    let rss_before = rss_bytes();
    let mut raw = open(&gw, "fr-million-big");
    let mut outcome = None;
    let lat = latencies_while(&gw, "fr-million-victim", || {
        let started = Instant::now();
        let writer = blast(&raw.stream, wire);
        let v = next_json(&mut raw, Duration::from_secs(120));
        outcome = Some((v, started.elapsed()));
        writer.join().expect("writer");
    });
    let (v, took) = outcome.expect("ran");
    let growth = rss_bytes().saturating_sub(rss_before);
    let (p50, max) = summary(&lat);
    eprintln!(
        "1M one-byte fragments, 2 MiB limit: {} after {took:?}; RSS +{} KiB; other \
         user's {} events: p50 {p50:?} max {max:?}",
        v["type"],
        growth / 1024,
        lat.len()
    );
    assert_eq!(v["type"], "pong", "{v}");
    assert!(took < Duration::from_secs(90), "took {took:?}");
    assert!(
        growth < RSS_BOUND,
        "resident memory grew by {} MiB",
        growth / MIB
    );
    assert!(
        max < Duration::from_secs(2),
        "another user's event waited {max:?}"
    );
    log_capture::assert_clean();
}

/// A message whose last fragment never comes. From a silent peer: closed with 1001 at
/// the heartbeat timeout and freed. From a peer that answers pings: kept (the partial
/// message is bounded by `max_message_bytes`), its events still delivered, and the
/// message completes when the last fragment finally arrives.
#[test]
fn hostile_a_message_never_finished() {
    let mut cfg = config();
    cfg.heartbeat_interval_ms = 100;
    cfg.heartbeat_timeout_ms = 400;
    let gw = TestGateway::start(cfg, Agent::None);

    let mut silent = open(&gw, "fr-unfinished-silent");
    silent.send(&client_frame(0x1, br#"{"type":"#, false, true));
    let started = Instant::now();
    assert_eq!(silent.expect_close(WAIT), 1001);
    let took = started.elapsed();
    eprintln!("unfinished message from a silent peer: closed 1001 after {took:?}");
    assert!(took >= Duration::from_millis(300), "closed early: {took:?}");
    assert!(took < Duration::from_secs(5), "closed late: {took:?}");

    let user = "fr-unfinished-alive";
    let mut alive = open(&gw, user);
    alive.send(&client_frame(0x1, br#"{"type":"#, false, true));
    let until = Instant::now() + Duration::from_millis(1200);
    let mut pings = 0;
    while Instant::now() < until {
        match alive.try_next(until.saturating_duration_since(Instant::now())) {
            RawNext::Frame(0x9, p) => {
                pings += 1;
                alive.pong(&p);
            }
            RawNext::Timeout => break,
            other => panic!("the live peer got {other:?}"),
        }
    }
    assert!(
        pings >= 3,
        "pinged through three heartbeat timeouts: {pings}"
    );
    let mut run = gw
        .emitter
        .run(user, None, "r-unfinished", "a")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    assert_eq!(next_json(&mut alive, WAIT)["type"], "agent_started");
    alive.send(&client_frame(0x0, br#""ping"}"#, true, true));
    assert_eq!(next_json(&mut alive, WAIT)["type"], "pong");
    run.agent_completed(&json!({})).expect("emit");
    let s = gw.stats();
    assert_eq!(
        s["connections"]["closed_by_reason"]["heartbeat_timeout"], 1,
        "{s}"
    );
    log_capture::assert_clean();
}

/// A client floods pings (and never reads its pongs) for two seconds: the process's
/// resident memory stays within [`RSS_BOUND`] and another user's events keep arriving
/// promptly; the flooder ends up either still open or closed with 1013 (its unread
/// pongs passed `max_pending_bytes`), never taking the gateway down.
#[test]
fn hostile_ping_flood() {
    let _serial = MEMORY_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let gw = TestGateway::plain();
    let mut flooder = open(&gw, "fr-flood");
    let rss_before = rss_bytes();
    let ping = client_frame(0x9, b"flood", true, true);
    let burst: Vec<u8> = ping.repeat(4096);
    let mut written = 0usize;
    let baseline = latencies_while(&gw, "fr-flood-victim-0", || {
        std::thread::sleep(Duration::from_millis(500));
    });
    let lat = latencies_while(&gw, "fr-flood-victim", || {
        let mut w = flooder.stream.try_clone().expect("clone");
        w.set_write_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let until = Instant::now() + Duration::from_secs(2);
        // Whole frames only: a partial write continues where it stopped.
        let mut at = 0;
        while Instant::now() < until {
            match w.write(&burst[at..]) {
                Ok(n) => {
                    written += n;
                    at = (at + n) % burst.len();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
    });
    let growth = rss_bytes().saturating_sub(rss_before);
    let (b50, bmax) = summary(&baseline);
    let (p50, max) = summary(&lat);
    // What became of the flooder: read what the gateway sent it.
    let mut pongs = 0u64;
    let mut ending = "still open".to_owned();
    loop {
        match flooder.try_next(Duration::from_millis(500)) {
            RawNext::Frame(0xA, _) => pongs += 1,
            RawNext::Frame(0x9, _) | RawNext::Frame(0x1, _) => {}
            RawNext::Frame(0x8, p) => {
                ending = format!("closed {}", u16::from_be_bytes([p[0], p[1]]));
                break;
            }
            RawNext::Frame(op, _) => panic!("opcode {op}"),
            RawNext::Eof(e) => {
                ending = format!("ended: {e}");
                break;
            }
            RawNext::Timeout => break,
        }
    }
    eprintln!(
        "ping flood: {} MB of pings ({} pings) in 2 s; flooder got {pongs} pongs, {ending}; \
         RSS +{} KiB; other user's events: baseline p50 {b50:?} max {bmax:?}, during \
         the flood p50 {p50:?} max {max:?} ({} events)",
        written / 1_000_000,
        written / ping.len(),
        growth / 1024,
        lat.len()
    );
    assert!(
        ending == "still open" || ending == "closed 1013",
        "the flooder {ending}"
    );
    assert!(
        growth < RSS_BOUND,
        "resident memory grew by {} MiB",
        growth / MIB
    );
    assert!(
        max < Duration::from_secs(1),
        "another user's event waited {max:?}"
    );
    assert!(
        lat.len() >= 50,
        "the other user got {} events in 2 s",
        lat.len()
    );
    let (status, _) = crate::support::get_json(gw.addr, "/health");
    assert_eq!(status, 200);
    log_capture::assert_clean();
}
