//! Filling a gap in what pub/sub brought this node from the user's stream (PROTOCOL.md
//! section 9: "every gap is either filled or reported").
//!
//! Pub/sub is at most once: a node's feed connection that dropped (killed, a Redis
//! output-buffer limit, a network blip) loses what was published meanwhile. The node
//! finds out from a delivery whose seq is past `fed + 1`, or, after the feed
//! reconnects, from the user's top seq ([`Raw::Top`](super::Raw::Top)) above `fed`.
//! Instead of closing the user's connections here (1013, a reconnect per client), the
//! node asks the store thread for the kept events `fed + 1 ..= to` (`fill.lua`: an
//! `XRANGE` by the `<seq>-0` ids, in the same call as the epoch check), holds the
//! user's later deliveries meanwhile (at most [`HELD_MAX`]), then hands on the filled
//! events and the held ones in seq order, as if pub/sub had brought them: every
//! per-connection rule of the reactor (skip what a connection's replay carried,
//! threads, isolation, AG-UI translation) applies to them unchanged.
//!
//! The gap is reported ([`EngineEvent::Gap`]: 1013 for the user's connections here, as
//! before) only when the fill cannot be exact: more missing than a node reads
//! ([`RedisSettings::replay_events`](super::RedisSettings) + 256, the read cap of
//! `open.lua`), events trimmed by `MAXLEN ~` or expired, the epoch changed, the read
//! failed or timed out (`redis_timeout_ms`, the store's answer `Unavailable`), more
//! than [`HELD_MAX`] deliveries held meanwhile, or the request queue full.
//!
//! One fill per user at a time (the users are bounded by the connections on this
//! node), and at most [`IN_FLIGHT_MAX`] fills asked of Redis at once: after a long
//! feed outage every user of the node may need one, and each answer holds up to
//! `replay_events` + 256 events. The others wait their turn (their deliveries held,
//! as above) in a queue of at most [`WAITING_MAX`] users; past it: a gap.

use std::collections::VecDeque;
use std::sync::Arc;

use super::store::StoreRequest;
use super::RedisEngine;
use crate::engine::{Delivered, EngineEvent};

/// Deliveries of one user held while its gap is being filled; past it: a gap (1013).
pub(crate) const HELD_MAX: usize = 4096;
/// Fills asked of Redis and not answered yet, at most.
pub(crate) const IN_FLIGHT_MAX: usize = 64;
/// Users whose fill waits for one of those, at most; past it: a gap (1013).
pub(crate) const WAITING_MAX: usize = 65_536;

/// A gap of one user being filled.
#[derive(Debug)]
pub(super) struct Fill {
    /// The request's id: an answer to an older fill (the user was released and came
    /// back, or the gap was reported meanwhile) is ignored. 0: not asked yet (waiting
    /// for room among [`IN_FLIGHT_MAX`]).
    id: u64,
    /// The last seq asked for (the first is `fed + 1`).
    to: u64,
    /// A top seq learnt meanwhile (after a feed reconnect): filled next if the held
    /// deliveries do not reach it.
    top: u64,
    /// Deliveries that came meanwhile (at most [`HELD_MAX`]).
    held: Vec<Delivered>,
}

/// The gap fills of this node: ids, the ones under way, the users waiting.
#[derive(Debug, Default)]
pub(super) struct Fills {
    /// Ids given so far.
    last_id: u64,
    /// Fills sent to the store thread and not answered yet (each request is answered
    /// once: its result or `Unavailable`).
    in_flight: usize,
    /// Users whose fill waits for room (at most [`WAITING_MAX`]; a user released or
    /// whose gap was reported meanwhile is skipped when its turn comes).
    waiting: VecDeque<Arc<str>>,
    counts: FillCounts,
}

/// What gap fills did on this node (`/ws/stats` `engine`, `/metrics`).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FillCounts {
    /// Gaps filled exactly from the stream.
    pub filled: u64,
    /// Events those fills handed on.
    pub events: u64,
    /// Fills that could not be exact (then reported as a gap: 1013).
    pub failed: u64,
}

