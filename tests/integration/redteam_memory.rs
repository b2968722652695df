//! Issue 9, rows F5-F7: the memory engine's state stays bounded under attack.
//!
//! - F5: a publisher creating runs that never end is refused past
//!   `max_active_runs_per_user` / `max_active_runs` (429 `too_many_runs`, the emitter's
//!   `EmitError::TooManyRuns`); the `connected` frame lists at most 100 runs and says
//!   it is truncated; the run watchdog ends at most 1,000 runs per housekeeping tick.
//! - F6: kept events are bounded per user (`replay_bytes_per_user`) and in total
//!   (`replay_memory_bytes`, oldest first across users); kept events expire after
//!   `replay_ttl_ms` also for a user who stays online.
//! - F7: idle users are forgotten (a flood of distinct user ids stays within the
//!   budget and drains after the TTL); a forgotten user seen again starts over in a new
//!   epoch, so a resume with the old epoch gets `resumed:false`.
//!
//! The floods run for 10 s each (the issue asks for at least that where an effect
//! builds up); every wait has a deadline. Bounds are read from `/ws/stats`.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{
    config, connect, connect_path, get, metric, prometheus, pub_event, publish, Agent, TestGateway,
    WAIT,
};

/// How long each flood runs.
const ATTACK: Duration = Duration::from_secs(10);

/// `agent_started` events of `n` new runs of `user`, ids from `first`.
fn new_runs(user: &str, first: usize, n: usize) -> Value {
    Value::Array(
        (first..first + n)
            .map(|i| pub_event("agent_started", user, None, &format!("run-{i}"), json!({})))
            .collect(),
    )
}

fn used(s: &Value, budget: &str) -> u64 {
    s["budgets"][budget]["used"]
        .as_u64()
        .unwrap_or_else(|| panic!("budgets.{budget}.used in {s}"))
}

fn limit(s: &Value, budget: &str) -> u64 {
    s["budgets"][budget]["limit"]
        .as_u64()
        .unwrap_or_else(|| panic!("budgets.{budget}.limit in {s}"))
}

