//! What faces users over the port's HTTP: one router, on which gRPC
//! services, `/healthz` and (as they come) the web UI, the JSON API and
//! the metrics are mounted. The Dispatcher hands it every HTTP connection,
//! HTTP/1.1 or HTTP/2 ([`crate::grpc::HttpFrontDoor`]); nothing HTTP is
//! special-cased by name anywhere else.

use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tonic::service::Routes;

pub mod access;
pub mod json;
pub mod metrics;
pub mod session;
pub mod v1;
pub mod web;
pub mod webhooks;

pub use access::ApiState;

/// A JSON answer.
pub fn json(status: StatusCode, v: serde_json::Value) -> Response {
    let mut r = (status, v.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A plain-text answer.
fn text(status: StatusCode, body: &'static str) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The port's router: `grpc` (the gRPC services), `GET /healthz` for load
/// balancers and monitors, and for any other path a 404 saying what the
/// port speaks (someone pointed a browser at it).
pub fn router(grpc: Routes) -> axum::Router {
    grpc.prepare()
        .into_axum_router()
        .route("/healthz", get(|| async { text(StatusCode::OK, "ok\n") }))
        .fallback(|method: Method, uri: Uri| async move {
            tracing::info!(%method, path = %uri.path(), "HTTP request for an unknown path: answered 404");
            text(
                StatusCode::NOT_FOUND,
                crate::dispatcher::PROTOCOLS_NOTE,
            )
        })
}
