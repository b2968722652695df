//! The memory engine: per-user routing state. Which connections a user has open
//! (oldest first), the user's epoch, sequence counter, kept events (replay) and runs.
//! Kept symmetric with the reactor's slab: every open session has exactly one entry
//! here, removed by the one close path.
//!
//! Pure data and decisions (no I/O), so routing rules are unit-tested here: which
//! connections receive an event ([`User::targets`]), what a resuming client gets
//! ([`User::resume`]), which runs may start ([`Registry::route`]), and when a user's
//! state is forgotten.
//!
//! # What it owns
//!
//! A [`Registry`] holds every known [`User`] in a slab, found by id through the user
//! index (`user id -> slot`), so the global FIFO of kept events reaches a user without
//! hashing its id. [`Registry::route`] is the event path: the user's lookup (created
//! when missing), the run checks, the next `seq` and the frame, the run's bookkeeping,
//! the keep for replay within every bound.
//!
//! # The memory budget
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
//!   budget needs room.
//!
//! # Epochs
//!
//! Forgetting is always safe because a user seen again gets a new epoch (see
//! [`Registry::epoch_for_new_user`]): a client resuming with the old epoch gets
//! `resumed:false`, and no `seq` is ever reused within an epoch.
//!
//! # Files
//!
//! - this file: [`Registry`], [`User`], the user index, connections and the event
//!   path ([`Registry::route`]);
//! - `replay.rs`: a user's kept events, the per-user bounds, resume, the global FIFO,
//!   the budget's accounting and eviction;
//! - `runs.rs`: [`Run`], run admission (caps, ended runs), begin, update and end,
//!   the ended-run memory, the watchdog's stale runs;
//! - `forgetting.rs`: epochs, forgetting a user and the housekeeping sweep.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use slab::Slab;

use crate::conn::ConnId;
use crate::event::Event;

mod forgetting;
mod idempotency;
mod replay;
mod runs;

use replay::{kept_cost, Front, Kept};
use runs::EndedRuns;

pub use idempotency::{KEYS_PER_USER, KEY_OVERHEAD_BYTES};
pub use replay::{Replayed, Resume, KEPT_OVERHEAD_BYTES, USER_OVERHEAD_BYTES};
pub(crate) use runs::is_synthetic_end;
pub use runs::Run;

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
    /// Whether this connection takes an event of `thread` from a run started by
    /// `owner` (thread filter, isolated mode).
    pub fn takes(&self, thread: Option<&str>, owner: Option<ConnId>) -> bool {
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

/// What routing an event within its user decided ([`Registry::route`]).
#[derive(Debug)]
pub struct Routed {
    /// The event's complete WebSocket frame with that `seq`, shared by every receiver.
    pub frame: Bytes,
    /// The connection that started the run, for runs of an isolated connection.
    pub owner: Option<ConnId>,
    /// What the event did to its run (begun, ended, a tool call finished).
    pub run: crate::stats::RunTransition,
}

/// The bounds the registry enforces (from the config's settings of the same names).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Events kept per user; 0 disables replay.
    pub replay_events: usize,
    /// Bytes of kept events per user (frame plus `KEPT_OVERHEAD_BYTES` each).
    pub replay_bytes_per_user: usize,
    /// Bytes of kept events over all users plus `USER_OVERHEAD_BYTES` per user.
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
    /// Idempotency keys of accepted events (section 6a); allocated at the first.
    keys: Option<Box<idempotency::Keys>>,
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

    /// True when nothing but the sequence counter is worth keeping.
    pub fn idle(&self) -> bool {
        self.conns.is_empty()
            && self.replay.is_empty()
            && self.runs.is_empty()
            && self.keys.is_none()
    }

    pub fn remove_conn(&mut self, id: ConnId) -> bool {
        let before = self.conns.len();
        self.conns.retain(|c| c.id != id);
        before != self.conns.len()
    }
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
    /// Idempotency keys dropped before their expiry (per-user bound or budget).
    pub keys_dropped: u64,
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
    /// Idempotency keys over all users and their counted bytes (in the budget).
    key_count: usize,
    key_bytes: usize,
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
            key_count: 0,
            key_bytes: 0,
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
    #[cfg(test)]
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

    pub fn users(&self) -> impl Iterator<Item = (&Arc<str>, &User)> {
        self.slots.iter().map(|(_, u)| (&u.name, u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventKind, RunKey};

    pub(super) fn id(key: usize, serial: u64) -> ConnId {
        ConnId { key, serial }
    }

    pub(super) fn entry(
        key: usize,
        serial: u64,
        thread: Option<&str>,
        isolated: bool,
    ) -> ConnEntry {
        ConnEntry {
            id: id(key, serial),
            thread: thread.map(Arc::from),
            isolated,
        }
    }

    pub(super) fn replayed(
        seq: u64,
        thread: Option<&str>,
        owner: Option<ConnId>,
        at: u64,
    ) -> Replayed {
        Replayed {
            seq,
            frame: Bytes::new(),
            thread: thread.map(Arc::from),
            owner,
            at,
        }
    }

    pub(super) fn event(user: &str, run: &str, kind: EventKind, data_bytes: usize) -> Event {
        let key = RunKey::new(user, None, run, "agent").unwrap();
        Event::new(key, kind, &serde_json::json!({"x": "y".repeat(data_bytes)})).unwrap()
    }

    pub(super) fn limits(events: usize, per_user: usize, total: usize) -> Limits {
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
}
