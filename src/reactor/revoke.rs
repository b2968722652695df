//! Revoking a user (PROTOCOL.md section 12): `POST /api/users/{user_id}/disconnect`
//! with the publish key closes every session of the user with close code 4004
//! `revoked` and answers 200 `{"closed":N}`; a body `{"until": <epoch seconds>}` also
//! refuses the user's new upgrades (401 `invalid_token`, "user revoked") until then,
//! kept in [`crate::revocation::Revocations`] (bounded by `max_revoked_users`).
//!
//! Under the Redis engine the revocation also goes to every other node
//! ([`crate::engine::EngineEvent::Revoked`], handled by `revoked_elsewhere`) and is kept
//! in Redis for nodes started later (docs/CLUSTER.md, "Revocation"); `closed` counts
//! the connections closed on this node.
//!
//! The head (publish key, `Content-Length`) is checked in `endpoints.rs` like the
//! publish API's; here the user id (the path segment, percent-decoded strictly) and
//! the body are checked, all before anything is done: a bad request changes nothing.
//!
//! Answers: 200 `{"closed":N}`; 400 `bad_request` for a user id that is not one
//! (empty, over 128 bytes, a bad `%` escape or invalid UTF-8), a body that is not a
//! JSON object, a field other than `until`, an `until` that is not a whole number of
//! seconds, not after now, or more than
//! [`crate::revocation::MAX_UNTIL_AHEAD_S`] ahead; 503 `too_many_revocations` when the
//! store is full of revocations in force (nothing closed). A POST without a body (no
//! `Content-Length`) is a body of length 0.

use serde_json::Value;

use super::Reactor;
use crate::close::CloseReason;
use crate::conn::ConnId;
use crate::event::now_ms;
use crate::frames::{self, Disconnected, ErrorBody, ErrorCode};
use crate::ids::UserId;
use crate::revocation::MAX_UNTIL_AHEAD_S;

/// Largest body of a disconnect request (`{"until": N}` is about 20 bytes); larger
/// ones get 413.
pub(super) const MAX_DISCONNECT_BODY_BYTES: usize = 1024;

impl Reactor {
    /// Answer an authorized disconnect request: its status and JSON body.
    pub(super) fn disconnect(&mut self, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        self.stats.http_requests += 1;
        let refused =
            |status, code, message: &str| (status, frames::to_json(&ErrorBody::new(code, message)));
        let now_s = now_ms() / 1000;
        let user = match user_of_path(path) {
            Ok(user) => user,
            Err(why) => return refused(400, ErrorCode::BadRequest, &why),
        };
        let until = match until_of_body(body, now_s) {
            Ok(until) => until,
            Err(why) => return refused(400, ErrorCode::BadRequest, &why),
        };
        if until.is_some() && !self.revocations.has_room_for(&user, now_s) {
            let why = format!(
                "{} users are revoked already (max_revoked_users); nothing was done",
                self.revocations.len()
            );
            return refused(503, ErrorCode::TooManyRevocations, &why);
        }
        if let Some(until) = until {
            if let Err(full) = self.revocations.revoke(&user, until, now_s) {
                return refused(503, ErrorCode::TooManyRevocations, &full.to_string());
            }
        }
        let closed = self.close_revoked(&user);
        // Every other node closes the user's connections too (docs/CLUSTER.md).
        if let Some(redis) = self.engine.redis() {
            redis.revoke(&user, until);
        }
        self.stats.user_disconnects += 1;
        match until {
            Some(until) => log::info!(
                user:% = user;
                "user={user:?} revoked: {closed} connection(s) closed (4004), new connections \
                 refused until {until} (epoch s)"
            ),
            None => log::info!(
                user:% = user;
                "user={user:?} disconnected: {closed} connection(s) closed (4004)"
            ),
        }
        let answer = Disconnected { closed };
        (200, frames::to_json(&answer))
    }

    /// Close every connection of `user` on this node with 4004; how many.
    fn close_revoked(&mut self, user: &str) -> usize {
        let ids: Vec<ConnId> = self
            .registry
            .get(user)
            .map(|u| u.conns.iter().map(|c| c.id).collect())
            .unwrap_or_default();
        // Under the Redis engine a session waiting for its open's answer has had no
        // 101 yet: its upgrade is refused as a revoked user's would be.
        let pending: Vec<ConnId> = if ids.is_empty() {
            Vec::new()
        } else {
            self.waits.opens.values().map(|o| o.id).collect()
        };
        for &id in &ids {
            if pending.contains(&id) {
                self.refuse(id, &crate::http::Refusal::unauthorized("user revoked"));
            } else {
                self.close(id, CloseReason::Revoked);
            }
        }
        ids.len()
    }

