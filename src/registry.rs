//! Per-user routing state: which connections a user has open (oldest first), the
//! user's epoch, sequence counter, replay buffer and runs. Kept symmetric with the
//! reactor's slab: every open session has exactly one entry here, removed by the one
//! close path.
//!
//! Pure data and decisions (no I/O), so routing rules are unit-tested here: which
//! connections receive an event ([`User::targets`]), what a resuming client gets
//! ([`User::resume`]), which runs may start ([`Registry::route`]), and when a user's
//! state is forgotten.
//!
//! Memory is bounded as a whole ([`Limits`]):
//! - kept events: per user by count (`replay_events`) and bytes
//!   (`replay_bytes_per_user`), over all users by `replay_memory_bytes`, which also
//!   counts [`USER_OVERHEAD_BYTES`] per known user. Past the global budget the oldest
//!   kept event of any user goes first (a global FIFO of kept events, in routing
//!   order); when no event is left to evict, idle users are forgotten. The FIFO's
//!   entries of events a user already dropped by itself are skipped when met and
//!   compacted away when they outnumber the live ones, so the FIFO stays within twice
//!   the kept events (plus a constant).
//! - runs: at most `max_active_runs_per_user` per user and `max_active_runs` in all;
//!   the first event of a run past either is refused ([`Refused::TooManyRuns`]).
//! - users: a user with no connection, no run and nothing kept, idle for
//!   `replay_ttl_ms`, is forgotten ([`Registry::sweep`]); so is any idle user when the
//!   budget needs room. Forgetting is always safe because a user seen again gets a new
//!   epoch (see [`Registry::epoch_for_new_user`]): a client resuming with the old epoch
//!   gets `resumed:false`, and no `seq` is ever reused within an epoch.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use slab::Slab;

use crate::conn::ConnId;
use crate::event::{Event, RunKey};

/// One open connection as routing sees it.
#[derive(Clone, Debug)]
pub struct ConnEntry {
    pub id: ConnId,
    /// `thread_id` filter: only events of this thread (and null-thread events).
    pub thread: Option<Arc<str>>,
    /// `isolated` mode: only events of runs started from this connection.
    pub isolated: bool,
}

impl ConnEntry {
    fn takes(&self, thread: Option<&str>, owner: Option<ConnId>) -> bool {
        if let (Some(want), Some(got)) = (self.thread.as_deref(), thread) {
            if want != got {
                return false;
            }
        }
        match owner {
            Some(o) => o == self.id,
            None => !self.isolated,
        }
    }
}

/// A kept event for resume.
#[derive(Clone, Debug)]
pub struct Replayed {
    pub seq: u64,
    pub frame: Bytes,
    pub thread: Option<Arc<str>>,
    /// Set for runs started from an isolated connection: only that connection saw it.
    pub owner: Option<ConnId>,
    /// Tick (ms) when it was routed.
    pub at: u64,
}

/// A run that has started and not yet ended.
#[derive(Debug)]
pub struct Run {
    pub thread: Option<Arc<str>>,
    pub agent_name: Arc<str>,
    pub started_ts: u64,
    pub last_seq: u64,
    pub last_type: Arc<str>,
    /// Tick (ms) of the run's last event (run watchdog).
    pub last_event: u64,
    pub owner: Option<ConnId>,
    pub cancel: Option<Arc<AtomicBool>>,
    /// False until the run's first event arrived (a `user_message` pre-registers it).
    pub begun: bool,
    /// A client asked to cancel it (applied to the cancel flag once it arrives).
    pub cancel_requested: bool,
}

impl Run {
    /// A run not yet begun: registered by a `user_message` (with its thread and, on an
    /// isolated connection, its owner) or by its first event, which then fills in the
    /// rest (`route` in the reactor).
    pub fn pending(thread: Option<Arc<str>>, owner: Option<ConnId>, now: u64) -> Run {
        Run {
            thread,
            agent_name: Arc::from(""),
            started_ts: 0,
            last_seq: 0,
            last_type: Arc::from(""),
            last_event: now,
            owner,
            cancel: None,
            begun: false,
            cancel_requested: false,
        }
    }
}

/// What routing an event within its user decided ([`User::route`]).
#[derive(Debug)]
pub struct Routed {
    /// The event's complete WebSocket frame with that `seq`, shared by every receiver.
    pub frame: Bytes,
    /// The connection that started the run, for runs of an isolated connection.
    pub owner: Option<ConnId>,
}

/// How many ended run ids a user remembers, to refuse late events of ended runs.
const ENDED_RUNS_KEPT: usize = 256;

/// Bytes counted in `replay_memory_bytes` for each known user besides its kept events:
/// the index entry, the slab slot, the name, a connection entry, the ended-run record
/// and the allocator's share. Measured: a flood of 1.87 million user ids of one
/// event each (tools/redteam/memory.py users) held 345,000 users in 324 MiB of RSS
/// over the start, ~940 B per user with its ~400 B event; rounded up.
pub const USER_OVERHEAD_BYTES: usize = 640;

/// Bytes counted for each kept event besides its frame: its [`Replayed`] record and
/// its global FIFO entry.
pub const KEPT_OVERHEAD_BYTES: usize = 128;

/// Stale FIFO entries tolerated beyond the live ones before a compaction.
const FIFO_SLACK: usize = 1024;

/// Most idle users one sweep forgets (the rest the next sweep), so users expiring
/// together cannot stall the loop for long (~300 ns each). Meanwhile the budget still
/// holds (`make_room` forgets as it evicts).
const FORGET_PER_SWEEP: usize = 100_000;

/// The bounds the registry enforces (from the config's settings of the same names).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Events kept per user; 0 disables replay.
    pub replay_events: usize,
    /// Bytes of kept events per user (frame plus [`KEPT_OVERHEAD_BYTES`] each).
    pub replay_bytes_per_user: usize,
    /// Bytes of kept events over all users plus [`USER_OVERHEAD_BYTES`] per user.
    pub replay_memory_bytes: usize,
    /// Runs in progress per user.
    pub max_active_runs_per_user: usize,
    /// Runs in progress over all users.
    pub max_active_runs: usize,
}

