//! The store thread: the one connection that runs the scripts (publish, open, top).
//!
//! It takes requests from a bounded channel, and everything waiting in it (up to
//! [`BATCH`]) goes to Redis as one pipeline: one drain of the emitter channel or one
//! publish API request costs one round trip, however many events it carries. Each
//! answer goes back to the reactor as a [`Raw`] message, then one wake per batch.
//!
//! The connection has read and write timeouts of `redis_timeout_ms`: a pipeline not
//! answered within it fails, and every request of the batch is answered
//! [`EngineEvent::Unavailable`] (its outcome is unknown: a publish may still have been
//! stored). While disconnected, requests are answered `Unavailable` at once and the
//! thread reconnects with backoff ([`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`]); an
//! idle connection is checked with `PING` every [`IDLE_PING`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use redis::Value;

use super::keys::UserKeys;
use super::{parse_thread, Out, Raw, Shared};
use crate::engine::{Delivered, DueRun, EngineEvent, EngineRun, Ticket};
use crate::event::text_frame;
use crate::registry::Resume;

/// Requests sent to Redis in one pipeline at most.
pub(super) const BATCH: usize = 512;
/// First reconnect delay, doubled after each failure up to [`BACKOFF_MAX`].
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// An idle connection is checked this often.
const IDLE_PING: Duration = Duration::from_secs(1);
/// A connection counts cluster-wide until its lease ends, unless its node renews it:
/// the connections of a node that died stop counting within this.
pub(super) const LEASE: Duration = Duration::from_secs(15);
/// How often a node renews its connections' leases.
pub(super) const LEASE_RENEW: Duration = Duration::from_secs(5);
/// Connections per lease renewal request.
pub(super) const LEASES_PER_REQUEST: usize = 500;

/// Ended run ids remembered per user (the refusal of events after a run ended).
pub(super) const ENDED_RUNS_KEPT: usize = 1024;
/// Entries the inbound stream keeps (`MAXLEN ~`): workers that fall this far behind
/// lose the oldest messages.
pub(super) const INBOUND_KEPT: usize = 100_000;

const PUBLISH_LUA: &str = include_str!("publish.lua");
const OPEN_LUA: &str = include_str!("open.lua");
const TOP_LUA: &str = include_str!("top.lua");
const DUE_LUA: &str = include_str!("due.lua");
const CANCEL_LUA: &str = include_str!("cancel.lua");
const LEASE_LUA: &str = include_str!("lease.lua");
const PENDING_LUA: &str = include_str!("pending.lua");
/// Every script, in the order [`load_scripts`] answers.
const SCRIPTS: [&str; 7] = [
    PUBLISH_LUA,
    OPEN_LUA,
    TOP_LUA,
    DUE_LUA,
    CANCEL_LUA,
    LEASE_LUA,
    PENDING_LUA,
];
/// Runs acked by a `user_message` and not begun kept per user in Redis at most
/// (`pending.lua`; each leaves at its first event or its `run_timeout`). Past it a
/// new one gets no cluster-wide deadline (logged): each node's own
/// `max_pending_runs_per_user` normally keeps far below.
pub(super) const PENDING_RUNS_KEPT: usize = 1024;

/// The parts of a publish request only some events have: a run handle's first event,
/// tool events, ends the gateway or the emitter made up.
#[derive(Debug, Default)]
pub(super) struct PublishExtras {
    /// The run handle's refused flag (an emitted run's first event): raised when the
    /// event would start a run past the caps, as the memory engine does.
    pub refused_flag: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The event's `tool_call_id` (tool events only): pairs a `tool_completed` with
    /// its `tool_executing` for the tool-duration histogram.
    pub tool_call: Option<Box<str>>,
    /// An end the gateway or the emitter made up (`run_timeout`, `no_agent`, ...): as
    /// a run's first event it says nothing of the time to first event.
    pub synthetic: bool,
}

