//! The Dispatcher: one TCP port for every kind of client.
//!
//! The [`listener`] accepts a connection, [`sniff`]s its first bytes under a
//! deadline, and hands it to the protocol it speaks. Native connections run
//! the SCRAM [`handshake`], then their [`Session`] goes to the handler that
//! the service's name is registered under in the [`ServiceRegistry`].
//!
//! A [`Dispatcher`] is cheap to clone: every clone shares the same state, so
//! the master can keep one to reload policy while another serves the port.

pub mod counters;
pub mod handshake;
mod http1;
pub mod listener;
pub mod password;
pub mod registry;
pub mod session;
pub mod sniff;
mod strangers;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use tokio::sync::Semaphore;

use crate::auth::{AuthThrottle, Checker, Credential, DeviceTokens, MockCredentials, Verifier};

pub use crate::limits::Limits;
pub use http1::PROTOCOLS_NOTE;
pub use password::{PasswordLogin, PasswordRefusal, PendingScram, ScramLogin, parse_basic};
pub use registry::{
    ConnectionHandler, Registration, RegistryError, ServiceOptions, ServiceRegistry, SessionHandler,
};
pub use session::{ConnectionSessions, Hangup, Session, SessionStream};

/// Which HTTP an [`HttpConnection`] speaks (the sniffer tells them apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// An HTTP connection (HTTP/1.1 or HTTP/2), handed whole to the registered
/// [`ConnectionHandler`] with the bytes the sniffer read replayed first.
pub struct HttpConnection {
    pub io: crate::wire::Rewind<crate::wire::Transport>,
    pub peer: std::net::SocketAddr,
    pub version: HttpVersion,
    /// Who has logged in over it; its hang-up fires at shutdown or when a
    /// reload revokes one of them.
    pub sessions: Arc<ConnectionSessions>,
    /// A connection on which nobody has logged in may stay idle (no request)
    /// this long before it is closed: a stranger cannot hold a slot for free.
    pub idle_timeout: std::time::Duration,
    /// It came inside TLS.
    pub tls: bool,
}

pub use crate::wire::MAX_HANDSHAKE_FRAME;

/// Which services each user may use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    users: BTreeMap<String, BTreeSet<String>>,
    /// Services granted to a whole group of names (every worker gets
    /// `worker`): one set per service rather than a set per user, so that
    /// thousands of workers cost thousands of names, not of maps.
    groups: Vec<(String, std::collections::HashSet<String>)>,
}

impl AccessPolicy {
    pub fn new(users: BTreeMap<String, BTreeSet<String>>) -> Self {
        AccessPolicy {
            users,
            groups: Vec::new(),
        }
    }

    /// Grants `service` to every name in `members`.
    pub fn with_group(mut self, service: &str, members: impl IntoIterator<Item = String>) -> Self {
        self.groups
            .push((service.to_string(), members.into_iter().collect()));
        self
    }

    /// Grants `user` the given services (adding the user if new).
    pub fn grant<S: Into<String>>(
        mut self,
        user: &str,
        services: impl IntoIterator<Item = S>,
    ) -> Self {
        self.users
            .entry(user.to_string())
            .or_default()
            .extend(services.into_iter().map(Into::into));
        self
    }

    pub fn has_user(&self, user: &str) -> bool {
        self.users.contains_key(user) || self.groups.iter().any(|(_, m)| m.contains(user))
    }

    pub fn allows(&self, user: &str, service: &str) -> bool {
        self.users.get(user).is_some_and(|s| s.contains(service))
            || self
                .groups
                .iter()
                .any(|(s, m)| s == service && m.contains(user))
    }

    /// The users with their own `[[user]]` grants.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }
}

pub(crate) struct Shared {
    pub(crate) limits: RwLock<Limits>,
    pub(crate) checker: Arc<dyn Checker>,
    pub(crate) mock: MockCredentials,
    pub(crate) throttle: Arc<AuthThrottle>,
    pub(crate) strangers: Arc<strangers::Strangers>,
    pub(crate) devices: DeviceTokens,
    pub(crate) policy: RwLock<Arc<AccessPolicy>>,
    pub(crate) registry: Arc<ServiceRegistry>,
    pub(crate) sessions: Arc<session::SessionTable>,
    pub(crate) connections: Arc<Semaphore>,
    pub(crate) handshakes: Arc<Semaphore>,
    /// Slots for telling clients over the connection limit that we are
    /// overloaded; past these, excess connections are just closed.
    pub(crate) overflow: Arc<Semaphore>,
    pub(crate) server_agent: String,
    pub(crate) credential_cache: crate::auth::password::CredentialCache,
    pub(crate) counters: counters::PortCounters,
    /// TLS on the port, if configured.
    pub(crate) tls: RwLock<Option<Arc<tls::TlsSettings>>>,
    /// Checkers that judge cleartext passwords (`[[checker]]`), asked after
    /// `checker` for users it does not know, and only inside TLS.
    pub(crate) password_checkers: RwLock<Option<Arc<crate::auth::ChainChecker>>>,
}

