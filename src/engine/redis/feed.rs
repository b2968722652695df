//! The feed thread: this node's pub/sub connection. It subscribes to the channel of
//! every user with a connection on this node (on the first one) and unsubscribes on
//! the last one, and hands each message to the reactor as a [`Raw::Delivery`]. It also
//! listens to this node's channel (evictions by other nodes) and to the revocation
//! channel every node shares (`POST /api/users/{user_id}/disconnect` on another node).
//!
//! A subscribe that comes with an open request sends that request to the store thread
//! only once Redis confirmed the subscription: the node reads the user's history
//! after it listens, so no event published in between is lost.
//!
//! The connection speaks RESP3, so every value read on it is a push: a message, or the
//! confirmation of a SUBSCRIBE / UNSUBSCRIBE sent earlier. The thread never waits for a
//! confirmation: it gathers every (un)subscribe request waiting in its channel into
//! commands of up to 512 channels, sends them, and goes on reading; the confirmations
//! are counted against the commands sent ([`subs`](super::subs)), and an open goes on
//! when the command that subscribed its user is confirmed. A storm of reconnecting
//! clients (a node died) thus costs a few round trips, not one per user, and the
//! messages of the node's other users keep flowing meanwhile.
//!
//! The thread reads with a short timeout ([`POLL`]) to take new (un)subscribe requests
//! between messages, and checks an idle connection every [`PING_EVERY`] by subscribing
//! to this node's channel again (a PING's reply is no push). A command not confirmed
//! within `redis_timeout_ms` means the connection is lost. When the connection fails
//! it reconnects with backoff, subscribes to every user again and, once Redis confirmed
//! that, asks the store thread for each user's top seq ([`StoreRequest::Top`]), so
//! that what pub/sub lost meanwhile is found (pub/sub is at most once). While it has no
//! connection, requests wait for up to `redis_timeout_ms`; then opens are answered
//! `Unavailable` (never read before their user is listened to: a loss at the tail of a
//! user's stream would have no later event to reveal it); so are the opens whose
//! command was not confirmed when the connection failed.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use super::keys::{user_of_channel, UserKeys};
use super::store::{StoreRequest, BACKOFF_MAX, BACKOFF_MIN};
use super::subs::{InFlight, Kind, Unexpected, MAX_BATCH, MAX_SENT};
use super::{parse_thread, Out, Raw, Shared};
use crate::engine::{Delivered, EngineEvent};
use crate::event::text_frame;

/// How long one read waits for a message before the thread looks at its requests.
/// An open (connect or resume) waits for its subscribe behind this read when the node
/// is quiet: 20 ms made a resume take 10-25 ms on an idle node (`loadgen resume`,
/// docs/CLUSTER.md "Figures"); 2 ms costs a timed-out read 500 times a second.
const POLL: Duration = Duration::from_millis(2);
/// An idle pub/sub connection is checked this often (a SUBSCRIBE of this node's
/// channel, confirmed like any other).
const PING_EVERY: Duration = Duration::from_secs(1);

/// What the feed thread is asked.
#[derive(Debug)]
pub(super) enum FeedRequest {
    /// Listen to `user`; then send `then` (an open) to the store thread.
    Subscribe {
        user: Arc<str>,
        then: Option<StoreRequest>,
    },
    /// Stop listening to `user`.
    Unsubscribe { user: Arc<str> },
}

