//! The Redis engine against a real `redis-server` (Debian's package; `tools/test.sh`
//! installs it when missing). Each test starts its own server on a free port with no
//! persistence, and engines ("nodes") on it; every wait has a deadline.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{RedisEngine, RedisSettings};
use crate::engine::{Delivered, EngineEvent};
use crate::event::{Event, EventKind, RunKey};
use crate::registry::Resume;

const DEADLINE: Duration = Duration::from_secs(20);

/// The feed's batched subscriptions under a storm of opens, and after a reconnect.
mod feed;
/// Gaps in pub/sub filled from the stream (or reported when they cannot be).
mod gaps;
/// Opens that ask for the history an AG-UI connection rebuilds its state from.
mod history;
/// Runs cluster-wide: `max_active_runs`, pending runs, cancels before the first event,
/// the refused flag, the run metrics of the first event and of tools.
mod runs;
/// The publish script's shortcuts keep its behaviour.
mod script;

/// A `redis-server` of this test: killed when dropped.
pub(crate) struct RedisProcess {
    pub port: u16,
    child: Option<Child>,
}

impl RedisProcess {
    pub(crate) fn start() -> RedisProcess {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut r = RedisProcess { port, child: None };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (tools/test.sh installs it with apt)");
        self.child = Some(child);
        let until = Instant::now() + DEADLINE;
        while Instant::now() < until {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
            return false;
        };
        redis::cmd("PING").query::<String>(&mut con).is_ok()
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            let pid = i32::try_from(c.id()).expect("pid");
            assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
        }
    }

    /// `SIGSTOP`: the server holds its connections and answers nothing.
    pub(crate) fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub(crate) fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// `kill -9`, then a new server on the same port (no persistence: empty).
    pub(crate) fn restart_empty(&mut self) {
        self.kill();
        self.spawn();
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}

/// A plain connection of the test to `redis`.
fn con(redis: &RedisProcess) -> redis::Connection {
    redis::Client::open(redis.url())
        .and_then(|c| c.get_connection())
        .expect("redis connection")
}

/// The `run_timeout` a node stores for the due run `d` (the watchdog's `agent_error`).
fn run_timeout(d: &crate::engine::DueRun) -> Event {
    let key = RunKey::new(&d.user, d.thread.as_deref(), &d.run_id, &d.agent_name).unwrap();
    Event::new(
        key,
        EventKind::AgentError,
        &serde_json::json!({"reason": "run_timeout"}),
    )
    .unwrap()
}

fn node(redis: &RedisProcess, timeout_ms: u64) -> RedisEngine {
    node_with(redis, timeout_ms, |_| {})
}

/// A node whose settings `change` adjusts first.
fn node_with(
    redis: &RedisProcess,
    timeout_ms: u64,
    change: impl FnOnce(&mut RedisSettings),
) -> RedisEngine {
    let mut settings = RedisSettings {
        url: redis.url(),
        tls_ca_file: None,
        sentinel_password: None,
        prefix: "awtest".into(),
        timeout: Duration::from_millis(timeout_ms),
        replay_events: 100,
        replay_ttl_ms: 600_000,
        max_active_runs_per_user: 3,
        max_active_runs: 100_000,
        run_idle_timeout_ms: 300_000,
        node_id: "test-node".into(),
        max_connections_per_user: 1000,
        evict_oldest: true,
        max_revoked_users: 100,
    };
    change(&mut settings);
    RedisEngine::start(settings, Arc::new(|| {}), Arc::default()).expect("engine starts")
}

fn event(user: &str, thread: Option<&str>, run: &str, kind: EventKind, n: u64) -> Event {
    event_of(user, thread, run, "agent", kind, n)
}

fn event_of(
    user: &str,
    thread: Option<&str>,
    run: &str,
    agent: &str,
    kind: EventKind,
    n: u64,
) -> Event {
    let key = RunKey::new(user, thread, run, agent).unwrap();
    Event::new(key, kind, &serde_json::json!({ "n": n })).unwrap()
}