    /// A revocation made through another node (the Redis engine's
    /// [`crate::engine::EngineEvent::Revoked`], or one read from Redis): close the
    /// user's connections here and, with `until`, refuse new ones. When this node's
    /// store is full the user is still disconnected, and the refusal is logged as lost
    /// here (Redis keeps it for the nodes with room).
    pub(super) fn revoked_elsewhere(&mut self, user: &str, until: Option<u64>) {
        let now_s = now_ms() / 1000;
        let Ok(user) = UserId::try_from(user.to_owned()) else {
            log::error!("engine: a revocation of a user id that is not one: ignored");
            return;
        };
        if let Some(until) = until.filter(|&t| t > now_s) {
            if self.revocations.revoked_until(&user, now_s) == Some(until) {
                // Known already (read again after a reconnect): nothing new.
                return;
            }
            if let Err(full) = self.revocations.revoke(&user, until, now_s) {
                log::error!(
                    user:% = user;
                    "user={user:?} revoked on another node, but not refused here: {full}"
                );
            }
        }
        let closed = self.close_revoked(&user);
        log::info!(
            user:% = user;
            "user={user:?} revoked on another node: {closed} connection(s) closed (4004){}",
            until.map(|t| format!(", new connections refused until {t} (epoch s)")).unwrap_or_default()
        );
    }

    /// Until when `user` is revoked, if they are now (checked at each upgrade).
    pub(super) fn revoked_until(&self, user: &str) -> Option<u64> {
        self.revocations.revoked_until(user, now_ms() / 1000)
    }
}

/// The user id of `/api/users/{user_id}/disconnect` (one trailing `/` tolerated, as
/// by the router): the segment percent-decoded (`%XX` only; `+` is itself) and checked
/// by the user id rule.
fn user_of_path(path: &str) -> Result<UserId, String> {
    let path = path.strip_suffix('/').unwrap_or(path);
    let segment = path
        .strip_prefix("/api/users/")
        .and_then(|rest| rest.strip_suffix("/disconnect"))
        .ok_or_else(|| "path must be /api/users/{user_id}/disconnect".to_owned())?;
    let decoded = decode_segment(segment)
        .ok_or_else(|| "user_id: a bad %-escape or invalid UTF-8 in the path".to_owned())?;
    UserId::try_from(decoded).map_err(|e| format!("user_id: {e}"))
}

/// Strict percent-decoding of one path segment: `%` must be followed by two hex
/// digits, and the result must be UTF-8.
fn decode_segment(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The `until` of the body: none for an empty body, `{}` or `"until": null`.
fn until_of_body(body: &[u8], now_s: u64) -> Result<Option<u64>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let Value::Object(fields) = value else {
        return Err("body must be a JSON object, e.g. {\"until\": 1767225600}".to_owned());
    };
    if let Some(other) = fields.keys().find(|k| *k != "until") {
        let other: String = other.chars().take(64).collect();
        return Err(format!(
            "unknown field {other:?}: only \"until\" is accepted"
        ));
    }
    let until = match fields.get("until") {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v.as_u64().ok_or_else(|| {
            "until must be a whole number of seconds since the Unix epoch".to_owned()
        })?,
    };
    if until <= now_s {
        return Err(format!("until {until} is not in the future (now {now_s})"));
    }
    if until - now_s > MAX_UNTIL_AHEAD_S {
        return Err(format!(
            "until {until} is more than {} days ahead: seconds since the Unix epoch are \
             expected (not milliseconds)",
            MAX_UNTIL_AHEAD_S / 86_400
        ));
    }
    Ok(Some(until))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_come_from_the_path_strictly_decoded() {
        let ok = |p: &str| user_of_path(p).map(|u| u.to_string());
        assert_eq!(ok("/api/users/alice/disconnect").as_deref(), Ok("alice"));
        assert_eq!(ok("/api/users/a%2Fb/disconnect/").as_deref(), Ok("a/b"));
        assert_eq!(ok("/api/users/a+b/disconnect").as_deref(), Ok("a+b"));
        assert_eq!(
            ok("/api/users/%E2%9C%93/disconnect").as_deref(),
            Ok("\u{2713}")
        );
        assert!(ok("/api/users//disconnect").is_err());
        assert!(ok("/api/users/%zz/disconnect").is_err());
        assert!(ok("/api/users/%2/disconnect").is_err());
        assert!(ok("/api/users/%FF/disconnect").is_err());
        let long = format!("/api/users/{}/disconnect", "x".repeat(129));
        assert!(ok(&long).is_err());
    }

    #[test]
    fn until_must_be_a_future_second_within_a_year() {
        let now = 1_800_000_000;
        assert_eq!(until_of_body(b"", now), Ok(None));
        assert_eq!(until_of_body(b" {} ", now), Ok(None));
        assert_eq!(until_of_body(br#"{"until":null}"#, now), Ok(None));
        assert_eq!(
            until_of_body(br#"{"until":1800000060}"#, now),
            Ok(Some(1_800_000_060))
        );
        for bad in [
            &br#"{"until":1800000000}"#[..],
            br#"{"until":1}"#,
            br#"{"until":1800000000000}"#,
            br#"{"until":-5}"#,
            br#"{"until":1800000060.5}"#,
            br#"{"until":"1800000060"}"#,
            br#"{"untill":1800000060}"#,
            br#"[1800000060]"#,
            b"{",
            b"until=5",
        ] {
            assert!(
                until_of_body(bad, now).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
