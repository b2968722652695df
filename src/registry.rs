//! Per-user routing state: which connections a user has open (oldest first), the
//! user's sequence counter, replay buffer and runs. Kept symmetric with the reactor's
//! slab: every open session has exactly one entry here, removed by the one close path.
//!
//! Pure data and decisions (no I/O), so routing rules are unit-tested here: which
//! connections receive an event ([`User::targets`]), what a resuming client gets
//! ([`User::resume`]), and when a user's state can be retired.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::conn::ConnId;
use crate::event::Event;

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

/// Everything the gateway keeps about one user.
#[derive(Debug, Default)]
pub struct User {
    /// The user id (shared with every session of the user).
    pub name: Arc<str>,
    pub conns: Vec<ConnEntry>,
    pub seq: u64,
    pub replay: VecDeque<Replayed>,
    pub runs: HashMap<Arc<str>, Run>,
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

    /// Route `ev` within this user at tick `now`: `None` when its run already ended
    /// (refused, takes no `seq`). Otherwise the event takes the next `seq` and its
    /// frame is built; its run begins (a `user_message` only pre-registers it) or is
    /// updated (last seq, type, time, the worker's cancel flag, set at once if a cancel
    /// already arrived) and ends when `ev` ends it; the event is kept for replay (at
    /// most `replay_max`).
    pub fn route(&mut self, ev: &Event, now: u64, replay_max: usize) -> Option<Routed> {
        if self.run_ended(&ev.key.run_id) {
            return None;
        }
        self.seq += 1;
        let seq = self.seq;
        let frame = ev.frame(seq);
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
        }
        self.keep(
            Replayed {
                seq,
                frame: frame.clone(),
                thread: ev.key.thread_id.clone(),
                owner,
                at: now,
            },
            replay_max,
        );
        Some(Routed { frame, owner })
    }

    /// Decide a resume: `Exact` when every event after `last_seq` is in the buffer.
    pub fn resume(&self, asked: Option<(u64, &str)>, epoch: &str) -> Resume {
        let Some((last_seq, their_epoch)) = asked else {
            return Resume::NotAsked;
        };
        if their_epoch != epoch || last_seq > self.seq {
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

    /// Keep an event for resume, bounded by `max` events.
    pub fn keep(&mut self, item: Replayed, max: usize) {
        if max == 0 {
            return;
        }
        while self.replay.len() >= max {
            self.replay.pop_front();
        }
        self.replay.push_back(item);
    }

    /// Drop kept events routed before tick `cutoff`; give the memory back when empty.
    pub fn expire_replay(&mut self, cutoff: u64) {
        while self.replay.front().is_some_and(|r| r.at < cutoff) {
            self.replay.pop_front();
        }
        if self.replay.is_empty() && self.replay.capacity() > 0 {
            self.replay = VecDeque::new();
        }
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

/// All users, plus the sequence counters of retired users (a user's `seq` keeps
/// counting for the whole epoch, PROTOCOL.md section 2; a retired user costs one map
/// entry: the id and a u64).
#[derive(Debug, Default)]
pub struct Registry {
    /// Boxed: a table slot is then a pointer, not a whole `User`, and hashbrown's
    /// power-of-two table (all of it resident, slots are spread) costs ~40 B per user
    /// instead of ~370 B.
    users: HashMap<Arc<str>, Box<User>>,
    retired: HashMap<Arc<str>, u64>,
    online: usize,
}

impl Registry {
    pub fn get(&self, user: &str) -> Option<&User> {
        self.users.get(user).map(|u| &**u)
    }

    pub fn get_mut(&mut self, user: &str) -> Option<&mut User> {
        self.users.get_mut(user).map(|u| &mut **u)
    }

    /// The user's entry, created (with its retired seq, if any) when missing.
    pub fn entry(&mut self, user: &str) -> &mut User {
        let (name, seq) = match self.users.get_key_value(user) {
            Some((k, u)) => (k.clone(), u.seq),
            None => match self.retired.remove_entry(user) {
                Some(found) => found,
                None => (Arc::from(user), 0),
            },
        };
        self.users.entry(name.clone()).or_insert_with(|| {
            Box::new(User {
                name,
                seq,
                // Most users have one tab: room for exactly one connection (a Vec's
                // first growth makes room for four).
                conns: Vec::with_capacity(1),
                ..User::default()
            })
        })
    }

    /// The user's current sequence number (0 when nothing was ever routed).
    pub fn seq(&self, user: &str) -> u64 {
        self.users
            .get(user)
            .map(|u| u.seq)
            .or_else(|| self.retired.get(user).copied())
            .unwrap_or(0)
    }

    pub fn add_conn(&mut self, user: &str, entry: ConnEntry) {
        let u = self.entry(user);
        let was_offline = u.conns.is_empty();
        u.conns.push(entry);
        if was_offline {
            self.online += 1;
        }
    }

    /// Remove a connection; returns true if it was registered.
    pub fn remove_conn(&mut self, user: &str, id: ConnId) -> bool {
        let Some(u) = self.users.get_mut(user) else {
            return false;
        };
        let removed = u.remove_conn(id);
        if removed && u.conns.is_empty() {
            self.online -= 1;
        }
        removed
    }

    /// Users with at least one open connection.
    pub fn online(&self) -> usize {
        self.online
    }

    /// Users with state beyond a retired counter.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn active_runs(&self) -> usize {
        self.users.values().map(|u| u.runs.len()).sum()
    }

    /// Retire a user whose state is idle: keep only its sequence counter.
    pub fn retire_if_idle(&mut self, user: &str) {
        if self.users.get(user).is_some_and(|u| u.idle()) {
            if let Some((name, u)) = self.users.remove_entry(user) {
                self.retired.insert(name, u.seq);
            }
        }
    }

    /// Expire replay buffers older than `cutoff` for offline users; retire idle users.
    pub fn sweep(&mut self, cutoff: u64) {
        let mut idle = Vec::new();
        for (name, u) in self.users.iter_mut() {
            if u.conns.is_empty() {
                u.expire_replay(cutoff);
                if u.idle() {
                    idle.push(name.clone());
                }
            }
        }
        for name in idle {
            self.retire_if_idle(&name);
        }
    }

    pub fn users(&self) -> impl Iterator<Item = (&Arc<str>, &User)> {
        self.users.iter().map(|(name, u)| (name, &**u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn removing_conns_keeps_online_count_and_retires_seq() {
        let mut r = Registry::default();
        r.add_conn("u", entry(1, 1, None, false));
        r.add_conn("u", entry(2, 2, None, false));
        r.entry("u").seq = 7;
        assert!(r.remove_conn("u", id(1, 1)));
        assert!(!r.remove_conn("u", id(1, 1)));
        assert_eq!(r.online(), 1);
        assert!(r.remove_conn("u", id(2, 2)));
        assert_eq!(r.online(), 0);
        r.retire_if_idle("u");
        assert!(r.get("u").is_none());
        assert_eq!(r.seq("u"), 7);
        assert_eq!(r.entry("u").seq, 7, "seq keeps counting after retirement");
    }

    #[test]
    fn resume_is_exact_only_when_nothing_is_missing() {
        let mut u = User::default();
        assert_eq!(u.resume(None, "e"), Resume::NotAsked);
        assert_eq!(u.resume(Some((0, "e")), "e"), Resume::Exact);
        assert_eq!(u.resume(Some((0, "x")), "e"), Resume::Lost);
        for seq in 1..=10 {
            u.seq = seq;
            u.keep(replayed(seq, None, None, seq), 4);
        }
        // Kept: 7..=10.
        assert_eq!(u.resume(Some((10, "e")), "e"), Resume::Exact);
        assert_eq!(u.resume(Some((6, "e")), "e"), Resume::Exact);
        assert_eq!(u.resume(Some((5, "e")), "e"), Resume::Lost);
        assert_eq!(u.resume(Some((11, "e")), "e"), Resume::Lost);
        let all = entry(1, 1, None, false);
        let seqs: Vec<u64> = u.replay_after(8, &all).map(|r| r.seq).collect();
        assert_eq!(seqs, vec![9, 10]);
        u.expire_replay(9);
        assert_eq!(u.replay.front().map(|r| r.seq), Some(9));
        assert_eq!(u.resume(Some((7, "e")), "e"), Resume::Lost);
    }

    #[test]
    fn replay_respects_filters() {
        let mut u = User::default();
        u.keep(replayed(1, Some("t1"), None, 0), 10);
        u.keep(replayed(2, Some("t2"), None, 0), 10);
        u.keep(replayed(3, None, None, 0), 10);
        u.keep(replayed(4, None, Some(id(5, 5)), 0), 10);
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
}
