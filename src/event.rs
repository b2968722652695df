//! Agent events: the kinds, the wire envelope of PROTOCOL.md section 2, and their
//! serialization.
//!
//! An event is serialized once, on the thread that emits it (a worker, or the reactor
//! for the publish API), into an [`Event`] whose JSON body lacks only the per-user
//! `seq`. The reactor assigns `seq` and builds one WebSocket text frame per event
//! ([`Event::frame`]); that frame (a reference-counted [`Bytes`]) is shared by every
//! connection and the replay buffer of the user.

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

use crate::ids::{AgentName, IdError, RunId, ThreadId, UserId};

/// What happened in an agent run. The five critical kinds and `AgentError` are
/// first-class; anything else is a validated custom type such as `text_delta`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    AgentStarted,
    AgentThinking,
    ToolExecuting,
    ToolCompleted,
    AgentCompleted,
    /// The run failed; ends the run like `AgentCompleted`.
    AgentError,
    /// A worker-defined type matching `^[a-z][a-z0-9_]{0,63}$`.
    Custom(Box<str>),
}

impl EventKind {
    /// Parse a type name; `Err` says why a name is not acceptable.
    pub fn parse(name: &str) -> Result<EventKind, EventError> {
        Ok(match name {
            "agent_started" => EventKind::AgentStarted,
            "agent_thinking" => EventKind::AgentThinking,
            "tool_executing" => EventKind::ToolExecuting,
            "tool_completed" => EventKind::ToolCompleted,
            "agent_completed" => EventKind::AgentCompleted,
            "agent_error" => EventKind::AgentError,
            other if valid_custom_type(other) => {
                if RESERVED_TYPES.contains(&other) {
                    return Err(EventError::ReservedType(other.to_owned()));
                }
                EventKind::Custom(other.into())
            }
            other => return Err(EventError::BadType(truncate_for_message(other))),
        })
    }

    /// The wire name.
    pub fn as_str(&self) -> &str {
        match self {
            EventKind::AgentStarted => "agent_started",
            EventKind::AgentThinking => "agent_thinking",
            EventKind::ToolExecuting => "tool_executing",
            EventKind::ToolCompleted => "tool_completed",
            EventKind::AgentCompleted => "agent_completed",
            EventKind::AgentError => "agent_error",
            EventKind::Custom(name) => name,
        }
    }

