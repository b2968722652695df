//! Conformance builds only (`--features conformance`): the echo session behind
//! `GET /conformance/echo`, which the Autobahn|Testsuite run drives
//! (tools/autobahn.sh, docs/CONFORMANCE.md).
//!
//! The upgrade passes every production check first (draining, upgrade headers, origin,
//! JWT from header, subprotocol or `?token=`, `user_id`), and the session is an ordinary
//! [`Phase::Open`] connection with the gateway's own tungstenite `WebSocketConfig`
//! (`max_message_bytes` as message and frame limit), output queue, `max_pending_bytes`
//! slow-consumer rule, heartbeat, token expiry and close path. What differs: it is not
//! registered with its user (it receives no events and is outside the per-user limit;
//! it still counts against `max_connections`), it gets no `connected` frame, and every
//! text or binary message (fragments reassembled by tungstenite) goes straight back,
//! text as text, binary as binary.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tungstenite::protocol::{Role, WebSocketContext};
use tungstenite::Message;

use super::{classify_ws_error, live, Reactor, Timer};
use crate::auth::Claims;
use crate::conn::{ConnId, Phase, Session, Wire};
use crate::event::now_ms;
use crate::http::{self, Mode, Refusal};

/// Messages echoed per connection per iteration before serving others (as `read_ws`).
const ECHO_BUDGET: usize = 64;

impl Reactor {
    /// Open the echo session for an upgrade that passed every production check.
    pub(super) fn open_echo(
        &mut self,
        id: ConnId,
        up: http::Upgrade,
        claims: Claims,
        leftover: Vec<u8>,
    ) {
        if self.open_sessions >= self.s.config.max_connections {
            return self.refuse(id, &Refusal::too_many("gateway connection limit reached"));
        }
        let now = self.tick();
        let token_at = now.saturating_add(claims.exp.saturating_mul(1000).saturating_sub(now_ms()));
        let heartbeat_at = now + self.s.config.heartbeat_interval_ms;
        let ws_config = self.s.ws_config;
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        if let Some(t) = conn.timer.take() {
            self.wheel.cancel(t);
        }
        conn.timer = Some(
            self.wheel
                .insert(heartbeat_at.min(token_at), Timer::Phase(id)),
        );
        conn.out.push(Bytes::from(http::upgrade_response(
            &up.accept_key,
            up.subprotocol,
        )));
        conn.last_rx = now;
        conn.phase = Phase::Open(Box::new(Session {
            ws: WebSocketContext::from_partially_read(leftover, Role::Server, Some(ws_config)),
            user: Arc::from(claims.sub.as_str()),
            mode: Mode::Echo,
            thread: None,
            token_exp: claims.exp,
            token_deadline: token_at,
            next_ping: heartbeat_at,
            bad_in_row: 0,
            opened: Instant::now(),
            replay_next: None,
        }));
        self.open_sessions += 1;
        self.stats.connections_opened += 1;
        log::info!(
            "conn={} user={:?} open mode=echo",
            id.public_id(),
            claims.sub
        );
        self.mark_dirty(id);
        // Frames pipelined behind the upgrade request are already buffered: read them.
        self.read_echo(id);
    }

    /// Read what the client sent and queue each message back; errors end the session
    /// through the production close path (same close codes as a normal session).
    pub(super) fn read_echo(&mut self, id: ConnId) {
        let now = self.tick();
        let max_pending = self.s.config.max_pending_bytes;
        let mut ending = None;
        let mut more = false;
        {
            let Some(conn) = live(&mut self.conns, id) else {
                return;
            };
            let Phase::Open(session) = &mut conn.phase else {
                return;
            };
            let before = conn.bytes_in;
            let mut echoed = 0;
            loop {
                let mut wire = Wire {
                    tcp: &mut conn.tcp,
                    out: &mut conn.out,
                    bytes_in: &mut conn.bytes_in,
                };
                match session.ws.read(&mut wire) {
                    Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                        if let Err(e) = session.ws.write(&mut wire, msg) {
                            ending = Some(classify_ws_error(&e));
                            break;
                        }
                        echoed += 1;
                    }
                    // Close: tungstenite queued the reply and the next read reports the
                    // end; pings are answered by tungstenite; pongs need nothing.
                    Ok(_) => {}
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
                // Fairness and the output bound: no new edge comes for what is left, so
                // the connection is read again next iteration, after its flush (which
                // closes it with 1013 if the client lets over max_pending_bytes pile up).
                if echoed >= ECHO_BUDGET || conn.out.pending() > max_pending {
                    more = true;
                    break;
                }
            }
            if conn.bytes_in > before {
                conn.last_rx = now;
            }
            self.stats.bytes_in += conn.bytes_in - before;
            let mut wire = Wire {
                tcp: &mut conn.tcp,
                out: &mut conn.out,
                bytes_in: &mut conn.bytes_in,
            };
            let _ = session.ws.flush(&mut wire);
        }
        self.mark_dirty(id);
        if let Some(reason) = ending {
            self.close(id, reason);
        } else if more {
            self.read_again.push(id);
        }
    }
}