#[test]
fn f5_runs_that_never_end_are_capped_listed_briefly_and_timed_out_in_bounded_steps() {
    const PER_USER: usize = 300;
    const TOTAL: usize = 2_500;
    let mut cfg = config();
    cfg.max_active_runs_per_user = PER_USER;
    cfg.max_active_runs = TOTAL;
    cfg.run_idle_timeout_ms = 11_000;
    let gw = TestGateway::start(cfg, Agent::None);

    // One user: at the cap, the batch that crosses it is refused as a whole, naming
    // the first event past it.
    let r = publish(gw.addr, &new_runs("f5-a", 0, 250));
    assert_eq!(r.status, 202, "{}", r.text());
    let r = publish(gw.addr, &new_runs("f5-a", 250, 100));
    assert_eq!(r.status, 429, "{}", r.text());
    let body = r.json();
    assert_eq!(body["error"], "too_many_runs", "{body}");
    assert_eq!(body["index"], 50, "{body}");
    let s = gw.stats();
    assert_eq!(
        s["runs"]["active"], 250,
        "nothing of the refused batch accepted"
    );
    let r = publish(gw.addr, &new_runs("f5-a", 250, 50));
    assert_eq!(r.status, 202, "{}", r.text());

    // Events of runs in progress and run-ending events still pass at the cap.
    let more = json!([
        pub_event("text_delta", "f5-a", None, "run-0", json!({})),
        pub_event(
            "agent_completed",
            "f5-a",
            None,
            "run-new-and-done",
            json!({})
        ),
    ]);
    assert_eq!(publish(gw.addr, &more).status, 202);

    // The emitter: the refused run's handle reports it.
    let mut run = gw.emitter.run("f5-a", None, "run-emitted", "a").unwrap();
    run.agent_started(&json!({})).expect("queued");
    let deadline = Instant::now() + WAIT;
    while !run.is_refused() {
        assert!(Instant::now() < deadline, "the run was not refused");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(matches!(
        run.agent_thinking(&json!({})),
        Err(agentwire::EmitError::TooManyRuns)
    ));
    drop(run);

    // The connected frame: the 100 most recent runs, and a flag saying there are more.
    let mut c = connect(gw.addr, "f5-a");
    let runs = c.connected["active_runs"].as_array().expect("active_runs");
    assert_eq!(runs.len(), 100, "{}", c.connected);
    assert_eq!(c.connected["active_runs_truncated"], true);
    let size = c.connected.to_string().len();
    assert!(size < 100 * 300, "connected frame of {size} B");
    c.ping_pong();
    let small = connect(gw.addr, "f5-small");
    assert!(small.connected.get("active_runs_truncated").is_none());

    // The whole gateway: 10 s of new runs for many users never passes the total.
    let started = Instant::now();
    let mut refused = 0;
    let mut user = 0;
    while started.elapsed() < ATTACK {
        let r = publish(gw.addr, &new_runs(&format!("f5-u{user}"), 0, 200));
        match r.status {
            202 => {}
            429 => refused += 1,
            other => panic!("publish answered {other} {}", r.text()),
        }
        user += 1;
        let s = gw.stats();
        assert!(used(&s, "active_runs") <= limit(&s, "active_runs"), "{s}");
    }
    let s = gw.stats();
    assert_eq!(limit(&s, "active_runs"), TOTAL as u64);
    assert!(refused > 0, "the total was never reached ({user} users)");
    assert!(s["runs"]["refused"].as_u64() >= Some(refused));
    let m = prometheus(&get(gw.addr, "/metrics").text());
    assert_eq!(
        metric(&m, "agentwire_budget_limit{budget=\"active_runs\"}"),
        TOTAL as f64
    );

    // They all go idle together: the watchdog ends at most 1,000 per pass.
    let s = gw.wait_stats("every run timed out", |s| s["runs"]["active"] == 0);
    let timed_out = s["runs"]["timed_out"].as_u64().unwrap();
    let passes = s["runs"]["watchdog_passes"].as_u64().unwrap();
    assert!(timed_out >= TOTAL as u64, "{s}");
    assert!(
        passes * 1_000 >= timed_out,
        "{timed_out} runs in {passes} passes"
    );
}

#[test]
fn f6_kept_events_are_bounded_per_user_and_in_total_and_expire_for_online_users() {
    const PER_USER: u64 = 256 * 1024;
    const BUDGET: u64 = 1024 * 1024;
    let mut cfg = config();
    cfg.replay_bytes_per_user = PER_USER as usize;
    cfg.replay_memory_bytes = BUDGET as usize;
    cfg.replay_ttl_ms = 3_000;
    let gw = TestGateway::start(cfg, Agent::None);
    let blob = "b".repeat(32 * 1024);

    // An online user whose events must expire while they stay connected.
    let mut online = connect(gw.addr, "f6-online");
    let epoch = online.connected["epoch"].as_str().unwrap().to_owned();
    let mut run = gw.emitter.run("f6-online", None, "r", "a").unwrap();
    run.agent_started(&json!({})).unwrap();
    run.agent_completed(&json!({})).unwrap();
    online.recv_events(2);

    // One user alone: its buffer stops at its own bound. (Online, so it is not
    // forgotten when its events go and its epoch stays.)
    let mut big = connect(gw.addr, "f6-big");
    let big_epoch = big.connected["epoch"].as_str().unwrap().to_owned();
    for i in 0..40 {
        let mut run = gw
            .emitter
            .run("f6-big", None, &format!("r{i}"), "a")
            .unwrap();
        run.agent_completed(&json!({ "blob": blob })).unwrap();
    }
    let s = gw.wait_stats("40 big events routed", |s| s["events"]["emitted"] == 42);
    big.recv_events(40);
    let mut last = connect(gw.addr, "f6-last");
    let last_epoch = last.connected["epoch"].as_str().unwrap().to_owned();
    let bytes = s["replay"]["bytes"].as_u64().unwrap();
    assert!(bytes <= PER_USER + 4096, "one user keeps {bytes} B");
    assert!(bytes >= PER_USER / 2, "one user keeps {bytes} B");

    // 10 s of big events for many users: the total stays within the budget.
    let started = Instant::now();
    let mut sent = 42;
    let mut user = 0;
    while started.elapsed() < ATTACK {
        for i in 0..8 {
            let name = format!("f6-u{user}");
            let mut run = gw.emitter.run(&name, None, &format!("r{i}"), "a").unwrap();
            run.agent_completed(&json!({ "blob": blob })).unwrap();
            sent += 1;
        }
        user += 1;
        let s = gw.wait_stats("events routed", |s| s["events"]["emitted"] == sent);
        assert!(used(&s, "replay_memory_bytes") <= BUDGET, "{s}");
        assert!(s["replay"]["bytes"].as_u64() <= Some(BUDGET), "{s}");
    }
    for i in 0..6 {
        let mut run = gw
            .emitter
            .run("f6-last", None, &format!("r{i}"), "a")
            .unwrap();
        run.agent_completed(&json!({ "blob": blob })).unwrap();
    }
    last.recv_events(6);
    let s = gw.stats();
    assert!(s["replay"]["evicted"].as_u64() > Some(0), "{s}");
    assert_eq!(limit(&s, "replay_memory_bytes"), BUDGET);
    // Oldest first across users: the newest events are all kept, the first big
    // user's are gone (the user itself, online, is still known in its epoch).
    let c = connect_path(
        gw.addr,
        "f6-last",
        &format!("/ws?last_seq=0&epoch={last_epoch}"),
    );
    assert_eq!(c.connected["resumed"], true, "{}", c.connected);
    let c = connect_path(
        gw.addr,
        "f6-big",
        &format!("/ws?last_seq=0&epoch={big_epoch}"),
    );
    assert_eq!(c.connected["resumed"], false, "{}", c.connected);
    assert_eq!(c.connected["last_seq"], 40, "{}", c.connected);
    big.ping_pong();

    // The online user's events are older than replay_ttl_ms by now: expired although
    // the user never left.
    online.ping_pong();
    let again = connect_path(
        gw.addr,
        "f6-online",
        &format!("/ws?last_seq=0&epoch={epoch}"),
    );
    assert_eq!(again.connected["resumed"], false, "{}", again.connected);
    assert_eq!(again.connected["last_seq"], 2, "{}", again.connected);
}

#[test]
fn f7_idle_users_are_forgotten_and_come_back_in_a_new_epoch() {
    const BUDGET: u64 = 2 * 1024 * 1024;
    let mut cfg = config();
    cfg.replay_ttl_ms = 1_000;
    cfg.replay_memory_bytes = BUDGET as usize;
    let gw = TestGateway::start(cfg, Agent::None);

    // A user with three events, seen by a client that keeps its epoch and seq.
    for i in 0..3 {
        let ev = pub_event(
            "agent_completed",
            "f7-back",
            None,
            &format!("r{i}"),
            json!({}),
        );
        assert_eq!(publish(gw.addr, &ev).status, 202);
    }
    let c = connect(gw.addr, "f7-back");
    let old_epoch = c.connected["epoch"].as_str().unwrap().to_owned();
    assert_eq!(c.last_seq(), 3);
    c.close();

    // 10 s of distinct user ids: memory stays within the budget the whole time.
    let started = Instant::now();
    let mut n = 0usize;
    let mut most_known = 0;
    while started.elapsed() < ATTACK {
        let batch: Vec<Value> = (n..n + 1000)
            .map(|i| pub_event("agent_completed", &format!("f7-{i}"), None, "r", json!({})))
            .collect();
        n += 1000;
        let r = publish(gw.addr, &Value::Array(batch));
        assert_eq!(r.status, 202, "{}", r.text());
        let s = gw.stats();
        assert!(used(&s, "replay_memory_bytes") <= BUDGET, "{s}");
        most_known = most_known.max(s["users"]["known"].as_u64().unwrap());
    }
    assert!(
        (most_known as usize) < n / 2,
        "{most_known} of {n} users known at once"
    );
    // Idle for replay_ttl_ms: every one of them forgotten.
    let s = gw.wait_stats("every idle user forgotten", |s| s["users"]["known"] == 0);
    assert!(s["users"]["forgotten"].as_u64() >= Some(n as u64), "{s}");

    // Seen again: a new epoch, seq from 1; the old epoch's resume is refused.
    let mut c = connect_path(
        gw.addr,
        "f7-back",
        &format!("/ws?last_seq=3&epoch={old_epoch}"),
    );
    assert_eq!(c.connected["resumed"], false, "{}", c.connected);
    assert_eq!(c.last_seq(), 0, "{}", c.connected);
    assert_ne!(c.connected["epoch"], old_epoch.as_str());
    let ev = pub_event("agent_completed", "f7-back", None, "r-new", json!({}));
    assert_eq!(publish(gw.addr, &ev).status, 202);
    let got = c.recv_events(1);
    assert_eq!(got[0]["seq"], 1, "{got:?}");
}
