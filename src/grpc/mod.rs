//! gRPC on the shared port: change hooks (`switchyard.v1.ChangeSource`),
//! health (`grpc.health.v1.Health`) and server reflection.
//!
//! The services are built once as tonic [`Routes`], mounted on the port's
//! one HTTP router ([`crate::api::router`]). The Dispatcher hands every HTTP
//! connection (HTTP/1.1 or HTTP/2) to [`HttpFrontDoor`], which serves it with
//! hyper on the very socket the listener accepted, so the master keeps a
//! handle on each connection: it closes them at shutdown, and closes one at
//! once when a reload revokes a user who logged in over it.
//!
//! Credentials are per request: `authorization: Basic base64(user:password)`,
//! checked by the port's checkers against the port's grants ([`GrpcAuth`]).
//! Health and reflection need none, so load balancers and `grpcurl` work.

pub mod change_source;
pub mod client;
pub mod spool;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tonic::service::Routes;
use tonic::{Request, Status};
use tower::ServiceExt;

use crate::dispatcher::registry::BoxFuture;
use crate::dispatcher::{
    ConnectionHandler, ConnectionSessions, Dispatcher, HttpConnection, HttpVersion,
    PasswordRefusal, parse_basic,
};

/// How long a connection being closed (shutdown, or a revoked user) may take
/// to finish the requests it has in flight.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Requests one HTTP/2 connection may have open at once.
const MAX_STREAMS: u32 = 64;

/// The most header bytes one request may carry: gRPC needs a few hundred.
const MAX_HEADER_LIST: u32 = 64 * 1024;

/// The request header a client presents its device token in, and the
/// response header a successful login returns a fresh one in.
pub const DEVICE_TOKEN_HEADER: &str = "x-switchyard-device-token";

/// Set on every request that arrives through the shared port: which
/// connection it came over.
#[derive(Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub sessions: Arc<ConnectionSessions>,
    /// The connection is TLS.
    pub tls: bool,
}

/// How a request's connection is protected (plain when unknown).
pub fn channel_of(conn: Option<&ConnInfo>) -> crate::auth::Channel {
    match conn {
        Some(c) if c.tls => crate::auth::Channel::Tls,
        _ => crate::auth::Channel::Plain,
    }
}

/// Where [`GrpcAuth`] leaves the device token it issued for a request, for
/// the connection to put in the response's headers.
#[derive(Clone, Default)]
struct IssuedToken(Arc<std::sync::Mutex<Option<String>>>);

/// Checks a request's Basic credentials and the user's grant.
#[derive(Clone)]
pub struct GrpcAuth {
    dispatcher: Dispatcher,
}

fn refusal_status(r: PasswordRefusal) -> Status {
    match r {
        PasswordRefusal::NotAuthorized { .. } => Status::permission_denied(r.to_string()),
        PasswordRefusal::CheckerDown => Status::unavailable(r.to_string()),
        _ => Status::unauthenticated(r.to_string()),
    }
}

impl GrpcAuth {
    pub fn new(dispatcher: Dispatcher) -> Self {
        GrpcAuth { dispatcher }
    }

    /// The authenticated user, if the request's credentials are good and the
    /// user may use `service`.
    pub async fn authorize<T>(&self, req: &Request<T>, service: &str) -> Result<String, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .ok_or_else(|| refusal_status(PasswordRefusal::Missing))?
            .to_str()
            .map_err(|_| refusal_status(PasswordRefusal::Malformed))?;
        let (user, password) = parse_basic(header).map_err(refusal_status)?;
        let conn = req.extensions().get::<ConnInfo>();
        let peer = conn.map(|c| c.peer).or_else(|| req.remote_addr());
        let device = req
            .metadata()
            .get(DEVICE_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok());
        let token = self
            .dispatcher
            .check_password_login(
                &user,
                &password,
                service,
                peer,
                channel_of(conn),
                device,
                conn.map(|c| c.sessions.as_ref()),
            )
            .await
            .map_err(refusal_status)?
            .device_token;
        if let Some(slot) = req.extensions().get::<IssuedToken>() {
            *slot.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(token);
        }
        Ok(user)
    }
}

