//! Who may read and who may act, for the JSON API and the web pages alike.
//!
//! A request is someone's when it carries a valid web session cookie (see
//! [`super::session`]) or HTTP Basic credentials (the port's checkers and
//! login throttle). Reading needs the grant `web` or `debug`, or
//! `[web] public = true`; acting needs `debug`, always. A request acting
//! with a session cookie must also carry the session's CSRF token (the
//! `X-CSRF-Token` header, or a form's `csrf` field), so that another site
//! cannot act in the user's name.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::session::{COOKIE, CSRF_HEADER, SessionUser, WebSessions, cookie};
use crate::debug::DebugApi;
use crate::dispatcher::{Dispatcher, PasswordRefusal, parse_basic};

/// The grant a user needs to read the UI and the API.
pub const READ: &str = "web";
/// The grant a user needs to act (force, stop, rebuild, hang up, reload).
pub const ACT: &str = crate::debug::SERVICE;

/// What the API's and the pages' routes need.
#[derive(Clone)]
pub struct ApiState {
    pub api: DebugApi,
    pub dispatcher: Dispatcher,
    /// `[web] public`: readable without credentials.
    pub public: Arc<AtomicBool>,
    pub sessions: Arc<WebSessions>,
}

/// Why a request may not go on: its status and why (as the client is told).
#[derive(Debug)]
pub struct Refusal(pub StatusCode, pub String);

impl Refusal {
    fn of(e: PasswordRefusal) -> Self {
        let status = match e {
            PasswordRefusal::NotAuthorized { .. } => StatusCode::FORBIDDEN,
            PasswordRefusal::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            PasswordRefusal::CheckerDown => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        };
        Refusal(status, e.to_string())
    }

    /// As plain text, with `WWW-Authenticate` on a 401.
    pub fn text(self) -> Response {
        let mut r = (self.0, format!("{}\n", self.1)).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"switchyard\", charset=\"UTF-8\""),
            );
        }
        r
    }

    /// As `{"error": ...}`. No `WWW-Authenticate`: a browser's script
    /// asking must not make the browser pop up its own login box.
    pub fn json(self) -> Response {
        super::json(self.0, serde_json::json!({ "error": self.1 }))
    }
}

/// Checks a request's HTTP Basic credentials (the port's checkers and
/// login throttle) and that the user is granted one of `services`: the
/// user, or why not (401, 403, 429 or 503).
pub async fn check_basic(
    dispatcher: &Dispatcher,
    headers: &axum::http::HeaderMap,
    conn: Option<&crate::grpc::ConnInfo>,
    services: &[&str],
) -> Result<String, Refusal> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Refusal::of(PasswordRefusal::Missing))?;
    let (user, password) = parse_basic(value).map_err(Refusal::of)?;
    let first = services[0];
    match dispatcher
        .check_password_login(
            &user,
            &password,
            first,
            conn.map(|c| c.peer),
            crate::grpc::channel_of(conn),
            None,
            conn.map(|c| c.sessions.as_ref()),
        )
        .await
    {
        Ok(_) => Ok(user),
        // The password was right; another grant will do.
        Err(PasswordRefusal::NotAuthorized { .. })
            if services[1..]
                .iter()
                .any(|s| dispatcher.policy().allows(&user, s)) =>
        {
            Ok(user)
        }
        Err(e) => Err(Refusal::of(e)),
    }
}

/// The session a request's cookie names, if it still holds for one of
/// `services`; a session that no longer holds (its user removed, their
/// password or grants changed) is ended.
async fn session_of(s: &ApiState, parts: &Parts, services: &[&str]) -> Option<SessionUser> {
    let who = s.sessions.lookup(cookie(&parts.headers, COOKIE)?)?;
    for service in services {
        if s.dispatcher
            .login_still_valid(&who.user, &who.credential, service)
            .await
        {
            return Some(who);
        }
    }
    // Still granted something? Then it is only this action it may not do.
    if !s
        .dispatcher
        .login_still_valid(&who.user, &who.credential, READ)
        .await
        && !s
            .dispatcher
            .login_still_valid(&who.user, &who.credential, ACT)
            .await
    {
        tracing::info!(user = %who.user, "web session ended: the user, their password or their grants changed");
        s.sessions.end(&who);
    }
    None
}

