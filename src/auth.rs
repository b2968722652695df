//! JWT authentication: the [`Authenticator`] built once from config, which verifies the
//! token of every connection and `refresh` (PROTOCOL.md section 3) and mints tokens for
//! `agentwire token` and dev mode.
//!
//! This module owns the token rules of the contract: the algorithm is pinned by config
//! (HS256, RS256 or ES256; `none` and every other `alg` are refused), `exp` and `sub`
//! are required (`sub` a non-empty JSON string of at most 128 bytes), `nbf` is checked
//! when present, `iss`/`aud` are required and checked when configured, and the
//! configured leeway applies to `exp`/`nbf`. Signatures are checked by `jsonwebtoken`
//! (aws-lc backend) before any claim is looked at.
//!
//! Nothing here logs or formats token material: [`AuthError`]'s `Display` is a short
//! fixed reason, safe to log and to send back to the client.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::{Error as JwtError, ErrorKind};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::UserId;
use crate::jwt_keys::KeySet;

/// Longest token accepted, in bytes; longer ones are refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 8192;

/// Largest `jwt_leeway_s` accepted. Beyond an hour a leeway is a misconfiguration
/// (milliseconds given as seconds, say), and it keeps jsonwebtoken's unchecked
/// `now - leeway` arithmetic far from underflow.
pub const MAX_LEEWAY_S: u64 = 3600;

/// HS256 secrets shorter than this (256 bits, RFC 7518 section 3.2) draw a warning when
/// the authenticator is built. (Configuration refuses those shorter than
/// [`crate::config::MIN_ACCEPTED_SECRET_BYTES`].)
const RECOMMENDED_SECRET_BYTES: usize = 32;

/// JWT signing algorithm pinned by config (`jwt_algorithm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JwtAlgorithm {
    /// HMAC with SHA-256 and a shared secret (`jwt_secret`). The default.
    Hs256,
    /// RSASSA-PKCS1-v1_5 with SHA-256; public key from `jwt_public_key_file` (2048 to 8192 bits).
    Rs256,
    /// ECDSA on P-256 with SHA-256; public key from `jwt_public_key_file`.
    Es256,
}

impl JwtAlgorithm {
    /// The JOSE name: `"HS256"`, `"RS256"` or `"ES256"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            JwtAlgorithm::Hs256 => "HS256",
            JwtAlgorithm::Rs256 => "RS256",
            JwtAlgorithm::Es256 => "ES256",
        }
    }

    fn jwt(self) -> Algorithm {
        match self {
            JwtAlgorithm::Hs256 => Algorithm::HS256,
            JwtAlgorithm::Rs256 => Algorithm::RS256,
            JwtAlgorithm::Es256 => Algorithm::ES256,
        }
    }
}

impl fmt::Display for JwtAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JwtAlgorithm {
    type Err = String;

    /// Accepts `HS256`, `RS256` and `ES256`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("HS256") {
            Ok(JwtAlgorithm::Hs256)
        } else if s.eq_ignore_ascii_case("RS256") {
            Ok(JwtAlgorithm::Rs256)
        } else if s.eq_ignore_ascii_case("ES256") {
            Ok(JwtAlgorithm::Es256)
        } else {
            Err(format!(
                "unsupported JWT algorithm {s:?}: expected one of HS256, RS256, ES256"
            ))
        }
    }
}

/// Everything the authenticator needs, built by the caller from `Config`.
///
/// `Debug` leaves the secret out.
#[derive(Clone)]
pub struct AuthSettings {
    /// Pinned algorithm (`jwt_algorithm`, default HS256).
    pub algorithm: JwtAlgorithm,
    /// Shared secret for HS256 (`jwt_secret`); required and non-empty for HS256, ignored otherwise.
    pub secret: Option<String>,
    /// The contents of `jwt_public_key_file` for RS256/ES256 (already read by the
    /// caller); ignored for HS256. One or more PEM keys (PKCS#8 `PUBLIC KEY`, or PKCS#1
    /// `RSA PUBLIC KEY`), or a JWKS document: see the `jwt_keys` module (the
    /// `kid:` label of a PEM key, which key a token's `kid` picks).
    pub public_key_pem: Option<Vec<u8>>,
    /// When set (`jwt_issuer`), tokens must carry this `iss`.
    pub issuer: Option<String>,
    /// When set (`jwt_audience`), tokens must carry this `aud` (alone or in an array).
    pub audience: Option<String>,
    /// Clock-skew allowance for `exp`/`nbf` in seconds (`jwt_leeway_s`, default 5,
    /// at most [`MAX_LEEWAY_S`]).
    pub leeway_s: u64,
}

impl fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSettings")
            .field("algorithm", &self.algorithm)
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .field(
                "public_key_pem",
                &self
                    .public_key_pem
                    .as_ref()
                    .map(|pem| format!("{} bytes", pem.len())),
            )
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_s", &self.leeway_s)
            .finish()
    }
}

/// The verified claims the gateway uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The user id (the [`UserId`] rule: non-empty, at most 128 bytes).
    pub sub: UserId,
    /// Expiry, seconds since the Unix epoch (fractional values rounded).
    pub exp: u64,
}

/// Why a token was refused (all map to HTTP 401 `invalid_token`).
///
/// `Display` gives a short fixed reason that never contains token material, so it is
/// safe to log and to send to the client.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No token at all (empty string).
    #[error("token missing")]
    Missing,
    /// Longer than [`MAX_TOKEN_BYTES`]; refused before any decoding.
    #[error("token too large")]
    TooLarge,
    /// Not three base64url segments, or the header/claims are not JSON objects, or a
    /// claim has the wrong type (`nbf` not a number), or an unsupported `crit` header.
    /// An `alg` jsonwebtoken does not know (`none` included) lands here too, and so
    /// does a non-empty array or object in `sub`/`exp`/`nbf` (jsonwebtoken's claim
    /// validator fails to parse the rest of the claims after one).
    #[error("token malformed")]
    Malformed,
    /// The signature does not match the configured key.
    #[error("bad signature")]
    BadSignature,
    /// The header's `alg` is a known algorithm other than the pinned one.
    #[error("algorithm not allowed")]
    WrongAlgorithm,
    /// The header's `kid` names no configured key (module `jwt_keys`).
    #[error("unknown kid")]
    UnknownKey,
    /// No `kid` in the header while several keys are configured (module `jwt_keys`:
    /// a kid-less token is never tried against each key).
    #[error("kid required: several keys are configured")]
    KidRequired,
    /// `exp` is more than the leeway in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` is more than the leeway in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// An issuer is configured and `iss` is missing or different.
    #[error("issuer missing or invalid")]
    BadIssuer,
    /// An audience is configured and `aud` is missing or does not contain it.
    #[error("audience missing or invalid")]
    BadAudience,
    /// `sub` missing, not a string, or not a [`UserId`] (empty, over 128 bytes).
    #[error("sub missing or invalid")]
    BadSubject,
    /// `exp` missing or not a non-negative number (a string `exp` included).
    #[error("exp missing or invalid")]
    MissingExp,
    /// A longest lifetime is configured (`jwt_max_lifetime_s`) and `exp` lies further
    /// ahead than it (plus the leeway), or `exp - iat` exceeds it.
    #[error("token lifetime over jwt_max_lifetime_s")]
    LifetimeTooLong,
    /// Anything else (a fixed description, never token material): minting without an
    /// HS256 secret, an unexpected library error.
    #[error("{0}")]
    Other(String),
}

