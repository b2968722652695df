//! The inbound webhook (PROTOCOL.md section 6b): with `inbound_url` set, every
//! `user_message` and `cancel` a client sends is POSTed to the workers' HTTP endpoint,
//! and the client's `ack` / `cancel_requested` waits for its 2xx; a failure or no answer
//! within `inbound_timeout_ms` gives the client `error` `no_agent`.
//!
//! How it fits:
//!
//! ```text
//! reactor (inbound.rs hook -> reactor/webhook.rs)
//!    │ Webhook::submit_*: a Job into a bounded channel; what to answer whom is kept
//!    ▼ in `waiting` (at most inbound_max_in_flight entries, else no_agent at once)
//! worker.rs: WORKERS threads, one ureq agent (keep-alive pool), rustls + aws-lc-rs
//!    │ Answer into the answer channel, then the loop's Waker (WakeSignal)
//!    ▼
//! reactor: Webhook::next_answer each iteration -> ack / cancel_requested / no_agent
//!          Webhook::overdue from housekeeping (a request no thread answered)
//! ```
//!
//! This module holds the reactor's side (the bound, what each request waits to answer,
//! the counters), `request` the body and `worker` the threads; the reactor's glue
//! (registering the run, answering the client) is `reactor/webhook.rs`.
//!
//! Bounds: `waiting` and the job channel hold at most `inbound_max_in_flight`
//! requests; a cancel request answers at most [`MAX_CANCEL_WAITERS`] `cancel` messages
//! (repeated cancels of one run while its request is out join it instead of sending
//! another); one user has at most `max_pending_runs_per_user` messages out (they are
//! pending runs) and one cancel per run.

mod request;
mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde_json::{json, Value};

use crate::config::Config;
use crate::conn::ConnId;
use crate::emitter::WakeSignal;

pub use request::{ref_text, InboundKind, InboundRequest};
pub use worker::{Failure, Outcome, WORKERS};

/// How long past its deadline a request may stay unanswered before the reactor gives
/// up on it by itself ([`Webhook::overdue`]): the sending threads answer a timeout at
/// the deadline; this only matters if one of them is stuck or gone.
pub const OVERDUE_GRACE: Duration = Duration::from_secs(1);

/// `cancel` messages one cancel request answers (each `cancel` of the run sent while
/// the request was out, from any of the user's connections, gets its own answer); more
/// get `busy`.
pub const MAX_CANCEL_WAITERS: usize = 32;

/// What the client(s) of a request get once it is answered.
#[derive(Debug)]
pub enum Waiting {
    /// `ack` (2xx) or `no_agent` with the message's `ref`; on failure the run that the
    /// message pre-registered is dropped.
    UserMessage {
        conn: ConnId,
        user: Arc<str>,
        run_id: Arc<str>,
        reference: Value,
    },
    /// `cancel_requested` (2xx; the run is then marked cancelled) or `no_agent`, to
    /// every connection that asked while the request was out.
    Cancel {
        user: Arc<str>,
        run_id: Arc<str>,
        conns: Vec<ConnId>,
    },
}

/// Why a request was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `inbound_max_in_flight` requests are out already.
    Full,
    /// The sending threads are gone (cannot happen while the reactor holds the channel
    /// and no thread panicked).
    Stopped,
    /// [`MAX_CANCEL_WAITERS`] `cancel` messages already wait for this run's request.
    TooManyWaiters,
}

/// What [`Webhook::submit_cancel`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum CancelSent {
    /// A request is out.
    Sent,
    /// A request for this run was already out: its answer goes to this connection too.
    Joined,
}

