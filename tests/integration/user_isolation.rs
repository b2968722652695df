//! Isolation between users: many users, several tabs each, events from several worker
//! threads and the publish API at once; every tab gets exactly its user's events.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::support::{pub_event, publish_ok, Client, TestGateway};

const USERS: usize = 30;
const TABS: usize = 3;
const EMITTER_THREADS: usize = 5;
/// Events per user through the emitter: started, deltas, completed.
const EMITTED_PER_USER: usize = 10;
/// Events per user through the publish API.
const PUBLISHED_PER_USER: usize = 6;

fn user(i: usize) -> String {
    format!("iso-user-{i:02}")
}

#[test]
fn thirty_users_three_tabs_each_get_exactly_their_events() {
    let gw = TestGateway::plain();
    let mut tabs: Vec<(String, Client)> = Vec::new();
    for i in 0..USERS {
        for _ in 0..TABS {
            tabs.push((user(i), gw.connect(&user(i))));
        }
    }

    // In-process workers: each thread owns a share of the users and interleaves one
    // event per user per round.
    let mut workers = Vec::new();
    for t in 0..EMITTER_THREADS {
        let emitter = gw.emitter.clone();
        workers.push(std::thread::spawn(move || {
            let mine: Vec<usize> = (0..USERS).filter(|i| i % EMITTER_THREADS == t).collect();
            let mut runs: Vec<_> = mine
                .iter()
                .map(|&i| {
                    emitter
                        .run(
                            &user(i),
                            Some("t-emit"),
                            &format!("r-emit-{i}"),
                            "iso_agent",
                        )
                        .expect("run")
                })
                .collect();
            for step in 0..EMITTED_PER_USER {
                for run in runs.iter_mut() {
                    let data = json!({ "i": step });
                    match step {
                        0 => run.agent_started(&data),
                        s if s == EMITTED_PER_USER - 1 => run.agent_completed(&data),
                        _ => run.emit("text_delta", &data),
                    }
                    .expect("emit");
                }
            }
        }));
    }
    // Out-of-process worker: batches mixing every user, concurrently.
    let addr = gw.addr;
    let publisher = std::thread::spawn(move || {
        for step in 0..PUBLISHED_PER_USER {
            let kind = match step {
                0 => "agent_started",
                s if s == PUBLISHED_PER_USER - 1 => "agent_completed",
                _ => "text_delta",
            };
            let batch: Vec<Value> = (0..USERS)
                .map(|i| {
                    pub_event(
                        kind,
                        &user(i),
                        None,
                        &format!("r-pub-{i}"),
                        json!({ "i": step }),
                    )
                })
                .collect();
            publish_ok(addr, &Value::Array(batch));
        }
    });
    for w in workers {
        w.join().expect("emitter thread");
    }
    publisher.join().expect("publisher thread");

    let per_user = EMITTED_PER_USER + PUBLISHED_PER_USER;
    for (name, tab) in tabs.iter_mut() {
        let first = tab.last_seq() + 1;
        let events = tab.recv_events(per_user);
        let mut next_i: HashMap<String, u64> = HashMap::new();
        for (k, ev) in events.iter().enumerate() {
            assert_eq!(
                ev["user_id"],
                name.as_str(),
                "tab of {name} got another user's event: {ev}"
            );
            assert_eq!(
                ev["seq"].as_u64(),
                Some(first + k as u64),
                "contiguous seq on a tab of {name}: {ev}"
            );
            let run = ev["run_id"].as_str().expect("run_id").to_owned();
            let i = ev["data"]["i"].as_u64().expect("data.i");
            let want = next_i.entry(run.clone()).or_insert(0);
            assert_eq!(i, *want, "run {run} of {name} in emit order: {ev}");
            *want += 1;
        }
        let idx = name
            .trim_start_matches("iso-user-")
            .parse::<usize>()
            .expect("index");
        assert_eq!(
            next_i.get(&format!("r-emit-{idx}")),
            Some(&(EMITTED_PER_USER as u64)),
            "{name}"
        );
        assert_eq!(
            next_i.get(&format!("r-pub-{idx}")),
            Some(&(PUBLISHED_PER_USER as u64)),
            "{name}"
        );
    }
    // Every event has been routed by now (each reached its user): nothing else is queued.
    for (_, tab) in tabs.iter_mut() {
        tab.ping_pong();
    }
    let s = gw.stats();
    assert_eq!(
        s["events"]["delivered"],
        json!(USERS * TABS * per_user),
        "{s}"
    );
}
