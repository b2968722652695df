//! Sessions: the upgrade (admission, per-user and gateway limits), opening a session
//! (the `connected` frame, resume from the replay buffer, the one phase timer), and
//! reading it: one read turn per iteration within the message and byte budgets and
//! the session's input allowance, and the discard reads of a closing connection. What
//! the client's messages ask for is handled in [`super::inbound`].

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tungstenite::protocol::{Role, WebSocketContext};
use tungstenite::Message;

use super::{live, mark, Reactor, Step, Timer};
use crate::agui::{Encoding, RunInProgress, Stream};
use crate::close::CloseReason;
use crate::config::PerUserPolicy;
use crate::conn::{Budgeted, ConnId, Phase, Session, Wire};
use crate::event::{control_frame, now_ms};
use crate::frames::{ActiveRun, Connected, ServerFrame};
use crate::http::{self, Refusal};
use crate::mode::Mode;
use crate::registry::{ConnEntry, Resume};

/// tungstenite read buffer per connection. It grows on demand for larger frames (a
/// frame's header reserves its length, so a larger message costs one more `read`), and
/// tungstenite zero-fills it up to this size on every read. Client messages are rare and
/// small (pongs, pings, a user message), so idle memory wins (the measurement behind
/// 64: docs/BENCHMARKS.md, "Figures behind constants in the code").
pub(crate) const READ_BUFFER_BYTES: usize = 64;
/// Most client messages (of any kind) one connection's read handles per iteration.
pub(super) const MESSAGES_PER_READ: usize = 64;
/// Most bytes one connection's read takes from its socket per iteration.
pub(super) const READ_BUDGET_BYTES: usize = 64 * 1024;
/// Input allowance of one session (not the conformance echo): a read turn costs
/// [`INPUT_US_PER_MESSAGE`] per data message (the JSON the gateway parses and acts on)
/// plus [`INPUT_US_PER_KIB`] per KiB read (control frames and fragments cost their
/// bytes), against a virtual clock that may run at most [`INPUT_BURST_US`] ahead of
/// real time; past it the session is not read (the kernel buffer fills and TCP pushes
/// back on the sender) until the allowance refills. That is about 1,000 messages and
/// 1 MiB per second sustained, 250 messages or 250 KiB in a burst: far above what a
/// client of this protocol sends, and a flood of any kind from one connection then
/// costs the loop a small share of its time (issue 9, F3).
pub(super) const INPUT_US_PER_MESSAGE: u64 = 1000;
pub(super) const INPUT_US_PER_KIB: u64 = 1000;
pub(super) const INPUT_BURST_US: u64 = 250_000;
/// Most bytes discarded from a closing connection per readable event.
pub(super) const CLOSING_DISCARD_BYTES: usize = 1024 * 1024;
/// Most runs listed in a `connected` frame's `active_runs` (the most recently
/// started); `"active_runs_truncated": true` says when there were more.
pub(super) const CONNECTED_RUNS_MAX: usize = 100;

impl Reactor {
    pub(super) fn upgrade(
        &mut self,
        id: ConnId,
        req: &http::Request,
        path_mode: Option<Mode>,
        leftover: Vec<u8>,
    ) {
        if self.draining {
            self.refuse(id, &Refusal::shutting_down());
            return;
        }
        let c = &self.s.config;
        let admitted = http::admit_upgrade(
            req,
            path_mode,
            c.allow_query_token,
            &c.allowed_origins,
            &self.auth,
        );
        let (up, claims) = match admitted {
            Ok(admitted) => admitted,
            Err(r) => return self.refuse(id, &r),
        };
        // A revoked user (`POST /api/users/{user_id}/disconnect` with `until`).
        if self.revoked_until(&claims.sub).is_some() {
            return self.refuse(id, &Refusal::unauthorized("user revoked"));
        }
        #[cfg(feature = "conformance")]
        if up.mode == Mode::Echo {
            return self.open_echo(id, up, claims, leftover);
        }
        // Limits: the per-user policy first (eviction frees a slot), then the total.
        let per_user = self.s.config.max_connections_per_user;
        let user_conns: Vec<ConnId> = self
            .registry
            .get(&claims.sub)
            .map(|u| u.conns.iter().map(|c| c.id).collect())
            .unwrap_or_default();
        if user_conns.len() >= per_user {
            match self.s.config.per_user_policy {
                PerUserPolicy::Reject => {
                    return self
                        .refuse(id, &Refusal::too_many("per-user connection limit reached"));
                }
                PerUserPolicy::EvictOldest => {
                    let excess = user_conns.len() + 1 - per_user;
                    for old in user_conns.into_iter().take(excess) {
                        self.close(old, CloseReason::Evicted);
                    }
                }
            }
        }
        if self.open_sessions >= self.s.config.max_connections {
            return self.refuse(id, &Refusal::too_many("gateway connection limit reached"));
        }
        self.open_session(id, up, claims, leftover);
    }

