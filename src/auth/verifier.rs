//! The stored form of a password: a salted SCRAM-SHA-256 verifier.
//!
//! A verifier is what the secrets file holds instead of a password. It is
//! enough to check a SCRAM proof (and to prove the server's identity back to
//! the client), but not enough to log in: that needs the password, or the
//! ClientKey, neither of which is ever stored. The text form is PostgreSQL's:
//! `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, base64 parts.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The lowest iteration count we accept or produce (RFC 7677 asks for 4096).
pub const MIN_ITERATIONS: u32 = 4096;
/// The highest iteration count we accept: anything above is a typo or an
/// attempt to make a client burn its CPU.
pub const MAX_ITERATIONS: u32 = 10_000_000;
const PREFIX: &str = "SCRAM-SHA-256$";

/// Why a verifier string could not be used. The messages never repeat the
/// verifier itself, so they are safe to log.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifierError {
    #[error("a verifier must start with `SCRAM-SHA-256$` (make one with `switchyard passwd USER`)")]
    WrongScheme,
    #[error(
        "a verifier has the form `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (make one with `switchyard passwd USER`)"
    )]
    Malformed,
    #[error("the verifier's {0} is not valid base64")]
    Base64(&'static str),
    #[error("the verifier's {0} must be 32 bytes (a SHA-256 value)")]
    KeyLength(&'static str),
    #[error("the verifier's salt is empty")]
    EmptySalt,
    #[error("iteration count {0} is out of range: use {MIN_ITERATIONS} to {MAX_ITERATIONS}")]
    Iterations(u64),
}

/// A salted SCRAM-SHA-256 verifier for one user.
///
/// `Debug` never prints the keys; use [`Verifier::encode`] to get the stored
/// text form on purpose.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub(crate) iterations: u32,
    pub(crate) salt: Vec<u8>,
    pub(crate) stored_key: [u8; 32],
    pub(crate) server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

pub(crate) type HmacSha256 = hmac::Hmac<Sha256>;

pub(crate) fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// `Hi()` of RFC 5802: PBKDF2-HMAC-SHA-256 of the password.
pub fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, salt, iterations)
}

/// ClientKey, StoredKey and ServerKey from a SaltedPassword.
pub(crate) fn derive_keys(salted: &[u8; 32]) -> ([u8; 32], [u8; 32], [u8; 32]) {
    let client_key = hmac(salted, b"Client Key");
    let stored_key = sha256(&client_key);
    let server_key = hmac(salted, b"Server Key");
    (client_key, stored_key, server_key)
}

fn check_iterations(n: u64) -> Result<u32, VerifierError> {
    if (MIN_ITERATIONS as u64..=MAX_ITERATIONS as u64).contains(&n) {
        Ok(n as u32)
    } else {
        Err(VerifierError::Iterations(n))
    }
}

impl Verifier {
    /// Makes a verifier for `password` with a fresh random 16-byte salt.
    pub fn from_password(password: &[u8], iterations: u32) -> Result<Self, VerifierError> {
        let mut salt = vec![0u8; 16];
        rand::fill(&mut salt[..]);
        Self::from_password_and_salt(password, &salt, iterations)
    }

    /// Makes a verifier for `password` with the given salt (tests, and
    /// reproducing a known verifier).
    pub fn from_password_and_salt(
        password: &[u8],
        salt: &[u8],
        iterations: u32,
    ) -> Result<Self, VerifierError> {
        let iterations = check_iterations(iterations as u64)?;
        if salt.is_empty() {
            return Err(VerifierError::EmptySalt);
        }
        let salted = salted_password(password, salt, iterations);
        let (_, stored_key, server_key) = derive_keys(&salted);
        Ok(Verifier {
            iterations,
            salt: salt.to_vec(),
            stored_key,
            server_key,
        })
    }

    /// Builds a verifier from its parts; used for the mock credentials that an
    /// unknown user is challenged with.
    pub(crate) fn from_parts(
        iterations: u32,
        salt: Vec<u8>,
        stored_key: [u8; 32],
        server_key: [u8; 32],
    ) -> Self {
        Verifier {
            iterations,
            salt,
            stored_key,
            server_key,
        }
    }

    /// Parses the stored text form.
    pub fn parse(text: &str) -> Result<Self, VerifierError> {
        let rest = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(VerifierError::WrongScheme)?;
        let (params, keys) = rest.split_once('$').ok_or(VerifierError::Malformed)?;
        let (iterations, salt) = params.split_once(':').ok_or(VerifierError::Malformed)?;
        let (stored, server) = keys.split_once(':').ok_or(VerifierError::Malformed)?;
        let iterations: u64 = iterations.parse().map_err(|_| VerifierError::Malformed)?;
        let iterations = check_iterations(iterations)?;
        let salt = B64
            .decode(salt)
            .map_err(|_| VerifierError::Base64("salt"))?;
        if salt.is_empty() {
            return Err(VerifierError::EmptySalt);
        }
        let key = |s: &str, what: &'static str| -> Result<[u8; 32], VerifierError> {
            let bytes = B64.decode(s).map_err(|_| VerifierError::Base64(what))?;
            bytes.try_into().map_err(|_| VerifierError::KeyLength(what))
        };
        Ok(Verifier {
            iterations,
            salt,
            stored_key: key(stored, "StoredKey")?,
            server_key: key(server, "ServerKey")?,
        })
    }

    /// The stored text form, as `switchyard passwd` prints it.
    pub fn encode(&self) -> String {
        format!(
            "{PREFIX}{}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }

    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    pub fn salt(&self) -> &[u8] {
        &self.salt
    }

    /// Checks a cleartext password against this verifier in constant time
    /// (for protocols that carry the password itself, under TLS). Costs one
    /// PBKDF2.
    pub fn matches_password(&self, password: &[u8]) -> bool {
        let salted = salted_password(password, &self.salt, self.iterations);
        let (_, stored_key, server_key) = derive_keys(&salted);
        let a = stored_key.ct_eq(&self.stored_key);
        let b = server_key.ct_eq(&self.server_key);
        (a & b).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_password_check() {
        let v = Verifier::from_password(b"pencil", 4096).unwrap();
        let text = v.encode();
        assert!(text.starts_with("SCRAM-SHA-256$4096:"));
        let parsed = Verifier::parse(&text).unwrap();
        assert_eq!(parsed, v);
        assert!(parsed.matches_password(b"pencil"));
        assert!(!parsed.matches_password(b"pencil2"));
    }

    #[test]
    fn rejects_bad_forms_without_echoing_them() {
        assert_eq!(Verifier::parse("md5$abc"), Err(VerifierError::WrongScheme));
        assert_eq!(
            Verifier::parse("SCRAM-SHA-256$4096:c2FsdA==$AAAA"),
            Err(VerifierError::Malformed)
        );
        assert_eq!(
            Verifier::parse("SCRAM-SHA-256$100:c2FsdA==$AAAA:BBBB"),
            Err(VerifierError::Iterations(100))
        );
        assert_eq!(
            Verifier::parse("SCRAM-SHA-256$4096:c2FsdA==$AAAA:BBBB"),
            Err(VerifierError::KeyLength("StoredKey"))
        );
        assert_eq!(
            Verifier::parse("SCRAM-SHA-256$4096:!!$AAAA:BBBB"),
            Err(VerifierError::Base64("salt"))
        );
    }
}
