//! Client-to-gateway messages (PROTOCOL.md section 4): parsing one text frame into a
//! [`ClientMessage`], without I/O or state. The reactor acts on the result; every
//! [`BadMessage`] becomes an `error` frame with code `bad_message` (and, after ten in a
//! row, close 1008). Nothing here panics on any input (fuzzed: `fuzz/`, target
//! `client_message`).

use serde_json::{Map, Value};

use crate::ids::{RunId, ThreadId};

/// The `bad_message` text for a `thread_id` that is neither null nor a string.
const THREAD_ID_NOT_A_STRING: &str = "thread_id must be null or a non-empty string";

/// One valid client message. Strings are moved out of the parsed JSON, not copied; an
/// id is copied once, into the shared string of its validated type ([`crate::ids`]).
#[derive(Clone, Debug, PartialEq)]
pub enum ClientMessage {
    /// `{"type":"ping"}`: answered with `pong`.
    Ping,
    /// `{"type":"user_message","text":S,"thread_id":T?,"ref":R?}`.
    UserMessage {
        text: String,
        /// `None` for a missing or null `thread_id`.
        thread_id: Option<ThreadId>,
        /// The optional `ref`, echoed in the `ack` (null when absent).
        reference: Value,
    },
    /// `{"type":"cancel","run_id":R}`.
    Cancel { run_id: RunId },
    /// `{"type":"refresh","token":JWT}`.
    Refresh { token: String },
}

/// Why a text frame is not a valid client message: the fixed `message` of the
/// `bad_message` error sent back (never contains client input).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadMessage(pub &'static str);

impl ClientMessage {
    /// Parse one text frame.
    ///
    /// # Errors
    /// [`BadMessage`] when the text is not JSON, not an object, has no string `type`,
    /// an unknown `type`, or a missing or mistyped field of that type (`text` is checked
    /// before `thread_id`), or a `thread_id` / `run_id` string that breaks the
    /// [`ThreadId`] / [`RunId`] rule (the message states the rule).
    pub fn parse(text: &str) -> Result<ClientMessage, BadMessage> {
        let msg: Value = serde_json::from_str(text).map_err(|_| BadMessage("not JSON"))?;
        let Value::Object(mut obj) = msg else {
            return Err(BadMessage("not a JSON object"));
        };
        let kind = match obj.get("type") {
            Some(Value::String(k)) => k.as_str(),
            _ => return Err(BadMessage("missing field type")),
        };
        match kind {
            "ping" => Ok(ClientMessage::Ping),
            "user_message" => {
                let text = take_string(&mut obj, "text")
                    .ok_or(BadMessage("user_message needs a string field text"))?;
                let thread_id = match obj.remove("thread_id") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(t)) => {
                        Some(ThreadId::try_from(t).map_err(|e| BadMessage(e.message()))?)
                    }
                    Some(_) => return Err(BadMessage(THREAD_ID_NOT_A_STRING)),
                };
                let reference = obj.remove("ref").unwrap_or(Value::Null);
                Ok(ClientMessage::UserMessage {
                    text,
                    thread_id,
                    reference,
                })
            }
            "cancel" => {
                let run_id = take_string(&mut obj, "run_id")
                    .ok_or(BadMessage("cancel needs a string field run_id"))?;
                let run_id = RunId::try_from(run_id).map_err(|e| BadMessage(e.message()))?;
                Ok(ClientMessage::Cancel { run_id })
            }
            "refresh" => take_string(&mut obj, "token")
                .map(|token| ClientMessage::Refresh { token })
                .ok_or(BadMessage("refresh needs a string field token")),
            _ => Err(BadMessage("unknown message type")),
        }
    }
}

