//! What clients send on an open session: `ping`, `user_message` (pending runs per
//! user, held in the [`crate::inbox::Inbox`] and fed to the workers round-robin),
//! `cancel` and `refresh`; the `error` answers and the bad-message streak that ends a
//! session with 1008. With `inbound_url` set, `user_message` and `cancel` go to the
//! webhook instead of the inbound channel (`reactor/webhook.rs`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::Value;

use super::session::token_left_ms;
use super::{live, Reactor, Timer};
use crate::client_message::{BadMessage, ClientMessage};
use crate::close::CloseReason;
use crate::conn::{ConnId, Phase, Session};
use crate::emitter::Inbound;
use crate::event::{control_frame, now_ms, Event, EventKind, RunKey};
use crate::frames::{AgentErrorData, AgentErrorReason, ErrorCode, ServerFrame};
use crate::inbox::{self, Admit};
use crate::registry::{Registry, Run};

/// Bad client messages in a row before close 1008.
pub(super) const MAX_BAD_IN_ROW: u8 = 10;
/// At most one `refresh` token check per connection per this many milliseconds; a
/// `refresh` sooner is answered `rate_limited` without a check and counts as a bad
/// message. A check costs a signature verification (the cost by key: docs/BENCHMARKS.md,
/// "Figures behind constants in the code"), so a refresh flood must not buy one per
/// message.
pub(super) const REFRESH_INTERVAL_MS: u64 = 1000;
/// How often users with nothing pending any more are forgotten by the inbox.
pub(super) const INBOX_PRUNE_MS: u64 = 10_000;
/// While `user_message`s are held for room in the workers' channel, the loop polls
/// at least this often to feed them (the channel has no readiness to wait on).
pub(super) const INBOX_RETRY_MS: u64 = 5;

impl Reactor {
    pub(super) fn send_frame(&mut self, id: ConnId, frame: Bytes) {
        if let Some(conn) = self.conn_mut(id) {
            conn.out.push(frame);
            self.mark_dirty(id);
        }
    }

    /// Queue a frame the gateway writes itself.
    pub(super) fn send(&mut self, id: ConnId, frame: &ServerFrame<'_>) {
        self.send_frame(id, control_frame(frame));
    }

    /// An `error` frame; with the `ref` of the `user_message` it answers, if any.
    pub(super) fn send_error(
        &mut self,
        id: ConnId,
        code: ErrorCode,
        message: &str,
        reference: Option<&Value>,
    ) {
        self.send(
            id,
            &ServerFrame::Error {
                code,
                message,
                reference,
            },
        );
    }

    /// A client message refused as the client's fault: `error` with `code` (and the
    /// `ref` of a `user_message`), counted toward the bad-message streak; more than
    /// [`MAX_BAD_IN_ROW`] in a row close the connection with 1008.
    pub(super) fn bad_message(
        &mut self,
        id: ConnId,
        code: ErrorCode,
        message: &str,
        reference: Option<&Value>,
    ) {
        self.stats.bad_client_messages += 1;
        let too_many = match self.conn_mut(id).map(|c| &mut c.phase) {
            Some(Phase::Open(s)) => {
                s.bad_in_row = s.bad_in_row.saturating_add(1);
                s.bad_in_row > MAX_BAD_IN_ROW
            }
            _ => return,
        };
        if too_many {
            self.close(id, CloseReason::PolicyViolation);
        } else {
            self.send_error(id, code, message, reference);
        }
    }

    /// Act on one client text message. A message that was the client's fault (not a
    /// valid message, an oversized `user_message` text, a refused or rate-limited
    /// `refresh`) counts toward the bad-message streak; any other resets it.
    pub(super) fn client_message(&mut self, id: ConnId, text: &str) {
        let msg = match ClientMessage::parse(text) {
            Ok(msg) => msg,
            Err(BadMessage(why)) => return self.bad_message(id, ErrorCode::BadMessage, why, None),
        };
        let good = match msg {
            ClientMessage::Ping => {
                self.send(id, &ServerFrame::Pong { ts: now_ms() });
                true
            }
            ClientMessage::UserMessage {
                text,
                thread_id,
                reference,
            } => self.user_message(id, text, thread_id, reference),
            ClientMessage::Cancel { run_id } => {
                self.cancel(id, &run_id);
                true
            }
            ClientMessage::Refresh { token } => self.refresh(id, &token),
        };
        if good {
            if let Some(Phase::Open(s)) = self.conn_mut(id).map(|c| &mut c.phase) {
                s.bad_in_row = 0;
            }
        }
    }

