//! Plain HTTP on the gateway's port, for connections that have not upgraded: reading
//! request heads (and publish bodies) within the per-connection and group bounds,
//! answering pipelined requests in turns, the GET endpoints (`/health`, `/ws/config`,
//! `/ws/stats`, `/metrics`), the publish API (`POST /api/events`, routed directly, not
//! through the workers' channel), refusals and their collapsed log lines. A WebSocket
//! upgrade leaves here for [`super::session`].

use std::io::{self, Read};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use super::{live, mark, Reactor, RATE_LOG_MS, REFUSAL_LOG_WINDOW_MS};
use crate::close::CloseReason;
use crate::conn::{ConnId, Phase};
use crate::event::Event;
use crate::frames::{self, Accepted, ErrorBody, ErrorCode, Health, HealthStatus};
use crate::http::{self, Method, Port, Refusal, Route};
use crate::publish;
use crate::stats::{DropReason, Gauges, MemoryGauges, RefusalReason};

/// Size of one read from a plain HTTP connection.
pub(super) const READ_CHUNK: usize = 16 * 1024;
/// Unsent output past which a connection that has not upgraded is neither read nor
/// answered until the client reads (issue 9 F1: a client that pipelines requests and
/// never reads their answers costs at most this much output, plus one answer).
pub(super) const HTTP_PENDING_LIMIT: usize = 64 * 1024;
/// Most pipelined requests answered per connection per loop iteration; the rest wait
/// for the next iteration, so one connection cannot hold the loop.
pub(super) const HTTP_REQUESTS_PER_TURN: usize = 16;
/// Most requests answered on one keep-alive connection; the last answer carries
/// `Connection: close`.
pub(super) const HTTP_REQUESTS_PER_CONN: u32 = 1000;
/// Most bytes read from one connection that has not upgraded per loop iteration.
pub(super) const HTTP_READ_BUDGET: usize = 64 * 1024;
/// A buffer this much larger than what it holds is given back after a turn.
pub(super) const HTTP_BUF_KEEP: usize = 4 * 1024;
/// How long after an accept failure `/health` says `degraded`.
pub(super) const DEGRADED_MS: u64 = 10_000;

/// What one pass over a connection's buffered requests ended on.
pub(super) enum HttpTurn {
    /// Waiting for more bytes from the client.
    Wait,
    /// Output over [`HTTP_PENDING_LIMIT`]: paused until it drains.
    Paused,
    /// [`HTTP_REQUESTS_PER_TURN`] answered: more next iteration.
    Budget,
    /// The connection left the HTTP phase (upgraded, closed or refused).
    Done,
}

impl HttpTurn {
    /// Whether the connection gets another turn in the next iteration: it stopped on
    /// the request budget, or on the read budget or a full buffer (`stopped_early`)
    /// with no complete request left. No new edge comes for bytes already in the
    /// kernel, so without this they would wait for the client's next write.
    fn again(&self, stopped_early: bool) -> bool {
        match self {
            HttpTurn::Budget => true,
            HttpTurn::Wait => stopped_early,
            HttpTurn::Paused | HttpTurn::Done => false,
        }
    }
}

