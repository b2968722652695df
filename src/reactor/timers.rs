//! Time: the timer wheel's expiries (handshake deadline, heartbeat and token expiry,
//! linger, accept retry, input allowance resume), housekeeping (replay expiry, the run
//! watchdog), and shutdown (signals, ending runs in progress, closing sessions with
//! 1001 within the grace period).

use std::io::Read;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tungstenite::Message;

use super::session::token_left_ms;
use super::{live, mark, Reactor, Timer};
use crate::close::CloseReason;
use crate::conn::{ConnId, Phase, Wire};
use crate::event::{now_ms, Event, EventKind, RunKey};
use crate::frames::{AgentErrorData, AgentErrorReason};

/// Most idle runs the watchdog ends per pass, so runs timing out together cannot stall
/// the loop; when a pass used it all, the next pass comes [`WATCHDOG_AGAIN_MS`] later
/// instead of at the next housekeeping tick.
pub(super) const WATCHDOG_BUDGET: usize = 1000;
pub(super) const WATCHDOG_AGAIN_MS: u64 = 50;
/// Housekeeping period: replay expiry, run watchdog.
pub(super) const HOUSEKEEPING_MS: u64 = 1000;

impl Reactor {
    pub(super) fn rearm_phase(&mut self, id: ConnId, after_ms: u64) {
        let at = self.tick() + after_ms;
        let timer = self.wheel.insert(at, Timer::Phase(id));
        if let Some(conn) = live(&mut self.conns, id) {
            if let Some(old) = conn.timer.replace(timer) {
                self.wheel.cancel(old);
            }
        } else {
            self.wheel.cancel(timer);
        }
    }

    pub(super) fn on_timer(&mut self, timer: Timer) {
        match timer {
            Timer::Phase(id) => self.on_phase_timer(id),
            Timer::Resume(id) => {
                if let Some(Phase::Open(s)) = live(&mut self.conns, id).map(|c| &mut c.phase) {
                    s.input_paused = false;
                    self.read_ws(id);
                }
            }
            Timer::AcceptRetry => {
                self.accept_paused = false;
                self.accept(false);
                self.accept(true);
            }
            Timer::Housekeeping => {
                self.housekeeping();
                self.report_repeats();
                let at = self.tick() + HOUSEKEEPING_MS;
                self.wheel.insert(at, Timer::Housekeeping);
            }
            Timer::Watchdog => self.watchdog(),
            Timer::ShutdownDeadline => {
                self.drain_deadline_passed = true;
            }
        }
    }

    pub(super) fn on_phase_timer(&mut self, id: ConnId) {
        let now = self.tick();
        let interval = self.s.config.heartbeat_interval_ms;
        let timeout = self.s.config.heartbeat_timeout_ms;
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        conn.timer = None;
        let session = match &mut conn.phase {
            // A request waiting for the engine's answer (Redis engine: a publish or an
            // upgrade's open) is not cut off: the engine answers every request within a
            // few `redis_timeout_ms` (503 `engine_unavailable` at worst), and the
            // answer re-arms the deadline.
            Phase::Http(st) if st.engine_wait => {
                let wait = self.s.config.handshake_timeout_ms;
                return self.rearm_phase(id, wait);
            }
            Phase::Http(_) => return self.close(id, CloseReason::HandshakeTimeout),
            Phase::Closing => return self.finish(id),
            Phase::Open(session) => session,
        };
        if now >= session.token_deadline {
            let left_ms = token_left_ms(session.token_exp, now_ms());
            if left_ms <= 5 {
                return self.close(id, CloseReason::TokenExpired);
            }
            // The wall clock moved against the monotonic one: aim again.
            session.token_deadline = now + left_ms;
        }
        let silent = now.saturating_sub(conn.last_rx);
        if silent >= timeout {
            return self.close(id, CloseReason::HeartbeatTimeout);
        }
        // Lazy heartbeat: the timer fires once per interval whatever the traffic (a
        // frame only updates `last_rx`), so busy connections cost no timer work per frame.
        if now + 1 >= session.next_ping {
            let mut wire = Wire {
                io: &mut conn.io,
                out: &mut conn.out,
                bytes_in: &mut conn.bytes_in,
            };
            let _ = session.ws.write(&mut wire, Message::Ping(Bytes::new()));
            let _ = session.ws.flush(&mut wire);
            session.next_ping = now + interval;
            mark(&mut conn.flush_queued, &mut self.dirty, id);
        }
        let next = session
            .next_ping
            .min(conn.last_rx + timeout)
            .min(session.token_deadline)
            .max(now + 1);
        conn.timer = Some(self.wheel.insert(next, Timer::Phase(id)));
    }

