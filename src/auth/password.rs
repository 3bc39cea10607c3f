//! Logins that carry the password itself (HTTP Basic, the web UI's
//! password login inside TLS, native PLAIN): why one is refused, the
//! `Basic` header, and the cache of recently accepted passwords.
//!
//! Checking a cleartext password against a SCRAM verifier costs one PBKDF2,
//! so successful checks are cached; the cache key is an HMAC of the user and
//! password under a random per-process key, so the cache never holds a
//! password, and the cache is dropped on every reload. The port's side of
//! these logins (the throttle, the checkers) is in `dispatcher::password`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::Credential;

/// Why a password login was refused. The `Display` text is what the client
/// is told; it is the same for a wrong password and an unknown user.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PasswordRefusal {
    #[error("missing credentials: send `authorization: Basic base64(user:password)`")]
    Missing,
    #[error("malformed credentials: expected `authorization: Basic base64(user:password)`")]
    Malformed,
    #[error("authentication failed: wrong user name or password")]
    Failed,
    #[error("too many failed logins for this user from this address; retry in {} s", .0.retry_secs())]
    Throttled(crate::auth::Refused),
    #[error("user {user:?} may not use service {service:?}")]
    NotAuthorized { user: String, service: String },
    #[error("the credential checker is unavailable; retry later")]
    CheckerDown,
    #[error("malformed SCRAM message: {0}")]
    BadScram(String),
}

/// Most cached logins; past it the cache starts over.
const CACHE_LIMIT: usize = 10_000;

/// How long a password a `[[checker]]` accepted is taken without asking it
/// again (a gRPC client sends its Basic credentials with every request).
pub const CHECKED_PASSWORD_CACHE: std::time::Duration = std::time::Duration::from_secs(60);

pub(crate) struct CredentialCache {
    key: [u8; 32],
    entries: Mutex<HashMap<[u8; 32], (Credential, Instant)>>,
}

impl CredentialCache {
    pub(crate) fn new() -> Self {
        let mut key = [0u8; 32];
        rand::fill(&mut key[..]);
        CredentialCache {
            key,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn slot(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut data = Vec::with_capacity(user.len() + 1 + password.len());
        data.extend_from_slice(user.as_bytes());
        data.push(0);
        data.extend_from_slice(password);
        crate::auth::verifier::hmac(&self.key, &data)
    }

    pub(crate) fn get(&self, slot: &[u8; 32]) -> Option<(Credential, Instant)> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(slot)
            .cloned()
    }

    pub(crate) fn insert(&self, slot: [u8; 32], credential: Credential) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CACHE_LIMIT {
            entries.clear();
        }
        entries.insert(slot, (credential, Instant::now()));
    }

    pub(crate) fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// A password login that succeeded.
#[derive(Debug)]
pub struct PasswordLogin {
    /// A fresh device token for the client (see [`crate::auth::throttle`]).
    pub device_token: String,
    /// What proved it: a session made from it lasts while this holds.
    pub credential: Credential,
}

/// Splits `Basic base64(user:password)`.
pub fn parse_basic(header: &str) -> Result<(String, String), PasswordRefusal> {
    let (scheme, rest) = header
        .trim()
        .split_once(' ')
        .ok_or(PasswordRefusal::Malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(PasswordRefusal::Malformed);
    }
    let decoded = B64
        .decode(rest.trim())
        .map_err(|_| PasswordRefusal::Malformed)?;
    let text = String::from_utf8(decoded).map_err(|_| PasswordRefusal::Malformed)?;
    let (user, password) = text.split_once(':').ok_or(PasswordRefusal::Malformed)?;
    if user.is_empty() {
        return Err(PasswordRefusal::Malformed);
    }
    Ok((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_basic() {
        let h = format!("Basic {}", B64.encode("alice:pa:ss"));
        assert_eq!(parse_basic(&h).unwrap(), ("alice".into(), "pa:ss".into()));
        assert_eq!(
            parse_basic(&format!("basic {}", B64.encode("a:"))).unwrap(),
            ("a".into(), "".into())
        );
        assert_eq!(parse_basic("Bearer xyz"), Err(PasswordRefusal::Malformed));
        assert_eq!(parse_basic("Basic !!!"), Err(PasswordRefusal::Malformed));
        assert_eq!(
            parse_basic(&format!("Basic {}", B64.encode("nocolon"))),
            Err(PasswordRefusal::Malformed)
        );
        assert_eq!(
            parse_basic(&format!("Basic {}", B64.encode(":pw"))),
            Err(PasswordRefusal::Malformed)
        );
    }
}