/// Counters (reactor thread only): rendered in `/ws/stats` and `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct WebhookCounts {
    /// Requests handed to the sending threads.
    pub sent: u64,
    /// Answered 2xx.
    pub ok: u64,
    /// Failed, by cause: non-2xx status, no connection, timeout, TLS, other I/O.
    pub status: u64,
    pub connect: u64,
    pub timeout: u64,
    pub tls: u64,
    pub io: u64,
    /// Not sent: `inbound_max_in_flight` reached (`no_agent` at once).
    pub full: u64,
    /// Requests out now, and the limit.
    pub in_flight: usize,
    pub max_in_flight: usize,
}

impl WebhookCounts {
    /// Failures by cause, with their labels (`full` included: refused before sending).
    pub fn failed(&self) -> [(&'static str, u64); 6] {
        [
            ("status", self.status),
            ("connect", self.connect),
            ("timeout", self.timeout),
            ("tls", self.tls),
            ("io", self.io),
            ("full", self.full),
        ]
    }

    /// The `webhook` object of `GET /ws/stats`.
    pub fn to_json(self) -> Value {
        let failed: serde_json::Map<String, Value> = self
            .failed()
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        json!({
            "sent": self.sent,
            "ok": self.ok,
            "failed": failed,
            "failed_total": self.failed().iter().map(|(_, v)| v).sum::<u64>(),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        })
    }
}

/// The reactor's handle on the webhook (see the module docs).
pub struct Webhook {
    jobs: Sender<worker::Job>,
    answers: Receiver<worker::Answer>,
    /// What each request out waits to answer, and its deadline.
    waiting: HashMap<u64, (Instant, Waiting)>,
    /// The request out for each (user, run) cancel.
    cancels: HashMap<(Arc<str>, Arc<str>), u64>,
    next_id: u64,
    max_in_flight: usize,
    timeout: Duration,
    counts: WebhookCounts,
}

impl Webhook {
    /// The webhook `config` asks for (`None` without `inbound_url`), its threads
    /// started. `wake` is the loop's waker, shared with the emitters.
    ///
    /// # Errors
    /// A sending thread could not be spawned.
    pub fn start(config: &Config, wake: Arc<WakeSignal>) -> std::io::Result<Option<Webhook>> {
        let Some(url) = &config.inbound_url else {
            return Ok(None);
        };
        // validate() made sure one of them is set.
        let Some(key) = config.inbound_key.as_ref().or(config.publish_key.as_ref()) else {
            return Err(std::io::Error::other("inbound_url set without a key"));
        };
        let max = config.inbound_max_in_flight;
        let timeout = Duration::from_millis(config.inbound_timeout_ms);
        let (webhook, job_rx, answer_tx) = Webhook::unstarted(max, timeout);
        worker::spawn(url, key, job_rx, answer_tx, wake)?;
        log::info!(
            "inbound webhook on: user_message and cancel go to inbound_url ({} threads, at most {max} in flight, {} ms timeout)",
            WORKERS,
            config.inbound_timeout_ms
        );
        Ok(Some(webhook))
    }

    /// A webhook with nothing in flight and its channels' thread ends: the sending
    /// threads take jobs from the `Receiver` and answer on the `Sender` (both channels
    /// bounded at `max`). [`Webhook::start`] hands them to the threads; the unit tests
    /// keep them to play the threads' part.
    fn unstarted(
        max: usize,
        timeout: Duration,
    ) -> (Webhook, Receiver<worker::Job>, Sender<worker::Answer>) {
        let (jobs, job_rx) = crossbeam_channel::bounded(max);
        let (answer_tx, answers) = crossbeam_channel::bounded(max);
        let webhook = Webhook {
            jobs,
            answers,
            waiting: HashMap::new(),
            cancels: HashMap::new(),
            next_id: 0,
            max_in_flight: max,
            timeout,
            counts: WebhookCounts {
                max_in_flight: max,
                ..WebhookCounts::default()
            },
        };
        (webhook, job_rx, answer_tx)
    }

    pub fn counts(&self) -> WebhookCounts {
        WebhookCounts {
            in_flight: self.waiting.len(),
            ..self.counts
        }
    }