impl Default for Limits {
    /// The defaults of PROTOCOL.md sections 5 and 12.
    fn default() -> Limits {
        Limits {
            replay_events: 1_024,
            replay_bytes_per_user: 4_194_304,
            replay_memory_bytes: 268_435_456,
            max_active_runs_per_user: 256,
            max_active_runs: 100_000,
        }
    }
}

/// Why [`Registry::route`] refused an event (it took no `seq` and was not kept).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Its run already ended.
    RunEnded,
    /// It would start a run past `max_active_runs_per_user` or `max_active_runs`.
    TooManyRuns,
}

/// Everything the gateway keeps about one user.
#[derive(Debug, Default)]
pub struct User {
    /// The user id (shared with every session of the user).
    pub name: Arc<str>,
    /// The epoch this user's `seq` counts in (PROTOCOL.md section 3).
    pub epoch: Arc<str>,
    /// Unique per registry and per creation: tells a FIFO entry of a forgotten user
    /// from one of the same slot's next occupant.
    serial: u64,
    pub conns: Vec<ConnEntry>,
    pub seq: u64,
    pub replay: VecDeque<Replayed>,
    /// Bytes of `replay` as counted in the budgets.
    replay_bytes: usize,
    pub runs: HashMap<Arc<str>, Run>,
    /// Tick (ms) of the last event, connection or disconnection: idle expiry.
    last_active: u64,
    /// Allocated at the first ended run: a user who never ran anything (most idle
    /// connections) pays one pointer for it.
    ended: Option<Box<EndedRuns>>,
}

/// The ids of a user's last [`ENDED_RUNS_KEPT`] ended runs: arrival order and a set.
#[derive(Debug, Default)]
struct EndedRuns {
    order: VecDeque<Arc<str>>,
    set: HashSet<Arc<str>>,
}

/// The answer to a resume request (`last_seq` + `epoch`).
#[derive(Debug, PartialEq, Eq)]
pub enum Resume {
    /// The client did not ask.
    NotAsked,
    /// Everything after `last_seq` is still kept: replay it.
    Exact,
    /// Epoch differs or events after `last_seq` are gone: the client must reload.
    Lost,
}

/// What dropping kept events freed: events and counted bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Freed {
    pub events: usize,
    pub bytes: usize,
}

impl Freed {
    fn add(&mut self, other: Freed) {
        self.events += other.events;
        self.bytes += other.bytes;
    }
}

/// The counted size of a kept event.
fn kept_cost(frame: &Bytes) -> usize {
    frame.len() + KEPT_OVERHEAD_BYTES
}

