//! What faces users over the port's HTTP: one router, on which gRPC
//! services, `/healthz` and (as they come) the web UI, the JSON API and
//! the metrics are mounted. The Dispatcher hands it every HTTP connection,
//! HTTP/1.1 or HTTP/2 ([`crate::grpc::HttpFrontDoor`]); nothing HTTP is
//! special-cased by name anywhere else.

use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tonic::service::Routes;

pub mod metrics;
pub mod v1;

use crate::dispatcher::{Dispatcher, PasswordRefusal, parse_basic};

/// Checks a request's HTTP Basic credentials (the port's checkers and
/// login throttle) and that the user is granted `service`: the user, or
/// the refusal: 401 (with `WWW-Authenticate`), 403, 429 or 503.
pub async fn check_basic(
    dispatcher: &Dispatcher,
    headers: &axum::http::HeaderMap,
    conn: Option<&crate::grpc::ConnInfo>,
    service: &str,
) -> Result<String, Response> {
    let refused = |status: StatusCode, why: String| {
        let mut r = (status, format!("{why}\n")).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"switchyard\", charset=\"UTF-8\""),
            );
        }
        r
    };
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Err(refused(
            StatusCode::UNAUTHORIZED,
            PasswordRefusal::Missing.to_string(),
        ));
    };
    let (user, password) =
        parse_basic(value).map_err(|e| refused(StatusCode::UNAUTHORIZED, e.to_string()))?;
    dispatcher
        .check_password_login(
            &user,
            &password,
            service,
            conn.map(|c| c.peer),
            None,
            conn.map(|c| c.sessions.as_ref()),
        )
        .await
        .map(|_| user)
        .map_err(|e| {
            let status = match e {
                PasswordRefusal::NotAuthorized { .. } => StatusCode::FORBIDDEN,
                PasswordRefusal::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
                PasswordRefusal::CheckerDown => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::UNAUTHORIZED,
            };
            refused(status, e.to_string())
        })
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
