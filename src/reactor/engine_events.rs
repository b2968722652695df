//! The reactor's side of an engine that answers later (the Redis engine,
//! [`crate::engine`]): opening a session whose 101 and `connected` frame wait for the
//! engine's answer, the publish API's answer that waits for the store, and every
//! [`EngineEvent`] the loop drains after the engine's wake (deliveries to this node's
//! connections, gaps, outages). Nothing here runs under the memory engine: its calls
//! answer at once on the paths of `session.rs`, `routing.rs` and `endpoints.rs`.
//!
//! AG-UI connections (`encoding=agui`, [`crate::agui`]): their open asks the engine
//! for the kept events up to their starting point too (only read while runs are in
//! progress), from which the connection's translation state and opening frames are
//! rebuilt as `session.rs` does under the memory engine; their owed frames (replay,
//! early deliveries) and live deliveries go through the translation when queued.
//!
//! Tickets: an open is `OPEN_TICKET | connection serial`; a publish request's event
//! `request << PUBLISH_INDEX_BITS | index`; an emitted event [`EMIT_TICKET`]; a
//! client's `cancel` (answered once Redis said whether the run is in progress or
//! pending anywhere) `CANCEL_TICKET | n`.
//!
//! Bounds: one pending open per connection (removed by its answer; the engine answers
//! every request, `Unavailable` on failure), deliveries held per pending open at most
//! [`EARLY_PER_OPEN`] (past it the connection closes 1013 and resumes), frames owed to a
//! catching-up session at most `replay_events` + [`EARLY_PER_OPEN`] (same), one pending
//! publish request per HTTP connection (it is not read meanwhile).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::routing::translate;
use super::{live, mark, Reactor};
use crate::agui::{json_payload, Encoding, RunInProgress, Source, Stream};
use crate::close::CloseReason;
use crate::conn::{ConnId, Phase};
use crate::engine::{Cursor, Delivered, DueRun, EngineEvent, EngineRun, Ticket, EMIT_TICKET};
use crate::event::{control_frame, Event, EventKind, RunKey};
use crate::frames::{
    self, Accepted, ActiveRun, AgentErrorData, AgentErrorReason, Connected, ErrorBody, ErrorCode,
    ServerFrame,
};
use crate::http;
use crate::mode::Mode;
use crate::registry::{ConnEntry, Resume};
use crate::stats::DropReason;

/// Engine events handled per loop iteration before polling again.
pub(super) const ENGINE_BUDGET: usize = 4096;
/// Open tickets have this bit; publish tickets never reach it.
const OPEN_TICKET: Ticket = 1 << 63;
/// Tickets of `user_message`s waiting to be stored in the inbound stream.
const INBOUND_TICKET: Ticket = 1 << 62;
/// Tickets of clients' `cancel`s waiting for Redis's answer.
const CANCEL_TICKET: Ticket = 1 << 61;
/// Bits of a publish ticket that hold the event's index in its request.
const PUBLISH_INDEX_BITS: u32 = 10;
/// Deliveries held for a session whose open is not answered yet.
pub(super) const EARLY_PER_OPEN: usize = 4096;

/// A session opened on the node whose `connected` frame waits for the engine.
pub(super) struct PendingOpen {
    pub(super) id: ConnId,
    user: Arc<str>,
    mode: Mode,
    thread: Option<Arc<str>>,
    token_exp: u64,
    /// The admitted upgrade and the bytes read past its head: the 101 goes out with
    /// the engine's answer.
    up: http::Upgrade,
    leftover: Vec<u8>,
    /// Deliveries of the user that came before the answer (the answer's top decides
    /// which of them the session still needs).
    early: Vec<Delivered>,
}

/// A pending open once its session began (what `opened` still needs of it).
struct OpenedSession {
    id: ConnId,
    user: Arc<str>,
    mode: Mode,
    thread: Option<Arc<str>>,
    token_exp: u64,
    early: Vec<Delivered>,
}

/// A `user_message` whose ack waits until the inbound stream stored it (workers read
/// the stream; no in-process worker took it).
pub(super) struct PendingInbound {
    id: ConnId,
    user: Arc<str>,
    run_id: String,
    thread: Option<Arc<str>>,
    isolated: bool,
    reference: serde_json::Value,
}

/// A client's `cancel` waiting for Redis to say whether the run is in progress or
/// pending anywhere (`cancel_requested`) or not (`not_found`).
pub(super) struct PendingCancel {
    id: ConnId,
    user: Arc<str>,
    run_id: String,
    /// The first cancel of the run on this node: the workers are told (once).
    first: bool,
}

/// A publish request waiting for the store's answers.
pub(super) struct PendingPublish {
    conn: ConnId,
    keep_alive: bool,
    /// The `accepted` of the 202 (repeats of accepted idempotency keys included).
    accepted: usize,
    events: usize,
    answered: usize,
    cancelled: Vec<String>,
    /// The first event refused (its run had ended), by index in the request.
    refused: Option<usize>,
    /// The first event refused for starting a run past `max_active_runs_per_user`.
    too_many: Option<usize>,
    unavailable: bool,
}

/// What the engine made of one event of a publish request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Stored (or a repeat of a stored idempotency key).
    Stored,
    RunEnded,
    TooManyRuns,
    /// Unknown: Redis did not answer.
    Unavailable,
}

