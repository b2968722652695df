//! What the gateway writes itself, typed: the server frames of PROTOCOL.md section 4
//! ([`ServerFrame`]: `connected`, `pong`, `ack`, `error`, `refreshed`,
//! `cancel_requested`), the error codes of frames and HTTP answers ([`ErrorCode`]), the
//! JSON bodies of the HTTP answers ([`ErrorBody`], [`Accepted`], [`Health`]), and the
//! `data` of the `agent_error` events the gateway itself ends runs with
//! ([`AgentErrorData`]). Each wire name is written once, here; serde derives the JSON.
//!
//! The JSON is the wire's as before the types: the same field names, `null` where a
//! field was `null` and absent where it was absent. Keys are in declaration order with
//! `type` first (as in event frames); clients read them by name.

use serde::{Serialize, Serializer};
use serde_json::Value;

/// The `code` of an `error` frame or the `error` of an HTTP answer (PROTOCOL.md
/// sections 3, 4 and 10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// A client message that is not a valid message.
    BadMessage,
    /// A `user_message` text over `max_user_message_bytes`.
    TooLarge,
    /// A `refresh` sooner than one per second.
    RateLimited,
    /// A token (upgrade or `refresh`) that does not verify.
    InvalidToken,
    /// The workers' queue or the user's pending runs are full.
    Busy,
    /// No worker consumes user messages.
    NoAgent,
    /// No such path, or no such run (`cancel`), or the publish API is disabled.
    NotFound,
    BadRequest,
    Forbidden,
    UpgradeRequired,
    TooManyConnections,
    HeadersTooLarge,
    PayloadTooLarge,
    MethodNotAllowed,
    /// At the descriptor limit (503).
    Overloaded,
    ShuttingDown,
    /// A publish request with a missing or wrong key (401).
    InvalidKey,
    /// A publish batch with an invalid event, or one of an ended run (400).
    BadEvent,
    /// A publish batch that would start a run past the run bounds (429).
    TooManyRuns,
    /// The gateway could not do what was asked (500; `POST /dev/token` only).
    Internal,
    /// `max_revoked_users` users are revoked already: a revocation with `until` is
    /// refused, nothing done (503; `POST /api/users/{user_id}/disconnect`).
    TooManyRevocations,
    /// The engine (Redis) did not answer within `redis_timeout_ms` (503).
    EngineUnavailable,
}

impl ErrorCode {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::Busy => "busy",
            ErrorCode::NoAgent => "no_agent",
            ErrorCode::NotFound => "not_found",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::UpgradeRequired => "upgrade_required",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::HeadersTooLarge => "headers_too_large",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::InvalidKey => "invalid_key",
            ErrorCode::BadEvent => "bad_event",
            ErrorCode::TooManyRuns => "too_many_runs",
            ErrorCode::Internal => "internal",
            ErrorCode::TooManyRevocations => "too_many_revocations",
            ErrorCode::EngineUnavailable => "engine_unavailable",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A frame the gateway writes itself on a session (events are built by
/// [`crate::event::Event`]). Serialized as `{"type": ..., fields...}`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// The first frame of a session.
    Connected(Connected<'a>),
    /// The answer to a client `ping`: the gateway's wall clock (ms).
    Pong { ts: u64 },
    /// A `user_message` was accepted: its `ref` (`null` when it had none) and run.
    Ack {
        #[serde(rename = "ref")]
        reference: &'a Value,
        run_id: &'a str,
    },
    /// A client message was refused; `ref` only when it answers a `user_message`.
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
    },
    /// A `refresh` was accepted: the new token's expiry (s).
    Refreshed { exp: u64 },
    /// A `cancel` was passed on.
    CancelRequested { run_id: &'a str },
}

impl ServerFrame<'_> {
    /// The `type` of every server frame: names an event may not take.
    pub const TYPES: [&'static str; 6] = [
        "connected",
        "pong",
        "ack",
        "error",
        "refreshed",
        "cancel_requested",
    ];
}

/// The `connected` frame (PROTOCOL.md section 4).
#[derive(Debug, Serialize)]
pub struct Connected<'a> {
    pub connection_id: String,
    pub user_id: &'a str,
    pub mode: &'static str,
    pub thread_id: Option<&'a str>,
    pub epoch: &'a str,
    pub last_seq: u64,
    /// `null` when no resume was asked, else whether it is exact.
    pub resumed: Option<bool>,
    pub heartbeat_interval_ms: u64,
    pub token_exp: u64,
    pub active_runs: Vec<ActiveRun<'a>>,
    /// Present (`true`) only when `active_runs` was cut to its maximum.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub active_runs_truncated: bool,
    /// The node's name (Redis engine only, PROTOCOL.md section 9); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<&'a str>,
}

