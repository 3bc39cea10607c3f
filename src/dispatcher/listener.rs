//! The accept loop and the per-connection task.
//!
//! [`Dispatcher::serve`] accepts until shutdown. Each connection takes a slot
//! from the connection semaphore and runs in its own task, first sniffing,
//! then in the protocol it speaks. Over the limit, a small second pool of
//! slots tells the client it was refused (native: `OVERLOADED`; HTTP: 503);
//! past that, the connection is closed at once. At shutdown the loop stops
//! accepting and every task, including those still sniffing or in their
//! handshake, sees the shutdown token and ends, so shutdown never hangs on a
//! silent client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use bytes::BytesMut;

use super::sniff::{NATIVE_MAGIC, Protocol, sniff};
use super::strangers::StrangerPermit;
use super::{
    ConnectionSessions, Dispatcher, HttpConnection, HttpVersion, Shared, handshake, http1,
};
use crate::proto::RejectCode;
use crate::wire::{Rewind, Transport};

/// How long shutdown waits for connections to close before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl Dispatcher {
    /// Serves the port until `shutdown` is cancelled, then closes every
    /// connection and returns (after at most a few seconds).
    pub async fn serve(&self, listener: TcpListener, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => self.admit(stream, peer, &tracker, &shutdown),
                Err(e) => {
                    // Out of file descriptors, or a connection reset before
                    // we took it: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(listener);
        tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                still_open = tracker.len(),
                "some connections did not close within {SHUTDOWN_GRACE:?} of shutdown"
            );
        }
    }

    fn admit(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        let shared = self.shared.clone();
        let (max_connections, per_address) = {
            let l = shared.limits.read().unwrap_or_else(|e| e.into_inner());
            (l.max_connections, l.max_unauthenticated_per_address)
        };
        let refusal = match shared.connections.clone().try_acquire_owned() {
            Ok(permit) => match shared.strangers.admit(peer.ip(), per_address) {
                Some(stranger) => {
                    let t = tracker.clone();
                    tracker.spawn(connection(
                        shared,
                        stream,
                        peer,
                        (permit, stranger),
                        shutdown.clone(),
                        t,
                    ));
                    return;
                }
                None => Refusal::Address(per_address),
            },
            Err(_) => Refusal::Port(max_connections),
        };
        if let Some(silent) = shared.strangers.should_log(peer.ip(), refusal.reason()) {
            tracing::warn!(%peer, limit = refusal.limit(), refused_since_last_line = silent, "refused connection: {} (logged once a minute per address)", refusal.reason());
        }
        match shared.overflow.clone().try_acquire_owned() {
            Ok(slot) => {
                let shutdown = shutdown.clone();
                tracker.spawn(async move {
                    tokio::select! {
                        _ = refuse_overloaded(stream, refusal) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    drop(slot);
                });
            }
            Err(_) => drop(stream), // closed without a reply
        }
    }
}

/// Why a connection was refused at the door.
#[derive(Clone, Copy)]
enum Refusal {
    /// `max_connections` reached.
    Port(usize),
    /// `max_unauthenticated_per_address` reached for its address.
    Address(usize),
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::Port(_) => "connection limit reached",
            Refusal::Address(_) => "too many connections from this address that have not logged in",
        }
    }

    fn limit(self) -> usize {
        match self {
            Refusal::Port(n) | Refusal::Address(n) => n,
        }
    }
}

