//! Forgetting users, and the epochs that make it safe. A user's state is dropped when
//! it is idle (no connection, no run, nothing kept, no idempotency key) for `replay_ttl_ms` or when the
//! budget needs room; a user seen again is created in a new epoch, so a client
//! resuming from before gets `resumed:false` and no `seq` repeats within an epoch.
//! Also the housekeeping sweep: kept events past `replay_ttl_ms` expire, the runs in
//! progress are recounted and the global FIFO is trimmed.

use std::sync::Arc;

use super::replay::{Freed, Front};
use super::Registry;

/// Most idle users one sweep forgets (the rest the next sweep), so users expiring
/// together cannot stall the loop for long (the cost per user is in
/// docs/BENCHMARKS.md, "Forgetting idle users"). Meanwhile the budget still holds
/// (`make_room` forgets as it evicts).
const FORGET_PER_SWEEP: usize = 100_000;

impl Registry {
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

    /// Forget the user in `slot` (its kept events, if any, with it). Users created
    /// from now on get a new epoch, unless this one never had an event (seq 0: a
    /// new incarnation's seqs cannot collide with any a client saw).
    pub(super) fn forget(&mut self, slot: usize) {
        let Some(mut u) = self.slots.try_remove(slot) else {
            return;
        };
        self.set_front(slot, Front::EMPTY);
        if u.seq > 0 {
            self.generation += 1;
        }
        let freed = u.drop_oldest(usize::MAX);
        self.account(freed, None);
        let (keys, key_bytes) = u.key_totals();
        self.key_count = self.key_count.saturating_sub(keys);
        self.key_bytes = self.key_bytes.saturating_sub(key_bytes);
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
        let (mut keys, mut key_bytes) = (0, 0);
        for (k, u) in self.slots.iter_mut() {
            let (n, b) = u.expire_keys(now, replay_ttl_ms);
            keys += n;
            key_bytes += b;
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
        self.key_count = self.key_count.saturating_sub(keys);
        self.key_bytes = self.key_bytes.saturating_sub(key_bytes);
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
}

#[cfg(test)]
mod tests {
    use crate::event::EventKind;
    use crate::registry::tests::{entry, event, id};
    use crate::registry::{Limits, Registry, Resume};

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
}
