//! Chaos test in the style of NATS's: nothing lost, nothing duplicated, nothing stuck
//! while connections are reset, dropped and stalled under steady traffic (PROTOCOL.md
//! sections 2 and 5).
//!
//! 20 users with 2 or 3 connection slots each. Several emitter threads publish
//! numbered events at a steady pace (each user's events come from one thread, so event
//! `n` of a user must carry seq `n`). Meanwhile a chaos thread picks slots at random
//! and drops their socket without a close frame (FIN), resets it (SO_LINGER 0, RST), or
//! stops reading it for a while. A slot whose connection ended (by chaos, or closed by
//! the gateway: 1013 for a stalled slow reader, 1001 for a missed heartbeat)
//! reconnects at once, resuming from the last event it saw (`last_seq` + `epoch`).
//! One slot per user reads through a slow-reader socket, so stalls there end in 1013.
//!
//! Every slot dedupes on (epoch, seq) with a bitset. At the end every slot catches up
//! and then: every seq of every user was received (by at least one slot, and in fact
//! by every slot, since each resumes exactly), except ranges a `resumed:false` gave up,
//! which are counted and reported; with a 4096-event replay buffer and the default
//! two-minute TTL there must be none. No slot received a seq twice, every connection's
//! seqs strictly increase starting right after its resume point, and no event of
//! another user arrived. Every wait has a deadline.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde_json::{json, Value};

use crate::support::{
    config, raw_upgrade, slow_reader_stream, Agent, RawNext, RawWs, TestGateway, WAIT,
};

const USERS: usize = 20;
const EMITTER_THREADS: usize = 4;
/// How long events are published for.
const RUN_FOR: Duration = Duration::from_secs(6);
/// Each emitter thread emits one event per user it owns every `PACE`.
const PACE: Duration = Duration::from_millis(10);
const EVENTS_PER_RUN: u64 = 10;
const PAD: usize = 1000;
/// The chaos thread acts on one random slot this often.
const CHAOS_EVERY: Duration = Duration::from_millis(25);
/// After the emitters stop, every slot must have caught up within this.
const CATCH_UP: Duration = Duration::from_secs(20);

/// A tiny xorshift generator: the seed is printed, so a run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

enum Chaos {
    /// Close the socket without a close frame (FIN).
    Drop,
    /// SO_LINGER 0, then close: the peer sees RST.
    Reset,
    /// Stop reading for this long.
    Stall(Duration),
}

struct Shared {
    addr: SocketAddr,
    epoch: String,
    /// Per user: the last seq it will get, once the emitters are done (else MAX).
    targets: Vec<AtomicU64>,
    /// Stalls end and every slot catches up.
    final_phase: AtomicBool,
    /// Slots that have caught up. They keep reading (and answering pings) until
    /// `release`, so none of them is closed for a missed heartbeat while others are
    /// still catching up or the final checks run.
    caught_up: AtomicUsize,
    release: AtomicBool,
    hard_deadline: Instant,
}

/// What one slot saw over all its connections.
#[derive(Default)]
struct SlotReport {
    label: String,
    seen: Vec<bool>,
    count: u64,
    last_seq: u64,
    duplicates: u64,
    /// Events that broke the order or skipped a seq on one connection.
    order_errors: Vec<String>,
    /// Events of another user, or not the event the user's emitter numbered.
    wrong_events: Vec<String>,
    connects: u64,
    resumed_true: u64,
    /// Seq ranges a `resumed:false` gave up.
    resumed_false: Vec<(u64, u64)>,
    close_codes: BTreeMap<u16, u64>,
    eofs: u64,
    drops: u64,
    resets: u64,
    stalls: u64,
    pings_answered: u64,
    connect_errors: Vec<String>,
    caught_up: bool,
    timed_out: bool,
    /// The connection left open at the end.
    conn: Option<RawWs>,
}

impl SlotReport {
    fn mark(&mut self, seq: u64) {
        let i = seq as usize;
        if self.seen.len() <= i {
            self.seen.resize(i + 1, false);
        }
        if self.seen[i] {
            self.duplicates += 1;
        } else {
            self.seen[i] = true;
            self.count += 1;
        }
    }
}

fn open_socket(addr: SocketAddr, slow: bool) -> Result<TcpStream, String> {
    if slow {
        return Ok(slow_reader_stream(addr, 1024, Some(536)));
    }
    let s = TcpStream::connect_timeout(&addr, WAIT).map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    Ok(s)
}