impl User {
    /// Connections that receive an event of `thread` from a run owned by `owner`.
    pub fn targets<'a>(
        &'a self,
        thread: Option<&'a str>,
        owner: Option<ConnId>,
    ) -> impl Iterator<Item = ConnId> + 'a {
        self.conns
            .iter()
            .filter(move |c| c.takes(thread, owner))
            .map(|c| c.id)
    }

    /// Whether `ev` may be routed: not for an ended run, and a run it would start must
    /// fit under the per-user bound and the total (`active_total` runs now).
    fn admit(&self, ev: &Event, limits: &Limits, active_total: usize) -> Result<(), Refused> {
        if self.run_ended(&ev.key.run_id) {
            return Err(Refused::RunEnded);
        }
        if !ev.kind.ends_run()
            && (self.runs.len() >= limits.max_active_runs_per_user
                || active_total >= limits.max_active_runs)
            && !self.runs.contains_key(&ev.key.run_id)
        {
            return Err(Refused::TooManyRuns);
        }
        Ok(())
    }

    /// Route an admitted `ev` within this user at tick `now`: the event takes the next
    /// `seq` and its frame is built; its run begins (a `user_message` only
    /// pre-registers it) or is updated (last seq, type, time, the worker's cancel flag,
    /// set at once if a cancel already arrived) and ends when `ev` ends it. Returns the
    /// routing and the change in this user's run count (+1, 0 or -1).
    fn route_admitted(&mut self, ev: &Event, now: u64) -> (Routed, isize) {
        self.seq += 1;
        self.last_active = now;
        let seq = self.seq;
        let frame = ev.frame(seq);
        let before = self.runs.len();
        let run = self
            .runs
            .entry(ev.key.run_id.clone())
            .or_insert_with(|| Run::pending(ev.key.thread_id.clone(), None, now));
        if !run.begun {
            run.begun = true;
            run.started_ts = ev.ts_ms;
            run.agent_name = ev.key.agent_name.clone();
            run.thread = ev.key.thread_id.clone();
        }
        if let Some(flag) = &ev.cancel_flag {
            if run.cancel_requested {
                flag.store(true, Ordering::Release);
            }
            run.cancel = Some(flag.clone());
        }
        run.last_seq = seq;
        run.last_event = now;
        if &*run.last_type != ev.kind.as_str() {
            run.last_type = Arc::from(ev.kind.as_str());
        }
        let owner = run.owner;
        if ev.kind.ends_run() {
            self.end_run(&ev.key.run_id);
            if self.runs.is_empty() && self.runs.capacity() > 0 {
                // Give the table back: most users run one thing at a time.
                self.runs = HashMap::new();
            }
        }
        let delta = self.runs.len() as isize - before as isize;
        (Routed { frame, owner }, delta)
    }

    /// Decide a resume against this user's epoch: `Exact` when every event after
    /// `last_seq` is in the buffer.
    pub fn resume(&self, asked: Option<(u64, &str)>) -> Resume {
        let Some((last_seq, their_epoch)) = asked else {
            return Resume::NotAsked;
        };
        if their_epoch != &*self.epoch || last_seq > self.seq {
            return Resume::Lost;
        }
        if last_seq == self.seq {
            return Resume::Exact;
        }
        match self.replay.front() {
            Some(first) if first.seq <= last_seq + 1 => Resume::Exact,
            _ => Resume::Lost,
        }
    }

    /// Kept events after `last_seq` that connection `entry` may see, oldest first.
    pub fn replay_after<'a>(
        &'a self,
        last_seq: u64,
        entry: &'a ConnEntry,
    ) -> impl Iterator<Item = &'a Replayed> + 'a {
        self.replay
            .iter()
            .filter(move |r| r.seq > last_seq && entry.takes(r.thread.as_deref(), r.owner))
    }

    /// Bytes of kept events, as counted in the budgets.
    pub fn replay_bytes(&self) -> usize {
        self.replay_bytes
    }

    /// Keep an event for resume within the per-user bounds (count and bytes, the
    /// oldest go first). An event larger than the per-user byte bound is not kept and
    /// the older ones are dropped too, so a resume from before it is refused rather
    /// than silently missing it. Returns whether it was kept and what was dropped.
    fn keep(&mut self, item: Replayed, limits: &Limits) -> (bool, Freed) {
        let cost = kept_cost(&item.frame);
        let mut freed = Freed::default();
        if limits.replay_events == 0 || cost > limits.replay_bytes_per_user {
            if limits.replay_events > 0 {
                freed.add(self.drop_oldest(usize::MAX));
            }
            return (false, freed);
        }
        while self.replay.len() >= limits.replay_events
            || self.replay_bytes + cost > limits.replay_bytes_per_user
        {
            let Some(gone) = self.pop_oldest() else {
                break;
            };
            freed.events += 1;
            freed.bytes += gone;
        }
        self.replay_bytes += cost;
        if self.replay.capacity() == 0 {
            // A first event: room for one, not the default four.
            self.replay.reserve_exact(1);
        }
        self.replay.push_back(item);
        (true, freed)
    }

    /// Drop the oldest kept event; its counted bytes.
    fn pop_oldest(&mut self) -> Option<usize> {
        let old = self.replay.pop_front()?;
        let cost = kept_cost(&old.frame);
        self.replay_bytes = self.replay_bytes.saturating_sub(cost);
        Some(cost)
    }

    /// Drop up to `n` oldest kept events; give the memory back when empty.
    fn drop_oldest(&mut self, n: usize) -> Freed {
        let mut freed = Freed::default();
        while freed.events < n {
            let Some(cost) = self.pop_oldest() else {
                break;
            };
            freed.events += 1;
            freed.bytes += cost;
        }
        if self.replay.is_empty() && self.replay.capacity() > 0 {
            self.replay = VecDeque::new();
        }
        freed
    }

    /// Drop kept events routed before tick `cutoff`; give the memory back when empty.
    fn expire_replay(&mut self, cutoff: u64) -> Freed {
        let n = self.replay.iter().take_while(|r| r.at < cutoff).count();
        self.drop_oldest(n)
    }

    pub fn run_ended(&self, run_id: &str) -> bool {
        self.ended.as_ref().is_some_and(|e| e.set.contains(run_id))
    }

    /// Record that a run ended (and forget the oldest ended run past the bound).
    pub fn end_run(&mut self, run_id: &Arc<str>) -> Option<Run> {
        let run = self.runs.remove(run_id);
        let ended = self.ended.get_or_insert_with(Box::default);
        if ended.set.insert(run_id.clone()) {
            ended.order.push_back(run_id.clone());
            if ended.order.len() > ENDED_RUNS_KEPT {
                if let Some(old) = ended.order.pop_front() {
                    ended.set.remove(&old);
                }
            }
        }
        run
    }

    /// True when nothing but the sequence counter is worth keeping.
    pub fn idle(&self) -> bool {
        self.conns.is_empty() && self.replay.is_empty() && self.runs.is_empty()
    }

    pub fn remove_conn(&mut self, id: ConnId) -> bool {
        let before = self.conns.len();
        self.conns.retain(|c| c.id != id);
        before != self.conns.len()
    }
}

/// A slot's user serial and oldest kept seq ([`Registry`]'s `fronts`).
#[derive(Clone, Copy, Debug)]
struct Front {
    serial: u64,
    seq: u64,
}

impl Front {
    const EMPTY: Front = Front {
        serial: 0,
        seq: u64::MAX,
    };

    fn of(u: &User) -> Front {
        Front {
            serial: u.serial,
            seq: u.replay.front().map_or(u64::MAX, |r| r.seq),
        }
    }
}

/// One kept event in the global FIFO: the user's slot and serial, and its `seq`.
#[derive(Clone, Copy, Debug)]
struct Kept {
    slot: usize,
    serial: u64,
    seq: u64,
}

/// Counters the registry keeps for the stats.
#[derive(Clone, Copy, Debug, Default)]
pub struct RegistryCounters {
    /// Kept events dropped to stay within `replay_memory_bytes`.
    pub replay_evicted: u64,
    /// Users whose state was forgotten (idle expiry or budget).
    pub users_forgotten: u64,
    /// Runs refused past `max_active_runs_per_user` or `max_active_runs`.
    pub runs_refused: u64,
}

/// All users, the global FIFO of kept events and the budgets' use.
#[derive(Debug)]
pub struct Registry {
    /// User id -> slot in `slots`. The users themselves live in a slab, so a FIFO
    /// entry reaches its user without hashing the id.
    index: HashMap<Arc<str>, usize>,
    slots: Slab<User>,
    /// Per slot: the user's serial and its oldest kept seq (`u64::MAX` when none), so
    /// whether a FIFO entry is live is read from this dense array, not from the user
    /// (a cache miss per entry when the FIFO is compacted or trimmed).
    fronts: Vec<Front>,
    online: usize,
    limits: Limits,
    /// The gateway's epoch (PROTOCOL.md section 3).
    process_epoch: Arc<str>,
    /// Users forgotten so far; the epoch of users created from now on.
    generation: u64,
    /// The epoch string of `generation_epoch_of` (built once per generation in use).
    generation_epoch: Arc<str>,
    generation_epoch_of: u64,
    next_serial: u64,
    /// Kept events of every user in routing order (with stale entries, see the
    /// module doc).
    fifo: VecDeque<Kept>,
    /// Kept events and their counted bytes over all users.
    kept_events: usize,
    kept_bytes: usize,
    /// Runs in progress over all users: exact after each sweep; between sweeps the
    /// runs a `user_message` pre-registers are added at the next sweep.
    active_runs: usize,
    /// Users count at which the last idle-user scan came out short: no new scan
    /// before the registry grew by a tenth since (keeps scans amortized).
    scan_blocked_below: usize,
    pub counters: RegistryCounters,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry::new(Arc::from(""), Limits::default())
    }
}

