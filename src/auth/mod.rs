//! Who may log in: verifiers, the SCRAM exchange, pluggable checkers, and the
//! per-address throttle on failed logins.
//!
//! Every front door of the port (the native protocol now, gRPC's Basic
//! credentials later) asks the same [`Checker`], so one user namespace serves
//! the whole port.

pub mod command;
pub mod password;
pub mod scram;
pub mod throttle;
pub mod verifier;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;

pub use throttle::{Attempt, AuthThrottle, DeviceTokens, Refused, ThrottleConfig};
pub use verifier::{Verifier, VerifierError};

/// What a checker needs from the client to judge a login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    /// It hands out a user's stored verifier, so the password never has to
    /// cross the wire (SCRAM). Usable on any connection.
    Verifier,
    /// It can only judge the cleartext password (a directory service, an
    /// external program). It is consulted only where the password is
    /// protected by TLS, never on a plain connection.
    Cleartext,
}

/// How the connection a login arrives on is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    Plain,
    Tls,
}

/// What a login was checked against, kept with its session so that a reload
/// can tell whether the login still holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// A stored verifier: a SCRAM proof, or a password checked against it.
    /// The session ends when the user's verifier changes.
    Verifier(Verifier),
    /// A password a cleartext checker (`[[checker]]`) accepted. Nothing of it
    /// is kept; the session ends when the user leaves the config or gets a
    /// verifier (the secrets file then decides).
    Checked,
}

/// A checker could not give an answer (not: the answer was "no").
#[derive(Debug, thiserror::Error)]
pub enum CheckerError {
    #[error("credential checker unavailable: {0}")]
    Unavailable(String),
}

/// A source of credentials.
///
/// `Ok(None)` means "I do not know this user": a chain then asks the next
/// checker. Implementations say which [`Capability`] they have and implement
/// the matching method; the other keeps its default.
#[async_trait]
pub trait Checker: Send + Sync + 'static {
    fn capability(&self) -> Capability;

    /// The user's stored verifier ([`Capability::Verifier`] checkers).
    async fn verifier(&self, _user: &str) -> Result<Option<Verifier>, CheckerError> {
        Ok(None)
    }

    /// Judges a cleartext password ([`Capability::Cleartext`] checkers):
    /// `Some(true)` accepted, `Some(false)` refused, `None` unknown user.
    async fn check_cleartext(
        &self,
        _user: &str,
        _password: &[u8],
    ) -> Result<Option<bool>, CheckerError> {
        Ok(None)
    }
}

/// Checks a cleartext password against any checker, honouring the rule that
/// a cleartext-only checker never sees a password from a plain connection.
/// Against a verifier it costs one PBKDF2.
pub async fn check_password(
    checker: &dyn Checker,
    user: &str,
    password: &[u8],
    channel: Channel,
) -> Result<Option<bool>, CheckerError> {
    match checker.capability() {
        Capability::Verifier => Ok(checker
            .verifier(user)
            .await?
            .map(|v| v.matches_password(password))),
        Capability::Cleartext if channel == Channel::Tls => {
            checker.check_cleartext(user, password).await
        }
        Capability::Cleartext => Ok(None),
    }
}

/// Verifiers held in memory: for tests, for embedding, and as the store
/// behind the secrets file's checker (`config::SecretsFileChecker`).
#[derive(Default)]
pub struct InMemoryChecker {
    users: RwLock<Arc<HashMap<String, Verifier>>>,
}

impl InMemoryChecker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_map(users: HashMap<String, Verifier>) -> Self {
        InMemoryChecker {
            users: RwLock::new(Arc::new(users)),
        }
    }

    /// Adds or replaces one user's verifier.
    pub fn insert(&self, user: impl Into<String>, verifier: Verifier) {
        let mut guard = self.users.write().unwrap_or_else(|e| e.into_inner());
        Arc::make_mut(&mut guard).insert(user.into(), verifier);
    }

    /// Adds or replaces a user from a password (computes a verifier with the
    /// minimum iteration count).
    pub fn insert_password(&self, user: impl Into<String>, password: &str) {
        let v = Verifier::from_password(password.as_bytes(), verifier::MIN_ITERATIONS)
            .expect("minimum iteration count is in range");
        self.insert(user, v);
    }

    pub fn remove(&self, user: &str) {
        let mut guard = self.users.write().unwrap_or_else(|e| e.into_inner());
        Arc::make_mut(&mut guard).remove(user);
    }

    /// Swaps the whole set at once (a reload is all or nothing).
    pub fn replace(&self, users: HashMap<String, Verifier>) {
        *self.users.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(users);
    }

    /// The whole set as it is now (shared, not copied).
    pub fn snapshot(&self) -> Arc<HashMap<String, Verifier>> {
        self.users.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn get(&self, user: &str) -> Option<Verifier> {
        self.users
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
            .cloned()
    }
}

#[async_trait]
impl Checker for InMemoryChecker {
    fn capability(&self) -> Capability {
        Capability::Verifier
    }

    async fn verifier(&self, user: &str) -> Result<Option<Verifier>, CheckerError> {
        Ok(self.get(user))
    }
}