    /// Send a `user_message`; its answer goes to `conn` as `ack` or `no_agent`.
    ///
    /// # Errors
    /// [`Refused::Full`] at `inbound_max_in_flight`; nothing was sent.
    pub fn submit_user_message(
        &mut self,
        request: InboundRequest,
        conn: ConnId,
        reference: Value,
    ) -> Result<(), Refused> {
        let waiting = Waiting::UserMessage {
            conn,
            user: Arc::from(request.user_id.as_str()),
            run_id: Arc::from(request.run_id.as_str()),
            reference,
        };
        self.submit(request, waiting).map(|_| ())
    }

    /// Send a `cancel` of `request.run_id`, unless one is out for that run already
    /// (then `conn` joins it).
    ///
    /// # Errors
    /// [`Refused::Full`] at `inbound_max_in_flight`, [`Refused::TooManyWaiters`].
    pub fn submit_cancel(
        &mut self,
        request: InboundRequest,
        conn: ConnId,
    ) -> Result<CancelSent, Refused> {
        let user: Arc<str> = Arc::from(request.user_id.as_str());
        let run_id: Arc<str> = Arc::from(request.run_id.as_str());
        let key = (user.clone(), run_id.clone());
        if let Some(id) = self.cancels.get(&key) {
            if let Some((_, Waiting::Cancel { conns, .. })) = self.waiting.get_mut(id) {
                if conns.len() >= MAX_CANCEL_WAITERS {
                    return Err(Refused::TooManyWaiters);
                }
                conns.push(conn);
                return Ok(CancelSent::Joined);
            }
        }
        let waiting = Waiting::Cancel {
            user,
            run_id,
            conns: vec![conn],
        };
        let id = self.submit(request, waiting)?;
        self.cancels.insert(key, id);
        Ok(CancelSent::Sent)
    }

    fn submit(&mut self, request: InboundRequest, waiting: Waiting) -> Result<u64, Refused> {
        if self.waiting.len() >= self.max_in_flight {
            self.counts.full += 1;
            return Err(Refused::Full);
        }
        self.next_id += 1;
        let id = self.next_id;
        let deadline = Instant::now() + self.timeout;
        let job = worker::Job {
            id,
            request,
            deadline,
        };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            // `waiting` bounds the channel's content; a full channel means answers were
            // not taken back yet: treat as the bound.
            Err(crossbeam_channel::TrySendError::Full(_)) => {
                self.counts.full += 1;
                return Err(Refused::Full);
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => return Err(Refused::Stopped),
        }
        self.counts.sent += 1;
        self.waiting.insert(id, (deadline, waiting));
        Ok(id)
    }

    /// The next answered request and its outcome, counted; `None` when no answer is
    /// waiting. The reactor calls it until `None` after each wake.
    pub fn next_answer(&mut self) -> Option<(Waiting, Outcome)> {
        loop {
            let answer = self.answers.try_recv().ok()?;
            // Not waiting any more: given up as overdue.
            let Some((_, waiting)) = self.waiting.remove(&answer.id) else {
                continue;
            };
            self.forget_cancel(&waiting);
            match answer.outcome {
                Outcome::Delivered(_) => self.counts.ok += 1,
                Outcome::Failed(f) => match f {
                    Failure::Status(_) => self.counts.status += 1,
                    Failure::Connect => self.counts.connect += 1,
                    Failure::Timeout => self.counts.timeout += 1,
                    Failure::Tls => self.counts.tls += 1,
                    Failure::Io => self.counts.io += 1,
                },
            }
            return Some((waiting, answer.outcome));
        }
    }