/// Setup failure while building an [`Authenticator`]. `Display` names the setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// HS256 is pinned and `jwt_secret` is unset or empty.
    #[error("jwt_secret is required (and must not be empty) when jwt_algorithm is HS256")]
    MissingSecret,
    /// RS256/ES256 is pinned and no public key was given.
    #[error("jwt_public_key_file is required when jwt_algorithm is {0}")]
    MissingPublicKey(JwtAlgorithm),
    /// The PEM could not be used as a public key for the pinned algorithm.
    #[error("jwt_public_key_file does not hold a usable {algorithm} public key: {reason}")]
    BadPublicKey {
        /// The pinned algorithm.
        algorithm: JwtAlgorithm,
        /// What is wrong with it (fixed text, no key material).
        reason: String,
    },
    /// `jwt_issuer` is set to the empty string.
    #[error("jwt_issuer is set but empty")]
    EmptyIssuer,
    /// `jwt_audience` is set to the empty string.
    #[error("jwt_audience is set but empty")]
    EmptyAudience,
    /// `jwt_leeway_s` is over [`MAX_LEEWAY_S`].
    #[error("jwt_leeway_s is {0}, more than the maximum of {MAX_LEEWAY_S} seconds")]
    LeewayTooLarge(u64),
    /// The operating system's random number generator failed.
    #[error("cannot generate a JWT secret: the OS random number generator failed: {0}")]
    Random(String),
}

/// The claims as decoded for our own checks. `sub`/`exp` stay JSON values so that a
/// numeric, empty or over-long `sub` is reported as [`AuthError::BadSubject`] rather
/// than as a decoding failure; `iss`/`aud`/`nbf` are checked by jsonwebtoken.
#[derive(Deserialize)]
struct RawClaims {
    #[serde(default)]
    sub: Option<Value>,
    #[serde(default)]
    exp: Option<Value>,
    #[serde(default)]
    iss: Option<Value>,
    #[serde(default)]
    iat: Option<Value>,
}

/// The claims `mint` signs.
#[derive(Serialize)]
struct MintClaims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Verifies (and for HS256 mints) tokens under one fixed configuration.
///
/// Built once at start; `Send + Sync`, so it can be shared by reference or `Arc`.
pub struct Authenticator {
    algorithm: JwtAlgorithm,
    /// The verification keys; a token's `kid` picks one ([`KeySet::select`]).
    keys: KeySet,
    /// Present for HS256 only: the secret also signs.
    encoding_key: Option<EncodingKey>,
    validation: Validation,
    issuer: Option<String>,
    audience: Option<String>,
    /// `jwt_max_lifetime_s`: see [`Authenticator::with_max_lifetime_s`].
    max_lifetime_s: Option<u64>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithm", &self.algorithm)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_s", &self.validation.leeway)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Builds the authenticator: loads and checks the key for the pinned algorithm and
    /// fixes the validation rules.
    ///
    /// # Errors
    ///
    /// [`AuthSetupError`] when the secret or public key needed by the algorithm is
    /// missing or unusable (a private key, a key of another type, an RSA key outside
    /// 2048..=8192 bits, an EC key not on P-256), when `issuer`/`audience` is set but
    /// empty, or when the leeway is over [`MAX_LEEWAY_S`].
    pub fn new(settings: &AuthSettings) -> Result<Authenticator, AuthSetupError> {
        if settings.leeway_s > MAX_LEEWAY_S {
            return Err(AuthSetupError::LeewayTooLarge(settings.leeway_s));
        }
        if settings.issuer.as_deref() == Some("") {
            return Err(AuthSetupError::EmptyIssuer);
        }
        if settings.audience.as_deref() == Some("") {
            return Err(AuthSetupError::EmptyAudience);
        }

        let algorithm = settings.algorithm;
        let (keys, encoding_key) = match algorithm {
            JwtAlgorithm::Hs256 => {
                let secret = match settings.secret.as_deref() {
                    Some(secret) if !secret.is_empty() => secret,
                    _ => return Err(AuthSetupError::MissingSecret),
                };
                if secret.len() < RECOMMENDED_SECRET_BYTES {
                    log::warn!(
                        "jwt_secret is shorter than {RECOMMENDED_SECRET_BYTES} bytes; \
                         HS256 wants at least 256 bits of secret"
                    );
                }
                (
                    KeySet::single(DecodingKey::from_secret(secret.as_bytes())),
                    Some(EncodingKey::from_secret(secret.as_bytes())),
                )
            }
            JwtAlgorithm::Rs256 | JwtAlgorithm::Es256 => {
                let pem = settings
                    .public_key_pem
                    .as_deref()
                    .ok_or(AuthSetupError::MissingPublicKey(algorithm))?;
                (KeySet::parse(algorithm, pem)?, None)
            }
        };

        // Validation::new pins exactly one algorithm: any other `alg` in a header is
        // refused before the key is touched.
        let mut validation = Validation::new(algorithm.jwt());
        validation.leeway = settings.leeway_s;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = settings.issuer.as_deref() {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match settings.audience.as_deref() {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // jsonwebtoken refuses any token carrying `aud` when no audience is set;
            // without one configured we accept whatever `aud` a token names.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);

        Ok(Authenticator {
            algorithm,
            keys,
            encoding_key,
            validation,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            max_lifetime_s: None,
        })
    }

    /// Refuse tokens that live longer than `max_s` seconds (`jwt_max_lifetime_s`,
    /// default none): `exp` further than `max_s` plus the leeway ahead of now, or, when
    /// the token carries a numeric `iat`, `exp - iat` over `max_s`
    /// ([`AuthError::LifetimeTooLong`]). `None` accepts any lifetime.
    pub fn with_max_lifetime_s(mut self, max_s: Option<u64>) -> Authenticator {
        self.max_lifetime_s = max_s;
        self
    }

    /// The pinned algorithm.
    pub fn algorithm(&self) -> JwtAlgorithm {
        self.algorithm
    }

    /// The names of the verification keys, for logs (`-` for one unnamed key; module
    /// `jwt_keys`).
    pub fn key_names(&self) -> String {
        self.keys.describe()
    }

    /// Verifies a token (the bare JWT, without `Bearer `) and returns its claims.
    ///
    /// The signature is checked with the pinned algorithm only (`alg: none` and any
    /// other `alg` are refused); then `exp` is required (a number), `sub` is required
    /// (a JSON string that is a [`UserId`]: non-empty, at most 128 bytes), `nbf` is checked
    /// when present, `iss`/`aud` are required and checked when configured; the leeway
    /// applies to `exp`/`nbf`. Tokens over [`MAX_TOKEN_BYTES`] are refused before any
    /// decoding.
    ///
    /// # Errors
    ///
    /// The [`AuthError`] naming the first rule broken. When a token breaks several
    /// claim rules at once, which one is reported is not specified.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        check_shape(token)?;

        let header = jsonwebtoken::decode_header(token).map_err(|err| map_jwt_error(&err))?;
        let key = self.keys.select(header.kid.as_deref())?;
        let data = jsonwebtoken::decode::<RawClaims>(token, key, &self.validation)
            .map_err(|err| map_jwt_error(&err))?;

        // RFC 7515 section 4.1.11: extensions listed in `crit` must be understood; we
        // understand none.
        if data.header.crit.is_some() {
            return Err(AuthError::Malformed);
        }

        // RFC 7519 section 4.1.1: `iss` is one string. jsonwebtoken also takes an array
        // holding the configured issuer; a configured issuer is only met by exactly it.
        if self.issuer.is_some() && !matches!(data.claims.iss, Some(Value::String(_))) {
            return Err(AuthError::BadIssuer);
        }

        let sub = match data.claims.sub {
            Some(Value::String(sub)) => UserId::try_from(sub).map_err(|_| AuthError::BadSubject)?,
            _ => return Err(AuthError::BadSubject),
        };
        let exp = data
            .claims
            .exp
            .as_ref()
            .and_then(numeric_date)
            .ok_or(AuthError::MissingExp)?;
        if let Some(max) = self.max_lifetime_s {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let ahead = exp.saturating_sub(now);
            let issued = data.claims.iat.as_ref().and_then(numeric_date);
            let lived = issued.map_or(0, |iat| exp.saturating_sub(iat));
            if ahead > max.saturating_add(self.validation.leeway) || lived > max {
                return Err(AuthError::LifetimeTooLong);
            }
        }
        Ok(Claims { sub, exp })
    }

    /// Mints an HS256 token `{sub, exp: now + ttl_s, iat: now}`, plus `iss`/`aud` when
    /// configured, so that it passes [`verify`](Self::verify).
    ///
    /// # Errors
    ///
    /// [`AuthError::BadSubject`] for a `sub` that `verify` would refuse;
    /// [`AuthError::Other`] when the pinned algorithm is not HS256 (there is no private
    /// key to sign with), or signing fails.
    pub fn mint(&self, sub: &str, ttl_s: u64) -> Result<String, AuthError> {
        let key = match (&self.encoding_key, self.algorithm) {
            (Some(key), JwtAlgorithm::Hs256) => key,
            _ => {
                return Err(AuthError::Other(format!(
                    "cannot mint tokens: jwt_algorithm is {}, minting needs HS256 and jwt_secret",
                    self.algorithm
                )))
            }
        };
        UserId::check(sub).map_err(|_| AuthError::BadSubject)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| AuthError::Other("system clock is before 1970".to_owned()))?
            .as_secs();
        let claims = MintClaims {
            sub,
            exp: now.saturating_add(ttl_s),
            iat: now,
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key)
            .map_err(|_| AuthError::Other("token signing failed".to_owned()))
    }
}

