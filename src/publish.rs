//! `POST /api/events`: parsing and validating a publish body (one event object or an
//! array of at most [`MAX_BATCH`]) into serialized [`Event`]s. All or nothing: the
//! first bad event refuses the whole request with its index. `data` is passed through
//! byte for byte (a `RawValue`), never re-serialized.

use std::collections::HashSet;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::event::{Event, EventError, EventKind, RunKey};
use crate::registry::Registry;

/// Most events in one publish request.
pub const MAX_BATCH: usize = 1000;

/// Why a publish body was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum BatchError {
    /// More than [`MAX_BATCH`] events (413).
    TooMany(usize),
    /// Event `index` (from 0) is invalid, or the body is not JSON (index 0) (400).
    Bad { index: usize, message: String },
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type")]
    kind: Option<Value>,
    user_id: Option<Value>,
    #[serde(default)]
    thread_id: Option<Value>,
    run_id: Option<Value>,
    agent_name: Option<Value>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    idempotency_key: Option<Value>,
}

fn field<'v>(v: &'v Option<Value>, name: &str) -> Result<&'v str, String> {
    match v {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("{name} must be a string")),
        None => Err(format!("missing field {name}")),
    }
}

fn one(raw: &RawValue) -> Result<Event, String> {
    let text = raw.get();
    if !text.trim_start().starts_with('{') {
        return Err("each event must be a JSON object".into());
    }
    let w: Wire<'_> = serde_json::from_str(text).map_err(|e| format!("bad event: {e}"))?;
    let kind = EventKind::parse(field(&w.kind, "type")?).map_err(|e| e.to_string())?;
    let user = field(&w.user_id, "user_id")?;
    let run = field(&w.run_id, "run_id")?;
    let agent = field(&w.agent_name, "agent_name")?;
    let thread = match &w.thread_id {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(t.as_str()),
        Some(_) => return Err("thread_id must be a string or null".into()),
    };
    let key = RunKey::new(user, thread, run, agent).map_err(|e| e.to_string())?;
    let data = w.data.map_or("null", RawValue::get);
    let event = Event::from_raw_data(key, kind, data);
    match &w.idempotency_key {
        None => Ok(event),
        Some(Value::String(k)) => event.with_idempotency_key(k).map_err(|e| e.to_string()),
        Some(_) => Err(EventError::BadIdempotencyKey.to_string()),
    }
}

/// Parse and validate a whole publish body.
pub fn parse_batch(body: &[u8]) -> Result<Vec<Event>, BatchError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let bad_body = |e: serde_json::Error| BatchError::Bad {
        index: 0,
        message: format!("body is not valid JSON: {e}"),
    };
    match first {
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_slice(body).map_err(bad_body)?;
            if items.len() > MAX_BATCH {
                return Err(BatchError::TooMany(items.len()));
            }
            items
                .iter()
                .enumerate()
                .map(|(index, raw)| one(raw).map_err(|message| BatchError::Bad { index, message }))
                .collect()
        }
        Some(b'{') => {
            let raw: &RawValue = serde_json::from_slice(body).map_err(bad_body)?;
            one(raw)
                .map(|e| vec![e])
                .map_err(|message| BatchError::Bad { index: 0, message })
        }
        _ => Err(BatchError::Bad {
            index: 0,
            message: "body must be a JSON object or an array of objects".into(),
        }),
    }
}

/// Why a valid batch is refused as a whole, before any of it takes a `seq`.
#[derive(Debug, PartialEq, Eq)]
pub enum RunRefusal {
    /// Event `index` belongs to a run that ended (before the batch, or earlier in it) (400).
    Ended { index: usize, run: String },
    /// Event `index` would start a run past `max_active_runs_per_user` or
    /// `max_active_runs`, counting the runs the batch itself starts (429).
    TooMany { index: usize, run: String },
}

/// Check a parsed batch against the runs `registry` holds: the first event of an ended
/// run (simulating the runs the batch itself ends) or the first that would start a
/// run past the bounds (counting the runs the batch starts) refuses the whole batch,
/// so nothing of a bad request takes a `seq`.
pub fn check_runs(batch: &[Event], registry: &Registry) -> Result<(), RunRefusal> {
    let mut ending: Vec<(&str, &str)> = Vec::new();
    let mut starting: Vec<(&str, &str)> = Vec::new();
    for (index, ev) in batch.iter().enumerate() {
        let user = &*ev.key.user_id;
        let run = &*ev.key.run_id;
        let known = registry.get(user);
        let ended = known.is_some_and(|u| u.run_ended(run))
            || ending.iter().any(|(u, r)| *u == user && *r == run);
        if ended {
            let run = run.to_owned();
            return Err(RunRefusal::Ended { index, run });
        }
        let starts = !ev.kind.ends_run()
            && !known.is_some_and(|u| u.runs.contains_key(run))
            && !starting.iter().any(|(u, r)| *u == user && *r == run);
        if starts {
            let user_runs = known.map_or(0, |u| u.runs.len());
            let batch_user = starting.iter().filter(|(u, _)| *u == user).count();
            if !registry.runs_fit(user_runs, batch_user + 1, starting.len() + 1) {
                let run = run.to_owned();
                return Err(RunRefusal::TooMany { index, run });
            }
            starting.push((user, run));
        }
        if ev.kind.ends_run() {
            ending.push((user, run));
        }
    }
    Ok(())
}