/// Events of `engine` until `done` says so (all of them, in order); panics at the
/// deadline with what came.
fn collect(
    engine: &mut RedisEngine,
    mut done: impl FnMut(&[EngineEvent]) -> bool,
) -> Vec<EngineEvent> {
    let until = Instant::now() + DEADLINE;
    let mut got = Vec::new();
    loop {
        while let Some(ev) = engine.next_event() {
            got.push(ev);
        }
        if done(&got) {
            return got;
        }
        assert!(
            Instant::now() < until,
            "deadline passed; events so far: {got:#?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn opened(events: &[EngineEvent], ticket: u64) -> Option<(&str, u64, &Resume, &[Delivered])> {
    events.iter().find_map(|e| match e {
        EngineEvent::Opened {
            ticket: t,
            epoch,
            top_seq,
            resume,
            replay,
            ..
        } if *t == ticket => Some((&**epoch, *top_seq, resume, &replay[..])),
        _ => None,
    })
}

fn published(events: &[EngineEvent]) -> Vec<(u64, u64)> {
    events
        .iter()
        .filter_map(|e| match e {
            EngineEvent::Published { ticket, seq, .. } => Some((*ticket, *seq)),
            _ => None,
        })
        .collect()
}

fn deliveries(events: &[EngineEvent], user: &str) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            EngineEvent::Delivery { user: u, event } if &**u == user => Some(event.seq),
            _ => None,
        })
        .collect()
}

fn has_seq(frame: &[u8], seq: u64) -> bool {
    let needle = format!("\"seq\":{seq},");
    frame.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn three_nodes_publish_to_one_user_and_every_listener_sees_one_contiguous_order() {
    let redis = RedisProcess::start();
    let mut nodes: Vec<RedisEngine> = (0..3).map(|_| node(&redis, 2000)).collect();
    // Nodes 0 and 1 hold a connection of "u"; node 2 only publishes.
    for (i, n) in nodes.iter_mut().take(2).enumerate() {
        n.open(100 + i as u64, "u", None, (0, 100 + i as u64));
        let got = collect(n, |e| opened(e, 100 + i as u64).is_some());
        let (_, top, resume, _) = opened(&got, 100 + i as u64).unwrap();
        assert_eq!((top, resume), (0, &Resume::NotAsked));
    }
    let per_node = 60u64;
    for k in 0..per_node {
        for (i, n) in nodes.iter_mut().enumerate() {
            let ticket = i as u64 * 1000 + k;
            n.publish(
                ticket,
                &event("u", None, "r1", EventKind::AgentThinking, ticket),
            );
        }
    }
    let total = per_node * 3;
    let mut acked = Vec::new();
    for (i, n) in nodes.iter_mut().enumerate() {
        let got = collect(n, |e| {
            published(e).len() as u64 == per_node
                && (i == 2 || deliveries(e, "u").len() as u64 == total)
        });
        acked.extend(published(&got).into_iter().map(|(_, seq)| seq));
        if i < 2 {
            let seqs = deliveries(&got, "u");
            assert_eq!(seqs, (1..=total).collect::<Vec<_>>(), "node {i}");
            for e in &got {
                if let EngineEvent::Delivery { event, .. } = e {
                    assert!(has_seq(&event.frame, event.seq));
                }
            }
        } else {
            assert!(
                deliveries(&got, "u").is_empty(),
                "node 2 has no connection of u"
            );
        }
    }
    acked.sort_unstable();
    assert_eq!(
        acked,
        (1..=total).collect::<Vec<_>>(),
        "each seq acknowledged once"
    );
}

#[test]
fn resume_on_another_node_gets_exactly_what_was_missed_and_the_epoch_survives_a_restart() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 2000);
    for k in 1..=5 {
        let thread = if k % 2 == 0 { Some("t1") } else { None };
        a.publish(k, &event("v", thread, "r1", EventKind::AgentThinking, k));
    }
    let got = collect(&mut a, |e| published(e).len() == 5);
    assert_eq!(
        published(&got).iter().map(|p| p.1).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    drop(a);

    let mut b = node(&redis, 2000);
    b.open(1, "v", None, (0, 1));
    let got = collect(&mut b, |e| opened(e, 1).is_some());
    let (epoch, top, resume, _) = opened(&got, 1).unwrap();
    assert_eq!((top, resume), (5, &Resume::NotAsked));
    let epoch = epoch.to_owned();

    b.open(2, "v", Some((2, &epoch)), (0, 2));
    b.open(3, "v", Some((2, "not-the-epoch")), (0, 3));
    b.open(4, "v", Some((9, &epoch)), (0, 4));
    b.open(5, "v", Some((5, &epoch)), (0, 5));
    let got = collect(&mut b, |e| (2..=5).all(|t| opened(e, t).is_some()));
    let (_, top, resume, replay) = opened(&got, 2).unwrap();
    assert_eq!((top, resume), (5, &Resume::Exact));
    assert_eq!(replay.iter().map(|d| d.seq).collect::<Vec<_>>(), [3, 4, 5]);
    assert!(replay.iter().all(|d| has_seq(&d.frame, d.seq)));
    let threads: Vec<_> = replay.iter().map(|d| d.thread.as_deref()).collect();
    assert_eq!(threads, [None, Some("t1"), None]);
    assert_eq!(opened(&got, 3).unwrap().2, &Resume::Lost);
    assert_eq!(opened(&got, 4).unwrap().2, &Resume::Lost);
    let (_, _, resume, replay) = opened(&got, 5).unwrap();
    assert_eq!((resume, replay.len()), (&Resume::Exact, 0));
    drop(b);

    // A node started anew finds the same epoch and seq.
    let mut c = node(&redis, 2000);
    c.open(1, "v", Some((4, &epoch)), (0, 1));
    let got = collect(&mut c, |e| opened(e, 1).is_some());
    let (epoch_again, top, resume, replay) = opened(&got, 1).unwrap();
    assert_eq!(
        (epoch_again, top, resume),
        (epoch.as_str(), 5, &Resume::Exact)
    );
    assert_eq!(replay.iter().map(|d| d.seq).collect::<Vec<_>>(), [5]);
    c.publish(9, &event("v", None, "r1", EventKind::AgentThinking, 9));
    let got = collect(&mut c, |e| {
        !published(e).is_empty() && !deliveries(e, "v").is_empty()
    });
    assert_eq!(published(&got), [(9, 6)]);
    assert_eq!(deliveries(&got, "v"), [6]);
}