async fn connection(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    permits: (OwnedSemaphorePermit, StrangerPermit),
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let _ = stream.set_nodelay(true);
    let limits = shared
        .limits
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    // Sniffing, a TLS handshake and sniffing again inside it all fit in
    // the sniff deadline.
    let deadline = tokio::time::Instant::now() + limits.sniff_timeout;
    let sniffed = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = tokio::time::timeout_at(deadline, sniff(&mut stream)) => r,
    };
    let (protocol, buf) = match sniffed {
        Err(_) => {
            tracing::info!(%peer, timeout = ?limits.sniff_timeout, "refused connection: sent no recognisable protocol bytes before the deadline");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection failed while sniffing");
            return;
        }
        Ok(Ok(found)) => found,
    };
    shared.counters.connection(protocol);
    let tls = shared.tls.read().unwrap_or_else(|e| e.into_inner()).clone();
    if protocol != Protocol::Tls {
        if let Some(tls) = &tls
            && tls.require
            && protocol != Protocol::Closed
        {
            refuse_cleartext(
                stream, protocol, buf, peer, deadline, &shared, permits, shutdown, tracker, &limits,
            )
            .await;
            return;
        }
        dispatch(
            shared,
            Transport::Plain(stream),
            protocol,
            buf,
            peer,
            permits,
            shutdown,
            tracker,
            &limits,
        )
        .await;
        return;
    }
    let Some(tls) = tls else {
        tracing::info!(%peer, "refused connection: TLS is not configured on this port");
        return;
    };
    let accepted = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = tokio::time::timeout_at(deadline, tls.acceptor.accept(Rewind::new(buf.freeze(), stream))) => r,
    };
    let mut transport = match accepted {
        Ok(Ok(s)) => Transport::TlsServer(Box::new(crate::wire::transport::ServerTls {
            stream: s,
            certificate: tls.certificate.clone(),
        })),
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "refused connection: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, timeout = ?limits.sniff_timeout, "refused connection: TLS handshake not finished before the deadline");
            return;
        }
    };
    let sniffed = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = tokio::time::timeout_at(deadline, sniff(&mut transport)) => r,
    };
    let (inner, buf) = match sniffed {
        Ok(Ok((Protocol::Tls, buf))) => (Protocol::Unknown, buf),
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS connection failed while sniffing");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, timeout = ?limits.sniff_timeout, "refused TLS connection: sent no recognisable protocol bytes before the deadline");
            return;
        }
    };
    dispatch(
        shared, transport, inner, buf, peer, permits, shutdown, tracker, &limits,
    )
    .await;
}

/// Serves a connection whose protocol is known, over its transport, with
/// the bytes the sniffer read.
#[allow(clippy::too_many_arguments)]
async fn dispatch(
    shared: Arc<Shared>,
    stream: Transport,
    protocol: Protocol,
    mut buf: BytesMut,
    peer: SocketAddr,
    (permit, stranger): (OwnedSemaphorePermit, StrangerPermit),
    shutdown: CancellationToken,
    tracker: TaskTracker,
    limits: &crate::limits::Limits,
) {
    match protocol {
        Protocol::Native => {
            let rest = buf.split_off(NATIVE_MAGIC.len());
            handshake::serve(
                shared,
                stream,
                rest,
                peer,
                (permit, stranger),
                shutdown,
                tracker,
            )
            .await;
        }
        Protocol::Http1 | Protocol::Http2 => {
            let version = if protocol == Protocol::Http1 {
                HttpVersion::Http1
            } else {
                HttpVersion::Http2
            };
            match (shared.registry.http(), version) {
                (Some(handler), _) => {
                    let sessions = Arc::new(ConnectionSessions::new(
                        shared.sessions.clone(),
                        shutdown.child_token(),
                    ));
                    // Given back at the first login over the connection.
                    sessions.hold_stranger(stranger);
                    let tls = stream.is_tls();
                    let io = Rewind::new(buf.freeze(), stream);
                    // HTTP/1 gets what it had to send its first bytes in;
                    // HTTP/2, the time to log in.
                    let idle_timeout = match version {
                        HttpVersion::Http1 => limits.sniff_timeout,
                        HttpVersion::Http2 => limits.handshake_timeout,
                    };
                    handler
                        .serve(HttpConnection {
                            io,
                            peer,
                            version,
                            sessions,
                            idle_timeout,
                            tls,
                        })
                        .await;
                    drop(permit);
                }
                (None, HttpVersion::Http1) => {
                    http1::serve(stream, buf.freeze(), peer, limits.sniff_timeout, shutdown).await;
                    drop(stranger);
                }
                (None, HttpVersion::Http2) => {
                    tracing::info!(%peer, "refused connection: gRPC (HTTP/2) is not served on this port")
                }
            }
        }
        Protocol::Tls => {
            tracing::info!(%peer, "refused connection: TLS is not configured on this port");
        }
        Protocol::Unknown => {
            let shown = &buf[..buf.len().min(16)];
            tracing::info!(%peer, first_bytes = ?String::from_utf8_lossy(shown), "refused connection: not a protocol this port speaks (native SWYD/1, HTTP/1, HTTP/2, TLS)");
            close_gracefully(stream).await;
        }
        Protocol::Closed => {
            tracing::debug!(%peer, "connection closed before sending anything");
        }
    }
}

