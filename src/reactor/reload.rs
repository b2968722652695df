//! SIGHUP: reload the JWT verification keys (`jwt_public_key_file`), the HS256
//! `jwt_secret` and `allowed_origins` without dropping a connection (PROTOCOL.md
//! section 12). Called from the SIGHUP branch of `Reactor::on_signal` (`timers.rs`).
//!
//! Where the new values come from: the gateway's [`ConfigSource`] when the embedder set
//! one (`Gateway::reload_config_with`; the binary's re-reads the config file named at
//! start with the environment and flags of the start, see `src/bin/agentwire.rs`), else
//! the configuration in force, so the key file is read again from the same path. Of the
//! fresh configuration only `jwt_secret`, `jwt_public_key_file` and `allowed_origins`
//! are applied; any other setting that differs is named in a warning (it needs a
//! restart) and left as it is.
//!
//! All or nothing: the new authenticator is built first, and only when it builds (the
//! file reads, every key parses, the secret is long enough) do the three values replace
//! the old ones; otherwise a warning says why and the old keys, secret and origins stay
//! in force. Established sessions are kept whatever their token was signed with (a
//! `refresh` after the reload is checked with the new keys); new upgrades use the new
//! keys and origins from the next request on.
//!
//! Cost on the loop: reading and parsing one small file (a key file is at most
//! [`crate::jwt_keys::MAX_KEY_FILE_BYTES`]; a config file is a few KiB) and parsing at
//! most [`crate::jwt_keys::MAX_KEYS`] public keys: well under a millisecond for PEM
//! and JWKS files of ordinary size. The loop is not otherwise paused; the time taken is
//! logged with the result.

use std::time::Instant;

use bytes::Bytes;

use super::Reactor;
use crate::config::Config;

/// Where a reload takes its configuration from: called on the event loop at each
/// SIGHUP; an `Err` (a message naming the problem) keeps everything in force.
pub type ConfigSource = Box<dyn FnMut() -> Result<Config, String> + Send>;

impl Reactor {
    /// Reload keys, secret and allowed origins (see the module docs). Never fails: an
    /// error keeps the old values and is logged.
    pub(crate) fn reload(&mut self) {
        let started = Instant::now();
        let fresh = match self.reload_source.as_mut() {
            Some(source) => match source() {
                Ok(config) => config,
                Err(e) => return self.reload_failed(e),
            },
            None => self.s.config.clone(),
        };
        let ignored = restart_only_changes(&self.s.config, &fresh);
        if !ignored.is_empty() {
            log::warn!(
                "SIGHUP: changed settings that only a restart applies, left as they are: {}",
                ignored.join(", ")
            );
        }
        let mut next = self.s.config.clone();
        next.jwt_secret = fresh.jwt_secret;
        next.jwt_public_key_file = fresh.jwt_public_key_file;
        next.allowed_origins = fresh.allowed_origins;
        let built = next
            .validate()
            .map_err(crate::Error::from)
            .and_then(|()| crate::authenticator(&next));
        let auth = match built {
            Ok(auth) => auth,
            Err(e) => return self.reload_failed(e),
        };
        let keys = auth.key_names();
        let origins = if next.allowed_origins.is_empty() {
            "any".to_owned()
        } else {
            next.allowed_origins.join(", ")
        };
        self.auth = auth;
        self.stats.reloads += 1;
        self.s.config = next;
        self.s.config_json = Bytes::from(
            serde_json::to_vec(&self.s.config.to_public_json(self.s.demo_agent))
                .unwrap_or_default(),
        );
        log::info!(
            "SIGHUP reload done in {} us: jwt_algorithm {}, keys [{keys}], allowed_origins \
             [{origins}]; {} open connections kept",
            started.elapsed().as_micros(),
            self.auth.algorithm(),
            self.open_sessions
        );
    }

    /// A reload that could not be applied: logged and counted, the values in force kept.
    fn reload_failed(&mut self, e: impl std::fmt::Display) {
        log::warn!(
            "SIGHUP reload failed: {e}; the JWT keys, jwt_secret and \
             allowed_origins in force are kept"
        );
        self.stats.reloads_failed += 1;
    }
}

/// The settings other than the three reloaded ones whose value differs between `old`
/// and `new` (secrets by name only, never their values).
fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    const RELOADED: [&str; 4] = [
        "jwt_secret_set",
        "jwt_public_key_file",
        "allowed_origins",
        "demo_agent",
    ];
    let (a, b) = (old.to_public_json(false), new.to_public_json(false));
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return Vec::new();
    };
    let mut changed: Vec<String> = a
        .iter()
        .filter(|(k, v)| !RELOADED.contains(&k.as_str()) && b.get(k.as_str()) != Some(v))
        .map(|(k, _)| k.trim_end_matches("_set").to_owned())
        .collect();
    if old.publish_key != new.publish_key && !changed.iter().any(|k| k == "publish_key") {
        changed.push("publish_key".to_owned());
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_settings_outside_the_reloaded_three_are_reported() {
        let old = Config::default();
        let mut new = old.clone();
        new.jwt_secret = Some("a-new-secret-0123456789abcdef".into());
        new.allowed_origins = vec!["https://a.example".into()];
        assert!(restart_only_changes(&old, &new).is_empty());
        new.max_connections = 7;
        new.publish_key = Some("another-publish-key-0123".into());
        assert_eq!(
            restart_only_changes(&old, &new),
            vec!["max_connections".to_owned(), "publish_key".to_owned()]
        );
    }
}
