//! Output: draining the workers' channel within its budget, delivering each event
//! (the registry assigns the `seq` and keeps it for replay; the shared frame is queued
//! on every connection that takes it), the one `writev` flush per connection per
//! iteration, the slow-consumer and total-output bounds, and streaming a resuming
//! session's replay as its socket drains.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::endpoints::HTTP_PENDING_LIMIT;
use super::{live, mark, Reactor};
use crate::agui::{json_payload, Source, Stream};
use crate::close::CloseReason;
use crate::conn::{ConnId, OutQueue, Phase};
use crate::emitter::Command;
use crate::engine::{Step, Ticket, EMIT_TICKET};
use crate::event::Event;
use crate::registry::{Refused, Routed};
use crate::stats::DropReason;

/// Commands drained from the channel per iteration before polling again.
pub(super) const DRAIN_BUDGET: usize = 4096;

impl Reactor {
    /// Drain the channel up to the budget; true when the budget ran out.
    pub(super) fn drain_channel(&mut self) -> bool {
        self.wake.reset();
        for _ in 0..DRAIN_BUDGET {
            match self.rx.try_recv() {
                Ok(Command::Event(ev)) => self.deliver(*ev),
                Ok(Command::Shutdown) => self.begin_shutdown(),
                Err(_) => return false,
            }
        }
        true
    }

    /// Assign the user's next seq, keep the event for replay, queue it on every
    /// connection that takes it.
    pub(super) fn deliver(&mut self, ev: Event) {
        self.deliver_as(ev, EMIT_TICKET);
    }

    /// [`Reactor::deliver`] with the ticket an engine that answers later gives back
    /// with the outcome (`engine_events.rs`).
    pub(super) fn deliver_as(&mut self, ev: Event, ticket: Ticket) {
        let now = self.tick();
        // A repeat of an accepted idempotency key (section 6a): routed only once.
        if let Some(key) = ev.idempotency_key.as_deref() {
            let ttl = self.s.config.replay_ttl_ms;
            if self.registry.key_seen(&ev.key.user_id, key, now, ttl) {
                self.stats.events_deduplicated += 1;
                return;
            }
        }
        self.stats.events_emitted += 1;
        if self.engine.redis().is_some() {
            self.track_run_flag(&ev);
        }
        let routed = match self.engine.publish(&mut self.registry, &ev, now, ticket) {
            Step::Done(routed) => routed,
            // Taken by an engine that answers later: its outcome and the frame come
            // back as engine events.
            Step::Pending => return,
        };
        let (Routed { frame, owner, run }, user) = match routed {
            Ok(routed) => routed,
            Err(refused) => {
                let (reason, what) = match refused {
                    Refused::RunEnded => {
                        (DropReason::RunEnded, "event after the run ended: dropped")
                    }
                    Refused::TooManyRuns => {
                        if let Some(flag) = &ev.refused_flag {
                            flag.store(true, Ordering::Release);
                        }
                        (DropReason::Invalid, "too many active runs: run refused")
                    }
                };
                self.stats.dropped(reason, 1);
                let key = &ev.key;
                log::debug!("user={:?} run={:?} {what}", key.user_id, key.run_id);
                return;
            }
        };
        self.stats.record_run(&run);
        self.scratch_targets.clear();
        self.scratch_targets
            .extend(user.targets(ev.key.thread_id.as_deref(), owner));
        if let Some(key) = ev.idempotency_key.as_deref() {
            self.registry.remember_key(&ev.key.user_id, key, now);
        }
        let mut delivered = 0;
        // Read back once, at the first AG-UI connection among the targets.
        let mut agui_source: Option<Option<Source>> = None;
        for i in 0..self.scratch_targets.len() {
            let Some(&target) = self.scratch_targets.get(i) else {
                break;
            };
            if let Some(conn) = live(&mut self.conns, target) {
                if let Phase::Open(session) = &mut conn.phase {
                    // A connection still catching up on its replay takes this event
                    // from the replay buffer (it was just kept there), in order.
                    if session.replay_next.is_none() {
                        match session.agui.as_deref_mut() {
                            None => conn.out.push(frame.clone()),
                            Some(stream) => {
                                let src = agui_source.get_or_insert_with(|| {
                                    json_payload(&frame).and_then(Source::parse)
                                });
                                translate(stream, src.as_ref(), &frame, &mut conn.out);
                            }
                        }
                        delivered += 1;
                    }
                    mark(&mut conn.flush_queued, &mut self.dirty, target);
                }
            }
        }
        self.stats.events_delivered += delivered;
        if delivered == 0 {
            self.stats.dropped(DropReason::NoConnection, 1);
        }
        self.routed.push(ev.emitted);
    }

    // ----------------------------------------------------------------- output

    pub(super) fn flush_dirty(&mut self) {
        // Each connection is on the list at most once (its `flush_queued` flag), so
        // there is nothing to sort or dedupe.
        let mut dirty = std::mem::take(&mut self.dirty);
        for id in dirty.drain(..) {
            if let Some(conn) = live(&mut self.conns, id) {
                conn.flush_queued = false;
                self.flush_conn(id);
            }
        }
        // Flushing can queue more (a replay's next part, a close frame): keep those
        // for the next iteration, which then polls with a zero timeout.
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
        if self.pending_total.load(Ordering::Relaxed) > self.s.config.max_pending_total_bytes {
            self.shed_pending();
        }
        if !self.routed.is_empty() {
            let now = Instant::now();
            for t in self.routed.drain(..) {
                self.stats
                    .record_latency_us(now.saturating_duration_since(t).as_micros() as u64);
            }
        }
    }

