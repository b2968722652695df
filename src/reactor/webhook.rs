//! The reactor's side of the inbound webhook ([`crate::webhook`], PROTOCOL.md section
//! 6b): with `inbound_url` set, `user_message` and `cancel` come here from
//! `inbound.rs` instead of going to the in-process inbound channel, and the answers of
//! the sending threads come back here once per loop iteration.
//!
//! - `user_message`: the per-user pending-run bound first (`busy`, as without the
//!   webhook); then the request goes out and the run is pre-registered at once (with its
//!   thread, and its owner on an isolated connection), so the worker may publish to it
//!   even before its 2xx reaches the gateway. 2xx: `ack`. Any failure: the
//!   pre-registered run is dropped (unless an event already began it) and the client
//!   gets `no_agent` with its `ref`.
//! - `cancel`: an unknown run is `not_found` at once; a run whose cancel the endpoint
//!   already took is `cancel_requested` at once; otherwise the request goes out (one per
//!   run at a time: repeats join it). 2xx: the run is marked cancelled (the in-process
//!   run handle's flag, the `cancelled` list of publish answers) and every connection
//!   that asked gets `cancel_requested`; a failure: `no_agent`, and the run is not
//!   marked.
//! - A connection that closed while its request was out is skipped (`send` drops frames
//!   for connections that are gone).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::Value;

use super::inbound::{new_run_id, still_pending};
use super::Reactor;
use crate::conn::ConnId;
use crate::event::now_ms;
use crate::frames::{ErrorCode, ServerFrame};
use crate::ids::ThreadId;
use crate::registry::Run;
use crate::webhook::{
    ref_text, CancelSent, Failure, InboundKind, InboundRequest, Outcome, Refused, Waiting,
};

/// Period of the aggregated "inbound_url failed" log line.
const FAILURE_LOG_MS: u64 = 10_000;

impl Reactor {
    /// The `node_id` a webhook request carries: this node's under the Redis engine (as
    /// in the client's `connected` frame), none on a memory-engine node.
    fn cluster_node_id(&mut self) -> Option<String> {
        self.engine.redis().map(|_| self.node_id.to_string())
    }

    /// `user_message` with the webhook on (see the module docs). Always true: nothing
    /// here is the client's fault.
    pub(super) fn webhook_user_message(
        &mut self,
        id: ConnId,
        text: String,
        thread: Option<ThreadId>,
        reference: Value,
    ) -> bool {
        let Some(session) = self.session(id) else {
            return true;
        };
        let user = session.user.clone();
        let isolated = session.mode.is_isolated();
        let registry = &self.registry;
        let pending = self
            .inbox
            .pending(&user, |r| still_pending(registry, &user, r));
        if pending >= self.s.config.max_pending_runs_per_user {
            self.stats.user_messages_busy += 1;
            let why =
                "too many of your runs are waiting to start (max_pending_runs_per_user); try again";
            self.send_error(id, ErrorCode::Busy, why, Some(&reference));
            return true;
        }
        let node_id = self.cluster_node_id();
        let Some(webhook) = self.webhook.as_mut() else {
            return true;
        };
        let run_id = new_run_id();
        let request = InboundRequest {
            kind: InboundKind::UserMessage,
            user_id: user.to_string(),
            thread_id: thread.as_deref().map(str::to_owned),
            run_id: run_id.clone(),
            text: Some(text),
            reference: ref_text(&reference),
            connection_id: id.public_id(),
            node_id,
            ts: now_ms(),
        };
        if let Err(refused) = webhook.submit_user_message(request, id, reference.clone()) {
            self.send_error(
                id,
                ErrorCode::NoAgent,
                refused_text(refused),
                Some(&reference),
            );
            return true;
        }
        let run: Arc<str> = Arc::from(run_id.as_str());
        self.inbox.note_pending(&user, &run);
        let now = self.tick();
        self.registry.entry(&user).runs.insert(
            run,
            Run::pending(thread.map(Into::into), isolated.then_some(id), now),
        );
        true
    }

    /// `cancel` with the webhook on (see the module docs).
    pub(super) fn webhook_cancel(&mut self, id: ConnId, run_id: &str) {
        let Some(session) = self.session(id) else {
            return;
        };
        let user = session.user.clone();
        let (thread, taken) = match self.registry.get(&user).and_then(|u| u.runs.get(run_id)) {
            Some(run) => (run.thread.clone(), run.cancel_requested),
            // Under the Redis engine the run may have begun through another node: the
            // worker hears the cancel all the same (and the run is marked in Redis).
            None if self.engine.redis().is_some() => (None, false),
            None => {
                let why = "no active run with this run_id";
                return self.send_error(id, ErrorCode::NotFound, why, None);
            }
        };
        if taken {
            return self.send(id, &ServerFrame::CancelRequested { run_id });
        }
        let node_id = self.cluster_node_id();
        let Some(webhook) = self.webhook.as_mut() else {
            return;
        };
        let request = InboundRequest {
            kind: InboundKind::Cancel,
            user_id: user.to_string(),
            thread_id: thread.as_deref().map(str::to_owned),
            run_id: run_id.to_owned(),
            text: None,
            reference: None,
            connection_id: id.public_id(),
            node_id,
            ts: now_ms(),
        };
        match webhook.submit_cancel(request, id) {
            Ok(CancelSent::Sent | CancelSent::Joined) => {}
            Err(Refused::TooManyWaiters) => {
                let why = "this run's cancel is already waiting for the worker; try again";
                self.send_error(id, ErrorCode::Busy, why, None);
            }
            Err(refused) => {
                let why = format!("cancel of {run_id}: {}", refused_text(refused));
                self.send_error(id, ErrorCode::NoAgent, &why, None);
            }
        }
    }

