//! The engine boundary: where a user's shared state lives (the per-user `seq`, the
//! epoch, the kept events a client resumes from, runs), behind one small interface the
//! reactor calls without knowing which engine runs (PROTOCOL.md section 9).
//!
//! Two engines:
//! - [`memory`] (the default, `engine = "memory"`): the state is this process's
//!   [`Registry`]; every call answers at once.
//! - [`redis`] (`engine = "redis"`): the state is in Redis, shared by every node; the
//!   engine's own threads talk to Redis (the reactor thread never does) and their
//!   answers come back later through a channel and the loop's `mio::Waker`.
//!
//! # The shape of the interface
//!
//! Every call that may need the shared state returns a [`Step`]:
//! - [`Step::Done`]: the answer, now. The memory engine always answers so, inline and
//!   with no allocation or channel hop, so its figures stay what they were (the call is
//!   a direct call of the registry's own method).
//! - [`Step::Pending`]: the engine took the request; its outcome arrives as an
//!   [`EngineEvent`] that the loop drains after the waker fired, carrying the ticket
//!   the caller gave (a connection id, an HTTP request id).
//!
//! The node-local part of a user's state (which of this node's connections belong to the
//! user, with their thread filter and mode, and the runs its `user_message`s acked) is
//! the reactor's under both engines: the [`Registry`] keeps it. Under the memory engine
//! the registry also holds the shared state itself; under the Redis engine that is in
//! Redis only (the node keeps no copy of the history).
//!
//! The calls:
//! - `publish(event)` ([`Engine::publish`]): the event takes the user's next `seq` and
//!   is kept for replay, or is refused (ended run, too many runs). Memory: `Done` with
//!   the routed frame and the user (for its targets). Redis: `Pending`; then
//!   [`EngineEvent::Published`] (stored, with its seq: the publish API answers 202),
//!   [`EngineEvent::Refused`] / [`EngineEvent::TooManyRuns`] / [`EngineEvent::Repeat`],
//!   or [`EngineEvent::Unavailable`] (503 `engine_unavailable`). The frame itself
//!   reaches every node holding a connection of the user as an
//!   [`EngineEvent::Delivery`], this node included.
//! - open: the epoch, the top seq and what a resuming connection is owed. Memory: from
//!   the registry, at once (`reactor/session.rs`, as before). Redis: the node subscribes
//!   to the user first, then the store counts the user's connections on every node and
//!   reads the stream after `last_seq` ([`EngineEvent::Opened`], or
//!   [`EngineEvent::OpenRejected`] / `Unavailable`); the 101 goes out with that answer.
//! - `release(user, conn)` ([`Engine::release`]): a connection ended (Redis: it stops
//!   counting; the user's last one here unsubscribes).
//!
//! Where the two shapes differ (opening a session, the publish API's answer) the reactor
//! branches once, on whether the engine answers later ([`Engine::redis`]), into
//! `reactor/engine_events.rs`; the memory engine's paths are the ones it had.
//!
//! Gaps: a delivery whose seq is past the next one the node has for the user means
//! pub/sub lost messages (it is at most once); the Redis engine fills them from the
//! user's stream and hands everything on in order (`redis/gaps.rs`), and reports
//! [`EngineEvent::Gap`] only when it cannot (events no longer kept, the history
//! changed, Redis did not answer): the reactor then closes the user's connections here
//! with 1013 so that they resume from the stream.

pub(crate) mod memory;
pub(crate) mod redis;

use std::sync::Arc;

use bytes::Bytes;

#[cfg(doc)]
use crate::registry::Registry;
use crate::registry::Resume;

/// An engine's answer: now, or later as an [`EngineEvent`].
#[derive(Debug)]
#[must_use]
pub(crate) enum Step<T> {
    /// The answer.
    Done(T),
    /// Taken; the outcome comes back as an [`EngineEvent`] with the caller's ticket.
    Pending,
}

/// Who asked: given with a request that may be [`Step::Pending`] and returned with its
/// outcome. The reactor's own numbering (a connection's public id, an HTTP request's
/// serial); the engine never looks inside.
pub(crate) type Ticket = u64;