/// Move string field `name` out of `obj`; `None` when missing or not a string.
fn take_string(obj: &mut Map<String, Value>, name: &str) -> Option<String> {
    match obj.remove(name) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(text: &str) -> &'static str {
        match ClientMessage::parse(text) {
            Err(BadMessage(m)) => m,
            Ok(m) => panic!("expected bad_message for {text}: {m:?}"),
        }
    }

    #[test]
    fn every_message_type() {
        assert_eq!(
            ClientMessage::parse(r#"{"type":"ping"}"#),
            Ok(ClientMessage::Ping)
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"user_message","text":"hi","thread_id":"t1","ref":7}"#),
            Ok(ClientMessage::UserMessage {
                text: "hi".into(),
                thread_id: Some(ThreadId::parse("t1").unwrap()),
                reference: Value::from(7),
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"user_message","text":"","thread_id":null}"#),
            Ok(ClientMessage::UserMessage {
                text: String::new(),
                thread_id: None,
                reference: Value::Null,
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"run_id":"r-1","type":"cancel"}"#),
            Ok(ClientMessage::Cancel {
                run_id: RunId::parse("r-1").unwrap()
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"refresh","token":"a.b.c"}"#),
            Ok(ClientMessage::Refresh {
                token: "a.b.c".into()
            })
        );
    }

    #[test]
    fn bad_messages_name_what_is_wrong() {
        assert_eq!(bad("nope"), "not JSON");
        assert_eq!(bad(""), "not JSON");
        assert_eq!(bad(r#"{"type":"ping"} x"#), "not JSON");
        assert_eq!(bad("[1]"), "not a JSON object");
        assert_eq!(bad("\"ping\""), "not a JSON object");
        assert_eq!(bad("{}"), "missing field type");
        assert_eq!(bad(r#"{"type":1}"#), "missing field type");
        assert_eq!(bad(r#"{"type":"PING"}"#), "unknown message type");
        assert_eq!(
            bad(r#"{"type":"user_message","thread_id":5}"#),
            "user_message needs a string field text"
        );
        for thread in ["5", "[]", "{}", "true"] {
            assert_eq!(
                bad(&format!(
                    r#"{{"type":"user_message","text":"x","thread_id":{thread}}}"#
                )),
                "thread_id must be null or a non-empty string"
            );
        }
        assert_eq!(
            bad(r#"{"type":"cancel","run_id":3}"#),
            "cancel needs a string field run_id"
        );
        assert_eq!(
            bad(r#"{"type":"refresh"}"#),
            "refresh needs a string field token"
        );
    }

    /// `thread_id` and `run_id` follow the one rule of their kind ([`crate::ids`]):
    /// a thread with control characters is refused here as at the upgrade, and a
    /// `run_id` no run can have is a bad message (v1: `not_found`).
    #[test]
    fn ids_follow_their_rules() {
        let thread = |t: &str| format!(r#"{{"type":"user_message","text":"x","thread_id":{t}}}"#);
        let long = format!("\"{}\"", "t".repeat(257));
        for t in [
            r#""""#,
            long.as_str(),
            r#""a\u0000b""#,
            r#""t\n""#,
            r#""\u001b[2J""#,
            r#""\u0085""#,
        ] {
            assert_eq!(
                bad(&thread(t)),
                "thread_id must be a non-empty string of at most 256 bytes without control characters",
                "{t}"
            );
        }
        let most = format!("\"{}\"", "t".repeat(256));
        assert!(matches!(
            ClientMessage::parse(&thread(&most)),
            Ok(ClientMessage::UserMessage { thread_id: Some(t), .. }) if t.len() == 256
        ));
        let cancel = |r: &str| format!(r#"{{"type":"cancel","run_id":{r}}}"#);
        let long = format!("\"{}\"", "r".repeat(257));
        for r in [r#""""#, long.as_str()] {
            assert_eq!(
                bad(&cancel(r)),
                "run_id must be a non-empty string of at most 256 bytes"
            );
        }
        assert!(ClientMessage::parse(&cancel(r#""r\n""#)).is_ok());
    }

    /// serde_json's recursion limit turns deep nesting into an error, not a stack
    /// overflow of the reactor thread.
    #[test]
    fn deep_nesting_is_a_bad_message() {
        let deep = format!(
            r#"{{"type":"ping","x":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(bad(&deep), "not JSON");
    }
}
