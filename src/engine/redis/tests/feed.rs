//! The feed thread's subscriptions under a storm of opens: many users subscribed in a
//! few batched commands, each open answered only once its user is listened to,
//! unsubscribes taking effect, and a reconnect subscribing everyone again. What Redis
//! itself says (`PUBSUB NUMSUB`) is the judge.

use std::time::Instant;

use super::{collect, deliveries, event, node, opened, published, RedisProcess, DEADLINE};
use crate::engine::redis::keys::UserKeys;
use crate::engine::EngineEvent;
use crate::event::EventKind;

/// More than two batches (512 channels each) of users.
const USERS: u64 = 1_300;

fn user(i: u64) -> String {
    format!("storm-{i}")
}

/// Subscribers of each user's channel, in order.
fn numsub(redis: &RedisProcess, users: impl Iterator<Item = u64>) -> Vec<i64> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_connection().unwrap();
    let mut cmd = redis::cmd("PUBSUB");
    cmd.arg("NUMSUB");
    for i in users {
        cmd.arg(UserKeys::new("awtest", &user(i)).channel);
    }
    let reply: Vec<(String, i64)> = cmd.query(&mut con).unwrap();
    reply.into_iter().map(|(_, n)| n).collect()
}

/// Poll until `ok` holds for what Redis says (an unsubscribe is sent without waiting).
fn wait_numsub(redis: &RedisProcess, range: std::ops::Range<u64>, want: i64) {
    let until = Instant::now() + DEADLINE;
    loop {
        let n = numsub(redis, range.clone());
        if n.iter().all(|&n| n == want) {
            return;
        }
        assert!(
            Instant::now() < until,
            "NUMSUB of {range:?} never all {want}: {n:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_storm_of_opens_is_listened_to_before_it_is_read_and_unsubscribes_take_effect() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 2000);
    let mut b = node(&redis, 2000);
    // Every open at once (they wait in the feed's channel together), the first 100
    // users twice: the second open of a user whose SUBSCRIBE is in flight waits for it.
    for i in 0..USERS {
        a.open(i, &user(i), None, (0, i));
    }
    for i in 0..100 {
        a.open(USERS + i, &user(i), None, (1, i));
    }
    let total = USERS + 100;
    let got = collect(&mut a, |e| (0..total).all(|t| opened(e, t).is_some()));
    assert!(
        !got.iter()
            .any(|e| matches!(e, EngineEvent::Unavailable { .. })),
        "an open was answered Unavailable"
    );
    // Every open was answered after its SUBSCRIBE executed: Redis has them all.
    assert_eq!(numsub(&redis, 0..USERS), vec![1; USERS as usize]);

    // One event per user through the other node reaches node a once.
    for i in 0..USERS {
        b.publish(i, &event(&user(i), None, "r1", EventKind::AgentThinking, i));
    }
    collect(&mut b, |e| published(e).len() as u64 == USERS);
    let got = collect(&mut a, |e| {
        (0..USERS).all(|i| !deliveries(e, &user(i)).is_empty())
    });
    for i in 0..USERS {
        assert_eq!(deliveries(&got, &user(i)), vec![1], "user {i}");
    }

    // The last connection of the first 650 users ends (the first 100 have two).
    for i in 0..650 {
        a.release(&user(i), None);
    }
    for i in 0..100 {
        a.release(&user(i), None);
    }
    wait_numsub(&redis, 0..650, 0);
    assert_eq!(numsub(&redis, 650..USERS), vec![1; (USERS - 650) as usize]);
    // A user released and opened again is listened to again.
    a.open(10_000, &user(3), None, (2, 3));
    collect(&mut a, |e| opened(e, 10_000).is_some());
    assert_eq!(numsub(&redis, 3..4), vec![1]);
    assert_eq!(
        a.counters()
            .feed_losses
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn a_reconnected_feed_subscribes_everyone_again_and_keeps_answering_opens() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 2000);
    for i in 0..USERS {
        a.open(i, &user(i), None, (0, i));
    }
    collect(&mut a, |e| (0..USERS).all(|t| opened(e, t).is_some()));
    // Cut the feed's connection (the store's connections are no pub/sub clients).
    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_connection().unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut con)
        .unwrap();
    assert_eq!(killed, 1);
    let until = Instant::now() + DEADLINE;
    while a
        .counters()
        .feed_losses
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(Instant::now() < until, "the feed never noticed");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Opens after the reconnect wait for the resubscription's commands, then go on.
    a.open(USERS, "late", None, (1, 0));
    a.open(USERS + 1, &user(5), None, (1, 5));
    let got = collect(&mut a, |e| {
        opened(e, USERS).is_some() && opened(e, USERS + 1).is_some()
    });
    assert!(!got
        .iter()
        .any(|e| matches!(e, EngineEvent::Unavailable { .. })));
    wait_numsub(&redis, 0..USERS, 1);
    // The connection keeps working: no second loss (a confirmation read as another
    // command's would leave the count of owed confirmations wrong and the feed
    // reconnecting), and an unsubscribe still takes effect.
    a.release("late", None);
    let until = Instant::now() + DEADLINE;
    loop {
        let n: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(UserKeys::new("awtest", "late").channel)
            .query(&mut con)
            .unwrap();
        if n[0].1 == 0 {
            break;
        }
        assert!(Instant::now() < until, "late never unsubscribed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        a.counters()
            .feed_losses
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}
