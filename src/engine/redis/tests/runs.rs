//! Runs cluster-wide (docs/CLUSTER.md, "The scripts"): `max_active_runs` over all users
//! on every node, a run acked by a `user_message` and never begun (`pending.lua`), a
//! `cancel` before the run's first event, the refused flag of a run handle, and the
//! run metrics counted by the node whose publish began the run (time from the ack) or
//! finished a tool call (its duration), against a real `redis-server`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{
    collect, con, due_pass, due_runs, event, node_with, published, run_timeout, RedisProcess,
};
use crate::engine::EngineEvent;
use crate::event::{Event, EventKind, RunKey};
use crate::stats::{RunOutcome, RunTransition};

/// The run transitions of the `Published` answers, by ticket.
fn transitions(events: &[EngineEvent]) -> Vec<(u64, RunTransition)> {
    events
        .iter()
        .filter_map(|e| match e {
            EngineEvent::Published { ticket, run, .. } => Some((*ticket, *run)),
            _ => None,
        })
        .collect()
}

fn answered(events: &[EngineEvent], ticket: u64) -> bool {
    events.iter().any(|e| {
        matches!(e,
            EngineEvent::Published { ticket: t, .. }
            | EngineEvent::TooManyRuns { ticket: t }
            | EngineEvent::Refused { ticket: t }
            | EngineEvent::Unavailable { ticket: t } if *t == ticket)
    })
}

/// The answer to the cancel of `ticket`: whether the run was in progress or pending.
fn cancel_answer(engine: &mut super::RedisEngine, ticket: u64) -> Option<bool> {
    let known = |e: &EngineEvent| match e {
        EngineEvent::CancelAnswered { ticket: t, known } if *t == ticket => Some(*known),
        _ => None,
    };
    let got = collect(engine, |e| e.iter().any(|e| known(e).is_some()));
    got.iter().find_map(known)
}

fn deadline_members(redis: &RedisProcess) -> Vec<String> {
    let mut con = con(redis);
    redis::cmd("ZRANGE")
        .arg("awtest:deadlines")
        .arg(0)
        .arg(-1)
        .query(&mut con)
        .expect("ZRANGE")
}

fn with_data(user: &str, run: &str, kind: EventKind, data: serde_json::Value) -> Event {
    let key = RunKey::new(user, None, run, "agent").unwrap();
    Event::new(key, kind, &data).unwrap()
}

/// `max_active_runs` counts runs in progress over all users and all nodes: a run
/// beginning past it is refused through any node (nothing stored), an ending event
/// never is, and a run that ends frees a place; the refused run's handle is told.
#[test]
fn max_active_runs_holds_over_all_users_on_every_node() {
    let redis = RedisProcess::start();
    let set = |s: &mut super::RedisSettings| s.max_active_runs = 3;
    let mut a = node_with(&redis, 2000, set);
    let mut b = node_with(&redis, 2000, set);
    a.publish(1, &event("u1", None, "r1", EventKind::AgentStarted, 1));
    a.publish(2, &event("u1", None, "r2", EventKind::AgentStarted, 2));
    collect(&mut a, |e| published(e).len() == 2);
    b.publish(3, &event("u2", None, "r1", EventKind::AgentStarted, 3));
    collect(&mut b, |e| published(e).len() == 1);
    // A fourth run, of a third user, through either node: refused, with its flag.
    let flag = Arc::new(AtomicBool::new(false));
    let mut first = event("u3", None, "r1", EventKind::AgentStarted, 4);
    first.refused_flag = Some(flag.clone());
    b.publish(4, &first);
    a.publish(5, &event("u4", None, "r1", EventKind::AgentThinking, 5));
    // Events of runs in progress pass; a one-event run (it ends) starts none.
    a.publish(6, &event("u1", None, "r1", EventKind::AgentThinking, 6));
    a.publish(7, &event("u4", None, "rx", EventKind::AgentCompleted, 7));
    let got_b = collect(&mut b, |e| answered(e, 4));
    let got_a = collect(&mut a, |e| (5..=7).all(|t| answered(e, t)));
    assert!(
        got_b
            .iter()
            .any(|e| matches!(e, EngineEvent::TooManyRuns { ticket: 4 })),
        "{got_b:?}"
    );
    assert!(flag.load(Ordering::Acquire), "the run handle is refused");
    assert!(
        got_a
            .iter()
            .any(|e| matches!(e, EngineEvent::TooManyRuns { ticket: 5 })),
        "{got_a:?}"
    );
    let stored: Vec<u64> = published(&got_a).iter().map(|(t, _)| *t).collect();
    assert_eq!(stored, [6, 7]);
    assert_eq!(
        deadline_members(&redis).len(),
        3,
        "one deadline per run in progress"
    );
    // One ends (through the other node): a place is free, for any user.
    b.publish(8, &event("u1", None, "r2", EventKind::AgentCompleted, 8));
    collect(&mut b, |e| answered(e, 8));
    let flag = Arc::new(AtomicBool::new(false));
    let mut again = event("u3", None, "r1", EventKind::AgentStarted, 9);
    again.refused_flag = Some(flag.clone());
    a.publish(9, &again);
    let got = collect(&mut a, |e| answered(e, 9));
    assert_eq!(transitions(&got).len(), 1, "{got:?}");
    assert!(!flag.load(Ordering::Acquire));
}

