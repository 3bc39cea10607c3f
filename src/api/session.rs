//! Web sessions: what a browser holds after logging in through the page.
//!
//! The page runs SCRAM-SHA-256 itself against two JSON endpoints
//! (`/api/v1/login/start`, `/api/v1/login/finish`); between them the
//! master keeps the login's state here, for [`LOGIN_TIMEOUT`] at most. A
//! login that succeeds makes a session: a cookie of 256 random bits
//! (`HttpOnly`, `SameSite=Strict`), of which the master keeps only the
//! SHA-256, with the user, what proved the login (the verifier the proof was
//! checked against; or, inside TLS on a master with `[[checker]]`s, a
//! password posted to `/api/v1/login/password` that one accepted), and a
//! CSRF token that forms and scripts must send back with every action.
//!
//! A session ends when it is idle for `[web] session_idle_timeout` (8 h
//! unless configured), when its user logs
//! out, and when a reload removes the user, changes their verifier or takes
//! their grant away: every request checks the session against the port's
//! current users and grants ([`crate::dispatcher::Dispatcher::login_still_valid`])
//! and forgets it if it no longer holds.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use crate::auth::Credential;
use crate::dispatcher::PendingScram;

/// The session cookie's name.
pub const COOKIE: &str = "switchyard_session";
/// The cookie holding the browser's device token (see
/// [`crate::auth::throttle`]): a browser that logged in before is not
/// throttled with an attacker at the same address.
pub const DEVICE_COOKIE: &str = "switchyard_device";
/// The header scripts send the CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// A login's proof must come this soon after its challenge.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Most logins waiting for their proof at once (a stranger cannot fill
/// memory with challenges).
const MAX_PENDING: usize = 16 * 1024;
/// Most logins one address may have waiting for their proof: one address
/// cannot take the slots every other address needs to log in.
const MAX_PENDING_PER_ADDRESS: usize = 8;
/// Most sessions kept; past it the least recently used is dropped.
const MAX_SESSIONS: usize = 10_000;
/// Form submissions remembered per session (what makes a double click one
/// build).
const MAX_SUBMISSIONS: usize = 64;

/// One logged-in browser.
struct WebSession {
    user: String,
    credential: Credential,
    csrf: String,
    last_used: Instant,
    /// Form submissions taken, and what each answered (`None` while it
    /// acts).
    submissions: VecDeque<(String, Option<String>)>,
}

/// A login waiting for its proof: when it began, from where.
type Waiting = (Instant, Option<std::net::IpAddr>, PendingScram);

/// What a request learns from a valid session cookie.
#[derive(Clone, Debug)]
pub struct SessionUser {
    pub user: String,
    /// The session's CSRF token, for the page's forms.
    pub csrf: String,
    pub(crate) key: [u8; 32],
    pub(crate) credential: Credential,
}

impl SessionUser {
    /// Whether `token` is this session's CSRF token (constant time).
    pub fn csrf_matches(&self, token: &str) -> bool {
        self.csrf.len() == token.len() && bool::from(self.csrf.as_bytes().ct_eq(token.as_bytes()))
    }
}

/// Every web session and every login in progress.
pub struct WebSessions {
    sessions: Mutex<HashMap<[u8; 32], WebSession>>,
    /// Logins waiting for their proof, by id.
    pending: Mutex<HashMap<String, Waiting>>,
    /// How long a session may go unused, in ms (a reload changes it).
    idle_ms: std::sync::atomic::AtomicU64,
}

/// Why a login could not be kept waiting.
#[derive(Debug, thiserror::Error)]
pub enum TooManyLogins {
    #[error("too many logins in progress from your address; finish one or retry in {} s", LOGIN_TIMEOUT.as_secs())]
    FromAddress,
    #[error("too many logins in progress; retry in a few seconds")]
    Overall,
}

fn random_token(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::fill(&mut b[..]);
    B64.encode(b)
}

fn key_of(cookie: &str) -> [u8; 32] {
    Sha256::digest(cookie.as_bytes()).into()
}

impl WebSessions {
    /// Sessions that end after `idle` unused.
    pub fn new(idle: Duration) -> Self {
        WebSessions {
            sessions: Default::default(),
            pending: Default::default(),
            idle_ms: std::sync::atomic::AtomicU64::new(idle.as_millis() as u64),
        }
    }