    pub(super) fn session(&self, id: ConnId) -> Option<&Session> {
        match self
            .conns
            .get(id.key)
            .filter(|c| c.serial == id.serial)
            .map(|c| &c.phase)
        {
            Some(Phase::Open(s)) => Some(s),
            _ => None,
        }
    }

    /// `user_message`: text over `max_user_message_bytes` is a bad message (`too_large`);
    /// a user with `max_pending_runs_per_user` runs acked and not yet begun gets `busy`
    /// (only that user: the bound is per user, and while the workers' channel is full
    /// messages wait in per-user queues fed round-robin, see [`crate::inbox::Inbox`]). Otherwise the
    /// run is registered as pending and acked. False when it counted as a bad message.
    pub(super) fn user_message(
        &mut self,
        id: ConnId,
        text: String,
        thread: Option<crate::ids::ThreadId>,
        reference: Value,
    ) -> bool {
        let max_text = self.s.config.max_user_message_bytes;
        if text.len() > max_text {
            let why = format!("user_message text over max_user_message_bytes ({max_text})");
            self.bad_message(id, ErrorCode::TooLarge, &why, Some(&reference));
            return false;
        }
        // With `inbound_url` the message goes to the webhook, not the inbound channel.
        if self.webhook.is_some() {
            return self.webhook_user_message(id, text, thread, reference);
        }
        let Some(session) = self.session(id) else {
            return true;
        };
        let user = session.user.clone();
        let isolated = session.mode.is_isolated();
        let run_id = new_run_id();
        let run: Arc<str> = Arc::from(run_id.as_str());
        // The Redis engine appends every user_message to the inbound stream too.
        let fields = self.engine.redis().is_some().then(|| {
            self.inbound_fields(
                "user_message",
                &user,
                thread.as_deref(),
                &run_id,
                &text,
                Some(&reference),
                id,
            )
        });
        let msg = Inbound::UserMessage {
            user_id: user.to_string(),
            thread_id: thread.as_deref().map(str::to_owned),
            text,
            run_id: run_id.clone(),
            connection_id: id.public_id(),
        };
        let registry = &self.registry;
        let inbound = &self.inbound;
        let admitted = self.inbox.admit(
            &user,
            &run,
            msg,
            |r| still_pending(registry, &user, r),
            |m| inbox::offer(inbound, m),
        );
        if let Some(fields) = fields {
            if matches!(admitted, Admit::NoAgent) && self.waits.inbound_groups {
                let thread = thread.map(Into::into);
                self.user_message_to_stream(id, user, run_id, thread, isolated, reference, fields);
                return true;
            }
            if matches!(admitted, Admit::Sent | Admit::Held) {
                if let Some(redis) = self.engine.redis() {
                    redis.append_inbound(None, fields);
                }
            }
        }
        let refused = match admitted {
            Admit::Sent | Admit::Held => None,
            Admit::NoAgent => Some((ErrorCode::NoAgent, "no agent is consuming user messages")),
            Admit::UserBusy => Some((
                ErrorCode::Busy,
                "too many of your runs are waiting to start (max_pending_runs_per_user); try again",
            )),
            Admit::GatewayBusy => Some((ErrorCode::Busy, "agent queue full; try again")),
        };
        if let Some((code, why)) = refused {
            if code == ErrorCode::Busy {
                self.stats.user_messages_busy += 1;
            }
            self.send_error(id, code, why, Some(&reference));
            return true;
        }
        let now = self.tick();
        let thread: Option<Arc<str>> = thread.map(Into::into);
        if self.engine.redis().is_some() {
            self.pending_run_engine(&user, &run_id, thread.clone());
        }
        let mut pending = Run::pending(thread, isolated.then_some(id), now);
        // The time to the run's first event counts from here (the run metrics).
        pending.asked = Some(Instant::now());
        self.registry.entry(&user).runs.insert(run, pending);
        self.send(
            id,
            &ServerFrame::Ack {
                reference: &reference,
                run_id: &run_id,
            },
        );
        true
    }

    /// Feed held `user_message`s into the workers' channel as it has room, one user at
    /// a time; runs whose message can never go out (no consumer any more) end with
    /// `agent_error {"reason":"no_agent"}`. Now and then, forget users with nothing
    /// pending.
    pub(super) fn feed_inbox(&mut self) {
        let now = self.tick();
        if now >= self.inbox_prune_at {
            self.inbox_prune_at = now + INBOX_PRUNE_MS;
            let registry = &self.registry;
            self.inbox
                .prune(|user, run| still_pending(registry, user, run));
        }
        if self.inbox.held().0 == 0 {
            return;
        }
        let registry = &self.registry;
        let inbound = &self.inbound;
        let orphans = self.inbox.feed(
            |user, run| still_pending(registry, user, run),
            |m| inbox::offer(inbound, m),
        );
        for o in orphans {
            let key = RunKey::new(&o.user_id, o.thread_id.as_deref(), &o.run_id, "");
            match key.and_then(|k| {
                Event::new(
                    k,
                    EventKind::AgentError,
                    &AgentErrorData {
                        reason: AgentErrorReason::NoAgent,
                    },
                )
            }) {
                Ok(ev) => self.deliver(ev),
                Err(e) => log::error!("synthetic no_agent event failed: {e}"),
            }
        }
    }

