//! The Redis engine (`engine = "redis"`, PROTOCOL.md section 9): users' seq, epoch,
//! kept events and ended runs live in Redis, shared by every node.
//!
//! # Threads and channels
//!
//! ```text
//!             StoreRequest (bounded)          Raw (bounded) + WakeSignal
//! reactor ──────────────────────────► store thread ──────────────────────┐
//!    │       FeedRequest (bounded)          ▲ opens, once subscribed      ▼
//!    └──────────────────────────────► feed thread ─── Raw::Delivery ──► RedisEngine
//!                                                                   (reactor side)
//! ```
//!
//! - [`RedisEngine`] is the reactor's side: it never touches Redis, only channels. It
//!   sends requests, and [`RedisEngine::next_event`] turns what came back into
//!   [`EngineEvent`]s, checking each user's deliveries for order: a duplicate is
//!   dropped, a gap reported ([`EngineEvent::Gap`]).
//! - `store` (thread `aw-redis-store`): runs the scripts, pipelined (one round trip
//!   per batch of requests).
//! - `feed` (thread `aw-redis-feed`): the pub/sub connection, one channel per user
//!   with a connection on this node.
//! - `keys`: the key layout; `publish.lua`, `open.lua`, `top.lua`: the scripts.
//! - `gaps`: filling a gap in what pub/sub brought from the user's stream
//!   (`fill.lua`), reporting it only when that cannot be exact.
//!
//! # Order and gaps, per user on this node
//!
//! The node keeps the last seq it handed on for each user with local connections
//! (`fed`). It is set by the user's first open answer (its top seq); deliveries that
//! arrive before that answer wait (at most [`EARLY_MAX`]). Then a delivery with seq
//! `<= fed` is a duplicate (dropped), `fed + 1` is handed on, anything higher means
//! pub/sub lost messages: the node fills the gap from the user's stream (`gaps`,
//! `fill.lua`), holding the user's later deliveries meanwhile, and hands everything on
//! in order; only when the fill cannot be exact (events trimmed or expired, the epoch
//! changed, the fill failed, too much held) does it report [`EngineEvent::Gap`] (the
//! reactor closes the user's connections here with 1013; they resume from the
//! stream). After the feed reconnects, each user's top seq and epoch are compared
//! with `fed`: a higher top (lost messages) is filled the same way; another epoch or a
//! lower top (Redis restored an older copy) is a gap.
//! An open answer whose epoch differs from the one the node knew also reports a gap
//! first: the user's history was lost (Redis restarted without it).
//!
//! Per connection, the reactor skips deliveries with seq `<=` the top seq of that
//! connection's open answer (they came in its replay).

mod feed;
mod gaps;
mod keys;
mod store;
mod target;

pub(crate) use target::{parse_url, UrlForm};
mod subs;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::{Delivered, EngineEvent, EngineRun, Ticket};
use crate::event::Event;
use crate::registry::Resume;
use crate::stats::RunOutcome;
use feed::FeedRequest;
use store::StoreRequest;

/// Requests waiting for each engine thread at most; past it a request is answered
/// [`EngineEvent::Unavailable`] at once.
const REQUESTS_MAX: usize = 65_536;
/// Answers and deliveries waiting for the reactor at most (the engine threads wait
/// for room: Redis then holds the node's pub/sub output, up to its own limit).
const EVENTS_MAX: usize = 65_536;
/// Deliveries of one user held until the user's first open answer; past it: a gap.
pub(crate) const EARLY_MAX: usize = 1024;

