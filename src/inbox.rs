//! The reactor's side of the workers' inbound channel for `user_message`: each user's
//! pending runs (acked, not yet begun by their first event) counted against
//! `max_pending_runs_per_user`, and, while the shared channel is full, each user's
//! messages held in a queue of its own and fed into the channel round-robin across
//! users as it drains. One user's flood therefore fills only its own bound: it never
//! makes another user's `user_message` wait behind it or get `busy` (issue 9, F4).
//!
//! Pure bookkeeping, no I/O: the reactor passes in how to send (`try_send` on the
//! channel) and how to tell whether a run is still pending (its registry entry exists
//! and has not begun), so a run that begins, ends or times out (the run watchdog ends
//! pending runs after `run_idle_timeout_ms`) stops counting without any hook here.
//!
//! Bounds: a user's pending list holds at most `max_pending_runs_per_user` run ids,
//! its held queue no more (held messages are pending runs); all held messages together
//! at most [`Inbox::held_limit`] bytes (text plus [`HELD_OVERHEAD_BYTES`] each), which
//! is at least twice what one user can hold, so one user alone never reaches it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crossbeam_channel::{Sender, TrySendError};

use crate::emitter::Inbound;

/// What one attempt to put a message into the workers' channel did.
#[derive(Debug)]
pub enum Offer {
    /// It is in the channel.
    Taken,
    /// The channel is full: the message comes back.
    Full(Inbound),
    /// Nobody consumes the channel any more.
    Gone,
}

/// Offer `msg` to the workers' channel without blocking.
pub fn offer(tx: &Sender<Inbound>, msg: Inbound) -> Offer {
    match tx.try_send(msg) {
        Ok(()) => Offer::Taken,
        Err(TrySendError::Full(msg)) => Offer::Full(msg),
        Err(TrySendError::Disconnected(_)) => Offer::Gone,
    }
}

/// What a held message is charged beyond its text (ids, queue slot).
pub const HELD_OVERHEAD_BYTES: usize = 256;
/// Floor of the total held-bytes budget (see [`Inbox::held_limit`]).
pub const HELD_MIN_LIMIT_BYTES: usize = 32 * 1024 * 1024;

/// What became of one `user_message` ([`Inbox::admit`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// In the workers' channel.
    Sent,
    /// Held in the user's queue until the channel has room (fed round-robin).
    Held,
    /// The user already has `max_pending_runs_per_user` pending runs.
    UserBusy,
    /// Every user's held messages together reached the held-bytes budget.
    GatewayBusy,
    /// Nobody consumes the channel.
    NoAgent,
}

/// A held message whose run can no longer start: nobody consumes the channel any more.
#[derive(Debug, PartialEq, Eq)]
pub struct Orphan {
    pub user_id: String,
    pub thread_id: Option<String>,
    pub run_id: String,
}

#[derive(Default)]
struct UserInbox {
    /// Run ids acked and maybe not yet begun, oldest first (pruned on use).
    pending: Vec<Arc<str>>,
    /// Messages waiting for room in the channel, oldest first.
    held: VecDeque<Inbound>,
}

/// Per-user pending runs and held messages (see the module docs).
pub struct Inbox {
    per_user: usize,
    held_limit: usize,
    users: HashMap<Arc<str>, UserInbox>,
    /// Users with held messages, in round-robin order (each at most once).
    turn: VecDeque<Arc<str>>,
    held: usize,
    held_bytes: usize,
}

fn charge(msg: &Inbound) -> usize {
    match msg {
        Inbound::UserMessage { text, .. } => text.len() + HELD_OVERHEAD_BYTES,
        Inbound::Cancel { .. } => HELD_OVERHEAD_BYTES,
    }
}

impl Inbox {
    /// `per_user` is `max_pending_runs_per_user`; `max_text` is `max_user_message_bytes`.
    pub fn new(per_user: usize, max_text: usize) -> Inbox {
        let one_user = per_user.saturating_mul(max_text.saturating_add(HELD_OVERHEAD_BYTES));
        Inbox {
            per_user,
            held_limit: HELD_MIN_LIMIT_BYTES.max(one_user.saturating_mul(2)),
            users: HashMap::new(),
            turn: VecDeque::new(),
            held: 0,
            held_bytes: 0,
        }
    }

    /// Bytes all held messages may take together: the larger of
    /// [`HELD_MIN_LIMIT_BYTES`] and twice what one user can hold.
    pub fn held_limit(&self) -> usize {
        self.held_limit
    }

    /// Held messages and their charged bytes.
    pub fn held(&self) -> (usize, usize) {
        (self.held, self.held_bytes)
    }

