//! The verification keys of RS256/ES256 ([`KeySet`]): what `jwt_public_key_file` holds
//! (one PEM key, several PEM keys, or a JWKS document) and which key verifies a token
//! (its `kid` header). [`crate::auth::Authenticator`] holds one `KeySet`; SIGHUP builds
//! a new one from the file (`reactor/reload.rs`) and keeps the old one when that fails.
//!
//! # The file
//!
//! - **JWKS** (RFC 7517) when its first non-blank byte is `{`: `{"keys":[...]}`. Keys
//!   whose `use` is not `sig`, whose `alg` is another algorithm, or whose type does not
//!   fit the pinned algorithm (an EC key under RS256, a P-384 key under ES256) are
//!   skipped: identity providers publish such keys side by side. A key meant for the
//!   pinned algorithm that cannot be used (an RSA modulus outside 2048..=8192 bits,
//!   unparsable numbers) rejects the whole file, and so do none usable at all.
//! - **PEM** otherwise: one or more `PUBLIC KEY` (or `RSA PUBLIC KEY`) blocks. A line
//!   `kid: NAME` in the text before a block (RFC 7468 allows text between blocks) names
//!   that block's key.
//!
//! At most [`MAX_KEYS`] keys, and two keys may not share a kid.
//!
//! # Which key verifies a token
//!
//! - A set of **one key without a name** (one unlabelled PEM block: the file as it was
//!   before rotation existed) verifies every token, with or without `kid`.
//! - Otherwise every key has a name: its `kid` (JWKS), its `kid:` label (PEM), or else
//!   its RFC 7638 thumbprint (SHA-256, base64url), logged when the file is loaded. A
//!   token's `kid` must name one of them ([`AuthError::UnknownKey`] otherwise), and a
//!   token without `kid` is accepted only when the set holds exactly one key
//!   ([`AuthError::KidRequired`] otherwise).
//!
//! Why not try each key when a token has no `kid`: one token then costs up to
//! [`MAX_KEYS`] signature checks on the event loop (a flood of forged kid-less tokens
//! would multiply the loop's cost by the number of keys), and which key accepted a token
//! would depend on the order of the file. An issuer that rotates keys stamps `kid` on
//! its tokens (every common identity provider does); start doing so before adding the
//! second key.

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse, ThumbprintHash,
};
use jsonwebtoken::{Algorithm, DecodingKey};

use crate::auth::{AuthError, AuthSetupError, JwtAlgorithm};

/// Most keys one `jwt_public_key_file` may hold.
pub const MAX_KEYS: usize = 64;
/// Largest `jwt_public_key_file` read, in bytes (a JWKS of [`MAX_KEYS`] 8192-bit RSA
/// keys is about 100 KiB).
pub const MAX_KEY_FILE_BYTES: u64 = 1 << 20;
/// Longest kid accepted in a file (a token's longer kid simply matches nothing).
pub const MAX_KID_BYTES: usize = 256;

/// One verification key and its name.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
}

