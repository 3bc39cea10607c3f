//! The throttle on failed logins, designed so that nobody without
//! credentials can keep somebody who has them from logging in.
//!
//! - Failures are counted per **(address, user)**, not per address: a
//!   stranger guessing `admin`'s password slows only `admin` from that
//!   address; everybody else at that address, and `admin` from anywhere
//!   else, is untouched. After `max_failures` within `window`, that pair is
//!   refused for `block`.
//! - A client that has logged in before presents the **device token** the
//!   master issued it on that login (OWASP's "device cookies"). Its attempts
//!   are counted against the token alone, so others' failures, from its own
//!   address included, never refuse it; a stolen token buys a thief no more
//!   guesses than a stranger gets.
//! - Attempts in flight count as failures until they end, so a burst of
//!   concurrent guesses cannot all pass before the first failure is counted.
//! - Failures from one address across all users (password spraying) make
//!   that address's further *failures* answer slowly (a progressive delay);
//!   a correct login is never delayed.
//!
//! The table is bounded: old entries are pruned, and when it is full of live
//! ones, entries that are only counting are dropped first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use subtle::ConstantTimeEq;

use super::verifier::{hmac, sha256};

/// Limits of the throttle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Failures of one (address, user) or one device token within `window`
    /// that start a block.
    pub max_failures: u32,
    pub window: Duration,
    pub block: Duration,
    /// How many keys the table tracks at most.
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

/// The longest an address's failure answers are delayed.
pub const MAX_FAILURE_DELAY: Duration = Duration::from_secs(5);

/// What an attempt is counted against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// An address and (a digest of) a user name: names are bounded in size
    /// in the table whatever a stranger sends.
    Pair(IpAddr, [u8; 16]),
    /// A device token (its digest).
    Device([u8; 16]),
    /// An address as a whole, for the spraying delay.
    Address(IpAddr),
}

impl Key {
    fn ip(&self) -> Option<IpAddr> {
        match self {
            Key::Pair(ip, _) | Key::Address(ip) => Some(*ip),
            Key::Device(_) => None,
        }
    }
}

fn digest(data: &[u8]) -> [u8; 16] {
    let mut d = [0u8; 16];
    d.copy_from_slice(&sha256(data)[..16]);
    d
}

#[derive(Default)]
struct Entry {
    window_start: Option<Instant>,
    failures: u32,
    in_flight: u32,
    blocked_until: Option<Instant>,
}

/// Why an attempt may not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Too many failures: retry after this long.
    Blocked(Duration),
    /// As many attempts are in flight as failures are still allowed: retry
    /// once they end.
    Busy,
}

impl Refused {
    /// Seconds to tell the client to wait.
    pub fn retry_secs(self) -> u64 {
        match self {
            Refused::Blocked(d) => d.as_secs().max(1),
            Refused::Busy => 1,
        }
    }
}

/// Shared by every front door of the port.
pub struct AuthThrottle {
    config: Mutex<ThrottleConfig>,
    table: Mutex<HashMap<Key, Entry>>,
    /// Woken whenever an attempt ends, for attempts waiting their turn.
    ended: tokio::sync::Notify,
}

/// One login attempt in flight. It counts as a failure until it ends; call
/// [`Attempt::failed`] or [`Attempt::succeeded`]. Dropped without either
/// (a protocol error, a timeout before the proof), it is forgotten.
pub struct Attempt {
    throttle: Arc<AuthThrottle>,
    key: Key,
    ip: Option<IpAddr>,
}

impl Attempt {
    /// Counts the failure. Returns how long to wait before answering it:
    /// more the more this address has failed lately.
    pub fn failed(self) -> Duration {
        let delay = self.throttle.end(&self.key, self.ip, true);
        std::mem::forget(self);
        delay
    }

    /// The login succeeded: the attempt is forgotten (failures stay counted
    /// until their window passes).
    pub fn succeeded(self) {
        self.throttle.end(&self.key, self.ip, false);
        std::mem::forget(self);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.throttle.end(&self.key, self.ip, false);
    }
}

impl AuthThrottle {
    pub fn new(config: ThrottleConfig) -> Self {
        AuthThrottle {
            config: Mutex::new(config),
            table: Mutex::new(HashMap::new()),
            ended: tokio::sync::Notify::new(),
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

    /// [`AuthThrottle::try_begin`], but an attempt that is only [`Refused::Busy`]
    /// waits (up to `patience`) for those in flight to end, so that a burst
    /// of good logins is served one after another rather than refused.
    pub async fn begin(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        user: &str,
        device: Option<[u8; 16]>,
        patience: Duration,
    ) -> Result<Attempt, Refused> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let ended = self.ended.notified();
            match self.try_begin(ip, user, device) {
                Err(Refused::Busy) if tokio::time::Instant::now() < deadline => {
                    // A bounded nap as well, in case a wake-up is missed.
                    let nap = tokio::time::sleep(Duration::from_millis(50));
                    tokio::select! {
                        _ = ended => {}
                        _ = nap => {}
                    }
                }
                other => return other,
            }
        }
    }