/// The reactor's state for the engine's pending answers.
#[derive(Default)]
pub(super) struct EngineWaits {
    pub(super) opens: HashMap<Ticket, PendingOpen>,
    /// The cancel flags of in-process runs whose events go through this node, by
    /// (user, run): set when a client anywhere cancels the run. Bounded by the runs in
    /// progress (`max_active_runs`): removed when the run's last event goes out, or
    /// once its handle is gone (housekeeping).
    pub(super) run_flags: HashMap<(Arc<str>, Arc<str>), Arc<std::sync::atomic::AtomicBool>>,
    /// Frames owed to sessions still catching up (replay, then live), by session.
    pub(super) replays: HashMap<ConnId, VecDeque<Bytes>>,
    /// Bounded by the sessions' input allowance and `max_pending_runs_per_user`: one
    /// entry per `user_message` in flight to Redis, removed by its answer.
    inbound: HashMap<Ticket, PendingInbound>,
    next_inbound: u64,
    /// Bounded like `inbound` (the sessions' input allowance): one entry per client
    /// `cancel` in flight to Redis, removed by its answer (the engine answers every
    /// request, `Unavailable` on failure).
    cancels: HashMap<Ticket, PendingCancel>,
    next_cancel: u64,
    /// The inbound stream has a consumer group (checked every housekeeping tick).
    pub(super) inbound_groups: bool,
    publishes: HashMap<u64, PendingPublish>,
    next_request: u64,
    /// The engine's store is reachable (`Connected` events); true until told.
    pub(super) up: bool,
    /// Tick (ms) of the last lease renewal.
    leases_renewed_at: u64,
    /// Emitted events the engine could not store (their outcome is unknown).
    pub(super) emits_failed: u64,
    /// Sessions closed 1013 because the engine reported a gap.
    pub(super) gaps: u64,
}

impl EngineWaits {
    pub(super) fn new() -> EngineWaits {
        EngineWaits {
            up: true,
            ..EngineWaits::default()
        }
    }
}

impl Reactor {
    /// Run `engine` instead of the memory engine, as node `node_id` (at build time,
    /// before the loop starts).
    pub(crate) fn use_engine(&mut self, engine: crate::engine::Engine, node_id: Arc<str>) {
        self.engine = engine;
        self.node_id = node_id;
    }

    /// Drain the engine's events up to the budget; true when the budget ran out.
    pub(super) fn drain_engine(&mut self) -> bool {
        for _ in 0..ENGINE_BUDGET {
            let Some(ev) = self.engine.next_event() else {
                return false;
            };
            self.on_engine_event(ev);
        }
        true
    }

    fn on_engine_event(&mut self, ev: EngineEvent) {
        match ev {
            EngineEvent::Delivery { user, event } => self.deliver_engine(&user, event),
            // Revoked while its open was under way (or before this node had read the
            // revocations in Redis, just after it started): refused as at the upgrade.
            EngineEvent::Opened { ticket, user, .. } if self.revoked_until(&user).is_some() => {
                self.open_refused(ticket, &crate::http::Refusal::unauthorized("user revoked"));
            }
            EngineEvent::Opened {
                ticket,
                epoch,
                top_seq,
                resume,
                replay,
                runs,
                history,
                ..
            } => self.opened(ticket, &epoch, top_seq, resume, replay, runs, history),
            EngineEvent::Published { ticket, seq, run } => {
                self.stats.record_run(&run);
                log::trace!("engine: ticket {ticket} stored as seq {seq}");
                self.publish_answered(ticket, Outcome::Stored);
            }
            EngineEvent::Repeat { ticket } => {
                self.stats.events_deduplicated += 1;
                if ticket != EMIT_TICKET {
                    self.publish_answered(ticket, Outcome::Stored);
                }
            }
            EngineEvent::Refused { ticket } => {
                if ticket == EMIT_TICKET {
                    self.stats.dropped(DropReason::RunEnded, 1);
                } else {
                    self.publish_answered(ticket, Outcome::RunEnded);
                }
            }
            EngineEvent::TooManyRuns { ticket } => {
                self.registry.counters.runs_refused += 1;
                if ticket == EMIT_TICKET {
                    // Counted and logged as under the memory engine; the store thread
                    // raised the run handle's refused flag with the answer.
                    self.stats.dropped(DropReason::Invalid, 1);
                    log::debug!("engine: an emitted event would start a run past max_active_runs_per_user or max_active_runs: run refused");
                } else {
                    self.publish_answered(ticket, Outcome::TooManyRuns);
                }
            }
            EngineEvent::RunsDue(due) => self.runs_due(due),
            EngineEvent::InboundConsumers(any) => self.waits.inbound_groups = any,
            EngineEvent::OpenRejected { ticket } => {
                let refusal = crate::http::Refusal::too_many(
                    "per-user connection limit reached (on all nodes)",
                );
                self.open_refused(ticket, &refusal);
            }
            EngineEvent::Evict { key, serial } => {
                let id = ConnId { key, serial };
                if self.session(id).is_some() {
                    log::info!(
                        "conn={} evicted by a newer connection of its user on another node",
                        id.public_id()
                    );
                    self.close(id, CloseReason::Evicted);
                }
            }
            EngineEvent::Revoked { user, until } => self.revoked_elsewhere(&user, until),
            EngineEvent::Revocations(list) => {
                for (user, until) in list {
                    self.revoked_elsewhere(&user, Some(until));
                }
            }
            EngineEvent::Cancelled { user, run, ticket } => {
                // Section 6b: the 202 of the request that carried the event lists it.
                let request = ticket >> PUBLISH_INDEX_BITS;
                if let Some(p) = (ticket != EMIT_TICKET)
                    .then(|| self.waits.publishes.get_mut(&request))
                    .flatten()
                {
                    if !p.cancelled.iter().any(|r| **r == *run) {
                        p.cancelled.push(run.to_string());
                    }
                }
                if let Some(flag) = self.waits.run_flags.get(&(user, run)) {
                    flag.store(true, std::sync::atomic::Ordering::Release);
                }
            }
            EngineEvent::InboundStored { ticket } => self.inbound_stored(ticket),
            EngineEvent::CancelAnswered { ticket, known } => self.cancel_answered(ticket, known),
            EngineEvent::Unavailable { ticket } => {
                if ticket == EMIT_TICKET {
                    self.waits.emits_failed += 1;
                } else if ticket & CANCEL_TICKET != 0
                    && ticket & (OPEN_TICKET | INBOUND_TICKET) == 0
                {
                    if let Some(p) = self.waits.cancels.remove(&ticket) {
                        let why = "the engine (Redis) did not answer; try again";
                        self.send_error(p.id, ErrorCode::Busy, why, None);
                    }
                } else if ticket & INBOUND_TICKET != 0 && ticket & OPEN_TICKET == 0 {
                    if let Some(p) = self.waits.inbound.remove(&ticket) {
                        let why = "the engine (Redis) did not store the message; try again";
                        self.send_error(p.id, ErrorCode::Busy, why, Some(&p.reference));
                    }
                } else if ticket & OPEN_TICKET != 0 {
                    let refusal = crate::http::Refusal {
                        status: 503,
                        code: ErrorCode::EngineUnavailable,
                        message: "the engine (Redis) did not answer in time; retry".into(),
                    };
                    self.open_refused(ticket, &refusal);
                } else {
                    self.publish_answered(ticket, Outcome::Unavailable);
                }
            }
            EngineEvent::Gap { user } => self.engine_gap(&user),
            EngineEvent::Connected(up) => self.waits.up = up,
        }
    }