impl Registry {
    /// An empty registry for a gateway of epoch `process_epoch`.
    pub fn new(process_epoch: Arc<str>, limits: Limits) -> Registry {
        Registry {
            index: HashMap::new(),
            slots: Slab::new(),
            fronts: Vec::new(),
            online: 0,
            limits,
            generation_epoch: process_epoch.clone(),
            process_epoch,
            generation: 0,
            generation_epoch_of: 0,
            next_serial: 0,
            fifo: VecDeque::new(),
            kept_events: 0,
            kept_bytes: 0,
            active_runs: 0,
            scan_blocked_below: 0,
            counters: RegistryCounters::default(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn get(&self, user: &str) -> Option<&User> {
        self.index.get(user).and_then(|&k| self.slots.get(k))
    }

    pub fn get_mut(&mut self, user: &str) -> Option<&mut User> {
        let k = *self.index.get(user)?;
        self.slots.get_mut(k)
    }

    /// The epoch of a user created now: the process epoch until the first user is
    /// forgotten, then `<process epoch>-<users forgotten so far>`. A user forgotten
    /// and seen again is created at a higher count than the one it had (forgetting it
    /// raised the count), so its new epoch differs from every epoch it had before.
    pub fn epoch_for_new_user(&mut self) -> Arc<str> {
        if self.generation_epoch_of != self.generation {
            self.generation_epoch_of = self.generation;
            self.generation_epoch =
                Arc::from(format!("{}-{}", self.process_epoch, self.generation));
        }
        self.generation_epoch.clone()
    }

    /// The user's entry, created (with a fresh epoch and seq 0) when missing.
    pub fn entry(&mut self, user: &str) -> &mut User {
        let slot = match self.index.get(user) {
            Some(&k) => k,
            None => self.create(user),
        };
        // `index` and `slots` change together (`create`, `forget`): the slot is
        // occupied. (A conditional `return` of `get_mut` does not borrow-check.)
        &mut self.slots[slot]
    }

    fn create(&mut self, user: &str) -> usize {
        let name: Arc<str> = Arc::from(user);
        let epoch = self.epoch_for_new_user();
        self.next_serial += 1;
        let serial = self.next_serial;
        let slot = self.slots.insert(User {
            name: name.clone(),
            epoch,
            serial,
            ..User::default()
        });
        self.index.insert(name, slot);
        self.set_front(
            slot,
            Front {
                serial,
                seq: u64::MAX,
            },
        );
        slot
    }

    /// The user's current sequence number (0 when unknown).
    pub fn seq(&self, user: &str) -> u64 {
        self.get(user).map_or(0, |u| u.seq)
    }

    pub fn add_conn(&mut self, user: &str, entry: ConnEntry) {
        let u = self.entry(user);
        let was_offline = u.conns.is_empty();
        if u.conns.capacity() == 0 {
            // Most users have one tab: room for exactly one connection (a Vec's
            // first growth makes room for four).
            u.conns.reserve_exact(1);
        }
        u.conns.push(entry);
        if was_offline {
            self.online += 1;
        }
    }

    /// Remove a connection at tick `now` (the user's idle time starts); returns true
    /// if it was registered. A user left idle that never had an event (seq 0) is
    /// forgotten at once: it has nothing to resume, so its epoch can stay.
    pub fn remove_conn(&mut self, user: &str, id: ConnId, now: u64) -> bool {
        let Some(&slot) = self.index.get(user) else {
            return false;
        };
        let Some(u) = self.slots.get_mut(slot) else {
            return false;
        };
        let removed = u.remove_conn(id);
        u.last_active = u.last_active.max(now);
        let blank = u.idle() && u.seq == 0;
        if removed && u.conns.is_empty() {
            self.online -= 1;
        }
        if blank {
            self.forget(slot);
        }
        removed
    }

    /// Users with at least one open connection.
    pub fn online(&self) -> usize {
        self.online
    }

    /// Known users (online or not).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Runs in progress over all users (see the field's note on pre-registered runs).
    pub fn active_runs(&self) -> usize {
        self.active_runs
    }

    /// Bytes counted against `replay_memory_bytes`: kept events and users.
    pub fn memory_used(&self) -> usize {
        self.kept_bytes + self.index.len() * USER_OVERHEAD_BYTES
    }

    /// Kept events over all users, and their counted bytes.
    pub fn kept(&self) -> (usize, usize) {
        (self.kept_events, self.kept_bytes)
    }

    /// Entries in the global FIFO (live and stale).
    pub fn fifo_len(&self) -> usize {
        self.fifo.len()
    }

    /// Whether a batch of runs may start: `new_for_user` more runs for a user that has
    /// `user_runs` now, `new_total` more in all.
    pub fn runs_fit(&self, user_runs: usize, new_for_user: usize, new_total: usize) -> bool {
        user_runs + new_for_user <= self.limits.max_active_runs_per_user
            && self.active_runs + new_total <= self.limits.max_active_runs
    }

    /// Route `ev` at tick `now`: refused when its run ended or it would start a run
    /// past the bounds. Otherwise it takes its user's next `seq`, is kept for replay
    /// within every bound (evicting the oldest kept events of any user, or idle
    /// users, when the budget needs room), and the user is returned for its targets.
    pub fn route(&mut self, ev: &Event, now: u64) -> Result<(Routed, &User), Refused> {
        // Make room first (rare: only near the budget), so the user found below stays
        // borrowed for the caller. Counts a new user's overhead even if it exists.
        // The frame is the JSON body, the seq digits and a frame header (<= 30 B).
        let need = ev.json_len() + 30 + KEPT_OVERHEAD_BYTES + USER_OVERHEAD_BYTES;
        if self.memory_used() + need > self.limits.replay_memory_bytes {
            self.make_room(need, None);
        }
        let limits = self.limits;
        let slot = match self.index.get(&*ev.key.user_id) {
            Some(&k) => k,
            None => self.create(&ev.key.user_id),
        };
        let active_total = self.active_runs;
        let Some(user) = self.slots.get_mut(slot) else {
            return Err(Refused::RunEnded);
        };
        if let Err(refused) = user.admit(ev, &limits, active_total) {
            if refused == Refused::TooManyRuns {
                self.counters.runs_refused += 1;
            }
            return Err(refused);
        }
        let (routed, delta) = user.route_admitted(ev, now);
        self.active_runs = self.active_runs.saturating_add_signed(delta);
        let seq = user.seq;
        let serial = user.serial;
        let (kept, freed) = user.keep(
            Replayed {
                seq,
                frame: routed.frame.clone(),
                thread: ev.key.thread_id.clone(),
                owner: routed.owner,
                at: now,
            },
            &limits,
        );
        let front = Front::of(user);
        self.set_front(slot, front);
        self.account(freed, kept.then(|| kept_cost(&routed.frame)));
        if kept {
            self.fifo.push_back(Kept { slot, serial, seq });
            self.compact_if_stale();
        }
        let user = self.slots.get(slot).ok_or(Refused::RunEnded)?;
        Ok((routed, user))
    }

    /// Keep `item` for `user` as routing does (bounds, FIFO, budget); for benchmarks
    /// and tests that fill buffers without routing.
    pub fn keep(&mut self, user: &str, item: Replayed) {
        let limits = self.limits;
        let cost = kept_cost(&item.frame);
        if self.memory_used() + cost > limits.replay_memory_bytes {
            self.make_room(cost, None);
        }
        let slot = match self.index.get(user) {
            Some(&k) => k,
            None => self.create(user),
        };
        let Some(u) = self.slots.get_mut(slot) else {
            return;
        };
        let seq = item.seq;
        let serial = u.serial;
        let (kept, freed) = u.keep(item, &limits);
        let front = Front::of(u);
        self.set_front(slot, front);
        self.account(freed, kept.then_some(cost));
        if kept {
            self.fifo.push_back(Kept { slot, serial, seq });
            self.compact_if_stale();
        }
    }

    /// Book a keep: `freed` dropped by the user itself, `added` bytes kept.
    fn account(&mut self, freed: Freed, added: Option<usize>) {
        self.kept_events = self.kept_events.saturating_sub(freed.events);
        self.kept_bytes = self.kept_bytes.saturating_sub(freed.bytes);
        if let Some(cost) = added {
            self.kept_events += 1;
            self.kept_bytes += cost;
        }
    }

    fn set_front(&mut self, slot: usize, front: Front) {
        if self.fronts.len() <= slot {
            self.fronts.resize(slot + 1, Front::EMPTY);
        }
        if let Some(f) = self.fronts.get_mut(slot) {
            *f = front;
        }
    }

    /// Whether FIFO entry `k` still names a kept event: its user is still in the slot
    /// and has not dropped it (users only ever drop their oldest kept events).
    fn live(&self, k: &Kept) -> bool {
        self.fronts
            .get(k.slot)
            .is_some_and(|f| f.serial == k.serial && f.seq <= k.seq)
    }

    /// Drop the FIFO's entries of events their users already dropped, once they
    /// outnumber the live ones (amortized O(1) per keep).
    fn compact_if_stale(&mut self) {
        if self.fifo.len() <= 2 * self.kept_events + FIFO_SLACK {
            return;
        }
        let mut fifo = std::mem::take(&mut self.fifo);
        fifo.retain(|k| self.live(k));
        if fifo.capacity() > 4 * fifo.len() + FIFO_SLACK {
            fifo.shrink_to_fit();
        }
        self.fifo = fifo;
    }

    /// Free `need` bytes under the budget: the oldest kept events of any user first
    /// (a user left idle by it is forgotten, except `protect`), then idle users.
    fn make_room(&mut self, need: usize, protect: Option<usize>) {
        let limit = self.limits.replay_memory_bytes;
        while self.memory_used() + need > limit {
            let Some(k) = self.fifo.pop_front() else {
                break;
            };
            if !self.live(&k) {
                continue;
            }
            let Some(u) = self.slots.get_mut(k.slot) else {
                continue;
            };
            let freed = u.drop_oldest(1);
            let idle = u.idle();
            let front = Front::of(u);
            self.set_front(k.slot, front);
            self.account(freed, None);
            self.counters.replay_evicted += freed.events as u64;
            if idle && protect != Some(k.slot) {
                self.forget(k.slot);
            }
        }
        if self.memory_used() + need > limit && self.index.len() >= self.scan_blocked_below {
            // No kept event left to evict: forget idle users down to 90 % of the
            // budget, so the next scan is a tenth of the budget away.
            let target = (limit / 10 * 9).saturating_sub(need);
            let idle: Vec<usize> = self
                .slots
                .iter()
                .filter(|(k, u)| u.idle() && protect != Some(*k))
                .map(|(k, _)| k)
                .collect();
            for k in idle {
                if self.memory_used() <= target {
                    break;
                }
                self.forget(k);
            }
            if self.memory_used() + need > limit {
                self.scan_blocked_below = self.index.len() + self.index.len() / 10 + 64;
            }
        }
    }

    /// Forget the user in `slot` (its kept events, if any, with it). Users created
    /// from now on get a new epoch, unless this one never had an event (seq 0: a
    /// new incarnation's seqs cannot collide with any a client saw).
    fn forget(&mut self, slot: usize) {
        let Some(mut u) = self.slots.try_remove(slot) else {
            return;
        };
        self.set_front(slot, Front::EMPTY);
        if u.seq > 0 {
            self.generation += 1;
        }
        let freed = u.drop_oldest(usize::MAX);
        self.account(freed, None);
        self.active_runs = self.active_runs.saturating_sub(u.runs.len());
        if !u.conns.is_empty() {
            self.online -= 1;
        }
        self.index.remove(&*u.name);
        self.counters.users_forgotten += 1;
    }

    /// Housekeeping at tick `now`: drop every user's kept events older than
    /// `replay_ttl_ms` (online or not, PROTOCOL.md section 5), forget users idle for
    /// `replay_ttl_ms`, recount the runs in progress and trim the FIFO.
    pub fn sweep(&mut self, now: u64, replay_ttl_ms: u64) {
        let cutoff = now.saturating_sub(replay_ttl_ms);
        let mut idle = Vec::new();
        let mut freed = Freed::default();
        let mut runs = 0;
        for (k, u) in self.slots.iter_mut() {
            let gone = u.expire_replay(cutoff);
            if gone.events > 0 {
                if let Some(f) = self.fronts.get_mut(k) {
                    *f = Front::of(u);
                }
            }
            freed.add(gone);
            runs += u.runs.len();
            if idle.len() < FORGET_PER_SWEEP
                && u.idle()
                && u.last_active.saturating_add(replay_ttl_ms) <= now
            {
                idle.push(k);
            }
        }
        self.account(freed, None);
        self.active_runs = runs;
        for k in idle {
            self.forget(k);
        }
        while self.fifo.front().is_some_and(|k| !self.live(k)) {
            self.fifo.pop_front();
        }
        self.compact_if_stale();
        self.scan_blocked_below = self.scan_blocked_below.min(self.index.len());
    }

    /// Runs with no event since tick `cutoff`, at most `max` of them (the watchdog
    /// ends these; the rest wait for the next sweep).
    pub fn stale_runs(&self, cutoff: u64, max: usize) -> Vec<RunKey> {
        let mut stale = Vec::new();
        for (_, user) in self.slots.iter() {
            for (run_id, run) in user.runs.iter() {
                if stale.len() >= max {
                    return stale;
                }
                if run.last_event < cutoff {
                    stale.push(RunKey {
                        user_id: user.name.clone(),
                        thread_id: run.thread.clone(),
                        run_id: run_id.clone(),
                        agent_name: run.agent_name.clone(),
                    });
                }
            }
        }
        stale
    }

    pub fn users(&self) -> impl Iterator<Item = (&Arc<str>, &User)> {
        self.slots.iter().map(|(_, u)| (&u.name, u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

    fn id(key: usize, serial: u64) -> ConnId {
        ConnId { key, serial }
    }

    fn entry(key: usize, serial: u64, thread: Option<&str>, isolated: bool) -> ConnEntry {
        ConnEntry {
            id: id(key, serial),
            thread: thread.map(Arc::from),
            isolated,
        }
    }

    fn replayed(seq: u64, thread: Option<&str>, owner: Option<ConnId>, at: u64) -> Replayed {
        Replayed {
            seq,
            frame: Bytes::new(),
            thread: thread.map(Arc::from),
            owner,
            at,
        }
    }

    fn event(user: &str, run: &str, kind: EventKind, data_bytes: usize) -> Event {
        let key = RunKey::new(user, None, run, "agent").unwrap();
        Event::new(key, kind, &serde_json::json!({"x": "y".repeat(data_bytes)})).unwrap()
    }

    fn limits(events: usize, per_user: usize, total: usize) -> Limits {
        Limits {
            replay_events: events,
            replay_bytes_per_user: per_user,
            replay_memory_bytes: total,
            ..Limits::default()
        }
    }

    #[test]
    fn targets_follow_thread_filter_and_isolation() {
        let mut r = Registry::default();
        r.add_conn("u", entry(1, 1, None, false));
        r.add_conn("u", entry(2, 2, Some("t1"), false));
        r.add_conn("u", entry(3, 3, None, true));
        let u = r.get("u").unwrap();
        let t = |thread, owner| u.targets(thread, owner).map(|c| c.key).collect::<Vec<_>>();
        assert_eq!(t(None, None), vec![1, 2]);
        assert_eq!(t(Some("t1"), None), vec![1, 2]);
        assert_eq!(t(Some("t2"), None), vec![1]);
        assert_eq!(t(None, Some(id(3, 3))), vec![3]);
        // A stale owner id (slot reused by serial 9) reaches nobody.
        assert_eq!(t(None, Some(id(3, 9))), Vec::<usize>::new());
        assert_eq!(r.online(), 1);
        assert!(r.get("other").is_none());
    }

    #[test]
    fn idle_users_are_forgotten_after_the_ttl_and_come_back_in_a_new_epoch() {
        let mut r = Registry::new("p".into(), Limits::default());
        r.add_conn("u", entry(1, 1, None, false));
        r.add_conn("u", entry(2, 2, None, false));
        r.entry("u").seq = 7;
        assert_eq!(r.get("u").unwrap().epoch.as_ref(), "p");
        assert!(r.remove_conn("u", id(1, 1), 100));
        assert!(!r.remove_conn("u", id(1, 1), 100));
        assert_eq!(r.online(), 1);
        assert!(r.remove_conn("u", id(2, 2), 100));
        assert_eq!(r.online(), 0);
        // Idle, but not for the TTL yet: kept with its seq and epoch.
        r.sweep(1_000, 1_000);
        assert_eq!(r.seq("u"), 7);
        r.sweep(1_100, 1_000);
        assert!(r.get("u").is_none(), "idle for replay_ttl_ms: forgotten");
        assert_eq!(r.counters.users_forgotten, 1);
        let u = r.entry("u");
        assert_eq!(u.seq, 0, "a forgotten user starts over...");
        assert_eq!(u.epoch.as_ref(), "p-1", "...in a new epoch");
        let old = u.resume(Some((7, "p")));
        assert_eq!(old, Resume::Lost, "a resume in the old epoch is refused");
        // Users created before any forgetting share the process epoch; each
        // generation's users share one epoch string.
        assert_eq!(r.entry("v").epoch.as_ref(), "p-1");
    }

    #[test]
    fn online_users_and_users_with_runs_are_not_forgotten() {
        let mut r = Registry::new("p".into(), Limits::default());
        r.add_conn("online", entry(1, 1, None, false));
        let ev = event("worker", "r1", EventKind::AgentStarted, 1);
        r.route(&ev, 0).unwrap();
        r.sweep(10_000, 1_000);
        assert!(r.get("online").is_some());
        let w = r.get("worker").unwrap();
        assert!(w.replay.is_empty(), "kept events expire for everyone");
        assert_eq!(w.runs.len(), 1, "a user with a run in progress is kept");
        assert_eq!(r.active_runs(), 1);
    }

    #[test]
    fn resume_is_exact_only_when_nothing_is_missing() {
        let mut u = User {
            epoch: "e".into(),
            ..User::default()
        };
        let lim = limits(4, usize::MAX, usize::MAX);
        assert_eq!(u.resume(None), Resume::NotAsked);
        assert_eq!(u.resume(Some((0, "e"))), Resume::Exact);
        assert_eq!(u.resume(Some((0, "x"))), Resume::Lost);
        for seq in 1..=10 {
            u.seq = seq;
            u.keep(replayed(seq, None, None, seq), &lim);
        }
        // Kept: 7..=10.
        assert_eq!(u.resume(Some((10, "e"))), Resume::Exact);
        assert_eq!(u.resume(Some((6, "e"))), Resume::Exact);
        assert_eq!(u.resume(Some((5, "e"))), Resume::Lost);
        assert_eq!(u.resume(Some((11, "e"))), Resume::Lost);
        let all = entry(1, 1, None, false);
        let seqs: Vec<u64> = u.replay_after(8, &all).map(|r| r.seq).collect();
        assert_eq!(seqs, vec![9, 10]);
        u.expire_replay(9);
        assert_eq!(u.replay.front().map(|r| r.seq), Some(9));
        assert_eq!(u.resume(Some((7, "e"))), Resume::Lost);
    }

    #[test]
    fn replay_respects_filters() {
        let mut u = User::default();
        let lim = limits(10, usize::MAX, usize::MAX);
        u.keep(replayed(1, Some("t1"), None, 0), &lim);
        u.keep(replayed(2, Some("t2"), None, 0), &lim);
        u.keep(replayed(3, None, None, 0), &lim);
        u.keep(replayed(4, None, Some(id(5, 5)), 0), &lim);
        let t1 = entry(1, 1, Some("t1"), false);
        let seqs: Vec<u64> = u.replay_after(0, &t1).map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 3]);
        let iso = entry(5, 5, None, true);
        let seqs: Vec<u64> = u.replay_after(0, &iso).map(|r| r.seq).collect();
        assert_eq!(seqs, vec![4]);
    }

    #[test]
    fn ended_runs_are_remembered_within_a_bound() {
        let mut u = User::default();
        for i in 0..(ENDED_RUNS_KEPT + 10) {
            u.end_run(&Arc::from(format!("r{i}").as_str()));
        }
        assert!(!u.run_ended("r0"));
        assert!(u.run_ended(&format!("r{}", ENDED_RUNS_KEPT + 9)));
        let ended = u.ended.as_ref().expect("allocated at the first end");
        assert_eq!(ended.order.len(), ENDED_RUNS_KEPT);
        assert_eq!(ended.set.len(), ENDED_RUNS_KEPT);
    }

    #[test]
    fn replay_bytes_per_user_bound_the_buffer() {
        let mut r = Registry::new("p".into(), limits(1_024, 20_000, usize::MAX));
        for i in 0..100 {
            r.route(&event("u", "r", EventKind::AgentThinking, 1_000), i)
                .unwrap();
        }
        let u = r.get("u").unwrap();
        assert!(u.replay_bytes() <= 20_000, "{}", u.replay_bytes());
        assert!(u.replay.len() >= 10, "{} kept", u.replay.len());
        assert_eq!(r.kept(), (u.replay.len(), u.replay_bytes()));
        // An event over the per-user bound is not kept, and the older ones go too:
        // a resume from before it must not miss it.
        r.route(&event("u", "r", EventKind::AgentThinking, 30_000), 200)
            .unwrap();
        let u = r.get("u").unwrap();
        assert!(u.replay.is_empty());
        assert_eq!(u.resume(Some((50, "p"))), Resume::Lost);
        assert_eq!(r.kept(), (0, 0));
    }

    #[test]
    fn the_global_budget_evicts_the_oldest_events_of_any_user() {
        let budget = 200_000;
        let mut r = Registry::new("p".into(), limits(1_024, 1_000_000, budget));
        for i in 0..300u64 {
            let user = if i % 3 == 0 { "a" } else { "b" };
            r.route(&event(user, "r", EventKind::AgentThinking, 1_000), i)
                .unwrap();
            assert!(r.memory_used() <= budget, "{} > {budget}", r.memory_used());
        }
        assert!(r.counters.replay_evicted > 0);
        // Oldest first across users: what is left is the newest events of both.
        let a = r.get("a").unwrap().replay.front().unwrap().at;
        let b = r.get("b").unwrap().replay.front().unwrap().at;
        assert!(a.abs_diff(b) <= 3, "a from {a}, b from {b}");
        assert!(a > 100 && b > 100);
    }

    #[test]
    fn a_flood_of_user_ids_stays_within_the_budget() {
        let budget = 1 << 20;
        let mut r = Registry::new("p".into(), limits(1_024, 100_000, budget));
        for i in 0..20_000u64 {
            let user = format!("user-{i}");
            r.route(&event(&user, "r", EventKind::AgentCompleted, 10), i)
                .unwrap();
            assert!(r.memory_used() <= budget, "{} > {budget}", r.memory_used());
        }
        assert!(r.len() < 20_000 && r.len() > 100, "{} users known", r.len());
        assert!(r.fifo_len() <= 2 * r.kept().0 + FIFO_SLACK + 1);
        // Replay disabled: users are idle without kept events and still bounded.
        let mut r = Registry::new("p".into(), limits(0, 100_000, budget));
        for i in 0..20_000u64 {
            let user = format!("user-{i}");
            r.route(&event(&user, "r", EventKind::AgentCompleted, 10), i)
                .unwrap();
            assert!(r.memory_used() <= budget);
        }
        assert!(r.len() * USER_OVERHEAD_BYTES <= budget);
    }

    #[test]
    fn the_fifo_stays_bounded_when_users_evict_by_themselves() {
        let mut r = Registry::new("p".into(), limits(4, usize::MAX, usize::MAX));
        for i in 0..50_000u64 {
            r.route(&event("u", "r", EventKind::AgentThinking, 1), i)
                .unwrap();
        }
        assert_eq!(r.kept().0, 4);
        assert!(r.fifo_len() <= 2 * 4 + FIFO_SLACK + 1, "{}", r.fifo_len());
    }

    #[test]
    fn runs_are_capped_per_user_and_in_total() {
        let mut r = Registry::new(
            "p".into(),
            Limits {
                max_active_runs_per_user: 3,
                max_active_runs: 5,
                ..Limits::default()
            },
        );
        for i in 0..3 {
            r.route(&event("a", &format!("r{i}"), EventKind::AgentStarted, 1), 0)
                .unwrap();
        }
        let refused = r.route(&event("a", "r3", EventKind::AgentStarted, 1), 0);
        assert_eq!(refused.err(), Some(Refused::TooManyRuns));
        // Events of runs in progress and run-ending events still pass.
        r.route(&event("a", "r0", EventKind::AgentThinking, 1), 0)
            .unwrap();
        r.route(&event("a", "x", EventKind::AgentCompleted, 1), 0)
            .unwrap();
        assert_eq!(r.get("a").unwrap().seq, 5, "the refused event took no seq");
        for i in 0..2 {
            r.route(&event("b", &format!("r{i}"), EventKind::AgentStarted, 1), 0)
                .unwrap();
        }
        let refused = r.route(&event("c", "r0", EventKind::AgentStarted, 1), 0);
        assert_eq!(refused.err(), Some(Refused::TooManyRuns), "total reached");
        assert_eq!(r.active_runs(), 5);
        assert_eq!(r.counters.runs_refused, 2);
        // Ending one frees a place.
        r.route(&event("a", "r0", EventKind::AgentCompleted, 1), 0)
            .unwrap();
        assert_eq!(r.active_runs(), 4);
        r.route(&event("c", "r0", EventKind::AgentStarted, 1), 0)
            .unwrap();
        assert!(r.runs_fit(0, 0, 0));
        assert!(!r.runs_fit(0, 1, 1));
    }

    #[test]
    fn the_watchdog_list_is_bounded() {
        let mut r = Registry::default();
        for i in 0..50 {
            r.route(&event("a", &format!("r{i}"), EventKind::AgentStarted, 1), 0)
                .unwrap();
        }
        assert_eq!(r.stale_runs(1, 20).len(), 20);
        assert_eq!(r.stale_runs(0, 20).len(), 0);
    }
}

impl User {
    /// The runs a new connection's `connected` frame lists (`active_runs`): begun, not
    /// owned by an isolated connection, and on `thread` when the connection follows one
    /// (a run with no thread, or a connection with none, matches). At most `max`, the
    /// most recently started (started in the same millisecond: by their last event),
    /// listed oldest first; true when more were left out.
    pub fn active_runs(&self, thread: Option<&str>, max: usize) -> (Vec<(&Arc<str>, &Run)>, bool) {
        let mut runs: Vec<(&Arc<str>, &Run)> = self
            .runs
            .iter()
            .filter(|(_, r)| r.begun && r.owner.is_none())
            .filter(|(_, r)| match (thread, &r.thread) {
                (Some(want), Some(got)) => want == &**got,
                _ => true,
            })
            .collect();
        runs.sort_by_key(|(_, r)| std::cmp::Reverse((r.started_ts, r.last_seq)));
        let truncated = runs.len() > max;
        runs.truncate(max);
        runs.reverse();
        (runs, truncated)
    }
}

#[cfg(test)]
mod active_runs_tests {
    use super::*;

    fn begun(thread: Option<&str>, started_ts: u64, last_seq: u64) -> Run {
        let mut run = Run::pending(thread.map(Arc::from), None, 0);
        run.begun = true;
        run.started_ts = started_ts;
        run.last_seq = last_seq;
        run
    }

    #[test]
    fn lists_the_latest_begun_shared_runs_of_the_thread_oldest_first() {
        let mut r = Registry::new("p".into(), Limits::default());
        let u = r.entry("u");
        u.runs.insert("a".into(), begun(Some("t1"), 10, 1));
        u.runs.insert("b".into(), begun(None, 20, 2));
        u.runs.insert("c".into(), begun(Some("t2"), 30, 3));
        u.runs.insert("d".into(), begun(Some("t1"), 30, 4));
        u.runs.insert("pending".into(), Run::pending(None, None, 0));
        let mut owned = begun(None, 40, 5);
        owned.owner = Some(ConnId { key: 1, serial: 1 });
        u.runs.insert("owned".into(), owned);
        let names = |(runs, truncated): (Vec<(&Arc<str>, &Run)>, bool)| {
            (
                runs.iter()
                    .map(|(id, _)| id.to_string())
                    .collect::<Vec<_>>(),
                truncated,
            )
        };
        let u = r.get("u").unwrap();
        assert_eq!(
            names(u.active_runs(None, 10)),
            (vec!["a".into(), "b".into(), "c".into(), "d".into()], false)
        );
        assert_eq!(
            names(u.active_runs(Some("t1"), 10)),
            (vec!["a".into(), "b".into(), "d".into()], false)
        );
        // The most recent two; the same start: the later last event wins.
        assert_eq!(
            names(u.active_runs(None, 2)),
            (vec!["c".into(), "d".into()], true)
        );
    }
}