    pub(super) fn open_session(
        &mut self,
        id: ConnId,
        up: http::Upgrade,
        claims: crate::auth::Claims,
        leftover: Vec<u8>,
    ) {
        if self.engine.redis().is_some() {
            return self.open_session_engine(id, up, claims, leftover);
        }
        let resume_ask = up.last_seq.map(|n| (n, up.epoch.as_deref().unwrap_or("")));
        let thread: Option<Arc<str>> = up.thread_id.as_deref().map(Arc::from);
        let entry = ConnEntry {
            id,
            thread: thread.clone(),
            isolated: up.mode.is_isolated(),
        };
        let user = self.registry.entry(&claims.sub);
        let user_name = user.name.clone();
        let epoch = user.epoch.clone();
        let resume = user.resume(resume_ask);
        // A resume streams the kept events from the replay buffer as the socket drains
        // (see `pump_replay`), never more than half of max_pending_bytes queued at once.
        let replay_next = match (&resume, resume_ask) {
            (Resume::Exact, Some((after, _))) if after < user.seq => Some(after + 1),
            _ => None,
        };
        let replayed = user
            .seq
            .saturating_sub(replay_next.map_or(user.seq, |n| n - 1));
        let (runs, runs_truncated) = if entry.isolated {
            (Vec::new(), false)
        } else {
            user.active_runs(thread.as_deref(), CONNECTED_RUNS_MAX)
        };
        let active_runs = runs
            .into_iter()
            .map(|(run_id, r)| ActiveRun {
                run_id,
                thread_id: r.thread.as_deref(),
                agent_name: &r.agent_name,
                started_ts: r.started_ts,
                last_seq: r.last_seq,
                last_type: &r.last_type,
            })
            .collect();
        let connected = control_frame(&ServerFrame::Connected(Connected {
            connection_id: id.public_id(),
            user_id: &user_name,
            mode: up.mode.as_str(),
            thread_id: up.thread_id.as_deref(),
            epoch: &epoch,
            last_seq: user.seq,
            resumed: match resume {
                Resume::NotAsked => None,
                Resume::Exact => Some(true),
                Resume::Lost => Some(false),
            },
            heartbeat_interval_ms: self.s.config.heartbeat_interval_ms,
            token_exp: claims.exp,
            active_runs,
            active_runs_truncated: runs_truncated,
            node_id: None,
        }));
        // AG-UI: the state the connection's stream starts from and the frames that
        // open it (runs in progress), before any replayed or live event.
        let agui = (up.encoding == Encoding::Agui).then(|| {
            let point = replay_next.map_or(user.seq, |n| n - 1);
            let fresh = !matches!(resume, Resume::Exact);
            let max_runs = self.s.config.max_active_runs_per_user;
            let (runs, _) = if entry.isolated {
                (Vec::new(), false)
            } else {
                user.active_runs(thread.as_deref(), max_runs)
            };
            let active: Vec<RunInProgress<'_>> = runs
                .iter()
                .map(|(run_id, r)| RunInProgress {
                    run_id,
                    thread: r.thread.as_deref(),
                    started_ts: r.started_ts,
                    last_seq: r.last_seq,
                })
                .collect();
            let kept = user
                .replay_after(0, &entry)
                .take_while(|r| r.seq <= point)
                .map(|r| &r.frame[..]);
            let stream = Stream::rebuild(epoch.clone(), max_runs, kept, &active, point, fresh);
            let mut opening = Vec::new();
            stream.opening_frames(&mut |frame| opening.push(frame));
            (Box::new(stream), opening)
        });
        self.registry.add_conn(&claims.sub, entry);
        if !self.begin_session(id, &up, user_name, claims.exp, replay_next, leftover) {
            return;
        }
        if let Some(conn) = live(&mut self.conns, id) {
            conn.out.push(connected);
            if let (Some((stream, opening)), Phase::Open(session)) = (agui, &mut conn.phase) {
                for frame in opening {
                    conn.out.push(frame);
                }
                session.agui = Some(stream);
            }
        }
        let conn_id = id.public_id();
        log::info!(
            conn = conn_id.as_str(),
            user = claims.sub.as_str(),
            mode = up.mode.as_str();
            "conn={conn_id} user={:?} open mode={} resumed={} replayed={}",
            claims.sub,
            up.mode.as_str(),
            match resume {
                Resume::NotAsked => "-",
                Resume::Exact => "true",
                Resume::Lost => "false",
            },
            replayed
        );
        self.pump_replay(id);
        self.mark_dirty(id);
        // Frames pipelined behind the upgrade request are already buffered: read them.
        self.read_ws(id);
    }

