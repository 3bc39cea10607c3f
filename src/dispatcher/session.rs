//! An authenticated session and the table of live ones.
//!
//! A [`Session`] is born when the handshake ends with `Welcome` and is handed
//! to its service's handler, which owns it from then on. It carries a
//! [`Hangup`] signal: the master fires it at shutdown, and a reload fires it
//! for exactly the sessions whose user, verifier or service grant went away.
//! When the handler drops the session, its entry leaves the table and its
//! connection slot is freed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::auth::Credential;

/// The framed stream a service talks over: 4-byte big-endian length, then
/// the message.
pub type SessionStream = Framed<crate::wire::Transport, LengthDelimitedCodec>;

/// Tells a handler that it must end the session.
#[derive(Clone, Debug)]
pub struct Hangup(CancellationToken);

impl Hangup {
    /// Resolves when the session must end.
    pub async fn requested(&self) {
        self.0.cancelled().await
    }

    pub fn is_requested(&self) -> bool {
        self.0.is_cancelled()
    }
}

/// One authenticated session, owned by its service's handler.
pub struct Session {
    /// The authenticated user name.
    pub user: String,
    /// The service the session was routed to.
    pub service: String,
    pub peer: SocketAddr,
    /// 128 random bits, hex: unique per session, for logs and for clients.
    pub id: String,
    /// The heartbeat interval announced in `Welcome`.
    pub heartbeat_interval: std::time::Duration,
    pub stream: SessionStream,
    pub hangup: Hangup,
    pub(crate) _guard: SessionGuard,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("user", &self.user)
            .field("service", &self.service)
            .field("peer", &self.peer)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

pub(crate) struct LiveSession {
    pub(crate) user: String,
    pub(crate) service: String,
    pub(crate) id: String,
    /// What the login was checked against.
    pub(crate) credential: Credential,
    pub(crate) token: CancellationToken,
}

/// Every live session on the port.
#[derive(Default)]
pub(crate) struct SessionTable {
    live: Mutex<HashMap<u64, LiveSession>>,
    next: AtomicU64,
}

impl SessionTable {
    pub(crate) fn insert(
        self: &Arc<Self>,
        s: LiveSession,
        permit: Option<OwnedSemaphorePermit>,
    ) -> SessionGuard {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, s);
        SessionGuard {
            table: self.clone(),
            key,
            _permit: permit,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Runs `f` over a snapshot-free view of the table (under its lock).
    pub(crate) fn with<R>(&self, f: impl FnOnce(&HashMap<u64, LiveSession>) -> R) -> R {
        f(&self.live.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Removes the session from the table, and frees its connection slot, when
/// the handler is done with it.
pub(crate) struct SessionGuard {
    table: Arc<SessionTable>,
    key: u64,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.table
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

pub(crate) fn hangup_for(token: CancellationToken) -> Hangup {
    Hangup(token)
}

/// The users logged in over one connection that carries credentials with
/// every request (HTTP/2: gRPC's Basic credentials).
///
/// Each (user, service) that authenticates on the connection gets an entry in
/// the port's session table, tied to the connection's hang-up token: a reload
/// that revokes any of them hangs up the whole connection, as it would a
/// native session. The entries leave the table when the connection ends.
pub struct ConnectionSessions {
    id: String,
    token: CancellationToken,
    table: Arc<SessionTable>,
    /// Few per connection (usually one user), so a list.
    entries: Mutex<Vec<NotedLogin>>,
    /// The connection's slot among its address's strangers, until somebody
    /// logs in over it.
    stranger: Mutex<Option<super::strangers::StrangerPermit>>,
}

struct NotedLogin {
    user: String,
    service: String,
    credential: Credential,
    _guard: SessionGuard,
}

impl ConnectionSessions {
    pub(crate) fn new(table: Arc<SessionTable>, token: CancellationToken) -> Self {
        ConnectionSessions {
            id: super::handshake::session_id(),
            token,
            table,
            entries: Mutex::new(Vec::new()),
            stranger: Mutex::new(None),
        }
    }

    pub(crate) fn hold_stranger(&self, permit: super::strangers::StrangerPermit) {
        *self.stranger.lock().unwrap_or_else(|e| e.into_inner()) = Some(permit);
    }

    /// Fires at shutdown, or when a reload revokes a user of this connection.
    pub fn hangup(&self) -> Hangup {
        Hangup(self.token.clone())
    }

    /// Whether anybody has logged in over this connection.
    pub fn has_logins(&self) -> bool {
        !self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// The connection's id, for logs.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Called on every request that authenticates, so the common case (the
    /// user is already noted with this verifier) allocates nothing.
    pub(crate) fn note_login(&self, user: &str, service: &str, credential: &Credential) {
        self.stranger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = entries
            .iter()
            .position(|e| e.user == user && e.service == service)
        {
            if entries[i].credential == *credential {
                return;
            }
            entries.swap_remove(i);
        }
        let guard = self.table.insert(
            LiveSession {
                user: user.to_string(),
                service: service.to_string(),
                id: self.id.clone(),
                credential: credential.clone(),
                token: self.token.clone(),
            },
            None,
        );
        entries.push(NotedLogin {
            user: user.to_string(),
            service: service.to_string(),
            credential: credential.clone(),
            _guard: guard,
        });
    }
}