#[test]
fn events_after_the_run_ended_are_refused_cluster_wide() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 2000);
    let mut b = node(&redis, 2000);
    a.publish(1, &event("w", None, "r1", EventKind::AgentStarted, 1));
    a.publish(2, &event("w", None, "r1", EventKind::AgentCompleted, 2));
    let got = collect(&mut a, |e| published(e).len() == 2);
    assert_eq!(published(&got), [(1, 1), (2, 2)]);
    b.publish(3, &event("w", None, "r1", EventKind::AgentThinking, 3));
    b.publish(4, &event("w", None, "r2", EventKind::AgentStarted, 4));
    let got = collect(&mut b, |e| published(e).len() == 1);
    assert!(
        got.iter()
            .any(|e| matches!(e, EngineEvent::Refused { ticket: 3 })),
        "{got:?}"
    );
    assert_eq!(published(&got), [(4, 3)], "a refused event takes no seq");
}

#[test]
fn a_paused_redis_answers_unavailable_within_the_timeout_and_the_engine_recovers() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 300);
    a.open(1, "x", None, (0, 1));
    collect(&mut a, |e| opened(e, 1).is_some());
    a.publish(2, &event("x", None, "r1", EventKind::AgentStarted, 2));
    collect(&mut a, |e| published(e) == [(2, 1)]);

    redis.pause();
    a.publish(3, &event("x", None, "r1", EventKind::AgentThinking, 3));
    let got = collect(&mut a, |e| {
        e.iter()
            .any(|e| matches!(e, EngineEvent::Unavailable { ticket: 3 }))
    });
    assert!(published(&got).is_empty());
    assert!(got
        .iter()
        .any(|e| matches!(e, EngineEvent::Connected(false))));
    redis.resume();

    // Recovery by itself: publish until one is stored (the one answered 503 may
    // have been stored as well: its outcome was unknown).
    let until = Instant::now() + DEADLINE;
    let mut ticket = 10;
    let mut seen = Vec::new();
    loop {
        a.publish(
            ticket,
            &event("x", None, "r1", EventKind::AgentThinking, ticket),
        );
        let got = collect(&mut a, |e| {
            e.iter().any(|e| {
                matches!(e, EngineEvent::Published { ticket: t, .. } | EngineEvent::Unavailable { ticket: t } if *t == ticket)
            })
        });
        seen.extend(got);
        if !published(&seen).is_empty() {
            break;
        }
        assert!(Instant::now() < until, "no recovery: {seen:#?}");
        ticket += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(seen
        .iter()
        .any(|e| matches!(e, EngineEvent::Connected(true))));
    // Whatever was stored reaches the listener in order, or a gap is reported.
    let top = published(&seen)[0].1;
    let got = collect(&mut a, |e| {
        let mut all: Vec<u64> = deliveries(&seen, "x");
        all.extend(deliveries(e, "x"));
        all.last() == Some(&top) || e.iter().any(|e| matches!(e, EngineEvent::Gap { .. }))
    });
    let mut all = deliveries(&seen, "x");
    all.extend(deliveries(&got, "x"));
    let gap = seen
        .iter()
        .chain(&got)
        .any(|e| matches!(e, EngineEvent::Gap { .. }));
    if !gap {
        assert_eq!(all, (2..=top).collect::<Vec<_>>());
    }
}