    /// Refuses at once when `user` from `ip` (or the device token) is
    /// blocked now; takes no place and counts nothing. For a password the
    /// port has already accepted: it is no guess, so it need not wait for
    /// the attempts in flight, but a block still holds.
    pub fn refuse_if_blocked(
        &self,
        ip: Option<IpAddr>,
        user: &str,
        device: Option<[u8; 16]>,
    ) -> Result<(), Refused> {
        let key = key_of(ip, user, device);
        let now = Instant::now();
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match table.get(&key).and_then(|e| e.blocked_until) {
            Some(until) if until > now => Err(Refused::Blocked(until - now)),
            _ => Ok(()),
        }
    }

    /// Starts an attempt by `user` from `ip`, or, when the client presented a
    /// valid device token, by that token (`device` is its id, from
    /// [`DeviceTokens::check`]).
    pub fn try_begin(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        user: &str,
        device: Option<[u8; 16]>,
    ) -> Result<Attempt, Refused> {
        let key = key_of(ip, user, device);
        let cfg = self.config();
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() >= cfg.max_tracked && !table.contains_key(&key) {
            prune(&mut table, &cfg, now);
        }
        let e = table.entry(key.clone()).or_default();
        refresh(e, &cfg, now);
        if let Some(until) = e.blocked_until {
            return Err(Refused::Blocked(until - now));
        }
        if e.failures + e.in_flight >= cfg.max_failures {
            return Err(Refused::Busy);
        }
        e.in_flight += 1;
        Ok(Attempt {
            throttle: self.clone(),
            key,
            ip,
        })
    }

    fn end(&self, key: &Key, ip: Option<IpAddr>, failed: bool) -> Duration {
        let cfg = self.config();
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = table.get_mut(key) {
            e.in_flight = e.in_flight.saturating_sub(1);
            if !failed && e.in_flight == 0 && e.failures == 0 && e.blocked_until.is_none() {
                // Nothing to remember: keep the table small.
                table.remove(key);
            }
        }
        if let Some(e) = table.get_mut(key).filter(|_| failed) {
            {
                refresh(e, &cfg, now);
                e.window_start.get_or_insert(now);
                e.failures += 1;
                if e.failures >= cfg.max_failures && e.blocked_until.is_none() {
                    e.blocked_until = Some(now + cfg.block);
                    tracing::warn!(
                        peer = ?key.ip(),
                        failures = e.failures,
                        block_secs = cfg.block.as_secs(),
                        "too many failed logins for one user from this address (or with one device token): refusing them for a while; `switchyard debug unblock ADDRESS` lifts it"
                    );
                }
            }
        }
        self.ended.notify_waiters();
        let Some(ip) = ip.filter(|_| failed) else {
            return Duration::ZERO;
        };
        // The address as a whole: a progressive delay on its failures.
        let e = table.entry(Key::Address(ip)).or_default();
        refresh(e, &cfg, now);
        e.window_start.get_or_insert(now);
        e.failures = e.failures.saturating_add(1);
        let excess = e.failures.saturating_sub(cfg.max_failures);
        if excess == 0 {
            Duration::ZERO
        } else {
            (Duration::from_millis(100) * 2u32.saturating_pow(excess.min(16)))
                .min(MAX_FAILURE_DELAY)
        }
    }

    /// Forgets every failure and block of `ip` (`switchyard debug
    /// unblock`). Returns how many entries it removed.
    pub fn unblock(&self, ip: IpAddr) -> usize {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let before = table.len();
        table.retain(|k, e| k.ip() != Some(ip) || e.in_flight > 0);
        for (k, e) in table.iter_mut() {
            if k.ip() == Some(ip) {
                *e = Entry {
                    in_flight: e.in_flight,
                    ..Entry::default()
                };
            }
        }
        before - table.len()
    }
}

/// Ends a block or a window that has passed.
fn refresh(e: &mut Entry, cfg: &ThrottleConfig, now: Instant) {
    if let Some(until) = e.blocked_until {
        if until > now {
            return;
        }
        e.blocked_until = None;
        e.failures = 0;
        e.window_start = None;
    }
    if e.window_start
        .is_some_and(|s| now.duration_since(s) > cfg.window)
    {
        e.window_start = None;
        e.failures = 0;
    }
}

