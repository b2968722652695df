//! The AG-UI 1.0 events the gateway writes, typed: each wire name and field name is
//! written once, here, and serde derives the JSON. Optional fields are left out when
//! absent (AG-UI's schemas refuse `null` in them); `timestamp` is an integer
//! (milliseconds since the Unix epoch, the agentwire event's `ts`).
//!
//! Every frame also carries `runId` (a key AG-UI's schemas keep on every event) so a
//! client reading one connection can split its frames by run, and
//! `metadata: {"seq": N, "epoch": E}`: the agentwire event the frame comes from.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// `metadata` of every frame.
#[derive(Serialize)]
pub struct Meta<'a> {
    pub seq: u64,
    pub epoch: &'a str,
}

/// One AG-UI event as written: the event, then `runId`, `timestamp`, `metadata`.
#[derive(Serialize)]
pub struct Frame<'a> {
    #[serde(flatten)]
    pub body: Body<'a>,
    #[serde(rename = "runId")]
    pub run_id: &'a str,
    pub timestamp: u64,
    pub metadata: Meta<'a>,
}

impl Frame<'_> {
    /// The complete WebSocket text frame.
    pub fn to_frame(&self) -> Bytes {
        crate::event::text_frame(&crate::frames::to_json(self))
    }
}

/// `outcome` of `RUN_FINISHED`.
#[derive(Serialize)]
pub struct Outcome {
    #[serde(rename = "type")]
    pub kind: &'static str,
}

/// The AG-UI event types the translation produces (AG-UI 1.0 names).
#[derive(Serialize)]
#[serde(
    tag = "type",
    rename_all = "SCREAMING_SNAKE_CASE",
    rename_all_fields = "camelCase"
)]
pub enum Body<'a> {
    RunStarted {
        thread_id: &'a str,
        /// The agentwire `agent_started` event itself (when there was one).
        #[serde(skip_serializing_if = "Option::is_none")]
        raw_event: Option<&'a RawValue>,
    },
    RunFinished {
        thread_id: &'a str,
        /// The `agent_completed` event's `data` (left out when `null`).
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<&'a Value>,
        outcome: Outcome,
    },
    RunError {
        thread_id: &'a str,
        message: Cow<'a, str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        code: Option<&'a str>,
        /// The agentwire `agent_error` event itself.
        #[serde(skip_serializing_if = "Option::is_none")]
        raw_event: Option<&'a RawValue>,
    },
    TextMessageStart {
        message_id: &'a str,
        role: &'static str,
    },
    TextMessageContent {
        message_id: &'a str,
        delta: Cow<'a, str>,
    },
    TextMessageEnd {
        message_id: &'a str,
    },
    ReasoningStart {
        message_id: &'a str,
    },
    ReasoningMessageStart {
        message_id: &'a str,
        role: &'static str,
    },
    ReasoningMessageContent {
        message_id: &'a str,
        delta: Cow<'a, str>,
    },
    ReasoningMessageEnd {
        message_id: &'a str,
    },
    ReasoningEnd {
        message_id: &'a str,
    },
    ToolCallStart {
        tool_call_id: &'a str,
        tool_call_name: &'a str,
    },
    ToolCallArgs {
        tool_call_id: &'a str,
        delta: Cow<'a, str>,
    },
    ToolCallEnd {
        tool_call_id: &'a str,
    },
    ToolCallResult {
        message_id: &'a str,
        tool_call_id: &'a str,
        content: Cow<'a, str>,
        role: &'static str,
    },
    Custom {
        name: &'a str,
        value: &'a Value,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `body` in a frame of run `r`, timestamp 5, seq 3, epoch `e`, as JSON text.
    fn json_of(body: Body<'_>) -> String {
        let f = Frame {
            body,
            run_id: "r",
            timestamp: 5,
            metadata: Meta { seq: 3, epoch: "e" },
        };
        String::from_utf8(crate::frames::to_json(&f)).unwrap()
    }

    #[test]
    fn names_and_optional_fields() {
        assert_eq!(
            json_of(Body::ToolCallStart {
                tool_call_id: "c1",
                tool_call_name: "sql",
            }),
            r#"{"type":"TOOL_CALL_START","toolCallId":"c1","toolCallName":"sql","runId":"r","timestamp":5,"metadata":{"seq":3,"epoch":"e"}}"#
        );
        assert_eq!(
            json_of(Body::RunError {
                thread_id: "t",
                message: "boom".into(),
                code: None,
                raw_event: None,
            }),
            r#"{"type":"RUN_ERROR","threadId":"t","message":"boom","runId":"r","timestamp":5,"metadata":{"seq":3,"epoch":"e"}}"#
        );
    }
}
