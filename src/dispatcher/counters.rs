//! What the port counts: connections by the protocol they spoke, logins by
//! outcome (native and HTTP Basic alike), sessions opened by service. The
//! port only counts; whoever reads [`PortCounters::snapshot`] (the
//! metrics) decides what to show.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::sniff::Protocol;

/// How a login ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginOutcome {
    Ok,
    /// A wrong user name or password.
    Failed,
    /// Refused by the login throttle before the password was checked.
    Throttled,
}

impl LoginOutcome {
    pub const ALL: [LoginOutcome; 3] = [
        LoginOutcome::Ok,
        LoginOutcome::Failed,
        LoginOutcome::Throttled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LoginOutcome::Ok => "ok",
            LoginOutcome::Failed => "failed",
            LoginOutcome::Throttled => "throttled",
        }
    }
}

/// The port's counters (all only ever grow).
#[derive(Default)]
pub struct PortCounters {
    connections: Mutex<BTreeMap<&'static str, u64>>,
    logins: [AtomicU64; 3],
    sessions: Mutex<BTreeMap<String, u64>>,
}

/// The counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortCounts {
    /// By protocol: `native`, `http1`, `http2`, `tls`, `unknown`, `closed`.
    pub connections: BTreeMap<&'static str, u64>,
    pub logins: BTreeMap<&'static str, u64>,
    /// Native sessions opened, by service.
    pub sessions: BTreeMap<String, u64>,
}

fn label(p: Protocol) -> &'static str {
    match p {
        Protocol::Native => "native",
        Protocol::Http1 => "http1",
        Protocol::Http2 => "http2",
        Protocol::Tls => "tls",
        Protocol::Unknown => "unknown",
        Protocol::Closed => "closed",
    }
}

impl PortCounters {
    pub(crate) fn connection(&self, p: Protocol) {
        *self
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(label(p))
            .or_insert(0) += 1;
    }

    pub(crate) fn login(&self, o: LoginOutcome) {
        self.logins[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn session(&self, service: &str) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        match sessions.get_mut(service) {
            Some(n) => *n += 1,
            None => {
                sessions.insert(service.to_string(), 1);
            }
        }
    }

    pub fn snapshot(&self) -> PortCounts {
        PortCounts {
            connections: self
                .connections
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            logins: LoginOutcome::ALL
                .iter()
                .map(|o| (o.as_str(), self.logins[*o as usize].load(Ordering::Relaxed)))
                .collect(),
            sessions: self
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}