impl Reactor {
    /// One turn of a connection that has not upgraded: read what its budget allows, then
    /// answer the complete requests ([`Reactor::process_http`]). Reading stops while
    /// the unsent output is over [`HTTP_PENDING_LIMIT`] (the flush resumes it), past
    /// [`HTTP_READ_BUDGET`] bytes (the next iteration resumes it), and once the buffer
    /// holds a whole head limit, or the whole of an authorized publish request.
    pub(super) fn read_http(&mut self, id: ConnId) {
        let now = self.tick();
        let mut chunk = [0u8; READ_CHUNK];
        let mut eof = false;
        let mut err = None;
        let mut stopped_early = false;
        {
            let Some(conn) = live(&mut self.conns, id) else {
                return;
            };
            let pending = conn.out.pending();
            let Phase::Http(st) = &mut conn.phase else {
                return;
            };
            st.again_queued = false;
            let before = st.buf.len();
            if st.eof {
                eof = true;
            } else if pending >= HTTP_PENDING_LIMIT {
                st.paused = true;
            } else {
                let mut budget = HTTP_READ_BUDGET;
                loop {
                    let cap = st.need.max(http::MAX_HEAD_BYTES) + st.start;
                    if st.buf.len() >= cap || budget == 0 {
                        stopped_early = true;
                        break;
                    }
                    let room = (cap - st.buf.len()).min(READ_CHUNK).min(budget);
                    match conn.io.read(chunk.get_mut(..room).unwrap_or_default()) {
                        Ok(0) => {
                            eof = true;
                            st.eof = true;
                            break;
                        }
                        Ok(n) => {
                            budget -= n;
                            conn.bytes_in += n as u64;
                            self.stats.bytes_in += n as u64;
                            conn.last_rx = now;
                            st.buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            err = Some(e.kind());
                            break;
                        }
                    }
                }
            }
            self.http_buffered += st.buf.len() - before;
            if conn.io.take_handshake_done() {
                self.stats.tls_handshakes += 1;
                log::debug!(
                    "conn={} TLS handshake done: {}",
                    id.public_id(),
                    conn.io.tls_summary().unwrap_or_default()
                );
            }
        }
        if let Some(kind) = err {
            self.close(id, CloseReason::io(kind));
            return;
        }
        if self.http_buffered > self.s.config.max_http_buffer_total_bytes {
            self.shed_http_buffers();
        }
        let turn = self.process_http(id);
        if eof && matches!(turn, HttpTurn::Wait) {
            // Half-closed client: every complete request is answered; finish.
            if matches!(self.conn_mut(id).map(|c| &c.phase), Some(Phase::Http(_))) {
                self.close(id, CloseReason::ClientClosed);
            }
            return;
        }
        // (A half-closed client with requests left is resumed like any other.)
        if turn.again(stopped_early) {
            if let Some(conn) = live(&mut self.conns, id) {
                if let Phase::Http(st) = &mut conn.phase {
                    mark(&mut st.again_queued, &mut self.http_again, id);
                }
            }
        }
    }

    /// Over `max_http_buffer_total_bytes`: close not-upgraded connections that hold
    /// request bytes, oldest first, until the total is within the budget again.
    pub(super) fn shed_http_buffers(&mut self) {
        let limit = self.s.config.max_http_buffer_total_bytes;
        let mut i = 0;
        while self.http_buffered > limit {
            let Some(&id) = self.http_order.get(i) else {
                break;
            };
            i += 1;
            let holds = self.conns.get(id.key).is_some_and(|c| {
                c.serial == id.serial && matches!(&c.phase, Phase::Http(st) if !st.buf.is_empty())
            });
            if holds {
                self.evict_http(id, "max_http_buffer_total_bytes passed");
            }
        }
    }