fn run_slot(
    shared: &Shared,
    user_index: usize,
    slot: usize,
    slow: bool,
    chaos: &Receiver<Chaos>,
) -> SlotReport {
    let user = format!("chaos-{user_index}");
    let mut r = SlotReport {
        label: format!(
            "{user}/slot{slot}{}",
            if slow { " (slow reader)" } else { "" }
        ),
        ..SlotReport::default()
    };
    let mut conn: Option<RawWs> = None;
    // The last seq of the current connection (strictly increasing, gap-free after
    // the resume point: every slot takes every event of its user).
    let mut conn_last = 0u64;
    let mut stalled_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let target = shared.targets[user_index].load(Ordering::Acquire);
        if !r.caught_up && target != u64::MAX && r.last_seq >= target && conn.is_some() {
            r.caught_up = true;
            shared.caught_up.fetch_add(1, Ordering::AcqRel);
        }
        if shared.release.load(Ordering::Acquire) {
            break;
        }
        if now > shared.hard_deadline {
            r.timed_out = true;
            break;
        }
        while let Ok(cmd) = chaos.try_recv() {
            match cmd {
                Chaos::Drop => {
                    if conn.take().is_some() {
                        r.drops += 1;
                    }
                }
                Chaos::Reset => {
                    if let Some(c) = conn.take() {
                        let _ = socket2::SockRef::from(&c.stream).set_linger(Some(Duration::ZERO));
                        r.resets += 1;
                    }
                }
                Chaos::Stall(d) => {
                    stalled_until = Some(now + d);
                    r.stalls += 1;
                }
            }
        }
        if let Some(until) = stalled_until {
            if now < until && !shared.final_phase.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            stalled_until = None;
        }
        let Some(c) = conn.as_mut() else {
            let path = format!("/ws?last_seq={}&epoch={}", r.last_seq, shared.epoch);
            let attempt = open_socket(shared.addr, slow)
                .and_then(|s| raw_upgrade(s, shared.addr, &user, &path));
            match attempt {
                Ok((raw, connected)) => {
                    r.connects += 1;
                    conn_last = r.last_seq;
                    if connected["epoch"] != shared.epoch.as_str() {
                        r.wrong_events
                            .push(format!("connected with another epoch: {connected}"));
                    }
                    match connected["resumed"].as_bool() {
                        Some(true) => r.resumed_true += 1,
                        _ => {
                            let upto = connected["last_seq"].as_u64().unwrap_or(0);
                            r.resumed_false.push((r.last_seq + 1, upto));
                            // The client reloads: it is current as of `last_seq`.
                            conn_last = upto;
                            for seq in r.last_seq + 1..=upto {
                                r.mark(seq);
                            }
                            r.last_seq = r.last_seq.max(upto);
                        }
                    }
                    conn = Some(raw);
                }
                Err(e) => {
                    r.connect_errors.push(e);
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            continue;
        };
        match c.try_next(Duration::from_millis(20)) {
            RawNext::Frame(0x1, payload) => {
                let v: Value = match serde_json::from_slice(&payload) {
                    Ok(v) => v,
                    Err(e) => {
                        r.wrong_events.push(format!("not JSON: {e}"));
                        continue;
                    }
                };
                let Some(seq) = v["seq"].as_u64() else {
                    r.wrong_events.push(format!("unexpected frame {v}"));
                    continue;
                };
                if v["user_id"] != user.as_str() || v["data"]["n"] != seq {
                    r.wrong_events.push(format!("seq {seq}: {}", truncate(&v)));
                }
                if seq != conn_last + 1 && r.order_errors.len() < 10 {
                    r.order_errors.push(format!(
                        "connection {}: seq {seq} after {conn_last}",
                        r.connects
                    ));
                }
                conn_last = seq;
                r.mark(seq);
                r.last_seq = r.last_seq.max(seq);
            }
            RawNext::Frame(0x9, payload) => {
                c.pong(&payload);
                r.pings_answered += 1;
            }
            RawNext::Frame(0x8, payload) => {
                let code = match payload.as_slice() {
                    [a, b, ..] => u16::from_be_bytes([*a, *b]),
                    _ => 1005,
                };
                *r.close_codes.entry(code).or_default() += 1;
                conn = None;
            }
            RawNext::Frame(_, _) | RawNext::Timeout => {}
            RawNext::Eof(_) => {
                r.eofs += 1;
                conn = None;
            }
        }
    }
    r.conn = conn;
    r
}

fn truncate(v: &Value) -> String {
    let s = v.to_string();
    s.chars().take(200).collect()
}

/// One emitter thread: events for `users`, one per user every `PACE`, in runs of
/// `EVENTS_PER_RUN`; returns how many events each user got.
fn emit_steadily(gw_emitter: agentwire::Emitter, users: Vec<usize>, until: Instant) -> Vec<u64> {
    let pad = "c".repeat(PAD);
    let mut counts = vec![0u64; users.len()];
    let mut runs: Vec<Option<agentwire::RunHandle>> = users.iter().map(|_| None).collect();
    let mut next_tick = Instant::now();
    while Instant::now() < until {
        for (k, &u) in users.iter().enumerate() {
            let n = counts[k] + 1;
            let run = runs[k].get_or_insert_with(|| {
                gw_emitter
                    .run(
                        &format!("chaos-{u}"),
                        None,
                        &format!("r-{u}-{n}"),
                        "chaos_agent",
                    )
                    .expect("run")
            });
            let data = json!({"n": n, "pad": pad});
            let res = if n % EVENTS_PER_RUN == 1 {
                run.agent_started(&data)
            } else if n.is_multiple_of(EVENTS_PER_RUN) {
                run.agent_completed(&data)
            } else {
                run.emit("text_delta", &data)
            };
            res.unwrap_or_else(|e| panic!("emit for chaos-{u}: {e}"));
            counts[k] = n;
            if n.is_multiple_of(EVENTS_PER_RUN) {
                runs[k] = None;
            }
        }
        next_tick += PACE;
        if let Some(wait) = next_tick.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    for (k, run) in runs.iter_mut().enumerate() {
        if let Some(run) = run.as_mut() {
            let n = counts[k] + 1;
            run.agent_completed(&json!({"n": n, "pad": pad}))
                .expect("emit");
            counts[k] = n;
        }
    }
    counts
}

#[test]
fn nothing_lost_nothing_duplicated_under_resets_and_stalls() {
    let seed: u64 = std::env::var("AGENTWIRE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(7, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("chaos: seed {seed} (rerun with AGENTWIRE_CHAOS_SEED={seed})");
    let mut cfg = config();
    cfg.replay_events = 4096;
    cfg.replay_bytes_per_user = 64 << 20;
    cfg.max_pending_bytes = 16 * 1024;
    cfg.max_connections_per_user = 10;
    cfg.heartbeat_interval_ms = 500;
    cfg.heartbeat_timeout_ms = 2500;
    let gw = TestGateway::start(cfg, Agent::None);
    let started = Instant::now();
    let shared = Arc::new(Shared {
        addr: gw.addr,
        epoch: gw.epoch.clone(),
        targets: (0..USERS).map(|_| AtomicU64::new(u64::MAX)).collect(),
        final_phase: AtomicBool::new(false),
        caught_up: AtomicUsize::new(0),
        release: AtomicBool::new(false),
        hard_deadline: started + RUN_FOR + CATCH_UP + Duration::from_secs(5),
    });

    // Slots: user u has 2 or 3; slot 1 of each user is a slow reader.
    let mut senders: Vec<Sender<Chaos>> = Vec::new();
    let mut slots = Vec::new();
    for u in 0..USERS {
        for slot in 0..(2 + u % 2) {
            let (tx, rx) = crossbeam_channel::unbounded();
            senders.push(tx);
            let shared = shared.clone();
            slots.push(std::thread::spawn(move || {
                run_slot(&shared, u, slot, slot == 1, &rx)
            }));
        }
    }
    let slot_count = slots.len();
    gw.wait_open(slot_count as u64);

    let until = Instant::now() + RUN_FOR;
    let emitters: Vec<_> = (0..EMITTER_THREADS)
        .map(|t| {
            let users: Vec<usize> = (t..USERS).step_by(EMITTER_THREADS).collect();
            let emitter = gw.emitter.clone();
            std::thread::spawn(move || (users.clone(), emit_steadily(emitter, users, until)))
        })
        .collect();

    let stop_chaos = Arc::new(AtomicBool::new(false));
    let chaos = {
        let stop = stop_chaos.clone();
        std::thread::spawn(move || {
            let mut rng = Rng(seed);
            let mut actions = [0u64; 3];
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(CHAOS_EVERY);
                let slot = rng.below(senders.len() as u64) as usize;
                let (kind, cmd) = match rng.below(3) {
                    0 => (0, Chaos::Drop),
                    1 => (1, Chaos::Reset),
                    _ => (
                        2,
                        Chaos::Stall(Duration::from_millis(100 + rng.below(1400))),
                    ),
                };
                actions[kind] += 1;
                let _ = senders[slot].send(cmd);
            }
            actions
        })
    };

    let mut total = 0u64;
    for e in emitters {
        let (users, counts) = e.join().expect("emitter thread");
        for (u, n) in users.into_iter().zip(counts) {
            total += n;
            shared.targets[u].store(n, Ordering::Release);
        }
    }
    stop_chaos.store(true, Ordering::Release);
    let actions = chaos.join().expect("chaos thread");
    shared.final_phase.store(true, Ordering::Release);
    let published_in = started.elapsed();
    gw.wait_stats("every event routed", |s| s["events"]["emitted"] == total);

    while shared.caught_up.load(Ordering::Acquire) < slot_count
        && Instant::now() < shared.hard_deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let caught_up_in = started.elapsed();
    let all_caught_up = shared.caught_up.load(Ordering::Acquire) == slot_count;
    let stats = if all_caught_up {
        gw.wait_stats("every slot connected", |s| {
            s["connections"]["open"] == slot_count && s["users"]["online"] == USERS
        })
    } else {
        gw.stats()
    };
    shared.release.store(true, Ordering::Release);
    let mut reports: Vec<SlotReport> = slots
        .into_iter()
        .map(|h| h.join().expect("slot thread"))
        .collect();

    // Accounting.
    let mut problems: Vec<String> = Vec::new();
    let mut resumed_false = 0usize;
    let mut gave_up = 0u64;
    let mut client_codes: BTreeMap<u16, u64> = BTreeMap::new();
    let (mut connects, mut drops, mut resets, mut stalls, mut eofs, mut pings) = (0, 0, 0, 0, 0, 0);
    for r in &reports {
        connects += r.connects;
        drops += r.drops;
        resets += r.resets;
        stalls += r.stalls;
        eofs += r.eofs;
        pings += r.pings_answered;
        for (code, n) in &r.close_codes {
            *client_codes.entry(*code).or_default() += n;
        }
        resumed_false += r.resumed_false.len();
        gave_up += r
            .resumed_false
            .iter()
            .map(|(a, b)| (b + 1).saturating_sub(*a))
            .sum::<u64>();
        if r.timed_out || !r.caught_up {
            problems.push(format!(
                "{}: did not catch up within the deadline (last seq {}, {} received)",
                r.label, r.last_seq, r.count
            ));
        }
        if r.duplicates > 0 {
            problems.push(format!("{}: {} duplicate events", r.label, r.duplicates));
        }
        for e in r.order_errors.iter().chain(r.wrong_events.iter()) {
            problems.push(format!("{}: {e}", r.label));
        }
        for (a, b) in &r.resumed_false {
            problems.push(format!(
                "{}: resumed:false, seqs {a}..={b} given up",
                r.label
            ));
        }
        if !r.connect_errors.is_empty() {
            problems.push(format!(
                "{}: {} failed connects, first: {}",
                r.label,
                r.connect_errors.len(),
                r.connect_errors[0]
            ));
        }
    }
    // Per user: every seq seen by at least one slot (outside given-up ranges), and by
    // every slot (each resumes exactly).
    for u in 0..USERS {
        let target = shared.targets[u].load(Ordering::Acquire);
        let mine: Vec<&SlotReport> = reports
            .iter()
            .filter(|r| r.label.starts_with(&format!("chaos-{u}/")))
            .collect();
        let given_up = |seq: u64| {
            mine.iter().any(|r| {
                r.resumed_false
                    .iter()
                    .any(|(a, b)| (*a..=*b).contains(&seq))
            })
        };
        let missing: Vec<u64> = (1..=target)
            .filter(|&seq| !mine.iter().any(|r| r.seen.get(seq as usize) == Some(&true)))
            .filter(|&seq| !given_up(seq))
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "chaos-{u}: {} of {target} seqs reached no connection: {:?}",
                missing.len(),
                &missing[..missing.len().min(20)]
            ));
        }
        for r in &mine {
            let beyond = r.seen.len() as u64 > target + 1;
            if r.count != target || beyond {
                problems.push(format!(
                    "{}: has {} distinct seqs, the user has {target}",
                    r.label, r.count
                ));
            }
        }
    }
    eprintln!(
        "chaos: {slot_count} slots, {total} events published in {published_in:?}, all caught \
         up after {caught_up_in:?}; chaos actions drop/reset/stall {actions:?} (applied to a \
         live connection: {drops} drops, {resets} resets; {stalls} stalls); {connects} \
         connects; resumed:false {resumed_false} ({gave_up} seqs given up); gateway closes \
         seen by clients {client_codes:?}, EOFs {eofs}; pings answered {pings}; gateway \
         closed_by_reason {}; replayed {}",
        stats["connections"]["closed_by_reason"], stats["events"]["replayed"]
    );
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert_eq!(resumed_false, 0, "every prompt resume must be exact");
    assert_eq!(stats["events"]["emitted"], total, "{stats}");
    drop(reports.drain(..));
}
