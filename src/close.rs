//! Why a connection ended ([`CloseReason`]): the close code and text sent (if any),
//! and the label ([`CloseLabel`]) under which it is counted and logged, each written
//! once here. The reactor's one close path (`Reactor::close`) takes a `CloseReason`.

use std::io;

/// Why a connection ended: decides the close code, the log line and the counter.
#[derive(Clone, Debug)]
pub enum CloseReason {
    /// The client sent a close frame or closed TCP.
    ClientClosed,
    /// The peer reset or an I/O error happened.
    Io(io::ErrorKind),
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
}

impl CloseReason {
    /// The label counted in stats and written in the close log line.
    pub fn label(&self) -> CloseLabel {
        match self {
            CloseReason::ClientClosed => CloseLabel::ClientClosed,
            CloseReason::Io(io::ErrorKind::ConnectionReset) => CloseLabel::ConnectionReset,
            CloseReason::Io(_) => CloseLabel::IoError,
            CloseReason::HandshakeTimeout => CloseLabel::HandshakeTimeout,
            CloseReason::HttpDone => CloseLabel::HttpDone,
            CloseReason::HeartbeatTimeout => CloseLabel::HeartbeatTimeout,
            CloseReason::Evicted => CloseLabel::Evicted,
            CloseReason::TokenExpired => CloseLabel::TokenExpired,
            CloseReason::RefreshOtherUser => CloseLabel::RefreshOtherUser,
            CloseReason::Shutdown => CloseLabel::Shutdown,
            CloseReason::Binary => CloseLabel::BinaryFrame,
            CloseReason::TooBig => CloseLabel::MessageTooBig,
            CloseReason::Protocol => CloseLabel::ProtocolError,
            CloseReason::BadUtf8 => CloseLabel::InvalidUtf8,
            CloseReason::PolicyViolation => CloseLabel::BadMessages,
            CloseReason::SlowConsumer => CloseLabel::SlowConsumer,
            CloseReason::OverBudget => CloseLabel::PendingTotalBudget,
        }
    }

    /// The close frame to send, if any.
    pub fn close_frame(&self) -> Option<(u16, &'static str)> {
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
            _ => return None,
        })
    }
}

/// How a closed connection is counted (`connections.closed_by_reason` in `/ws/stats`,
/// `agentwire_connections_closed_total{reason}` in `/metrics`) and logged: one label
/// per [`CloseReason`] (an I/O error: a reset or any other).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseLabel {
    ClientClosed,
    ConnectionReset,
    IoError,
    HandshakeTimeout,
    HttpDone,
    HeartbeatTimeout,
    Evicted,
    TokenExpired,
    RefreshOtherUser,
    Shutdown,
    BinaryFrame,
    MessageTooBig,
    ProtocolError,
    InvalidUtf8,
    BadMessages,
    SlowConsumer,
    PendingTotalBudget,
}

impl CloseLabel {
    /// Every label, in counter order.
    pub const ALL: [CloseLabel; 17] = [
        CloseLabel::ClientClosed,
        CloseLabel::ConnectionReset,
        CloseLabel::IoError,
        CloseLabel::HandshakeTimeout,
        CloseLabel::HttpDone,
        CloseLabel::HeartbeatTimeout,
        CloseLabel::Evicted,
        CloseLabel::TokenExpired,
        CloseLabel::RefreshOtherUser,
        CloseLabel::Shutdown,
        CloseLabel::BinaryFrame,
        CloseLabel::MessageTooBig,
        CloseLabel::ProtocolError,
        CloseLabel::InvalidUtf8,
        CloseLabel::BadMessages,
        CloseLabel::SlowConsumer,
        CloseLabel::PendingTotalBudget,
    ];

    /// The label's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            CloseLabel::ClientClosed => "client_closed",
            CloseLabel::ConnectionReset => "connection_reset",
            CloseLabel::IoError => "io_error",
            CloseLabel::HandshakeTimeout => "handshake_timeout",
            CloseLabel::HttpDone => "http_done",
            CloseLabel::HeartbeatTimeout => "heartbeat_timeout",
            CloseLabel::Evicted => "evicted",
            CloseLabel::TokenExpired => "token_expired",
            CloseLabel::RefreshOtherUser => "refresh_other_user",
            CloseLabel::Shutdown => "shutdown",
            CloseLabel::BinaryFrame => "binary_frame",
            CloseLabel::MessageTooBig => "message_too_big",
            CloseLabel::ProtocolError => "protocol_error",
            CloseLabel::InvalidUtf8 => "invalid_utf8",
            CloseLabel::BadMessages => "bad_messages",
            CloseLabel::SlowConsumer => "slow_consumer",
            CloseLabel::PendingTotalBudget => "pending_total_budget",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_in_counter_order() {
        for (i, label) in CloseLabel::ALL.iter().enumerate() {
            assert_eq!(*label as usize, i);
            let same = CloseLabel::ALL
                .iter()
                .filter(|l| l.as_str() == label.as_str());
            assert_eq!(same.count(), 1, "{}", label.as_str());
        }
        let reset = CloseReason::Io(io::ErrorKind::ConnectionReset);
        assert_eq!(reset.label().as_str(), "connection_reset");
        let other = CloseReason::Io(io::ErrorKind::BrokenPipe);
        assert_eq!(other.label().as_str(), "io_error");
        assert_eq!(
            CloseReason::PolicyViolation.close_frame(),
            Some((1008, "too many bad messages"))
        );
        assert_eq!(CloseReason::ClientClosed.close_frame(), None);
    }
}