    /// The part of opening a session every kind shares: the 101 answer queued, one
    /// phase timer for the earlier of the next heartbeat and the token's expiry (`exp`,
    /// seconds), the tungstenite context over the bytes read past the request head, and
    /// the open-session counters. False when the connection is gone.
    #[allow(clippy::too_many_arguments)] // the session's fields, each from its caller
    pub(super) fn begin_session(
        &mut self,
        id: ConnId,
        up: &http::Upgrade,
        user: Arc<str>,
        exp: u64,
        replay_next: Option<u64>,
        leftover: Vec<u8>,
    ) -> bool {
        self.open_sessions += 1;
        self.stats.connections_opened += 1;
        let now = self.tick();
        let token_at = now.saturating_add(token_left_ms(exp, now_ms()));
        let heartbeat_at = now + self.s.config.heartbeat_interval_ms;
        let ws_config = self.s.ws_config;
        let Some(conn) = live(&mut self.conns, id) else {
            return false;
        };
        if let Some(t) = conn.timer.take() {
            self.wheel.cancel(t);
        }
        // One timer per session: the earlier of the next heartbeat and token expiry.
        conn.timer = Some(
            self.wheel
                .insert(heartbeat_at.min(token_at), Timer::Phase(id)),
        );
        conn.out.push(Bytes::from(http::upgrade_response(
            &up.accept_key,
            up.subprotocol,
        )));
        conn.last_rx = now;
        // Leaves the HTTP phase (its buffer was emptied by `process_http`).
        self.http_open = self.http_open.saturating_sub(1);
        conn.phase = Phase::Open(Box::new(Session {
            ws: WebSocketContext::from_partially_read(leftover, Role::Server, Some(ws_config)),
            user,
            mode: up.mode,
            token_exp: exp,
            token_deadline: token_at,
            next_ping: heartbeat_at,
            bad_in_row: 0,
            read_queued: false,
            refresh_not_before: 0,
            input_clock_us: 0,
            input_paused: false,
            opened: Instant::now(),
            replay_next,
            agui: None,
            engine: crate::engine::Cursor::Live,
        }));
        true
    }

    // -------------------------------------------------------------- WebSocket

    pub(super) fn read_ws(&mut self, id: ConnId) {
        #[cfg(feature = "conformance")]
        if self.session(id).is_some_and(|s| s.mode == Mode::Echo) {
            return self.read_echo(id);
        }
        if self.input_exhausted(id) {
            return;
        }
        let bytes_before = self.conn_mut(id).map_or(0, |c| c.bytes_in);
        let mut texts = Vec::new();
        let Some((ending, more)) = self.read_turn(id, |_, _, msg| match msg {
            Message::Text(t) => {
                texts.push(t);
                Step::Go
            }
            _ => Step::End(CloseReason::Binary),
        }) else {
            return;
        };
        let messages = texts.len() as u64;
        for text in texts {
            self.stats.client_messages += 1;
            self.client_message(id, text.as_str());
            if self
                .conn_mut(id)
                .is_none_or(|c| !matches!(c.phase, Phase::Open(_)))
            {
                return;
            }
        }
        if let Some(reason) = ending {
            return self.close(id, reason);
        }
        let now_us = self.start.elapsed().as_micros() as u64;
        if let Some(conn) = self.conn_mut(id) {
            let bytes = conn.bytes_in - bytes_before;
            if let Phase::Open(s) = &mut conn.phase {
                s.input_clock_us = charge_input(s.input_clock_us, now_us, messages, bytes);
            }
        }
        if more {
            self.queue_read_again(id);
        }
    }

