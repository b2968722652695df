//! Fuzz target `publish_body`: bytes -> the publish API's body parser
//! (`agentwire::__internal::publish::parse_batch`, `POST /api/events`), then the frames the
//! reactor would build from what it accepted.
//!
//! Asserted:
//! - no panic;
//! - an accepted body is JSON: one object or an array of at most `MAX_BATCH`, one
//!   event per element, in order; each event's type matches `^[a-z][a-z0-9_]{0,63}$`
//!   and is not reserved, `user_id` is 1..=128 bytes, `run_id` 1..=256, `agent_name`
//!   at most 256, `thread_id` null or 1..=256 bytes without control characters (the
//!   `agentwire::ids` rules);
//! - each event's frame (with a seq) is one unmasked FIN text frame whose payload is a
//!   JSON object carrying exactly those fields, the seq, and `data` equal to the
//!   element's `data` (null when absent);
//! - `TooMany(n)` only for an array of n > `MAX_BATCH` elements; `Bad { index }` names
//!   an element of the body (index 0 for a body that is not a JSON object or array).

#![no_main]

use agentwire::__internal::publish::{parse_batch, BatchError, MAX_BATCH};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

use serde_json::value::RawValue;

const RESERVED: [&str; 6] = [
    "connected",
    "pong",
    "ack",
    "error",
    "refreshed",
    "cancel_requested",
];

/// One element of a body or one frame payload: fields as raw JSON text (the last of
/// duplicates, as serde_json keeps it).
type Fields = BTreeMap<String, Box<RawValue>>;

fuzz_target!(|data: &[u8]| {
    let parsed = parse_batch(data);
    // The body's elements as raw JSON text: numbers out of f64 range (`1e999`) are
    // valid JSON and passed through, so nothing here goes through `Value` numbers.
    let items: Option<Vec<Box<RawValue>>> = match serde_json::from_slice::<Box<RawValue>>(data) {
        Ok(raw) if raw.get().starts_with('[') => serde_json::from_str(raw.get()).ok(),
        Ok(raw) if raw.get().starts_with('{') => Some(vec![raw]),
        _ => None,
    };
    match parsed {
        Ok(events) => {
            let items = items.expect("accepted a body that is not a JSON object or array");
            assert!(events.len() <= MAX_BATCH);
            assert_eq!(events.len(), items.len());
            for (i, (event, item)) in events.iter().zip(&items).enumerate() {
                let item: Fields =
                    serde_json::from_str(item.get()).expect("accepted element is an object");
                let seq = 1 + i as u64 * 7919;
                let frame = event.frame(seq);
                check_event(&frame_fields(&frame), &item, seq);
            }
        }
        Err(BatchError::TooMany(n)) => {
            assert!(n > MAX_BATCH);
            assert_eq!(
                items.map(|i| i.len()),
                Some(n),
                "TooMany count is not the array length"
            );
        }
        Err(BatchError::Bad { index, message }) => {
            assert!(!message.is_empty());
            match items {
                Some(items) if !items.is_empty() => assert!(index < items.len()),
                _ => assert_eq!(index, 0),
            }
        }
    }
});

/// A field as a string, `None` when absent or not a string.
fn string(fields: &Fields, name: &str) -> Option<String> {
    fields
        .get(name)
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
}

fn check_event(got: &Fields, item: &Fields, seq: u64) {
    let kind = string(item, "type").expect("accepted event has a string type");
    let b = kind.as_bytes();
    assert!(b.len() <= 64 && b[0].is_ascii_lowercase());
    assert!(b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_'));
    assert!(
        !RESERVED.contains(&kind.as_str()),
        "reserved type {kind} accepted"
    );
    let len = |name: &str| string(item, name).map(|s| s.len());
    assert!(matches!(len("user_id"), Some(1..=128)));
    assert!(matches!(len("run_id"), Some(1..=256)));
    assert!(matches!(len("agent_name"), Some(0..=256)));
    match item.get("thread_id").map(|raw| raw.get()) {
        None | Some("null") => assert_eq!(got["thread_id"].get(), "null"),
        Some(_) => {
            let t = string(item, "thread_id").expect("accepted thread_id is a string");
            assert!((1..=256).contains(&t.len()));
            assert!(!t.chars().any(char::is_control), "thread_id with control characters");
            assert_eq!(string(got, "thread_id"), Some(t));
        }
    }
    for name in ["type", "user_id", "run_id", "agent_name"] {
        assert_eq!(string(got, name), string(item, name), "field {name}");
    }
    assert_eq!(got["seq"].get(), seq.to_string());
    assert!(got["ts"].get().parse::<u64>().is_ok());
    // Byte for byte (PROTOCOL.md section 2: passed through untouched).
    let want_data = item.get("data").map_or("null", |raw| raw.get());
    assert_eq!(got["data"].get(), want_data, "data not passed through");
    assert_eq!(got.len(), 8, "envelope fields: {:?}", got.keys());
}

/// The payload of one unmasked FIN text frame, parsed as a JSON object.
fn frame_fields(frame: &[u8]) -> Fields {
    let (start, payload) = agentwire_fuzz::text_frame_payload(frame);
    let len = payload.len();
    assert!(start == 2 || len >= 126, "length not in its shortest form");
    assert!(
        start != 10 || len > 65_535,
        "length not in its shortest form"
    );
    serde_json::from_slice(payload).expect("event frame payload is a JSON object")
}
