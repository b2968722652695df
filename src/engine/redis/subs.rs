//! The feed thread's (un)subscribe commands in flight: which confirmations Redis still
//! owes, and what each command releases once Redis executed it.
//!
//! The feed sends SUBSCRIBE / UNSUBSCRIBE without waiting (RESP3: every reply on a
//! subscribed connection is a push, so messages and confirmations arrive in one stream
//! and are told apart by their kind). Redis executes commands in the order they were
//! sent, each one atomically, and answers every channel of a command with one
//! confirmation, in order. So the FIRST confirmation of a command means all of its
//! channels are listened to (and every command sent before it executed): that is when
//! the opens waiting on it go to the store thread. The remaining confirmations of that
//! command are counted off, so a later command's confirmation is never mistaken for
//! this one's (the stale-confirmation trap of `PubSub::subscribe` with several
//! channels, which returns at the first one and leaves the others unread).
//!
//! Bounded: the feed sends at most [`MAX_SENT`] commands before their confirmations
//! came, each of at most [`MAX_BATCH`] channels; a command not confirmed within
//! `redis_timeout_ms` means the connection is lost.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Channels in one SUBSCRIBE / UNSUBSCRIBE.
pub(super) const MAX_BATCH: usize = 512;
/// Commands sent and not confirmed yet; more requests wait in the feed's channel.
pub(super) const MAX_SENT: usize = 16;

/// Which command; its confirmations have the same kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Subscribe,
    Unsubscribe,
}

/// One command sent and not fully confirmed.
#[derive(Debug)]
struct Sent<T> {
    kind: Kind,
    /// Confirmations still owed.
    left: usize,
    /// What goes on once Redis executed the command (taken at its first confirmation).
    then: Vec<T>,
    /// The command completes a resubscription after a reconnect.
    resync: bool,
    at: Instant,
}

/// What a confirmation released: the command it belongs to was executed.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Released<T> {
    pub then: Vec<T>,
    pub resync: bool,
}

/// A confirmation that matches no command sent: the connection cannot be trusted.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Unexpected(pub Kind);

/// The commands in flight, oldest first.
#[derive(Debug)]
pub(super) struct InFlight<T> {
    sent: VecDeque<Sent<T>>,
}

impl<T> InFlight<T> {
    pub fn new() -> Self {
        InFlight {
            sent: VecDeque::new(),
        }
    }

    /// A command of `channels` channels (at least one) was sent.
    pub fn sent(&mut self, kind: Kind, channels: usize, then: Vec<T>, resync: bool, now: Instant) {
        debug_assert!(channels > 0);
        self.sent.push_back(Sent {
            kind,
            left: channels,
            then,
            resync,
            at: now,
        });
    }

    /// Mark the newest command as the end of a resubscription.
    pub fn mark_resync(&mut self) {
        if let Some(last) = self.sent.back_mut() {
            last.resync = true;
        }
    }

    /// `item` may go on once every command sent so far executed: it waits on the newest
    /// one, or comes back when nothing is in flight (it may go on now).
    pub fn after_all(&mut self, item: T) -> Option<T> {
        match self.sent.back_mut() {
            Some(last) => {
                last.then.push(item);
                None
            }
            None => Some(item),
        }
    }

    /// A confirmation of `kind` came. `Ok(Some)` at the first confirmation of a command
    /// that still had something to release.
    pub fn confirmed(&mut self, kind: Kind) -> Result<Option<Released<T>>, Unexpected> {
        let Some(front) = self.sent.front_mut() else {
            return Err(Unexpected(kind));
        };
        if front.kind != kind {
            return Err(Unexpected(kind));
        }
        front.left -= 1;
        let released = (!front.then.is_empty() || front.resync).then(|| Released {
            then: std::mem::take(&mut front.then),
            resync: std::mem::replace(&mut front.resync, false),
        });
        if front.left == 0 {
            self.sent.pop_front();
        }
        Ok(released)
    }

    /// The oldest command waited longer than `timeout` for its confirmations.
    pub fn overdue(&self, now: Instant, timeout: Duration) -> bool {
        self.sent
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.at) >= timeout)
    }

    pub fn len(&self) -> usize {
        self.sent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    /// Everything still waiting (the connection is lost).
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.sent.drain(..).flat_map(|s| s.then)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_releases_at_its_first_confirmation_and_counts_off_the_rest() {
        let now = Instant::now();
        let mut f = InFlight::new();
        f.sent(Kind::Subscribe, 3, vec![1, 2], false, now);
        f.sent(Kind::Subscribe, 1, vec![3], false, now);
        assert_eq!(
            f.confirmed(Kind::Subscribe),
            Ok(Some(Released {
                then: vec![1, 2],
                resync: false
            }))
        );
        // The other two confirmations of the first command release nothing: with a
        // reader that stops at the first confirmation they would pass for the second
        // command's and release 3 before its SUBSCRIBE executed.
        assert_eq!(f.confirmed(Kind::Subscribe), Ok(None));
        assert_eq!(f.len(), 2);
        assert_eq!(f.confirmed(Kind::Subscribe), Ok(None));
        assert_eq!(f.len(), 1);
        assert_eq!(
            f.confirmed(Kind::Subscribe),
            Ok(Some(Released {
                then: vec![3],
                resync: false
            }))
        );
        assert!(f.is_empty());
        assert_eq!(
            f.confirmed(Kind::Subscribe),
            Err(Unexpected(Kind::Subscribe))
        );
    }

    #[test]
    fn kinds_must_match_in_order() {
        let now = Instant::now();
        let mut f: InFlight<u32> = InFlight::new();
        f.sent(Kind::Unsubscribe, 1, vec![], false, now);
        f.sent(Kind::Subscribe, 1, vec![], false, now);
        assert_eq!(
            f.confirmed(Kind::Subscribe),
            Err(Unexpected(Kind::Subscribe))
        );
        assert_eq!(f.confirmed(Kind::Unsubscribe), Ok(None));
        assert_eq!(f.confirmed(Kind::Subscribe), Ok(None));
    }

    #[test]
    fn after_all_waits_on_the_newest_command_or_goes_now() {
        let now = Instant::now();
        let mut f = InFlight::new();
        assert_eq!(f.after_all(7), Some(7));
        f.sent(Kind::Subscribe, 2, vec![], false, now);
        f.sent(Kind::Unsubscribe, 1, vec![], false, now);
        f.mark_resync();
        assert_eq!(f.after_all(8), None);
        assert_eq!(f.confirmed(Kind::Subscribe), Ok(None));
        assert_eq!(f.confirmed(Kind::Subscribe), Ok(None));
        assert_eq!(
            f.confirmed(Kind::Unsubscribe),
            Ok(Some(Released {
                then: vec![8],
                resync: true
            }))
        );
    }

    #[test]
    fn overdue_and_drain() {
        let t0 = Instant::now();
        let mut f = InFlight::new();
        assert!(!f.overdue(t0 + Duration::from_secs(9), Duration::from_secs(1)));
        f.sent(Kind::Subscribe, 2, vec![1], false, t0);
        f.sent(Kind::Subscribe, 1, vec![2], false, t0);
        assert!(!f.overdue(t0, Duration::from_secs(1)));
        assert!(f.overdue(t0 + Duration::from_secs(1), Duration::from_secs(1)));
        assert_eq!(f.drain().collect::<Vec<_>>(), vec![1, 2]);
        assert!(f.is_empty());
    }
}