    /// Answer the complete requests in the buffer (keep-alive, pipelining), at most
    /// [`HTTP_REQUESTS_PER_TURN`] of them and only while the unsent output is under
    /// [`HTTP_PENDING_LIMIT`]. An offset walks the buffer; the answered prefix is dropped
    /// once at the end of the turn.
    pub(super) fn process_http(&mut self, id: ConnId) -> HttpTurn {
        let max_publish = self.s.config.max_publish_bytes;
        let mut answered = 0;
        let turn = loop {
            let Some(conn) = live(&mut self.conns, id) else {
                return HttpTurn::Done;
            };
            let pending = conn.out.pending();
            let Phase::Http(st) = &mut conn.phase else {
                return HttpTurn::Done;
            };
            if pending >= HTTP_PENDING_LIMIT {
                st.paused = true;
                break HttpTurn::Paused;
            }
            if answered == HTTP_REQUESTS_PER_TURN {
                break HttpTurn::Budget;
            }
            if st.engine_wait {
                // A publish waits for the engine: answers go out in request order.
                break HttpTurn::Wait;
            }
            let unread = st.buf.get(st.start..).unwrap_or_default();
            let (req, head_len) = match http::parse_head(unread) {
                Ok(None) => break HttpTurn::Wait,
                Ok(Some(done)) => done,
                Err(refusal) => {
                    self.refuse(id, &refusal);
                    return HttpTurn::Done;
                }
            };
            answered += 1;
            // The last request a connection may make is answered with `Connection: close`.
            let last = st.served + 1 >= HTTP_REQUESTS_PER_CONN;
            let port = match (self.admin_listener.is_some(), conn.admin) {
                (false, _) => Port::Shared,
                (true, false) => Port::Client,
                (true, true) => Port::Admin,
            };
            match Route::of(req.method, &req.path).on_port(&req.path, port) {
                Route::WebSocket(path_mode) => {
                    let leftover = unread.get(head_len..).unwrap_or_default().to_vec();
                    self.http_buffered = self
                        .http_buffered
                        .saturating_sub(st.buf.len().saturating_sub(st.start));
                    st.buf = Vec::new();
                    st.start = 0;
                    self.upgrade(id, &req, path_mode, leftover);
                    return HttpTurn::Done;
                }
                route @ (Route::Publish | Route::DevToken | Route::Disconnect) => {
                    // Everything that needs no body is decided on the head, before a
                    // byte of the body is buffered: disabled, key, length.
                    let dev_token = route == Route::DevToken;
                    if dev_token && !self.s.demo.dev_tokens_on() {
                        self.refuse(id, &Refusal::not_found());
                        return HttpTurn::Done;
                    }
                    if !dev_token && self.s.config.publish_key.is_none() {
                        self.refuse(id, &Refusal::publish_disabled());
                        return HttpTurn::Done;
                    }
                    if !dev_token && !self.publish_key_ok(&req) {
                        self.publish_auth_failed(id);
                        return HttpTurn::Done;
                    }
                    let max_body = match route {
                        Route::DevToken => crate::demo_page::MAX_DEV_TOKEN_BODY_BYTES,
                        Route::Disconnect => super::revoke::MAX_DISCONNECT_BODY_BYTES,
                        _ => max_publish,
                    };
                    // A disconnect needs no body: none announced is an empty one.
                    let no_body =
                        route == Route::Disconnect && req.content_length.is_none() && !req.chunked;
                    let length = if no_body {
                        Ok(0)
                    } else {
                        http::body_length(&req, max_body)
                    };
                    let len = match length {
                        Ok(len) => len,
                        // Too large: answered, not counted as a refused connection.
                        Err(r) if r.status == 413 => {
                            self.respond_raw(id, r.to_response(), true);
                            return HttpTurn::Done;
                        }
                        Err(r) => {
                            self.refuse(id, &r);
                            return HttpTurn::Done;
                        }
                    };
                    let Some(conn) = live(&mut self.conns, id) else {
                        return HttpTurn::Done;
                    };
                    let Phase::Http(st) = &mut conn.phase else {
                        return HttpTurn::Done;
                    };
                    let unread = st.buf.get(st.start..).unwrap_or_default();
                    if unread.len() < head_len + len {
                        st.need = head_len + len;
                        break HttpTurn::Wait; // wait for the rest of the body
                    }
                    let body: Vec<u8> = unread
                        .get(head_len..head_len + len)
                        .unwrap_or_default()
                        .to_vec();
                    st.start += head_len + len;
                    self.http_buffered = self.http_buffered.saturating_sub(head_len + len);
                    st.need = 0;
                    st.served += 1;
                    let keep = http::keep_alive(&req) && !last;
                    let answered = match route {
                        Route::DevToken => {
                            self.stats.http_requests += 1;
                            Some(self.s.demo.dev_token(&body))
                        }
                        Route::Disconnect => Some(self.disconnect(&req.path, &body)),
                        _ => self.publish(&body, id, keep),
                    };
                    // None: the engine answers later (engine_events.rs).
                    let Some((status, answer)) = answered else {
                        break HttpTurn::Wait;
                    };
                    let resp = http::json_response(status, &answer, !keep, false, &[]);
                    self.respond_raw(id, resp, !keep);
                    if !keep {
                        return HttpTurn::Done;
                    }
                }
                other => {
                    st.start += head_len;
                    self.http_buffered = self.http_buffered.saturating_sub(head_len);
                    st.served += 1;
                    if req.content_length.unwrap_or(0) > 0 || req.chunked {
                        // Bodies on GET are not read: answer, then close.
                        self.answer_get(id, other, &req, true);
                        return HttpTurn::Done;
                    }
                    let keep = http::keep_alive(&req) && !last;
                    self.answer_get(id, other, &req, !keep);
                    if !keep {
                        return HttpTurn::Done;
                    }
                }
            }
            // Keep-alive: the idle deadline restarts after each answered request.
            self.rearm_phase(id, self.s.config.handshake_timeout_ms);
        };
        self.compact_http(id);
        turn
    }

    /// Drop the answered prefix of a connection's request buffer (once per turn) and
    /// give back a buffer much larger than what it still holds.
    pub(super) fn compact_http(&mut self, id: ConnId) {
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        let Phase::Http(st) = &mut conn.phase else {
            return;
        };
        // (`http_buffered` already went down as `start` moved.)
        let answered = st.start.min(st.buf.len());
        if answered > 0 {
            st.buf.drain(..answered);
            st.start = 0;
        }
        if st.buf.capacity() > st.buf.len().max(st.need) + HTTP_BUF_KEEP {
            if st.buf.is_empty() {
                st.buf = Vec::new();
            } else {
                st.buf.shrink_to(st.buf.len().max(st.need));
            }
        }
    }

