//! Idempotency keys (PROTOCOL.md section 6a): per user, the keys of accepted events
//! with the tick they were accepted at, so a repeat within `replay_ttl_ms` is
//! acknowledged but routed only once.
//!
//! # Bounds
//!
//! - per user: at most [`KEYS_PER_USER`] keys; past it the oldest is dropped first;
//! - in time: a key is a repeat only within `replay_ttl_ms` of its acceptance; the
//!   housekeeping sweep drops expired keys ([`Registry::sweep`]);
//! - in memory: each key counts `key bytes + `[`KEY_OVERHEAD_BYTES`] in the
//!   `replay_memory_bytes` budget, like kept events. When the budget is full the
//!   oldest kept events of any user (or idle users) make room first; past that the
//!   user's own oldest keys go; a key that still does not fit is not remembered.
//!
//! A user with remembered keys is not idle (not forgotten) until they expire.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::{Registry, User};

/// Most idempotency keys remembered per user.
pub const KEYS_PER_USER: usize = 4_096;

/// Bytes counted per remembered key on top of its own bytes: the shared string's
/// header, the map entry (pointer, length, tick, hash slack) and the order entry.
pub const KEY_OVERHEAD_BYTES: usize = 96;

/// One user's remembered keys: tick of acceptance by key, and acceptance order.
#[derive(Debug, Default)]
pub struct Keys {
    at: HashMap<Arc<str>, u64>,
    /// Oldest first; an entry whose tick differs from the map's is stale (the key
    /// was accepted again after it expired) and is skipped when met.
    order: VecDeque<(Arc<str>, u64)>,
    bytes: usize,
}

fn cost(key: &str) -> usize {
    key.len() + KEY_OVERHEAD_BYTES
}

impl Keys {
    /// Remembered keys.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// Bytes counted in the budget.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True when `key` was accepted less than `ttl_ms` before `now`.
    fn seen(&self, key: &str, now: u64, ttl_ms: u64) -> bool {
        self.at
            .get(key)
            .is_some_and(|&t| t.saturating_add(ttl_ms) > now)
    }

    /// Drop the oldest key; returns its counted bytes (None when there is none).
    fn pop_oldest(&mut self) -> Option<usize> {
        while let Some((key, t)) = self.order.pop_front() {
            if self.at.get(&key) == Some(&t) {
                self.at.remove(&key);
                let c = cost(&key);
                self.bytes = self.bytes.saturating_sub(c);
                return Some(c);
            }
        }
        None
    }

    /// Drop keys accepted `ttl_ms` or more before `now`; returns (keys, bytes) freed.
    fn expire(&mut self, now: u64, ttl_ms: u64) -> (usize, usize) {
        let (mut n, mut freed) = (0, 0);
        while self
            .order
            .front()
            .is_some_and(|(_, t)| t.saturating_add(ttl_ms) <= now)
        {
            let Some((key, t)) = self.order.pop_front() else {
                break;
            };
            if self.at.get(&key) == Some(&t) {
                self.at.remove(&key);
                let c = cost(&key);
                self.bytes = self.bytes.saturating_sub(c);
                freed += c;
                n += 1;
            }
        }
        (n, freed)
    }

    /// Remember `key` at `now`; returns its counted bytes when it is new.
    fn insert(&mut self, key: &str, now: u64) -> Option<usize> {
        let key: Arc<str> = Arc::from(key);
        let c = cost(&key);
        let new = self.at.insert(key.clone(), now).is_none();
        if new {
            self.bytes += c;
        }
        self.order.push_back((key, now));
        // Stale order entries stay within the live ones (plus one).
        if self.order.len() > 2 * self.at.len() + 1 {
            let at = &self.at;
            self.order.retain(|(k, t)| at.get(k) == Some(t));
        }
        new.then_some(c)
    }
}

impl User {
    /// Remembered idempotency keys (0 when none).
    pub fn idempotency_keys(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.len())
    }

    /// Drop keys accepted `ttl_ms` or more before `now`; returns (keys, bytes) freed.
    pub(super) fn expire_keys(&mut self, now: u64, ttl_ms: u64) -> (usize, usize) {
        let Some(keys) = self.keys.as_mut() else {
            return (0, 0);
        };
        let freed = keys.expire(now, ttl_ms);
        if keys.is_empty() {
            self.keys = None;
        }
        freed
    }

    /// Every remembered key, with its counted bytes (when the user is forgotten).
    pub(super) fn key_totals(&self) -> (usize, usize) {
        self.keys.as_ref().map_or((0, 0), |k| (k.len(), k.bytes()))
    }
}

impl Registry {
    /// True when `user` had `key` accepted less than `ttl_ms` before `now`: the event
    /// is a repeat (PROTOCOL.md section 6a).
    pub fn key_seen(&self, user: &str, key: &str, now: u64, ttl_ms: u64) -> bool {
        self.get(user)
            .and_then(|u| u.keys.as_deref())
            .is_some_and(|k| k.seen(key, now, ttl_ms))
    }

    /// Idempotency keys remembered over all users, and their counted bytes.
    pub fn keys_kept(&self) -> (usize, usize) {
        (self.key_count, self.key_bytes)
    }