    /// Users with pending runs or held messages tracked here.
    #[cfg(test)]
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Drop `user`'s run ids that `still_pending` no longer holds pending; the count
    /// left.
    pub fn pending(&mut self, user: &str, still_pending: impl Fn(&str) -> bool) -> usize {
        let Some(u) = self.users.get_mut(user) else {
            return 0;
        };
        u.pending.retain(|run| still_pending(run));
        let n = u.pending.len();
        if n == 0 && u.held.is_empty() {
            self.users.remove(user);
        }
        n
    }

    /// Take one `user_message` (`msg`, for run `run_id`) of `user`: refused when the
    /// user is at its pending bound (`still_pending` prunes first); sent at once when
    /// nobody's messages are held; otherwise held behind the others, round-robin.
    pub fn admit(
        &mut self,
        user: &Arc<str>,
        run_id: &Arc<str>,
        msg: Inbound,
        still_pending: impl Fn(&str) -> bool,
        mut try_send: impl FnMut(Inbound) -> Offer,
    ) -> Admit {
        if self.pending(user, still_pending) >= self.per_user {
            return Admit::UserBusy;
        }
        let msg = if self.turn.is_empty() {
            match try_send(msg) {
                Offer::Taken => {
                    self.note_pending(user, run_id);
                    return Admit::Sent;
                }
                Offer::Gone => return Admit::NoAgent,
                Offer::Full(msg) => msg,
            }
        } else {
            msg
        };
        let cost = charge(&msg);
        if self.held_bytes.saturating_add(cost) > self.held_limit {
            return Admit::GatewayBusy;
        }
        self.note_pending(user, run_id);
        let u = self.users.entry(user.clone()).or_default();
        if u.held.is_empty() {
            self.turn.push_back(user.clone());
        }
        u.held.push_back(msg);
        self.held += 1;
        self.held_bytes += cost;
        Admit::Held
    }

    /// Count `run_id` as one of `user`'s pending runs (the webhook's messages, which
    /// go out without the channel, count against the same bound).
    pub fn note_pending(&mut self, user: &Arc<str>, run_id: &Arc<str>) {
        self.users
            .entry(user.clone())
            .or_default()
            .pending
            .push(run_id.clone());
    }

    /// Feed held messages into the channel, one per user in turn, until it is full or
    /// nothing is held. A held message whose run is no longer pending (`still_pending`
    /// of user and run id: it timed out meanwhile) is dropped. Returns the messages that
    /// can never go out because the channel is disconnected.
    pub fn feed(
        &mut self,
        still_pending: impl Fn(&str, &str) -> bool,
        mut try_send: impl FnMut(Inbound) -> Offer,
    ) -> Vec<Orphan> {
        let mut orphans = Vec::new();
        let mut disconnected = false;
        while let Some(user) = self.turn.pop_front() {
            let Some(u) = self.users.get_mut(&user) else {
                continue;
            };
            let Some(msg) = u.held.pop_front() else {
                continue;
            };
            self.held -= 1;
            self.held_bytes -= charge(&msg);
            let live = match &msg {
                Inbound::UserMessage { run_id, .. } => still_pending(&user, run_id),
                Inbound::Cancel { .. } => true,
            };
            if live && !disconnected {
                let ids = orphan(&msg);
                match try_send(msg) {
                    Offer::Taken => {}
                    Offer::Full(msg) => {
                        // Back at the head of the user's queue and of the turn.
                        self.held += 1;
                        self.held_bytes += charge(&msg);
                        u.held.push_front(msg);
                        self.turn.push_front(user);
                        break;
                    }
                    Offer::Gone => {
                        disconnected = true;
                        orphans.extend(ids);
                    }
                }
            } else if live {
                orphans.extend(orphan(&msg));
            }
            if u.held.is_empty() {
                if u.pending.is_empty() {
                    self.users.remove(&user);
                }
            } else {
                self.turn.push_back(user);
            }
        }
        orphans
    }

    /// Forget run ids that are no longer pending, for every user (the reactor calls it
    /// now and then, so users who left stop costing an entry).
    pub fn prune(&mut self, still_pending: impl Fn(&str, &str) -> bool) {
        self.users.retain(|user, u| {
            u.pending.retain(|run| still_pending(user, run));
            !u.pending.is_empty() || !u.held.is_empty()
        });
    }
}