/// One run in progress listed by `connected`.
#[derive(Debug, Serialize)]
pub struct ActiveRun<'a> {
    pub run_id: &'a str,
    pub thread_id: Option<&'a str>,
    pub agent_name: &'a str,
    pub started_ts: u64,
    pub last_seq: u64,
    pub last_type: &'a str,
}

/// The body of an HTTP error answer: `{"error": code, "message": text}`, with the
/// `index` of the refused event for a publish batch.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorCode,
    pub message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

impl ErrorBody<'_> {
    /// `{"error": code, "message": message}`.
    pub fn new(error: ErrorCode, message: &str) -> ErrorBody<'_> {
        ErrorBody {
            error,
            message,
            index: None,
        }
    }
}

/// The 202 answer of the publish API.
#[derive(Debug, Serialize)]
pub struct Accepted {
    pub accepted: usize,
    /// Runs among the request's events that a client asked to cancel, each once
    /// (PROTOCOL.md section 6b); always present.
    pub cancelled: Vec<String>,
}

/// The 200 answer of `POST /api/users/{user_id}/disconnect`: sessions closed (4004).
#[derive(Debug, Serialize)]
pub struct Disconnected {
    pub closed: usize,
}

/// `GET /health`'s status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Healthy,
    /// Serving, but an accept failed recently (descriptor limit).
    Degraded,
    /// Shutting down (503).
    Draining,
}

/// `GET /health`'s body.
#[derive(Debug, Serialize)]
pub struct Health<'a> {
    pub status: HealthStatus,
    pub version: &'static str,
    pub uptime_s: u64,
    pub connections: usize,
    pub epoch: &'a str,
    pub accept_failures: u64,
    /// Why it is degraded (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

/// Why the gateway itself ended a run with an `agent_error` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentErrorReason {
    /// The run's `user_message` can never reach a worker (none consumes them any more).
    NoAgent,
    /// No event for `run_idle_timeout_ms` (the run watchdog).
    RunTimeout,
    /// The gateway is shutting down.
    Shutdown,
}

/// The `data` of such an `agent_error`: `{"reason": ...}`.
#[derive(Debug, Serialize)]
pub struct AgentErrorData {
    pub reason: AgentErrorReason,
}