/// What the Redis engine needs from the settings (PROTOCOL.md sections 5 and 9).
#[derive(Debug, Clone)]
pub(crate) struct RedisSettings {
    /// `redis_url` (forms: [`target`]'s doc)
    pub url: String,
    /// `redis_tls_ca_file`: the PEM of a private CA that signs the server's certificate
    /// (`rediss://`); None: the system's trust store.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// `redis_sentinel_password`: the sentinels' `requirepass` (Sentinel URLs only).
    pub sentinel_password: Option<String>,
    /// `redis_prefix`
    pub prefix: String,
    /// `redis_timeout_ms`, as the read, write and connect timeout of every connection.
    pub timeout: Duration,
    /// `replay_events`: the stream's cap (`MAXLEN ~`); 0 keeps nothing.
    pub replay_events: usize,
    /// `replay_ttl_ms`: the expiry of a user's keys, refreshed by events and opens.
    pub replay_ttl_ms: u64,
    /// `max_active_runs_per_user`: a run past it is refused, cluster-wide.
    pub max_active_runs_per_user: usize,
    /// `max_active_runs`: runs in progress over all users, cluster-wide (the size of
    /// the shared deadline set); a run past it is refused.
    pub max_active_runs: usize,
    /// `run_idle_timeout_ms`: a run with no event for it gets `run_timeout`.
    pub run_idle_timeout_ms: u64,
    /// `node_id`: the name of this node's connections in Redis and of its channel.
    pub node_id: String,
    /// `max_connections_per_user`, counted over every node.
    pub max_connections_per_user: usize,
    /// `per_user_policy = evict_oldest`: an open past the limit evicts the user's
    /// oldest connections wherever they are (4002); else (`reject`) it is refused
    /// ([`EngineEvent::OpenRejected`], 429).
    pub evict_oldest: bool,
    /// `max_revoked_users`: the revocations in force kept in Redis at most.
    pub max_revoked_users: usize,
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error("redis_url: {0}")]
    Url(String),
    #[error("redis_tls_ca_file: {0}")]
    TlsCa(String),
    #[error("cannot start the Redis engine's threads: {0}")]
    Thread(#[from] std::io::Error),
}

/// Counters the engine threads keep (for `/ws/stats`).
#[derive(Debug, Default)]
pub(crate) struct EngineCounters {
    /// Pipelines sent by the store thread and the requests they carried.
    pub round_trips: AtomicU64,
    pub requests: AtomicU64,
    /// Sum and maximum of the pipelines' round-trip times, in microseconds.
    pub round_trip_us_total: AtomicU64,
    pub round_trip_us_max: AtomicU64,
    /// Times the store thread's connection came back after a loss.
    pub reconnects: AtomicU64,
    /// Times the feed thread's pub/sub connection was lost.
    pub feed_losses: AtomicU64,
    /// Pipelines by round-trip time: bucket `i` counts times below `2^i` us (the last
    /// bucket: anything longer).
    pub round_trip_buckets: [AtomicU64; ROUND_TRIP_BUCKETS],
}

/// Buckets of [`EngineCounters::round_trip_buckets`]: up to 2^23 us (8.4 s).
pub(crate) const ROUND_TRIP_BUCKETS: usize = 24;

impl EngineCounters {
    /// The round-trip time (us) under which a share `p` (0 to 1) of the pipelines
    /// took: the upper bound of the power-of-two bucket it falls in (0 before any).
    pub(crate) fn round_trip_us_quantile(&self, p: f64) -> u64 {
        let counts: Vec<u64> = self
            .round_trip_buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = ((total as f64) * p).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= want {
                return 1u64 << i;
            }
        }
        1u64 << (ROUND_TRIP_BUCKETS - 1)
    }
}

/// What the engine's threads share.
pub(super) struct Shared {
    /// Where connections go: one server or the master Sentinel names.
    target: target::Target,
    settings: RedisSettings,
    stop: AtomicBool,
    counters: EngineCounters,
}

