//! The services that sessions can be routed to, by name.
//!
//! As in Buildbot's `pbmanager`, [`ServiceRegistry::register`] returns a
//! [`Registration`]: holding it is what keeps a service on the port, and
//! dropping it (or calling [`Registration::unregister`]) is how the service
//! leaves. New sessions for a name that is not registered get
//! `UNKNOWN_SERVICE`; sessions already running are the handler's to finish.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};

use super::session::Session;

/// Per-service options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceOptions {
    /// The largest frame a session of this service may send or receive.
    pub max_frame_length: usize,
}

pub use crate::wire::DEFAULT_MAX_FRAME_LENGTH;

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            max_frame_length: DEFAULT_MAX_FRAME_LENGTH,
        }
    }
}

pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Serves authenticated sessions of one service. Each session runs in its
/// own task; the handler should return when the peer goes away or
/// [`Session::hangup`] fires.
pub trait SessionHandler: Send + Sync + 'static {
    fn serve(&self, session: Session) -> BoxFuture;
}

impl<F, Fut> SessionHandler for F
where
    F: Fn(Session) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn serve(&self, session: Session) -> BoxFuture {
        Box::pin(self(session))
    }
}

/// The registration name of the HTTP/2 handler. It contains a space, so no
/// native service can take it.
const HTTP: &str = "HTTP (HTTP/1.1 and HTTP/2)";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("service `{0}` is already registered on this port")]
    AlreadyRegistered(String),
    #[error(
        "`{0}` is not a valid service name (1 to 255 characters, no spaces or control characters)"
    )]
    InvalidName(String),
}

/// Serves whole HTTP connections (HTTP/1.1 and HTTP/2: gRPC, and whatever
/// else is mounted on its router). The handler owns the connection until it
/// returns; it must close it when [`ConnectionSessions::hangup`] fires.
///
/// [`ConnectionSessions::hangup`]: super::session::ConnectionSessions::hangup
pub trait ConnectionHandler: Send + Sync + 'static {
    fn serve(&self, conn: super::HttpConnection) -> BoxFuture;
}

#[derive(Clone)]
pub(crate) struct Route {
    id: u64,
    pub(crate) options: ServiceOptions,
    pub(crate) handler: Arc<dyn SessionHandler>,
}

/// The table of services on one port.
#[derive(Default)]
pub struct ServiceRegistry {
    routes: RwLock<HashMap<String, Route>>,
    http: RwLock<Option<(u64, Arc<dyn ConnectionHandler>)>>,
    next_id: AtomicU64,
}

impl ServiceRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Puts `handler` on the port under `name` until the returned
    /// registration is dropped.
    pub fn register(
        self: &Arc<Self>,
        name: &str,
        options: ServiceOptions,
        handler: impl SessionHandler,
    ) -> Result<Registration, RegistryError> {
        if name.is_empty()
            || name.len() > 255
            || name.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(RegistryError::InvalidName(name.to_string()));
        }
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        if routes.contains_key(name) {
            return Err(RegistryError::AlreadyRegistered(name.to_string()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        routes.insert(
            name.to_string(),
            Route {
                id,
                options,
                handler: Arc::new(handler),
            },
        );
        Ok(Registration {
            registry: Arc::downgrade(self),
            name: name.to_string(),
            id,
        })
    }

    /// Puts `handler` in charge of HTTP connections (HTTP/1.1 and HTTP/2)
    /// until the returned registration is dropped. Without one, HTTP/1
    /// gets `/healthz` and a note saying what the port speaks, and HTTP/2
    /// is refused.
    pub fn register_http(
        self: &Arc<Self>,
        handler: impl ConnectionHandler,
    ) -> Result<Registration, RegistryError> {
        let mut slot = self.http.write().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return Err(RegistryError::AlreadyRegistered(HTTP.to_string()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        *slot = Some((id, Arc::new(handler)));
        Ok(Registration {
            registry: Arc::downgrade(self),
            name: HTTP.to_string(),
            id,
        })
    }

    pub(crate) fn http(&self) -> Option<Arc<dyn ConnectionHandler>> {
        self.http
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, h)| h.clone())
    }

    pub(crate) fn route(&self, name: &str) -> Option<Route> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The names of the services on the port now, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.route(name).is_some()
    }
}

/// Keeps a service on the port. Drop it, or call
/// [`Registration::unregister`], to stop new sessions to the service.
#[must_use = "dropping the registration takes the service off the port at once"]
pub struct Registration {
    registry: Weak<ServiceRegistry>,
    name: String,
    id: u64,
}

impl Registration {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Takes the service off the port (the same as dropping this).
    pub fn unregister(self) {}
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(reg) = self.registry.upgrade() {
            if self.name == HTTP {
                let mut slot = reg.http.write().unwrap_or_else(|e| e.into_inner());
                if slot.as_ref().is_some_and(|(id, _)| *id == self.id) {
                    *slot = None;
                }
                return;
            }
            let mut routes = reg.routes.write().unwrap_or_else(|e| e.into_inner());
            if routes.get(&self.name).is_some_and(|r| r.id == self.id) {
                routes.remove(&self.name);
            }
        }
    }
}
