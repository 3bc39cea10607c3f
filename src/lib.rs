//! Switchyard: a build master whose whole front door is one TCP port.
//!
//! The library holds everything; the `switchyard` binary is a thin command
//! line over it. Start with [`master::Master`] to run a master from a config
//! file, or with [`dispatcher::Dispatcher`] to serve your own services on a
//! port with the same handshake, and [`client`] to connect to one.
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use futures_util::{SinkExt, StreamExt};
//! use switchyard::auth::InMemoryChecker;
//! use switchyard::client::{self, Credentials};
//! use switchyard::dispatcher::{AccessPolicy, Dispatcher, Limits, ServiceOptions, Session};
//!
//! # #[tokio::main] async fn main() {
//! # tokio::time::timeout(std::time::Duration::from_secs(10), async {
//! let users = Arc::new(InMemoryChecker::new());
//! users.insert_password("alice", "wonderland");
//! let policy = AccessPolicy::default().grant("alice", ["shout"]);
//! let port = Dispatcher::new(Limits::default(), users, policy);
//!
//! // The service is on the port for as long as `_shout` lives.
//! let _shout = port
//!     .registry()
//!     .register("shout", ServiceOptions::default(), |mut s: Session| async move {
//!         while let Some(Ok(frame)) = s.stream.next().await {
//!             let _ = s.stream.send(Bytes::from(frame.to_ascii_uppercase())).await;
//!         }
//!     })
//!     .unwrap();
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let addr = listener.local_addr().unwrap().to_string();
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! tokio::spawn({
//!     let (port, shutdown) = (port.clone(), shutdown.clone());
//!     async move { port.serve(listener, shutdown).await }
//! });
//!
//! let alice = Credentials::new("alice", "wonderland");
//! let mut session = client::connect(&addr, "shout", &alice).await.unwrap();
//! session.stream.send(Bytes::from("hello")).await.unwrap();
//! assert_eq!(&session.stream.next().await.unwrap().unwrap()[..], b"HELLO");
//! shutdown.cancel();
//! # }).await.expect("the example finishes");
//! # }
//! ```
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod builds;
pub mod client;
pub mod config;
pub mod debug;
pub mod dispatcher;
pub mod grpc;
pub mod limits;
pub mod master;
pub mod pagecache;
pub mod services;
pub mod store;
pub mod wire;
pub mod worker;

/// Messages and gRPC services generated from `proto/switchyard/v1/*.proto`.
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/switchyard.v1.rs"));

    /// The encoded descriptors of every Switchyard `.proto` file, for gRPC
    /// server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/switchyard_descriptor.bin"));

    impl std::fmt::Debug for StepSecret {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "<secret:{}>", self.name)
        }
    }
}