/// `value` as JSON bytes (these types always serialize; `{}` if one ever did not).
pub fn to_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v<T: Serialize>(t: &T) -> Value {
        serde_json::to_value(t).unwrap()
    }

    #[test]
    fn frames_keep_the_wire_json() {
        assert_eq!(
            v(&ServerFrame::Pong { ts: 5 }),
            json!({"type": "pong", "ts": 5})
        );
        let r = json!("m1");
        assert_eq!(
            v(&ServerFrame::Ack {
                reference: &r,
                run_id: "r-1"
            }),
            json!({"type": "ack", "ref": "m1", "run_id": "r-1"})
        );
        let e = ServerFrame::Error {
            code: ErrorCode::Busy,
            message: "m",
            reference: None,
        };
        assert_eq!(
            v(&e),
            json!({"type": "error", "code": "busy", "message": "m"})
        );
        let null = Value::Null;
        let e = ServerFrame::Error {
            code: ErrorCode::TooLarge,
            message: "m",
            reference: Some(&null),
        };
        assert_eq!(
            v(&e),
            json!({"type": "error", "code": "too_large", "message": "m", "ref": null})
        );
        assert_eq!(
            v(&ServerFrame::Refreshed { exp: 9 }),
            json!({"type": "refreshed", "exp": 9})
        );
        assert_eq!(
            v(&ServerFrame::CancelRequested { run_id: "r" }),
            json!({"type": "cancel_requested", "run_id": "r"})
        );
        // Type first, as in event frames.
        let text = String::from_utf8(to_json(&ServerFrame::Pong { ts: 1 })).unwrap();
        assert_eq!(text, r#"{"type":"pong","ts":1}"#);
    }

    fn connected(resumed: Option<bool>, active_runs_truncated: bool) -> Connected<'static> {
        Connected {
            connection_id: "c00000001".into(),
            user_id: "u",
            mode: "shared",
            thread_id: None,
            epoch: "e",
            last_seq: 3,
            resumed,
            heartbeat_interval_ms: 30_000,
            token_exp: 99,
            active_runs: vec![ActiveRun {
                run_id: "r",
                thread_id: None,
                agent_name: "a",
                started_ts: 1,
                last_seq: 2,
                last_type: "agent_started",
            }],
            active_runs_truncated,
            node_id: None,
        }
    }

    #[test]
    fn connected_has_nulls_and_the_truncation_flag_only_when_cut() {
        let want = json!({"type": "connected", "connection_id": "c00000001", "user_id": "u",
            "mode": "shared", "thread_id": null, "epoch": "e", "last_seq": 3, "resumed": null,
            "heartbeat_interval_ms": 30_000, "token_exp": 99, "active_runs": [{"run_id": "r",
            "thread_id": null, "agent_name": "a", "started_ts": 1, "last_seq": 2,
            "last_type": "agent_started"}]});
        assert_eq!(v(&ServerFrame::Connected(connected(None, false))), want);
        let got = v(&ServerFrame::Connected(connected(Some(false), true)));
        assert_eq!(got["active_runs_truncated"], true);
        assert_eq!(got["resumed"], false);
    }

    #[test]
    fn every_frame_type_is_listed_as_reserved() {
        let r = Value::Null;
        let frames = [
            ServerFrame::Connected(connected(None, false)),
            ServerFrame::Pong { ts: 0 },
            ServerFrame::Ack {
                reference: &r,
                run_id: "",
            },
            ServerFrame::Error {
                code: ErrorCode::Busy,
                message: "",
                reference: None,
            },
            ServerFrame::Refreshed { exp: 0 },
            ServerFrame::CancelRequested { run_id: "" },
        ];
        let types: Vec<String> = frames
            .iter()
            .map(|f| v(f)["type"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(types, ServerFrame::TYPES);
    }

    #[test]
    fn answers_keep_the_wire_json() {
        assert_eq!(
            v(&ErrorBody::new(ErrorCode::InvalidKey, "m")),
            json!({"error": "invalid_key", "message": "m"})
        );
        let indexed = ErrorBody {
            error: ErrorCode::BadEvent,
            message: "m",
            index: Some(2),
        };
        assert_eq!(
            v(&indexed),
            json!({"error": "bad_event", "message": "m", "index": 2})
        );
        let accepted = Accepted {
            accepted: 3,
            cancelled: Vec::new(),
        };
        assert_eq!(v(&accepted), json!({"accepted": 3, "cancelled": []}));
        let accepted = Accepted {
            accepted: 1,
            cancelled: vec!["r".into()],
        };
        assert_eq!(v(&accepted), json!({"accepted": 1, "cancelled": ["r"]}));
        let data = AgentErrorData {
            reason: AgentErrorReason::RunTimeout,
        };
        assert_eq!(v(&data), json!({"reason": "run_timeout"}));
        assert_eq!(v(&HealthStatus::Degraded), json!("degraded"));
    }
}