/// A run acked by a `user_message` and never begun gets one `run_timeout` from any
/// node, also when the node that acked it is gone: its deadline is in Redis. Its
/// `run_timeout` (agent "" as under the memory engine) begins and ends it, without a
/// time-to-first-event (a made-up end), and it is never taken again.
#[test]
fn a_pending_run_never_begun_gets_one_run_timeout_from_any_node() {
    let redis = RedisProcess::start();
    let set = |s: &mut super::RedisSettings| s.run_idle_timeout_ms = 100;
    let mut acker = node_with(&redis, 2000, set);
    acker.pending("pu", "r-p", Some(Arc::from("t1")));
    // Its answer is nothing; an open after it in the same queue shows it ran.
    acker.open(1, "pu", None, (0, 1));
    collect(&mut acker, |e| super::opened(e, 1).is_some());
    drop(acker); // the node that acked it is gone
    let mut b = node_with(&redis, 2000, set);
    let mut c = node_with(&redis, 2000, set);
    std::thread::sleep(Duration::from_millis(300));
    let due = due_runs(&mut b, 1);
    assert_eq!(due.len(), 1, "{due:?}");
    let d = &due[0];
    assert_eq!(
        (&*d.user, &*d.run_id, d.thread.as_deref(), &*d.agent_name),
        ("pu", "r-p", Some("t1"), "")
    );
    // Another node does not take it meanwhile.
    assert!(due_pass(&mut c).is_empty());
    let timeout = run_timeout(d);
    b.publish(2, &timeout);
    let got = collect(&mut b, |e| answered(e, 2));
    let t = transitions(&got);
    assert_eq!(t.len(), 1, "{got:?}");
    let run = t[0].1;
    assert!(run.began, "{run:?}");
    assert_eq!(run.since_message, None, "a made-up end measures no wait");
    assert_eq!(run.ended.map(|e| e.0), Some(RunOutcome::RunTimeout));
    assert!(deadline_members(&redis).is_empty());
    std::thread::sleep(Duration::from_millis(300));
    assert!(due_pass(&mut b).is_empty());
    assert!(due_pass(&mut c).is_empty());
}

