//! One AG-UI connection's translation: [`Stream`] turns each agentwire event the
//! connection receives (live or replayed) into AG-UI events, keeping per run only
//! what the next event's frames depend on.
//!
//! The mapping (docs/AGUI.md has the table):
//! - the first event of a run on this stream opens it with `RUN_STARTED`: from
//!   `agent_started` itself, or built from the event when the stream joins a run
//!   mid-way; a later `agent_started` of a started run is a `CUSTOM`;
//! - a streak of consecutive `text_delta` events of a run is one text message:
//!   `TEXT_MESSAGE_START` at its first delta, `TEXT_MESSAGE_CONTENT` per delta, and
//!   `TEXT_MESSAGE_END` before the frames of the run's next event of any other type;
//! - `agent_thinking`: one reasoning span holding one reasoning message
//!   (`REASONING_START`, `REASONING_MESSAGE_START`, `REASONING_MESSAGE_CONTENT`,
//!   `REASONING_MESSAGE_END`, `REASONING_END`), complete within the event;
//! - `tool_executing`: `TOOL_CALL_START`, `TOOL_CALL_ARGS`, `TOOL_CALL_END`;
//!   `tool_completed`: `TOOL_CALL_RESULT`. Paired by `data.tool_call_id` when the
//!   worker gives one, else by order within the run (the n-th `tool_completed`
//!   without an id answers the n-th `tool_executing` without one);
//! - `agent_completed`: `RUN_FINISHED`; `agent_error` (also the gateway's
//!   `run_timeout`, `worker_dropped` and the demo agent's `cancelled`): `RUN_ERROR`;
//! - any other type: `CUSTOM` with the type as `name` and `data` as `value`.
//!
//! State per run: its thread, where it started, the open text message, two counters.
//! Runs leave the state when they end; the number kept is bounded by `max_runs` (the
//! user's `max_active_runs_per_user`: a user never has more runs in progress), the
//! least recently active going first should runs end unseen (a thread filter that
//! hid a run's end).
//!
//! A connection that opens (or resumes) while runs are in progress first gets the
//! frames that bring a fresh AG-UI stream to the state its next events continue from
//! ([`Stream::opening_frames`]): the state is rebuilt by [`Stream::observe`] over the
//! kept events up to the connection's starting point. Those frames carry the `seq` of
//! the event each one stands for (at most the starting point), so a client that
//! resumed drops them as duplicates of what it already has and continues exactly,
//! while a client reading this connection alone gets a stream valid from its start.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::Value;

use super::source::Source;
use super::wire::{Body, Frame, Meta, Outcome};

/// One run as this stream has shown it.
#[derive(Debug)]
struct Track {
    /// The run's thread as its `RUN_STARTED` said (that event's `thread_id`): kept for
    /// the run's later frames, so every `threadId` of a run is the same.
    thread: Option<Box<str>>,
    /// The `seq` and `ts` the stream's `RUN_STARTED` stands for.
    started_seq: u64,
    started_ts: u64,
    /// The open text message: the `seq` and `ts` of its first delta (its id is
    /// `<run>:text:<seq>`).
    text: Option<(u64, u64)>,
    /// `tool_executing` / `tool_completed` events without a `tool_call_id` so far.
    tools_started: u32,
    tools_done: u32,
    /// The `seq` of the run's last event (the least recently active go first).
    last_seq: u64,
}

/// A run in progress as the run state knows it (the `active_runs` of PROTOCOL.md
/// section 3).
#[derive(Clone, Copy, Debug)]
pub struct RunInProgress<'a> {
    pub run_id: &'a str,
    pub thread: Option<&'a str>,
    pub started_ts: u64,
    /// The `seq` of its latest event.
    pub last_seq: u64,
}

/// The AG-UI translation state of one connection.
#[derive(Debug)]
pub struct Stream {
    epoch: Arc<str>,
    runs: HashMap<Box<str>, Track>,
    max_runs: usize,
}

/// Where frames go: a connection's output, or nowhere while the state is rebuilt.
type Out<'o> = Option<&'o mut dyn FnMut(Bytes)>;

