//! Gaps in what pub/sub brought a node, filled from the user's stream (`gaps.rs`,
//! `fill.lua`), against a real `redis-server`. Pub/sub loses messages for real here:
//! events are stored by the real publish script told to publish on another channel
//! (stored, never delivered: what a dropped feed connection loses), or the node's
//! feed connection is killed (`CLIENT KILL TYPE pubsub`) while events are published.

use super::*;

/// Store `n` events of `user` with the real `publish.lua` (the arguments the store
/// thread gives it, `prefix` "awtest", `replay_events`), published on a channel
/// nobody listens to: stored in the stream, never delivered. Their seqs.
fn store_silently(redis: &RedisProcess, user: &str, n: u64, replay_events: usize) -> Vec<u64> {
    let mut c = con(redis);
    let keys = crate::engine::redis::keys::UserKeys::new("awtest", user);
    let deadlines = crate::engine::redis::keys::deadlines("awtest");
    let mut seqs = Vec::new();
    for k in 0..n {
        let ev = event(user, None, "r-silent", EventKind::AgentThinking, 1000 + k);
        let (head, tail) = ev.around_seq();
        let call = crate::engine::redis::store::PublishCall {
            keys: &keys,
            deadlines: &deadlines,
            head: &head,
            tail: &tail,
            marker: "-",
            run: "r-silent",
            ends_run: false,
            replay_events,
            replay_ttl_ms: 600_000,
            channel: "awtest:nobody-listens",
            fresh_epoch: "silent-epoch",
            now: crate::event::now_ms(),
            key: "",
            agent: "agent",
            ts: ev.ts_ms,
            kind: "agent_thinking",
            max_active_runs_per_user: 100,
            run_idle_timeout_ms: 300_000,
            user,
            max_active_runs: 100_000,
            tool_call: "",
        };
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(include_str!("../publish.lua"));
        call.args(&mut cmd);
        let answer: Vec<redis::Value> = cmd.query(&mut c).expect("publish.lua");
        match answer.first() {
            Some(redis::Value::Int(seq)) if *seq > 0 => seqs.push(*seq as u64),
            other => panic!("not stored: {other:?}"),
        }
    }
    seqs
}

fn gaps(events: &[EngineEvent], user: &str) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, EngineEvent::Gap { user: u } if &**u == user))
        .count()
}

/// A delivery past `fed + 1` (pub/sub lost the events in between): the node reads
/// them from the stream and hands everything on in order, each seq once, no gap.
#[test]
fn events_pubsub_lost_mid_stream_are_filled_from_the_stream_in_order() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 2000);
    let mut b = node(&redis, 2000);
    a.open(1, "g1", None, (0, 1));
    collect(&mut a, |e| opened(e, 1).is_some());
    for k in 1..=3 {
        b.publish(k, &event("g1", None, "r1", EventKind::AgentThinking, k));
    }
    let mut got = collect(&mut a, |e| deliveries(e, "g1").len() == 3);
    // 4..=8 stored, lost by pub/sub; then 9..=11 through the real path.
    assert_eq!(store_silently(&redis, "g1", 5, 100), [4, 5, 6, 7, 8]);
    for k in 9..=11 {
        b.publish(k, &event("g1", None, "r1", EventKind::AgentThinking, k));
    }
    got.extend(collect(&mut a, |e| {
        deliveries(e, "g1").len() == 8 || gaps(e, "g1") > 0
    }));
    assert_eq!(gaps(&got, "g1"), 0, "{got:#?}");
    assert_eq!(deliveries(&got, "g1"), (1..=11).collect::<Vec<_>>());
    for e in &got {
        if let EngineEvent::Delivery { event, .. } = e {
            assert!(has_seq(&event.frame, event.seq), "the stored frame itself");
        }
    }
    let fills = a.gap_fills();
    assert_eq!((fills.filled, fills.events, fills.failed), (1, 5, 0));
    // And the order goes on live.
    b.publish(12, &event("g1", None, "r1", EventKind::AgentThinking, 12));
    let got = collect(&mut a, |e| !deliveries(e, "g1").is_empty());
    assert_eq!(deliveries(&got, "g1"), [12]);
}