/// A random HS256 secret for dev mode: 32 random bytes from the OS, hex-encoded
/// (64 characters).
///
/// # Errors
///
/// [`AuthSetupError::Random`] when `getrandom` fails.
pub fn try_generate_secret() -> Result<String, AuthSetupError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|err| AuthSetupError::Random(err.to_string()))?;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    Ok(out)
}

/// Loads and checks the public key for RS256/ES256, so that a key which could never
/// verify anything stops the start instead of refusing every token as "bad signature".
pub(crate) fn public_key(
    algorithm: JwtAlgorithm,
    pem: &[u8],
) -> Result<DecodingKey, AuthSetupError> {
    let bad = |reason: &str| AuthSetupError::BadPublicKey {
        algorithm,
        reason: reason.to_owned(),
    };
    if contains(pem, b"PRIVATE KEY") {
        return Err(bad(
            "it is a private key; give the public key (openssl pkey -in KEY -pubout)",
        ));
    }
    let expected = "not a PEM public key of the expected type (PKCS#8 \"PUBLIC KEY\"\
                    , or PKCS#1 \"RSA PUBLIC KEY\" for RS256)";
    match algorithm {
        JwtAlgorithm::Rs256 => {
            let key =
                DecodingKey::from_rsa_pem(pem).map_err(|err| bad(key_problem(&err, expected)))?;
            // Parses the key with aws-lc, which the PEM decoder does not do.
            let jwk = Jwk::from_decoding_key(&key, Some(Algorithm::RS256))
                .map_err(|err| bad(key_problem(&err, expected)))?;
            let AlgorithmParameters::RSA(rsa) = &jwk.algorithm else {
                return Err(bad(expected));
            };
            // `n` is unpadded base64url of the big-endian modulus.
            let modulus_bytes = rsa.n.len() * 3 / 4;
            if !(256..=1024).contains(&modulus_bytes) {
                return Err(bad(
                    "the RSA modulus must be 2048 to 8192 bits (aws-lc refuses other sizes)",
                ));
            }
            Ok(key)
        }
        JwtAlgorithm::Es256 => {
            let key =
                DecodingKey::from_ec_pem(pem).map_err(|err| bad(key_problem(&err, expected)))?;
            let jwk = Jwk::from_decoding_key(&key, Some(Algorithm::ES256))
                .map_err(|err| bad(key_problem(&err, expected)))?;
            match &jwk.algorithm {
                AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                    Ok(key)
                }
                _ => Err(bad("ES256 needs a key on curve P-256 (prime256v1)")),
            }
        }
        JwtAlgorithm::Hs256 => Err(bad("HS256 uses jwt_secret, not a public key")),
    }
}