/// Which events of a batch are repeats (PROTOCOL.md section 6a): their key was
/// accepted for their user before (`seen`), or an earlier event of the batch has the
/// same user and key.
pub fn repeats(batch: &[Event], seen: impl Fn(&str, &str) -> bool) -> Vec<bool> {
    let mut keys: HashSet<(&str, &str)> = HashSet::new();
    batch
        .iter()
        .map(|ev| match ev.idempotency_key.as_deref() {
            None => false,
            Some(key) => {
                let user = &*ev.key.user_id;
                seen(user, key) || !keys.insert((user, key))
            }
        })
        .collect()
}

/// The runs among the batch's events that a client asked to cancel (the registry
/// run's `cancel_requested`), each once, in the order of their first event.
pub fn cancelled(batch: &[Event], registry: &Registry) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut met: HashSet<(&str, &str)> = HashSet::new();
    for ev in batch {
        let (user, run) = (&*ev.key.user_id, &*ev.key.run_id);
        if !met.insert((user, run)) {
            continue;
        }
        let asked = registry
            .get(user)
            .and_then(|u| u.runs.get(run))
            .is_some_and(|r| r.cancel_requested);
        if asked {
            out.push(run.to_owned());
        }
    }
    out
}

/// Constant-time comparison of the presented key with the configured one.
pub fn key_matches(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    let mut diff = a.len() ^ b.len();
    for (i, y) in b.iter().enumerate() {
        let x = a.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The payload of a server text frame.
    fn payload(frame: &[u8]) -> &[u8] {
        match frame[1] & 0x7f {
            126 => &frame[4..],
            127 => &frame[10..],
            _ => &frame[2..],
        }
    }

    fn bad(body: &str) -> (usize, String) {
        match parse_batch(body.as_bytes()) {
            Err(BatchError::Bad { index, message }) => (index, message),
            other => panic!("expected Bad for {body}: {other:?}"),
        }
    }

    #[test]
    fn single_and_batch() {
        let one = r#"{"type":"agent_thinking","user_id":"u","run_id":"r","agent_name":"a","data":{"x": [1, 2]}}"#;
        let evs = parse_batch(one.as_bytes()).unwrap();
        assert_eq!(evs.len(), 1);
        let frame = evs[0].frame(5);
        let v: Value = serde_json::from_slice(payload(&frame)).unwrap();
        assert_eq!(v["data"], serde_json::json!({"x": [1, 2]}));
        assert_eq!(v["thread_id"], Value::Null);
        let batch = format!("[{one}, {one}]");
        assert_eq!(parse_batch(batch.as_bytes()).unwrap().len(), 2);
        assert_eq!(parse_batch(b"[]").unwrap().len(), 0);
    }

    #[test]
    fn data_passes_through_byte_for_byte() {
        let body = r#"{"type":"text_delta","user_id":"u","run_id":"r","agent_name":"a","data":{"b":1.50,"a":"\u00e9"}}"#;
        let evs = parse_batch(body.as_bytes()).unwrap();
        let frame = evs[0].frame(1);
        let text = std::str::from_utf8(payload(&frame)).unwrap();
        assert!(
            text.ends_with(r#""data":{"b":1.50,"a":"\u00e9"}}"#),
            "{text}"
        );
    }

    #[test]
    fn bad_events_name_their_index() {
        let ok = r#"{"type":"agent_thinking","user_id":"u","run_id":"r","agent_name":"a"}"#;
        let cases = [
            (
                r#"{"type":"Bad Type","user_id":"u","run_id":"r","agent_name":"a"}"#,
                "type",
            ),
            (
                r#"{"type":"agent_thinking","run_id":"r","agent_name":"a"}"#,
                "user_id",
            ),
            (
                r#"{"type":"agent_thinking","user_id":7,"run_id":"r","agent_name":"a"}"#,
                "user_id",
            ),
            (
                r#"{"type":"agent_thinking","user_id":"u","agent_name":"a"}"#,
                "run_id",
            ),
            (
                r#"{"type":"agent_thinking","user_id":"u","run_id":"r"}"#,
                "agent_name",
            ),
            (
                r#"{"type":"agent_thinking","user_id":"u","run_id":"r","agent_name":"a","thread_id":5}"#,
                "thread_id",
            ),
            (
                r#"{"type":"agent_thinking","user_id":"","run_id":"r","agent_name":"a"}"#,
                "user_id",
            ),
            // The ThreadId rule, as at the upgrade: no control characters (v1 took them).
            (
                r#"{"type":"agent_thinking","user_id":"u","run_id":"r","agent_name":"a","thread_id":"t\n1"}"#,
                "thread_id must be null or a non-empty string of at most 256 bytes without control characters",
            ),
            (
                r#"{"type":"agent_thinking","user_id":"u","run_id":"r","agent_name":"a","thread_id":"\u0000"}"#,
                "control characters",
            ),
            (
                r#"{"type":"connected","user_id":"u","run_id":"r","agent_name":"a"}"#,
                "reserved",
            ),
            (r#"17"#, "object"),
        ];
        for (event, word) in cases {
            let (index, message) = bad(&format!("[{ok},{ok},{event}]"));
            assert_eq!(index, 2, "{event}");
            assert!(message.contains(word), "{event}: {message}");
        }
        assert_eq!(bad("not json").0, 0);
        assert_eq!(bad("[1,").0, 0);
        assert_eq!(bad("").0, 0);
    }

    #[test]
    fn too_many_events() {
        let ok = r#"{"type":"agent_thinking","user_id":"u","run_id":"r","agent_name":"a"}"#;
        let body = format!("[{}]", vec![ok; MAX_BATCH + 1].join(","));
        assert_eq!(
            parse_batch(body.as_bytes()).err(),
            Some(BatchError::TooMany(MAX_BATCH + 1))
        );
        let body = format!("[{}]", vec![ok; MAX_BATCH].join(","));
        assert_eq!(parse_batch(body.as_bytes()).unwrap().len(), MAX_BATCH);
    }

    #[test]
    fn key_comparison() {
        assert!(key_matches("pk-abc", "pk-abc"));
        assert!(!key_matches("pk-abd", "pk-abc"));
        assert!(!key_matches("pk-ab", "pk-abc"));
        assert!(!key_matches("pk-abcd", "pk-abc"));
        assert!(!key_matches("", "pk-abc"));
    }
}

#[cfg(test)]
mod run_tests {
    use super::*;
    use crate::registry::Limits;

    fn batch(events: &[(&str, &str, &str)]) -> Vec<Event> {
        let items: Vec<String> = events
            .iter()
            .map(|(kind, user, run)| {
                format!(
                    r#"{{"type":"{kind}","user_id":"{user}","run_id":"{run}","agent_name":"a"}}"#
                )
            })
            .collect();
        parse_batch(format!("[{}]", items.join(",")).as_bytes()).unwrap()
    }

    fn registry(per_user: usize, total: usize) -> Registry {
        let limits = Limits {
            max_active_runs_per_user: per_user,
            max_active_runs: total,
            ..Limits::default()
        };
        Registry::new("p".into(), limits)
    }

    #[test]
    fn an_event_after_its_run_ended_refuses_the_batch() {
        let r = registry(10, 10);
        let ok = batch(&[("agent_started", "u", "r1"), ("agent_completed", "u", "r1")]);
        assert_eq!(check_runs(&ok, &r), Ok(()));
        let late = batch(&[
            ("agent_started", "u", "r1"),
            ("agent_completed", "u", "r1"),
            ("agent_thinking", "u", "r1"),
        ]);
        let run = "r1".to_owned();
        assert_eq!(
            check_runs(&late, &r),
            Err(RunRefusal::Ended { index: 2, run })
        );
    }

    #[test]
    fn runs_the_batch_starts_count_against_the_bounds() {
        let r = registry(2, 3);
        let two = batch(&[("agent_started", "u", "a"), ("agent_thinking", "u", "b")]);
        assert_eq!(check_runs(&two, &r), Ok(()));
        let three = batch(&[
            ("agent_started", "u", "a"),
            ("agent_thinking", "u", "a"),
            ("agent_started", "u", "b"),
            ("agent_started", "u", "c"),
        ]);
        let run = "c".to_owned();
        assert_eq!(
            check_runs(&three, &r),
            Err(RunRefusal::TooMany { index: 3, run })
        );
        let total = batch(&[
            ("agent_started", "u", "a"),
            ("agent_started", "v", "a"),
            ("agent_started", "w", "a"),
            ("agent_started", "x", "a"),
        ]);
        let run = "a".to_owned();
        assert_eq!(
            check_runs(&total, &r),
            Err(RunRefusal::TooMany { index: 3, run })
        );
        // An event that ends a run never starts one.
        let ends = batch(&[("agent_completed", "u", "z")]);
        assert_eq!(check_runs(&ends, &registry(0, 0)), Ok(()));
    }
}