fn prune(table: &mut HashMap<Key, Entry>, cfg: &ThrottleConfig, now: Instant) {
    table.retain(|_, e| {
        e.in_flight > 0
            || match e.blocked_until {
                Some(until) => until > now,
                None => e
                    .window_start
                    .is_some_and(|s| now.duration_since(s) <= cfg.window),
            }
    });
    if table.len() >= cfg.max_tracked {
        // Still full of live entries: forget the ones that are only counting.
        table.retain(|_, e| e.blocked_until.is_some() || e.in_flight > 0);
    }
}

/// What an attempt is counted under: the device token when the client
/// presented a valid one, else the address and the user.
fn key_of(ip: Option<IpAddr>, user: &str, device: Option<[u8; 16]>) -> Key {
    match (device, ip) {
        (Some(d), _) => Key::Device(d),
        (None, Some(ip)) => Key::Pair(ip, digest(user.as_bytes())),
        // No address (a connection not from the port): counted by user.
        (None, None) => Key::Device(digest(user.as_bytes())),
    }
}

/// How long a device token stays valid after it was issued. Every login
/// issues a fresh one, so a client that logs in at least this often keeps
/// its standing for good.
pub const DEVICE_TOKEN_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// Issues and checks device tokens: `<issued unix seconds>.<MAC>`, the MAC
/// an HMAC-SHA256 over the user and the time under a per-master key, so the
/// master keeps no table of them and they survive its restarts.
pub struct DeviceTokens {
    key: [u8; 32],
}

impl DeviceTokens {
    pub fn from_key(key: [u8; 32]) -> Self {
        DeviceTokens { key }
    }

    fn mac(&self, user: &str, issued: u64) -> [u8; 32] {
        let mut data = Vec::with_capacity(user.len() + 24);
        data.extend_from_slice(b"device\0");
        data.extend_from_slice(user.as_bytes());
        data.push(0);
        data.extend_from_slice(&issued.to_be_bytes());
        hmac(&self.key, &data)
    }

    /// A fresh token for `user`, who has just logged in.
    pub fn issue(&self, user: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!("{now}.{}", B64.encode(self.mac(user, now)))
    }

    /// The token's id if it is one this master issued to `user` and it has
    /// not expired; `None` for anything else (compared in constant time).
    pub fn check(&self, user: &str, token: &str) -> Option<[u8; 16]> {
        if token.is_empty() || token.len() > 128 {
            return None;
        }
        let (issued, mac) = token.split_once('.')?;
        let issued: u64 = issued.parse().ok()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if issued > now + 300 || now - issued.min(now) > DEVICE_TOKEN_LIFETIME.as_secs() {
            return None;
        }
        let mac = B64.decode(mac).ok()?;
        if !bool::from(mac.ct_eq(&self.mac(user, issued)[..])) {
            return None;
        }
        Some(digest(token.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(max: u32) -> Arc<AuthThrottle> {
        Arc::new(AuthThrottle::new(ThrottleConfig {
            max_failures: max,
            window: Duration::from_secs(60),
            block: Duration::from_secs(60),
            max_tracked: 100,
        }))
    }

    #[test]
    fn blocks_one_user_from_one_address_only() {
        let t = throttle(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            t.try_begin(Some(a), "admin", None).unwrap().failed();
        }
        assert!(matches!(
            t.try_begin(Some(a), "admin", None),
            Err(Refused::Blocked(_))
        ));
        assert!(t.try_begin(Some(a), "alice", None).is_ok());
        assert!(t.try_begin(Some(b), "admin", None).is_ok());
        assert_eq!(t.unblock(a), 2);
        assert!(t.try_begin(Some(a), "admin", None).is_ok());
    }

    #[test]
    fn attempts_in_flight_count_until_they_end() {
        let t = throttle(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<Attempt> = (0..3)
            .map(|_| t.try_begin(Some(a), "admin", None).unwrap())
            .collect();
        assert_eq!(
            t.try_begin(Some(a), "admin", None).err(),
            Some(Refused::Busy),
            "a fourth concurrent guess must wait"
        );
        drop(held);
        assert!(t.try_begin(Some(a), "admin", None).is_ok());
    }

    #[test]
    fn device_tokens_are_bound_to_their_user_and_unforgeable() {
        let d = DeviceTokens::from_key([7; 32]);
        let tok = d.issue("w1");
        assert!(d.check("w1", &tok).is_some());
        assert!(d.check("w2", &tok).is_none());
        assert!(DeviceTokens::from_key([8; 32]).check("w1", &tok).is_none());
        assert!(d.check("w1", "1.AAAA").is_none());
        assert!(d.check("w1", "garbage").is_none());
    }
}