    /// True when session `id` used up its input allowance: it is then not read until a
    /// [`Timer::Resume`] (armed here, once) says the allowance has refilled.
    pub(super) fn input_exhausted(&mut self, id: ConnId) -> bool {
        let now_us = self.start.elapsed().as_micros() as u64;
        let tick = self.tick();
        let Some(Phase::Open(s)) = live(&mut self.conns, id).map(|c| &mut c.phase) else {
            return false;
        };
        let Some(wait_ms) = input_wait_ms(s.input_clock_us, now_us) else {
            return false;
        };
        if !s.input_paused {
            s.input_paused = true;
            self.stats.client_input_paused += 1;
            self.wheel.insert(tick + wait_ms, Timer::Resume(id));
        }
        true
    }

    /// Put open session `id` on `read_again` unless it already is: each session gets
    /// one read turn per iteration however often it is queued (issue 9, F3: queued once
    /// per edge, a flooding connection's share grew every iteration).
    pub(super) fn queue_read_again(&mut self, id: ConnId) {
        if let Some(Phase::Open(s)) = live(&mut self.conns, id).map(|c| &mut c.phase) {
            mark(&mut s.read_queued, &mut self.read_again, id);
        }
    }

    /// One turn of reading open session `id`: every complete data message (text or
    /// binary) goes to `on_data` with the session's context and wire, in order; pings
    /// are answered and pongs taken by tungstenite, a close is answered and ends the
    /// read. At most [`MESSAGES_PER_READ`] messages of any kind and
    /// [`READ_BUDGET_BYTES`] from the socket per turn, so one chatty or flooding client
    /// cannot starve the others. Queues tungstenite's replies, records the arrival
    /// (`last_rx`, bytes in) and marks the connection for flushing. Returns why the
    /// session must end (if it must) and whether a budget stopped the read before the socket was drained (no new edge will come for what is left: read it
    /// again next iteration); `None` when the connection is gone or not open.
    pub(super) fn read_turn<F>(
        &mut self,
        id: ConnId,
        mut on_data: F,
    ) -> Option<(Option<CloseReason>, bool)>
    where
        F: FnMut(&mut WebSocketContext, &mut Wire<'_>, Message) -> Step,
    {
        let now = self.tick();
        let mut ending: Option<CloseReason> = None;
        let mut handled = 0usize;
        let mut stopped_early = false;
        {
            let conn = live(&mut self.conns, id)?;
            let Phase::Open(session) = &mut conn.phase else {
                return None;
            };
            let before = conn.bytes_in;
            let mut read_left = READ_BUDGET_BYTES;
            loop {
                let mut wire = Budgeted {
                    wire: Wire {
                        io: &mut conn.io,
                        out: &mut conn.out,
                        bytes_in: &mut conn.bytes_in,
                    },
                    left: read_left,
                    exhausted: false,
                };
                let read = session.ws.read(&mut wire);
                read_left = wire.left;
                stopped_early |= wire.exhausted;
                handled += 1;
                if read.is_ok() {
                    self.read_in_iteration += 1;
                }
                match read {
                    Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                        match on_data(&mut session.ws, &mut wire.wire, msg) {
                            Step::Go => {}
                            Step::End(reason) => {
                                ending = Some(reason);
                                break;
                            }
                        }
                    }
                    Ok(Message::Close(_)) => {
                        // tungstenite queued the echo; the next read reports the end.
                        continue;
                    }
                    Ok(_) => {} // ping (answered by tungstenite), pong, raw frame
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        break
                    }
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {
                        continue
                    }
                    Err(e) => {
                        ending = Some(classify_ws_error(&e));
                        break;
                    }
                }
                if handled >= MESSAGES_PER_READ {
                    stopped_early = true;
                    break;
                }
            }
            if conn.bytes_in > before {
                conn.last_rx = now;
            }
            self.stats.bytes_in += conn.bytes_in - before;
            // Push queued pongs into the output queue.
            let mut wire = Wire {
                io: &mut conn.io,
                out: &mut conn.out,
                bytes_in: &mut conn.bytes_in,
            };
            let _ = session.ws.flush(&mut wire);
        }
        self.mark_dirty(id);
        let more = stopped_early && ending.is_none();
        Some((ending, more))
    }

    pub(super) fn read_closing(&mut self, id: ConnId) {
        let mut done = false;
        {
            let Some(conn) = self.conn_mut(id) else {
                return;
            };
            let mut sink = [0u8; 16 * 1024];
            // A peer that keeps sending to a closing connection (a pipelining flood cut
            // off by the request cap) does not hold the loop: at most this many bytes
            // per readable event (its next bytes raise a new edge; the linger timer
            // still ends the connection).
            let mut left = CLOSING_DISCARD_BYTES;
            loop {
                // Raw bytes, undecrypted: they are discarded anyway.
                match conn.io.tcp().read(&mut sink) {
                    Ok(0) => {
                        done = true;
                        break;
                    }
                    Ok(n) if n >= left => break,
                    Ok(n) => left -= n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        done = true;
                        break;
                    }
                }
            }
        }
        if done {
            self.finish(id);
        }
    }
}