impl Shared {
    fn record_round_trip(&self, took: Duration, requests: usize) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let c = &self.counters;
        c.round_trips.fetch_add(1, Ordering::Relaxed);
        c.requests.fetch_add(requests as u64, Ordering::Relaxed);
        c.round_trip_us_total.fetch_add(us, Ordering::Relaxed);
        c.round_trip_us_max.fetch_max(us, Ordering::Relaxed);
        // Bucket i holds times in [2^(i-1), 2^i): the bit length of `us`.
        let bucket = ((u64::BITS - us.leading_zeros()) as usize).min(ROUND_TRIP_BUCKETS - 1);
        if let Some(b) = c.round_trip_buckets.get(bucket) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What the engine threads send the reactor side.
#[derive(Debug)]
pub(super) enum Raw {
    /// Handed on as is.
    Event(EngineEvent),
    /// An answer nobody waits for.
    Nothing,
    Opened {
        ticket: Ticket,
        user: Arc<str>,
        epoch: Arc<str>,
        top_seq: u64,
        resume: Resume,
        replay: Vec<Delivered>,
        runs: Vec<EngineRun>,
        history: Vec<Delivered>,
    },
    Delivery {
        user: Arc<str>,
        event: Delivered,
    },
    /// A user's epoch (None: no history) and top seq, after a pub/sub reconnect.
    Top {
        user: Arc<str>,
        epoch: Option<Arc<str>>,
        top: u64,
    },
    /// The answer to a gap fill `id` (`StoreRequest::Fill`): the kept events asked
    /// for (None: the epoch changed, or the read failed).
    Filled {
        id: u64,
        user: Arc<str>,
        entries: Option<Vec<Delivered>>,
    },
}

/// The engine threads' way back to the reactor: the channel, then a wake.
#[derive(Clone)]
pub(super) struct Out {
    tx: Sender<Raw>,
    wake: Arc<dyn Fn() + Send + Sync>,
    /// The store connection's last reported state: 0 unknown, 1 down, 2 up.
    state: Arc<AtomicU8>,
    /// Raised while down: emitters wait for it to fall (`EmitError::EngineUnavailable`).
    down: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

impl Out {
    fn send(&self, raw: Raw) {
        // Blocks while the reactor is behind by EVENTS_MAX (see there); fails only
        // when the engine is gone.
        let _ = self.tx.send(raw);
    }

    fn wake(&self) {
        (self.wake)();
    }