    /// True for the kinds that end a run.
    pub fn ends_run(&self) -> bool {
        matches!(self, EventKind::AgentCompleted | EventKind::AgentError)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Frame types the gateway itself sends; a worker may not emit them, so a client can
/// always tell gateway frames from events.
const RESERVED_TYPES: &[&str] = &crate::frames::ServerFrame::TYPES;

fn valid_custom_type(name: &str) -> bool {
    let b = name.as_bytes();
    match b.split_first() {
        Some((first, rest)) => {
            first.is_ascii_lowercase()
                && rest.len() <= 63
                && rest
                    .iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
        }
        None => false,
    }
}

fn truncate_for_message(s: &str) -> String {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Why an event was refused before it reached the reactor.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EventError {
    /// The type is not one of ours and does not match `^[a-z][a-z0-9_]{0,63}$`.
    #[error("event type {0:?} is not valid (expected ^[a-z][a-z0-9_]{{0,63}}$)")]
    BadType(String),
    /// The type names a frame the gateway sends itself (`connected`, `ack`, ...).
    #[error("event type {0:?} is reserved for gateway frames")]
    ReservedType(String),
    /// `user_id` breaks the [`UserId`] rule (empty, over 128 bytes).
    #[error("{}", IdError::User)]
    BadUser,
    /// `run_id` breaks the [`RunId`] rule (empty, over 256 bytes).
    #[error("{}", IdError::Run)]
    BadRunId,
    /// `agent_name` breaks the [`AgentName`] rule (over 256 bytes).
    #[error("{}", IdError::AgentName)]
    BadAgentName,
    /// `thread_id` is neither null nor a [`ThreadId`] (empty, over 256 bytes, control
    /// characters).
    #[error("thread_id must be null or {}", ThreadId::RULE)]
    BadThreadId,
    /// The payload could not be serialized to JSON.
    #[error("data is not serializable to JSON: {0}")]
    BadData(String),
    /// `idempotency_key` is not a string of 1 to [`MAX_IDEMPOTENCY_KEY_BYTES`] bytes.
    #[error("idempotency_key must be a string of 1 to 128 bytes")]
    BadIdempotencyKey,
}

/// Longest `idempotency_key`, in bytes (PROTOCOL.md section 6a).
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

impl From<IdError> for EventError {
    fn from(e: IdError) -> EventError {
        match e {
            IdError::User => EventError::BadUser,
            IdError::Thread => EventError::BadThreadId,
            IdError::Run => EventError::BadRunId,
            IdError::AgentName => EventError::BadAgentName,
        }
    }
}

/// Identity of a run's events: who receives them and which run they belong to.
///
/// The fields are the shared strings of validated ids ([`crate::ids`]); the routing
/// state keys its maps by them, so a routed event costs reference-count increments,
/// never a copy.
#[derive(Clone, Debug)]
pub struct RunKey {
    pub user_id: Arc<str>,
    pub thread_id: Option<Arc<str>>,
    pub run_id: Arc<str>,
    pub agent_name: Arc<str>,
}

impl RunKey {
    /// Validate the identifiers of a run, each by its rule: [`UserId`], [`RunId`],
    /// [`AgentName`], then [`ThreadId`] (`None` is a null thread).
    ///
    /// # Errors
    /// The [`EventError`] of the first identifier, in that order, that breaks its rule.
    pub fn new(
        user_id: &str,
        thread_id: Option<&str>,
        run_id: &str,
        agent_name: &str,
    ) -> Result<RunKey, EventError> {
        let user_id = UserId::parse(user_id)?;
        let run_id = RunId::parse(run_id)?;
        let agent_name = AgentName::parse(agent_name)?;
        let thread_id = thread_id.map(ThreadId::parse).transpose()?;
        Ok(RunKey::from_ids(user_id, thread_id, run_id, agent_name))
    }

    /// The key of ids validated already (no allocation: the key keeps their strings).
    pub fn from_ids(
        user_id: UserId,
        thread_id: Option<ThreadId>,
        run_id: RunId,
        agent_name: AgentName,
    ) -> RunKey {
        RunKey {
            user_id: user_id.into_arc(),
            thread_id: thread_id.map(ThreadId::into_arc),
            run_id: run_id.into_arc(),
            agent_name: agent_name.into_arc(),
        }
    }
}

/// One serialized event on its way to the reactor.
pub struct Event {
    pub key: RunKey,
    pub kind: EventKind,
    /// Milliseconds since the Unix epoch at emit (the envelope's `ts`).
    pub ts_ms: u64,
    /// Monotonic emit time, for the emit-to-write latency figure.
    pub emitted: Instant,
    /// Set on the first event of an in-process run: the run handle's cancel flag.
    pub cancel_flag: Option<Arc<AtomicBool>>,
    /// Set on the first event of an in-process run: raised by the reactor when it
    /// refuses the run (`max_active_runs_per_user`, `max_active_runs`), so the run
    /// handle's next emits return `EmitError::TooManyRuns`.
    pub refused_flag: Option<Arc<AtomicBool>>,
    /// The worker's idempotency key (PROTOCOL.md section 6a): a repeat of an accepted
    /// key of the same user within `replay_ttl_ms` is routed only once.
    pub idempotency_key: Option<Arc<str>>,
    /// The JSON object without `seq`: `{"type":"..."` + `,"user_id":...}`; `seq` goes at `split`.
    body: Bytes,
    split: usize,
    /// Where `data` starts in `body` (it ends before the closing brace).
    data_at: usize,
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("kind", &self.kind)
            .field("user", &self.key.user_id)
            .field("run", &self.key.run_id)
            .finish()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Event {
    /// Serialize an event whose `data` is any serializable value.
    pub fn new<D: Serialize + ?Sized>(
        key: RunKey,
        kind: EventKind,
        data: &D,
    ) -> Result<Event, EventError> {
        // Room for the envelope plus a typical small payload: one allocation for most
        // events (a larger payload grows it by doubling).
        Event::build(key, kind, 128, |body| {
            serde_json::to_writer(body, data).map_err(|e| EventError::BadData(e.to_string()))
        })
    }

    /// Serialize an event whose `data` is already JSON text (the publish API passes it
    /// through byte for byte).
    pub fn from_raw_data(key: RunKey, kind: EventKind, data: &str) -> Event {
        let built = Event::build(key, kind, data.len(), |body| {
            body.extend_from_slice(data.as_bytes());
            Ok::<(), std::convert::Infallible>(())
        });
        match built {
            Ok(event) => event,
            Err(never) => match never {},
        }
    }

    /// The envelope (head, the run's fields, `ts`) around the `data` that `write_data`
    /// appends; `data_hint` bytes are reserved for it.
    fn build<E>(
        key: RunKey,
        kind: EventKind,
        data_hint: usize,
        write_data: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<Event, E> {
        let ts_ms = now_ms();
        let mut body = Vec::with_capacity(envelope_len_hint(&key, &kind) + data_hint);
        let split = write_head(&mut body, &kind);
        write_tail_fields(&mut body, &key, ts_ms);
        let data_at = body.len();
        write_data(&mut body)?;
        body.push(b'}');
        Ok(Event {
            key,
            kind,
            ts_ms,
            emitted: Instant::now(),
            cancel_flag: None,
            refused_flag: None,
            idempotency_key: None,
            body: Bytes::from(body),
            split,
            data_at,
        })
    }

    /// This event with the worker's idempotency key (PROTOCOL.md section 6a).
    ///
    /// # Errors
    /// [`EventError::BadIdempotencyKey`] unless the key has 1 to
    /// [`MAX_IDEMPOTENCY_KEY_BYTES`] bytes.
    pub fn with_idempotency_key(mut self, key: &str) -> Result<Event, EventError> {
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(EventError::BadIdempotencyKey);
        }
        self.idempotency_key = Some(Arc::from(key));
        Ok(self)
    }

    /// The complete server-to-client WebSocket text frame for this event with `seq`.
    pub fn frame(&self, seq: u64) -> Bytes {
        let mut digits = itoa::Buffer::new();
        let seq_text = digits.format(seq).as_bytes();
        let (head, tail) = self.body.split_at(self.split.min(self.body.len()));
        let len = head.len() + seq_text.len() + tail.len();
        let mut frame = BytesMut::with_capacity(len + 10);
        put_text_frame_header(&mut frame, len);
        frame.put_slice(head);
        frame.put_slice(seq_text);
        frame.put_slice(tail);
        frame.freeze()
    }

    /// The JSON body before and after the `seq` digits (the Redis engine's publish
    /// script puts the seq Redis assigns between them).
    pub fn around_seq(&self) -> (Bytes, Bytes) {
        let split = self.split.min(self.body.len());
        (self.body.slice(..split), self.body.slice(split..))
    }

    /// Length of the JSON body with a seq of `seq_digits` digits (for stats).
    pub fn json_len(&self) -> usize {
        self.body.len()
    }

    /// The event's `data` as JSON text.
    pub fn data(&self) -> &[u8] {
        let end = self.body.len().saturating_sub(1);
        self.body.get(self.data_at..end).unwrap_or_default()
    }

    /// The string fields of `data` the run metrics read: `reason` (of an
    /// `agent_error`) and `tool_call_id` (of tool events). Both `None` when `data` is
    /// not an object or either field is there but not a string. Parses `data` (skipping
    /// every other field): call it only for the kinds that need it.
    pub fn data_markers(&self) -> DataMarkers {
        serde_json::from_slice::<Markers<'_>>(self.data())
            .map(|m| DataMarkers {
                reason: m.reason.map(|r| r.into_owned().into_boxed_str()),
                tool_call_id: m.tool_call_id.map(|t| t.into_owned().into_boxed_str()),
            })
            .unwrap_or_default()
    }
}

/// Longest `tool_call_id` the run metrics pair tool calls by; a longer one counts as
/// none (the call is paired by order), so open calls stay small.
pub const MAX_TOOL_CALL_ID_BYTES: usize = 64;

impl Event {
    /// `data.tool_call_id` as [`Event::data_markers`] reads it, with a byte search
    /// first so a tool event without one (most) costs no parse; `None` when it is over
    /// [`MAX_TOOL_CALL_ID_BYTES`].
    pub fn tool_call_id(&self) -> Option<Box<str>> {
        if !contains(self.data(), b"\"tool_call_id\"") {
            return None;
        }
        self.data_markers()
            .tool_call_id
            .filter(|id| id.len() <= MAX_TOOL_CALL_ID_BYTES)
    }
}

/// Whether `needle` (starting with `"`) occurs in `hay`: candidates found by the
/// second byte, a letter rarer in JSON than the quote.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    let Some(&second) = needle.get(1) else {
        return hay.starts_with(needle);
    };
    hay.iter()
        .enumerate()
        .skip(1)
        .filter(|(_, b)| **b == second)
        .any(|(i, _)| hay.get(i - 1..i - 1 + needle.len()) == Some(needle))
}

/// What [`Event::data_markers`] found in `data`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DataMarkers {
    pub reason: Option<Box<str>>,
    pub tool_call_id: Option<Box<str>>,
}

#[derive(serde::Deserialize)]
struct Markers<'a> {
    #[serde(borrow, default)]
    reason: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_call_id: Option<std::borrow::Cow<'a, str>>,
}