    /// Remember that `user` (known: it was just routed to) had `key` accepted at
    /// `now`, within the per-user bound and the memory budget.
    pub fn remember_key(&mut self, user: &str, key: &str, now: u64) {
        let Some(&slot) = self.index.get(user) else {
            return;
        };
        let need = cost(key);
        if self.memory_used() + need > self.limits.replay_memory_bytes {
            self.make_room(need, Some(slot));
        }
        let limit = self.limits.replay_memory_bytes;
        let used = self.memory_used();
        let Some(u) = self.slots.get_mut(slot) else {
            return;
        };
        let keys = u.keys.get_or_insert_with(Box::default);
        let (mut dropped, mut freed) = (0, 0);
        let known = keys.at.contains_key(key);
        while !known && (keys.len() >= KEYS_PER_USER || used.saturating_sub(freed) + need > limit) {
            let Some(f) = keys.pop_oldest() else {
                break;
            };
            freed += f;
            dropped += 1;
        }
        let added = if !known && used.saturating_sub(freed) + need > limit {
            None
        } else {
            keys.insert(key, now)
        };
        if keys.is_empty() {
            u.keys = None;
        }
        self.counters.keys_dropped += dropped as u64 + u64::from(added.is_none() && !known);
        self.key_count = (self.key_count + usize::from(added.is_some())).saturating_sub(dropped);
        self.key_bytes = (self.key_bytes + added.unwrap_or(0)).saturating_sub(freed);
    }
}

#[cfg(test)]
mod tests {
    use super::{KEYS_PER_USER, KEY_OVERHEAD_BYTES};
    use crate::event::EventKind;
    use crate::registry::tests::{event, limits};
    use crate::registry::Registry;

    /// A registry with user `u` known (one routed event at tick 0).
    fn with_user(budget: usize) -> Registry {
        let mut r = Registry::new("p".into(), limits(16, 1 << 20, budget));
        r.route(&event("u", "r", EventKind::AgentThinking, 1), 0)
            .unwrap();
        r
    }

    #[test]
    fn a_key_is_a_repeat_within_the_ttl_only() {
        let mut r = with_user(1 << 24);
        assert!(!r.key_seen("u", "k", 0, 1_000));
        r.remember_key("u", "k", 100);
        assert!(r.key_seen("u", "k", 100, 1_000));
        assert!(r.key_seen("u", "k", 1_099, 1_000));
        assert!(!r.key_seen("u", "k", 1_100, 1_000));
        assert!(!r.key_seen("v", "k", 100, 1_000), "keys are per user");
        assert_eq!(r.keys_kept(), (1, 1 + KEY_OVERHEAD_BYTES));
        // Accepted again after its expiry (before a sweep): remembered anew.
        r.remember_key("u", "k", 1_200);
        assert!(r.key_seen("u", "k", 1_300, 1_000));
        assert_eq!(r.keys_kept(), (1, 1 + KEY_OVERHEAD_BYTES));
        r.sweep(2_199, 1_000);
        assert_eq!(r.keys_kept().0, 1, "the newer acceptance is still fresh");
        r.sweep(2_200, 1_000);
        assert_eq!(r.keys_kept(), (0, 0));
        assert_eq!(r.get("u").map(|u| u.idempotency_keys()), Some(0));
    }

    #[test]
    fn keys_are_bounded_per_user_oldest_first() {
        let mut r = with_user(1 << 30);
        for i in 0..KEYS_PER_USER + 10 {
            r.remember_key("u", &format!("k{i}"), 1);
        }
        assert_eq!(r.keys_kept().0, KEYS_PER_USER);
        assert_eq!(r.counters.keys_dropped, 10);
        assert!(!r.key_seen("u", "k0", 1, 1_000), "the oldest went first");
        assert!(!r.key_seen("u", "k9", 1, 1_000));
        assert!(r.key_seen("u", "k10", 1, 1_000));
        let last = format!("k{}", KEYS_PER_USER + 9);
        assert!(r.key_seen("u", &last, 1, 1_000));
    }

    #[test]
    fn keys_count_in_the_memory_budget() {
        let budget = 8_192;
        let mut r = with_user(budget);
        let before = r.memory_used();
        r.remember_key("u", &"x".repeat(128), 1);
        assert_eq!(r.memory_used(), before + 128 + KEY_OVERHEAD_BYTES);
        for i in 0..1_000 {
            r.remember_key("u", &format!("{i:0>100}"), 1);
            assert!(r.memory_used() <= budget, "{} > {budget}", r.memory_used());
        }
        assert!(r.counters.keys_dropped > 0);
        assert!(r.keys_kept().0 > 0);
    }

    #[test]
    fn a_user_with_keys_is_not_forgotten_until_they_expire() {
        let mut r = Registry::new("p".into(), limits(0, 1 << 20, 1 << 24));
        r.route(&event("u", "r", EventKind::AgentCompleted, 1), 0)
            .unwrap();
        r.remember_key("u", "k", 0);
        r.sweep(500, 1_000);
        assert_eq!(r.len(), 1);
        r.sweep(1_000, 1_000);
        assert_eq!(r.len(), 0, "keys expired: idle and forgotten");
        assert_eq!(r.keys_kept(), (0, 0));
    }
}
