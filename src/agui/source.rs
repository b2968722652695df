//! Reading an agentwire event back from its frame: the translator's input is the
//! frame a connection would have received (the WebSocket text frame the registry keeps
//! for replay, or the one another engine delivers), never the registry's internals.

use serde::Deserialize;
use serde_json::Value;

/// The fields of an agentwire event (PROTOCOL.md section 2) the translation reads.
#[derive(Debug, Deserialize)]
pub struct Source {
    #[serde(rename = "type")]
    pub kind: String,
    pub seq: u64,
    #[serde(default)]
    pub thread_id: Option<String>,
    pub run_id: String,
    #[serde(default)]
    pub ts: u64,
    /// The worker's payload (`null` when it sent none).
    #[serde(default)]
    pub data: Value,
}

/// Only what the run state needs: the light parse used when a connection's state is
/// rebuilt from kept events (`data` is skipped but for `tool_call_id`).
#[derive(Deserialize)]
struct Light {
    #[serde(rename = "type")]
    kind: String,
    seq: u64,
    #[serde(default)]
    thread_id: Option<String>,
    run_id: String,
    #[serde(default)]
    ts: u64,
    #[serde(default)]
    data: Option<LightData>,
}

#[derive(Deserialize)]
struct LightData {
    #[serde(default)]
    tool_call_id: Option<Value>,
}

impl Source {
    /// Parse an event's JSON; `None` when it is not an agentwire event.
    pub fn parse(json: &[u8]) -> Option<Source> {
        serde_json::from_slice(json).ok()
    }

    /// Parse an event's JSON keeping of `data` only its `tool_call_id`: enough to
    /// follow a run's state without building the payload.
    pub fn parse_light(json: &[u8]) -> Option<Source> {
        let l: Light = serde_json::from_slice(json).ok()?;
        let data = match l.data.and_then(|d| d.tool_call_id) {
            Some(id) => {
                let mut m = serde_json::Map::new();
                m.insert("tool_call_id".into(), id);
                Value::Object(m)
            }
            None => Value::Null,
        };
        Some(Source {
            kind: l.kind,
            seq: l.seq,
            thread_id: l.thread_id,
            run_id: l.run_id,
            ts: l.ts,
            data,
        })
    }

    /// A string field of `data`, if `data` is an object holding one there.
    pub fn data_str(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }

    /// The worker's `tool_call_id`: a non-empty string in `data`.
    pub fn tool_call_id(&self) -> Option<&str> {
        self.data_str("tool_call_id").filter(|s| !s.is_empty())
    }
}

/// The payload of a complete unmasked WebSocket frame as the gateway writes them
/// (one frame, FIN set, no mask); `None` for anything shorter than its header says.
pub fn json_payload(frame: &[u8]) -> Option<&[u8]> {
    let len_byte = frame.get(1)? & 0x7f;
    let start = match len_byte {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    frame.get(start..)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::text_frame;

    #[test]
    fn the_payload_of_frames_of_every_header_length() {
        for n in [0usize, 125, 126, 65_535, 65_536] {
            let body = vec![b'x'; n];
            let frame = text_frame(&body);
            assert_eq!(json_payload(&frame), Some(&body[..]), "{n} bytes");
        }
        assert_eq!(json_payload(&[0x81]), None);
    }

    #[test]
    fn light_parse_keeps_only_the_tool_call_id() {
        let json = br#"{"type":"tool_executing","seq":7,"user_id":"u","thread_id":null,
            "run_id":"r","agent_name":"a","ts":5,"data":{"tool":"sql","args":{"q":1},"tool_call_id":"c1"}}"#;
        let s = Source::parse_light(json).unwrap();
        assert_eq!((s.kind.as_str(), s.seq, s.ts), ("tool_executing", 7, 5));
        assert_eq!(s.tool_call_id(), Some("c1"));
        assert_eq!(s.data.get("tool"), None);
        let full = Source::parse(json).unwrap();
        assert_eq!(full.data_str("tool"), Some("sql"));
        assert!(Source::parse(b"{\"type\":\"connected\"}").is_none());
    }
}
