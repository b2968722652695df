//! Validated identifiers: [`UserId`], [`ThreadId`], [`RunId`] and [`AgentName`], one
//! [`Rule`] per kind, checked the same way at every entry point that takes one:
//!
//! | kind | rule | entry points |
//! |---|---|---|
//! | [`UserId`] | 1 to 128 bytes, any UTF-8 | the token's `sub` (upgrade, `refresh`, `agentwire token --sub`), the `user_id` query parameter, [`Emitter::run`](crate::Emitter::run), `POST /api/events` |
//! | [`ThreadId`] | 1 to 256 bytes, no control characters | the `thread_id` query parameter, `user_message`, [`Emitter::run`](crate::Emitter::run), `POST /api/events` |
//! | [`RunId`] | 1 to 256 bytes, any UTF-8 | `cancel`, [`Emitter::run`](crate::Emitter::run), `POST /api/events` |
//! | [`AgentName`] | 0 to 256 bytes, any UTF-8 | [`Emitter::run`](crate::Emitter::run), `POST /api/events` |
//!
//! Lengths count bytes of UTF-8; "control characters" are `char::is_control` (Unicode
//! `Cc`: C0, DEL, C1). A thread id is refused with control characters because it is also a
//! query parameter of the upgrade, where they were always refused: a thread a worker could
//! name but no client could subscribe to is a bug waiting. User ids keep every character
//! the token issuer signs, so look-alikes (letter case, NUL, NFC/NFD, zero-width,
//! full-width, Cyrillic) stay distinct users: ids are never normalized and compare
//! bytewise.
//!
//! An id holds an `Arc<str>`: cloning one is a reference-count increment, and the
//! routing state ([`RunKey`](crate::event::RunKey), the registry) keeps the same `Arc`
//! the id was validated into. Ids deref to `&str`.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::ops::Deref;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Serialize, Serializer};

/// What one kind of identifier accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The field's name on the wire (`user_id`, `thread_id`, ...).
    pub field: &'static str,
    /// Longest accepted value, in bytes of UTF-8.
    pub max_bytes: usize,
    /// The empty string is accepted.
    pub may_be_empty: bool,
    /// Control characters (`char::is_control`) are accepted.
    pub may_have_control: bool,
}

impl Rule {
    /// True when `s` follows this rule.
    pub fn accepts(&self, s: &str) -> bool {
        (self.may_be_empty || !s.is_empty())
            && s.len() <= self.max_bytes
            && (self.may_have_control || !has_control_characters(s))
    }
}

/// The rule in words: `a non-empty string of at most 256 bytes without control
/// characters`.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let empty = if self.may_be_empty { "" } else { "non-empty " };
        write!(f, "a {empty}string of at most {} bytes", self.max_bytes)?;
        if !self.may_have_control {
            f.write_str(" without control characters")?;
        }
        Ok(())
    }
}

/// True when `s` holds a control character (`char::is_control`: C0, DEL, C1).
pub fn has_control_characters(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// Which rule a value broke. `Display` (and [`IdError::message`]) states the rule, never
/// the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdError {
    /// Not a valid [`UserId`].
    User,
    /// Not a valid [`ThreadId`].
    Thread,
    /// Not a valid [`RunId`].
    Run,
    /// Not a valid [`AgentName`].
    AgentName,
}

impl IdError {
    /// `<field> must be <rule>`, as a static text (client `bad_message` answers carry
    /// static texts only). Unit tests keep it equal to the [`Rule`]'s words.
    pub const fn message(self) -> &'static str {
        match self {
            IdError::User => "user_id must be a non-empty string of at most 128 bytes",
            IdError::Thread => {
                "thread_id must be a non-empty string of at most 256 bytes without control characters"
            }
            IdError::Run => "run_id must be a non-empty string of at most 256 bytes",
            IdError::AgentName => "agent_name must be a string of at most 256 bytes",
        }
    }

    /// The rule that was broken.
    pub const fn rule(self) -> Rule {
        match self {
            IdError::User => User::RULE,
            IdError::Thread => Thread::RULE,
            IdError::Run => Run::RULE,
            IdError::AgentName => Agent::RULE,
        }
    }
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for IdError {}

