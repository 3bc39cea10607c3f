//! The services built into the master.

pub mod ping;
