//! Per-address caps on connections that have not logged in ("strangers"),
//! and refusal logs that a flood cannot turn into a log flood.
//!
//! Every accepted connection takes a [`StrangerPermit`] for its address
//! before it is sniffed; the permit is given back when somebody logs in over
//! the connection (a native `Welcome`, an HTTP/2 request with good
//! credentials) or when the connection ends. So one address can hold at most
//! `max_unauthenticated_per_address` connections, and with them handshake
//! slots, without credentials: a stranger cannot fill the port for everyone.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often one address's refusals are logged at most.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Most addresses the refusal log remembers.
const MAX_LOGGED: usize = 4096;

/// When an address's refusal was last logged, and how many since were not.
type LogEntry = (Instant, u64);

/// Connections not logged in, per address.
#[derive(Default)]
pub(crate) struct Strangers {
    counts: Mutex<HashMap<IpAddr, usize>>,
    logged: Mutex<HashMap<(IpAddr, &'static str), LogEntry>>,
}

/// One connection from `ip` that has not logged in. Dropping it (the
/// connection logged in, or ended) gives the slot back.
pub(crate) struct StrangerPermit {
    strangers: Arc<Strangers>,
    ip: IpAddr,
}

impl Drop for StrangerPermit {
    fn drop(&mut self) {
        let mut counts = self
            .strangers
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

impl Strangers {
    /// A slot for a new connection from `ip`, unless it already has `max`.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<StrangerPermit> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(StrangerPermit {
            strangers: self.clone(),
            ip,
        })
    }

    /// Whether a refusal of `ip` for `why` should be logged now: once per
    /// address and reason per [`REFUSAL_LOG_INTERVAL`]. Returns how many
    /// were refused silently since the last line.
    pub(crate) fn should_log(&self, ip: IpAddr, why: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.len() >= MAX_LOGGED {
            logged.retain(|_, (at, _)| now.duration_since(*at) < REFUSAL_LOG_INTERVAL);
        }
        match logged.get_mut(&(ip, why)) {
            Some((at, silent)) if now.duration_since(*at) < REFUSAL_LOG_INTERVAL => {
                *silent += 1;
                None
            }
            Some((at, silent)) => {
                let n = *silent;
                *at = now;
                *silent = 0;
                Some(n)
            }
            None => {
                if logged.len() >= MAX_LOGGED {
                    return None; // full of live entries: stay quiet
                }
                logged.insert((ip, why), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_address_and_gives_slots_back() {
        let s = Arc::new(Strangers::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| s.admit(a, 3).unwrap()).collect();
        assert!(s.admit(a, 3).is_none());
        assert!(s.admit(b, 3).is_some());
        drop(held);
        assert!(s.admit(a, 3).is_some());
        assert_eq!(s.should_log(a, "x"), Some(0));
        assert_eq!(s.should_log(a, "x"), None);
        assert_eq!(s.should_log(a, "y"), Some(0));
    }
}