/// One kind of identifier: its rule and the error that names it.
pub trait Kind {
    /// What values of this kind accept.
    const RULE: Rule;
    /// The error for a value that breaks [`Kind::RULE`].
    const ERROR: IdError;
}

/// Marker of [`UserId`].
#[derive(Debug)]
pub enum User {}
/// Marker of [`ThreadId`].
#[derive(Debug)]
pub enum Thread {}
/// Marker of [`RunId`].
#[derive(Debug)]
pub enum Run {}
/// Marker of [`AgentName`].
#[derive(Debug)]
pub enum Agent {}

impl Kind for User {
    const RULE: Rule = Rule {
        field: "user_id",
        max_bytes: 128,
        may_be_empty: false,
        may_have_control: true,
    };
    const ERROR: IdError = IdError::User;
}

impl Kind for Thread {
    const RULE: Rule = Rule {
        field: "thread_id",
        max_bytes: 256,
        may_be_empty: false,
        may_have_control: false,
    };
    const ERROR: IdError = IdError::Thread;
}

impl Kind for Run {
    const RULE: Rule = Rule {
        field: "run_id",
        max_bytes: 256,
        may_be_empty: false,
        may_have_control: true,
    };
    const ERROR: IdError = IdError::Run;
}

impl Kind for Agent {
    const RULE: Rule = Rule {
        field: "agent_name",
        max_bytes: 256,
        may_be_empty: true,
        may_have_control: true,
    };
    const ERROR: IdError = IdError::AgentName;
}

/// A user: the token's `sub`, the receiver of events (1 to 128 bytes, any UTF-8).
pub type UserId = Id<User>;
/// A chat thread (1 to 256 bytes, no control characters).
pub type ThreadId = Id<Thread>;
/// An agent run (1 to 256 bytes, any UTF-8).
pub type RunId = Id<Run>;
/// The agent that emits a run's events (at most 256 bytes, may be empty).
pub type AgentName = Id<Agent>;

/// A string that follows the rule of kind `K`: only [`Id::parse`] and its `TryFrom` /
/// `FromStr` siblings make one. Compares, orders and hashes as its bytes.
pub struct Id<K> {
    value: Arc<str>,
    kind: PhantomData<fn() -> K>,
}

impl<K: Kind> Id<K> {
    /// The rule of this kind.
    pub const RULE: Rule = K::RULE;
    /// Longest accepted value, in bytes of UTF-8.
    pub const MAX_BYTES: usize = K::RULE.max_bytes;

    /// Check `s` against the rule without building an id.
    ///
    /// # Errors
    /// `K`'s [`IdError`] when `s` breaks the rule.
    pub fn check(s: &str) -> Result<(), IdError> {
        if K::RULE.accepts(s) {
            Ok(())
        } else {
            Err(K::ERROR)
        }
    }