/// Asks several checkers in turn; the first that knows the user decides.
///
/// For SCRAM only the verifier-capable members are asked. A cleartext-only
/// member is asked only through [`check_password`] with [`Channel::Tls`].
pub struct ChainChecker {
    members: Vec<Arc<dyn Checker>>,
}

impl ChainChecker {
    pub fn new(members: Vec<Arc<dyn Checker>>) -> Self {
        ChainChecker { members }
    }

    /// Checks a cleartext password against each member in turn (see
    /// [`check_password`] for which members may see it).
    pub async fn check_password(
        &self,
        user: &str,
        password: &[u8],
        channel: Channel,
    ) -> Result<Option<bool>, CheckerError> {
        for m in &self.members {
            if let Some(answer) = check_password(m.as_ref(), user, password, channel).await? {
                return Ok(Some(answer));
            }
        }
        Ok(None)
    }
}

#[async_trait]
impl Checker for ChainChecker {
    /// A chain hands out verifiers from its verifier-capable members.
    fn capability(&self) -> Capability {
        Capability::Verifier
    }

    async fn verifier(&self, user: &str) -> Result<Option<Verifier>, CheckerError> {
        for m in &self.members {
            if m.capability() != Capability::Verifier {
                continue;
            }
            if let Some(v) = m.verifier(user).await? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }
}

/// Mock credentials for names no checker knows, so that a stranger cannot
/// tell which users exist: the salt is an HMAC of a per-master secret and the
/// name, so the same unknown name always gets the same salt, as a real user
/// does; the mock keys make the proof fail exactly as a wrong password does.
pub struct MockCredentials {
    secret: [u8; 32],
    /// The iteration count the mock challenges announce: the one most real
    /// verifiers use, so the count does not tell unknown users apart.
    iterations: std::sync::atomic::AtomicU32,
}

impl Default for MockCredentials {
    fn default() -> Self {
        Self::new()
    }
}

impl MockCredentials {
    /// A fresh random secret for this master process.
    pub fn new() -> Self {
        let mut secret = [0u8; 32];
        rand::fill(&mut secret[..]);
        Self::from_secret(secret)
    }

    /// Mock credentials from a secret kept elsewhere (the state database).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        MockCredentials {
            secret,
            iterations: std::sync::atomic::AtomicU32::new(verifier::MIN_ITERATIONS),
        }
    }

    /// Sets the iteration count of mock verifiers to the one most of
    /// `verifiers` use (the minimum when there are none).
    pub fn set_iterations_like<'a>(&self, verifiers: impl IntoIterator<Item = &'a Verifier>) {
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for v in verifiers {
            *counts.entry(v.iterations()).or_default() += 1;
        }
        let typical = counts
            .into_iter()
            .max_by_key(|&(iterations, n)| (n, std::cmp::Reverse(iterations)))
            .map_or(verifier::MIN_ITERATIONS, |(i, _)| i);
        self.iterations
            .store(typical, std::sync::atomic::Ordering::Relaxed);
    }

    /// A key for another purpose, derived from the secret (device tokens).
    pub fn derive_key(&self, purpose: &str) -> [u8; 32] {
        verifier::hmac(&self.secret, purpose.as_bytes())
    }

    pub fn verifier(&self, user: &str) -> Verifier {
        let tagged = |tag: &str| {
            let mut data = Vec::with_capacity(tag.len() + 1 + user.len());
            data.extend_from_slice(tag.as_bytes());
            data.push(0);
            data.extend_from_slice(user.as_bytes());
            verifier::hmac(&self.secret, &data)
        };
        let salt = tagged("salt")[..16].to_vec();
        Verifier::from_parts(
            self.iterations.load(std::sync::atomic::Ordering::Relaxed),
            salt,
            tagged("stored-key"),
            tagged("server-key"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Directory;

    #[async_trait]
    impl Checker for Directory {
        fn capability(&self) -> Capability {
            Capability::Cleartext
        }
        async fn check_cleartext(
            &self,
            user: &str,
            password: &[u8],
        ) -> Result<Option<bool>, CheckerError> {
            Ok((user == "ldap").then_some(password == b"secret"))
        }
    }

    #[tokio::test]
    async fn chain_asks_in_turn_and_hides_cleartext_checkers_on_plain_links() {
        let mem = Arc::new(InMemoryChecker::new());
        mem.insert_password("alice", "wonderland");
        let chain = ChainChecker::new(vec![Arc::new(Directory), mem]);
        assert!(chain.verifier("alice").await.unwrap().is_some());
        assert!(chain.verifier("ldap").await.unwrap().is_none());
        assert_eq!(
            chain
                .check_password("alice", b"wonderland", Channel::Plain)
                .await
                .unwrap(),
            Some(true)
        );
        assert_eq!(
            chain
                .check_password("ldap", b"secret", Channel::Plain)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            chain
                .check_password("ldap", b"secret", Channel::Tls)
                .await
                .unwrap(),
            Some(true)
        );
    }

    #[test]
    fn mock_salt_is_stable_per_name() {
        let m = MockCredentials::new();
        assert_eq!(m.verifier("ghost").salt(), m.verifier("ghost").salt());
        assert_ne!(m.verifier("ghost").salt(), m.verifier("ghast").salt());
    }
}