/// Builds the frames of one agentwire event (they share its run, `ts` and `seq`).
struct Emit<'a, 'o> {
    out: Out<'o>,
    run_id: &'a str,
    ts: u64,
    seq: u64,
    epoch: &'a str,
}

impl Emit<'_, '_> {
    fn push(&mut self, body: Body<'_>) {
        if let Some(out) = self.out.as_mut() {
            out(Frame {
                body,
                run_id: self.run_id,
                timestamp: self.ts,
                metadata: Meta {
                    seq: self.seq,
                    epoch: self.epoch,
                },
            }
            .to_frame());
        }
    }
}

impl Stream {
    /// A stream of the user's history `epoch` that keeps at most `max_runs` runs.
    pub fn new(epoch: Arc<str>, max_runs: usize) -> Stream {
        Stream {
            epoch,
            runs: HashMap::new(),
            max_runs: max_runs.max(1),
        }
    }

    /// The state a connection starts from, and so the frames its stream opens with:
    /// `kept` are the frames of the events kept for replay that the connection may
    /// see, oldest first; those up to `point` (the connection's resume point, or the
    /// user's current `seq` for a connection that does not resume) are followed.
    /// `active` are the runs in progress by the run state (`active_runs`): those the
    /// kept events do not show (their start was dropped) are taken in as started.
    /// When `fresh` (no exact resume), runs the kept events leave open but the run
    /// state does not list (their end was not visible to the connection) are dropped.
    pub fn rebuild<'a>(
        epoch: Arc<str>,
        max_runs: usize,
        kept: impl IntoIterator<Item = &'a [u8]>,
        active: &[RunInProgress<'_>],
        point: u64,
        fresh: bool,
    ) -> Stream {
        let mut s = Stream::new(epoch, max_runs);
        if fresh && active.is_empty() {
            // Nothing in progress (most connections): nothing to rebuild.
            return s;
        }
        for frame in kept {
            if let Some(src) = super::json_payload(frame).and_then(Source::parse_light) {
                if src.seq <= point {
                    s.observe(&src);
                }
            }
        }
        if fresh {
            s.retain_runs(|id| active.iter().any(|a| a.run_id == id));
        }
        for a in active {
            if a.last_seq <= point {
                s.adopt(a.run_id, a.thread, a.started_ts, a.last_seq);
            }
        }
        s
    }

    /// Runs in progress on this stream.
    #[cfg(test)]
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    /// True when the stream has shown run `run_id` started and not yet ended.
    pub fn knows(&self, run_id: &str) -> bool {
        self.runs.contains_key(run_id)
    }

    /// Translate one event (`payload`: its JSON, for `rawEvent`), passing each AG-UI
    /// frame to `out` in order.
    pub fn translate(&mut self, src: &Source, payload: &[u8], out: &mut dyn FnMut(Bytes)) {
        self.step(src, Some(payload), Some(out));
    }

    /// Follow one event without writing anything (rebuilding the state a connection
    /// continues from).
    pub fn observe(&mut self, src: &Source) {
        self.step(src, None, None);
    }

    /// Keep only the runs `keep` says are still in progress.
    pub fn retain_runs(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.runs.retain(|id, _| keep(id));
    }

    /// Take in a run in progress that the kept events do not show (its start was
    /// dropped from the replay buffer): known from the run registry's state.
    pub fn adopt(&mut self, run_id: &str, thread: Option<&str>, started_ts: u64, last_seq: u64) {
        if self.knows(run_id) {
            return;
        }
        make_room(&mut self.runs, self.max_runs);
        self.runs.insert(
            run_id.into(),
            Track {
                thread: thread.map(Into::into),
                started_seq: last_seq,
                started_ts,
                text: None,
                tools_started: 0,
                tools_done: 0,
                last_seq,
            },
        );
    }