/// A fixed description of a key-loading error (the library's own text may quote input).
fn key_problem<'a>(err: &JwtError, expected: &'a str) -> &'a str {
    match err.kind() {
        ErrorKind::InvalidRsaKey(_) => "the RSA public key does not parse",
        ErrorKind::InvalidEcdsaKey => "the EC public key does not parse",
        _ => expected,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Cheap shape check before jsonwebtoken's base64/JSON work: three non-empty segments
/// of the base64url alphabet (no padding), separated by two dots.
fn check_shape(token: &str) -> Result<(), AuthError> {
    let mut dots = 0usize;
    let mut segment_len = 0usize;
    for &byte in token.as_bytes() {
        match byte {
            b'.' => {
                if segment_len == 0 || dots == 2 {
                    return Err(AuthError::Malformed);
                }
                dots += 1;
                segment_len = 0;
            }
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => segment_len += 1,
            _ => return Err(AuthError::Malformed),
        }
    }
    if dots == 2 && segment_len > 0 {
        Ok(())
    } else {
        Err(AuthError::Malformed)
    }
}

/// A JSON NumericDate as whole seconds, the way jsonwebtoken reads it (non-negative,
/// fractions rounded).
fn numeric_date(value: &Value) -> Option<u64> {
    if let Some(n) = value.as_u64() {
        return Some(n);
    }
    let f = value.as_f64()?;
    if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 {
        // In range and finite, so the cast neither saturates nor truncates past rounding.
        Some(f.round() as u64)
    } else {
        None
    }
}

/// Maps a jsonwebtoken error to our reason. Never carries the library's message along:
/// serde errors quote the decoded input.
fn map_jwt_error(err: &JwtError) -> AuthError {
    match err.kind() {
        ErrorKind::InvalidClaimFormat(claim) if claim == "exp" => AuthError::MissingExp,
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_)
        | ErrorKind::InvalidClaimFormat(_) => AuthError::Malformed,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => AuthError::WrongAlgorithm,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::BadIssuer,
        ErrorKind::InvalidAudience => AuthError::BadAudience,
        ErrorKind::InvalidSubject => AuthError::BadSubject,
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "exp" => AuthError::MissingExp,
            "sub" => AuthError::BadSubject,
            "iss" => AuthError::BadIssuer,
            "aud" => AuthError::BadAudience,
            "nbf" => AuthError::NotYetValid,
            _ => AuthError::Malformed,
        },
        ErrorKind::InvalidKeyFormat
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey => {
            AuthError::Other("the configured key cannot verify this token".to_owned())
        }
        _ => AuthError::Other("token verification failed".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

    // Test keys, generated once with openssl 3.0 for these tests only:
    //   openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out rsa.pem
    //   openssl pkey -in rsa.pem -pubout
    //   openssl rsa -pubin -in rsa.pub.pem -RSAPublicKey_out
    //   openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ec.pem
    //   openssl pkey -in ec.pem -pubout
    // plus a 1024-bit RSA and a P-384 public key that setup must refuse.
    const RSA_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCZBqerWUE4lNrW
ulV0XI8AXYYeQJCfe25r4epWhhgqhIvDR1wLAa5+L4yBo3zOjYrKV6XEytacgfYP
tPqLf4d8UqQ2ovIwYicpx1ay6btMR/asi3c/7nouppJzUbAMrVEZ0qQbmoK7GCh4
MLBpXuDZMn37x/8uXONN2j3WlaEelmaBi2OOBKDCBnihxggOn6LdJPz5z4L5jAZN
r+YDqwoQXGv/hCGfBOWphMz/+xSAxH1f+MsE69zrv+ZNXGj29/SJyaUPKcYNR30v
HXH484FDL+FSSBO3LYadm7h3LgzJMZmq+lvHK1eFJswbbVP/aIwISydZwm0sEVMI
mpz6y0TdAgMBAAECggEAICq8NaJoOZzeyJr4KiLnw3+lWPgg/olLe52MbT44V72v
hG/cawriM2/K1Rh4/JFXzrNwaubpiJIwF3qnXQoEgK99ieekSePkEB3xPWAxCTaq
ZXhWq6d1YxeMOvX9sBiBrxAug4ft+aa5IRS5DJlPYhDBV1sh6szHUj7xV0lySjOn
bEl6dEl1MuyxBx/GvlDLE8AHa0ch1tAZa58x6BaImDA8ZTEkxfDbdcKVI53T9Msd
7QyO6CtfiHbBeepd0hfxLl1Fzb6/Xlfw9QqjVGCbF/BqHUDG9rHQtK/SpSbgZuI0
CZIGgurQxPrbqu5mOlFOSDIxapTEjbrWKPqegJz4iQKBgQDVS+F0A2fL90C4QfMM
7c5r7sMFK5ACmGe10s8Srv5OO8PVGkdKhezQBa1zPQq4jX0wEuSYEy1n0sVbS/Sd
XdmZht6ZRzDx8htJoZuQi+GJknzVSs0csCuRpTXYoUgvHUcLtkalocoHK+anNzVT
ZZqxARdd5GH+97SXMgO0BPwWaQKBgQC3qblTthRGxqPNPwsSGD7LTKHXyC4KdZMe
ZA54ADQZxp2fsOmlZtK3lgryh+XJ9lpEJDFOE1KGebXSE5Y/aAJGzmnf3+Cv/42R
tP5ra8Lk3qivpscnmAM6HwRVC+KJ4ca4H82st2M+NNg8dVDgglMCEzPZkut1ikR5
34EGSea0VQKBgQCB/rsrP6AVGV4ibl85M/4ond3R2tjsHAKpOA/oLSrkd1xFFrz4
WGMZ7TvnDf7ot6Lil8EmRhnYOwb5O3OcLUSfYylrdY4JBytGVu4+zGHqvJLEU9Bq
eZw0KeKFYtZhkJBqPO8Vp2M/t6vdobIoX7ZFxop9OOHYyRMRSvQi1R7mcQKBgFNW
tnufwW+kLyuxEarySXwil8W8Vff1Bf7iVBZrsTiJAXk2465kC/W2Jd2LgN+145vL
+Ht/FRFkJPbgYGsBHRdYDn7Brcju4yRcxp2j1lnYFx8tRG1Y8w3qiSK2M+NxCaT+
+WsIBAZ0IDK+4SYevN/SKtLtcd5yEURkAL4DxqXJAoGAEjgZMDev9u8BkgggqAD5
P5b0ePouinJRzHXFxFAO4RFiheTbRQuUaMeCpl2b58EkLAE5LgVwuD7ZDULY2ROA
NitaSBL23Drv0mLMrtC1LJ7vU1bMIlsFXD7qudnrT1TCqi3bBv+e8AisA8+0rcFi
MkaqubmnvPn7ZZubPlWwtqQ=
-----END PRIVATE KEY-----
";

    const RSA_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAmQanq1lBOJTa1rpVdFyP
AF2GHkCQn3tua+HqVoYYKoSLw0dcCwGufi+MgaN8zo2KylelxMrWnIH2D7T6i3+H
fFKkNqLyMGInKcdWsum7TEf2rIt3P+56LqaSc1GwDK1RGdKkG5qCuxgoeDCwaV7g
2TJ9+8f/LlzjTdo91pWhHpZmgYtjjgSgwgZ4ocYIDp+i3ST8+c+C+YwGTa/mA6sK
EFxr/4QhnwTlqYTM//sUgMR9X/jLBOvc67/mTVxo9vf0icmlDynGDUd9Lx1x+POB
Qy/hUkgTty2GnZu4dy4MyTGZqvpbxytXhSbMG21T/2iMCEsnWcJtLBFTCJqc+stE
3QIDAQAB
-----END PUBLIC KEY-----
";

    const RSA_PUBLIC_PKCS1_PEM: &str = "-----BEGIN RSA PUBLIC KEY-----
MIIBCgKCAQEAmQanq1lBOJTa1rpVdFyPAF2GHkCQn3tua+HqVoYYKoSLw0dcCwGu
fi+MgaN8zo2KylelxMrWnIH2D7T6i3+HfFKkNqLyMGInKcdWsum7TEf2rIt3P+56
LqaSc1GwDK1RGdKkG5qCuxgoeDCwaV7g2TJ9+8f/LlzjTdo91pWhHpZmgYtjjgSg
wgZ4ocYIDp+i3ST8+c+C+YwGTa/mA6sKEFxr/4QhnwTlqYTM//sUgMR9X/jLBOvc
67/mTVxo9vf0icmlDynGDUd9Lx1x+POBQy/hUkgTty2GnZu4dy4MyTGZqvpbxytX
hSbMG21T/2iMCEsnWcJtLBFTCJqc+stE3QIDAQAB
-----END RSA PUBLIC KEY-----
";

    const EC_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgUBQb4Kb/twz2AUns
2BUsjzI0fl24XnzlRo/qdXcTxVWhRANCAAQaOpGJ3H1p3f/+kF4cZ2VhGTUPCNGS
kLY98J65JSxAMPdeS7PK/abbdqL9fq32AN5UUoP4e+WeQcm3OiD3CFJH
-----END PRIVATE KEY-----
";

    const EC_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEGjqRidx9ad3//pBeHGdlYRk1DwjR
kpC2PfCeuSUsQDD3Xkuzyv2m23ai/X6t9gDeVFKD+HvlnkHJtzog9whSRw==
-----END PUBLIC KEY-----
";

    const RSA_1024_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQCjvOT6v80680D5LgqfEpu5W/6o
8JNdPwTu3sCYLTXYH7zf4XwIrUNSTy+KT9P7PpfRch1xfPBXyzzb05XvDkCTMAmC
LgU9hMrwJX8JGyh7V4arUMN+KcmDtuGR7kcv18dyEU6ki0QwyUs3vdSFtVI2TUi1
gmoUdlh2rxi7ubDxgwIDAQAB
-----END PUBLIC KEY-----
";

    const EC_P384_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAE1VAimnpAsDX9WB7eI+gp8OHz5jJ/S6Qv
qyTHZh2/pLE1w88b0StSjaXXfdRemdwu7ofkTMkPz5RG7kC6BLso7Pe+K8C8lH+e
tj4IxjWsxrOBOkDOO8JN+h0myvDpL3Ii
-----END PUBLIC KEY-----
";

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn hs_settings() -> AuthSettings {
        AuthSettings {
            algorithm: JwtAlgorithm::Hs256,
            secret: Some(SECRET.to_owned()),
            public_key_pem: None,
            issuer: None,
            audience: None,
            leeway_s: 5,
        }
    }

    fn pem_settings(algorithm: JwtAlgorithm, pem: &str) -> AuthSettings {
        AuthSettings {
            algorithm,
            secret: None,
            public_key_pem: Some(pem.as_bytes().to_vec()),
            ..hs_settings()
        }
    }

    fn auth(settings: &AuthSettings) -> Authenticator {
        Authenticator::new(settings).unwrap()
    }

    fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
        encode(&Header::new(alg), claims, key).unwrap()
    }

    /// HS256 with the test secret.
    fn hs(claims: &Value) -> String {
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            claims,
        )
    }

    fn b64url(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    fn valid_claims() -> Value {
        json!({"sub": "u1", "exp": now() + 600})
    }

    /// Asserts the refusal reason and that neither the reason nor its Debug form
    /// carries the token or any part of it.
    fn refused(auth: &Authenticator, token: &str, expected: AuthError) {
        let err = auth.verify(token).unwrap_err();
        assert_eq!(err, expected, "token {token:.80}");
        for text in [err.to_string(), format!("{err:?}")] {
            assert!(!text.is_empty());
            for part in token.split('.').filter(|part| part.len() >= 4) {
                assert!(!text.contains(part), "{text:?} quotes the token");
            }
        }
    }

    #[test]
    fn valid_hs256_token_is_accepted() {
        let exp = now() + 600;
        let token = hs(&json!({"sub": "user-1", "exp": exp, "iat": now(), "extra": [1, 2]}));
        let claims = auth(&hs_settings()).verify(&token).unwrap();
        assert_eq!(
            claims,
            Claims {
                sub: UserId::parse("user-1").unwrap(),
                exp
            }
        );
    }

    #[test]
    fn empty_token_is_missing() {
        refused(&auth(&hs_settings()), "", AuthError::Missing);
    }

    #[test]
    fn garbage_and_wrong_shapes_are_malformed() {
        let a = auth(&hs_settings());
        let good = hs(&valid_claims());
        let segments: Vec<&str> = good.split('.').collect();
        let cases = [
            "not a jwt".to_owned(),
            "garbage".to_owned(),
            // two segments
            format!("{}.{}", segments[0], segments[1]),
            // four segments
            format!("{good}.{}", segments[2]),
            // empty segments
            format!("{}..{}", segments[0], segments[2]),
            format!(".{}.{}", segments[1], segments[2]),
            ".".to_owned(),
            "..".to_owned(),
            // characters outside base64url, padding
            format!("{}.{}.{}=", segments[0], segments[1], segments[2]),
            "ab+c.de/f.ghi".to_owned(),
            format!(" {good}"),
            format!("{good}\n"),
            // base64url alphabet but not valid base64 (one char segments)
            "a.b.c".to_owned(),
            // header is base64 of non-JSON
            format!("{}.{}.{}", b64url(b"not json"), segments[1], segments[2]),
            // header is JSON but not an object
            format!("{}.{}.{}", b64url(b"[1,2]"), segments[1], segments[2]),
        ];
        for token in &cases {
            refused(&a, token, AuthError::Malformed);
        }
    }

    #[test]
    fn signed_claims_that_are_not_an_object_are_malformed() {
        let a = auth(&hs_settings());
        refused(&a, &hs(&json!([1, 2, 3])), AuthError::Malformed);
        refused(&a, &hs(&json!("u1")), AuthError::Malformed);
    }

    #[test]
    fn wrong_secret_is_bad_signature() {
        let token = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"some other secret entirely, 32+ bytes"),
            &valid_claims(),
        );
        refused(&auth(&hs_settings()), &token, AuthError::BadSignature);
    }

    #[test]
    fn tampered_payload_is_bad_signature() {
        let a = auth(&hs_settings());
        let good = hs(&valid_claims());
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        parts[1] = b64url(
            json!({"sub": "admin", "exp": now() + 600})
                .to_string()
                .as_bytes(),
        );
        refused(&a, &parts.join("."), AuthError::BadSignature);
        // A signature of the right alphabet but not valid base64 for its length.
        parts[1] = good.split('.').nth(1).unwrap().to_owned();
        parts[2] = "A".to_owned();
        assert!(a.verify(&parts.join(".")).is_err());
    }

    #[test]
    fn alg_none_is_refused() {
        let a = auth(&hs_settings());
        let claims = b64url(valid_claims().to_string().as_bytes());
        for header in [
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"None"}"#,
            r#"{"alg":"NONE"}"#,
            r#"{"typ":"JWT"}"#,
            r#"{"alg":""}"#,
            r#"{"alg":null}"#,
        ] {
            let header = b64url(header.as_bytes());
            for signature in ["", "AAAA", "c2lnbmF0dXJl"] {
                let token = format!("{header}.{claims}.{signature}");
                let err = a.verify(&token).unwrap_err();
                assert!(
                    matches!(err, AuthError::WrongAlgorithm | AuthError::Malformed),
                    "{token}: {err:?}"
                );
                assert!(!err.to_string().contains(&claims));
            }
        }
    }

    #[test]
    fn other_hmac_algorithms_with_the_right_secret_are_refused() {
        let a = auth(&hs_settings());
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        for alg in [Algorithm::HS384, Algorithm::HS512] {
            refused(
                &a,
                &sign(alg, &key, &valid_claims()),
                AuthError::WrongAlgorithm,
            );
        }
    }

    #[test]
    fn rs256_and_es256_tokens_are_refused_when_hs256_is_pinned() {
        let a = auth(&hs_settings());
        let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).unwrap();
        let ec = EncodingKey::from_ec_pem(EC_PRIVATE_PEM.as_bytes()).unwrap();
        refused(
            &a,
            &sign(Algorithm::RS256, &rsa, &valid_claims()),
            AuthError::WrongAlgorithm,
        );
        refused(
            &a,
            &sign(Algorithm::ES256, &ec, &valid_claims()),
            AuthError::WrongAlgorithm,
        );
    }

    #[test]
    fn hs256_signed_with_the_public_key_is_refused_when_rs256_is_pinned() {
        // The classic key-confusion attack: the public key used as an HMAC secret.
        let a = auth(&pem_settings(JwtAlgorithm::Rs256, RSA_PUBLIC_PEM));
        for secret in [RSA_PUBLIC_PEM, RSA_PUBLIC_PKCS1_PEM] {
            let token = sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(secret.as_bytes()),
                &valid_claims(),
            );
            refused(&a, &token, AuthError::WrongAlgorithm);
        }
        let ec = EncodingKey::from_ec_pem(EC_PRIVATE_PEM.as_bytes()).unwrap();
        refused(
            &a,
            &sign(Algorithm::ES256, &ec, &valid_claims()),
            AuthError::WrongAlgorithm,
        );
        let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).unwrap();
        for alg in [Algorithm::RS384, Algorithm::RS512, Algorithm::PS256] {
            refused(
                &a,
                &sign(alg, &rsa, &valid_claims()),
                AuthError::WrongAlgorithm,
            );
        }
    }

    #[test]
    fn expired_beyond_leeway_is_refused() {
        let a = auth(&hs_settings()); // leeway 5 s
        refused(
            &a,
            &hs(&json!({"sub": "u1", "exp": now() - 60})),
            AuthError::Expired,
        );
        refused(&a, &hs(&json!({"sub": "u1", "exp": 0})), AuthError::Expired);
    }

    #[test]
    fn expired_within_leeway_is_accepted() {
        let a = auth(&AuthSettings {
            leeway_s: 60,
            ..hs_settings()
        });
        let exp = now() - 10;
        let claims = a.verify(&hs(&json!({"sub": "u1", "exp": exp}))).unwrap();
        assert_eq!(claims.exp, exp);
    }

    #[test]
    fn zero_leeway_is_not_the_library_default_of_60_s() {
        let a = auth(&AuthSettings {
            leeway_s: 0,
            ..hs_settings()
        });
        refused(
            &a,
            &hs(&json!({"sub": "u1", "exp": now() - 30})),
            AuthError::Expired,
        );
    }

    #[test]
    fn nbf_is_checked_with_leeway() {
        let a = auth(&AuthSettings {
            leeway_s: 30,
            ..hs_settings()
        });
        let exp = now() + 600;
        refused(
            &a,
            &hs(&json!({"sub": "u1", "exp": exp, "nbf": now() + 300})),
            AuthError::NotYetValid,
        );
        a.verify(&hs(&json!({"sub": "u1", "exp": exp, "nbf": now() + 10})))
            .unwrap();
        a.verify(&hs(&json!({"sub": "u1", "exp": exp, "nbf": now() - 10})))
            .unwrap();
    }

    #[test]
    fn string_nbf_is_refused() {
        let a = auth(&hs_settings());
        let token = hs(&json!({"sub": "u1", "exp": now() + 600, "nbf": "0"}));
        refused(&a, &token, AuthError::Malformed);
    }

    #[test]
    fn issuer_is_required_and_checked_when_configured() {
        let a = auth(&AuthSettings {
            issuer: Some("https://idp.example".to_owned()),
            ..hs_settings()
        });
        let exp = now() + 600;
        a.verify(&hs(
            &json!({"sub": "u1", "exp": exp, "iss": "https://idp.example"}),
        ))
        .unwrap();
        refused(
            &a,
            &hs(&json!({"sub": "u1", "exp": exp, "iss": "https://evil.example"})),
            AuthError::BadIssuer,
        );
        refused(
            &a,
            &hs(&json!({"sub": "u1", "exp": exp})),
            AuthError::BadIssuer,
        );
        refused(
            &a,
            &hs(&json!({"sub": "u1", "exp": exp, "iss": 42})),
            AuthError::BadIssuer,
        );
        // RFC 7519: one string; an array holding the issuer is not it.
        refused(
            &a,
            &hs(&json!({"sub": "u1", "exp": exp, "iss": ["https://idp.example"]})),
            AuthError::BadIssuer,
        );
    }

    #[test]
    fn issuer_is_ignored_when_not_configured() {
        let a = auth(&hs_settings());
        a.verify(&hs(
            &json!({"sub": "u1", "exp": now() + 600, "iss": "anyone"}),
        ))
        .unwrap();
    }

    #[test]
    fn audience_is_required_and_checked_when_configured() {
        let a = auth(&AuthSettings {
            audience: Some("agentwire".to_owned()),
            ..hs_settings()
        });
        let exp = now() + 600;
        a.verify(&hs(&json!({"sub": "u1", "exp": exp, "aud": "agentwire"})))
            .unwrap();
        a.verify(&hs(
            &json!({"sub": "u1", "exp": exp, "aud": ["other", "agentwire"]}),
        ))
        .unwrap();
        refused(
            &a,
            &hs(&json!({"sub": "u1", "exp": exp, "aud": "other"})),
            AuthError::BadAudience,
        );
        refused(
            &a,
            &hs(&json!({"sub": "u1", "exp": exp, "aud": ["other"]})),
            AuthError::BadAudience,
        );
        refused(
            &a,
            &hs(&json!({"sub": "u1", "exp": exp})),
            AuthError::BadAudience,
        );
    }

    #[test]
    fn audience_in_token_is_accepted_when_none_is_configured() {
        let a = auth(&hs_settings());
        let exp = now() + 600;
        a.verify(&hs(&json!({"sub": "u1", "exp": exp, "aud": "whatever"})))
            .unwrap();
        a.verify(&hs(&json!({"sub": "u1", "exp": exp, "aud": ["a", "b"]})))
            .unwrap();
    }

    #[test]
    fn bad_subjects_are_refused() {
        let a = auth(&hs_settings());
        let exp = now() + 600;
        for claims in [
            json!({"exp": exp}),
            json!({"sub": "", "exp": exp}),
            json!({"sub": 42, "exp": exp}),
            json!({"sub": null, "exp": exp}),
            json!({"sub": true, "exp": exp}),
            json!({"sub": 1.5, "exp": exp}),
            json!({"sub": "x".repeat(UserId::MAX_BYTES + 1), "exp": exp}),
            // 43 three-byte characters: 129 bytes in 43 chars
            json!({"sub": "€".repeat(43), "exp": exp}),
        ] {
            refused(&a, &hs(&claims), AuthError::BadSubject);
        }
    }

    #[test]
    fn subject_of_exactly_128_bytes_is_accepted() {
        let a = auth(&hs_settings());
        let sub = "x".repeat(UserId::MAX_BYTES);
        let claims = a
            .verify(&hs(&json!({"sub": sub, "exp": now() + 600})))
            .unwrap();
        assert_eq!(claims.sub, sub);
    }

    #[test]
    fn missing_or_non_numeric_exp_is_refused() {
        let a = auth(&hs_settings());
        for claims in [
            json!({"sub": "u1"}),
            json!({"sub": "u1", "exp": null}),
            // CVE-2026-25537: a string exp once skipped validation
            json!({"sub": "u1", "exp": (now() + 600).to_string()}),
            json!({"sub": "u1", "exp": "9999999999"}),
            json!({"sub": "u1", "exp": -1}),
            json!({"sub": "u1", "exp": 1e30}),
            json!({"sub": "u1", "exp": true}),
            json!({"sub": "u1", "exp": []}),
        ] {
            refused(&a, &hs(&claims), AuthError::MissingExp);
        }
    }

    #[test]
    fn structured_sub_or_exp_is_refused() {
        // jsonwebtoken's claim validator swallows the type error of a non-empty array
        // or object in `sub`/`exp`/`nbf` and then trips over the rest of the JSON, so
        // these come back as Malformed rather than BadSubject/MissingExp. Refused
        // either way; the reason may become the precise one in a later jsonwebtoken.
        let a = auth(&hs_settings());
        let exp = now() + 600;
        for (claims, precise) in [
            (json!({"sub": ["u1"], "exp": exp}), AuthError::BadSubject),
            (
                json!({"sub": {"id": "u1"}, "exp": exp}),
                AuthError::BadSubject,
            ),
            (json!({"sub": [], "exp": exp}), AuthError::BadSubject),
            (json!({"sub": "u1", "exp": [exp]}), AuthError::MissingExp),
            (
                json!({"sub": "u1", "exp": {"at": exp}}),
                AuthError::MissingExp,
            ),
            (
                json!({"sub": "u1", "exp": exp, "nbf": [1]}),
                AuthError::Malformed,
            ),
        ] {
            let err = a.verify(&hs(&claims)).unwrap_err();
            assert!(
                err == precise || err == AuthError::Malformed,
                "{claims}: {err:?}"
            );
        }
    }

    #[test]
    fn fractional_exp_is_accepted_and_rounded() {
        let a = auth(&hs_settings());
        let exp = now() + 600;
        let claims = a
            .verify(&hs(&json!({"sub": "u1", "exp": exp as f64 + 0.25})))
            .unwrap();
        assert_eq!(claims.exp, exp);
    }

    #[test]
    fn duplicate_claims_are_refused() {
        let a = auth(&hs_settings());
        let header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
        let exp = now() + 600;
        let payload = b64url(format!(r#"{{"sub":"u1","sub":"admin","exp":{exp}}}"#).as_bytes());
        let message = format!("{header}.{payload}");
        let signature = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::HS256,
        )
        .unwrap();
        refused(&a, &format!("{message}.{signature}"), AuthError::Malformed);
    }

    #[test]
    fn crit_header_is_refused() {
        let mut header = Header::new(Algorithm::HS256);
        header.crit = Some(vec!["exp".to_owned()]);
        let token = encode(
            &header,
            &valid_claims(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        refused(&auth(&hs_settings()), &token, AuthError::Malformed);
    }

    #[test]
    fn oversized_tokens_are_refused_before_decoding() {
        let a = auth(&hs_settings());
        let mib = "A".repeat(1 << 20);
        refused(&a, &mib, AuthError::TooLarge);
        // A well-formed, validly signed token over the limit is refused all the same.
        let big = hs(&json!({"sub": "u1", "exp": now() + 600, "pad": "p".repeat(8000)}));
        assert!(big.len() > MAX_TOKEN_BYTES);
        refused(&a, &big, AuthError::TooLarge);
        refused(&a, &"A".repeat(MAX_TOKEN_BYTES + 1), AuthError::TooLarge);
        // At the limit it is decoded (and here found malformed).
        refused(&a, &"A".repeat(MAX_TOKEN_BYTES), AuthError::Malformed);
    }

    #[test]
    fn mint_round_trips_through_verify() {
        let a = auth(&hs_settings());
        let before = now();
        let token = a.mint("user-7", 3600).unwrap();
        let claims = a.verify(&token).unwrap();
        assert_eq!(claims.sub, "user-7");
        assert!(claims.exp >= before + 3600 && claims.exp <= now() + 3600);
    }

    #[test]
    fn mint_adds_issuer_and_audience_when_configured() {
        let a = auth(&AuthSettings {
            issuer: Some("agentwire-dev".to_owned()),
            audience: Some("agentwire".to_owned()),
            ..hs_settings()
        });
        let token = a.mint("u1", 60).unwrap();
        assert_eq!(a.verify(&token).unwrap().sub, "u1");
        // Another authenticator with a different audience refuses it.
        let b = auth(&AuthSettings {
            issuer: Some("agentwire-dev".to_owned()),
            audience: Some("someone-else".to_owned()),
            ..hs_settings()
        });
        refused(&b, &token, AuthError::BadAudience);
    }

    #[test]
    fn mint_refuses_bad_subjects() {
        let a = auth(&hs_settings());
        assert_eq!(a.mint("", 60), Err(AuthError::BadSubject));
        assert_eq!(
            a.mint(&"x".repeat(UserId::MAX_BYTES + 1), 60),
            Err(AuthError::BadSubject)
        );
    }

    #[test]
    fn mint_with_huge_ttl_saturates() {
        let a = auth(&hs_settings());
        let token = a.mint("u1", u64::MAX).unwrap();
        assert_eq!(a.verify(&token).unwrap().exp, u64::MAX);
    }

    #[test]
    fn mint_needs_hs256() {
        for (alg, pem) in [
            (JwtAlgorithm::Rs256, RSA_PUBLIC_PEM),
            (JwtAlgorithm::Es256, EC_PUBLIC_PEM),
        ] {
            let a = auth(&AuthSettings {
                secret: Some(SECRET.to_owned()),
                ..pem_settings(alg, pem)
            });
            let err = a.mint("u1", 60).unwrap_err();
            assert!(matches!(err, AuthError::Other(_)), "{err:?}");
            assert!(err.to_string().contains("HS256"));
        }
    }

    /// An RS256 token with header `kid`.
    fn sign_kid(key: &EncodingKey, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_owned());
        encode(&header, claims, key).unwrap()
    }

    #[test]
    fn rs256_jwks_and_pem_lists_pick_the_key_by_kid() {
        let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).unwrap();
        let mut jwk = Jwk::from_encoding_key(&rsa, Algorithm::RS256).unwrap();
        jwk.common.key_id = Some("rsa-1".to_owned());
        let jwks = json!({"keys": [jwk]}).to_string();
        let pem_list =
            format!("kid: rsa-1\n{RSA_PUBLIC_PEM}kid: rsa-pkcs1\n{RSA_PUBLIC_PKCS1_PEM}");
        for file in [jwks.as_str(), pem_list.as_str()] {
            let a = auth(&pem_settings(JwtAlgorithm::Rs256, file));
            let good = sign_kid(&rsa, "rsa-1", &valid_claims());
            assert_eq!(a.verify(&good).unwrap().sub, "u1");
            refused(
                &a,
                &sign_kid(&rsa, "rsa-2", &valid_claims()),
                AuthError::UnknownKey,
            );
        }
        // Two keys in the list: a token without kid is refused, never tried on each.
        let a = auth(&pem_settings(JwtAlgorithm::Rs256, &pem_list));
        let no_kid = sign(Algorithm::RS256, &rsa, &valid_claims());
        refused(&a, &no_kid, AuthError::KidRequired);
        assert_eq!(a.key_names(), "rsa-1, rsa-pkcs1");
        // A 1024-bit RSA key in a JWKS, or an EC key under RS256 alone: refused at setup.
        let small = DecodingKey::from_rsa_pem(RSA_1024_PUBLIC_PEM.as_bytes()).unwrap();
        let small = Jwk::from_decoding_key(&small, Some(Algorithm::RS256)).unwrap();
        let small = json!({"keys": [small]}).to_string();
        let err = setup_error(&pem_settings(JwtAlgorithm::Rs256, &small));
        assert!(err.contains("2048 to 8192 bits"), "{err}");
        let ec = EncodingKey::from_ec_pem(EC_PRIVATE_PEM.as_bytes()).unwrap();
        let ec = Jwk::from_encoding_key(&ec, Algorithm::ES256).unwrap();
        let ec = json!({"keys": [ec]}).to_string();
        let err = setup_error(&pem_settings(JwtAlgorithm::Rs256, &ec));
        assert!(err.contains("no RS256 signing key"), "{err}");
    }

    #[test]
    fn rs256_tokens_verify_with_the_public_key() {
        let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).unwrap();
        let token = sign(Algorithm::RS256, &rsa, &valid_claims());
        for pem in [RSA_PUBLIC_PEM, RSA_PUBLIC_PKCS1_PEM] {
            let a = auth(&pem_settings(JwtAlgorithm::Rs256, pem));
            assert_eq!(a.verify(&token).unwrap().sub, "u1");
            refused(
                &a,
                &sign(
                    Algorithm::RS256,
                    &rsa,
                    &json!({"sub": "u1", "exp": now() - 60}),
                ),
                AuthError::Expired,
            );
        }
        // Tampered payload under an RSA signature.
        let a = auth(&pem_settings(JwtAlgorithm::Rs256, RSA_PUBLIC_PEM));
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = b64url(
            json!({"sub": "admin", "exp": now() + 600})
                .to_string()
                .as_bytes(),
        );
        refused(&a, &parts.join("."), AuthError::BadSignature);
    }

    #[test]
    fn es256_tokens_verify_with_the_public_key() {
        let ec = EncodingKey::from_ec_pem(EC_PRIVATE_PEM.as_bytes()).unwrap();
        let a = auth(&pem_settings(JwtAlgorithm::Es256, EC_PUBLIC_PEM));
        let token = sign(Algorithm::ES256, &ec, &valid_claims());
        assert_eq!(a.verify(&token).unwrap().sub, "u1");
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = b64url(
            json!({"sub": "admin", "exp": now() + 600})
                .to_string()
                .as_bytes(),
        );
        refused(&a, &parts.join("."), AuthError::BadSignature);
        // HS256 with the public key as secret, and RS256: both refused.
        let hs_token = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(EC_PUBLIC_PEM.as_bytes()),
            &valid_claims(),
        );
        refused(&a, &hs_token, AuthError::WrongAlgorithm);
        let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).unwrap();
        refused(
            &a,
            &sign(Algorithm::RS256, &rsa, &valid_claims()),
            AuthError::WrongAlgorithm,
        );
    }

    fn setup_error(settings: &AuthSettings) -> String {
        Authenticator::new(settings).unwrap_err().to_string()
    }

    #[test]
    fn setup_refuses_missing_or_empty_secret() {
        for secret in [None, Some(String::new())] {
            let msg = setup_error(&AuthSettings {
                secret,
                ..hs_settings()
            });
            assert!(msg.contains("jwt_secret"), "{msg}");
        }
    }

    #[test]
    fn setup_refuses_missing_or_unusable_public_keys() {
        let cases: [(JwtAlgorithm, Option<&str>); 10] = [
            (JwtAlgorithm::Rs256, None),
            (JwtAlgorithm::Es256, None),
            (JwtAlgorithm::Rs256, Some("")),
            (JwtAlgorithm::Rs256, Some("not a pem")),
            (JwtAlgorithm::Rs256, Some(RSA_PRIVATE_PEM)),
            (JwtAlgorithm::Rs256, Some(EC_PUBLIC_PEM)),
            (JwtAlgorithm::Rs256, Some(RSA_1024_PUBLIC_PEM)),
            (JwtAlgorithm::Es256, Some(RSA_PUBLIC_PEM)),
            (JwtAlgorithm::Es256, Some(EC_PRIVATE_PEM)),
            (JwtAlgorithm::Es256, Some(EC_P384_PUBLIC_PEM)),
        ];
        for (algorithm, pem) in cases {
            let settings = AuthSettings {
                algorithm,
                public_key_pem: pem.map(|pem| pem.as_bytes().to_vec()),
                ..hs_settings()
            };
            let msg = setup_error(&settings);
            assert!(msg.contains("jwt_public_key_file"), "{msg}");
            assert!(!msg.contains("MII"), "{msg} quotes key material");
        }
    }

    #[test]
    fn setup_refuses_bad_issuer_audience_and_leeway() {
        let msg = setup_error(&AuthSettings {
            issuer: Some(String::new()),
            ..hs_settings()
        });
        assert!(msg.contains("jwt_issuer"), "{msg}");
        let msg = setup_error(&AuthSettings {
            audience: Some(String::new()),
            ..hs_settings()
        });
        assert!(msg.contains("jwt_audience"), "{msg}");
        for leeway_s in [MAX_LEEWAY_S + 1, 5_000_000_000, u64::MAX] {
            let msg = setup_error(&AuthSettings {
                leeway_s,
                ..hs_settings()
            });
            assert!(msg.contains("jwt_leeway_s"), "{msg}");
        }
        auth(&AuthSettings {
            leeway_s: MAX_LEEWAY_S,
            ..hs_settings()
        });
    }

    #[test]
    fn setup_ignores_the_setting_of_the_other_algorithm_family() {
        // HS256 with a stray public key, RS256 with a stray secret.
        auth(&AuthSettings {
            public_key_pem: Some(b"junk".to_vec()),
            ..hs_settings()
        });
        auth(&AuthSettings {
            secret: Some("junk".to_owned()),
            ..pem_settings(JwtAlgorithm::Rs256, RSA_PUBLIC_PEM)
        });
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let settings = hs_settings();
        assert!(!format!("{settings:?}").contains(SECRET));
        assert!(!format!("{:?}", auth(&settings)).contains(SECRET));
    }

    #[test]
    fn algorithm_names_parse_case_insensitively() {
        for alg in [
            JwtAlgorithm::Hs256,
            JwtAlgorithm::Rs256,
            JwtAlgorithm::Es256,
        ] {
            assert_eq!(alg.as_str().parse::<JwtAlgorithm>(), Ok(alg));
            assert_eq!(
                alg.as_str().to_ascii_lowercase().parse::<JwtAlgorithm>(),
                Ok(alg)
            );
            assert_eq!(alg.to_string(), alg.as_str());
        }
        assert_eq!("Hs256".parse::<JwtAlgorithm>(), Ok(JwtAlgorithm::Hs256));
        for bad in ["none", "HS384", "", "RS 256"] {
            let err = bad.parse::<JwtAlgorithm>().unwrap_err();
            for name in ["HS256", "RS256", "ES256"] {
                assert!(err.contains(name), "{err}");
            }
        }
    }

    #[test]
    fn generated_secrets_are_64_hex_chars_and_differ() {
        let a = try_generate_secret().expect("the OS random number generator works");
        let b = try_generate_secret().expect("the OS random number generator works");
        assert_eq!(a.len(), 64);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(a, b);
        let auth = auth(&AuthSettings {
            secret: Some(a),
            ..hs_settings()
        });
        let token = auth.mint("u1", 60).unwrap();
        auth.verify(&token).unwrap();
    }

    #[test]
    fn error_messages_never_contain_the_token() {
        // Every reason is a fixed text: check them against a token whose claims would
        // be quoted by a careless error path (serde messages quote input).
        let a = auth(&AuthSettings {
            issuer: Some("iss".to_owned()),
            audience: Some("aud".to_owned()),
            ..hs_settings()
        });
        let secretish = "SUPERSECRETSUBJECTVALUE";
        for claims in [
            json!({"sub": secretish, "exp": secretish}),
            json!({"sub": [secretish], "exp": now() + 60, "iss": "iss", "aud": "aud"}),
            json!({"sub": "u1", "exp": now() + 60, "iss": secretish, "aud": "aud"}),
            json!({"sub": "u1", "exp": now() + 60, "iss": "iss", "aud": secretish}),
            json!({"sub": "u1", "exp": now() + 60, "iss": "iss", "aud": "aud", "nbf": secretish}),
        ] {
            let token = hs(&claims);
            let err = a.verify(&token).unwrap_err();
            for text in [err.to_string(), format!("{err:?}")] {
                assert!(!text.contains(secretish), "{text}");
                assert!(!text.contains(&token), "{text}");
            }
        }
        for err in [
            AuthError::Missing,
            AuthError::TooLarge,
            AuthError::Malformed,
            AuthError::BadSignature,
            AuthError::WrongAlgorithm,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::BadIssuer,
            AuthError::BadAudience,
            AuthError::BadSubject,
            AuthError::MissingExp,
            AuthError::LifetimeTooLong,
        ] {
            let text = err.to_string();
            assert!(!text.is_empty() && text.len() < 40, "{text}");
        }
    }

    #[test]
    fn max_lifetime_refuses_far_expiries_and_long_lived_tokens() {
        let a = auth(&hs_settings()).with_max_lifetime_s(Some(3600));
        let now = now();
        // exp 2^63: never expires without the bound.
        let forever = hs(&json!({"sub": "u1", "exp": 1u64 << 63}));
        assert!(auth(&hs_settings()).verify(&forever).is_ok());
        refused(&a, &forever, AuthError::LifetimeTooLong);
        refused(
            &a,
            &hs(&json!({"sub": "u1", "exp": now + 3600 + 60})),
            AuthError::LifetimeTooLong,
        );
        // Issued long ago for a long life, even with little of it left.
        refused(
            &a,
            &hs(&json!({"sub": "u1", "exp": now + 60, "iat": now - 7200})),
            AuthError::LifetimeTooLong,
        );
        // Within the bound (the leeway covers a clock a little behind the issuer's).
        for claims in [
            json!({"sub": "u1", "exp": now + 3600}),
            json!({"sub": "u1", "exp": now + 3603}),
            json!({"sub": "u1", "exp": now + 600, "iat": now}),
            json!({"sub": "u1", "exp": now + 3600, "iat": now}),
            json!({"sub": "u1", "exp": now + 600, "iat": "not a number"}),
        ] {
            assert!(a.verify(&hs(&claims)).is_ok(), "{claims}");
        }
        // None: any lifetime.
        let b = auth(&hs_settings()).with_max_lifetime_s(None);
        assert!(b.verify(&forever).is_ok());
    }

    #[test]
    fn authenticator_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Authenticator>();
        assert_send_sync::<AuthError>();
        assert_send_sync::<AuthSetupError>();
    }
}