/// Serves the port's HTTP connections (HTTP/1.1 and HTTP/2) with one
/// router: gRPC services and whatever else is mounted on it.
pub struct HttpFrontDoor {
    router: axum::Router,
    observer: Option<RequestObserver>,
}

/// How one HTTP request through the front door ended, for metrics. Paths
/// are the request's own: label them only when they were served (a
/// stranger may send any path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestOutcome {
    pub path: String,
    pub status: u16,
    /// A gRPC call's status code (from the trailers, or the headers of a
    /// trailers-only answer).
    pub grpc_status: Option<i32>,
}

/// Told of every request's outcome.
pub type RequestObserver = Arc<dyn Fn(&RequestOutcome) + Send + Sync>;

impl HttpFrontDoor {
    pub fn new(router: axum::Router) -> Self {
        HttpFrontDoor {
            router,
            observer: None,
        }
    }

    /// Tells `observer` how each request ended.
    pub fn observed(mut self, observer: RequestObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The port's router with these gRPC routes and nothing else.
    pub fn grpc(routes: Routes) -> Self {
        Self::new(crate::api::router(routes))
    }
}

impl ConnectionHandler for HttpFrontDoor {
    fn serve(&self, conn: HttpConnection) -> BoxFuture {
        Box::pin(serve_connection(
            self.router.clone(),
            self.observer.clone(),
            conn,
        ))
    }
}

/// tonic answers a request whose message is not valid protobuf with
/// INTERNAL (in a trailers-only response); it is the client's fault, and
/// the client is told INVALID_ARGUMENT.
fn decode_errors_are_invalid_argument(h: &mut http::HeaderMap) {
    // grpc-message is percent-encoded.
    let message = |h: &http::HeaderMap, needle: &str| {
        h.get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| m.replace("%20", " ").contains(needle))
    };
    let internal = h.get("grpc-status").is_some_and(|v| v == "13");
    let decode = message(h, "decode");
    if internal && decode {
        h.insert("grpc-status", http::HeaderValue::from_static("3"));
    }
    // A message over the service's limit: tonic says OUT_OF_RANGE; it is an
    // argument over a documented limit.
    let too_large = h.get("grpc-status").is_some_and(|v| v == "11") && message(h, "too large");
    if too_large {
        h.insert("grpc-status", http::HeaderValue::from_static("3"));
        h.insert(
            "grpc-message",
            http::HeaderValue::from_static(
                "the message is over this call's size limit (for a change: 4 MiB, see the README)",
            ),
        );
    }
}

async fn serve_connection(
    routes: axum::Router,
    observer: Option<RequestObserver>,
    conn: HttpConnection,
) {
    let HttpConnection {
        io,
        peer,
        version,
        sessions,
        idle_timeout,
        tls,
    } = conn;
    let hangup = sessions.hangup();
    let id = sessions.id().to_string();
    let started = tokio::time::Instant::now();
    let info = ConnInfo {
        peer,
        sessions: sessions.clone(),
        tls,
    };
    let service = tower::service_fn(move |mut req: http::Request<Incoming>| {
        req.extensions_mut().insert(info.clone());
        let issued = IssuedToken::default();
        req.extensions_mut().insert(issued.clone());
        let path = req.uri().path().to_string();
        let call = routes.clone().oneshot(req);
        let observer = observer.clone();
        async move {
            let mut response = call.await?;
            // In the headers of a trailers-only answer, or in the trailers.
            decode_errors_are_invalid_argument(response.headers_mut());
            let grpc_status = |h: &http::HeaderMap| {
                h.get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
            };
            let mut outcome = RequestOutcome {
                path,
                status: response.status().as_u16(),
                grpc_status: grpc_status(response.headers()),
            };
            let is_grpc = response
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            // A gRPC call's status comes in its trailers; anything else is
            // told now.
            let mut pending = match (&observer, is_grpc && outcome.grpc_status.is_none()) {
                (Some(o), false) => {
                    o(&outcome);
                    None
                }
                (Some(o), true) => Some(o.clone()),
                (None, _) => None,
            };
            let mut response = response.map(|body| {
                use http_body_util::BodyExt;
                tonic::body::Body::new(body.map_frame(move |mut frame| {
                    if let Some(t) = frame.trailers_mut() {
                        decode_errors_are_invalid_argument(t);
                        if let Some(o) = pending.take() {
                            outcome.grpc_status = grpc_status(t);
                            o(&outcome);
                        }
                    }
                    frame
                }))
            });
            let token = issued.0.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(v) = token.and_then(|t| http::HeaderValue::from_str(&t).ok()) {
                response.headers_mut().insert(DEVICE_TOKEN_HEADER, v);
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    if version == HttpVersion::Http1 {
        return serve_http1(io, peer, service, idle_timeout, &sessions).await;
    }
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(MAX_STREAMS);
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let mut idle_check = tokio::time::interval_at(
        started + idle_timeout,
        idle_timeout.max(Duration::from_millis(50)) / 2,
    );
    let reason = loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, connection = %id, error = %e, "HTTP/2 connection ended with an error");
                }
                return;
            }
            _ = hangup.requested() => break "shutdown, or a user of it was revoked",
            _ = idle_check.tick() => {
                // Requests without credentials (health checks, reflection)
                // do not extend a stranger's connection: it lives
                // `idle_timeout` unless somebody logs in over it.
                if !sessions.has_logins() && started.elapsed() >= idle_timeout {
                    break "nobody logged in over it in time";
                }
            }
        }
    };
    tracing::info!(%peer, connection = %id, reason, "closing HTTP/2 connection");
    conn.as_mut().graceful_shutdown();
    if tokio::time::timeout(CLOSE_GRACE, conn.as_mut())
        .await
        .is_err()
    {
        tracing::info!(%peer, connection = %id, "HTTP/2 connection did not finish within {CLOSE_GRACE:?}; dropped");
    }
}

