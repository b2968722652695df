//! A user's kept events (the replay buffer resumes are served from) and the memory
//! budget they count in: the per-user bounds (`replay_events`,
//! `replay_bytes_per_user`), what a resume gets, the counted size of a kept event and
//! of a user, the global FIFO of kept events in routing order, the budget's
//! accounting and the eviction that keeps `replay_memory_bytes` (oldest kept event of
//! any user first, then idle users).
//!
//! Stale FIFO entries (events their user already dropped by itself) are recognized
//! from the dense `fronts` array (`Front`: per slot, the user's serial and oldest
//! kept seq) and compacted away once they outnumber the live ones.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use super::{ConnEntry, Limits, Registry, User};
use crate::conn::ConnId;

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

/// Bytes counted in `replay_memory_bytes` for each known user besides its kept events:
/// the index entry, the slab slot, the name, a connection entry, the ended-run record
/// and the allocator's share: the RSS per user measured under a flood of user ids
/// (`tools/redteam/memory.py users`), less the user's kept event, rounded up
/// (figures in docs/BENCHMARKS.md, "Memory per known user").
pub const USER_OVERHEAD_BYTES: usize = 640;

/// Bytes counted for each kept event besides its frame: its [`Replayed`] record and
/// its global FIFO entry.
pub const KEPT_OVERHEAD_BYTES: usize = 128;

/// Stale FIFO entries tolerated beyond the live ones before a compaction.
const FIFO_SLACK: usize = 1024;

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
    pub(super) fn add(&mut self, other: Freed) {
        self.events += other.events;
        self.bytes += other.bytes;
    }
}

/// The counted size of a kept event.
pub(super) fn kept_cost(frame: &Bytes) -> usize {
    frame.len() + KEPT_OVERHEAD_BYTES
}

impl User {
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
    #[cfg(test)]
    pub fn replay_bytes(&self) -> usize {
        self.replay_bytes
    }

    /// Keep an event for resume within the per-user bounds (count and bytes, the
    /// oldest go first). An event larger than the per-user byte bound is not kept and
    /// the older ones are dropped too, so a resume from before it is refused rather
    /// than silently missing it. Returns whether it was kept and what was dropped.
    pub(super) fn keep(&mut self, item: Replayed, limits: &Limits) -> (bool, Freed) {
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
    pub(super) fn drop_oldest(&mut self, n: usize) -> Freed {
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
    pub(super) fn expire_replay(&mut self, cutoff: u64) -> Freed {
        let n = self.replay.iter().take_while(|r| r.at < cutoff).count();
        self.drop_oldest(n)
    }
}

/// A slot's user serial and oldest kept seq ([`Registry`]'s `fronts`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Front {
    pub(super) serial: u64,
    pub(super) seq: u64,
}

impl Front {
    pub(super) const EMPTY: Front = Front {
        serial: 0,
        seq: u64::MAX,
    };

    pub(super) fn of(u: &User) -> Front {
        Front {
            serial: u.serial,
            seq: u.replay.front().map_or(u64::MAX, |r| r.seq),
        }
    }
}

/// One kept event in the global FIFO: the user's slot and serial, and its `seq`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Kept {
    pub(super) slot: usize,
    pub(super) serial: u64,
    pub(super) seq: u64,
}

impl Registry {
    /// Bytes counted against `replay_memory_bytes`: kept events, idempotency keys
    /// and users.
    pub fn memory_used(&self) -> usize {
        self.kept_bytes + self.key_bytes + self.index.len() * USER_OVERHEAD_BYTES
    }

    /// Kept events over all users, and their counted bytes.
    pub fn kept(&self) -> (usize, usize) {
        (self.kept_events, self.kept_bytes)
    }

    /// Entries in the global FIFO (live and stale).
    #[cfg(test)]
    pub fn fifo_len(&self) -> usize {
        self.fifo.len()
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
    pub(super) fn account(&mut self, freed: Freed, added: Option<usize>) {
        self.kept_events = self.kept_events.saturating_sub(freed.events);
        self.kept_bytes = self.kept_bytes.saturating_sub(freed.bytes);
        if let Some(cost) = added {
            self.kept_events += 1;
            self.kept_bytes += cost;
        }
    }

    pub(super) fn set_front(&mut self, slot: usize, front: Front) {
        if self.fronts.len() <= slot {
            self.fronts.resize(slot + 1, Front::EMPTY);
        }
        if let Some(f) = self.fronts.get_mut(slot) {
            *f = front;
        }
    }

    /// Whether FIFO entry `k` still names a kept event: its user is still in the slot
    /// and has not dropped it (users only ever drop their oldest kept events).
    pub(super) fn live(&self, k: &Kept) -> bool {
        self.fronts
            .get(k.slot)
            .is_some_and(|f| f.serial == k.serial && f.seq <= k.seq)
    }

    /// Drop the FIFO's entries of events their users already dropped, once they
    /// outnumber the live ones (amortized O(1) per keep).
    pub(super) fn compact_if_stale(&mut self) {
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
    pub(super) fn make_room(&mut self, need: usize, protect: Option<usize>) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use crate::registry::tests::{entry, event, id, limits, replayed};

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
}