/// Missed events no longer kept (trimmed by `MAXLEN ~ replay_events`): the fill
/// cannot be exact, so the gap is reported (1013 for the user's connections).
#[test]
fn a_gap_past_the_kept_events_is_reported() {
    let redis = RedisProcess::start();
    let small = |s: &mut RedisSettings| s.replay_events = 5;
    let mut a = node_with(&redis, 2000, small);
    let mut b = node_with(&redis, 2000, small);
    a.open(1, "g2", None, (0, 1));
    collect(&mut a, |e| opened(e, 1).is_some());
    b.publish(1, &event("g2", None, "r1", EventKind::AgentThinking, 1));
    collect(&mut a, |e| deliveries(e, "g2") == [1]);
    // 2..=251: MAXLEN ~ 5 trims whole stream nodes (100 entries): 2..=200 are gone,
    // and 250 missed is within what a node reads (5 + 256), so the fill is asked.
    store_silently(&redis, "g2", 250, 5);
    b.publish(2, &event("g2", None, "r1", EventKind::AgentThinking, 2));
    let got = collect(&mut a, |e| gaps(e, "g2") > 0);
    assert!(deliveries(&got, "g2").is_empty(), "{got:#?}");
    let fills = a.gap_fills();
    assert_eq!((fills.filled, fills.failed), (0, 1));
}

/// More missed than a node reads (`replay_events` + 256): reported at once.
#[test]
fn a_gap_larger_than_a_node_reads_is_reported_without_a_read() {
    let redis = RedisProcess::start();
    let mut a = node_with(&redis, 2000, |s| s.replay_events = 10);
    a.open(1, "g3", None, (0, 1));
    collect(&mut a, |e| opened(e, 1).is_some());
    store_silently(&redis, "g3", 300, 1000);
    a.publish(1, &event("g3", None, "r1", EventKind::AgentThinking, 1));
    let got = collect(&mut a, |e| gaps(e, "g3") > 0);
    assert!(deliveries(&got, "g3").is_empty(), "{got:#?}");
    assert_eq!(a.gap_fills().failed, 1);
}

/// The user's history was lost and began again (another epoch) between the node's
/// last delivery and the fill: the old gap must not be filled from the new history.
#[test]
fn a_fill_across_an_epoch_change_is_reported() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 2000);
    let mut b = node(&redis, 2000);
    a.open(1, "g4", None, (0, 1));
    collect(&mut a, |e| opened(e, 1).is_some());
    for k in 1..=3 {
        b.publish(k, &event("g4", None, "r1", EventKind::AgentThinking, k));
    }
    collect(&mut a, |e| deliveries(e, "g4").len() == 3);
    // The history is gone (an operator's DEL, an eviction): the next event starts
    // another epoch at seq 1; 1..=4 are stored silently, 5 is delivered: a gap of 4.
    let keys = crate::engine::redis::keys::UserKeys::new("awtest", "g4");
    let _: () = redis::cmd("DEL")
        .arg(&keys.meta)
        .arg(&keys.stream)
        .query(&mut con(&redis))
        .unwrap();
    store_silently(&redis, "g4", 4, 100);
    b.publish(9, &event("g4", None, "r1", EventKind::AgentThinking, 9));
    let got = collect(&mut a, |e| gaps(e, "g4") > 0);
    assert!(deliveries(&got, "g4").is_empty(), "{got:#?}");
    assert_eq!(a.gap_fills().failed, 1);
}