    /// Answer the clients of every request the sending threads have finished.
    pub(super) fn webhook_answers(&mut self) {
        while let Some((waiting, outcome)) = self.webhook.as_mut().and_then(|w| w.next_answer()) {
            self.webhook_answer(waiting, outcome);
        }
    }

    /// From housekeeping: requests a sending thread never answered (see
    /// [`crate::webhook::Webhook::overdue`]) end as timeouts.
    pub(super) fn webhook_overdue(&mut self) {
        let Some(webhook) = self.webhook.as_mut() else {
            return;
        };
        for waiting in webhook.overdue(std::time::Instant::now()) {
            self.webhook_answer(waiting, Outcome::Failed(Failure::Timeout));
        }
    }

    /// Answer one request's clients.
    fn webhook_answer(&mut self, waiting: Waiting, outcome: Outcome) {
        if let Outcome::Failed(failure) = outcome {
            self.log_webhook_failure(failure);
        }
        match (waiting, outcome) {
            (
                Waiting::UserMessage {
                    conn,
                    user,
                    run_id,
                    reference,
                },
                Outcome::Delivered(_),
            ) => {
                // Under the Redis engine the run is pending cluster-wide from its ack
                // (its run_timeout from any node, a cancel through any node marked).
                if self.engine.redis().is_some() {
                    let thread = self
                        .registry
                        .get(&user)
                        .and_then(|u| u.runs.get(&*run_id))
                        .map(|r| r.thread.clone());
                    if let Some(thread) = thread {
                        self.pending_run_engine(&user, &run_id, thread);
                    }
                }
                self.send(
                    conn,
                    &ServerFrame::Ack {
                        reference: &reference,
                        run_id: &run_id,
                    },
                )
            }
            (
                Waiting::UserMessage {
                    conn,
                    user,
                    run_id,
                    reference,
                },
                Outcome::Failed(failure),
            ) => {
                // The run will not start: drop what the message pre-registered,
                // unless the worker published to it all the same.
                if let Some(u) = self.registry.get_mut(&user) {
                    if u.runs.get(&*run_id).is_some_and(|r| !r.begun) {
                        u.runs.remove(&*run_id);
                    }
                }
                let why = failure_text(failure, self.s.config.inbound_timeout_ms);
                self.send_error(conn, ErrorCode::NoAgent, &why, Some(&reference));
            }
            (
                Waiting::Cancel {
                    user,
                    run_id,
                    conns,
                },
                Outcome::Delivered(_),
            ) => {
                if let Some(run) = self
                    .registry
                    .get_mut(&user)
                    .and_then(|u| u.runs.get_mut(&*run_id))
                {
                    run.cancel_requested = true;
                    if let Some(flag) = &run.cancel {
                        flag.store(true, Ordering::Release);
                    }
                }
                // Cluster-wide: the node that publishes the run's next event learns it
                // (its run handle, the `cancelled` list of its publish answers).
                if self.engine.redis().is_some() {
                    self.mark_cancelled_engine(&user, &run_id);
                }
                for conn in conns {
                    self.send(conn, &ServerFrame::CancelRequested { run_id: &run_id });
                }
            }
            (Waiting::Cancel { run_id, conns, .. }, Outcome::Failed(failure)) => {
                let why = format!(
                    "cancel of {run_id}: {}",
                    failure_text(failure, self.s.config.inbound_timeout_ms)
                );
                for conn in conns {
                    self.send_error(conn, ErrorCode::NoAgent, &why, None);
                }
            }
        }
    }

    /// One warning per [`FAILURE_LOG_MS`] at most, with the count since the last one
    /// (a down endpoint must not flood the log; the stats count every failure).
    fn log_webhook_failure(&mut self, failure: Failure) {
        let now = self.tick();
        if let Some(n) = self.webhook_log.hit(now, FAILURE_LOG_MS) {
            let why = failure_text(failure, self.s.config.inbound_timeout_ms);
            log::warn!(
                "inbound webhook: {why}; {n} failed request(s) since the last line \
                 (clients got no_agent)"
            );
        }
    }
}

/// The `no_agent` message of a request that was never sent.
fn refused_text(refused: Refused) -> &'static str {
    match refused {
        Refused::Full => {
            "no agent: too many messages are waiting for the worker endpoint (inbound_max_in_flight); try again"
        }
        Refused::Stopped | Refused::TooManyWaiters => "no agent: the worker endpoint is not available",
    }
}

/// The `no_agent` message of a failed request (never the URL: clients see it).
fn failure_text(failure: Failure, timeout_ms: u64) -> String {
    match failure {
        Failure::Status(status) => format!("no agent: the worker endpoint answered {status}"),
        Failure::Connect => "no agent: the worker endpoint is not reachable".to_owned(),
        Failure::Timeout => {
            format!("no agent: the worker endpoint did not answer within {timeout_ms} ms")
        }
        Failure::Tls => "no agent: TLS with the worker endpoint failed".to_owned(),
        Failure::Io => "no agent: the connection to the worker endpoint failed".to_owned(),
    }
}