    /// Report the store connection's state when it changed.
    fn connected(&self, up: bool) {
        let now = if up { 2 } else { 1 };
        let before = self.state.swap(now, Ordering::AcqRel);
        self.down.store(!up, Ordering::Release);
        if before != now {
            if up && before == 1 {
                self.shared
                    .counters
                    .reconnects
                    .fetch_add(1, Ordering::Relaxed);
            }
            if up {
                log::info!("redis: connected");
            } else {
                log::warn!("redis: unavailable");
            }
            self.send(Raw::Event(EngineEvent::Connected(up)));
            self.wake();
        }
    }
}

/// A thread marker of the scripts: `-` (no thread) or `+<thread_id>`.
fn parse_thread(marker: &[u8]) -> Option<Option<Arc<str>>> {
    match marker.split_first()? {
        (b'-', []) => Some(None),
        (b'+', rest) => Some(Some(Arc::from(std::str::from_utf8(rest).ok()?))),
        _ => None,
    }
}

/// The parts of `ev`'s publish request only some events have (None for most).
fn publish_extras(ev: &Event) -> Option<Box<store::PublishExtras>> {
    use crate::event::EventKind;
    let tool_call = match ev.kind {
        EventKind::ToolExecuting | EventKind::ToolCompleted => ev.tool_call_id(),
        _ => None,
    };
    let synthetic = ev.kind == EventKind::AgentError
        && crate::registry::is_synthetic_end(ev.data_markers().reason.as_deref());
    if ev.refused_flag.is_none() && tool_call.is_none() && !synthetic {
        return None;
    }
    Some(Box::new(store::PublishExtras {
        refused_flag: ev.refused_flag.clone(),
        tool_call,
        synthetic,
    }))
}

/// One user with connections on this node.
#[derive(Debug, Default)]
struct Local {
    /// Open requests sent plus connections open, minus releases.
    conns: usize,
    /// The epoch of the user's history as this node last learnt it.
    epoch: Option<Arc<str>>,
    /// The last seq handed on; None until the first open answer.
    fed: Option<u64>,
    /// Deliveries that came before the first open answer (at most [`EARLY_MAX`]).
    early: Vec<Delivered>,
    /// A gap being filled from the stream, with the deliveries held meanwhile.
    fill: Option<gaps::Fill>,
    /// A top seq asked again (`gaps`): `fed` when it was asked.
    recheck: Option<u64>,
}

/// The reactor's side of the Redis engine (see the module doc).
pub(crate) struct RedisEngine {
    shared: Arc<Shared>,
    store: Sender<StoreRequest>,
    feed: Sender<FeedRequest>,
    rx: Receiver<Raw>,
    /// Bounded by the users with connections (or opens) on this node.
    users: HashMap<Arc<str>, Local>,
    ready: VecDeque<EngineEvent>,
    threads: Vec<JoinHandle<()>>,
    /// Gap fills: ids, those under way and waiting, and what they did (`/ws/stats`).
    fills: gaps::Fills,
}

impl RedisEngine {
    /// Start the engine's threads; `wake` is called after answers were sent (the
    /// reactor's `WakeSignal::wake`); `down` is raised while Redis is unreachable (the
    /// emitters read it). Connecting happens on the threads: a Redis
    /// that is down is reported as [`EngineEvent::Connected`]`(false)`, not an error.
    pub(crate) fn start(
        settings: RedisSettings,
        wake: Arc<dyn Fn() + Send + Sync>,
        down: Arc<AtomicBool>,
    ) -> Result<RedisEngine, StartError> {
        let ca = match &settings.tls_ca_file {
            Some(path) => Some(target::read_ca_file(path).map_err(StartError::TlsCa)?),
            None => None,
        };
        let target = target::Target::new(
            &settings.url,
            ca,
            settings.sentinel_password.as_deref(),
            settings.timeout,
        )
        .map_err(StartError::Url)?;
        let shared = Arc::new(Shared {
            target,
            settings,
            stop: AtomicBool::new(false),
            counters: EngineCounters::default(),
        });
        let (store_tx, store_rx) = bounded(REQUESTS_MAX);
        let (feed_tx, feed_rx) = bounded(REQUESTS_MAX);
        let (out_tx, out_rx) = bounded(EVENTS_MAX);
        let out = Out {
            tx: out_tx,
            wake,
            state: Arc::new(AtomicU8::new(0)),
            down,
            shared: shared.clone(),
        };
        let mut threads = Vec::with_capacity(2);
        let (sh, o) = (shared.clone(), out.clone());
        threads.push(
            std::thread::Builder::new()
                .name("aw-redis-store".into())
                .spawn(move || store::run(sh, store_rx, o))?,
        );
        let (sh, st) = (shared.clone(), store_tx.clone());
        threads.push(
            std::thread::Builder::new()
                .name("aw-redis-feed".into())
                .spawn(move || feed::run(sh, feed_rx, st, out))?,
        );
        Ok(RedisEngine {
            shared,
            store: store_tx,
            feed: feed_tx,
            rx: out_rx,
            users: HashMap::new(),
            ready: VecDeque::new(),
            threads,
            fills: gaps::Fills::default(),
        })
    }

    /// The engine threads' counters.
    pub(crate) fn counters(&self) -> &EngineCounters {
        &self.shared.counters
    }

    /// Users this node listens to (users with connections here).
    pub(crate) fn users_listened(&self) -> usize {
        self.users.len()
    }