/// Bytes of the envelope without `seq` and `data`: the fixed keys and punctuation with
/// a 13-digit `ts` (101 B), the names, and a little room for escapes.
fn envelope_len_hint(key: &RunKey, kind: &EventKind) -> usize {
    112 + kind.as_str().len()
        + key.user_id.len()
        + key.thread_id.as_ref().map_or(4, |t| t.len())
        + key.run_id.len()
        + key.agent_name.len()
}

/// `{"type":"<kind>","seq":` — returns the split point (where seq digits go).
fn write_head(out: &mut Vec<u8>, kind: &EventKind) -> usize {
    out.extend_from_slice(b"{\"type\":\"");
    // Kind names are validated to [a-z0-9_]: no escaping needed.
    out.extend_from_slice(kind.as_str().as_bytes());
    out.extend_from_slice(b"\",\"seq\":");
    out.len()
}

fn write_tail_fields(out: &mut Vec<u8>, key: &RunKey, ts_ms: u64) {
    out.extend_from_slice(b",\"user_id\":");
    write_json_str(out, &key.user_id);
    out.extend_from_slice(b",\"thread_id\":");
    match &key.thread_id {
        Some(t) => write_json_str(out, t),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"run_id\":");
    write_json_str(out, &key.run_id);
    out.extend_from_slice(b",\"agent_name\":");
    write_json_str(out, &key.agent_name);
    out.extend_from_slice(b",\"ts\":");
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(digits.format(ts_ms).as_bytes());
    out.extend_from_slice(b",\"data\":");
}

