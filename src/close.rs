//! Why a connection ended ([`CloseReason`]): the close code and text sent (if any),
//! and the label under which it is counted and logged, each written once here. The reactor's one close path (`Reactor::close`) takes a `CloseReason`.

use std::io;

/// Why a connection ended: decides the close code, the log line and the counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a close frame or closed TCP.
    ClientClosed,
    /// The peer reset the connection.
    ConnectionReset,
    /// Another I/O error.
    IoError,
    /// No complete request within `handshake_timeout_ms`.
    HandshakeTimeout,
    /// A plain HTTP exchange finished (or was refused) and the socket is done.
    HttpDone,
    /// Nothing arrived for `heartbeat_timeout_ms` (1001).
    HeartbeatTimeout,
    /// Another connection of the user replaced this one (4002).
    Evicted,
    /// The token expired without a refresh (4001).
    TokenExpired,
    /// A refresh carried another user's token (4003).
    RefreshOtherUser,
    /// The gateway is shutting down (1001).
    Shutdown,
    /// A binary frame (1003).
    Binary,
    /// A message over `max_message_bytes` (1009).
    TooBig,
    /// A protocol violation (1002).
    Protocol,
    /// Invalid UTF-8 in a text message (1007).
    BadUtf8,
    /// Too many bad messages in a row (1008).
    PolicyViolation,
    /// Output over `max_pending_bytes` (1013).
    SlowConsumer,
    /// Unsent output over all connections passed `max_pending_total_bytes` and this
    /// connection held the most (1013).
    OverBudget,
    /// The user was revoked: `POST /api/users/{user_id}/disconnect` (4004).
    Revoked,
    /// The engine cannot vouch for this connection's stream (1013): Redis did not
    /// answer its open, or events of its user were lost to this node (pub/sub gap,
    /// history gone); the client resumes and gets them or `resumed:false`.
    Engine,
}

impl CloseReason {
    /// Every reason, in counter order (`Stats` indexes its close counters by
    /// discriminant).
    pub const ALL: [CloseReason; 19] = [
        CloseReason::ClientClosed,
        CloseReason::ConnectionReset,
        CloseReason::IoError,
        CloseReason::HandshakeTimeout,
        CloseReason::HttpDone,
        CloseReason::HeartbeatTimeout,
        CloseReason::Evicted,
        CloseReason::TokenExpired,
        CloseReason::RefreshOtherUser,
        CloseReason::Shutdown,
        CloseReason::Binary,
        CloseReason::TooBig,
        CloseReason::Protocol,
        CloseReason::BadUtf8,
        CloseReason::PolicyViolation,
        CloseReason::SlowConsumer,
        CloseReason::OverBudget,
        CloseReason::Revoked,
        CloseReason::Engine,
    ];

    /// The reason for an I/O error of kind `kind`.
    pub fn io(kind: io::ErrorKind) -> CloseReason {
        if kind == io::ErrorKind::ConnectionReset {
            CloseReason::ConnectionReset
        } else {
            CloseReason::IoError
        }
    }

    /// The label it is counted under (`connections.closed_by_reason` in `/ws/stats`,
    /// `agentwire_connections_closed_total{reason}` in `/metrics`) and logged with.
    pub const fn label(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::ConnectionReset => "connection_reset",
            CloseReason::IoError => "io_error",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::HttpDone => "http_done",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::Evicted => "evicted",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::RefreshOtherUser => "refresh_other_user",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Binary => "binary_frame",
            CloseReason::TooBig => "message_too_big",
            CloseReason::Protocol => "protocol_error",
            CloseReason::BadUtf8 => "invalid_utf8",
            CloseReason::PolicyViolation => "bad_messages",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::OverBudget => "pending_total_budget",
            CloseReason::Revoked => "revoked",
            CloseReason::Engine => "engine",
        }
    }

    /// The close frame to send, if any.
    pub fn close_frame(self) -> Option<(u16, &'static str)> {
        Some(match self {
            CloseReason::HeartbeatTimeout => (1001, "heartbeat timeout"),
            CloseReason::Shutdown => (1001, "going away"),
            CloseReason::Evicted => (4002, "evicted by a newer connection"),
            CloseReason::TokenExpired => (4001, "token_expired"),
            CloseReason::RefreshOtherUser => (4003, "refresh for another user"),
            CloseReason::Binary => (1003, "binary frames are not accepted"),
            CloseReason::TooBig => (1009, "message too big"),
            CloseReason::Protocol => (1002, "protocol error"),
            CloseReason::BadUtf8 => (1007, "invalid utf-8"),
            CloseReason::PolicyViolation => (1008, "too many bad messages"),
            CloseReason::SlowConsumer => (1013, "slow consumer"),
            CloseReason::OverBudget => (1013, "gateway output budget exceeded"),
            CloseReason::Revoked => (4004, "revoked"),
            CloseReason::Engine => (1013, "events missed or engine unavailable: resume"),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_in_counter_order() {
        for (i, reason) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
            let same = CloseReason::ALL
                .iter()
                .filter(|r| r.label() == reason.label());
            assert_eq!(same.count(), 1, "{}", reason.label());
        }
        let reset = CloseReason::io(io::ErrorKind::ConnectionReset);
        assert_eq!(reset.label(), "connection_reset");
        assert_eq!(
            CloseReason::io(io::ErrorKind::BrokenPipe).label(),
            "io_error"
        );
        let bad = CloseReason::PolicyViolation.close_frame();
        assert_eq!(bad, Some((1008, "too many bad messages")));
        assert_eq!(CloseReason::ClientClosed.close_frame(), None);
    }
}