/// What the store thread is asked.
#[derive(Debug)]
pub(super) enum StoreRequest {
    /// Publish one event: its JSON around the seq (`head` + seq + `tail`).
    Publish {
        ticket: Ticket,
        user: Arc<str>,
        head: Bytes,
        tail: Bytes,
        thread: Option<Arc<str>>,
        run: Arc<str>,
        ends_run: bool,
        /// The worker's idempotency key (PROTOCOL.md section 6a).
        key: Option<Arc<str>>,
        agent: Arc<str>,
        /// The event's `ts` (ms): a new run's `started_ts`.
        ts: u64,
        /// The event's type (the run's `last_type`).
        kind: Arc<str>,
        /// How the event ends its run (None: it does not); a plain `agent_error` of a
        /// run a client cancelled counts as `cancelled` (the script says so).
        outcome: Option<crate::stats::RunOutcome>,
        /// What few events need besides (boxed: the request stays small).
        extras: Option<Box<PublishExtras>>,
    },
    /// A run acked by a `user_message` and not begun (`pending.lua`): it takes a
    /// deadline in the shared set, so it gets its `run_timeout` from any node.
    Pending {
        user: Arc<str>,
        run: Arc<str>,
        thread: Option<Arc<str>>,
    },
    /// Open a connection of `user`, resuming after `(last_seq, epoch)` when asked.
    Open {
        ticket: Ticket,
        user: Arc<str>,
        ask: Option<(u64, String)>,
        /// The connection as a member of the user's connections: `<node_id>\n<conn>`.
        member: String,
        /// Also read the kept events up to the connection's starting point (an
        /// AG-UI connection rebuilds its translation state from them).
        history: bool,
    },
    /// Renew the leases of this node's connections (every [`LEASE_RENEW`]).
    Leases { members: Vec<(Arc<str>, String)> },
    /// A connection ended: it stops counting.
    Leave { user: Arc<str>, member: String },
    /// The user's epoch and top seq (after a pub/sub reconnect).
    Top { user: Arc<str> },
    /// The kept events `from..=to` of `user` while its epoch is still `epoch` (a gap
    /// in what pub/sub brought; `fill.lua`), answered [`Raw::Filled`] with `id`.
    Fill {
        id: u64,
        user: Arc<str>,
        epoch: Arc<str>,
        from: u64,
        to: u64,
    },
    /// Take up to `limit` runs whose deadline passed.
    Due { limit: usize },
    /// Append a client message to the inbound stream (flat string fields); answered
    /// [`EngineEvent::InboundStored`] when `ticket` is given.
    Inbound {
        ticket: Option<Ticket>,
        fields: Vec<(&'static str, String)>,
    },
    /// Whether the inbound stream has a consumer group.
    InboundGroups,
    /// Mark a run in progress (or pending) cancelled (a client's `cancel`); with a
    /// ticket, answered [`EngineEvent::CancelAnswered`] (whether the run was).
    Cancel {
        user: Arc<str>,
        run: Arc<str>,
        ticket: Option<Ticket>,
    },
    /// Revoke `user` on every node (`revoke.lua`): store `(user, until)` when `until`
    /// is given (epoch s) and publish it on the revocation channel.
    Revoke { user: Arc<str>, until: Option<u64> },
    /// Read the revocations in force ([`EngineEvent::Revocations`]): after the store
    /// connects and after the feed reconnects (what pub/sub lost meanwhile).
    Revocations,
}

/// The revocation script (rare: sent with `EVAL`, Redis caches it).
const REVOKE_LUA: &str = include_str!("revoke.lua");
/// The gap-filling script (rare: sent with `EVAL`, Redis caches it).
const FILL_LUA: &str = include_str!("fill.lua");

/// An open connection with the scripts loaded.
struct Link {
    con: redis::Connection,
    publish: String,
    open: String,
    top: String,
    due: String,
    cancel: String,
    lease: String,
    pending: String,
}

fn connect(shared: &Shared) -> redis::RedisResult<Link> {
    let mut con = shared.target.connect()?;
    con.set_read_timeout(Some(shared.settings.timeout))?;
    con.set_write_timeout(Some(shared.settings.timeout))?;
    let [publish, open, top, due, cancel, lease, pending] = load_scripts(&mut con)?;
    Ok(Link {
        lease,
        pending,
        con,
        publish,
        open,
        top,
        due,
        cancel,
    })
}

/// One call of `publish.lua`: its keys and arguments, in the script's order (see its
/// header). The store thread builds one per published event; the engine tests call
/// the script with it too, so both stay in step with the script.
pub(super) struct PublishCall<'a> {
    pub keys: &'a UserKeys,
    pub deadlines: &'a str,
    pub head: &'a [u8],
    pub tail: &'a [u8],
    /// `-` (no thread) or `+` and the thread id.
    pub marker: &'a str,
    pub run: &'a str,
    pub ends_run: bool,
    pub replay_events: usize,
    pub replay_ttl_ms: u64,
    /// The pub/sub channel the event goes out on (the user's).
    pub channel: &'a str,
    /// The epoch a user without one gets.
    pub fresh_epoch: &'a str,
    pub now: u64,
    /// The worker's idempotency key, "" for none.
    pub key: &'a str,
    pub agent: &'a str,
    pub ts: u64,
    pub kind: &'a str,
    pub max_active_runs_per_user: usize,
    pub run_idle_timeout_ms: u64,
    pub user: &'a str,
    pub max_active_runs: usize,
    /// The event's `tool_call_id`, "" for none.
    pub tool_call: &'a str,
}