/// With `[master.tls] require = true`: a cleartext connection is told to
/// use TLS in its own protocol (native: `Reject` `PROTOCOL_ERROR`; HTTP/1:
/// 426), except HTTP/1 `GET /healthz`, which load balancers send in clear.
#[allow(clippy::too_many_arguments)]
async fn refuse_cleartext(
    mut stream: TcpStream,
    protocol: Protocol,
    mut buf: BytesMut,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
    shared: &Arc<Shared>,
    permits: (OwnedSemaphorePermit, StrangerPermit),
    shutdown: CancellationToken,
    tracker: TaskTracker,
    limits: &crate::limits::Limits,
) {
    const MESSAGE: &str = "this master requires TLS: connect with TLS (switchyard clients: --tls)";
    let reply = match protocol {
        Protocol::Native => handshake::reject_frame(RejectCode::ProtocolError, MESSAGE),
        Protocol::Http1 => {
            // The request line decides: `GET /healthz` may come in clear.
            let line = tokio::time::timeout_at(deadline, async {
                while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 1024 {
                    if stream.read_buf(&mut buf).await.ok()? == 0 {
                        return None;
                    }
                }
                Some(())
            })
            .await;
            if matches!(line, Ok(Some(())))
                && (buf.starts_with(b"GET /healthz ") || buf.starts_with(b"HEAD /healthz "))
            {
                dispatch(
                    shared.clone(),
                    Transport::Plain(stream),
                    protocol,
                    buf,
                    peer,
                    permits,
                    shutdown,
                    tracker,
                    limits,
                )
                .await;
                return;
            }
            let body = format!("switchyard: {MESSAGE}\n");
            format!(
                "HTTP/1.1 426 Upgrade Required\r\nupgrade: TLS/1.3, HTTP/1.1\r\nconnection: Upgrade, close\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        }
        _ => Vec::new(),
    };
    tracing::info!(%peer, protocol = protocol.name(), "refused cleartext connection: this master requires TLS");
    if !reply.is_empty() {
        let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&reply)).await;
    }
    close_gracefully(stream).await;
}

/// Tells a client over the connection limit that it was refused, in its own
/// protocol where we can tell it in time.
async fn refuse_overloaded(mut stream: TcpStream, refusal: Refusal) {
    let sniffed = tokio::time::timeout(Duration::from_secs(2), sniff(&mut stream)).await;
    let message = match refusal {
        Refusal::Port(_) => "the master has too many connections open; retry later",
        Refusal::Address(_) => {
            "too many connections from your address have not logged in; retry later"
        }
    };
    let reply: Option<Vec<u8>> = match sniffed {
        Ok(Ok((Protocol::Native, _))) => {
            Some(handshake::reject_frame(RejectCode::Overloaded, message))
        }
        Ok(Ok((Protocol::Http1, _))) => {
            let body = format!("switchyard: {message}\n");
            Some(
                format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes(),
            )
        }
        _ => None,
    };
    if let Some(reply) = reply {
        let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&reply)).await;
    }
    close_gracefully(stream).await;
}

/// Closes a connection so that a reply we just wrote reaches the client:
/// sends FIN, then reads (and drops) what the client still sends for a short,
/// bounded while, so that unread bytes do not turn our close into a reset
/// that destroys the reply.
pub(crate) async fn close_gracefully<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = io.shutdown().await;
        let mut sink = [0u8; 4096];
        let mut total = 0usize;
        while total < 64 * 1024 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}