/// Append `s` as a JSON string literal.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's string escaping cannot fail when writing into a Vec.
    if serde_json::to_writer(&mut *out, s).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

/// Append a server-to-client (unmasked, FIN) text frame header for `len` payload bytes.
pub fn put_text_frame_header(out: &mut BytesMut, len: usize) {
    out.put_u8(0x81);
    if len < 126 {
        out.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        out.put_u8(126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
}

/// A complete text frame around a frame the gateway sends itself
/// ([`crate::frames::ServerFrame`]: `connected`, `pong`, `ack`, `error`, ...).
pub fn control_frame<T: serde::Serialize + ?Sized>(frame: &T) -> Bytes {
    text_frame(&crate::frames::to_json(frame))
}

/// A complete text frame around `payload`.
pub fn text_frame(payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(payload.len() + 10);
    put_text_frame_header(&mut frame, payload.len());
    frame.put_slice(payload);
    frame.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> RunKey {
        RunKey::new("u1", Some("t1"), "r-9", "data_agent").unwrap()
    }

    fn payload(frame: &[u8]) -> &[u8] {
        let n = frame[1] & 0x7f;
        match n {
            126 => &frame[4..],
            127 => &frame[10..],
            _ => &frame[2..],
        }
    }

    #[test]
    fn kinds_round_trip_and_custom_types_are_validated() {
        for name in [
            "agent_started",
            "agent_thinking",
            "tool_executing",
            "tool_completed",
            "agent_completed",
            "agent_error",
            "text_delta",
            "a",
        ] {
            assert_eq!(EventKind::parse(name).unwrap().as_str(), name);
        }
        let long_ok = format!("a{}", "b".repeat(63));
        assert!(EventKind::parse(&long_ok).is_ok());
        for bad in [
            "",
            "Text",
            "1abc",
            "text-delta",
            "tëxt",
            &format!("a{}", "b".repeat(64)),
        ] {
            assert!(
                matches!(EventKind::parse(bad), Err(EventError::BadType(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            EventKind::parse("connected"),
            Err(EventError::ReservedType(_))
        ));
        assert!(EventKind::AgentError.ends_run());
        assert!(EventKind::AgentCompleted.ends_run());
        assert!(!EventKind::AgentThinking.ends_run());
    }

    #[test]
    fn envelope_has_every_field_and_seq() {
        let ev = Event::new(
            key(),
            EventKind::ToolExecuting,
            &serde_json::json!({"tool":"sql","args":{}}),
        )
        .unwrap();
        let frame = ev.frame(43);
        assert_eq!(frame[0], 0x81);
        let v: serde_json::Value = serde_json::from_slice(payload(&frame)).unwrap();
        assert_eq!(v["type"], "tool_executing");
        assert_eq!(v["seq"], 43);
        assert_eq!(v["user_id"], "u1");
        assert_eq!(v["thread_id"], "t1");
        assert_eq!(v["run_id"], "r-9");
        assert_eq!(v["agent_name"], "data_agent");
        assert_eq!(v["ts"], ev.ts_ms);
        assert_eq!(v["data"], serde_json::json!({"tool":"sql","args":{}}));
    }

    #[test]
    fn null_thread_and_escaped_strings() {
        let k = RunKey::new("u\"1\\", None, "r\n", "ag\u{2713}").unwrap();
        let ev = Event::from_raw_data(
            k,
            EventKind::Custom("text_delta".into()),
            r#"{"t":"héllo"}"#,
        );
        let v: serde_json::Value = serde_json::from_slice(payload(&ev.frame(1))).unwrap();
        assert_eq!(v["thread_id"], serde_json::Value::Null);
        assert_eq!(v["user_id"], "u\"1\\");
        assert_eq!(v["run_id"], "r\n");
        assert_eq!(v["agent_name"], "ag\u{2713}");
        assert_eq!(v["data"]["t"], "héllo");
    }

    #[test]
    fn frame_lengths_use_all_three_header_forms() {
        for size in [10usize, 200, 70_000] {
            let data = "x".repeat(size);
            let ev = Event::new(key(), EventKind::AgentThinking, &data).unwrap();
            let frame = ev.frame(u64::MAX);
            let v: serde_json::Value = serde_json::from_slice(payload(&frame)).unwrap();
            assert_eq!(v["seq"], u64::MAX);
            assert_eq!(v["data"].as_str().unwrap().len(), size);
        }
    }

    #[test]
    fn run_key_limits() {
        assert_eq!(
            RunKey::new("", None, "r", "a").unwrap_err(),
            EventError::BadUser
        );
        assert_eq!(
            RunKey::new(&"u".repeat(129), None, "r", "a").unwrap_err(),
            EventError::BadUser
        );
        assert!(RunKey::new(&"u".repeat(128), None, "r", "a").is_ok());
        assert_eq!(
            RunKey::new("u", None, "", "a").unwrap_err(),
            EventError::BadRunId
        );
        assert_eq!(
            RunKey::new("u", Some(""), "r", "a").unwrap_err(),
            EventError::BadThreadId
        );
        assert_eq!(
            RunKey::new("u", None, "r", &"a".repeat(257)).unwrap_err(),
            EventError::BadAgentName
        );
    }

    /// A thread id follows the one [`ThreadId`] rule: control characters are refused
    /// here as at the upgrade (v1 accepted them from workers and the publish API).
    #[test]
    fn run_key_thread_has_no_control_characters() {
        for bad in ["t\n", "a\0b", "\u{1b}[2J", "\u{85}"] {
            assert_eq!(
                RunKey::new("u", Some(bad), "r", "a").unwrap_err(),
                EventError::BadThreadId,
                "{bad:?}"
            );
        }
        assert!(RunKey::new("u", Some(&"t".repeat(256)), "r", "a").is_ok());
        assert_eq!(
            RunKey::new("u", Some(&"t".repeat(257)), "r", "a").unwrap_err(),
            EventError::BadThreadId
        );
        assert_eq!(
            EventError::BadThreadId.to_string(),
            "thread_id must be null or a non-empty string of at most 256 bytes without control characters"
        );
        assert_eq!(
            EventError::BadUser.to_string(),
            "user_id must be a non-empty string of at most 128 bytes"
        );
    }

    /// Building a key from validated ids keeps their strings: no copy per key.
    #[test]
    fn run_key_from_ids_keeps_the_strings() {
        let user = UserId::parse("u").unwrap();
        let run = RunId::parse("r").unwrap();
        let key = RunKey::from_ids(
            user.clone(),
            None,
            run.clone(),
            AgentName::parse("a").unwrap(),
        );
        assert!(Arc::ptr_eq(&key.user_id, user.as_arc()));
        assert!(Arc::ptr_eq(&key.run_id, run.as_arc()));
    }

    #[test]
    fn data_markers_read_reason_and_tool_call_id_only_from_objects() {
        let ev = Event::new(key(), EventKind::AgentError, &serde_json::json!({"big": [1, {"reason": "inner"}], "reason": "run_timeout", "tool_call_id": "c\"1"})).unwrap();
        assert_eq!(ev.data_markers().reason.as_deref(), Some("run_timeout"));
        assert_eq!(ev.data_markers().tool_call_id.as_deref(), Some("c\"1"));
        let raw =
            Event::from_raw_data(key(), EventKind::ToolCompleted, r#"{"tool_call_id":"t-9"}"#);
        assert_eq!(raw.data(), br#"{"tool_call_id":"t-9"}"#);
        assert_eq!(raw.data_markers().tool_call_id.as_deref(), Some("t-9"));
        assert_eq!(raw.tool_call_id().as_deref(), Some("t-9"));
        assert_eq!(ev.tool_call_id().as_deref(), Some("c\"1"));
        assert!(contains(
            br#"{"a":"tool_call_id","tool_call_id":1}"#,
            b"\"tool_call_id\""
        ));
        assert!(contains(br#""tool_call_id""#, b"\"tool_call_id\""));
        assert!(!contains(
            br#"{"tool_call_i":"d","tool":"x"}"#,
            b"\"tool_call_id\""
        ));
        assert!(!contains(b"", b"\"tool_call_id\""));
        let none = Event::from_raw_data(key(), EventKind::ToolCompleted, r#"{"tool":"x"}"#);
        assert_eq!(none.tool_call_id(), None);
        let long = serde_json::json!({"tool_call_id": "x".repeat(MAX_TOOL_CALL_ID_BYTES + 1)});
        let long = Event::new(key(), EventKind::ToolCompleted, &long).unwrap();
        assert_eq!(long.tool_call_id(), None, "over the bound: paired by order");
        for data in [
            r#""reason""#,
            "[1]",
            "null",
            r#"{"reason":5}"#,
            r#"{"tool_call_id":{}}"#,
        ] {
            let ev = Event::from_raw_data(key(), EventKind::AgentError, data);
            assert_eq!(ev.data_markers(), DataMarkers::default(), "{data}");
        }
    }
}