#[test]
fn redis_restarted_empty_reports_a_gap_and_a_new_epoch() {
    let mut redis = RedisProcess::start();
    let mut a = node(&redis, 300);
    a.open(1, "y", None, (0, 1));
    let got = collect(&mut a, |e| opened(e, 1).is_some());
    let epoch = opened(&got, 1).unwrap().0.to_owned();
    for k in 0..3 {
        a.publish(10 + k, &event("y", None, "r1", EventKind::AgentThinking, k));
    }
    collect(&mut a, |e| deliveries(e, "y").len() == 3);

    redis.restart_empty();
    // The feed reconnects, finds no history for "y": the node's connections of y
    // must resume (1013), never take seqs of a new history as if nothing happened.
    let got = collect(&mut a, |e| {
        e.iter()
            .any(|e| matches!(e, EngineEvent::Gap { user } if &**user == "y"))
    });
    assert!(deliveries(&got, "y").is_empty());
    a.release("y", None);
    a.open(2, "y", Some((3, &epoch)), (0, 2));
    let got = collect(&mut a, |e| opened(e, 2).is_some());
    let (new_epoch, top, resume, _) = opened(&got, 2).unwrap();
    assert_ne!(new_epoch, epoch);
    assert_eq!((top, resume), (0, &Resume::Lost));
}

#[test]
fn leases_are_renewed_for_the_connections_given() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 2000);
    a.open(1, "ls", None, (7, 1));
    collect(&mut a, |e| opened(e, 1).is_some());
    let mut con = con(&redis);
    let score = |con: &mut redis::Connection| -> Option<f64> {
        redis::cmd("ZSCORE")
            .arg("awtest:{u:ls}:leases")
            .arg("test-node\n7:1")
            .query(con)
            .expect("ZSCORE")
    };
    let first = score(&mut con).expect("the open leased it");
    std::thread::sleep(Duration::from_millis(20));
    a.renew_leases(vec![(Arc::from("ls"), (7, 1))]);
    let until = Instant::now() + DEADLINE;
    while score(&mut con) <= Some(first) {
        assert!(Instant::now() < until, "lease not renewed");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Regression: the feed's idle PING expected `+PONG` while a subscribed connection
/// answers `["pong", ""]`, and the feed reconnected after every idle second.
#[test]
fn an_idle_feed_keeps_its_connection() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 2000);
    a.open(1, "idle", None, (0, 1));
    collect(&mut a, |e| opened(e, 1).is_some());
    // Three idle pings.
    std::thread::sleep(Duration::from_millis(3500));
    let losses = a
        .counters()
        .feed_losses
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(losses, 0, "the feed lost its connection while idle");
}

/// The JSON of a delivered frame (past the WebSocket header), parsed.
fn frame_json(frame: &[u8]) -> serde_json::Value {
    let start = frame
        .iter()
        .position(|&b| b == b'{')
        .expect("a JSON object");
    serde_json::from_slice(&frame[start..]).expect("the frame's JSON parses")
}