    /// `cancel`: flags the run (its handle sees it) and tells the workers once per run,
    /// so repeated cancels of one run cost no channel slot.
    pub(super) fn cancel(&mut self, id: ConnId, run_id: &str) {
        // With `inbound_url` the cancel goes to the webhook, not the inbound channel.
        if self.webhook.is_some() {
            return self.webhook_cancel(id, run_id);
        }
        let Some(session) = self.session(id) else {
            return;
        };
        let user = session.user.clone();
        let first = match self
            .registry
            .get_mut(&user)
            .and_then(|u| u.runs.get_mut(run_id))
        {
            Some(run) => {
                if let Some(flag) = &run.cancel {
                    flag.store(true, Ordering::Release);
                }
                !std::mem::replace(&mut run.cancel_requested, true)
            }
            // Under the Redis engine the run may be in progress or pending through
            // another node.
            None if self.engine.redis().is_some() => true,
            None => {
                let why = "no active run with this run_id";
                return self.send_error(id, ErrorCode::NotFound, why, None);
            }
        };
        if self.engine.redis().is_some() {
            // Redis knows the runs of every node: it answers whether the run is in
            // progress or pending (`cancel_requested`, the workers told once per run
            // here) or not (`not_found`), as the memory engine does.
            return self.cancel_engine(id, &user, run_id, first);
        }
        if first {
            let _ = self.inbound.try_send(Inbound::Cancel {
                user_id: user.to_string(),
                run_id: run_id.to_owned(),
            });
        }
        self.send(id, &ServerFrame::CancelRequested { run_id });
    }

    /// `refresh`: at most one token check per connection per [`REFRESH_INTERVAL_MS`]
    /// (sooner: `rate_limited`, no check); an invalid token is `invalid_token`. Both
    /// count as bad messages (they never reset the streak, so a refresh flood closes
    /// with 1008). False when it counted as a bad message.
    pub(super) fn refresh(&mut self, id: ConnId, token: &str) -> bool {
        let now = self.tick();
        let Some(Phase::Open(session)) = self.conn_mut(id).map(|c| &mut c.phase) else {
            return true;
        };
        if now < session.refresh_not_before {
            self.stats.refresh_rate_limited += 1;
            let why = "at most one refresh per second per connection; retry later";
            self.bad_message(id, ErrorCode::RateLimited, why, None);
            return false;
        }
        session.refresh_not_before = now + REFRESH_INTERVAL_MS;
        let user = session.user.clone();
        match self.auth.verify(token) {
            Err(e) => {
                self.bad_message(id, ErrorCode::InvalidToken, &e.to_string(), None);
                false
            }
            Ok(claims) if *claims.sub != *user => {
                self.close(id, CloseReason::RefreshOtherUser);
                true
            }
            Ok(claims) => {
                let at = now.saturating_add(token_left_ms(claims.exp, now_ms()));
                let Some(conn) = live(&mut self.conns, id) else {
                    return true;
                };
                if let Phase::Open(s) = &mut conn.phase {
                    s.token_exp = claims.exp;
                    s.token_deadline = at;
                }
                // A refresh normally extends the token: the phase timer then simply
                // finds the later deadline when it fires. Only an earlier one re-arms it.
                let armed = conn.timer.and_then(|t| self.wheel.deadline(t));
                if armed.is_none_or(|d| at < d) {
                    if let Some(old) = conn.timer.take() {
                        self.wheel.cancel(old);
                    }
                    conn.timer = Some(self.wheel.insert(at, Timer::Phase(id)));
                }
                self.send(id, &ServerFrame::Refreshed { exp: claims.exp });
                true
            }
        }
    }
}

/// True while `user`'s run `run_id` is registered and has not begun (a pending run of
/// a `user_message`).
pub(super) fn still_pending(registry: &Registry, user: &str, run_id: &str) -> bool {
    registry
        .get(user)
        .and_then(|u| u.runs.get(run_id))
        .is_some_and(|r| !r.begun)
}

/// A fresh run id for a `user_message`: `r-` and 16 hex digits.
pub(super) fn new_run_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        b = now_ms().to_be_bytes();
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("r-{hex}")
}
