//! The publish script's shortcuts (docs/CLUSTER.md, "The scripts"): the epoch is read
//! only at a user's first seq, and the ended runs only for a run not in progress. These
//! tests pin the behaviour the shortcuts must keep: a history whose meta was lost (its
//! stream left behind) starts a new epoch without the stale events, and a run that
//! ended stays refused, whatever was published in between.

use super::{collect, con, event, node, opened, published, RedisProcess};
use crate::engine::EngineEvent;
use crate::event::EventKind;
use crate::registry::Resume;

fn refused(events: &[EngineEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, EngineEvent::Refused { .. }))
        .count()
}

#[test]
fn a_lost_meta_starts_a_new_epoch_without_the_stale_stream() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 2000);
    for k in 1..=3 {
        a.publish(k, &event("m", None, "r1", EventKind::AgentThinking, k));
    }
    let got = collect(&mut a, |e| published(e).len() == 3);
    assert_eq!(published(&got), [(1, 1), (2, 2), (3, 3)]);
    a.open(10, "m", None, (0, 10));
    let got = collect(&mut a, |e| opened(e, 10).is_some());
    let epoch = opened(&got, 10).unwrap().0.to_owned();

    // The meta goes (evicted, expired); the stream of the lost history stays.
    let mut con = con(&redis);
    let gone: i64 = redis::cmd("DEL")
        .arg("awtest:{u:m}:meta")
        .query(&mut con)
        .unwrap();
    assert_eq!(gone, 1);

    a.publish(4, &event("m", None, "r1", EventKind::AgentThinking, 4));
    let got = collect(&mut a, |e| published(e).len() == 1);
    assert_eq!(published(&got), [(4, 1)], "a new history starts at seq 1");
    let kept: i64 = redis::cmd("XLEN")
        .arg("awtest:{u:m}:stream")
        .query(&mut con)
        .unwrap();
    assert_eq!(kept, 1, "the stale events of the lost history were dropped");

    // A client of the old epoch is told its history was lost; the new epoch resumes.
    a.open(11, "m", Some((3, &epoch)), (0, 11));
    let got = collect(&mut a, |e| opened(e, 11).is_some());
    let (new_epoch, top, resume, _) = opened(&got, 11).unwrap();
    assert_ne!(new_epoch, epoch);
    assert_eq!((top, resume), (1, &Resume::Lost));
    let new_epoch = new_epoch.to_owned();
    a.open(12, "m", Some((0, &new_epoch)), (0, 12));
    let got = collect(&mut a, |e| opened(e, 12).is_some());
    let (_, top, resume, replay) = opened(&got, 12).unwrap();
    assert_eq!((top, resume), (1, &Resume::Exact));
    assert_eq!(replay.iter().map(|d| d.seq).collect::<Vec<_>>(), [1]);
}

#[test]
fn an_ended_run_stays_refused_while_other_runs_go_on() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 2000);
    a.publish(1, &event("e", None, "r1", EventKind::AgentStarted, 1));
    a.publish(2, &event("e", None, "r2", EventKind::AgentStarted, 2));
    a.publish(3, &event("e", None, "r1", EventKind::AgentCompleted, 3));
    a.publish(4, &event("e", None, "r2", EventKind::AgentThinking, 4));
    a.publish(5, &event("e", None, "r1", EventKind::AgentThinking, 5));
    a.publish(6, &event("e", None, "r1", EventKind::AgentCompleted, 6));
    a.publish(7, &event("e", None, "r2", EventKind::AgentCompleted, 7));
    let got = collect(&mut a, |e| published(e).len() + refused(e) == 7);
    assert_eq!(published(&got), [(1, 1), (2, 2), (3, 3), (4, 4), (7, 5)]);
    assert_eq!(refused(&got), 2, "r1's events after its end: refused");
}