/// The thread's body: until the engine stops.
pub(super) fn run(
    shared: Arc<Shared>,
    rx: Receiver<FeedRequest>,
    store: Sender<StoreRequest>,
    out: Out,
) {
    // Bounded by the users with a connection on this node.
    let mut users: HashSet<Arc<str>> = HashSet::new();
    let mut backoff = BACKOFF_MIN;
    let mut first = true;
    // Since when this thread has had no connection: requests wait in the channel
    // (subscribed and sent on once connected) for up to `redis_timeout_ms`, then
    // opens are answered Unavailable while the outage lasts.
    let mut down_since = Instant::now();
    while !shared.stop.load(Ordering::Acquire) {
        let con = shared.target.connect_resp3();
        let mut con = match con {
            Ok(c) => c,
            Err(e) => {
                log::debug!("redis feed: connect failed: {e}");
                let until = Instant::now() + backoff;
                while Instant::now() < until {
                    if down_since.elapsed() >= shared.settings.timeout
                        && !matches!(take_requests(&rx, &mut users, &store, &out, None), Ok(true))
                    {
                        return;
                    }
                    std::thread::sleep(POLL);
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        if con
            .set_write_timeout(Some(shared.settings.timeout))
            .is_err()
        {
            continue;
        }
        match listen(&shared, &mut con, &rx, &mut users, &store, &out, first) {
            Ok(()) => return,
            Err(e) => {
                shared.counters.feed_losses.fetch_add(1, Ordering::Relaxed);
                log::warn!("redis feed: connection lost: {e}");
            }
        }
        down_since = Instant::now();
        first = false;
    }
}

/// Serve one connection until it fails (`Err`) or the engine stops (`Ok`). Whatever
/// still waits on a confirmation when it fails is given up: opens are answered
/// `Unavailable`.
fn listen(
    shared: &Shared,
    con: &mut redis::Connection,
    rx: &Receiver<FeedRequest>,
    users: &mut HashSet<Arc<str>>,
    store: &Sender<StoreRequest>,
    out: &Out,
    first: bool,
) -> redis::RedisResult<()> {
    let mut sent = InFlight::new();
    let result = serve(shared, con, rx, users, store, out, first, &mut sent);
    for then in sent.drain() {
        if let StoreRequest::Open { ticket, .. } = then {
            out.send(Raw::Event(EngineEvent::Unavailable { ticket }));
            out.wake();
        }
    }
    result
}

/// [`listen`]'s body. The connection speaks RESP3 (`Target::connect_resp3`: on a
/// subscribed connection every value is then a push, told apart from command replies,
/// and `Connection::recv_response` skips the next *non-push* value after a read
/// timeout, never a push; Redis 6 or later): every value it
/// reads is a push, a message or a confirmation of a command sent earlier
/// ([`subs`](super::subs)); commands are sent without waiting, so messages keep flowing
/// to the reactor while Redis confirms.
#[allow(clippy::too_many_arguments)]
fn serve(
    shared: &Shared,
    con: &mut redis::Connection,
    rx: &Receiver<FeedRequest>,
    users: &mut HashSet<Arc<str>>,
    store: &Sender<StoreRequest>,
    out: &Out,
    first: bool,
    sent: &mut InFlight<StoreRequest>,
) -> redis::RedisResult<()> {
    let prefix = shared.settings.prefix.as_str();
    let timeout = shared.settings.timeout;
    // This node's own channel: evictions of its connections by other nodes.
    let node_channel = super::keys::node_channel(prefix, &shared.settings.node_id);
    // Every node's channel: revocations (PROTOCOL.md section 12).
    let revoke_channel = super::keys::revoke_channel(prefix);
    let now = Instant::now();
    sent.sent(Kind::Subscribe, 2, Vec::new(), false, now);
    con.subscribe_resp3(&[&node_channel, &revoke_channel])?;
    if !users.is_empty() {
        let channels: Vec<String> = users
            .iter()
            .map(|u| UserKeys::new(prefix, u).channel)
            .collect();
        for chunk in channels.chunks(MAX_BATCH) {
            sent.sent(Kind::Subscribe, chunk.len(), Vec::new(), false, now);
            con.subscribe_resp3(chunk)?;
        }
    }
    if !first {
        // Once every user is listened to again: what did pub/sub lose while this
        // connection was down, and which revocations?
        sent.mark_resync();
    }
    con.set_read_timeout(Some(POLL))?;
    let mut last_heard = Instant::now();
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let link = Link {
            con: &mut *con,
            prefix,
            sent: &mut *sent,
        };
        if !take_requests(rx, users, store, out, Some(link))? {
            return Ok(());
        }
        if sent.overdue(Instant::now(), timeout) {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "(un)subscribe not confirmed within redis_timeout_ms",
            )));
        }
        let (kind, data) = match con.recv_response() {
            Ok(redis::Value::Push { kind, data }) => (kind, data),
            Ok(other) => {
                // An error reply (or anything but a push) on a subscribed connection:
                // some command was refused; this connection cannot be trusted. (The
                // crate may skip such a reply after a read timeout: then the refused
                // command is never confirmed and `overdue` ends the connection.)
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "unexpected reply on the pub/sub connection",
                    format!("{other:?}"),
                )));
            }
            Err(e) if e.is_timeout() => {
                if sent.is_empty() && last_heard.elapsed() >= PING_EVERY {
                    // Liveness: a SUBSCRIBE of a channel already listened to is
                    // confirmed like any other (a PING's reply is no push).
                    sent.sent(Kind::Subscribe, 1, Vec::new(), false, Instant::now());
                    con.subscribe_resp3(&node_channel)?;
                    last_heard = Instant::now();
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        last_heard = Instant::now();
        let confirmed = match kind {
            redis::PushKind::Subscribe => Kind::Subscribe,
            redis::PushKind::Unsubscribe => Kind::Unsubscribe,
            redis::PushKind::Message => {
                let Some(msg) = redis::Msg::from_push_info(redis::PushInfo { kind, data }) else {
                    log::error!("redis feed: malformed push message");
                    continue;
                };
                deliver(shared, prefix, &node_channel, &revoke_channel, out, msg);
                continue;
            }
            other => {
                log::debug!("redis feed: ignored push {other:?}");
                continue;
            }
        };
        match sent.confirmed(confirmed) {
            Ok(None) => {}
            Ok(Some(released)) => {
                for then in released.then {
                    let _ = store.send(then);
                }
                if released.resync {
                    for user in users.iter() {
                        let _ = store.try_send(StoreRequest::Top { user: user.clone() });
                    }
                    let _ = store.try_send(StoreRequest::Revocations);
                }
            }
            Err(Unexpected(kind)) => {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "pub/sub confirmation matches no command sent",
                    format!("{kind:?}"),
                )));
            }
        }
    }
}