/// What an engine tells the loop later (drained after the engine's wake).
#[derive(Debug)]
pub(crate) enum EngineEvent {
    /// A published event is stored with this seq (the 202 of the publish API).
    Published {
        ticket: Ticket,
        seq: u64,
        /// What the event did to its run (Redis engine: begun or ended by this
        /// publish, counted once in the cluster, on this node; no tool or
        /// `user_message` durations).
        run: crate::stats::RunTransition,
    },
    /// A published event was refused: its run has ended (nothing stored).
    Refused { ticket: Ticket },
    /// An open refused: the user already has `max_connections_per_user` connections
    /// on all nodes (`per_user_policy = reject`); answered 429.
    OpenRejected { ticket: Ticket },
    /// Another node's open evicted this node's connection `(key, serial)`
    /// (`max_connections_per_user` with `evict_oldest`, cluster-wide): close it 4002.
    Evict { key: usize, serial: u64 },
    /// A user revoked through another node (PROTOCOL.md section 12): close the user's
    /// connections here with 4004 and, with `until` (epoch s), refuse new ones.
    Revoked { user: Arc<str>, until: Option<u64> },
    /// The revocations in force in Redis `(user, until)`, read when the store
    /// connected or the feed reconnected: each as [`EngineEvent::Revoked`].
    Revocations(Vec<(Arc<str>, u64)>),
    /// A client (on some node) cancelled this run, which this node publishes: its
    /// in-process run handle is told, and the publish request of `ticket` (when the
    /// event came through the publish API) lists the run in its `cancelled` answer.
    Cancelled {
        user: Arc<str>,
        run: Arc<str>,
        ticket: Ticket,
    },
    /// A `cancel` asked of Redis: whether the run was in progress or pending (acked
    /// and not begun) somewhere in the cluster, and is now marked cancelled.
    CancelAnswered { ticket: Ticket, known: bool },
    /// A client message was appended to the inbound stream (`<prefix>:inbound`).
    InboundStored { ticket: Ticket },
    /// Whether the inbound stream has a consumer group (workers read it): asked every
    /// housekeeping tick.
    InboundConsumers(bool),
    /// A published event would start a run past `max_active_runs_per_user` (nothing
    /// stored).
    TooManyRuns { ticket: Ticket },
    /// Runs whose `run_idle_timeout_ms` passed, taken by this node (no other node
    /// takes them): each gets its `run_timeout`.
    RunsDue(Vec<DueRun>),
    /// A published event repeats an idempotency key stored before (PROTOCOL.md
    /// section 6a, on any node): accepted, not stored again.
    Repeat { ticket: Ticket },
    /// The store did not answer within `redis_timeout_ms` or failed: the request's
    /// outcome is unknown (it may still be stored: workers retry with their
    /// idempotency key); 503 `engine_unavailable`.
    Unavailable { ticket: Ticket },
    /// An open's answer: the user's epoch and top seq, whether the asked resume is
    /// exact, and the kept events after `last_seq` when it is (oldest first).
    Opened {
        ticket: Ticket,
        user: Arc<str>,
        epoch: Arc<str>,
        top_seq: u64,
        resume: Resume,
        replay: Vec<Delivered>,
        /// The user's runs in progress, cluster-wide.
        runs: Vec<EngineRun>,
        /// When the open asked for it (an AG-UI connection) and runs are in progress:
        /// the kept events up to the connection's starting point (`last_seq` of an
        /// exact resume, else `top_seq`), oldest first; else empty.
        history: Vec<Delivered>,
    },
    /// An event of `user`, for this node's connections of the user (in seq order,
    /// without gaps and duplicates: the engine checked).
    Delivery { user: Arc<str>, event: Delivered },
    /// Events of `user` were lost to this node (pub/sub dropped them and the stream no
    /// longer has them, or the user's history is gone): close the user's connections
    /// here with 1013 so that they resume.
    Gap { user: Arc<str> },
    /// The connection to Redis went down (`false`) or came back (`true`).
    Connected(bool),
}

/// One event of a user with its seq, as an engine hands it to the node.
#[derive(Debug, Clone)]
pub(crate) struct Delivered {
    pub seq: u64,
    /// The event's `thread_id` (connections filtered on a thread take only theirs).
    pub thread: Option<Arc<str>>,
    /// The event's `run_id` (an isolated connection takes the runs it started).
    pub run: Arc<str>,
    /// The complete WebSocket text frame.
    pub frame: Bytes,
}

/// A run in progress as the Redis engine keeps it (for `connected`'s `active_runs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EngineRun {
    pub run_id: Arc<str>,
    pub thread: Option<Arc<str>>,
    pub agent_name: Arc<str>,
    pub started_ts: u64,
    pub last_seq: u64,
    pub last_type: Arc<str>,
}

/// A run whose deadline passed (taken by one node for its `run_timeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DueRun {
    pub user: Arc<str>,
    pub run_id: Arc<str>,
    pub thread: Option<Arc<str>>,
    pub agent_name: Arc<str>,
}

/// A session's place in its user's stream, for engines that answer later.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cursor {
    /// Takes every event routed to it (the memory engine: routing is synchronous).
    #[default]
    Live,
    /// Takes deliveries with a seq above this (what its open answer covered).
    After(u64),
}

/// What the reactor gives with an emitted event: nobody waits for its outcome.
pub(crate) const EMIT_TICKET: Ticket = 0;

/// The engine this node runs, chosen at start from the `engine` setting.
pub(crate) enum Engine {
    Memory(memory::Memory),
    Redis(Box<redis::RedisEngine>),
}

impl Default for Engine {
    fn default() -> Engine {
        Engine::Memory(memory::Memory)
    }
}

impl Engine {
    /// Publish `ev` at tick `now` (see the module doc): `Done` with the routed frame
    /// and its user, or the refusal; `Pending` when the outcome comes later as an
    /// [`EngineEvent`] with `ticket`.
    #[inline]
    pub(crate) fn publish<'r>(
        &mut self,
        registry: &'r mut crate::registry::Registry,
        ev: &crate::event::Event,
        now: u64,
        ticket: Ticket,
    ) -> Step<Result<(crate::registry::Routed, &'r crate::registry::User), crate::registry::Refused>>
    {
        match self {
            Engine::Memory(m) => m.publish(registry, ev, now),
            Engine::Redis(r) => {
                r.publish(ticket, ev);
                Step::Pending
            }
        }
    }

    /// The Redis engine, when it is the one running.
    pub(crate) fn redis(&mut self) -> Option<&mut redis::RedisEngine> {
        match self {
            Engine::Memory(_) => None,
            Engine::Redis(r) => Some(r),
        }
    }

    /// Connection `conn` of `user` ended (Redis: it stops counting cluster-wide; the
    /// last one here unsubscribes).
    pub(crate) fn release(&mut self, user: &str, conn: crate::conn::ConnId) {
        if let Engine::Redis(r) = self {
            r.release(user, Some((conn.key, conn.serial)));
        }
    }

    /// The next event an engine that answers later has for the loop.
    pub(crate) fn next_event(&mut self) -> Option<EngineEvent> {
        match self {
            Engine::Memory(_) => None,
            Engine::Redis(r) => r.next_event(),
        }
    }
}