/// Run ids may hold any UTF-8, newlines too (src/ids.rs): pub/sub messages must carry
/// them, and the frame after them, intact (they were split at the first newline).
#[test]
fn a_run_id_with_newlines_is_delivered_intact() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 2000);
    a.open(1, "nl", None, (0, 1));
    collect(&mut a, |e| opened(e, 1).is_some());
    let run = "r\n1\n+t\n{\"x\":1}";
    a.publish(
        2,
        &event("nl", Some("t1"), run, EventKind::AgentThinking, 2),
    );
    let got = collect(&mut a, |e| !deliveries(e, "nl").is_empty());
    let delivered: Vec<_> = got
        .iter()
        .filter_map(|e| match e {
            EngineEvent::Delivery { event, .. } => Some(event),
            _ => None,
        })
        .collect();
    assert_eq!(delivered.len(), 1);
    let d = delivered[0];
    assert_eq!((d.seq, &*d.run, d.thread.as_deref()), (1, run, Some("t1")));
    let json = frame_json(&d.frame);
    assert_eq!(json["run_id"], run);
    assert_eq!(json["seq"], 1);
}

/// One pass of the watchdog: the runs `take_due_runs` takes.
fn due_pass(engine: &mut RedisEngine) -> Vec<crate::engine::DueRun> {
    engine.take_due_runs(100);
    let got = collect(engine, |e| {
        e.iter().any(|e| matches!(e, EngineEvent::RunsDue(_)))
    });
    got.into_iter()
        .flat_map(|e| match e {
            EngineEvent::RunsDue(d) => d,
            _ => Vec::new(),
        })
        .collect()
}

/// Passes of the watchdog until `enough` runs were taken.
fn due_runs(engine: &mut RedisEngine, enough: usize) -> Vec<crate::engine::DueRun> {
    let until = Instant::now() + DEADLINE;
    let mut due = Vec::new();
    while due.len() < enough {
        assert!(Instant::now() < until, "runs not due: {due:?}");
        due.extend(due_pass(engine));
        std::thread::sleep(Duration::from_millis(20));
    }
    due
}

/// User and run ids may hold newlines: the watchdog must end the run of the user that
/// owns it, never read a crafted id as another user's run (the deadline member was
/// `<user>\n<run>\n...`, split at newlines).
#[test]
fn the_watchdog_ends_runs_of_users_with_newlines_in_their_ids_and_nobody_else() {
    let redis = RedisProcess::start();
    let mut a = node_with(&redis, 2000, |s| s.run_idle_timeout_ms = 100);
    let crafted = "bob\nr9\n-\nagent";
    a.publish(1, &event("bob", None, "r9", EventKind::AgentStarted, 1));
    a.publish(2, &event(crafted, None, "rz", EventKind::AgentStarted, 2));
    collect(&mut a, |e| published(e).len() == 2);
    std::thread::sleep(Duration::from_millis(300));
    let mut due: Vec<(String, String)> = due_runs(&mut a, 2)
        .into_iter()
        .map(|d| (d.user.to_string(), d.run_id.to_string()))
        .collect();
    due.sort();
    assert_eq!(
        due,
        [
            ("bob".to_owned(), "r9".to_owned()),
            (crafted.to_owned(), "rz".to_owned())
        ]
    );
}

/// A run's events may change thread or agent (the memory engine then shows the latest):
/// the run still has one deadline, so one `run_timeout` (a second deadline was left
/// under the first thread and ended the run a second time, or while it was active),
/// and an ending event removes it whatever thread it names.
#[test]
fn a_run_that_changes_thread_or_agent_keeps_one_deadline() {
    let redis = RedisProcess::start();
    let mut a = node_with(&redis, 2000, |s| s.run_idle_timeout_ms = 100);
    let ev = |t, run, agent, kind| event_of("ch", Some(t), run, agent, kind, 0);
    a.publish(1, &ev("t1", "r1", "planner", EventKind::AgentStarted));
    a.publish(2, &ev("t2", "r1", "planner", EventKind::AgentThinking));
    a.publish(3, &ev("t2", "r1", "coder", EventKind::AgentThinking));
    a.publish(4, &ev("t1", "r2", "planner", EventKind::AgentStarted));
    a.publish(5, &ev("t2", "r2", "coder", EventKind::AgentCompleted));
    collect(&mut a, |e| published(e).len() == 5);
    std::thread::sleep(Duration::from_millis(300));
    // Every deadline set above has passed: one pass takes them all (a second pass
    // could take r1 again, `run_idle_timeout_ms` after the first: no timeout was stored).
    let due = due_pass(&mut a);
    let due: Vec<_> = due
        .iter()
        .map(|d| (&*d.run_id, d.thread.as_deref(), &*d.agent_name))
        .collect();
    assert_eq!(due, [("r1", Some("t2"), "coder")]);
}