/// The feed connection killed while events are published through another node
/// (and kept from reconnecting until they are stored): after it reconnects, the
/// user's top seq is above what the node handed on; the node fills the rest.
#[test]
fn events_published_while_the_feed_was_down_are_filled_after_it_reconnects() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 2000);
    let mut b = node(&redis, 2000);
    a.open(1, "g5", None, (0, 1));
    collect(&mut a, |e| opened(e, 1).is_some());
    b.publish(1, &event("g5", None, "r1", EventKind::AgentThinking, 1));
    let mut got = collect(&mut a, |e| deliveries(e, "g5") == [1]);
    let mut control = con(&redis);
    cut_feeds(&mut control);
    for k in 2..=6 {
        b.publish(k, &event("g5", None, "r1", EventKind::AgentThinking, k));
    }
    // (b's queue still holds the answer to the first publish.)
    collect(&mut b, |e| published(e).len() == 6);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(10_000)
        .query(&mut control)
        .unwrap();
    got.extend(collect(&mut a, |e| {
        deliveries(e, "g5").len() == 5 || gaps(e, "g5") > 0
    }));
    assert_eq!(gaps(&got, "g5"), 0, "{got:#?}");
    assert_eq!(deliveries(&got, "g5"), [1, 2, 3, 4, 5, 6]);
    assert!(a.gap_fills().filled >= 1, "{:?}", a.gap_fills());
    assert!(
        a.counters()
            .feed_losses
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

/// Kill every pub/sub connection and keep new connections out (`maxclients` at the
/// count of the others, in one transaction) until `CONFIG SET maxclients` again.
pub(crate) fn cut_feeds(control: &mut redis::Connection) {
    let normal: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("normal")
        .query(control)
        .unwrap();
    let others = normal.lines().filter(|l| !l.trim().is_empty()).count();
    let _: redis::Value = redis::pipe()
        .atomic()
        .cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(others)
        .cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(control)
        .unwrap();
}

/// More users with a gap at once than fills asked of Redis at once
/// (`gaps::IN_FLIGHT_MAX`): the others wait their turn and are filled too.
#[test]
fn many_users_with_gaps_at_once_are_all_filled() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 2000);
    let mut b = node(&redis, 2000);
    let users: Vec<String> = (0..100).map(|i| format!("gm{i}")).collect();
    for (i, u) in users.iter().enumerate() {
        a.open(i as u64 + 1, u, None, (0, i as u64 + 1));
    }
    collect(&mut a, |e| {
        (1..=users.len() as u64).all(|t| opened(e, t).is_some())
    });
    for u in &users {
        store_silently(&redis, u, 2, 100);
    }
    for (i, u) in users.iter().enumerate() {
        b.publish(i as u64, &event(u, None, "r1", EventKind::AgentThinking, 3));
    }
    let got = collect(&mut a, |e| {
        users
            .iter()
            .all(|u| deliveries(e, u).len() == 3 || gaps(e, u) > 0)
    });
    for u in &users {
        assert_eq!(gaps(&got, u), 0, "{u}");
        assert_eq!(deliveries(&got, u), [1, 2, 3], "{u}");
    }
    let fills = a.gap_fills();
    assert_eq!((fills.filled, fills.events, fills.failed), (100, 200, 0));
}

/// After a feed reconnect, a top seq below what the node handed on is asked once
/// more: a delivery that overtook the first answer (published after its read) is no
/// gap; Redis still behind on the second read (an older copy of the history) is one.
#[test]
fn a_top_below_what_was_handed_on_is_asked_again_before_it_is_a_gap() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 2000);
    a.open(1, "g6", None, (0, 1));
    let got = collect(&mut a, |e| opened(e, 1).is_some());
    let epoch: Arc<str> = Arc::from(opened(&got, 1).unwrap().0);
    for k in 1..=3 {
        a.publish(k, &event("g6", None, "r1", EventKind::AgentThinking, k));
    }
    collect(&mut a, |e| deliveries(e, "g6").len() == 3);
    // An answer read before seq 3 was published (overtaken): asked again, Redis has 3.
    a.top_answered(Arc::from("g6"), Some(epoch.clone()), 2);
    assert_eq!(a.users["g6"].recheck, Some(3), "asked again");
    // Until the second answer is taken (it clears the recheck): no gap.
    let mut got = Vec::new();
    let until = Instant::now() + DEADLINE;
    while a.users["g6"].recheck.is_some() {
        got.extend(std::iter::from_fn(|| a.next_event()));
        assert!(Instant::now() < until, "no second answer");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        gaps(&got, "g6"),
        0,
        "the second read found every seq: {got:#?}"
    );
    a.publish(4, &event("g6", None, "r1", EventKind::AgentThinking, 4));
    let got = collect(&mut a, |e| deliveries(e, "g6") == [4] || gaps(e, "g6") > 0);
    assert_eq!(gaps(&got, "g6"), 0, "{got:#?}");
    // Redis back with an older copy (top 1, same epoch): still behind when asked again.
    let keys = crate::engine::redis::keys::UserKeys::new("awtest", "g6");
    let _: () = redis::cmd("HSET")
        .arg(&keys.meta)
        .arg("seq")
        .arg(1)
        .query(&mut con(&redis))
        .unwrap();
    a.top_answered(Arc::from("g6"), Some(epoch), 1);
    collect(&mut a, |e| gaps(e, "g6") > 0);
}