    /// The `engine` section of `/ws/stats` (Redis engine only; `None` for memory).
    pub(super) fn engine_stats(&mut self) -> Option<serde_json::Value> {
        let up = self.waits.up;
        let (opens, publishes) = (self.waits.opens.len(), self.waits.publishes.len());
        let (emits_failed, gaps) = (self.waits.emits_failed, self.waits.gaps);
        let node_id = self.node_id.clone();
        let redis = self.engine.redis()?;
        let c = redis.counters();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let round_trips = load(&c.round_trips);
        let fills = redis.gap_fills();
        Some(serde_json::json!({
            "name": "redis",
            "node_id": &*node_id,
            "connected": up,
            "round_trips": round_trips,
            "requests": load(&c.requests),
            "round_trip_us_avg": load(&c.round_trip_us_total).checked_div(round_trips).unwrap_or(0),
            "round_trip_us_max": load(&c.round_trip_us_max),
            // Upper bounds of power-of-two buckets.
            "round_trip_us_p50": c.round_trip_us_quantile(0.5),
            "round_trip_us_p99": c.round_trip_us_quantile(0.99),
            "reconnects": load(&c.reconnects),
            "feed_losses": load(&c.feed_losses),
            "users_listened": redis.users_listened(),
            "opens_waiting": opens,
            "publish_requests_waiting": publishes,
            "emits_failed": emits_failed,
            "sessions_closed_for_gaps": gaps,
            // Gaps in pub/sub filled from the stream instead (no 1013), the events
            // they handed on, and fills that could not be exact (then gaps above).
            "gap_fills": fills.filled,
            "gap_fill_events": fills.events,
            "gap_fills_failed": fills.failed,
        }))
    }

    /// Prometheus lines of the engine (Redis engine only; empty for memory).
    pub(super) fn engine_metrics(&mut self) -> String {
        let Some(v) = self.engine_stats() else {
            return String::new();
        };
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        let up = u64::from(v["connected"] == true);
        format!(
            "# HELP agentwire_engine_connected 1 while the Redis engine reaches Redis, 0 while it is unavailable\n\
             # TYPE agentwire_engine_connected gauge\n\
             agentwire_engine_connected {up}\n\
             # HELP agentwire_engine_round_trips_total Pipelines sent to Redis by the store thread\n\
             # TYPE agentwire_engine_round_trips_total counter\n\
             agentwire_engine_round_trips_total {}\n\
             # HELP agentwire_engine_requests_total Requests those pipelines carried\n\
             # TYPE agentwire_engine_requests_total counter\n\
             agentwire_engine_requests_total {}\n\
             # HELP agentwire_engine_reconnects_total Times the connection to Redis came back\n\
             # TYPE agentwire_engine_reconnects_total counter\n\
             agentwire_engine_reconnects_total {}\n\
             # HELP agentwire_engine_gap_closes_total Sessions closed 1013 for events missed\n\
             # TYPE agentwire_engine_gap_closes_total counter\n\
             agentwire_engine_gap_closes_total {}\n\
             # HELP agentwire_engine_gap_fills_total Gaps in pub/sub filled from the stream (no 1013)\n\
             # TYPE agentwire_engine_gap_fills_total counter\n\
             agentwire_engine_gap_fills_total {}\n\
             # HELP agentwire_engine_gap_fill_events_total Events handed on by gap fills\n\
             # TYPE agentwire_engine_gap_fill_events_total counter\n\
             agentwire_engine_gap_fill_events_total {}\n\
             # HELP agentwire_engine_gap_fills_failed_total Gap fills that could not be exact (then 1013)\n\
             # TYPE agentwire_engine_gap_fills_failed_total counter\n\
             agentwire_engine_gap_fills_failed_total {}\n",
            n("round_trips"),
            n("requests"),
            n("reconnects"),
            n("sessions_closed_for_gaps"),
            n("gap_fills"),
            n("gap_fill_events"),
            n("gap_fills_failed"),
        )
    }