impl RedisEngine {
    /// What gap fills did on this node so far.
    pub(crate) fn gap_fills(&self) -> FillCounts {
        self.fills.counts
    }

    /// `user`'s deliveries lost seqs `fed + 1 ..= to`: ask the stream for them, holding
    /// `held` (and later deliveries) meanwhile; `top` is a top seq to reach after.
    /// Reports the gap when the fill cannot be asked.
    pub(super) fn fill_gap(&mut self, user: Arc<str>, to: u64, held: Vec<Delivered>, top: u64) {
        let cap = self.shared.settings.replay_events as u64 + 256;
        let Some(local) = self.users.get_mut(&user) else {
            return;
        };
        let (Some(fed), Some(epoch)) = (local.fed, local.epoch.clone()) else {
            return self.report_gap(user, "no known epoch");
        };
        if to - fed > cap {
            log::warn!(
                "redis engine: user={user:?} missed seqs {}..{to}: more than a node reads \
                 from the stream ({cap}): gap",
                fed + 1
            );
            self.fills.counts.failed += 1;
            return self.report_gap(user, "too many missed");
        }
        // Debug: after a feed outage every user of the node may need one (counted in
        // /ws/stats); the fills that fail are logged as warnings.
        log::debug!(
            "redis engine: user={user:?} missed seqs {}..{to} on pub/sub: filling from the stream",
            fed + 1
        );
        local.fill = Some(Fill {
            id: 0,
            to,
            top,
            held,
        });
        if self.fills.in_flight < IN_FLIGHT_MAX {
            self.ask_fill(user, fed, epoch);
        } else if self.fills.waiting.len() < WAITING_MAX {
            self.fills.waiting.push_back(user);
        } else {
            self.fills.counts.failed += 1;
            self.report_gap(user, "too many fills waiting");
        }
    }

    /// Send `user`'s fill (`fed + 1 ..= fill.to`) to the store thread.
    fn ask_fill(&mut self, user: Arc<str>, fed: u64, epoch: Arc<str>) {
        let Some(fill) = self.users.get_mut(&user).and_then(|l| l.fill.as_mut()) else {
            return;
        };
        self.fills.last_id += 1;
        let id = self.fills.last_id;
        let req = StoreRequest::Fill {
            id,
            user: user.clone(),
            epoch,
            from: fed + 1,
            to: fill.to,
        };
        fill.id = id;
        if self.store.try_send(req).is_err() {
            self.fills.counts.failed += 1;
            return self.report_gap(user, "request queue full");
        }
        self.fills.in_flight += 1;
    }

    /// Ask the waiting fills while there is room.
    fn ask_waiting(&mut self) {
        while self.fills.in_flight < IN_FLIGHT_MAX {
            let Some(user) = self.fills.waiting.pop_front() else {
                return;
            };
            let Some(local) = self.users.get(&user) else {
                continue; // released meanwhile
            };
            let (Some(fed), Some(epoch)) = (local.fed, local.epoch.clone()) else {
                continue;
            };
            if local.fill.as_ref().is_some_and(|f| f.id == 0) {
                self.ask_fill(user, fed, epoch);
            }
        }
    }

    /// A delivery that came while `user`'s gap is being filled.
    pub(super) fn hold(&mut self, user: Arc<str>, event: Delivered) {
        let Some(fill) = self.users.get_mut(&user).and_then(|l| l.fill.as_mut()) else {
            return;
        };
        if fill.held.len() < HELD_MAX {
            fill.held.push(event);
            return;
        }
        self.fills.counts.failed += 1;
        self.report_gap(user, "too many deliveries held while filling");
    }

    /// The answer to fill `id`: hand on the filled events and the held ones in order,
    /// or report the gap when the answer is not exactly the seqs asked for.
    pub(super) fn filled(&mut self, id: u64, user: Arc<str>, entries: Option<Vec<Delivered>>) {
        self.fills.in_flight = self.fills.in_flight.saturating_sub(1);
        self.fill_answered(id, user, entries);
        self.ask_waiting();
    }