    /// Applies a new idle timeout (a reload) to every session.
    pub fn set_idle_timeout(&self, idle: Duration) {
        self.idle_ms.store(
            idle.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn idle(&self) -> Duration {
        Duration::from_millis(self.idle_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Keeps a login from `peer` waiting for its proof; returns its id.
    pub fn wait_for_proof(
        &self,
        login: PendingScram,
        peer: Option<std::net::IpAddr>,
    ) -> Result<String, TooManyLogins> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let from_peer = |p: &HashMap<String, Waiting>| {
            p.values()
                .filter(|(_, ip, _)| peer.is_some() && *ip == peer)
                .count()
        };
        if pending.len() >= MAX_PENDING || from_peer(&pending) >= MAX_PENDING_PER_ADDRESS {
            pending.retain(|_, (at, _, _)| at.elapsed() < LOGIN_TIMEOUT);
        }
        if from_peer(&pending) >= MAX_PENDING_PER_ADDRESS {
            return Err(TooManyLogins::FromAddress);
        }
        if pending.len() >= MAX_PENDING {
            return Err(TooManyLogins::Overall);
        }
        let id = random_token(16);
        pending.insert(id.clone(), (Instant::now(), peer, login));
        Ok(id)
    }

    /// The login waiting under `id`, if it has not timed out; it waits no
    /// more (a proof is checked once).
    pub fn take_login(&self, id: &str) -> Option<PendingScram> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (at, _, login) = pending.remove(id)?;
        (at.elapsed() < LOGIN_TIMEOUT).then_some(login)
    }

    /// Makes a session for a user who logged in: returns the cookie's
    /// value and the session's CSRF token.
    pub fn create(&self, user: &str, credential: Credential) -> (String, String) {
        let cookie = random_token(32);
        let csrf = random_token(16);
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if sessions.len() >= MAX_SESSIONS {
            let idle = self.idle();
            sessions.retain(|_, s| s.last_used.elapsed() < idle);
            if sessions.len() >= MAX_SESSIONS
                && let Some(oldest) = sessions
                    .iter()
                    .min_by_key(|(_, s)| s.last_used)
                    .map(|(k, _)| *k)
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            key_of(&cookie),
            WebSession {
                user: user.to_string(),
                credential,
                csrf: csrf.clone(),
                last_used: Instant::now(),
                submissions: VecDeque::new(),
            },
        );
        (cookie, csrf)
    }

    /// The session a cookie names, if it exists and is not idle too long;
    /// using it keeps it alive.
    pub fn lookup(&self, cookie: &str) -> Option<SessionUser> {
        let key = key_of(cookie);
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let s = sessions.get_mut(&key)?;
        if s.last_used.elapsed() >= self.idle() {
            sessions.remove(&key);
            return None;
        }
        s.last_used = Instant::now();
        Some(SessionUser {
            user: s.user.clone(),
            csrf: s.csrf.clone(),
            key,
            credential: s.credential.clone(),
        })
    }

    /// Ends a session (a logout, or a reload that invalidated it).
    pub fn end(&self, who: &SessionUser) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&who.key);
    }

    /// Reserves a form submission for this session, atomically: a double
    /// click's second request, arriving while the first still acts, finds
    /// it taken.
    pub fn begin_submission(&self, who: &SessionUser, submission: &str) -> Submission {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = sessions.get_mut(&who.key) else {
            return Submission::New;
        };
        if let Some((_, answer)) = s.submissions.iter().find(|(id, _)| id == submission) {
            return match answer {
                Some(a) => Submission::Answered(a.clone()),
                None => Submission::InProgress,
            };
        }
        if s.submissions.len() >= MAX_SUBMISSIONS {
            s.submissions.pop_front();
        }
        s.submissions.push_back((submission.to_string(), None));
        Submission::New
    }

    /// Records what a submission answered (`None`: it failed, and may be
    /// sent again).
    pub fn end_submission(&self, who: &SessionUser, submission: &str, answer: Option<&str>) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = sessions.get_mut(&who.key) {
            match answer {
                Some(a) => {
                    if let Some(slot) = s.submissions.iter_mut().find(|(id, _)| id == submission) {
                        slot.1 = Some(a.to_string());
                    }
                }
                None => s.submissions.retain(|(id, _)| id != submission),
            }
        }
    }
}

/// What [`WebSessions::begin_submission`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Submission {
    /// Not seen before: act on it.
    New,
    /// Being acted on by another request.
    InProgress,
    /// Acted on: this is where it sent the user.
    Answered(String),
}

/// A cookie's value from a request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `Set-Cookie` value for a cookie only the master reads: `HttpOnly`,
/// `SameSite=Strict`, for the whole site; `Secure` when the page came over
/// TLS (the browser then never sends it in clear).
pub fn set_cookie(name: &str, value: &str, max_age: Option<Duration>, secure: bool) -> String {
    let mut c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if secure {
        c.push_str("; Secure");
    }
    if let Some(age) = max_age {
        c.push_str(&format!("; Max-Age={}", age.as_secs()));
    }
    c
}
