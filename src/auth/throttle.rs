//! A per-address throttle on failed logins.
//!
//! After `max_failures` failures from one IP address within `window`, further
//! attempts from it are refused for `block`. The block is logged once, when it
//! starts. The table is bounded: old entries are pruned, and when it is full of
//! live ones, the oldest non-blocked entries are dropped first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Limits of the throttle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThrottleConfig {
    pub max_failures: u32,
    pub window: Duration,
    pub block: Duration,
    /// How many addresses the table tracks at most.
    pub max_tracked: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            max_failures: 10,
            window: Duration::from_secs(60),
            block: Duration::from_secs(300),
            max_tracked: 65_536,
        }
    }
}

struct Entry {
    window_start: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
}

/// Shared by every front door of the port.
pub struct AuthThrottle {
    config: Mutex<ThrottleConfig>,
    table: Mutex<HashMap<IpAddr, Entry>>,
}

impl AuthThrottle {
    pub fn new(config: ThrottleConfig) -> Self {
        AuthThrottle {
            config: Mutex::new(config),
            table: Mutex::new(HashMap::new()),
        }
    }

    /// Applies new limits (a reload); what was counted so far stays.
    pub fn set_config(&self, config: ThrottleConfig) {
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
    }

    fn config(&self) -> ThrottleConfig {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `Err(remaining)` while `ip` is blocked.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match table.get(&ip).and_then(|e| e.blocked_until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Counts one failed login from `ip`.
    pub fn record_failure(&self, ip: IpAddr) {
        let cfg = self.config();
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() >= cfg.max_tracked && !table.contains_key(&ip) {
            prune(&mut table, &cfg, now);
        }
        let e = table.entry(ip).or_insert(Entry {
            window_start: now,
            failures: 0,
            blocked_until: None,
        });
        if let Some(until) = e.blocked_until {
            if until > now {
                return;
            }
            e.blocked_until = None;
            e.failures = 0;
            e.window_start = now;
        }
        if now.duration_since(e.window_start) > cfg.window {
            e.window_start = now;
            e.failures = 0;
        }
        e.failures += 1;
        if e.failures >= cfg.max_failures {
            e.blocked_until = Some(now + cfg.block);
            tracing::warn!(
                peer = %ip,
                failures = e.failures,
                block_secs = cfg.block.as_secs(),
                "too many failed logins from this address: refusing its logins for a while"
            );
        }
    }
}

fn prune(table: &mut HashMap<IpAddr, Entry>, cfg: &ThrottleConfig, now: Instant) {
    table.retain(|_, e| match e.blocked_until {
        Some(until) => until > now,
        None => now.duration_since(e.window_start) <= cfg.window,
    });
    if table.len() >= cfg.max_tracked {
        // Still full of live entries: forget the ones that are only counting.
        table.retain(|_, e| e.blocked_until.is_some());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_limit_and_only_that_address() {
        let t = AuthThrottle::new(ThrottleConfig {
            max_failures: 3,
            window: Duration::from_secs(60),
            block: Duration::from_secs(60),
            max_tracked: 10,
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        t.record_failure(a);
        t.record_failure(a);
        assert!(t.check(a).is_ok());
        t.record_failure(a);
        assert!(t.check(a).is_err());
        assert!(t.check(b).is_ok());
    }
}
