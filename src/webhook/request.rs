//! The body of one webhook request (PROTOCOL.md section 6b): the JSON object POSTed to
//! `inbound_url` for a client's `user_message` or `cancel`. Pure data, no I/O; the
//! worker threads serialize it ([`InboundRequest::to_json`]).
//!
//! Every one of the nine keys is always present, so a worker in any language can read
//! them without checking for absence (the choices, also in docs/OPERATIONS.md):
//! - `thread_id`: the message's thread; for a `cancel`, the thread the run was started
//!   on or first published with; `null` when none.
//! - `text`: the message's text; `null` for a `cancel`.
//! - `ref`: the `user_message`'s `ref` as a string: a string as sent, any other JSON
//!   value (a number, say) as its compact JSON text (`7` becomes `"7"`), `null` when the
//!   client sent none or `null`. Always `null` for a `cancel` (it has no `ref`).
//! - `connection_id`: the client's connection, as in its `connected` frame.
//! - `node_id`: the node's `node_id` under the Redis engine (as in the client's
//!   `connected` frame); `null` on the memory engine, which has no node name.
//! - `ts`: milliseconds since the Unix epoch when the gateway read the message.

use serde::Serialize;
use serde_json::Value;

/// What the client sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InboundKind {
    UserMessage,
    Cancel,
}

/// One webhook request body (see the module docs for each field).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InboundRequest {
    #[serde(rename = "type")]
    pub kind: InboundKind,
    pub user_id: String,
    pub thread_id: Option<String>,
    pub run_id: String,
    pub text: Option<String>,
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    pub connection_id: String,
    pub node_id: Option<String>,
    pub ts: u64,
}

impl InboundRequest {
    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        // Strings, numbers and nulls only: serialization cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A client's `ref` as the webhook sends it: see the module docs.
pub fn ref_text(reference: &Value) -> Option<String> {
    match reference {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_key_is_present_with_nulls_where_absent() {
        let req = InboundRequest {
            kind: InboundKind::Cancel,
            user_id: "u1".into(),
            thread_id: None,
            run_id: "r-1".into(),
            text: None,
            reference: None,
            connection_id: "c00000001".into(),
            node_id: None,
            ts: 17,
        };
        let v: Value = serde_json::from_slice(&req.to_json()).unwrap();
        assert_eq!(
            v,
            json!({"type": "cancel", "user_id": "u1", "thread_id": null, "run_id": "r-1",
                   "text": null, "ref": null, "connection_id": "c00000001",
                   "node_id": null, "ts": 17})
        );
        let msg = InboundRequest {
            kind: InboundKind::UserMessage,
            thread_id: Some("t1".into()),
            text: Some("héllo \"x\"".into()),
            reference: ref_text(&json!("m1")),
            ..req
        };
        let v: Value = serde_json::from_slice(&msg.to_json()).unwrap();
        assert_eq!(v["type"], "user_message");
        assert_eq!(v["text"], "héllo \"x\"");
        assert_eq!(v["ref"], "m1");
        assert_eq!(v["thread_id"], "t1");
    }

    #[test]
    fn refs_become_strings() {
        assert_eq!(ref_text(&Value::Null), None);
        assert_eq!(ref_text(&json!("m1")).as_deref(), Some("m1"));
        assert_eq!(ref_text(&json!(7)).as_deref(), Some("7"));
        assert_eq!(
            ref_text(&json!({"a": [1]})).as_deref(),
            Some(r#"{"a":[1]}"#)
        );
    }
}