/// Hand one pub/sub message to the reactor.
fn deliver(
    shared: &Shared,
    prefix: &str,
    node_channel: &str,
    revoke_channel: &str,
    out: &Out,
    msg: redis::Msg,
) {
    match msg {
        msg if msg.get_channel_name() == node_channel => {
            match parse_evict(msg.get_payload_bytes()) {
                Some((key, serial)) => {
                    out.send(Raw::Event(EngineEvent::Evict { key, serial }));
                    out.wake();
                }
                None => log::error!("redis feed: malformed message on {node_channel}"),
            }
        }
        msg if msg.get_channel_name() == revoke_channel => {
            match parse_revoke(msg.get_payload_bytes()) {
                // This node applied its own revocation already.
                Some((_, origin, _)) if origin == shared.settings.node_id => {}
                Some((until, _, user)) => {
                    out.send(Raw::Event(EngineEvent::Revoked {
                        user: Arc::from(user),
                        until,
                    }));
                    out.wake();
                }
                None => log::error!("redis feed: malformed message on {revoke_channel}"),
            }
        }
        msg => {
            let Some(user) = user_of_channel(prefix, msg.get_channel_name()) else {
                return;
            };
            match parse_message(msg.get_payload_bytes()) {
                Some(event) => {
                    out.send(Raw::Delivery {
                        user: Arc::from(user),
                        event,
                    });
                    out.wake();
                }
                None => log::error!("redis feed: malformed message for user={user:?}"),
            }
        }
    }
}

/// The connection [`take_requests`] sends its commands on.
struct Link<'a> {
    con: &'a mut redis::Connection,
    prefix: &'a str,
    sent: &'a mut InFlight<StoreRequest>,
}