/// `SCRIPT FLUSH` (an operator, or a failover to a server that never loaded them) must
/// not leave the node answering every publish and open `Unavailable` while it still
/// looks connected: the request that met `NOSCRIPT` fails (its script did not run),
/// the scripts are loaded again, the next request is served.
#[test]
fn the_scripts_are_loaded_again_after_a_script_flush() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 2000);
    a.publish(1, &event("fl", None, "r1", EventKind::AgentStarted, 1));
    collect(&mut a, |e| published(e) == [(1, 1)]);
    let mut con = con(&redis);
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut con)
        .expect("SCRIPT FLUSH");
    a.publish(2, &event("fl", None, "r1", EventKind::AgentThinking, 2));
    let got = collect(&mut a, |e| {
        e.iter().any(|e| {
            matches!(
                e,
                EngineEvent::Published { ticket: 2, .. } | EngineEvent::Unavailable { ticket: 2 }
            )
        })
    });
    assert!(
        got.iter()
            .any(|e| matches!(e, EngineEvent::Unavailable { ticket: 2 })),
        "NOSCRIPT: not run, so not stored: {got:?}"
    );
    a.publish(3, &event("fl", None, "r1", EventKind::AgentThinking, 3));
    a.open(4, "fl", None, (0, 4));
    let got = collect(&mut a, |e| {
        e.iter().any(|e| {
            matches!(
                e,
                EngineEvent::Published { ticket: 3, .. } | EngineEvent::Unavailable { ticket: 3 }
            )
        }) && e.iter().any(|e| {
            matches!(
                e,
                EngineEvent::Opened { ticket: 4, .. } | EngineEvent::Unavailable { ticket: 4 }
            )
        })
    });
    assert_eq!(published(&got), [(3, 2)], "{got:?}");
    assert_eq!(opened(&got, 4).map(|o| o.1), Some(2), "{got:?}");
}

/// An event that ends its run starts none, so `max_active_runs_per_user` does not
/// refuse it, even for a run never seen before (a one-event run), as under the memory
/// engine (`publish::check_runs`).
#[test]
fn an_ending_event_is_not_refused_for_too_many_runs() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 2000);
    for (ticket, run) in [(1, "r1"), (2, "r2"), (3, "r3")] {
        a.publish(
            ticket,
            &event("mx", None, run, EventKind::AgentStarted, ticket),
        );
    }
    collect(&mut a, |e| published(e).len() == 3);
    a.publish(4, &event("mx", None, "r4", EventKind::AgentStarted, 4));
    a.publish(5, &event("mx", None, "r5", EventKind::AgentCompleted, 5));
    a.publish(6, &event("mx", None, "r1", EventKind::AgentCompleted, 6));
    let got = collect(&mut a, |e| {
        e.iter()
            .filter(|e| {
                matches!(
                    e,
                    EngineEvent::Published { .. } | EngineEvent::TooManyRuns { .. }
                )
            })
            .count()
            == 3
    });
    assert!(
        got.iter()
            .any(|e| matches!(e, EngineEvent::TooManyRuns { ticket: 4 })),
        "a fourth run starting is refused: {got:?}"
    );
    assert_eq!(published(&got), [(5, 4), (6, 5)], "{got:?}");
}