    /// Publish `ev`; its outcome comes back as [`EngineEvent::Published`],
    /// [`EngineEvent::Refused`] or [`EngineEvent::Unavailable`] with `ticket`, and
    /// the frame as deliveries to every node holding a connection of the user.
    pub(crate) fn publish(&mut self, ticket: Ticket, ev: &Event) {
        let (head, tail) = ev.around_seq();
        let req = StoreRequest::Publish {
            ticket,
            user: ev.key.user_id.clone(),
            head,
            tail,
            thread: ev.key.thread_id.clone(),
            run: ev.key.run_id.clone(),
            ends_run: ev.kind.ends_run(),
            key: ev.idempotency_key.clone(),
            agent: ev.key.agent_name.clone(),
            ts: ev.ts_ms,
            kind: ev.kind.as_str().into(),
            outcome: match ev.kind {
                crate::event::EventKind::AgentCompleted => Some(RunOutcome::Completed),
                crate::event::EventKind::AgentError => Some(RunOutcome::of_error(
                    ev.data_markers().reason.as_deref(),
                    false,
                )),
                _ => None,
            },
            extras: publish_extras(ev),
        };
        if self.store.try_send(req).is_err() {
            self.ready.push_back(EngineEvent::Unavailable { ticket });
        }
    }

    /// A run acked by a `user_message` on this node and not begun: it gets a deadline
    /// in Redis, so any node's watchdog gives it its `run_timeout` when no event comes
    /// (also when this node died), and a `cancel` of it from any node is marked. Fire
    /// and forget (a failure is logged).
    pub(crate) fn pending(&mut self, user: &str, run: &str, thread: Option<Arc<str>>) {
        let req = StoreRequest::Pending {
            user: Arc::from(user),
            run: Arc::from(run),
            thread,
        };
        if self.store.try_send(req).is_err() {
            log::warn!(
                "redis engine: request queue full: the pending run user={user:?} run={run:?} \
                 gets no cluster-wide run_timeout if it never begins"
            );
        }
    }

    /// Connection `(key, serial)` of this node as a member of its user's connections
    /// in Redis (`<node_id>\n<key>:<serial>`; the evicting node publishes the part
    /// after the newline on this node's channel).
    fn member(&self, (key, serial): (usize, u64)) -> String {
        format!("{}\n{key}:{serial}", self.shared.settings.node_id)
    }

    /// Renew the leases of this node's connections (every `LEASE_RENEW`), so they
    /// keep counting toward `max_connections_per_user` on every node.
    pub(crate) fn renew_leases(&mut self, conns: Vec<(Arc<str>, (usize, u64))>) {
        let mut members: Vec<(Arc<str>, String)> = Vec::new();
        for (user, conn) in conns {
            members.push((user, self.member(conn)));
            if members.len() == store::LEASES_PER_REQUEST {
                let chunk = std::mem::take(&mut members);
                let _ = self.store.try_send(StoreRequest::Leases { members: chunk });
            }
        }
        if !members.is_empty() {
            let _ = self.store.try_send(StoreRequest::Leases { members });
        }
    }

    /// How often [`RedisEngine::renew_leases`] is due.
    pub(crate) fn lease_renew_every(&self) -> std::time::Duration {
        store::LEASE_RENEW
    }

    /// Take up to `limit` runs whose deadline passed (this node's share of the
    /// cluster's watchdog); they come back as [`EngineEvent::RunsDue`].
    pub(crate) fn take_due_runs(&mut self, limit: usize) {
        // Skipped when the queue is full: the next housekeeping tick asks again.
        let _ = self.store.try_send(StoreRequest::Due { limit });
    }