pub(super) fn classify_ws_error(e: &tungstenite::Error) -> CloseReason {
    use tungstenite::error::ProtocolError;
    match e {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            CloseReason::ClientClosed
        }
        tungstenite::Error::Io(e) => CloseReason::io(e.kind()),
        tungstenite::Error::Capacity(_) => CloseReason::TooBig,
        tungstenite::Error::Utf8(_) => CloseReason::BadUtf8,
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            CloseReason::ClientClosed
        }
        tungstenite::Error::Protocol(_) => CloseReason::Protocol,
        _ => CloseReason::Protocol,
    }
}

/// The input clock of a session (µs) after a read turn of `messages` data messages and
/// `bytes` bytes at `now_us`: the clock never lags real time, and the turn's cost is
/// added to it.
fn charge_input(clock_us: u64, now_us: u64, messages: u64, bytes: u64) -> u64 {
    let cost = messages * INPUT_US_PER_MESSAGE + bytes * INPUT_US_PER_KIB / 1024;
    clock_us.max(now_us) + cost
}

/// How long (ms, at least 1) a session whose input clock is at `clock_us` waits before
/// it is read again at `now_us`; `None` while the clock is within [`INPUT_BURST_US`]
/// of real time.
fn input_wait_ms(clock_us: u64, now_us: u64) -> Option<u64> {
    let ahead = clock_us.saturating_sub(now_us);
    (ahead > INPUT_BURST_US).then(|| (ahead - INPUT_BURST_US).div_ceil(1000).max(1))
}

/// Milliseconds until a token that expires at `exp` (seconds since the Unix epoch)
/// expires, at wall clock `wall_ms`; 0 once it has.
pub(super) fn token_left_ms(exp: u64, wall_ms: u64) -> u64 {
    exp.saturating_mul(1000).saturating_sub(wall_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_allowance_allows_a_burst_then_paces_to_the_sustained_rate() {
        // A message and a KiB each cost a millisecond of the session's clock.
        assert_eq!(charge_input(0, 5_000, 1, 0), 6_000);
        assert_eq!(charge_input(0, 5_000, 0, 2048), 7_000);
        // An idle session's clock catches up with real time: no credit is saved up.
        assert_eq!(charge_input(1_000, 1_000_000, 2, 0), 1_002_000);
        // A busy one's clock runs ahead; within the burst it is read on.
        let mut clock = 0;
        for _ in 0..250 {
            clock = charge_input(clock, 0, 1, 0);
        }
        assert_eq!(input_wait_ms(clock, 0), None);
        clock = charge_input(clock, 0, 1, 0);
        assert_eq!(input_wait_ms(clock, 0), Some(1));
        assert_eq!(input_wait_ms(clock + 10_500, 0), Some(12));
        assert_eq!(input_wait_ms(clock, 1_000), None);
    }

    #[test]
    fn token_time_left_never_goes_negative() {
        assert_eq!(token_left_ms(100, 99_000), 1_000);
        assert_eq!(token_left_ms(100, 100_500), 0);
        assert_eq!(token_left_ms(u64::MAX, 0), u64::MAX);
    }

    #[test]
    fn websocket_errors_map_to_close_reasons() {
        let io = tungstenite::Error::Io(io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(matches!(
            classify_ws_error(&io),
            CloseReason::ConnectionReset
        ));
        let closed = tungstenite::Error::ConnectionClosed;
        assert!(matches!(
            classify_ws_error(&closed),
            CloseReason::ClientClosed
        ));
        let utf8 = tungstenite::Error::Utf8(String::new());
        assert!(matches!(classify_ws_error(&utf8), CloseReason::BadUtf8));
    }
}