    fn fill_answered(&mut self, id: u64, user: Arc<str>, entries: Option<Vec<Delivered>>) {
        let Some(local) = self.users.get_mut(&user) else {
            return; // no connection here any more
        };
        if local.fill.as_ref().map(|f| f.id) != Some(id) {
            return; // an older fill's answer
        }
        let (Some(fill), Some(fed)) = (local.fill.take(), local.fed) else {
            return;
        };
        let want = fill.to - fed;
        let exact = entries.as_ref().is_some_and(|e| {
            e.len() as u64 == want && e.iter().zip(fed + 1..).all(|(d, seq)| d.seq == seq)
        });
        let Some(entries) = entries.filter(|_| exact) else {
            log::warn!(
                "redis engine: user={user:?}: seqs {}..{} are no longer kept (or the \
                 history changed, or Redis did not answer): gap",
                fed + 1,
                fill.to
            );
            self.fills.counts.failed += 1;
            return self.report_gap(user, "fill not exact");
        };
        local.fed = Some(fill.to);
        self.fills.counts.filled += 1;
        self.fills.counts.events += want;
        for event in entries {
            self.ready.push_back(EngineEvent::Delivery {
                user: user.clone(),
                event,
            });
        }
        let mut held = fill.held;
        held.sort_unstable_by_key(|d| d.seq);
        for event in held {
            // Duplicates dropped, the next handed on; a new gap starts a new fill
            // (which then holds the rest).
            self.feed_one(user.clone(), event);
        }
        self.reach_top(user, fill.top);
    }

    /// The user's epoch and top seq after a feed reconnect: a higher top than what was
    /// handed on is filled; another epoch is a gap. A lower top is either a delivery
    /// that overtook this answer (published after the read, it came through the feed
    /// first: common while events flow, and more so since a gap it reveals is filled
    /// rather than reported) or Redis back with an older copy of the history (it will
    /// hand out seqs this node already delivered): the top is asked once more, now that
    /// the node has seen those deliveries; below what was handed on by then, it is a gap.
    pub(super) fn top_answered(&mut self, user: Arc<str>, epoch: Option<Arc<str>>, top: u64) {
        let Some(local) = self.users.get_mut(&user) else {
            return;
        };
        let Some(fed) = local.fed else {
            return; // the first open answer is still to come: it sets `fed`
        };
        let floor = local.recheck.take();
        if epoch != local.epoch {
            return self.report_gap(user, "history changed");
        }
        if top < fed {
            match floor {
                // Redis held everything handed on when it was asked again: nothing
                // was missed (every seq up to `fed` was handed on).
                Some(floor) if top >= floor => {}
                Some(_) => return self.report_gap(user, "history behind what was handed on"),
                None => {
                    let ask = StoreRequest::Top { user: user.clone() };
                    if self.store.try_send(ask).is_err() {
                        return self.report_gap(user, "request queue full");
                    }
                    local.recheck = Some(fed);
                }
            }
            return;
        }
        self.reach_top(user, top);
    }

    /// Fill up to `top` unless the user is already there (or a fill under way will
    /// see to it afterwards).
    fn reach_top(&mut self, user: Arc<str>, top: u64) {
        let Some(local) = self.users.get_mut(&user) else {
            return;
        };
        let Some(fed) = local.fed else {
            return;
        };
        if let Some(fill) = local.fill.as_mut() {
            fill.top = fill.top.max(top);
            return;
        }
        if top > fed {
            self.fill_gap(user, top, Vec::new(), 0);
        }
    }

    /// Report a gap of `user`: its connections here resume (1013); its order starts
    /// again with the next open answer.
    pub(super) fn report_gap(&mut self, user: Arc<str>, why: &str) {
        log::debug!("redis engine: user={user:?}: gap reported ({why})");
        if let Some(local) = self.users.get_mut(&user) {
            local.fed = None;
            local.early.clear();
            local.fill = None;
        }
        self.ready.push_back(EngineEvent::Gap { user });
    }
}