    /// The publish key check, on the request head.
    pub(super) fn publish_key_ok(&self, req: &http::Request) -> bool {
        match (&self.s.config.publish_key, req.bearer()) {
            (Some(key), Ok(Some(given))) => publish::key_matches(given, key),
            _ => false,
        }
    }

    /// A publish request with a missing or wrong key: 401 and close (issue 9 F11), one
    /// counter, and at most one log line per [`RATE_LOG_MS`] with the count since the
    /// last one (never the key).
    pub(super) fn publish_auth_failed(&mut self, id: ConnId) {
        self.stats.http_requests += 1;
        self.stats.publish_auth_failures += 1;
        if let Some(n) = self.publish_auth_log.hit(self.tick(), RATE_LOG_MS) {
            log::warn!(
                "conn={} publish API: missing or wrong publish key; {n} such request(s) \
                 since the last line ({} in all)",
                id.public_id(),
                self.stats.publish_auth_failures
            );
        }
        let body = ErrorBody::new(ErrorCode::InvalidKey, "missing or wrong publish key");
        self.respond_json(id, 401, &body, true, false);
    }

    pub(super) fn answer_get(
        &mut self,
        id: ConnId,
        route: Route,
        req: &http::Request,
        close: bool,
    ) {
        self.stats.http_requests += 1;
        let head_only = req.method == Method::Head;
        match route {
            Route::Health => {
                let engine_down = !self.waits.up;
                let status = if self.draining || engine_down {
                    503
                } else {
                    200
                };
                // Degraded (still 200: it serves) while accepts fail at the descriptor
                // limit, with the reason.
                let degraded = !self.draining && self.accept_degraded();
                let epoch = Arc::clone(&self.epoch);
                let body = Health {
                    status: if self.draining {
                        HealthStatus::Draining
                    } else if degraded || engine_down {
                        HealthStatus::Degraded
                    } else {
                        HealthStatus::Healthy
                    },
                    version: env!("CARGO_PKG_VERSION"),
                    uptime_s: self.start.elapsed().as_secs(),
                    connections: self.open_sessions,
                    epoch: &epoch,
                    accept_failures: self.stats.accept_failures,
                    reason: if engine_down {
                        Some("the engine (Redis) is unavailable: publishing answers 503")
                    } else {
                        degraded.then_some(
                            "accept failed within the last 10 s: file descriptor limit \
                             reached (see ulimit -n)",
                        )
                    },
                };
                self.respond_json(id, status, &body, close, head_only);
            }
            Route::Config => {
                let body = self.s.config_json.clone();
                let resp = http::json_response(200, &body, close, head_only, &[]);
                self.respond_raw(id, resp, close);
            }
            Route::Stats => {
                let mut body = self.stats.to_json(&self.gauges());
                if let (Some(engine), Some(obj)) = (self.engine_stats(), body.as_object_mut()) {
                    obj.insert("engine".into(), engine);
                }
                self.respond_json(id, 200, &body, close, head_only);
            }
            Route::Metrics => {
                let mut text = self.stats.to_prometheus(&self.gauges());
                text.push_str(&self.engine_metrics());
                let resp = http::text_response(
                    200,
                    http::PROMETHEUS_CONTENT_TYPE,
                    text.as_bytes(),
                    close,
                    head_only,
                );
                self.respond_raw(id, resp, close);
            }
            Route::MethodNotAllowed => {
                let resp = http::method_not_allowed_response(&req.path, head_only);
                self.respond_raw(id, resp, true);
            }
            Route::Demo(asset) => match self.s.demo.asset(asset, close, head_only) {
                Some(resp) => self.respond_raw(id, resp, close),
                None => self.refuse(id, &Refusal::not_found()),
            },
            Route::NotFound
            | Route::Publish
            | Route::DevToken
            | Route::Disconnect
            | Route::WebSocket(_) => {
                self.refuse(id, &Refusal::not_found());
            }
        }
    }