/// The port's shared state: checker, policy, registry, live sessions.
#[derive(Clone)]
pub struct Dispatcher {
    pub(crate) shared: Arc<Shared>,
}

/// What a revalidation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Revalidation {
    /// Sessions hung up, as (user, service, reason).
    pub hung_up: Vec<(String, String, &'static str)>,
    /// Sessions left alone.
    pub kept: usize,
}

impl Dispatcher {
    /// What the port has counted since it started.
    pub fn counts(&self) -> counters::PortCounts {
        self.shared.counters.snapshot()
    }
}

impl Dispatcher {
    /// A port whose unknown-user challenges derive from a fresh random
    /// secret (see [`Dispatcher::with_mock_secret`]).
    pub fn new(limits: Limits, checker: Arc<dyn Checker>, policy: AccessPolicy) -> Self {
        Self::with_mock_secret(limits, checker, policy, MockCredentials::new())
    }

    /// A port whose unknown-user challenges derive from `mock`. A master
    /// keeps that secret in its state database, so that an unknown user's
    /// salt stays the same across restarts, as a real user's does.
    pub fn with_mock_secret(
        limits: Limits,
        checker: Arc<dyn Checker>,
        policy: AccessPolicy,
        mock: MockCredentials,
    ) -> Self {
        let overflow = (limits.max_connections / 16).clamp(4, 256);
        Dispatcher {
            shared: Arc::new(Shared {
                connections: Arc::new(Semaphore::new(limits.max_connections)),
                handshakes: Arc::new(Semaphore::new(limits.max_handshakes)),
                overflow: Arc::new(Semaphore::new(overflow)),
                throttle: Arc::new(AuthThrottle::new(limits.throttle.clone())),
                strangers: Default::default(),
                devices: DeviceTokens::from_key(mock.derive_key("device-tokens")),
                limits: RwLock::new(limits),
                checker,
                mock,
                policy: RwLock::new(Arc::new(policy)),
                registry: ServiceRegistry::new(),
                sessions: Default::default(),
                server_agent: format!("switchyard/{}", env!("CARGO_PKG_VERSION")),
                credential_cache: crate::auth::password::CredentialCache::new(),
                counters: Default::default(),
                tls: RwLock::new(None),
                password_checkers: RwLock::new(None),
            }),
        }
    }

    /// The services on this port.
    pub fn registry(&self) -> &Arc<ServiceRegistry> {
        &self.shared.registry
    }

