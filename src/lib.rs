//! Switchyard: a build master whose whole front door is one TCP port.
//!
//! The library holds everything; the `switchyard` binary is a thin command
//! line over it. Start with [`master::Master`] to run a master from a config
//! file, or with [`dispatcher::Dispatcher`] to serve your own services on a
//! port with the same handshake, and [`client`] to connect to one.
#![forbid(unsafe_code)]

pub mod auth;
pub mod client;
pub mod config;
pub mod dispatcher;
pub mod master;
pub mod services;

/// Messages generated from `proto/switchyard/v1/*.proto`.
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/switchyard.v1.rs"));
}