/// The verification keys of one `jwt_public_key_file` (see the module docs).
pub struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// A set of one unnamed key (HS256's secret, or a single unlabelled PEM key).
    pub fn single(key: DecodingKey) -> KeySet {
        KeySet {
            keys: vec![Key { kid: None, key }],
        }
    }

    /// Parse the contents of `jwt_public_key_file` for `algorithm` (RS256 or ES256).
    ///
    /// # Errors
    /// [`AuthSetupError::BadPublicKey`] naming what is wrong (never key material).
    pub fn parse(algorithm: JwtAlgorithm, file: &[u8]) -> Result<KeySet, AuthSetupError> {
        let bad = |reason: String| AuthSetupError::BadPublicKey { algorithm, reason };
        let first = file.iter().find(|b| !b.is_ascii_whitespace());
        let mut keys = if first == Some(&b'{') {
            jwks(algorithm, file).map_err(bad)?
        } else {
            pem_list(algorithm, file)?
        };
        if keys.len() > MAX_KEYS {
            return Err(bad(format!(
                "{} keys; at most {MAX_KEYS} per file",
                keys.len()
            )));
        }
        // Several keys: every key needs a name (its thumbprint when it has none).
        if keys.len() > 1 {
            for k in &mut keys {
                if k.kid.is_none() {
                    k.kid = Some(thumbprint(algorithm, &k.key).map_err(bad)?);
                }
            }
        }
        for (i, k) in keys.iter().enumerate() {
            if let Some(kid) = &k.kid {
                if keys.iter().skip(i + 1).any(|o| o.kid.as_ref() == Some(kid)) {
                    return Err(bad(format!("two keys have kid {kid:?}")));
                }
            }
        }
        Ok(KeySet { keys })
    }

    /// The key that verifies a token whose header carries `kid` (see the module docs).
    ///
    /// # Errors
    /// [`AuthError::UnknownKey`] for a kid no key has; [`AuthError::KidRequired`] for no
    /// kid while several keys are configured.
    pub fn select(&self, kid: Option<&str>) -> Result<&DecodingKey, AuthError> {
        if let [only] = self.keys.as_slice() {
            return match (&only.kid, kid) {
                (None, _) | (Some(_), None) => Ok(&only.key),
                (Some(have), Some(want)) if have == want => Ok(&only.key),
                (Some(_), Some(_)) => Err(AuthError::UnknownKey),
            };
        }
        let Some(want) = kid else {
            return Err(AuthError::KidRequired);
        };
        self.keys
            .iter()
            .find(|k| k.kid.as_deref() == Some(want))
            .map(|k| &k.key)
            .ok_or(AuthError::UnknownKey)
    }

    /// How many keys.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The names of the keys, in file order (`-` for the one unnamed key), for logs.
    pub fn describe(&self) -> String {
        self.keys
            .iter()
            .map(|k| k.kid.as_deref().unwrap_or("-"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The PEM blocks of the file, each with the `kid:` label of the text before it.
fn pem_list(algorithm: JwtAlgorithm, file: &[u8]) -> Result<Vec<Key>, AuthSetupError> {
    let bad = |reason: &str| AuthSetupError::BadPublicKey {
        algorithm,
        reason: reason.to_owned(),
    };
    let text = std::str::from_utf8(file).map_err(|_| bad("the file is neither PEM nor JWKS"))?;
    let mut keys = Vec::new();
    let mut label: Option<String> = None;
    let mut block: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(b) = block.as_mut() {
            b.push_str(trimmed);
            b.push('\n');
            if trimmed.starts_with("-----END ") {
                let pem = block.take().unwrap_or_default();
                let key = crate::auth::public_key(algorithm, pem.as_bytes())?;
                keys.push(Key {
                    kid: label.take(),
                    key,
                });
                if keys.len() > MAX_KEYS {
                    return Err(bad("more keys than the maximum of 64 per file"));
                }
            }
        } else if trimmed.starts_with("-----BEGIN ") {
            block = Some(format!("{trimmed}\n"));
        } else if let Some(name) = kid_label(trimmed) {
            if name.is_empty() || name.len() > MAX_KID_BYTES {
                return Err(bad("a kid: label must be 1 to 256 bytes"));
            }
            label = Some(name.to_owned());
        }
    }
    if block.is_some() {
        return Err(bad("a PEM block has no END line"));
    }
    if keys.is_empty() {
        // The same message as before key lists existed for a file with no key at all.
        return Err(crate::auth::public_key(algorithm, file)
            .err()
            .unwrap_or_else(|| bad("no PEM block")));
    }
    Ok(keys)
}

/// `kid: NAME` (any case of `kid`), the name trimmed.
fn kid_label(line: &str) -> Option<&str> {
    let (head, rest) = line.split_once(':')?;
    head.trim().eq_ignore_ascii_case("kid").then(|| rest.trim())
}

/// The usable keys of a JWKS document (see the module docs for what is skipped).
fn jwks(algorithm: JwtAlgorithm, file: &[u8]) -> Result<Vec<Key>, String> {
    let set: JwkSet = serde_json::from_slice(file)
        .map_err(|e| format!("the JWKS does not parse at line {}", e.line()))?;
    let want = match algorithm {
        JwtAlgorithm::Rs256 => KeyAlgorithm::RS256,
        JwtAlgorithm::Es256 => KeyAlgorithm::ES256,
        JwtAlgorithm::Hs256 => return Err("HS256 uses jwt_secret, not a key file".into()),
    };
    let mut keys = Vec::new();
    let mut skipped = 0usize;
    for (i, jwk) in set.keys.iter().enumerate() {
        let c = &jwk.common;
        let for_us = !matches!(c.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature)
            && c.key_algorithm.is_none_or(|a| a == want)
            && fits(algorithm, jwk);
        if !for_us {
            skipped += 1;
            continue;
        }
        if let Some(kid) = &c.key_id {
            if kid.is_empty() || kid.len() > MAX_KID_BYTES {
                return Err(format!("JWKS key {i}: kid must be 1 to 256 bytes"));
            }
        }
        check_params(algorithm, jwk).map_err(|why| format!("JWKS key {i}: {why}"))?;
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|_| format!("JWKS key {i}: its parameters do not parse"))?;
        keys.push(Key {
            kid: c.key_id.clone(),
            key,
        });
    }
    if keys.is_empty() {
        return Err(format!(
            "the JWKS holds no {algorithm} signing key ({skipped} other key(s) skipped)"
        ));
    }
    if skipped > 0 {
        log::info!(
            "jwt_public_key_file: {skipped} JWKS key(s) not for {algorithm} signing skipped"
        );
    }
    Ok(keys)
}

/// Whether a JWK's type is the pinned algorithm's (RSA for RS256, EC P-256 for ES256).
fn fits(algorithm: JwtAlgorithm, jwk: &Jwk) -> bool {
    match (&jwk.algorithm, algorithm) {
        (AlgorithmParameters::RSA(_), JwtAlgorithm::Rs256) => true,
        (AlgorithmParameters::EllipticCurve(ec), JwtAlgorithm::Es256) => {
            ec.curve == EllipticCurve::P256
        }
        _ => false,
    }
}

/// The checks setup makes on a key of the pinned algorithm: an RSA modulus of 2048 to
/// 8192 bits (aws-lc refuses other sizes), an EC key on P-256.
pub(crate) fn check_params(algorithm: JwtAlgorithm, jwk: &Jwk) -> Result<(), &'static str> {
    match (&jwk.algorithm, algorithm) {
        (AlgorithmParameters::RSA(rsa), JwtAlgorithm::Rs256) => {
            // `n` is unpadded base64url of the big-endian modulus.
            let modulus_bytes = rsa.n.len() * 3 / 4;
            if (256..=1024).contains(&modulus_bytes) {
                Ok(())
            } else {
                Err("the RSA modulus must be 2048 to 8192 bits (aws-lc refuses other sizes)")
            }
        }
        (AlgorithmParameters::EllipticCurve(ec), JwtAlgorithm::Es256) => {
            if ec.curve == EllipticCurve::P256 {
                Ok(())
            } else {
                Err("ES256 needs a key on curve P-256 (prime256v1)")
            }
        }
        _ => Err("the key type does not fit the pinned algorithm"),
    }
}