/// Who is reading, when reading is allowed: a user (by session or Basic)
/// or, on a public master, possibly nobody. Refused otherwise (401, 403,
/// 429).
#[derive(Clone, Debug, Default)]
pub struct Viewer {
    pub user: Option<String>,
    /// Set when the viewer came by a session: its CSRF token is what the
    /// page's forms carry.
    pub session: Option<SessionUser>,
    /// The viewer may act (granted `debug`).
    pub may_act: bool,
}

impl Viewer {
    pub async fn of(parts: &Parts, s: &ApiState) -> Result<Viewer, Refusal> {
        if let Some(who) = session_of(s, parts, &[READ, ACT]).await {
            let may_act = s.dispatcher.policy().allows(&who.user, ACT);
            return Ok(Viewer {
                user: Some(who.user.clone()),
                session: Some(who),
                may_act,
            });
        }
        if parts.headers.contains_key(header::AUTHORIZATION) {
            let conn = parts.extensions.get::<crate::grpc::ConnInfo>();
            let user = check_basic(&s.dispatcher, &parts.headers, conn, &[READ, ACT]).await?;
            let may_act = s.dispatcher.policy().allows(&user, ACT);
            return Ok(Viewer {
                user: Some(user),
                session: None,
                may_act,
            });
        }
        if s.public.load(Ordering::Relaxed) {
            return Ok(Viewer::default());
        }
        Err(Refusal(
            StatusCode::UNAUTHORIZED,
            "log in first: this master's pages and API need a user granted `web`".into(),
        ))
    }
}

/// A JSON API request allowed to read. As an extractor it refuses the
/// request otherwise, in JSON.
pub struct Reader(#[allow(dead_code)] pub Viewer);

impl axum::extract::FromRequestParts<ApiState> for Reader {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &ApiState) -> Result<Self, Response> {
        Viewer::of(parts, s)
            .await
            .map(Reader)
            .map_err(Refusal::json)
    }
}

/// The user acting through the JSON API, granted `debug`: by Basic
/// credentials, or by a session cookie with the session's CSRF token in
/// `X-CSRF-Token`.
pub struct Actor(pub String);

impl axum::extract::FromRequestParts<ApiState> for Actor {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &ApiState) -> Result<Self, Response> {
        if !parts.headers.contains_key(header::AUTHORIZATION)
            && let Some(who) = session_of(s, parts, &[ACT]).await
        {
            let token = parts
                .headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !who.csrf_matches(token) {
                return Err(Refusal(
                    StatusCode::FORBIDDEN,
                    "missing or wrong CSRF token (X-CSRF-Token)".into(),
                )
                .json());
            }
            return Ok(Actor(who.user));
        }
        if !parts.headers.contains_key(header::AUTHORIZATION)
            && cookie(&parts.headers, COOKIE).is_some()
        {
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                format!("this needs a user granted `{ACT}`"),
            )
            .json());
        }
        let conn = parts.extensions.get::<crate::grpc::ConnInfo>();
        check_basic(&s.dispatcher, &parts.headers, conn, &[ACT])
            .await
            .map(Actor)
            .map_err(Refusal::json)
    }
}

/// The user acting through a page's form: a session granted `debug`. The
/// form's CSRF token is checked by the handler, which has the form.
pub struct FormActor(pub SessionUser);

impl axum::extract::FromRequestParts<ApiState> for FormActor {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &ApiState) -> Result<Self, Response> {
        match session_of(s, parts, &[ACT]).await {
            Some(who) => Ok(FormActor(who)),
            None => Err(super::web::refused_page(
                Refusal(
                    StatusCode::FORBIDDEN,
                    format!("log in as a user granted `{ACT}` to do this"),
                ),
                super::web::login::takes_passwords(parts, s),
            )),
        }
    }
}