/// The ids of a held `user_message` (its text is not copied).
fn orphan(msg: &Inbound) -> Option<Orphan> {
    match msg {
        Inbound::UserMessage {
            user_id,
            thread_id,
            run_id,
            ..
        } => Some(Orphan {
            user_id: user_id.clone(),
            thread_id: thread_id.clone(),
            run_id: run_id.clone(),
        }),
        Inbound::Cancel { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashSet;

    fn msg(user: &str, run: &str) -> Inbound {
        Inbound::UserMessage {
            user_id: user.into(),
            thread_id: None,
            text: "hello".into(),
            run_id: run.into(),
            connection_id: "c1".into(),
        }
    }

    /// A bounded channel stand-in recording what was sent.
    struct Channel {
        cap: usize,
        sent: RefCell<Vec<(String, String)>>,
    }

    impl Channel {
        fn send(&self, m: Inbound) -> Offer {
            let mut sent = self.sent.borrow_mut();
            if sent.len() >= self.cap {
                return Offer::Full(m);
            }
            if let Inbound::UserMessage {
                user_id, run_id, ..
            } = m
            {
                sent.push((user_id, run_id));
            }
            Offer::Taken
        }
    }

    #[test]
    fn a_user_at_its_bound_is_busy_and_frees_as_runs_begin() {
        let mut inbox = Inbox::new(3, 1000);
        let ch = Channel {
            cap: 100,
            sent: RefCell::default(),
        };
        let begun: RefCell<HashSet<String>> = RefCell::default();
        let a: Arc<str> = Arc::from("a");
        for i in 0..5 {
            let run: Arc<str> = Arc::from(format!("r{i}").as_str());
            let got = inbox.admit(
                &a,
                &run,
                msg("a", &run),
                |r| !begun.borrow().contains(r),
                |m| ch.send(m),
            );
            let want = if i < 3 { Admit::Sent } else { Admit::UserBusy };
            assert_eq!(got, want, "message {i}");
        }
        // Another user is not affected.
        let b: Arc<str> = Arc::from("b");
        let rb: Arc<str> = Arc::from("rb");
        assert_eq!(
            inbox.admit(&b, &rb, msg("b", "rb"), |_| true, |m| ch.send(m)),
            Admit::Sent
        );
        begun.borrow_mut().insert("r0".into());
        assert_eq!(inbox.pending("a", |r| !begun.borrow().contains(r)), 2);
        let r9: Arc<str> = Arc::from("r9");
        assert_eq!(
            inbox.admit(
                &a,
                &r9,
                msg("a", "r9"),
                |r| !begun.borrow().contains(r),
                |m| ch.send(m)
            ),
            Admit::Sent
        );
        inbox.prune(|_, _| false);
        assert_eq!(inbox.users(), 0);
    }

    #[test]
    fn a_full_channel_is_fed_round_robin_across_users() {
        let mut inbox = Inbox::new(4, 1000);
        let ch = Channel {
            cap: 0,
            sent: RefCell::default(),
        };
        // User a floods first, then b and c send one each.
        for (user, run) in [
            ("a", "a1"),
            ("a", "a2"),
            ("a", "a3"),
            ("a", "a4"),
            ("b", "b1"),
            ("c", "c1"),
        ] {
            let u: Arc<str> = Arc::from(user);
            let r: Arc<str> = Arc::from(run);
            assert_eq!(
                inbox.admit(&u, &r, msg(user, run), |_| true, |m| ch.send(m)),
                Admit::Held
            );
        }
        let a: Arc<str> = Arc::from("a");
        let a5: Arc<str> = Arc::from("a5");
        assert_eq!(
            inbox.admit(&a, &a5, msg("a", "a5"), |_| true, |m| ch.send(m)),
            Admit::UserBusy
        );
        assert_eq!(inbox.held().0, 6);
        let ch = Channel {
            cap: 3,
            sent: RefCell::default(),
        };
        assert!(inbox.feed(|_, _| true, |m| ch.send(m)).is_empty());
        let order: Vec<String> = ch.sent.borrow().iter().map(|(_, r)| r.clone()).collect();
        assert_eq!(order, ["a1", "b1", "c1"]);
        assert_eq!(inbox.held().0, 3);
        // A held run that timed out meanwhile is dropped, not sent.
        let ch = Channel {
            cap: 100,
            sent: RefCell::default(),
        };
        assert!(inbox.feed(|_, r| r != "a3", |m| ch.send(m)).is_empty());
        let order: Vec<String> = ch.sent.borrow().iter().map(|(_, r)| r.clone()).collect();
        assert_eq!(order, ["a2", "a4"]);
        assert_eq!(inbox.held(), (0, 0));
    }

    #[test]
    fn held_bytes_are_bounded_and_orphans_reported() {
        let mut inbox = Inbox::new(2, 10);
        assert_eq!(inbox.held_limit(), HELD_MIN_LIMIT_BYTES);
        let full = Offer::Full;
        let u: Arc<str> = Arc::from("u");
        let r: Arc<str> = Arc::from("r");
        assert_eq!(
            inbox.admit(&u, &r, msg("u", "r"), |_| true, full),
            Admit::Held
        );
        inbox.held_limit = inbox.held_bytes;
        let v: Arc<str> = Arc::from("v");
        assert_eq!(
            inbox.admit(&v, &r, msg("v", "r"), |_| true, full),
            Admit::GatewayBusy
        );
        let gone = inbox.feed(|_, _| true, |_| Offer::Gone);
        assert_eq!(
            gone,
            [Orphan {
                user_id: "u".into(),
                thread_id: None,
                run_id: "r".into()
            }]
        );
        assert_eq!(inbox.held(), (0, 0));
    }
}