    /// The frames that bring a fresh AG-UI stream to this state: per run in
    /// progress (oldest first) its `RUN_STARTED`, then its open text message's
    /// `TEXT_MESSAGE_START`, each with the `seq` and `ts` of the event it stands for.
    pub fn opening_frames(&self, out: &mut dyn FnMut(Bytes)) {
        let mut runs: Vec<(&Box<str>, &Track)> = self.runs.iter().collect();
        runs.sort_by_key(|(_, t)| t.started_seq);
        for (run_id, t) in runs {
            let mut em = Emit {
                out: Some(&mut *out),
                run_id,
                ts: t.started_ts,
                seq: t.started_seq,
                epoch: &self.epoch,
            };
            em.push(Body::RunStarted {
                thread_id: thread_of(t.thread.as_deref(), run_id),
                raw_event: None,
            });
            if let Some((seq, ts)) = t.text {
                em.seq = seq;
                em.ts = ts;
                let id = text_id(run_id, seq);
                em.push(Body::TextMessageStart {
                    message_id: &id,
                    role: "assistant",
                });
            }
        }
    }

    fn step(&mut self, src: &Source, payload: Option<&[u8]>, out: Out<'_>) {
        let run_id = src.run_id.as_str();
        let mut em = Emit {
            out,
            run_id,
            ts: src.ts,
            seq: src.seq,
            epoch: &self.epoch,
        };
        let kind = src.kind.as_str();
        let raw = || payload.and_then(|p| serde_json::from_slice::<&RawValue>(p).ok());
        if !self.runs.contains_key(run_id) {
            make_room(&mut self.runs, self.max_runs);
            self.runs.insert(
                run_id.into(),
                Track {
                    thread: src.thread_id.as_deref().map(Into::into),
                    started_seq: src.seq,
                    started_ts: src.ts,
                    text: None,
                    tools_started: 0,
                    tools_done: 0,
                    last_seq: src.seq,
                },
            );
            let started = kind == "agent_started";
            em.push(Body::RunStarted {
                thread_id: thread_of(src.thread_id.as_deref(), run_id),
                raw_event: if started { raw() } else { None },
            });
            if started {
                return;
            }
        }
        let Some(track) = self.runs.get_mut(run_id) else {
            return;
        };
        track.last_seq = src.seq;
        let thread_id = thread_of(track.thread.as_deref(), run_id);
        if kind != "text_delta" {
            if let Some((seq, _)) = track.text.take() {
                em.push(Body::TextMessageEnd {
                    message_id: &text_id(run_id, seq),
                });
            }
        }
        let mut ended = false;
        match kind {
            "agent_thinking" => {
                let span = format!("{run_id}:reasoning:{}", src.seq);
                let message = format!("{run_id}:thought:{}", src.seq);
                em.push(Body::ReasoningStart { message_id: &span });
                em.push(Body::ReasoningMessageStart {
                    message_id: &message,
                    role: "reasoning",
                });
                let thought = text_of(&src.data, &["thought", "text", "message"]);
                if !thought.is_empty() {
                    em.push(Body::ReasoningMessageContent {
                        message_id: &message,
                        delta: thought,
                    });
                }
                em.push(Body::ReasoningMessageEnd {
                    message_id: &message,
                });
                em.push(Body::ReasoningEnd { message_id: &span });
            }
            "tool_executing" => {
                let id = match src.tool_call_id() {
                    Some(id) => Cow::Borrowed(id),
                    None => {
                        track.tools_started += 1;
                        Cow::Owned(tool_id(run_id, track.tools_started))
                    }
                };
                let name = src
                    .data_str("tool")
                    .or_else(|| src.data_str("name"))
                    .unwrap_or("tool");
                let args = match src.data.get("args").or_else(|| src.data.get("arguments")) {
                    Some(Value::String(s)) => Cow::Borrowed(s.as_str()),
                    Some(Value::Null) | None => Cow::Borrowed("{}"),
                    Some(v) => Cow::Owned(v.to_string()),
                };
                em.push(Body::ToolCallStart {
                    tool_call_id: &id,
                    tool_call_name: name,
                });
                em.push(Body::ToolCallArgs {
                    tool_call_id: &id,
                    delta: args,
                });
                em.push(Body::ToolCallEnd { tool_call_id: &id });
            }
            "tool_completed" => {
                let id = match src.tool_call_id() {
                    Some(id) => Cow::Borrowed(id),
                    None => {
                        track.tools_done += 1;
                        Cow::Owned(tool_id(run_id, track.tools_done))
                    }
                };
                let content = match src.data.get("result") {
                    Some(Value::String(s)) => Cow::Borrowed(s.as_str()),
                    Some(Value::Null) | None => json_text(&src.data),
                    Some(v) => Cow::Owned(v.to_string()),
                };
                em.push(Body::ToolCallResult {
                    message_id: &format!("{id}:result"),
                    tool_call_id: &id,
                    content,
                    role: "tool",
                });
            }
            "text_delta" => {
                let (seq, _) = *track.text.get_or_insert((src.seq, src.ts));
                let id = text_id(run_id, seq);
                if seq == src.seq {
                    em.push(Body::TextMessageStart {
                        message_id: &id,
                        role: "assistant",
                    });
                }
                em.push(Body::TextMessageContent {
                    message_id: &id,
                    delta: text_of(&src.data, &["delta", "text"]),
                });
            }
            "agent_completed" => {
                em.push(Body::RunFinished {
                    thread_id,
                    result: Some(&src.data).filter(|d| !d.is_null()),
                    outcome: Outcome { kind: "success" },
                });
                ended = true;
            }
            "agent_error" => {
                let reason = src.data_str("reason");
                let message = src
                    .data_str("message")
                    .or_else(|| src.data_str("error"))
                    .map(Cow::Borrowed)
                    .unwrap_or_else(|| error_message(reason));
                em.push(Body::RunError {
                    thread_id,
                    message,
                    code: src.data_str("code").or(reason),
                    raw_event: raw(),
                });
                ended = true;
            }
            other => em.push(Body::Custom {
                name: other,
                value: &src.data,
            }),
        }
        if ended {
            self.runs.remove(run_id);
        }
    }
}