/// Channels of one command being gathered, and the opens it releases.
struct Batch {
    kind: Kind,
    channels: Vec<String>,
    then: Vec<StoreRequest>,
}

impl Batch {
    /// Send the gathered command (if any); a `kind` batch follows.
    fn flush(&mut self, link: &mut Link<'_>, kind: Kind) -> redis::RedisResult<()> {
        if !self.channels.is_empty() {
            // Registered first: when sending fails, its opens are answered Unavailable.
            link.sent.sent(
                self.kind,
                self.channels.len(),
                std::mem::take(&mut self.then),
                false,
                Instant::now(),
            );
            let channels = std::mem::take(&mut self.channels);
            match self.kind {
                Kind::Subscribe => link.con.subscribe_resp3(&channels)?,
                Kind::Unsubscribe => link.con.unsubscribe_resp3(&channels)?,
            }
        }
        self.kind = kind;
        Ok(())
    }
}

/// Apply every waiting request; with a connection, (un)subscribe on it too: the
/// requests waiting are gathered into SUBSCRIBE / UNSUBSCRIBE commands of up to
/// [`MAX_BATCH`] channels, in the order they came, sent without waiting for their
/// confirmations (at most [`MAX_SENT`] in flight: the rest wait in the channel).
/// `Ok(false)` when the engine is gone (the channel closed); `Err` when sending failed
/// (the connection is failing: the caller reconnects).
///
/// An open goes on to the store thread only once its user is subscribed: once Redis
/// confirmed the command that subscribes it, or, when its user is listened to already,
/// every command sent before (one of them may be its user's SUBSCRIBE). Without a
/// connection it is answered `Unavailable` here (the reactor closes that session with
/// 1013 and the client retries), since reading the user's history before listening
/// could lose what is published in between with no later event to reveal it.
fn take_requests(
    rx: &Receiver<FeedRequest>,
    users: &mut HashSet<Arc<str>>,
    store: &Sender<StoreRequest>,
    out: &Out,
    link: Option<Link<'_>>,
) -> redis::RedisResult<bool> {
    let Some(mut link) = link else {
        return take_offline(rx, users, out);
    };
    let mut batch = Batch {
        kind: Kind::Subscribe,
        channels: Vec::new(),
        then: Vec::new(),
    };
    loop {
        if batch.channels.len() >= MAX_BATCH {
            batch.flush(&mut link, batch.kind)?;
        }
        if link.sent.len() >= MAX_SENT {
            break;
        }
        let req = match rx.try_recv() {
            Ok(r) => r,
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Disconnected) => return Ok(false),
        };
        match req {
            FeedRequest::Subscribe { user, then } => {
                if users.contains(&user) {
                    // Listened to, or its SUBSCRIBE is in this batch or in flight.
                    if let Some(then) = then {
                        if !batch.channels.is_empty() {
                            batch.then.push(then);
                        } else if let Some(then) = link.sent.after_all(then) {
                            let _ = store.send(then);
                        }
                    }
                    continue;
                }
                if batch.kind != Kind::Subscribe {
                    batch.flush(&mut link, Kind::Subscribe)?;
                }
                batch
                    .channels
                    .push(UserKeys::new(link.prefix, &user).channel);
                batch.then.extend(then);
                // Listened to from now on (a reconnect subscribes it again) until the
                // reactor releases it.
                users.insert(user);
            }
            FeedRequest::Unsubscribe { user } => {
                if users.remove(&user) {
                    if batch.kind != Kind::Unsubscribe {
                        batch.flush(&mut link, Kind::Unsubscribe)?;
                    }
                    batch
                        .channels
                        .push(UserKeys::new(link.prefix, &user).channel);
                }
            }
        }
    }
    batch.flush(&mut link, Kind::Subscribe)?;
    Ok(true)
}

