//! Reading AG-UI frames (`encoding=agui`, PROTOCOL.md section 11) in tests: their types,
//! the seq in their `metadata`, a run's frames up to a type, and quiet after them.

use std::time::Duration;

use serde_json::Value;

use super::{Client, Frame};

/// The `type` of each frame.
pub fn types(frames: &[Value]) -> Vec<&str> {
    frames
        .iter()
        .map(|f| f["type"].as_str().unwrap_or("?"))
        .collect()
}

/// A frame's `metadata.seq`.
pub fn seq(f: &Value) -> u64 {
    f["metadata"]["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no metadata.seq: {f}"))
}

/// AG-UI frames until (and with) the one of `last_type` for `run`.
pub fn recv_until(c: &mut Client, run: &str, last_type: &str) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let f = c.recv_json();
        let done = f["type"] == last_type && f["runId"] == run;
        got.push(f);
        if done {
            return got;
        }
        assert!(got.len() < 500, "no {last_type} for {run}: {got:?}");
    }
}

/// Nothing more arrives for a moment (the gateway sent exactly what was read).
pub fn assert_quiet(c: &mut Client) {
    match c.next_frame(Duration::from_millis(200)) {
        Frame::Timeout => {}
        other => panic!("unexpected frame {other:?}"),
    }
}