/// The stream may keep more than one node's read cap (`replay_events` + 256 entries):
/// nodes with different `replay_events` (a rolling change of the setting), or a Redis
/// whose `stream-node-max-entries` lets `MAXLEN ~` keep more. A resume answered from a
/// capped read must not be "exact" with the events past the cap silently skipped.
#[test]
fn a_resume_past_the_read_cap_is_not_exact_with_a_hole() {
    let redis = RedisProcess::start();
    let mut big = node_with(&redis, 2000, |s| s.replay_events = 1000);
    let total = 300u64;
    for k in 1..=total {
        big.publish(k, &event("cap", None, "r1", EventKind::AgentThinking, k));
    }
    collect(&mut big, |e| published(e).len() as u64 == total);
    big.open(1, "cap", None, (0, 1));
    let got = collect(&mut big, |e| opened(e, 1).is_some());
    let epoch = opened(&got, 1).unwrap().0.to_owned();

    let mut small = node_with(&redis, 2000, |s| s.replay_events = 10);
    small.open(2, "cap", Some((0, &epoch)), (0, 2));
    let got = collect(&mut small, |e| opened(e, 2).is_some());
    let (_, top, resume, replay) = opened(&got, 2).unwrap();
    assert_eq!(top, total);
    let seqs: Vec<u64> = replay.iter().map(|d| d.seq).collect();
    match resume {
        Resume::Exact => assert_eq!(seqs, (1..=total).collect::<Vec<_>>()),
        Resume::Lost => assert!(seqs.is_empty()),
        Resume::NotAsked => panic!("a resume was asked"),
    }
    assert_eq!(resume, &Resume::Lost, "266 of 300 entries were read");
}

/// A node that took a due run and never stored its `run_timeout` (it died, or Redis
/// failed that publish) must not leave the run without one: the run is taken again one
/// `run_idle_timeout_ms` later, by any node, until its timeout (or another ending
/// event) is stored; after that it is never taken again.
#[test]
fn a_due_run_whose_timeout_was_not_stored_is_taken_again() {
    let redis = RedisProcess::start();
    let set = |s: &mut RedisSettings| s.run_idle_timeout_ms = 100;
    let mut a = node_with(&redis, 2000, set);
    let mut b = node_with(&redis, 2000, set);
    a.publish(
        1,
        &event("rt", Some("t1"), "r1", EventKind::AgentStarted, 1),
    );
    collect(&mut a, |e| published(e).len() == 1);
    std::thread::sleep(Duration::from_millis(300));
    let taken = due_runs(&mut a, 1);
    assert_eq!(taken.len(), 1);
    // `a` publishes nothing (it "died"); `b` takes the run again later.
    let again = due_runs(&mut b, 1);
    assert_eq!(again, taken);
    let t = &again[0];
    let timeout = run_timeout(t);
    b.publish(2, &timeout);
    collect(&mut b, |e| published(e) == [(2, 2)]);
    // Stored: never taken again (two idle periods later).
    std::thread::sleep(Duration::from_millis(300));
    assert!(due_pass(&mut a).is_empty());
    assert!(due_pass(&mut b).is_empty());
}

/// Nodes' clocks differ: a new connection may score older than another node's (its
/// `opened` time is that node's clock). `evict_oldest` must still bring the user back to
/// `max_connections_per_user` (it evicted one too few when the new one was among the
/// oldest: it skips itself).
#[test]
fn evict_oldest_keeps_the_limit_when_the_new_connection_scores_oldest() {
    let redis = RedisProcess::start();
    let mut a = node_with(&redis, 2000, |s| s.max_connections_per_user = 1);
    let mut con = con(&redis);
    // A connection of "sk" on a node whose clock is an hour ahead, its lease live.
    let later = crate::event::now_ms() + 3_600_000;
    let other = "ahead-node\n1:1";
    for key in ["awtest:{u:sk}:conns", "awtest:{u:sk}:leases"] {
        let _: () = redis::cmd("ZADD")
            .arg(key)
            .arg(later)
            .arg(other)
            .query(&mut con)
            .expect("ZADD");
    }
    a.open(1, "sk", None, (0, 1));
    collect(&mut a, |e| opened(e, 1).is_some());
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg("awtest:{u:sk}:conns")
        .arg(0)
        .arg(-1)
        .query(&mut con)
        .expect("ZRANGE");
    assert_eq!(members, ["test-node\n0:1"], "one connection at most");
}