    pub(super) fn gauges(&self) -> Gauges {
        let replaying: Vec<(&str, u64)> = self
            .conns
            .iter()
            .filter_map(|(_, c)| match &c.phase {
                Phase::Open(s) => s.replay_next.map(|n| (&*s.user, n)),
                _ => None,
            })
            .collect();
        Gauges {
            connections_open: self.open_sessions,
            users_online: self.registry.online(),
            users_known: self.registry.len(),
            active_runs: self.registry.active_runs(),
            timers: self.wheel.len(),
            pending_out_bytes: self.pending_total.load(Ordering::Relaxed),
            pending_total_limit: self.s.config.max_pending_total_bytes,
            send_buffer_limit: self.s.config.socket_send_buffer_bytes,
            send_buffer_effective: self.send_buffer_effective,
            log_lines_dropped: crate::log_sink::dropped_lines(),
            replaying: replaying.len(),
            replay_backlog_bytes: replaying
                .iter()
                .filter_map(|(user, next)| {
                    let kept = &self.registry.get(user)?.replay;
                    Some(
                        kept.iter()
                            .filter(|r| r.seq >= *next)
                            .map(|r| r.frame.len())
                            .sum::<usize>(),
                    )
                })
                .sum(),
            uptime_s: self.start.elapsed().as_secs(),
            http_open: self.http_open,
            http_buffered_bytes: self.http_buffered,
            http_open_limit: self.s.config.max_http_connections,
            http_buffer_limit: self.s.config.max_http_buffer_total_bytes,
            accept_degraded: self.accept_degraded(),
            inbound_held: self.inbox.held().0,
            inbound_held_bytes: self.inbox.held().1,
            inbound_held_limit: self.inbox.held_limit(),
            revoked_users: self.revocations.len(),
            revoked_users_limit: self.s.config.max_revoked_users,
            memory: self.memory_gauges(),
            webhook: self.webhook.as_ref().map(|w| w.counts()),
        }
    }

    pub(super) fn memory_gauges(&self) -> MemoryGauges {
        let r = &self.registry;
        let (events, bytes) = r.kept();
        let (keys, key_bytes) = r.keys_kept();
        MemoryGauges {
            idempotency_keys: keys,
            idempotency_key_bytes: key_bytes,
            idempotency_keys_dropped: r.counters.keys_dropped,
            replay_memory_used: r.memory_used(),
            replay_memory_limit: r.limits().replay_memory_bytes,
            active_runs_limit: r.limits().max_active_runs,
            replay_events: events,
            replay_bytes: bytes,
            replay_evicted: r.counters.replay_evicted,
            users_forgotten: r.counters.users_forgotten,
            runs_refused: r.counters.runs_refused,
        }
    }

    /// True when an accept failed within the last [`DEGRADED_MS`].
    pub(super) fn accept_degraded(&self) -> bool {
        self.last_accept_failure
            .is_some_and(|t| self.tick() < t + DEGRADED_MS)
    }

    pub(super) fn respond_json(
        &mut self,
        id: ConnId,
        status: u16,
        body: &impl Serialize,
        close: bool,
        head_only: bool,
    ) {
        let bytes = frames::to_json(body);
        let resp = http::json_response(status, &bytes, close, head_only, &[]);
        self.respond_raw(id, resp, close);
    }

    pub(super) fn respond_raw(&mut self, id: ConnId, resp: Vec<u8>, close: bool) {
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        conn.out.push(Bytes::from(resp));
        self.mark_dirty(id);
        if close {
            self.close(id, CloseReason::HttpDone);
        }
    }

    /// Answer a refusal (status + JSON body) and close.
    pub(super) fn refuse(&mut self, id: ConnId, refusal: &Refusal) {
        self.stats
            .refused(RefusalReason::from_status(refusal.status));
        self.log_refusal(id, refusal);
        if let Some(conn) = self.conn_mut(id) {
            conn.out.push(Bytes::from(refusal.to_response()));
            self.mark_dirty(id);
        }
        self.close(id, CloseReason::HttpDone);
    }

    /// The refusal's log line; identical ones (status, error, reason) within
    /// [`REFUSAL_LOG_WINDOW_MS`] are counted and reported in one line when the window
    /// has passed ([`Reactor::report_repeats`]).
    pub(super) fn log_refusal(&mut self, id: ConnId, refusal: &Refusal) {
        let kind = format!(
            "status={} error={} reason={:?}",
            refusal.status, refusal.code, refusal.message
        );
        let mut ended = Vec::new();
        if self.refusal_log.admit(&kind, self.tick(), &mut ended) {
            let conn_id = id.public_id();
            log::info!(
                conn = conn_id.as_str(),
                reason:% = refusal.code;
                "conn={conn_id} refused {kind}"
            );
        }
        log_repeats(&ended);
    }