    // ------------------------------------------------------------------- open

    /// Open a session under an engine that answers later: the upgrade is admitted
    /// (token, origin, limits of this node) and the connection registered, then the
    /// engine is asked (subscribe, count the user's connections on every node, read
    /// the history); its answer brings the 101 and the `connected` frame together
    /// ([`Reactor::opened`]), or a refusal (429 past `max_connections_per_user` with
    /// `reject`, 503 `engine_unavailable`). Nothing is read from the connection
    /// meanwhile.
    pub(super) fn open_session_engine(
        &mut self,
        id: ConnId,
        up: http::Upgrade,
        claims: crate::auth::Claims,
        leftover: Vec<u8>,
    ) {
        let thread: Option<Arc<str>> = up.thread_id.as_deref().map(Arc::from);
        let entry = ConnEntry {
            id,
            thread: thread.clone(),
            isolated: up.mode.is_isolated(),
        };
        let user_name = self.registry.entry(&claims.sub).name.clone();
        // Registered now: it counts toward the per-user limit here and deliveries
        // that come before the answer are held for it.
        self.registry.add_conn(&claims.sub, entry);
        let Some(Phase::Http(st)) = live(&mut self.conns, id).map(|c| &mut c.phase) else {
            return;
        };
        // Nothing more is read from it until the answer (`process_http` waits).
        st.engine_wait = true;
        let ticket = OPEN_TICKET | id.serial;
        let agui = up.encoding == Encoding::Agui;
        let ask = up
            .last_seq
            .map(|n| (n, up.epoch.clone().unwrap_or_default()));
        self.waits.opens.insert(
            ticket,
            PendingOpen {
                id,
                user: user_name.clone(),
                mode: up.mode,
                thread,
                token_exp: claims.exp,
                up,
                leftover,
                early: Vec::new(),
            },
        );
        if let Some(redis) = self.engine.redis() {
            let ask = ask.as_ref().map(|(n, e)| (*n, e.as_str()));
            redis.open_with(ticket, &user_name, ask, (id.key, id.serial), agui);
        }
    }

    /// A connection closed while its open waited for the engine: it leaves the
    /// registry and stops counting (called by `close` for every connection; a lookup
    /// in an empty map under the memory engine).
    pub(super) fn forget_pending_open(&mut self, id: ConnId) {
        if self.waits.opens.is_empty() {
            return;
        }
        if let Some(open) = self.waits.opens.remove(&(OPEN_TICKET | id.serial)) {
            self.registry.remove_conn(&open.user, id, self.tick());
            self.engine.release(&open.user, id);
        }
    }

    /// An open the engine did not answer or refused: the upgrade is answered with
    /// `refusal` instead of 101 (the connection never opened).
    fn open_refused(&mut self, ticket: Ticket, refusal: &crate::http::Refusal) {
        let Some(open) = self.waits.opens.get(&ticket) else {
            return;
        };
        let id = open.id;
        // `close` (through `refuse`) forgets the pending open.
        self.refuse(id, refusal);
    }

