//! Revoked users ([`Revocations`]): who may not open a connection until when
//! (PROTOCOL.md section 12, `POST /api/users/{user_id}/disconnect` with `"until"`).
//!
//! A pure store, no I/O and no clock of its own (the caller passes the wall-clock
//! second), so the endpoint on the event loop (`reactor/revoke.rs`) and the
//! revocations the Redis engine carries from other nodes share it. Bounded: at most
//! `max_revoked_users` users at once; expired entries go first (from an index ordered
//! by expiry, so a sweep costs O(log n) per entry it removes), and past the cap a new
//! revocation is refused ([`Full`]) rather than dropping one in force: a revocation is
//! a security decision, and forgetting one silently would let a user back in.
//!
//! Revoking a user already revoked replaces the old `until` (later or earlier): an
//! operator lifts a revocation early by revoking again until a second from now.

use std::collections::{BTreeSet, HashMap};

use crate::ids::UserId;

/// Latest `until` accepted, as seconds from now: one year. Further ahead is a mistake
/// (milliseconds given as seconds, say), answered 400.
pub const MAX_UNTIL_AHEAD_S: u64 = 366 * 86_400;

/// The store is full of revocations in force (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{cap} users are revoked already (max_revoked_users)")]
pub struct Full {
    pub cap: usize,
}

/// Users refused until a wall-clock second (see the module docs).
#[derive(Debug)]
pub struct Revocations {
    until: HashMap<UserId, u64>,
    /// `(until, user)` for every entry of `until`: the soonest to expire first.
    by_expiry: BTreeSet<(u64, UserId)>,
    cap: usize,
}

impl Revocations {
    /// An empty store holding at most `cap` users.
    pub fn new(cap: usize) -> Revocations {
        Revocations {
            until: HashMap::new(),
            by_expiry: BTreeSet::new(),
            cap,
        }
    }

    /// Refuse `user` until `until_s` (epoch seconds, after `now_s`), replacing any
    /// earlier revocation of the same user.
    ///
    /// # Errors
    /// [`Full`] when `cap` other users are revoked and none has expired by `now_s`.
    pub fn revoke(&mut self, user: &UserId, until_s: u64, now_s: u64) -> Result<(), Full> {
        if !self.until.contains_key(&**user) && self.until.len() >= self.cap {
            self.sweep(now_s);
            if self.until.len() >= self.cap {
                return Err(Full { cap: self.cap });
            }
        }
        if let Some(old) = self.until.insert(user.clone(), until_s) {
            self.by_expiry.remove(&(old, user.clone()));
        }
        self.by_expiry.insert((until_s, user.clone()));
        Ok(())
    }

    /// Until when `user` is refused, if they are at `now_s`.
    pub fn revoked_until(&self, user: &str, now_s: u64) -> Option<u64> {
        self.until.get(user).copied().filter(|&t| t > now_s)
    }

    /// Whether `revoke` would succeed for `user` at `now_s` without dropping anything.
    pub fn has_room_for(&mut self, user: &str, now_s: u64) -> bool {
        if self.until.contains_key(user) || self.until.len() < self.cap {
            return true;
        }
        self.sweep(now_s);
        self.until.len() < self.cap
    }

    /// Forget the revocations that ended by `now_s`; returns how many.
    pub fn sweep(&mut self, now_s: u64) -> usize {
        let mut n = 0;
        while let Some((t, _)) = self.by_expiry.first() {
            if *t > now_s {
                break;
            }
            if let Some((_, user)) = self.by_expiry.pop_first() {
                self.until.remove(&*user);
                n += 1;
            }
        }
        n
    }

    /// Users revoked (some may have expired since the last sweep).
    pub fn len(&self) -> usize {
        self.until.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::try_from(s).unwrap()
    }

    #[test]
    fn revoked_until_the_second_then_free() {
        let mut r = Revocations::new(10);
        r.revoke(&user("u"), 110, 100).unwrap();
        assert_eq!(r.revoked_until("u", 100), Some(110));
        assert_eq!(r.revoked_until("u", 109), Some(110));
        assert_eq!(r.revoked_until("u", 110), None);
        assert_eq!(r.revoked_until("other", 100), None);
        assert_eq!(r.sweep(109), 0);
        assert_eq!(r.sweep(110), 1);
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn revoking_again_replaces_the_until_in_both_indexes() {
        let mut r = Revocations::new(10);
        r.revoke(&user("u"), 500, 100).unwrap();
        r.revoke(&user("u"), 101, 100).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r.revoked_until("u", 100), Some(101));
        assert_eq!(r.sweep(101), 1);
        assert_eq!(r.revoked_until("u", 102), None);
        assert!(r.by_expiry.is_empty());
    }

    #[test]
    fn past_the_cap_expired_entries_go_first_then_new_ones_are_refused() {
        let mut r = Revocations::new(2);
        r.revoke(&user("a"), 150, 100).unwrap();
        r.revoke(&user("b"), 300, 100).unwrap();
        assert_eq!(r.revoke(&user("c"), 400, 100), Err(Full { cap: 2 }));
        assert!(!r.has_room_for("c", 100));
        // A user already revoked can always be revoked again.
        assert!(r.has_room_for("a", 100));
        r.revoke(&user("b"), 350, 100).unwrap();
        // Once `a` expired there is room, and nothing in force was dropped.
        r.revoke(&user("c"), 400, 200).unwrap();
        assert_eq!(r.revoked_until("b", 200), Some(350));
        assert_eq!(r.revoked_until("c", 200), Some(400));
        assert_eq!(r.len(), 2);
    }
}
