//! The limits of one port: plain data, made by the config and applied by
//! the dispatcher (re-exported as `dispatcher::Limits`). It lives apart from
//! both so that the config does not import the door.

use std::time::Duration;

use crate::auth::ThrottleConfig;

/// The limits of one port. Timeouts and the throttle can change on reload;
/// the connection limits are fixed when the port starts serving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, in any state; over it a native client gets
    /// `OVERLOADED` and an HTTP client a 503.
    pub max_connections: usize,
    /// Native connections in their handshake at once.
    pub max_handshakes: usize,
    /// How long a new connection has to send bytes we recognise.
    pub sniff_timeout: Duration,
    /// How long a native client has, after its magic, to finish the handshake.
    pub handshake_timeout: Duration,
    /// Announced in `Welcome`; services use it for their heartbeats.
    pub heartbeat_interval: Duration,
    /// Connections from one address that have not logged in, at once; over
    /// it a native client gets `OVERLOADED` and an HTTP client a 503.
    pub max_unauthenticated_per_address: usize,
    pub throttle: ThrottleConfig,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_handshakes: 256,
            sniff_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(10),
            max_unauthenticated_per_address: 64,
            throttle: ThrottleConfig::default(),
        }
    }
}