/// [`take_requests`] without a connection: users are remembered (subscribed on the
/// next connection), opens answered `Unavailable`.
fn take_offline(
    rx: &Receiver<FeedRequest>,
    users: &mut HashSet<Arc<str>>,
    out: &Out,
) -> redis::RedisResult<bool> {
    loop {
        match rx.try_recv() {
            Ok(FeedRequest::Subscribe { user, then }) => {
                users.insert(user);
                if let Some(StoreRequest::Open { ticket, .. }) = then {
                    out.send(Raw::Event(EngineEvent::Unavailable { ticket }));
                    out.wake();
                }
            }
            Ok(FeedRequest::Unsubscribe { user }) => {
                users.remove(&user);
            }
            Err(TryRecvError::Empty) => return Ok(true),
            Err(TryRecvError::Disconnected) => return Ok(false),
        }
    }
}

/// An eviction `<key>:<serial>` (see `open.lua`).
fn parse_evict(payload: &[u8]) -> Option<(usize, u64)> {
    let (key, serial) = std::str::from_utf8(payload).ok()?.split_once(':')?;
    Some((key.parse().ok()?, serial.parse().ok()?))
}

/// A revocation `<until>\n<origin node>\n<user>` (see `revoke.lua`; until 0: none).
/// A node id holds no newline; the user id is the rest, whatever it holds.
fn parse_revoke(payload: &[u8]) -> Option<(Option<u64>, &str, &str)> {
    let mut parts = std::str::from_utf8(payload).ok()?.splitn(3, '\n');
    let until: u64 = parts.next()?.parse().ok()?;
    let origin = parts.next()?;
    let user = parts.next()?;
    Some(((until > 0).then_some(until), origin, user))
}

/// A message `<seq>\n<thread marker>\n<run_id length>\n<run_id><json>` (see
/// `publish.lua`): a thread id holds no control characters, a run id may hold any
/// (newlines too), so its length in bytes comes first.
fn parse_message(payload: &[u8]) -> Option<Delivered> {
    let mut parts = payload.splitn(4, |&b| b == b'\n');
    let seq = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let thread = parse_thread(parts.next()?)?;
    let run_len: usize = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let rest = parts.next()?;
    let (run, json) = (rest.get(..run_len)?, rest.get(run_len..)?);
    Some(Delivered {
        seq,
        thread,
        run: Arc::from(std::str::from_utf8(run).ok()?),
        frame: text_frame(json),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_carry_until_origin_and_user() {
        assert_eq!(
            parse_revoke(b"1800000000\nn1\nal\nice"),
            Some((Some(1_800_000_000), "n1", "al\nice"))
        );
        assert_eq!(parse_revoke(b"0\nn1\nbob"), Some((None, "n1", "bob")));
        assert_eq!(parse_revoke(b"x\nn1\nbob"), None);
        assert_eq!(parse_revoke(b"5\nn1"), None);
    }

    #[test]
    fn messages_carry_seq_thread_and_json() {
        let d = parse_message(b"12\n+t1\n3\nr-1{\"seq\":12}").unwrap();
        assert_eq!(d.seq, 12);
        assert_eq!(d.thread.as_deref(), Some("t1"));
        assert_eq!(&*d.run, "r-1");
        assert!(d.frame.ends_with(b"{\"seq\":12}"));
        let d = parse_message(b"3\n-\n1\nr{}").unwrap();
        assert_eq!(d.thread, None);
        // A run id with newlines (any UTF-8 is a run id).
        let d = parse_message(b"4\n-\n5\nr\n1\n2{\"a\":1}").unwrap();
        assert_eq!(&*d.run, "r\n1\n2");
        assert!(d.frame.ends_with(b"{\"a\":1}"));
        assert!(parse_message(b"x\n-\n1\nr{}").is_none());
        assert!(parse_message(b"3\n?\n1\nr{}").is_none());
        assert!(
            parse_message(b"3\n-\n9\nr{}").is_none(),
            "length past the end"
        );
        assert!(parse_message(b"3\n-\nr\n{}").is_none(), "no length");
        // The length must end on a character boundary.
        assert!(parse_message("3\n-\n1\n\u{e9}{}".as_bytes()).is_none());
        assert!(parse_message(b"3").is_none());
    }
}