    /// Report the refusal lines left out in windows that have passed.
    pub(super) fn report_repeats(&mut self) {
        let mut ended = Vec::new();
        self.refusal_log.expired(self.tick(), &mut ended);
        log_repeats(&ended);
    }

    // ---------------------------------------------------------------- publish

    /// Route an authorized publish request's batch (the key was checked on the head)
    /// from connection `conn`: the answer's status and JSON body, or `None` when the
    /// engine answers later (Redis: 202 only once stored).
    pub(super) fn publish(
        &mut self,
        body: &[u8],
        conn: ConnId,
        keep_alive: bool,
    ) -> Option<(u16, Vec<u8>)> {
        self.stats.http_requests += 1;
        let refused = |status, error, message: &str, index| {
            let body = ErrorBody {
                error,
                message,
                index,
            };
            (status, frames::to_json(&body))
        };
        let parsed = match publish::parse_batch(body) {
            Ok(events) => events,
            Err(publish::BatchError::TooMany(n)) => {
                let why = format!("{n} events; at most {} per request", publish::MAX_BATCH);
                return Some(refused(413, ErrorCode::PayloadTooLarge, &why, None));
            }
            Err(publish::BatchError::Bad { index, message }) => {
                self.stats.dropped(DropReason::Invalid, 1);
                return Some(refused(400, ErrorCode::BadEvent, &message, Some(index)));
            }
        };
        // Repeats of accepted keys first (section 6a): acknowledged, not checked, not
        // routed. `fresh` maps each routed event to its index in the request.
        let now = self.tick();
        let ttl = self.s.config.replay_ttl_ms;
        let n = parsed.len();
        let repeats = publish::repeats(&parsed, |user, key| {
            self.registry.key_seen(user, key, now, ttl)
        });
        let cancelled = publish::cancelled(&parsed, &self.registry);
        let (fresh, index_of): (Vec<Event>, Vec<usize>) = parsed
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !repeats.get(*i).copied().unwrap_or(false))
            .map(|(i, ev)| (ev, i))
            .unzip();
        let original = |index: usize| index_of.get(index).copied().unwrap_or(index);
        match publish::check_runs(&fresh, &self.registry) {
            Ok(()) => {}
            Err(publish::RunRefusal::Ended { index, run }) => {
                let index = original(index);
                self.stats.dropped(DropReason::RunEnded, 1);
                let why = format!("run {run:?} already ended");
                return Some(refused(400, ErrorCode::BadEvent, &why, Some(index)));
            }
            Err(publish::RunRefusal::TooMany { index, run }) => {
                let index = original(index);
                self.registry.counters.runs_refused += 1;
                let limits = self.registry.limits();
                let why = format!(
                    "run {run:?} refused: at most {} runs in progress per user \
                     (max_active_runs_per_user) and {} in all (max_active_runs)",
                    limits.max_active_runs_per_user, limits.max_active_runs
                );
                return Some(refused(429, ErrorCode::TooManyRuns, &why, Some(index)));
            }
        }
        self.stats.events_deduplicated += (n - fresh.len()) as u64;
        if self.engine.redis().is_some() && !fresh.is_empty() {
            self.stats.events_published += fresh.len() as u64;
            self.publish_engine(conn, keep_alive, fresh, &index_of, n, cancelled);
            return None;
        }
        for ev in fresh {
            self.stats.events_published += 1;
            self.deliver(ev);
        }
        let body = Accepted {
            accepted: n,
            cancelled,
        };
        Some((202, frames::to_json(&body)))
    }
}

/// One line per kind of refusal left out of the log by [`crate::log_sink::Repeats`].
pub(super) fn log_repeats(ended: &[(String, u64)]) {
    for (kind, n) in ended {
        log::info!(
            "refused {n} more times within {REFUSAL_LOG_WINDOW_MS} ms (lines collapsed): {kind}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::HttpTurn;

    #[test]
    fn another_turn_only_when_something_is_left_to_do() {
        assert!(HttpTurn::Budget.again(false));
        assert!(HttpTurn::Budget.again(true));
        assert!(HttpTurn::Wait.again(true));
        assert!(!HttpTurn::Wait.again(false));
        assert!(!HttpTurn::Paused.again(true));
        assert!(!HttpTurn::Done.again(true));
    }
}