/// RFC 7638 thumbprint (SHA-256, base64url) of a public key.
fn thumbprint(algorithm: JwtAlgorithm, key: &DecodingKey) -> Result<String, String> {
    let alg = match algorithm {
        JwtAlgorithm::Rs256 => Algorithm::RS256,
        _ => Algorithm::ES256,
    };
    Jwk::from_decoding_key(key, Some(alg))
        .and_then(|jwk| jwk.thumbprint(ThumbprintHash::SHA256))
        .map_err(|_| "cannot compute a key's thumbprint".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Two P-256 public keys (openssl genpkey -algorithm EC -pkeyopt
    // ec_paramgen_curve:P-256; openssl pkey -pubout), for these tests only.
    const EC_A: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEGjqRidx9ad3//pBeHGdlYRk1DwjR
kpC2PfCeuSUsQDD3Xkuzyv2m23ai/X6t9gDeVFKD+HvlnkHJtzog9whSRw==
-----END PUBLIC KEY-----
";

    fn kids(set: &KeySet) -> String {
        set.describe()
    }

    #[test]
    fn one_unlabelled_pem_key_verifies_any_kid() {
        let set = KeySet::parse(JwtAlgorithm::Es256, EC_A.as_bytes()).unwrap();
        assert_eq!(kids(&set), "-");
        assert!(set.select(None).is_ok());
        assert!(set.select(Some("whatever")).is_ok());
    }

    #[test]
    fn a_labelled_key_needs_its_kid_or_none() {
        let file = format!("kid: one\n{EC_A}");
        let set = KeySet::parse(JwtAlgorithm::Es256, file.as_bytes()).unwrap();
        assert_eq!(kids(&set), "one");
        assert!(set.select(Some("one")).is_ok());
        assert!(set.select(None).is_ok());
        assert_eq!(set.select(Some("two")).err(), Some(AuthError::UnknownKey));
    }

    #[test]
    fn duplicate_kids_and_unterminated_blocks_are_refused() {
        let dup = format!("kid: k\n{EC_A}kid: k\n{EC_A}");
        assert!(KeySet::parse(JwtAlgorithm::Es256, dup.as_bytes()).is_err());
        let cut = &EC_A[..EC_A.len() - 30];
        assert!(KeySet::parse(JwtAlgorithm::Es256, cut.as_bytes()).is_err());
        assert!(KeySet::parse(JwtAlgorithm::Es256, b"").is_err());
        assert!(KeySet::parse(JwtAlgorithm::Es256, b"{\"keys\":[]}").is_err());
        assert!(KeySet::parse(JwtAlgorithm::Es256, b"{\"keys\":").is_err());
    }

    #[test]
    fn unlabelled_keys_of_a_list_are_named_by_thumbprint() {
        // The same key twice has the same thumbprint: refused as a duplicate kid.
        let twice = format!("{EC_A}{EC_A}");
        let err = KeySet::parse(JwtAlgorithm::Es256, twice.as_bytes()).err();
        assert!(format!("{err:?}").contains("two keys have kid"), "{err:?}");
        let mixed = format!("kid: named\n{EC_A}{EC_A}");
        let set = KeySet::parse(JwtAlgorithm::Es256, mixed.as_bytes()).unwrap();
        assert_eq!(set.len(), 2);
        let names = kids(&set);
        let thumb = names.split(", ").nth(1).unwrap().to_owned();
        assert_eq!(thumb.len(), 43, "{names}"); // 32 bytes of SHA-256, base64url
        assert!(set.select(Some(&thumb)).is_ok());
        assert_eq!(set.select(None).err(), Some(AuthError::KidRequired));
    }
}