    /// Validate `s` into an id (one allocation: the shared `Arc<str>`).
    ///
    /// # Errors
    /// `K`'s [`IdError`] when `s` breaks the rule.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        Self::check(s)?;
        Ok(Self::trusted(Arc::from(s)))
    }

    fn trusted(value: Arc<str>) -> Self {
        Id {
            value,
            kind: PhantomData,
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// The shared string (clone it to keep the id's text without copying it).
    pub fn as_arc(&self) -> &Arc<str> {
        &self.value
    }

    /// The shared string, moved out.
    pub fn into_arc(self) -> Arc<str> {
        self.value
    }
}

impl<K: Kind> TryFrom<&str> for Id<K> {
    type Error = IdError;
    fn try_from(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

impl<K: Kind> TryFrom<String> for Id<K> {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::check(&s)?;
        Ok(Self::trusted(Arc::from(s)))
    }
}

impl<K: Kind> TryFrom<Arc<str>> for Id<K> {
    type Error = IdError;
    /// No allocation: the id keeps `s`.
    fn try_from(s: Arc<str>) -> Result<Self, IdError> {
        Self::check(&s)?;
        Ok(Self::trusted(s))
    }
}

impl<K: Kind> FromStr for Id<K> {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

impl<K> From<Id<K>> for Arc<str> {
    fn from(id: Id<K>) -> Arc<str> {
        id.value
    }
}

impl<K> Clone for Id<K> {
    fn clone(&self) -> Self {
        Id {
            value: Arc::clone(&self.value),
            kind: PhantomData,
        }
    }
}

impl<K> Deref for Id<K> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.value
    }
}

impl<K> AsRef<str> for Id<K> {
    fn as_ref(&self) -> &str {
        &self.value
    }
}

impl<K> Borrow<str> for Id<K> {
    fn borrow(&self) -> &str {
        &self.value
    }
}

impl<K> PartialEq for Id<K> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<K> Eq for Id<K> {}

impl<K> PartialEq<str> for Id<K> {
    fn eq(&self, other: &str) -> bool {
        *self.value == *other
    }
}

impl<K> PartialEq<&str> for Id<K> {
    fn eq(&self, other: &&str) -> bool {
        *self.value == **other
    }
}

impl<K> PartialEq<String> for Id<K> {
    fn eq(&self, other: &String) -> bool {
        *self.value == **other
    }
}

impl<K> PartialEq<Id<K>> for str {
    fn eq(&self, other: &Id<K>) -> bool {
        *self == *other.value
    }
}

impl<K> PartialEq<Id<K>> for String {
    fn eq(&self, other: &Id<K>) -> bool {
        **self == *other.value
    }
}

impl<K> PartialOrd for Id<K> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<K> Ord for Id<K> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.value.cmp(&other.value)
    }
}

/// Hashes as the `str` (so maps keyed by ids can be looked up with a `&str`).
impl<K> Hash for Id<K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (*self.value).hash(state);
    }
}

/// As the string's `Debug` (quoted, escaped): what logs print.
impl<K> fmt::Debug for Id<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.value, f)
    }
}

impl<K> fmt::Display for Id<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.value)
    }
}