/// A pending run's first event, through another node: the pending deadline is replaced
/// by the run's own (one deadline, so no early `run_timeout`), the time since the ack
/// is measured there, and a `cancel` that came before the first event (through a third
/// node) reaches the node that publishes it.
#[test]
fn a_pending_runs_first_event_replaces_its_deadline_and_brings_an_earlier_cancel() {
    let redis = RedisProcess::start();
    let mut acker = node_with(&redis, 2000, |_| {});
    let mut canceller = node_with(&redis, 2000, |_| {});
    let mut worker = node_with(&redis, 2000, |_| {});
    acker.pending("pc", "r-c", None);
    acker.pending("pc", "r-n", None);
    acker.open(1, "pc", None, (0, 1));
    collect(&mut acker, |e| super::opened(e, 1).is_some());
    assert_eq!(deadline_members(&redis).len(), 2);
    canceller.cancel("pc", "r-c", Some(2));
    assert_eq!(
        cancel_answer(&mut canceller, 2),
        Some(true),
        "a pending run"
    );
    worker.publish(3, &event("pc", None, "r-c", EventKind::AgentStarted, 3));
    worker.publish(4, &event("pc", None, "r-n", EventKind::AgentStarted, 4));
    let got = collect(&mut worker, |e| answered(e, 3) && answered(e, 4));
    let cancelled: Vec<&str> = got
        .iter()
        .filter_map(|e| match e {
            EngineEvent::Cancelled { run, ticket: 3, .. } => Some(&**run),
            EngineEvent::Cancelled { run, .. } => panic!("{run} was not cancelled"),
            _ => None,
        })
        .collect();
    assert_eq!(cancelled, ["r-c"]);
    for (ticket, run) in transitions(&got) {
        assert!(run.began, "{ticket}: {run:?}");
        assert!(
            run.since_message.is_some(),
            "{ticket}: measured from the ack"
        );
    }
    let members = deadline_members(&redis);
    assert_eq!(members.len(), 2, "{members:?}");
    assert!(
        members.iter().all(|m| m.ends_with(",\"agent\"]")),
        "the runs' own deadlines, not the pending ones: {members:?}"
    );
    // A run that began first (through another node) is not registered pending after.
    acker.pending("pc", "r-n", None);
    acker.open(5, "pc", None, (0, 5));
    collect(&mut acker, |e| super::opened(e, 5).is_some());
    assert_eq!(deadline_members(&redis).len(), 2);
    // A run never begun and not pending is not marked (the client gets not_found):
    // its first event is not cancelled.
    canceller.cancel("pc", "r-unknown", Some(7));
    assert_eq!(cancel_answer(&mut canceller, 7), Some(false));
    worker.publish(
        6,
        &event("pc", None, "r-unknown", EventKind::AgentStarted, 6),
    );
    let got = collect(&mut worker, |e| answered(e, 6));
    assert!(
        !got.iter()
            .any(|e| matches!(e, EngineEvent::Cancelled { .. })),
        "{got:?}"
    );
}

/// Tool durations under the Redis engine: a `tool_completed` finishes the open call
/// with its `tool_call_id` (else the oldest), whatever node each went through; the
/// node whose publish finished it measures it (once in the cluster).
#[test]
fn tool_calls_are_paired_across_nodes_by_tool_call_id() {
    use serde_json::json;
    let redis = RedisProcess::start();
    let mut a = node_with(&redis, 2000, |_| {});
    let mut b = node_with(&redis, 2000, |_| {});
    let execs = [
        (1, json!({"tool_call_id": "a", "tool": "t"})),
        (2, json!({"tool_call_id": "b", "tool": "t"})),
        (3, json!({"tool": "t"})),
    ];
    for (ticket, data) in execs {
        a.publish(
            ticket,
            &with_data("tu", "r1", EventKind::ToolExecuting, data),
        );
    }
    let got = collect(&mut a, |e| published(e).len() == 3);
    assert!(transitions(&got).iter().all(|(_, t)| t.tool.is_none()));
    std::thread::sleep(Duration::from_millis(30));
    let ends = [
        (4, json!({"tool_call_id": "b"})),
        (5, json!({"tool_call_id": "zz"})),
        (6, json!({"result": 1})),
        (7, json!({"result": 2})),
        (8, json!({"result": 3})),
    ];
    for (ticket, data) in ends {
        b.publish(
            ticket,
            &with_data("tu", "r1", EventKind::ToolCompleted, data),
        );
    }
    let got = collect(&mut b, |e| published(e).len() == 5);
    let tools: Vec<(u64, bool)> = transitions(&got)
        .iter()
        .map(|(t, r)| (*t, r.tool.is_some()))
        .collect();
    // b by its id; "zz" is no open call; then by order: a (the oldest), the one
    // without an id; then none is open.
    assert_eq!(
        tools,
        [(4, true), (5, false), (6, true), (7, true), (8, false)]
    );
    let b_took = transitions(&got)[0].1.tool.unwrap();
    assert!(b_took >= Duration::from_millis(30), "{b_took:?}");
}
