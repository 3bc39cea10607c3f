//! Plain HTTP/1 on the shared port: `/healthz` for load balancers and
//! monitors, and a short note naming what the port speaks for anything else
//! (someone pointed a browser at it).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;

use crate::wire::Rewind;

/// What this port speaks, for the 404 body.
pub const PROTOCOLS_NOTE: &str = "switchyard: this port speaks the Switchyard native session protocol (starts with \"SWYD/1\\r\\n\") and HTTP/1 (GET /healthz).\n";

fn respond<B>(req: &Request<B>) -> Response<Full<Bytes>> {
    let (status, body): (StatusCode, &'static str) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => (StatusCode::OK, "ok\n"),
        _ => (StatusCode::NOT_FOUND, PROTOCOLS_NOTE),
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

pub(crate) async fn serve(
    stream: crate::wire::Transport,
    sniffed: Bytes,
    peer: SocketAddr,
    deadline: Duration,
    shutdown: CancellationToken,
) {
    let io = TokioIo::new(Rewind::new(sniffed, stream));
    let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| {
        let resp = respond(&req);
        if resp.status() != StatusCode::OK {
            tracing::info!(%peer, method = %req.method(), path = %req.uri().path(), "HTTP/1 request for an unknown path: answered 404");
        }
        async move { Ok::<_, Infallible>(resp) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(deadline)
        .max_buf_size(16 * 1024)
        .keep_alive(false)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = tokio::time::timeout(deadline * 2, conn.as_mut()) => match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::info!(%peer, error = %e, "refused connection: bad HTTP/1 request"),
            Err(_) => tracing::info!(%peer, "closed HTTP/1 connection: too slow"),
        },
        _ = shutdown.cancelled() => {}
    }
}