    /// The engine's answer to an open: the `connected` frame, the replay, then the
    /// deliveries that came meanwhile and are past the answer's top.
    #[allow(clippy::too_many_arguments)] // the answer's parts, one each
    fn opened(
        &mut self,
        ticket: Ticket,
        epoch: &str,
        top_seq: u64,
        resume: Resume,
        replay: Vec<Delivered>,
        runs: Vec<EngineRun>,
        history: Vec<Delivered>,
    ) {
        let Some(open) = self.waits.opens.remove(&ticket) else {
            return;
        };
        if self.open_sessions >= self.s.config.max_connections {
            self.waits.opens.insert(ticket, open);
            let refusal = crate::http::Refusal::too_many("gateway connection limit reached");
            return self.open_refused(ticket, &refusal);
        }
        let Some(Phase::Http(st)) = live(&mut self.conns, open.id).map(|c| &mut c.phase) else {
            return;
        };
        st.engine_wait = false;
        let id = open.id;
        let user = open.user.clone();
        let PendingOpen {
            mode,
            thread,
            token_exp,
            up,
            leftover,
            early,
            ..
        } = open;
        if !self.begin_session(id, &up, user.clone(), token_exp, None, leftover) {
            return;
        }
        let open = OpenedSession {
            id,
            user,
            mode,
            thread,
            token_exp,
            early,
        };
        // Runs started by isolated connections are theirs alone: not listed (as
        // under the memory engine); a thread-filtered connection sees its thread's.
        let mut visible: Vec<&EngineRun> = if open.mode.is_isolated() {
            Vec::new()
        } else {
            runs.iter()
                .filter(|r| match (&open.thread, &r.thread) {
                    (Some(want), Some(got)) => want == got,
                    _ => true,
                })
                .collect()
        };
        visible.sort_by_key(|r| r.started_ts);
        let truncated = visible.len() > super::session::CONNECTED_RUNS_MAX;
        let listed = &visible[..visible.len().min(super::session::CONNECTED_RUNS_MAX)];
        let active_runs = listed
            .iter()
            .map(|r| ActiveRun {
                run_id: &r.run_id,
                thread_id: r.thread.as_deref(),
                agent_name: &r.agent_name,
                started_ts: r.started_ts,
                last_seq: r.last_seq,
                last_type: &r.last_type,
            })
            .collect();
        let id = open.id;
        let Some(entry) = self
            .registry
            .get(&open.user)
            .and_then(|u| u.conns.iter().find(|c| c.id == id))
            .cloned()
        else {
            return; // closed meanwhile
        };
        let connected = control_frame(&ServerFrame::Connected(Connected {
            connection_id: id.public_id(),
            user_id: &open.user,
            mode: open.mode.as_str(),
            thread_id: open.thread.as_deref(),
            epoch,
            last_seq: top_seq,
            resumed: match resume {
                Resume::NotAsked => None,
                Resume::Exact => Some(true),
                Resume::Lost => Some(false),
            },
            heartbeat_interval_ms: self.s.config.heartbeat_interval_ms,
            token_exp: open.token_exp,
            active_runs,
            active_runs_truncated: truncated,
            node_id: Some(&self.node_id),
        }));
        let owners = self.run_owners(&open.user);
        // AG-UI: the state the connection's stream starts from and the frames that
        // open it (its runs in progress), before any replayed or live event (as
        // `session.rs` does under the memory engine).
        let agui = (up.encoding == Encoding::Agui).then(|| {
            let point = match resume {
                Resume::Exact => up.last_seq.unwrap_or(top_seq).min(top_seq),
                _ => top_seq,
            };
            let active: Vec<RunInProgress<'_>> = visible
                .iter()
                .map(|r| RunInProgress {
                    run_id: &r.run_id,
                    thread: r.thread.as_deref(),
                    started_ts: r.started_ts,
                    last_seq: r.last_seq,
                })
                .collect();
            let stream = Stream::rebuild(
                Arc::from(epoch),
                self.s.config.max_active_runs_per_user,
                history
                    .iter()
                    .filter(|d| takes(&entry, d, &owners))
                    .map(|d| &d.frame[..]),
                &active,
                point,
                !matches!(resume, Resume::Exact),
            );
            let mut opening = Vec::new();
            stream.opening_frames(&mut |frame| opening.push(frame));
            (Box::new(stream), opening)
        });
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        let Phase::Open(session) = &mut conn.phase else {
            return;
        };
        conn.out.push(connected);
        if let Some((stream, opening)) = agui {
            for frame in opening {
                conn.out.push(frame);
            }
            session.agui = Some(stream);
        }
        // The replay, then the deliveries that came before the answer and are past its
        // top (the engine hands them on in order, without gaps): owed frames, queued
        // on the socket as it drains ([`Reactor::pump_engine_replay`]).
        let mut owed: VecDeque<Bytes> = replay
            .iter()
            .filter(|d| takes(&entry, d, &owners))
            .map(|d| d.frame.clone())
            .collect();
        let sent = owed.len() as u64;
        let mut cursor = top_seq;
        let mut early = open.early;
        early.sort_unstable_by_key(|d| d.seq);
        for d in early.iter().filter(|d| d.seq > top_seq) {
            if takes(&entry, d, &owners) {
                owed.push_back(d.frame.clone());
            }
            cursor = d.seq;
        }
        session.engine = Cursor::After(cursor);
        if !owed.is_empty() {
            // Marks the session as catching up: `flush_conn` pumps it.
            session.replay_next = Some(cursor);
            self.waits.replays.insert(id, owed);
        }
        mark(&mut conn.flush_queued, &mut self.dirty, id);
        self.stats.events_replayed += sent;
        self.pump_engine_replay(id);
        let conn_id = id.public_id();
        log::info!(
            conn = conn_id.as_str(),
            user:% = open.user;
            "conn={conn_id} user={:?} open mode={} resumed={} replayed={} node={}",
            open.user,
            open.mode.as_str(),
            match resume {
                Resume::NotAsked => "-",
                Resume::Exact => "true",
                Resume::Lost => "false",
            },
            replay.len(),
            self.node_id
        );
        // Frames the client sent with or after its upgrade are buffered: read them now.
        self.read_ws(id);
    }

    /// Run id -> the connection that started it, for this node's runs of `user`
    /// (isolated connections take only those).
    fn run_owners(&self, user: &str) -> HashMap<Arc<str>, ConnId> {
        self.registry
            .get(user)
            .map(|u| {
                u.runs
                    .iter()
                    .filter_map(|(run, r)| r.owner.map(|o| (run.clone(), o)))
                    .collect()
            })
            .unwrap_or_default()
    }

    // ------------------------------------------------------------- watchdog

    /// The cluster's run watchdog, this node's share (each housekeeping tick): ask the
    /// engine for runs whose deadline passed; whichever node takes one ends it.
    pub(super) fn engine_watchdog(&mut self) {
        // Flags of run handles that are gone (their run ended elsewhere, by another
        // node's watchdog for instance): nobody reads them any more.
        self.waits
            .run_flags
            .retain(|_, flag| Arc::strong_count(flag) > 1);
        if let Some(redis) = self.engine.redis() {
            redis.take_due_runs(super::timers::WATCHDOG_BUDGET);
            redis.check_inbound_consumers();
        }
        self.renew_leases();
    }

    /// Every `LEASE_RENEW`: this node's open sessions keep counting cluster-wide.
    fn renew_leases(&mut self) {
        let now = self.tick();
        let every = match self.engine.redis() {
            Some(r) => r.lease_renew_every().as_millis() as u64,
            None => return,
        };
        if now < self.waits.leases_renewed_at + every {
            return;
        }
        self.waits.leases_renewed_at = now;
        let conns: Vec<(Arc<str>, (usize, u64))> = self
            .conns
            .iter()
            .filter_map(|(key, c)| match &c.phase {
                Phase::Open(s) => Some((s.user.clone(), (key, c.serial))),
                _ => None,
            })
            .collect();
        if let Some(redis) = self.engine.redis() {
            redis.renew_leases(conns);
        }
    }

    // ---------------------------------------------------------------- inbound