/// Make room for one more run: drop the least recently active past `max`.
fn make_room(runs: &mut HashMap<Box<str>, Track>, max: usize) {
    while runs.len() >= max {
        let Some(oldest) = runs
            .iter()
            .min_by_key(|(_, t)| t.last_seq)
            .map(|(id, _)| id.clone())
        else {
            return;
        };
        runs.remove(&oldest);
    }
}

/// AG-UI requires a `threadId`: a run with no thread is its own thread (its run id),
/// so threadless runs never merge into one made-up conversation.
fn thread_of<'a>(thread: Option<&'a str>, run_id: &'a str) -> &'a str {
    thread.unwrap_or(run_id)
}

fn text_id(run_id: &str, seq: u64) -> String {
    format!("{run_id}:text:{seq}")
}

fn tool_id(run_id: &str, n: u32) -> String {
    format!("{run_id}:tool:{n}")
}

/// The first string among `data`'s `keys`; else `data` as JSON (`""` for `null`).
fn text_of<'a>(data: &'a Value, keys: &[&str]) -> Cow<'a, str> {
    keys.iter()
        .find_map(|k| data.get(k).and_then(Value::as_str))
        .map(Cow::Borrowed)
        .unwrap_or_else(|| json_text(data))
}

fn json_text(data: &Value) -> Cow<'_, str> {
    match data {
        Value::Null => Cow::Borrowed(""),
        Value::String(s) => Cow::Borrowed(s),
        v => Cow::Owned(v.to_string()),
    }
}

/// `RUN_ERROR.message` when the worker gave none: from the `reason` the gateway (and
/// the demo agent) end runs with.
fn error_message(reason: Option<&str>) -> Cow<'static, str> {
    Cow::Borrowed(match reason {
        Some("run_timeout") => {
            "the run sent no event within run_idle_timeout_ms and the gateway ended it"
        }
        Some("worker_dropped") => "the worker stopped before the run ended",
        Some("cancelled") => "the run was cancelled",
        Some(other) => return Cow::Owned(other.to_owned()),
        None => "the agent reported an error",
    })
}

#[cfg(test)]
mod tests;