    pub(super) fn flush_conn(&mut self, id: ConnId) {
        let max_pending = self.s.config.max_pending_bytes;
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        let result = conn.io.write_out(&mut conn.out);
        let pending = conn.out.pending();
        let written = match result {
            Ok(n) => n,
            Err(e) => {
                let kind = e.kind();
                if matches!(conn.phase, Phase::Closing) {
                    self.finish(id);
                } else {
                    self.close(id, CloseReason::io(kind));
                }
                return;
            }
        };
        self.stats.bytes_out += written as u64;
        match &mut conn.phase {
            Phase::Closing => {
                // On TLS `end_output` sends `close_notify` first; false while the
                // socket does not take it (the next writable edge comes back here).
                if pending == 0 && !conn.write_shut && conn.io.end_output() {
                    conn.write_shut = true;
                    let _ = conn.io.shutdown_write();
                }
            }
            Phase::Open(session) => {
                if pending > max_pending {
                    self.close(id, CloseReason::SlowConsumer);
                } else if session.replay_next.is_some() {
                    self.pump_replay(id);
                }
            }
            Phase::Http(st) => {
                // A paused connection (output over the bound) resumes once it drains.
                if st.paused && pending < HTTP_PENDING_LIMIT {
                    st.paused = false;
                    mark(&mut st.again_queued, &mut self.http_again, id);
                }
            }
        }
    }

    /// Unsent output over all connections is over `max_pending_total_bytes`: close the
    /// connections holding the most (sessions with 1013; plain HTTP ones without a
    /// frame), dropping their unstarted output, until the total is back under. Runs only when over the budget; the running total
    /// itself costs nothing to read.
    pub(super) fn shed_pending(&mut self) {
        let limit = self.s.config.max_pending_total_bytes;
        let mut holders: Vec<(usize, ConnId)> = self
            .conns
            .iter()
            .filter(|(_, c)| !matches!(c.phase, Phase::Closing) && c.out.pending() > 0)
            .map(|(key, c)| {
                (
                    c.out.pending(),
                    ConnId {
                        key,
                        serial: c.serial,
                    },
                )
            })
            .collect();
        holders.sort_unstable_by_key(|h| std::cmp::Reverse(h.0));
        let mut closed = 0;
        for (held, id) in holders {
            if self.pending_total.load(Ordering::Relaxed) <= limit {
                break;
            }
            log::debug!(
                "conn={} holds {held} unsent bytes with the total over max_pending_total_bytes",
                id.public_id()
            );
            // A plain HTTP connection (answers it does not read) gets no close frame:
            // drop what it has not started receiving, then close it.
            if let Some(conn) = live(&mut self.conns, id) {
                if matches!(conn.phase, Phase::Http(_)) {
                    conn.out.discard_unstarted();
                }
            }
            self.close(id, CloseReason::OverBudget);
            closed += 1;
        }
        log::warn!(
            "unsent output over max_pending_total_bytes ({limit}): closed the {closed} \
             largest holders with 1013; {} bytes left",
            self.pending_total.load(Ordering::Relaxed)
        );
    }

    /// Queue the next part of a resuming connection's replay: kept events after its
    /// cursor, until half of `max_pending_bytes` is queued. Live events for the
    /// connection wait in the replay buffer meanwhile, so a client that keeps reading
    /// is never closed as slow because of its replay. If the buffer dropped events the
    /// cursor has not reached, the connection cannot continue without a gap: 1013.
    pub(super) fn pump_replay(&mut self, id: ConnId) {
        if self.engine.redis().is_some() {
            return self.pump_engine_replay(id);
        }
        let limit = (self.s.config.max_pending_bytes / 2).max(1);
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        let Phase::Open(session) = &mut conn.phase else {
            return;
        };
        let Some(next) = session.replay_next else {
            return;
        };
        let Some(user) = self.registry.get(&session.user) else {
            session.replay_next = None;
            return;
        };
        if next > user.seq {
            session.replay_next = None;
            return;
        }
        if user.replay.front().is_none_or(|first| first.seq > next) {
            self.close(id, CloseReason::SlowConsumer);
            return;
        }
        let Some(entry) = user.conns.iter().find(|c| c.id == id) else {
            return;
        };
        let mut cursor = next;
        let mut sent = 0u64;
        let mut caught_up = true;
        for kept in user.replay_after(next - 1, entry) {
            if conn.out.pending() >= limit {
                caught_up = false;
                break;
            }
            match session.agui.as_deref_mut() {
                None => conn.out.push(kept.frame.clone()),
                Some(stream) => {
                    let src = json_payload(&kept.frame).and_then(Source::parse);
                    translate(stream, src.as_ref(), &kept.frame, &mut conn.out);
                }
            }
            cursor = kept.seq + 1;
            sent += 1;
        }
        session.replay_next = if caught_up { None } else { Some(cursor) };
        self.stats.events_replayed += sent;
        if sent > 0 {
            mark(&mut conn.flush_queued, &mut self.dirty, id);
        }
    }
}

/// Queue an event's AG-UI frames on an `encoding=agui` connection (`src`: the event
/// read back from `frame`; `None` only for a frame that is not an event, which
/// cannot happen for a routed one: then nothing is queued).
pub(super) fn translate(
    stream: &mut Stream,
    src: Option<&Source>,
    frame: &[u8],
    out: &mut OutQueue,
) {
    match (src, json_payload(frame)) {
        (Some(src), Some(payload)) => stream.translate(src, payload, &mut |f| out.push(f)),
        _ => log::error!("agui: a routed frame is not an agentwire event; not sent"),
    }
}
