//! Build workers: the agent that runs on each build machine
//! (`switchyard worker`), and the protocol it speaks with the master over the
//! native session protocol, service `worker`.

/// The service workers log in to.
pub const SERVICE: &str = "worker";

pub mod agent;
mod download;
pub mod host;
mod link;
mod mask;
mod spool;
pub mod step;
pub mod upload;