impl PublishCall<'_> {
    /// Append the keys and arguments to `cmd` (an `EVALSHA sha` or `EVAL script`).
    pub fn args(&self, cmd: &mut redis::Cmd) {
        cmd.arg(8)
            .arg(&self.keys.meta)
            .arg(&self.keys.stream)
            .arg(&self.keys.ended)
            .arg(&self.keys.keys)
            .arg(&self.keys.runs)
            .arg(self.deadlines)
            .arg(&self.keys.cancelled)
            .arg(&self.keys.pending)
            .arg(self.head)
            .arg(self.tail)
            .arg(self.marker)
            .arg(self.run)
            .arg(if self.ends_run { "1" } else { "0" })
            .arg(self.replay_events)
            .arg(self.replay_ttl_ms)
            .arg(self.channel)
            .arg(self.fresh_epoch)
            .arg(self.now)
            .arg(ENDED_RUNS_KEPT)
            .arg(self.key)
            .arg(crate::registry::KEYS_PER_USER)
            .arg(self.agent)
            .arg(self.ts)
            .arg(self.kind)
            .arg(self.max_active_runs_per_user)
            .arg(self.run_idle_timeout_ms)
            .arg(self.user)
            .arg(self.max_active_runs)
            .arg(self.tool_call);
    }
}

/// Load every script (`SCRIPT LOAD`); their SHA1s in the order of [`SCRIPTS`]. Loading
/// again gives the same SHA1s (they hash the text).
fn load_scripts(con: &mut redis::Connection) -> redis::RedisResult<[String; 7]> {
    let mut shas: [String; 7] = Default::default();
    for (sha, text) in shas.iter_mut().zip(SCRIPTS) {
        *sha = redis::cmd("SCRIPT").arg("LOAD").arg(text).query(con)?;
    }
    Ok(shas)
}