    /// Requests still unanswered [`OVERDUE_GRACE`] after their deadline (at `now`),
    /// taken out and counted as timeouts: their clients get `no_agent` even if a
    /// sending thread never answers. The reactor calls it from housekeeping.
    pub fn overdue(&mut self, now: Instant) -> Vec<Waiting> {
        let late: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, (deadline, _))| *deadline + OVERDUE_GRACE < now)
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::with_capacity(late.len());
        for id in late {
            if let Some((_, waiting)) = self.waiting.remove(&id) {
                self.forget_cancel(&waiting);
                self.counts.timeout += 1;
                out.push(waiting);
            }
        }
        out
    }

    fn forget_cancel(&mut self, waiting: &Waiting) {
        if let Waiting::Cancel { user, run_id, .. } = waiting {
            self.cancels.remove(&(user.clone(), run_id.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A webhook whose sending threads never run: requests stay out.
    fn stalled(max: usize) -> (Webhook, Receiver<worker::Job>) {
        let (w, job_rx, _answer_tx) = Webhook::unstarted(max, Duration::from_millis(100));
        (w, job_rx)
    }

    fn request(kind: InboundKind, run: &str) -> InboundRequest {
        InboundRequest {
            kind,
            user_id: "u1".into(),
            thread_id: None,
            run_id: run.into(),
            text: None,
            reference: None,
            connection_id: "c1".into(),
            node_id: None,
            ts: 0,
        }
    }

    const CONN: ConnId = ConnId { key: 1, serial: 1 };

    #[test]
    fn the_bound_refuses_past_max_in_flight() {
        let (mut w, jobs) = stalled(2);
        for run in ["r-1", "r-2"] {
            let req = request(InboundKind::UserMessage, run);
            assert_eq!(w.submit_user_message(req, CONN, Value::Null), Ok(()));
        }
        let req = request(InboundKind::UserMessage, "r-3");
        assert_eq!(
            w.submit_user_message(req, CONN, Value::Null),
            Err(Refused::Full)
        );
        let c = w.counts();
        assert_eq!((c.sent, c.full, c.in_flight), (2, 1, 2));
        assert_eq!(jobs.len(), 2, "only the two admitted went to the threads");
    }

    #[test]
    fn repeated_cancels_of_a_run_join_one_request_up_to_the_waiter_bound() {
        let (mut w, jobs) = stalled(8);
        let cancel = || request(InboundKind::Cancel, "r-1");
        assert_eq!(w.submit_cancel(cancel(), CONN), Ok(CancelSent::Sent));
        for _ in 1..MAX_CANCEL_WAITERS {
            assert_eq!(w.submit_cancel(cancel(), CONN), Ok(CancelSent::Joined));
        }
        assert_eq!(
            w.submit_cancel(cancel(), CONN),
            Err(Refused::TooManyWaiters)
        );
        assert_eq!(jobs.len(), 1, "one request for the run");
        // Another run gets its own request.
        let other = request(InboundKind::Cancel, "r-2");
        assert_eq!(w.submit_cancel(other, CONN), Ok(CancelSent::Sent));
        assert_eq!(jobs.len(), 2);
    }

    #[test]
    fn overdue_requests_are_given_up_even_without_an_answer() {
        let (mut w, _jobs) = stalled(4);
        let req = request(InboundKind::UserMessage, "r-1");
        w.submit_user_message(req, CONN, Value::from("m1")).unwrap();
        assert_eq!(
            w.submit_cancel(request(InboundKind::Cancel, "r-9"), CONN),
            Ok(CancelSent::Sent)
        );
        let now = Instant::now();
        assert!(w.overdue(now).is_empty(), "not before the deadline");
        let late =
            w.overdue(now + Duration::from_millis(100) + OVERDUE_GRACE + Duration::from_millis(50));
        assert_eq!(late.len(), 2);
        let c = w.counts();
        assert_eq!((c.timeout, c.in_flight), (2, 0));
        // The run's cancel is no longer out: the next one is a new request.
        assert_eq!(
            w.submit_cancel(request(InboundKind::Cancel, "r-9"), CONN),
            Ok(CancelSent::Sent)
        );
    }
}
