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

use std::sync::Arc;

use super::session::classify_ws_error;
use super::{Reactor, Step};
use crate::auth::Claims;
use crate::conn::ConnId;
use crate::http::{self, Refusal};

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
        let user = Arc::from(claims.sub.as_str());
        if !self.begin_session(id, &up, user, claims.exp, None, leftover) {
            return;
        }
        let conn_id = id.public_id();
        log::info!(
            conn = conn_id.as_str(),
            user = claims.sub.as_str(),
            mode = "echo";
            "conn={conn_id} user={:?} open mode=echo",
            claims.sub
        );
        self.mark_dirty(id);
        // Frames pipelined behind the upgrade request are already buffered: read them.
        self.read_echo(id);
    }

    /// Read what the client sent and queue each message back, text as text, binary as
    /// binary, with the production read budgets ([`Reactor::read_turn`]); errors end the
    /// session through the production close path (same close codes as a normal session).
    /// A client that does not read its echoes is closed with 1013 by the flush, like any
    /// slow consumer.
    pub(super) fn read_echo(&mut self, id: ConnId) {
        let Some((ending, more)) = self.read_turn(id, |ws, wire, msg| match ws.write(wire, msg) {
            Ok(()) => Step::Go,
            Err(e) => Step::End(classify_ws_error(&e)),
        }) else {
            return;
        };
        if let Some(reason) = ending {
            self.close(id, reason);
        } else if more {
            self.queue_read_again(id);
        }
    }
}