    /// The flat string fields of a client message in the inbound stream (PROTOCOL.md
    /// section 9): a null `thread_id` or a missing `ref` is `""`, a `ref` that is not
    /// a string is its JSON text, `ts` is milliseconds since the Unix epoch.
    #[allow(clippy::too_many_arguments)] // the stream's fields, one each
    pub(super) fn inbound_fields(
        &self,
        kind: &'static str,
        user: &str,
        thread: Option<&str>,
        run_id: &str,
        text: &str,
        reference: Option<&serde_json::Value>,
        conn: ConnId,
    ) -> Vec<(&'static str, String)> {
        let reference = match reference {
            None | Some(serde_json::Value::Null) => String::new(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        vec![
            ("type", kind.to_owned()),
            ("user_id", user.to_owned()),
            ("thread_id", thread.unwrap_or("").to_owned()),
            ("run_id", run_id.to_owned()),
            ("text", text.to_owned()),
            ("ref", reference),
            ("connection_id", conn.public_id()),
            ("node_id", self.node_id.to_string()),
            ("ts", crate::event::now_ms().to_string()),
        ]
    }

    /// A `user_message` no in-process worker took, while workers read the inbound
    /// stream: acked once the stream stored it ([`Reactor::inbound_stored`]).
    #[allow(clippy::too_many_arguments)] // the message's parts, one each
    pub(super) fn user_message_to_stream(
        &mut self,
        id: ConnId,
        user: Arc<str>,
        run_id: String,
        thread: Option<Arc<str>>,
        isolated: bool,
        reference: serde_json::Value,
        fields: Vec<(&'static str, String)>,
    ) {
        self.waits.next_inbound += 1;
        let ticket = INBOUND_TICKET | self.waits.next_inbound;
        // Its deadline first: once the ack is out, any node gives the run its
        // run_timeout should it never begin.
        self.pending_run_engine(&user, &run_id, thread.clone());
        self.waits.inbound.insert(
            ticket,
            PendingInbound {
                id,
                user,
                run_id,
                thread,
                isolated,
                reference,
            },
        );
        if let Some(redis) = self.engine.redis() {
            redis.append_inbound(Some(ticket), fields);
        }
    }

    /// The inbound stream stored a `user_message`: its run is known from now on (a
    /// `cancel` of it answers `cancel_requested`) and the client gets its ack.
    fn inbound_stored(&mut self, ticket: Ticket) {
        let Some(p) = self.waits.inbound.remove(&ticket) else {
            return;
        };
        let now = self.tick();
        let owner = p.isolated.then_some(p.id);
        self.registry.entry(&p.user).runs.insert(
            Arc::from(p.run_id.as_str()),
            crate::registry::Run::pending(p.thread, owner, now),
        );
        self.send(
            p.id,
            &ServerFrame::Ack {
                reference: &p.reference,
                run_id: &p.run_id,
            },
        );
    }

    /// A run acked by a `user_message` on this node (Redis engine): registered in Redis
    /// as pending, so it gets its `run_timeout` from any node should it never begin
    /// (the memory engine's watchdog ends such a run too) and a `cancel` of it through
    /// any node is marked for its first event.
    pub(super) fn pending_run_engine(
        &mut self,
        user: &str,
        run_id: &str,
        thread: Option<Arc<str>>,
    ) {
        if let Some(redis) = self.engine.redis() {
            redis.pending(user, run_id, thread);
        }
    }

    /// Runs this node took from the deadline set: each gets `agent_error` with
    /// `{"reason": "run_timeout"}` through the engine, like the memory watchdog's.
    fn runs_due(&mut self, due: Vec<DueRun>) {
        if due.is_empty() {
            return;
        }
        self.stats.watchdog_passes += 1;
        self.stats.runs_timed_out += due.len() as u64;
        for run in due {
            log::info!(
                "user={:?} run={:?} idle for run_idle_timeout_ms: ending it (cluster watchdog)",
                run.user,
                run.run_id
            );
            let key = match RunKey::new(
                &run.user,
                run.thread.as_deref(),
                &run.run_id,
                &run.agent_name,
            ) {
                Ok(key) => key,
                Err(e) => {
                    log::error!("run_timeout of a run with bad ids: {e}");
                    continue;
                }
            };
            match Event::new(
                key,
                EventKind::AgentError,
                &AgentErrorData {
                    reason: AgentErrorReason::RunTimeout,
                },
            ) {
                Ok(ev) => self.deliver(ev),
                Err(e) => log::error!("synthetic run_timeout event failed: {e}"),
            }
        }
    }

    // -------------------------------------------------------------- delivery

    /// An event of `user` from the engine: queued on every connection of the user on
    /// this node that takes it and is past its cursor; held for those still waiting
    /// for their open's answer.
    fn deliver_engine(&mut self, user: &str, event: Delivered) {
        let Some(u) = self.registry.get(user) else {
            return;
        };
        let owner = u.runs.get(&event.run).and_then(|r| r.owner);
        self.scratch_targets.clear();
        self.scratch_targets.extend(u.conns.iter().map(|c| c.id));
        let takers: Vec<bool> = u
            .conns
            .iter()
            .map(|c| c.takes(event.thread.as_deref(), owner))
            .collect();
        let mut delivered = 0;
        let mut overflow = Vec::new();
        let owed_max = self.s.config.replay_events + EARLY_PER_OPEN;
        // AG-UI connections: the event read back once, at the first of them.
        let mut agui_source: Option<Option<Source>> = None;
        for (i, target) in self.scratch_targets.iter().copied().enumerate() {
            let Some(conn) = live(&mut self.conns, target) else {
                continue;
            };
            // Its open waits for the engine's answer: held for it.
            if let Some(open) = self.waits.opens.get_mut(&(OPEN_TICKET | target.serial)) {
                if open.early.len() < EARLY_PER_OPEN {
                    open.early.push(event.clone());
                } else {
                    overflow.push(target);
                }
                continue;
            }
            let Phase::Open(session) = &mut conn.phase else {
                continue;
            };
            match session.engine {
                Cursor::After(after) if event.seq <= after => {}
                Cursor::After(_) | Cursor::Live => {
                    session.engine = Cursor::After(event.seq);
                    if takers.get(i).copied().unwrap_or(false) {
                        delivered += 1;
                        match self.waits.replays.get_mut(&target) {
                            // Still catching up: behind the owed frames, in order.
                            // At most `replay_events` + EARLY_PER_OPEN: past it the
                            // session resumes (1013), as a memory-engine session whose
                            // replay buffer moved past it.
                            Some(owed) if owed.len() < owed_max => {
                                owed.push_back(event.frame.clone())
                            }
                            Some(_) => overflow.push(target),
                            None => {
                                match session.agui.as_deref_mut() {
                                    None => conn.out.push(event.frame.clone()),
                                    Some(stream) => {
                                        let src = agui_source.get_or_insert_with(|| {
                                            json_payload(&event.frame).and_then(Source::parse)
                                        });
                                        translate(
                                            stream,
                                            src.as_ref(),
                                            &event.frame,
                                            &mut conn.out,
                                        );
                                    }
                                }
                                mark(&mut conn.flush_queued, &mut self.dirty, target);
                            }
                        }
                    }
                }
            }
        }
        for id in overflow {
            self.close(id, CloseReason::Engine);
        }
        self.stats.events_delivered += delivered;
    }

    /// Queue a catching-up session's owed frames (replay, then what came meanwhile)
    /// until half of `max_pending_bytes` is queued; called again as its socket drains
    /// (`flush_conn`). A client that keeps reading is never closed as slow because of
    /// its replay, as under the memory engine.
    pub(super) fn pump_engine_replay(&mut self, id: ConnId) {
        let limit = (self.s.config.max_pending_bytes / 2).max(1);
        let Some(conn) = live(&mut self.conns, id) else {
            self.waits.replays.remove(&id);
            return;
        };
        let Phase::Open(session) = &mut conn.phase else {
            return;
        };
        let Some(owed) = self.waits.replays.get_mut(&id) else {
            session.replay_next = None;
            return;
        };
        let mut queued = false;
        while conn.out.pending() < limit {
            let Some(frame) = owed.pop_front() else {
                break;
            };
            match session.agui.as_deref_mut() {
                None => conn.out.push(frame),
                Some(stream) => {
                    let src = json_payload(&frame).and_then(Source::parse);
                    translate(stream, src.as_ref(), &frame, &mut conn.out);
                }
            }
            queued = true;
        }
        if owed.is_empty() {
            self.waits.replays.remove(&id);
            session.replay_next = None;
        }
        if queued {
            mark(&mut conn.flush_queued, &mut self.dirty, id);
        }
    }

    /// Keep (first event of an in-process run) or let go (its last) the run handle's
    /// cancel flag, so a cancel from any node reaches it ([`EngineEvent::Cancelled`]).
    pub(super) fn track_run_flag(&mut self, ev: &Event) {
        let key = (ev.key.user_id.clone(), ev.key.run_id.clone());
        if ev.kind.ends_run() {
            self.waits.run_flags.remove(&key);
        } else if let Some(flag) = &ev.cancel_flag {
            if self.waits.run_flags.len() < self.s.config.max_active_runs {
                self.waits.run_flags.insert(key, flag.clone());
            }
        }
    }

    /// A cancel under the Redis engine that nobody waits for (the webhook's, once its
    /// worker answered): this node's in-process run handle at once, the others when
    /// they publish the run's next (or first) event.
    pub(super) fn mark_cancelled_engine(&mut self, user: &Arc<str>, run_id: &str) {
        self.cancel_engine_asking(user, run_id, None);
    }

    /// Mark a run cancelled: this node's in-process run handle at once, the others
    /// when they publish the run's next (or first) event; with a ticket, Redis says
    /// whether the run was in progress or pending ([`EngineEvent::CancelAnswered`]).
    fn cancel_engine_asking(&mut self, user: &Arc<str>, run_id: &str, ticket: Option<Ticket>) {
        let key = (user.clone(), Arc::from(run_id));
        if let Some(flag) = self.waits.run_flags.get(&key) {
            flag.store(true, std::sync::atomic::Ordering::Release);
        }
        if let Some(redis) = self.engine.redis() {
            redis.cancel(user, run_id, ticket);
        }
    }

    /// A client's `cancel` under the Redis engine (the run may be in progress or
    /// pending through any node, or have ended through another): Redis marks it when
    /// it is in progress or pending anywhere, and the answer follows as under the
    /// memory engine ([`Reactor::cancel_answered`]); `first`: the first cancel of the
    /// run on this node (the workers are told once).
    pub(super) fn cancel_engine(&mut self, id: ConnId, user: &Arc<str>, run_id: &str, first: bool) {
        self.waits.next_cancel += 1;
        let ticket = CANCEL_TICKET | self.waits.next_cancel;
        self.waits.cancels.insert(
            ticket,
            PendingCancel {
                id,
                user: user.clone(),
                run_id: run_id.to_owned(),
                first,
            },
        );
        self.cancel_engine_asking(user, run_id, Some(ticket));
    }

    /// Redis's answer to a client's `cancel`: `not_found` when the run is neither in
    /// progress nor pending (never was, or ended), as under the memory engine; else
    /// the workers are told (inbound stream, in-process channel; the first time on
    /// this node) and the client gets `cancel_requested`.
    fn cancel_answered(&mut self, ticket: Ticket, known: bool) {
        let Some(p) = self.waits.cancels.remove(&ticket) else {
            return;
        };
        if !known {
            let why = "no active run with this run_id";
            return self.send_error(p.id, ErrorCode::NotFound, why, None);
        }
        if p.first {
            let fields = self.inbound_fields("cancel", &p.user, None, &p.run_id, "", None, p.id);
            if let Some(redis) = self.engine.redis() {
                redis.append_inbound(None, fields);
            }
            let _ = self.inbound.try_send(crate::emitter::Inbound::Cancel {
                user_id: p.user.to_string(),
                run_id: p.run_id.clone(),
            });
        }
        self.send(p.id, &ServerFrame::CancelRequested { run_id: &p.run_id });
    }

    /// The engine lost events of `user` for this node: its connections here resume.
    fn engine_gap(&mut self, user: &str) {
        let Some(u) = self.registry.get(user) else {
            return;
        };
        let ids: Vec<ConnId> = u.conns.iter().map(|c| c.id).collect();
        for id in ids {
            // Those still waiting for their open get the engine's newer answer.
            if self.session(id).is_some() {
                self.waits.gaps += 1;
                self.close(id, CloseReason::Engine);
            }
        }
    }

    // --------------------------------------------------------------- publish

    /// Send a publish request's events (at least one) to the engine; the answer waits
    /// for all of their outcomes ([`Reactor::publish_answered`]). The HTTP connection `conn` is
    /// not read meanwhile.
    pub(super) fn publish_engine(
        &mut self,
        conn: ConnId,
        keep_alive: bool,
        events: Vec<Event>,
        index_of: &[usize],
        accepted: usize,
        cancelled: Vec<String>,
    ) {
        self.waits.next_request += 1;
        let request = self.waits.next_request;
        if let Some(Phase::Http(st)) = live(&mut self.conns, conn).map(|c| &mut c.phase) {
            st.engine_wait = true;
        }
        let n = events.len();
        for (i, ev) in events.into_iter().enumerate() {
            let index = index_of.get(i).copied().unwrap_or(i) as u64;
            self.deliver_as(ev, (request << PUBLISH_INDEX_BITS) | index);
        }
        let pending = PendingPublish {
            conn,
            keep_alive,
            accepted,
            events: n,
            answered: 0,
            cancelled,
            refused: None,
            too_many: None,
            unavailable: false,
        };
        self.waits.publishes.insert(request, pending);
    }

    /// One event of a publish request answered.
    fn publish_answered(&mut self, ticket: Ticket, outcome: Outcome) {
        let request = ticket >> PUBLISH_INDEX_BITS;
        let index = (ticket & ((1 << PUBLISH_INDEX_BITS) - 1)) as usize;
        let Some(p) = self.waits.publishes.get_mut(&request) else {
            return;
        };
        p.answered += 1;
        let first = |was: Option<usize>| Some(was.map_or(index, |r| r.min(index)));
        match outcome {
            Outcome::Stored => {}
            Outcome::RunEnded => p.refused = first(p.refused),
            Outcome::TooManyRuns => p.too_many = first(p.too_many),
            Outcome::Unavailable => p.unavailable = true,
        }
        if p.answered < p.events {
            return;
        }
        if let Some(p) = self.waits.publishes.remove(&request) {
            self.answer_publish(p);
        }
    }

    /// Write a publish request's answer, then let its connection go on.
    fn answer_publish(&mut self, p: PendingPublish) {
        let (status, body) = if p.unavailable {
            let body = ErrorBody {
                error: ErrorCode::EngineUnavailable,
                message: "the engine (Redis) did not answer in time; the events may or may \
                          not be stored: retry with the same idempotency keys",
                index: None,
            };
            (503, frames::to_json(&body))
        } else if let Some(index) = p.too_many {
            let body = ErrorBody {
                error: ErrorCode::TooManyRuns,
                message: "the event would start a run past max_active_runs_per_user or \
                          max_active_runs, counted on every node (the events before it are \
                          stored)",
                index: Some(index),
            };
            (429, frames::to_json(&body))
        } else if let Some(index) = p.refused {
            self.stats.dropped(DropReason::RunEnded, 1);
            let body = ErrorBody {
                error: ErrorCode::BadEvent,
                message: "the event's run already ended (the events before it are stored)",
                index: Some(index),
            };
            (400, frames::to_json(&body))
        } else {
            let body = Accepted {
                accepted: p.accepted,
                cancelled: p.cancelled,
            };
            (202, frames::to_json(&body))
        };
        let close = !p.keep_alive;
        let resp = http::json_response(status, &body, close, false, &[]);
        let id = p.conn;
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        let Phase::Http(st) = &mut conn.phase else {
            return;
        };
        st.engine_wait = false;
        if !close {
            // Pipelined requests behind this one get their turn.
            mark(&mut st.again_queued, &mut self.http_again, id);
        }
        self.respond_raw(id, resp, close);
        if !close {
            self.rearm_phase(id, self.s.config.handshake_timeout_ms);
        }
    }
}

/// Whether connection `entry` takes `event` (thread filter; isolated connections take
/// the runs they started, known from this node's `user_message` acks).
fn takes(entry: &ConnEntry, event: &Delivered, owners: &HashMap<Arc<str>, ConnId>) -> bool {
    entry.takes(event.thread.as_deref(), owners.get(&event.run).copied())
}