    pub fn limits(&self) -> Limits {
        self.shared
            .limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Serves TLS on the port with these settings from now on (`None`:
    /// no TLS). Connections already open keep what they have.
    pub fn set_tls(&self, settings: Option<tls::TlsSettings>) {
        *self.shared.tls.write().unwrap_or_else(|e| e.into_inner()) = settings.map(Arc::new);
    }

    /// Checkers that judge a user's password itself (`[[checker]]`), asked
    /// in turn after the port's checker, for users it does not know, and
    /// only for logins that arrived inside TLS (native `PLAIN`, HTTP Basic).
    /// An empty list removes them. Cached password checks are dropped.
    pub fn set_password_checkers(&self, checkers: Vec<Arc<dyn Checker>>) {
        let chain =
            (!checkers.is_empty()).then(|| Arc::new(crate::auth::ChainChecker::new(checkers)));
        *self
            .shared
            .password_checkers
            .write()
            .unwrap_or_else(|e| e.into_inner()) = chain;
        self.shared.credential_cache.clear();
    }

    /// The port's TLS settings now.
    pub fn tls(&self) -> Option<Arc<tls::TlsSettings>> {
        self.shared
            .tls
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forgets the failed logins and blocks of an address (an operator's
    /// `switchyard debug unblock`). Returns how many entries it removed.
    pub fn unblock(&self, ip: std::net::IpAddr) -> usize {
        let n = self.shared.throttle.unblock(ip);
        tracing::info!(peer = %ip, entries = n, "failed logins of this address forgotten");
        n
    }

    /// Makes unknown users' challenges announce the iteration count most of
    /// `verifiers` use, and cost the same work.
    pub fn set_typical_verifiers<'a>(&self, verifiers: impl IntoIterator<Item = &'a Verifier>) {
        self.shared.mock.set_iterations_like(verifiers);
    }

    /// Applies new timeouts and throttle limits. Connection limits keep the
    /// values the port started with; the returned list names any that differ.
    pub fn set_limits(&self, limits: Limits) -> Vec<&'static str> {
        let mut fixed = Vec::new();
        let mut cur = self
            .shared
            .limits
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if limits.max_connections != cur.max_connections {
            fixed.push("max_connections");
        }
        if limits.max_handshakes != cur.max_handshakes {
            fixed.push("max_handshakes");
        }
        self.shared.throttle.set_config(limits.throttle.clone());
        *cur = Limits {
            max_connections: cur.max_connections,
            max_handshakes: cur.max_handshakes,
            ..limits
        };
        fixed
    }

    pub fn policy(&self) -> Arc<AccessPolicy> {
        self.shared
            .policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies a new policy to new logins at once. Call
    /// [`Dispatcher::revalidate_sessions`] to apply it to live sessions.
    pub fn set_policy(&self, policy: AccessPolicy) {
        *self
            .shared
            .policy
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// Authenticated sessions open now.
    pub fn session_count(&self) -> usize {
        self.shared.sessions.len()
    }

    /// Hangs up exactly the live sessions whose user is gone, whose verifier
    /// changed, or whose user lost the session's service; leaves every other
    /// session alone. A checker that cannot answer right now keeps its
    /// sessions (it is logged): an outage must not log everybody out.
    pub async fn revalidate_sessions(&self) -> Revalidation {
        self.revalidate(None).await
    }

    /// As [`Dispatcher::revalidate_sessions`], for the sessions of these
    /// users only: a caller that knows which users changed spares the others
    /// even a lookup (a master with 10,000 workers reloads in milliseconds).
    pub async fn revalidate_users(&self, users: &BTreeSet<String>) -> Revalidation {
        self.revalidate(Some(users)).await
    }

    async fn revalidate(&self, only: Option<&BTreeSet<String>>) -> Revalidation {
        // Cached password checks were made against the old secrets.
        self.shared.credential_cache.clear();
        let users: BTreeSet<String> = match only {
            Some(only) => self.shared.sessions.with(|live| {
                live.values()
                    .filter(|s| only.contains(&s.user))
                    .map(|s| s.user.clone())
                    .collect()
            }),
            None => self
                .shared
                .sessions
                .with(|live| live.values().map(|s| s.user.clone()).collect()),
        };
        let mut current: HashMap<String, Option<Verifier>> = HashMap::new();
        let mut unknown = BTreeSet::new();
        for u in users {
            match self.shared.checker.verifier(&u).await {
                Ok(v) => {
                    current.insert(u, v);
                }
                Err(e) => {
                    tracing::warn!(user = %u, error = %e, "cannot recheck this user's credentials; keeping its sessions");
                    unknown.insert(u);
                }
            }
        }
        let policy = self.policy();
        let checkers = self
            .shared
            .password_checkers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        let mut result = Revalidation::default();
        self.shared.sessions.with(|live| {
            for s in live.values() {
                if only.is_some_and(|o| !o.contains(&s.user)) {
                    result.kept += 1;
                    continue;
                }
                if unknown.contains(&s.user) {
                    result.kept += 1;
                    continue;
                }
                let now = current.get(&s.user).cloned().flatten();
                let reason = match (&s.credential, now) {
                    _ if !policy.has_user(&s.user) => Some("user removed"),
                    (Credential::Verifier(old), Some(v)) if *old != v => Some("password changed"),
                    (Credential::Verifier(_), None) => Some("user removed"),
                    // The secrets file now decides for this user.
                    (Credential::Checked, Some(_)) => Some("password changed"),
                    (Credential::Checked, None) if !checkers => Some("password checker removed"),
                    _ if !policy.allows(&s.user, &s.service) => Some("service no longer granted"),
                    _ => None,
                };
                match reason {
                    Some(reason) => {
                        tracing::info!(user = %s.user, service = %s.service, session = %s.id, reason, "hanging up session after reload");
                        s.token.cancel();
                        result.hung_up.push((s.user.clone(), s.service.clone(), reason));
                    }
                    None => result.kept += 1,
                }
            }
        });
        result
    }
}