/// A JSON string.
impl<K> Serialize for Id<K> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.value)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// Each kind's error text is its rule in words, so the static texts never drift from
    /// the constants.
    #[test]
    fn messages_state_the_rules() {
        for e in [
            IdError::User,
            IdError::Thread,
            IdError::Run,
            IdError::AgentName,
        ] {
            let rule = e.rule();
            assert_eq!(e.message(), format!("{} must be {rule}", rule.field));
            assert_eq!(e.to_string(), e.message());
        }
        assert_eq!(UserId::RULE.field, "user_id");
        assert_eq!(ThreadId::RULE.field, "thread_id");
        assert_eq!(RunId::RULE.field, "run_id");
        assert_eq!(AgentName::RULE.field, "agent_name");
        assert_eq!(UserId::parse("").unwrap_err(), IdError::User);
        assert_eq!(ThreadId::parse("").unwrap_err(), IdError::Thread);
        assert_eq!(RunId::parse("").unwrap_err(), IdError::Run);
    }

    #[test]
    fn user_id_is_1_to_128_bytes_of_anything() {
        assert_eq!(UserId::MAX_BYTES, 128);
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("u").is_ok());
        assert!(UserId::parse(&"u".repeat(128)).is_ok());
        assert!(UserId::parse(&"u".repeat(129)).is_err());
        // Bytes of UTF-8, not characters: 64 two-byte characters fit, 65 do not.
        assert!(UserId::parse(&"é".repeat(64)).is_ok());
        assert!(UserId::parse(&"é".repeat(65)).is_err());
        // Whatever the token issuer signed: control characters included.
        for odd in ["a\0b", "tab\there", "\u{7f}", "\u{85}", " ", "u\n"] {
            assert_eq!(UserId::parse(odd).unwrap().as_str(), odd, "{odd:?}");
        }
    }

    #[test]
    fn thread_id_is_1_to_256_bytes_without_control_characters() {
        assert_eq!(ThreadId::MAX_BYTES, 256);
        assert!(ThreadId::parse("").is_err());
        assert!(ThreadId::parse(&"t".repeat(256)).is_ok());
        assert!(ThreadId::parse(&"t".repeat(257)).is_err());
        assert!(ThreadId::parse(&"é".repeat(128)).is_ok());
        assert!(ThreadId::parse("t/1 with spaces, ünïcödé and \u{200b}").is_ok());
        for bad in [
            "a\0b",
            "t\n",
            "\t",
            "\r",
            "\u{1b}[31m",
            "\u{7f}",
            "\u{85}",
            "\u{9f}",
        ] {
            assert_eq!(
                ThreadId::parse(bad).unwrap_err(),
                IdError::Thread,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn run_id_is_1_to_256_bytes_of_anything() {
        assert_eq!(RunId::MAX_BYTES, 256);
        assert!(RunId::parse("").is_err());
        assert!(RunId::parse(&"r".repeat(256)).is_ok());
        assert!(RunId::parse(&"r".repeat(257)).is_err());
        assert!(RunId::parse("r\n").is_ok());
    }

    #[test]
    fn agent_name_is_at_most_256_bytes_and_may_be_empty() {
        assert_eq!(AgentName::MAX_BYTES, 256);
        assert!(AgentName::parse("").is_ok());
        assert!(AgentName::parse(&"a".repeat(256)).is_ok());
        assert_eq!(
            AgentName::parse(&"a".repeat(257)).unwrap_err(),
            IdError::AgentName
        );
    }

    /// Look-alike user ids are distinct users: nothing is normalized, ids compare and
    /// hash bytewise.
    #[test]
    fn look_alike_user_ids_stay_distinct() {
        let looks = [
            "alice",
            "Alice",
            "ALICE",
            "alice\0",
            "\0alice",
            "al\u{0}ice",
            "caf\u{e9}",   // NFC
            "cafe\u{301}", // NFD
            "al\u{200b}ice",
            "\u{ff41}lice", // full-width a
            "\u{430}lice",  // Cyrillic a
            "alice ",
        ];
        let ids: Vec<UserId> = looks.iter().map(|s| UserId::parse(s).unwrap()).collect();
        let distinct: HashSet<&UserId> = ids.iter().collect();
        assert_eq!(distinct.len(), looks.len());
        for (id, s) in ids.iter().zip(looks) {
            assert_eq!(id.as_str().as_bytes(), s.as_bytes());
            assert_eq!(*id, *s);
        }
    }

    #[test]
    fn ids_are_cheap_strings() {
        let t = ThreadId::parse("t1").unwrap();
        let u = t.clone();
        assert!(Arc::ptr_eq(t.as_arc(), u.as_arc()));
        let arc: Arc<str> = Arc::from("t2");
        let from_arc = ThreadId::try_from(Arc::clone(&arc)).unwrap();
        assert!(Arc::ptr_eq(&arc, from_arc.as_arc()));
        assert!(Arc::ptr_eq(&arc, &from_arc.into_arc()));
        assert_eq!(&*t, "t1");
        assert_eq!(t, "t1");
        assert_eq!(String::from("t1"), t);
        assert_eq!(format!("{t} {t:?}"), "t1 \"t1\"");
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"t1\"");
        assert_eq!("t1".parse::<ThreadId>().unwrap(), t);
        assert!(ThreadId::try_from(String::from("x\ny")).is_err());
        let set: HashSet<ThreadId> = [t.clone()].into();
        assert!(set.contains("t1"));
    }
}