/// The thread's body: until the engine stops (its request channel closes).
pub(super) fn run(shared: Arc<Shared>, rx: Receiver<StoreRequest>, out: Out) {
    let mut link: Option<Link> = None;
    let mut backoff = BACKOFF_MIN;
    let mut retry_at = Instant::now();
    let mut batch: Vec<StoreRequest> = Vec::with_capacity(BATCH);
    let mut epochs = EpochSource::new();
    let mut last_failure = String::new();
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        if link.is_none() && Instant::now() >= retry_at {
            match connect(&shared) {
                Ok(l) => {
                    link = Some(l);
                    last_failure.clear();
                    backoff = BACKOFF_MIN;
                    // A node started later (or back from an outage) learns the
                    // revocations in force before it serves a request.
                    batch.push(StoreRequest::Revocations);
                    out.connected(true);
                }
                Err(e) => {
                    // The reason (a refused certificate, no master named by Sentinel,
                    // ...) at warn once per kind of failure, not at every retry.
                    let why = e.to_string();
                    if why != last_failure {
                        log::warn!("redis store: connect failed: {why}");
                        last_failure = why;
                    } else {
                        log::debug!("redis store: connect failed: {e}");
                    }
                    out.connected(false);
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        let wait = match link {
            Some(_) => IDLE_PING,
            None => retry_at
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(5)),
        };
        // A batch already started (the revocations read on connecting) goes at once.
        let received = if batch.is_empty() {
            rx.recv_timeout(wait).map(Some)
        } else {
            Ok(None)
        };
        match received {
            Ok(Some(first)) => batch.push(first),
            Ok(None) => {}
            Err(RecvTimeoutError::Timeout) => {
                if let Some(l) = &mut link {
                    let pong: redis::RedisResult<String> = redis::cmd("PING").query(&mut l.con);
                    if let Err(e) = pong {
                        log::warn!("redis store: ping failed: {e}");
                        link = None;
                        out.connected(false);
                    }
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let answered = match &mut link {
            Some(l) => {
                let started = Instant::now();
                let result = run_batch(&shared, l, &batch, &mut epochs);
                shared.record_round_trip(started.elapsed(), batch.len());
                result
            }
            None => Err(None),
        };
        match answered {
            Ok(events) => {
                for ev in events {
                    out.send(ev);
                }
            }
            Err(e) => {
                if let Some(e) = e {
                    log::warn!("redis store: {} request(s) failed: {e}", batch.len());
                    link = None;
                    retry_at = Instant::now();
                    out.connected(false);
                }
                for req in &batch {
                    out.send(unavailable(req));
                }
            }
        }
        batch.clear();
        out.wake();
    }
}

/// The answer to a request whose outcome is unknown.
fn unavailable(req: &StoreRequest) -> Raw {
    match req {
        StoreRequest::Publish { ticket, .. } | StoreRequest::Open { ticket, .. } => {
            Raw::Event(EngineEvent::Unavailable { ticket: *ticket })
        }
        // Unknown top: the node cannot tell what it missed, so the user resumes.
        StoreRequest::Top { user } => Raw::Event(EngineEvent::Gap { user: user.clone() }),
        // The gap cannot be filled: reported (the user's connections here resume).
        StoreRequest::Fill { id, user, .. } => Raw::Filled {
            id: *id,
            user: user.clone(),
            entries: None,
        },
        // Nothing was taken (or it is unknown): the next tick asks again.
        StoreRequest::Due { .. } => Raw::Event(EngineEvent::RunsDue(Vec::new())),
        StoreRequest::Inbound {
            ticket: Some(ticket),
            ..
        } => Raw::Event(EngineEvent::Unavailable { ticket: *ticket }),
        StoreRequest::Inbound { ticket: None, .. } => Raw::Nothing,
        StoreRequest::InboundGroups => Raw::Event(EngineEvent::InboundConsumers(false)),
        StoreRequest::Cancel {
            ticket: Some(ticket),
            ..
        } => Raw::Event(EngineEvent::Unavailable { ticket: *ticket }),
        StoreRequest::Cancel { .. } | StoreRequest::Leases { .. } | StoreRequest::Leave { .. } => {
            Raw::Nothing
        }
        StoreRequest::Pending { user, run, .. } => {
            log::warn!(
                "redis store: the pending run user={user:?} run={run:?} did not reach Redis: \
                 no run_timeout if it never begins"
            );
            Raw::Nothing
        }
        StoreRequest::Revoke { user, .. } => {
            log::error!(
                "redis store: the revocation of user={user:?} did not reach Redis: only \
                 this node applied it"
            );
            Raw::Nothing
        }
        StoreRequest::Revocations => {
            log::warn!("redis store: could not read the revocations in force");
            Raw::Nothing
        }
    }
}

/// Fresh epochs: this thread's random part and a counter (unique per node and call;
/// a user's epoch only has to differ from its earlier ones).
struct EpochSource {
    base: String,
    next: u64,
}

impl EpochSource {
    fn new() -> EpochSource {
        EpochSource {
            base: crate::reactor::new_epoch(),
            next: 0,
        }
    }

    fn fresh(&mut self) -> String {
        self.next += 1;
        format!("{}{:x}", self.base, self.next)
    }
}

/// One pipeline for the whole batch; the answers in request order. `Err(Some(e))`
/// when the pipeline itself failed (connection lost, timeout): the link is dropped.
fn run_batch(
    shared: &Shared,
    link: &mut Link,
    batch: &[StoreRequest],
    epochs: &mut EpochSource,
) -> Result<Vec<Raw>, Option<redis::RedisError>> {
    let s = &shared.settings;
    let now = crate::event::now_ms();
    let deadlines = super::keys::deadlines(&s.prefix);
    let inbound = super::keys::inbound(&s.prefix);
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for req in batch {
        match req {
            StoreRequest::Publish {
                user,
                head,
                tail,
                thread,
                run,
                ends_run,
                key,
                agent,
                ts,
                kind,
                extras,
                ..
            } => {
                let keys = UserKeys::new(&s.prefix, user);
                let marker = match thread {
                    Some(t) => format!("+{t}"),
                    None => "-".to_owned(),
                };
                let call = PublishCall {
                    keys: &keys,
                    deadlines: &deadlines,
                    head,
                    tail,
                    marker: &marker,
                    run,
                    ends_run: *ends_run,
                    replay_events: s.replay_events,
                    replay_ttl_ms: s.replay_ttl_ms,
                    channel: &keys.channel,
                    fresh_epoch: &epochs.fresh(),
                    now,
                    key: key.as_deref().unwrap_or(""),
                    agent,
                    ts: *ts,
                    kind,
                    max_active_runs_per_user: s.max_active_runs_per_user,
                    run_idle_timeout_ms: s.run_idle_timeout_ms,
                    user,
                    max_active_runs: s.max_active_runs,
                    tool_call: extras
                        .as_ref()
                        .and_then(|x| x.tool_call.as_deref())
                        .unwrap_or(""),
                };
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(&link.publish);
                call.args(&mut cmd);
                pipe.add_command(cmd);
            }
            StoreRequest::Pending { user, run, thread } => {
                let keys = UserKeys::new(&s.prefix, user);
                let marker = match thread {
                    Some(t) => format!("+{t}"),
                    None => "-".to_owned(),
                };
                pipe.cmd("EVALSHA")
                    .arg(&link.pending)
                    .arg(4)
                    .arg(&keys.runs)
                    .arg(&keys.ended)
                    .arg(&keys.pending)
                    .arg(&deadlines)
                    .arg(&**run)
                    .arg(&**user)
                    .arg(now)
                    .arg(s.run_idle_timeout_ms)
                    .arg(s.replay_ttl_ms.max(2 * s.run_idle_timeout_ms))
                    .arg(PENDING_RUNS_KEPT)
                    .arg(marker);
            }
            StoreRequest::Leases { members } => {
                let cmd = pipe.cmd("EVALSHA").arg(&link.lease).arg(members.len() * 2);
                for (user, _) in members {
                    let keys = UserKeys::new(&s.prefix, user);
                    cmd.arg(keys.leases).arg(keys.conns);
                }
                cmd.arg(now + LEASE.as_millis() as u64).arg(now);
                for (_, member) in members {
                    cmd.arg(member.as_str());
                }
            }
            StoreRequest::Leave { user, member } => {
                // Its lease entry goes when the lease ends (the open script prunes).
                let keys = UserKeys::new(&s.prefix, user);
                pipe.cmd("ZREM").arg(&keys.conns).arg(member.as_str());
            }
            StoreRequest::Open {
                user,
                ask,
                member,
                history,
                ..
            } => {
                let keys = UserKeys::new(&s.prefix, user);
                let (asked, their_epoch, after) = match ask {
                    Some((after, epoch)) => ("1", epoch.as_str(), *after),
                    None => ("0", "", 0),
                };
                pipe.cmd("EVALSHA")
                    .arg(&link.open)
                    .arg(5)
                    .arg(&keys.meta)
                    .arg(&keys.stream)
                    .arg(&keys.runs)
                    .arg(&keys.conns)
                    .arg(&keys.leases)
                    .arg(epochs.fresh())
                    .arg(s.replay_ttl_ms)
                    .arg(asked)
                    .arg(their_epoch)
                    .arg(after)
                    // `MAXLEN ~` may keep up to one stream node (100 entries) more.
                    .arg(s.replay_events + 256)
                    .arg(member.as_str())
                    .arg(now)
                    .arg(LEASE.as_millis() as u64)
                    .arg(s.max_connections_per_user)
                    .arg(if s.evict_oldest { "evict" } else { "reject" })
                    .arg(super::keys::node_channel(&s.prefix, ""))
                    .arg(if *history { "1" } else { "0" });
            }
            StoreRequest::Top { user } => {
                let keys = UserKeys::new(&s.prefix, user);
                pipe.cmd("EVALSHA").arg(&link.top).arg(1).arg(&keys.meta);
            }
            StoreRequest::Fill {
                user,
                epoch,
                from,
                to,
                ..
            } => {
                let keys = UserKeys::new(&s.prefix, user);
                pipe.cmd("EVAL")
                    .arg(FILL_LUA)
                    .arg(2)
                    .arg(&keys.meta)
                    .arg(&keys.stream)
                    .arg(&**epoch)
                    .arg(*from)
                    .arg(*to)
                    .arg(to.saturating_sub(*from) + 1);
            }
            StoreRequest::Inbound { fields, .. } => {
                let cmd = pipe
                    .cmd("XADD")
                    .arg(&inbound)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(INBOUND_KEPT)
                    .arg("*");
                for (name, value) in fields {
                    cmd.arg(*name).arg(value.as_str());
                }
            }
            StoreRequest::InboundGroups => {
                pipe.cmd("XINFO").arg("GROUPS").arg(&inbound);
            }
            StoreRequest::Cancel { user, run, .. } => {
                let keys = UserKeys::new(&s.prefix, user);
                pipe.cmd("EVALSHA")
                    .arg(&link.cancel)
                    .arg(3)
                    .arg(&keys.runs)
                    .arg(&keys.cancelled)
                    .arg(&keys.pending)
                    .arg(&**run)
                    .arg(s.replay_ttl_ms.max(2 * s.run_idle_timeout_ms));
            }
            StoreRequest::Revoke { user, until } => {
                pipe.cmd("EVAL")
                    .arg(REVOKE_LUA)
                    .arg(2)
                    .arg(super::keys::revoked(&s.prefix))
                    .arg(super::keys::revoke_channel(&s.prefix))
                    .arg(&**user)
                    .arg(until.unwrap_or(0))
                    .arg(now / 1000)
                    .arg(s.max_revoked_users)
                    .arg(&s.node_id);
            }
            StoreRequest::Revocations => {
                // Bounded: the script keeps at most max_revoked_users in force.
                pipe.cmd("ZRANGE")
                    .arg(super::keys::revoked(&s.prefix))
                    .arg(format!("({}", now / 1000))
                    .arg("+inf")
                    .arg("BYSCORE")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(s.max_revoked_users)
                    .arg("WITHSCORES");
            }
            StoreRequest::Due { limit } => {
                pipe.cmd("EVALSHA")
                    .arg(&link.due)
                    .arg(1)
                    .arg(&deadlines)
                    .arg(now)
                    .arg(*limit)
                    // Taken again if its run_timeout was not stored by then.
                    .arg(s.run_idle_timeout_ms);
            }
        }
    }
    let results: Vec<redis::RedisResult<Value>> = pipe.query(&mut link.con).map_err(Some)?;
    let mut events = Vec::with_capacity(batch.len());
    // Redis forgot the scripts (`SCRIPT FLUSH`, a failover to a server that never
    // loaded them): without loading them again every later request would fail too.
    let mut forgotten = false;
    for (req, result) in batch.iter().zip(results) {
        let value = match result {
            Ok(v) => v,
            // No stream yet: no consumer group either.
            Err(_) if matches!(req, StoreRequest::InboundGroups) => {
                events.push(Raw::Event(EngineEvent::InboundConsumers(false)));
                continue;
            }
            // A demoted master (a Sentinel failover): drop the link, every request of
            // the batch is answered Unavailable, the reconnect asks Sentinel again.
            Err(e) if super::target::is_readonly(&e) => return Err(Some(e)),
            Err(e) => {
                // A script error (NOSCRIPT, OOM, ...): this request failed, the others
                // stand. After NOSCRIPT (the script did not run) the scripts are loaded
                // again below, for the next batch.
                forgotten |= e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript);
                log::warn!("redis store: script failed: {e}");
                events.push(unavailable(req));
                continue;
            }
        };
        let mut told = None;
        let answered = answer(req, value, &mut told).unwrap_or_else(|| {
            log::error!("redis store: unexpected script answer");
            unavailable(req)
        });
        // What the reactor must also hear goes first: a cancel it learns from this
        // event's answer belongs in the publish request's answer, written with the last.
        events.extend(told);
        events.push(answered);
    }
    if forgotten {
        // Same text, same SHA1s: the link's names stay right. A failure here is the
        // connection's: the answers above stand; the next batch fails on it
        // and reconnects (loading them).
        match load_scripts(&mut link.con) {
            Ok(_) => log::warn!("redis store: Redis had forgotten the scripts: loaded again"),
            Err(e) => log::warn!("redis store: loading the scripts again failed: {e}"),
        }
    }
    Ok(events)
}

/// Decode one script's answer; `told` gets what the reactor must also hear (a run a
/// client cancelled, from a publish's answer).
fn answer(req: &StoreRequest, value: Value, told: &mut Option<Raw>) -> Option<Raw> {
    match req {
        StoreRequest::Inbound { ticket, .. } => {
            // An id: stored. Without a ticket nobody waits.
            return Some(match ticket {
                Some(ticket) => Raw::Event(EngineEvent::InboundStored { ticket: *ticket }),
                None => Raw::Nothing,
            });
        }
        StoreRequest::Cancel {
            ticket: Some(ticket),
            ..
        } => {
            return Some(Raw::Event(EngineEvent::CancelAnswered {
                ticket: *ticket,
                known: matches!(value, Value::Int(1)),
            }))
        }
        StoreRequest::Cancel { .. } | StoreRequest::Leases { .. } | StoreRequest::Leave { .. } => {
            return Some(Raw::Nothing)
        }
        StoreRequest::Pending { user, run, .. } => {
            if matches!(value, Value::Int(-1)) {
                log::error!(
                    "redis store: user={user:?} has {PENDING_RUNS_KEPT} runs acked and not \
                     begun in Redis: run={run:?} gets no cluster-wide run_timeout if it never \
                     begins"
                );
            }
            return Some(Raw::Nothing);
        }
        StoreRequest::Revoke { user, .. } => {
            if matches!(value, Value::Int(-1)) {
                log::error!(
                    "redis store: user={user:?} revoked on every node now, but not kept for \
                     nodes started later: max_revoked_users revocations are in force in Redis"
                );
            }
            return Some(Raw::Nothing);
        }
        StoreRequest::Revocations => {
            return revocations_of(value).map(|list| Raw::Event(EngineEvent::Revocations(list)))
        }
        StoreRequest::InboundGroups => {
            let groups = match value {
                Value::Array(g) => !g.is_empty(),
                _ => false,
            };
            return Some(Raw::Event(EngineEvent::InboundConsumers(groups)));
        }
        _ => {}
    }
    let Value::Array(parts) = value else {
        return None;
    };
    let mut parts = parts.into_iter();
    match req {
        StoreRequest::Publish {
            ticket,
            user,
            run,
            outcome,
            extras,
            ..
        } => {
            let first = parts.next()?;
            if matches!(first, Value::Int(-1)) {
                return Some(Raw::Event(EngineEvent::Repeat { ticket: *ticket }));
            }
            if matches!(first, Value::Int(-2)) {
                // As under the memory engine: the run handle is refused (its emits
                // return `TooManyRuns`).
                if let Some(flag) = extras.as_ref().and_then(|x| x.refused_flag.as_ref()) {
                    flag.store(true, std::sync::atomic::Ordering::Release);
                }
                return Some(Raw::Event(EngineEvent::TooManyRuns { ticket: *ticket }));
            }
            let seq = int(first)?;
            let cancelled = matches!(parts.nth(1), Some(Value::Int(1)));
            // This publish began and/or ended its run: counted here only, so the
            // nodes' run metrics sum to the cluster's.
            let began = matches!(parts.next(), Some(Value::Int(1)));
            let age_ms = parts.next().and_then(int).unwrap_or(0);
            // -1 (none) reads as None.
            let since_ms = parts.next().and_then(int);
            let tool_ms = parts.next().and_then(int);
            let transition = crate::stats::RunTransition {
                began,
                since_message: since_ms
                    .filter(|_| began && !extras.as_ref().is_some_and(|x| x.synthetic))
                    .map(Duration::from_millis),
                tool: tool_ms.map(Duration::from_millis),
                ended: outcome.map(|o| {
                    let o = match o {
                        crate::stats::RunOutcome::Error if cancelled => {
                            crate::stats::RunOutcome::Cancelled
                        }
                        o => o,
                    };
                    (o, Duration::from_millis(age_ms))
                }),
            };
            if cancelled {
                *told = Some(Raw::Event(EngineEvent::Cancelled {
                    user: user.clone(),
                    run: run.clone(),
                    ticket: *ticket,
                }));
            }
            Some(Raw::Event(if seq == 0 {
                EngineEvent::Refused { ticket: *ticket }
            } else {
                EngineEvent::Published {
                    ticket: *ticket,
                    seq,
                    run: transition,
                }
            }))
        }
        StoreRequest::Open { ticket, user, .. } => {
            let epoch: Arc<str> = Arc::from(text(parts.next()?)?);
            let top_seq = int(parts.next()?)?;
            let code = text(parts.next()?)?;
            if code == "x" {
                return Some(Raw::Event(EngineEvent::OpenRejected { ticket: *ticket }));
            }
            let Value::Array(entries) = parts.next()? else {
                return None;
            };
            let mut replay = Vec::new();
            let resume = match code.as_str() {
                "n" => Resume::NotAsked,
                "l" => Resume::Lost,
                _ => {
                    replay.reserve(entries.len());
                    for e in entries {
                        replay.push(entry(e)?);
                    }
                    Resume::Exact
                }
            };
            let runs = match parts.next()? {
                Value::Array(flat) => runs_of(flat),
                Value::Map(pairs) => runs_of(pairs.into_iter().flat_map(|(k, v)| [k, v]).collect()),
                _ => return None,
            };
            let history = match parts.next() {
                Some(Value::Array(entries)) => {
                    let mut kept = Vec::with_capacity(entries.len());
                    for e in entries {
                        kept.push(entry(e)?);
                    }
                    kept
                }
                _ => Vec::new(),
            };
            Some(Raw::Opened {
                ticket: *ticket,
                user: user.clone(),
                epoch,
                top_seq,
                resume,
                replay,
                runs,
                history,
            })
        }
        StoreRequest::Inbound { .. }
        | StoreRequest::InboundGroups
        | StoreRequest::Pending { .. }
        | StoreRequest::Cancel { .. }
        | StoreRequest::Leases { .. }
        | StoreRequest::Leave { .. }
        | StoreRequest::Revoke { .. }
        | StoreRequest::Revocations => None,
        StoreRequest::Due { .. } => {
            // The members were taken out of the set: one that does not read is left
            // out (logged), the others still get their run_timeout.
            let due = parts
                .filter_map(|member| {
                    let run = text(member).as_deref().and_then(due_run);
                    if run.is_none() {
                        log::error!("redis store: a run deadline member did not read: left out");
                    }
                    run
                })
                .collect();
            Some(Raw::Event(EngineEvent::RunsDue(due)))
        }
        StoreRequest::Fill {
            id, user, epoch, ..
        } => {
            let now = text(parts.next()?)?;
            let Value::Array(list) = parts.next()? else {
                return None;
            };
            // Another epoch: the history the gap belongs to is gone.
            let entries = if now == **epoch {
                let mut kept = Vec::with_capacity(list.len());
                for e in list {
                    kept.push(entry(e)?);
                }
                Some(kept)
            } else {
                None
            };
            Some(Raw::Filled {
                id: *id,
                user: user.clone(),
                entries,
            })
        }
        StoreRequest::Top { user } => {
            let epoch = text(parts.next()?)?;
            let top = int(parts.next()?)?;
            Some(Raw::Top {
                user: user.clone(),
                epoch: (!epoch.is_empty()).then(|| Arc::from(epoch)),
                top,
            })
        }
    }
}

/// The runs hash (`[run_id, json, ...]`) as runs; a record that does not decode is
/// left out (logged).
fn runs_of(flat: Vec<Value>) -> Vec<EngineRun> {
    #[derive(serde::Deserialize)]
    struct Rec {
        t: Option<String>,
        a: String,
        s: u64,
        q: u64,
        y: String,
    }
    let mut runs = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(id), Some(json)) = (it.next(), it.next()) {
        let (Some(id), Some(json)) = (text(id), bytes(json)) else {
            continue;
        };
        match serde_json::from_slice::<Rec>(&json) {
            Ok(r) => runs.push(EngineRun {
                run_id: Arc::from(id),
                thread: r.t.map(Arc::from),
                agent_name: Arc::from(r.a),
                started_ts: r.s,
                last_seq: r.q,
                last_type: Arc::from(r.y),
            }),
            Err(e) => log::error!("redis store: run record of {id:?} unreadable: {e}"),
        }
    }
    runs
}

/// A deadline member, the JSON array `[user, run, thread marker, agent]` (see
/// `publish.lua`; JSON since user, run and agent may hold newlines).
fn due_run(member: &str) -> Option<DueRun> {
    let (user, run_id, marker, agent_name): (String, String, String, String) =
        serde_json::from_str(member).ok()?;
    Some(DueRun {
        user: Arc::from(user),
        run_id: Arc::from(run_id),
        thread: parse_thread(marker.as_bytes())?,
        agent_name: Arc::from(agent_name),
    })
}

/// One stream entry `[id, [field, value, ...]]` as a delivered event.
fn entry(value: Value) -> Option<Delivered> {
    let Value::Array(parts) = value else {
        return None;
    };
    let mut parts = parts.into_iter();
    let id = text(parts.next()?)?;
    let seq = id.split('-').next()?.parse().ok()?;
    let Value::Array(fields) = parts.next()? else {
        return None;
    };
    let (mut json, mut thread, mut run) = (None, None, None);
    let mut fields = fields.into_iter();
    while let (Some(name), Some(v)) = (fields.next(), fields.next()) {
        match text(name)?.as_str() {
            "j" => json = Some(bytes(v)?),
            "t" => thread = Some(parse_thread(&bytes(v)?)?),
            "r" => run = Some(Arc::from(text(v)?)),
            _ => {}
        }
    }
    Some(Delivered {
        seq,
        thread: thread?,
        run: run?,
        frame: text_frame(&json?),
    })
}

/// `ZRANGE ... WITHSCORES`: `[user, until, ...]` (RESP2) or `[[user, until], ...]`
/// (RESP3) as `(user, until)` pairs.
fn revocations_of(value: Value) -> Option<Vec<(Arc<str>, u64)>> {
    let Value::Array(items) = value else {
        return None;
    };
    let mut flat = Vec::with_capacity(items.len() * 2);
    for item in items {
        match item {
            Value::Array(pair) => flat.extend(pair),
            other => flat.push(other),
        }
    }
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(user), Some(score)) = (it.next(), it.next()) {
        let until = match score {
            Value::Double(d) => d as u64,
            other => int(other)?,
        };
        out.push((Arc::from(text(user)?), until));
    }
    Some(out)
}

fn int(v: Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(n).ok(),
        Value::BulkString(b) => std::str::from_utf8(&b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

fn text(v: Value) -> Option<String> {
    String::from_utf8(bytes(v)?).ok()
}
