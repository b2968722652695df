//! The Redis key layout (docs/CLUSTER.md, "Keys"). Every key and the channel of one
//! user share the hash tag `{u:<user>}`, so one script touches them all and a Redis
//! Cluster keeps them in one slot. A user id may hold any byte but the key stays
//! unambiguous: every name ends with `}:<suffix>` and no suffix holds `}:`.

/// The names of one user's keys under `prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UserKeys {
    /// Hash: `epoch`, `seq` (the top seq).
    pub meta: String,
    /// Stream of kept events, ids `<seq>-0`, fields `j` (the JSON) and `t` (thread).
    pub stream: String,
    /// Sorted set of the run ids that ended (scored by the time they ended).
    pub ended: String,
    /// Sorted set of the idempotency keys of stored events (scored by their seq).
    pub keys: String,
    /// Hash of the runs in progress: run id -> JSON (thread, agent, started, last).
    pub runs: String,
    /// Set of the runs in progress a client cancelled.
    pub cancelled: String,
    /// Hash of the runs acked by a `user_message` and not begun yet: run id -> JSON
    /// (`m` its deadline member, `w` when it was acked).
    pub pending: String,
    /// The user's connections on every node (scored by when they opened) and their
    /// leases (scored by when the lease ends).
    pub conns: String,
    pub leases: String,
    /// The pub/sub channel every node holding a connection of the user listens on.
    pub channel: String,
}

impl UserKeys {
    pub(crate) fn new(prefix: &str, user: &str) -> UserKeys {
        let tag = format!("{prefix}:{{u:{user}}}");
        UserKeys {
            meta: format!("{tag}:meta"),
            stream: format!("{tag}:stream"),
            ended: format!("{tag}:ended"),
            keys: format!("{tag}:idem"),
            runs: format!("{tag}:runs"),
            cancelled: format!("{tag}:cancel"),
            pending: format!("{tag}:pending"),
            conns: format!("{tag}:conns"),
            leases: format!("{tag}:leases"),
            channel: format!("{tag}:ch"),
        }
    }
}

/// The pub/sub channel of one node (evictions of its connections by other nodes).
pub(crate) fn node_channel(prefix: &str, node_id: &str) -> String {
    format!("{prefix}:node:{node_id}")
}

/// The revocations in force, cluster-wide (PROTOCOL.md section 12): a sorted set of
/// user ids scored by their `until` (epoch seconds); expired members are removed by
/// each revocation, and it holds at most `max_revoked_users` members in force.
pub(crate) fn revoked(prefix: &str) -> String {
    format!("{prefix}:revoked")
}

/// The pub/sub channel every node listens on for revocations (`<until>\n<origin
/// node>\n<user>`, until 0: none).
pub(crate) fn revoke_channel(prefix: &str) -> String {
    format!("{prefix}:revoke")
}

/// The inbound stream of `user_message` and `cancel` for workers anywhere (one key for
/// all users, PROTOCOL.md section 9).
pub(crate) fn inbound(prefix: &str) -> String {
    format!("{prefix}:inbound")
}

/// The run deadlines shared by every user (one key: one Redis, not Redis Cluster).
pub(crate) fn deadlines(prefix: &str) -> String {
    format!("{prefix}:deadlines")
}

/// The user a channel name belongs to (the inverse of [`UserKeys::channel`]).
pub(crate) fn user_of_channel<'a>(prefix: &str, channel: &'a str) -> Option<&'a str> {
    channel
        .strip_prefix(prefix)?
        .strip_prefix(":{u:")?
        .strip_suffix("}:ch")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_hash_tag_and_channels_name_their_user() {
        let k = UserKeys::new("aw", "alice");
        assert_eq!(k.meta, "aw:{u:alice}:meta");
        assert_eq!(k.stream, "aw:{u:alice}:stream");
        assert_eq!(k.channel, "aw:{u:alice}:ch");
        assert_eq!(user_of_channel("aw", &k.channel), Some("alice"));
        // A user id with braces and colons still round-trips.
        let odd = UserKeys::new("aw", "a}:ch{u:b");
        assert_eq!(user_of_channel("aw", &odd.channel), Some("a}:ch{u:b"));
        assert_eq!(user_of_channel("other", &k.channel), None);
    }
}