    /// Append a client message to the inbound stream; with a ticket, the outcome
    /// comes back ([`EngineEvent::InboundStored`] or `Unavailable`).
    pub(crate) fn append_inbound(
        &mut self,
        ticket: Option<Ticket>,
        fields: Vec<(&'static str, String)>,
    ) {
        if self
            .store
            .try_send(StoreRequest::Inbound { ticket, fields })
            .is_err()
        {
            if let Some(ticket) = ticket {
                self.ready.push_back(EngineEvent::Unavailable { ticket });
            }
        }
    }

    /// Revoke `user` on every node: the others close the user's connections (and,
    /// with `until`, refuse new ones); Redis keeps `(user, until)` for nodes started
    /// later. Fire and forget: a failure is logged (this node applied it already).
    pub(crate) fn revoke(&mut self, user: &str, until: Option<u64>) {
        let req = StoreRequest::Revoke {
            user: Arc::from(user),
            until,
        };
        if self.store.try_send(req).is_err() {
            log::error!(
                "redis: the revocation of user={user:?} was not sent (engine busy): only \
                 this node applied it"
            );
        }
    }

    /// Mark `user`'s run `run` cancelled in Redis (a client's `cancel`), when it is in
    /// progress or pending (acked, not begun): the node that publishes the run's next
    /// (or first) event hears [`EngineEvent::Cancelled`]. With a ticket, whether it was
    /// comes back as [`EngineEvent::CancelAnswered`] (or `Unavailable`).
    pub(crate) fn cancel(&mut self, user: &str, run: &str, ticket: Option<Ticket>) {
        let req = StoreRequest::Cancel {
            user: Arc::from(user),
            run: Arc::from(run),
            ticket,
        };
        if self.store.try_send(req).is_err() {
            if let Some(ticket) = ticket {
                self.ready.push_back(EngineEvent::Unavailable { ticket });
            }
        }
    }

    /// Ask whether the inbound stream has a consumer group
    /// ([`EngineEvent::InboundConsumers`]).
    pub(crate) fn check_inbound_consumers(&mut self) {
        let _ = self.store.try_send(StoreRequest::InboundGroups);
    }

    /// [`RedisEngine::open_with`] without the history (an agentwire connection).
    #[cfg(test)]
    pub(crate) fn open(
        &mut self,
        ticket: Ticket,
        user: &str,
        ask: Option<(u64, &str)>,
        conn: (usize, u64),
    ) {
        self.open_with(ticket, user, ask, conn, false);
    }

    /// Open a connection of `user` (resuming after `(last_seq, epoch)` when asked):
    /// the node listens to the user first, then reads; the answer comes back as
    /// [`EngineEvent::Opened`] (or `Unavailable`). Every open is paired with one
    /// [`RedisEngine::release`] when the connection ends (or its open failed). With
    /// `history` the answer also holds the kept events up to the connection's starting
    /// point while the user has runs in progress (an AG-UI connection rebuilds its
    /// translation state from them: the `history` of [`EngineEvent::Opened`]).
    pub(crate) fn open_with(
        &mut self,
        ticket: Ticket,
        user: &str,
        ask: Option<(u64, &str)>,
        conn: (usize, u64),
        history: bool,
    ) {
        let user: Arc<str> = match self.users.get_key_value(user) {
            Some((name, _)) => name.clone(),
            None => Arc::from(user),
        };
        let req = FeedRequest::Subscribe {
            user: user.clone(),
            then: Some(StoreRequest::Open {
                ticket,
                user: user.clone(),
                ask: ask.map(|(seq, epoch)| (seq, epoch.to_owned())),
                member: self.member(conn),
                history,
            }),
        };
        if self.feed.try_send(req).is_err() {
            self.ready.push_back(EngineEvent::Unavailable { ticket });
            return;
        }
        self.users.entry(user).or_default().conns += 1;
    }

    /// A connection of `user` on this node ended (or its open failed): it stops
    /// counting cluster-wide (`conn`), and the node stops listening to the user with
    /// the last one.
    pub(crate) fn release(&mut self, user: &str, conn: Option<(usize, u64)>) {
        if let Some(conn) = conn {
            let member = self.member(conn);
            let _ = self.store.try_send(StoreRequest::Leave {
                user: Arc::from(user),
                member,
            });
        }
        let Some(local) = self.users.get_mut(user) else {
            return;
        };
        local.conns = local.conns.saturating_sub(1);
        if local.conns > 0 {
            return;
        }
        if let Some((name, _)) = self.users.remove_entry(user) {
            if self
                .feed
                .try_send(FeedRequest::Unsubscribe { user: name })
                .is_err()
            {
                // The subscription stays until the feed reconnects; its messages
                // are dropped here (no local user).
                log::warn!("redis engine: request queue full, unsubscribe dropped");
            }
        }
    }

    /// The next thing the engine has for the loop, if any (drain after each wake).
    pub(crate) fn next_event(&mut self) -> Option<EngineEvent> {
        loop {
            if let Some(ev) = self.ready.pop_front() {
                return Some(ev);
            }
            match self.rx.try_recv().ok()? {
                // A top seq the store could not read (after a feed reconnect): the
                // user's order starts again with the next open answer, as for any gap.
                Raw::Event(EngineEvent::Gap { user }) => self.report_gap(user, "top not read"),
                Raw::Event(ev) => return Some(ev),
                Raw::Nothing => {}
                Raw::Delivery { user, event } => self.feed_one(user, event),
                Raw::Opened {
                    ticket,
                    user,
                    epoch,
                    top_seq,
                    resume,
                    replay,
                    runs,
                    history,
                } => self.opened(EngineEvent::Opened {
                    ticket,
                    user,
                    epoch,
                    top_seq,
                    resume,
                    replay,
                    runs,
                    history,
                }),
                Raw::Top { user, epoch, top } => self.top_answered(user, epoch, top),
                Raw::Filled { id, user, entries } => self.filled(id, user, entries),
            }
        }
    }

    /// An open answer: a changed epoch is a gap for the connections already here;
    /// the first answer sets where the user's deliveries continue.
    fn opened(&mut self, event: EngineEvent) {
        let EngineEvent::Opened {
            user,
            epoch,
            top_seq,
            ..
        } = &event
        else {
            return;
        };
        let (user, epoch, top_seq) = (user.clone(), epoch.clone(), *top_seq);
        let Some(local) = self.users.get_mut(&user) else {
            // Released before its answer came: the reactor drops it.
            self.ready.push_back(event);
            return;
        };
        if local.epoch.as_ref().is_some_and(|known| *known != epoch) {
            local.fed = None;
            local.fill = None;
            self.ready
                .push_back(EngineEvent::Gap { user: user.clone() });
        }
        local.epoch = Some(epoch);
        self.ready.push_back(event);
        if local.fed.is_none() {
            local.fed = Some(top_seq);
            let mut early = std::mem::take(&mut local.early);
            early.sort_unstable_by_key(|d| d.seq);
            for d in early {
                self.feed_one(user.clone(), d);
            }
        }
    }

    /// Check one delivery of `user` against the user's order (module doc) and queue
    /// what follows from it.
    fn feed_one(&mut self, user: Arc<str>, event: Delivered) {
        let Some(local) = self.users.get_mut(&user) else {
            return; // no connection here any more
        };
        let Some(fed) = local.fed else {
            if local.early.len() < EARLY_MAX {
                local.early.push(event);
            } else {
                local.early.clear();
                self.ready.push_back(EngineEvent::Gap { user });
            }
            return;
        };
        if local.fill.is_some() {
            self.hold(user, event);
            return;
        }
        if event.seq <= fed {
            return;
        }
        if event.seq == fed + 1 {
            local.fed = Some(event.seq);
            self.ready.push_back(EngineEvent::Delivery { user, event });
            return;
        }
        // Pub/sub lost fed+1..seq-1: read them from the stream.
        let to = event.seq - 1;
        self.fill_gap(user, to, vec![event], 0);
    }
}

impl Drop for RedisEngine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // The threads see the flag within POLL (feed) and their next request or
        // ping (store); the closed channels end them too. Joined so no thread
        // outlives the gateway.
        // Close the way back first: a thread waiting for room in it gives up.
        drop(std::mem::replace(&mut self.rx, bounded(0).1));
        let (store, feed) = (bounded(0).0, bounded(0).0);
        drop(std::mem::replace(&mut self.store, store));
        drop(std::mem::replace(&mut self.feed, feed));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests;
