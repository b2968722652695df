//! The history an open asks for (an AG-UI connection's, `RedisEngine::open_with`):
//! the kept events up to the connection's starting point, read only when there can be
//! something to rebuild.

use super::{collect, event, has_seq, node, opened, published, RedisProcess};
use crate::engine::EngineEvent;
use crate::event::EventKind;
use crate::registry::Resume;

fn history_of(events: &[EngineEvent], ticket: u64) -> Vec<u64> {
    events
        .iter()
        .find_map(|e| match e {
            EngineEvent::Opened {
                ticket: t, history, ..
            } if *t == ticket => Some(history.iter().map(|d| d.seq).collect()),
            _ => None,
        })
        .expect("opened")
}

#[test]
fn an_open_that_asks_for_history_gets_the_kept_events_up_to_its_starting_point() {
    let redis = RedisProcess::start();
    let mut a = node(&redis, 2000);
    for k in 1..=4 {
        a.publish(k, &event("h", None, "r1", EventKind::AgentThinking, k));
    }
    let got = collect(&mut a, |e| published(e).len() == 4);
    assert_eq!(published(&got).len(), 4);
    a.open_with(10, "h", None, (0, 10), true);
    a.open(11, "h", None, (0, 11));
    let got = collect(&mut a, |e| {
        opened(e, 10).is_some() && opened(e, 11).is_some()
    });
    // A fresh open: everything up to the top; without the ask: nothing.
    assert_eq!(history_of(&got, 10), [1, 2, 3, 4]);
    assert!(history_of(&got, 11).is_empty());
    let epoch = opened(&got, 10).unwrap().0.to_owned();
    // An exact resume after 2: the replay after it, the history up to it.
    a.open_with(12, "h", Some((2, &epoch)), (0, 12), true);
    // A lost resume starts from the top, like a fresh open.
    a.open_with(13, "h", Some((2, "other")), (0, 13), true);
    let got = collect(&mut a, |e| {
        opened(e, 12).is_some() && opened(e, 13).is_some()
    });
    let (_, _, resume, replay) = opened(&got, 12).unwrap();
    assert_eq!(resume, &Resume::Exact);
    assert_eq!(replay.iter().map(|d| d.seq).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(history_of(&got, 12), [1, 2]);
    assert!(opened(&got, 12)
        .unwrap()
        .3
        .iter()
        .all(|d| has_seq(&d.frame, d.seq)));
    assert_eq!(history_of(&got, 13), [1, 2, 3, 4]);
    // No run in progress: nothing to rebuild, nothing read.
    a.publish(5, &event("h", None, "r1", EventKind::AgentCompleted, 5));
    let got = collect(&mut a, |e| published(e).len() == 1);
    assert_eq!(published(&got), [(5, 5)]);
    a.open_with(14, "h", None, (0, 14), true);
    let got = collect(&mut a, |e| opened(e, 14).is_some());
    assert!(history_of(&got, 14).is_empty());
    // But a resume from within the run (which ended in its replay) still gets it.
    a.open_with(15, "h", Some((3, &epoch)), (0, 15), true);
    a.open_with(16, "h", Some((5, &epoch)), (0, 16), true);
    let got = collect(&mut a, |e| {
        opened(e, 15).is_some() && opened(e, 16).is_some()
    });
    let replay = opened(&got, 15).unwrap().3;
    assert_eq!(replay.iter().map(|d| d.seq).collect::<Vec<_>>(), [4, 5]);
    assert_eq!(history_of(&got, 15), [1, 2, 3]);
    assert!(
        history_of(&got, 16).is_empty(),
        "nothing after it, nothing running"
    );
}