/// A response that writes nothing for this long is closed: its client
/// stopped reading. Streams that may be quiet (Server-Sent Events) send a
/// comment more often than this.
pub const HTTP1_WRITE_STALL: Duration = Duration::from_secs(60);

/// A stream that notes when a write last made progress.
struct WriteClock<T> {
    inner: T,
    started: tokio::time::Instant,
    /// Milliseconds after `started` of the last write that took bytes.
    last_write_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteClock<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteClock<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r
            && *n > 0
        {
            self.last_write_ms.store(
                self.started.elapsed().as_millis() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// HTTP/1 on the shared port: one request per connection (no keep-alive),
/// its head within `deadline` and in 16 KiB, and the response begun within
/// twice that. A response then lives as long as it streams (a big log, an
/// event stream): it is closed once its client stops reading for
/// [`HTTP1_WRITE_STALL`], and at once on shutdown.
async fn serve_http1<S>(
    io: crate::wire::Rewind<crate::wire::Transport>,
    peer: SocketAddr,
    service: S,
    deadline: Duration,
    sessions: &ConnectionSessions,
) where
    S: tower::Service<
            http::Request<Incoming>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let started = tokio::time::Instant::now();
    let last_write_ms = Arc::new(AtomicU64::new(0));
    let io = WriteClock {
        inner: io,
        started,
        last_write_ms: last_write_ms.clone(),
    };
    let responded = Arc::new(AtomicBool::new(false));
    let service = {
        let (responded, last_write_ms) = (responded.clone(), last_write_ms.clone());
        tower::ServiceExt::map_response(service, move |r| {
            // The response's stall clock starts now.
            last_write_ms.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            responded.store(true, Ordering::Relaxed);
            r
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(deadline)
        .max_buf_size(16 * 1024)
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let hangup = sessions.hangup();
    let mut check = tokio::time::interval(
        (deadline / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
    );
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::info!(%peer, error = %e, "refused connection: bad HTTP/1 request");
                }
                return;
            }
            _ = hangup.requested() => return,
            _ = check.tick() => {
                if !responded.load(Ordering::Relaxed) {
                    if started.elapsed() >= deadline * 2 {
                        tracing::info!(%peer, "closed HTTP/1 connection: too slow");
                        return;
                    }
                } else {
                    let idle = started.elapsed().saturating_sub(Duration::from_millis(
                        last_write_ms.load(Ordering::Relaxed),
                    ));
                    if idle >= HTTP1_WRITE_STALL {
                        tracing::info!(%peer, "closed HTTP/1 connection: its client stopped reading");
                        return;
                    }
                }
            }
        }
    }
}
