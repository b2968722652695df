//! Fuzz target `client_message`: one text frame -> the gateway's client-message parser
//! (`agentwire::__internal::client_message::ClientMessage::parse`, what the reactor calls for every
//! text frame of an open session).
//!
//! Asserted:
//! - no panic (deep nesting included: serde_json's recursion limit);
//! - every error is one of the fixed `bad_message` texts (the reactor answers each with
//!   `{"type":"error","code":"bad_message",...}`), never client input, and it is the
//!   one PROTOCOL.md section 4 names for that input: not JSON, not an object, no string
//!   `type`, unknown `type`, the missing/mistyped field of that type, or a `thread_id`
//!   / `run_id` breaking its rule (`agentwire::ids`: a thread id is 1 to 256 bytes
//!   without control characters, a run id 1 to 256 bytes);
//! - a parsed message carries exactly the fields of the JSON object (checked against
//!   `serde_json::Value`), and the frames the reactor answers with (`error`, `ack`)
//!   are single unmasked text frames holding a JSON object.
//!
//! Input: the bytes of the frame; non-UTF-8 input is skipped, as tungstenite closes
//! with 1007 before the parser sees it.

#![no_main]

use agentwire::__internal::client_message::{BadMessage, ClientMessage};
use agentwire::__internal::event::control_frame;
use agentwire::__internal::ids::{RunId, ThreadId};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

const BAD_MESSAGES: [&str; 10] = [
    "not JSON",
    "not a JSON object",
    "missing field type",
    "unknown message type",
    "user_message needs a string field text",
    "thread_id must be null or a non-empty string",
    THREAD_RULE,
    "cancel needs a string field run_id",
    RUN_RULE,
    "refresh needs a string field token",
];
const THREAD_RULE: &str =
    "thread_id must be a non-empty string of at most 256 bytes without control characters";
const RUN_RULE: &str = "run_id must be a non-empty string of at most 256 bytes";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = ClientMessage::parse(text);
    match &parsed {
        Err(BadMessage(why)) => {
            assert!(
                BAD_MESSAGES.contains(why),
                "unlisted bad_message text {why:?}"
            );
            let frame =
                control_frame(&json!({"type": "error", "code": "bad_message", "message": why}));
            check_text_frame(&frame);
        }
        Ok(ClientMessage::UserMessage { reference, .. }) => {
            let frame = control_frame(&json!({"type": "ack", "ref": reference, "run_id": "r-1"}));
            check_text_frame(&frame);
        }
        Ok(_) => {}
    }
    assert_eq!(parsed, expected(text), "for {text:?}");
});

/// What section 4 says `text` is, read off `serde_json::Value`.
fn expected(text: &str) -> Result<ClientMessage, BadMessage> {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return Err(BadMessage("not JSON"));
    };
    let Some(obj) = value.as_object() else {
        return Err(BadMessage("not a JSON object"));
    };
    let Some(kind) = obj.get("type").and_then(Value::as_str) else {
        return Err(BadMessage("missing field type"));
    };
    let string = |name: &str| obj.get(name).and_then(Value::as_str).map(str::to_owned);
    match kind {
        "ping" => Ok(ClientMessage::Ping),
        "user_message" => {
            let text =
                string("text").ok_or(BadMessage("user_message needs a string field text"))?;
            let thread_id = match obj.get("thread_id") {
                None | Some(Value::Null) => None,
                Some(Value::String(t))
                    if (1..=ThreadId::MAX_BYTES).contains(&t.len())
                        && !t.chars().any(char::is_control) =>
                {
                    Some(ThreadId::parse(t).expect("a valid thread id"))
                }
                Some(Value::String(_)) => return Err(BadMessage(THREAD_RULE)),
                Some(_) => return Err(BadMessage("thread_id must be null or a non-empty string")),
            };
            Ok(ClientMessage::UserMessage {
                text,
                thread_id,
                reference: obj.get("ref").cloned().unwrap_or(Value::Null),
            })
        }
        "cancel" => {
            let run_id = string("run_id").ok_or(BadMessage("cancel needs a string field run_id"))?;
            if !(1..=RunId::MAX_BYTES).contains(&run_id.len()) {
                return Err(BadMessage(RUN_RULE));
            }
            Ok(ClientMessage::Cancel {
                run_id: RunId::parse(&run_id).expect("a valid run id"),
            })
        }
        "refresh" => string("token")
            .map(|token| ClientMessage::Refresh { token })
            .ok_or(BadMessage("refresh needs a string field token")),
        _ => Err(BadMessage("unknown message type")),
    }
}

/// One FIN text frame, unmasked, with a correct length, holding a JSON object.
fn check_text_frame(frame: &[u8]) {
    let (_, payload) = agentwire_fuzz::text_frame_payload(frame);
    let v: Value = serde_json::from_slice(payload).expect("frame payload is JSON");
    assert!(v.is_object());
}