    pub(super) fn housekeeping(&mut self) {
        let now = self.tick();
        self.registry.sweep(now, self.s.config.replay_ttl_ms);
        self.webhook_overdue();
        self.revocations.sweep(now_ms() / 1000);
        self.engine_watchdog();
        if !self.watchdog_armed {
            self.watchdog();
        }
    }

    /// Run watchdog: end runs with no event for run_idle_timeout_ms, at most
    /// WATCHDOG_BUDGET per pass (another pass soon when there may be more).
    pub(super) fn watchdog(&mut self) {
        let now = self.tick();
        self.watchdog_armed = false;
        let idle_cutoff = now.saturating_sub(self.s.config.run_idle_timeout_ms);
        let stale: Vec<RunKey> = self.registry.stale_runs(idle_cutoff, WATCHDOG_BUDGET);
        if stale.len() >= WATCHDOG_BUDGET {
            self.watchdog_armed = true;
            self.wheel.insert(now + WATCHDOG_AGAIN_MS, Timer::Watchdog);
        }
        if self.engine.redis().is_some() {
            // Under the Redis engine the cluster's watchdog ends runs (one node takes
            // each, `engine_watchdog`); here only this node's record of the runs its
            // `user_message`s acked is let go.
            for key in stale {
                if let Some(user) = self.registry.get_mut(&key.user_id) {
                    user.runs.remove(&key.run_id);
                }
            }
            return;
        }
        if !stale.is_empty() {
            self.stats.watchdog_passes += 1;
            self.stats.runs_timed_out += stale.len() as u64;
        }
        for key in stale {
            log::info!(
                "user={:?} run={:?} idle for run_idle_timeout_ms: ending it",
                key.user_id,
                key.run_id
            );
            match Event::new(
                key,
                EventKind::AgentError,
                &AgentErrorData {
                    reason: AgentErrorReason::RunTimeout,
                },
            ) {
                Ok(ev) => self.deliver(ev),
                Err(e) => log::error!("synthetic run_timeout event failed: {e}"),
            }
        }
    }

    // -------------------------------------------------------------- shutdown

    pub(super) fn on_signal(&mut self) {
        let mut buf = [0u8; 64];
        if let Some(s) = self.signals.as_mut() {
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
        if self.got_hup.swap(false, Ordering::Relaxed) {
            log::info!(
                "SIGHUP received: reloading JWT keys, jwt_secret, allowed_origins and the TLS \
                 certificate"
            );
            self.reload();
            self.tls_reload();
        }
        if self.got_term.swap(false, Ordering::Relaxed) {
            log::info!("signal received: draining");
            self.begin_shutdown();
        }
    }

    pub(super) fn begin_shutdown(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        let at = self.tick() + self.s.config.shutdown_grace_ms;
        self.wheel.insert(at, Timer::ShutdownDeadline);
        self.end_runs_for_shutdown();
        let open: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Open(_)))
            .map(|(key, c)| ConnId {
                key,
                serial: c.serial,
            })
            .collect();
        self.shutdown_closed = open.len();
        for id in open {
            self.close(id, CloseReason::Shutdown);
        }
    }

    /// Runs in progress end with the gateway (memory engine): each gets an
    /// `agent_error {"reason":"shutdown"}`, routed like any event, so it is queued
    /// before the 1001 close frame and its users learn why the run stopped.
    pub(super) fn end_runs_for_shutdown(&mut self) {
        if self.engine.redis().is_some() {
            // Under the Redis engine runs are the cluster's: the ones this node knows
            // are those its `user_message`s acked, pending in Redis, which workers
            // elsewhere may still begin through another node; any that never begins
            // gets its run_timeout from another node's watchdog.
            return;
        }
        let mut active: Vec<RunKey> = Vec::new();
        for (name, user) in self.registry.users() {
            for (run_id, run) in user.runs.iter() {
                active.push(RunKey {
                    user_id: name.clone(),
                    thread_id: run.thread.clone(),
                    run_id: run_id.clone(),
                    agent_name: run.agent_name.clone(),
                });
            }
        }
        if !active.is_empty() {
            log::info!("shutdown: ending {} runs in progress", active.len());
        }
        for key in active {
            match Event::new(
                key,
                EventKind::AgentError,
                &AgentErrorData {
                    reason: AgentErrorReason::Shutdown,
                },
            ) {
                Ok(ev) => self.deliver(ev),
                Err(e) => log::error!("synthetic shutdown agent_error failed: {e}"),
            }
        }
    }

    pub(super) fn open_sessions_flushed(&self) -> bool {
        self.conns.iter().all(|(_, c)| match c.phase {
            Phase::Open(_) => false,
            Phase::Closing => c.out.is_empty() && !c.io.has_unsent(),
            Phase::Http(_) => true,
        })
    }
}
