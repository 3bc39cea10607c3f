//! The web login: SCRAM-SHA-256 run by the page's script against two JSON
//! endpoints, so the password never leaves the browser.
//!
//! 1. `POST /api/v1/login/start` `{"client_first": "n,,n=USER,r=NONCE"}`
//!    answers `{"login": ID, "server_first": "r=...,s=SALT,i=ITERATIONS"}`.
//! 2. `POST /api/v1/login/finish` `{"login": ID, "client_final":
//!    "c=biws,r=...,p=PROOF"}` answers `{"server_final": "v=...", "user",
//!    "csrf"}` with the session cookie, or 401. The script checks
//!    `server_final` before trusting the session: a server that does not
//!    hold the user's verifier cannot compute it.
//!
//! Both count in the port's login throttle like every other login.
//!
//! Inside TLS, on a master with `[[checker]]`s (users a directory or a
//! program judges, who have no verifier), the page posts the password
//! itself instead, protected by TLS: `POST /api/v1/login/password`
//! `{"user", "password"}` answers `{"user", "csrf"}` with the cookie, or
//! 401. The secrets file judges the users it knows, the checkers the
//! others. Over plain TCP that endpoint refuses (403) without looking at
//! the password.

use axum::extract::State;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::json;

use super::super::ApiState;
use super::super::access::{ACT, READ, Refusal, Viewer};
use super::super::session::{COOKIE, DEVICE_COOKIE, cookie, set_cookie};
use crate::auth::{Channel, Credential};
use crate::dispatcher::PasswordRefusal;

/// The login form; the script does the rest: SCRAM, or (`password`) the
/// password itself inside TLS, for a master with `[[checker]]`s.
pub fn form(password: bool) -> Markup {
    html! {
        form #login method="post" action="/login" data-password[password] {
            label { "User " input name="user" autocomplete="username" required; }
            label { "Password " input name="password" type="password" autocomplete="current-password" required; }
            button type="submit" { "Log in" }
            p #login-error.refusal role="alert" {}
            noscript { p.refusal { "Logging in needs JavaScript: the page proves the password without sending it. (The JSON API takes HTTP Basic.)" } }
        }
    }
}

/// `GET /login`.
pub async fn page(State(s): State<ApiState>, parts: Parts) -> Response {
    let viewer = Viewer::of(&parts, &s).await.unwrap_or_default();
    super::page(
        StatusCode::OK,
        super::layout("Log in", &viewer, form(takes_passwords(&parts, &s))),
    )
}

/// Whether the page should post the password itself: the request came
/// inside TLS and `[[checker]]`s judge passwords.
pub fn takes_passwords(parts: &Parts, s: &ApiState) -> bool {
    over_tls(parts) && s.dispatcher.has_password_checkers()
}

/// A refusal of a login request, in JSON.
fn refused(e: PasswordRefusal) -> Response {
    let status = match e {
        PasswordRefusal::NotAuthorized { .. } => StatusCode::FORBIDDEN,
        PasswordRefusal::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
        PasswordRefusal::CheckerDown => StatusCode::SERVICE_UNAVAILABLE,
        PasswordRefusal::BadScram(_) | PasswordRefusal::Malformed => StatusCode::BAD_REQUEST,
        _ => StatusCode::UNAUTHORIZED,
    };
    Refusal(status, e.to_string()).json()
}

fn bad(why: impl std::fmt::Display) -> Response {
    Refusal(StatusCode::BAD_REQUEST, why.to_string()).json()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Start {
    client_first: String,
}

/// `POST /api/v1/login/start`.
pub async fn start(State(s): State<ApiState>, parts: Parts, body: axum::body::Bytes) -> Response {
    let start: Start = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad(format!("the body: {e}")),
    };
    let peer = parts
        .extensions
        .get::<crate::grpc::ConnInfo>()
        .map(|c| c.peer);
    let device = cookie(&parts.headers, DEVICE_COOKIE);
    let pending = match s
        .dispatcher
        .begin_scram_login(&start.client_first, peer, device)
        .await
    {
        Ok(p) => p,
        Err(e) => return refused(e),
    };
    let server_first = pending.challenge().to_string();
    match s.sessions.wait_for_proof(pending, peer.map(|p| p.ip())) {
        Ok(login) => super::super::json(
            StatusCode::OK,
            json!({ "login": login, "server_first": server_first }),
        ),
        Err(e) => Refusal(StatusCode::TOO_MANY_REQUESTS, e.to_string()).json(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Finish {
    login: String,
    client_final: String,
}

/// Whether a request came inside TLS.
fn over_tls(parts: &Parts) -> bool {
    parts
        .extensions
        .get::<crate::grpc::ConnInfo>()
        .is_some_and(|c| c.tls)
}

/// `POST /api/v1/login/finish`.
pub async fn finish(State(s): State<ApiState>, parts: Parts, body: axum::body::Bytes) -> Response {
    let secure = over_tls(&parts);
    let finish: Finish = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad(format!("the body: {e}")),
    };
    let Some(pending) = s.sessions.take_login(&finish.login) else {
        return Refusal(
            StatusCode::UNAUTHORIZED,
            "this login timed out or was already used: start again".into(),
        )
        .json();
    };
    let login = match s
        .dispatcher
        .finish_scram_login(pending, &finish.client_final, &[READ, ACT])
        .await
    {
        Ok(l) => l,
        Err(e) => return refused(e),
    };
    let (session, csrf) = s
        .sessions
        .create(&login.user, Credential::Verifier(login.verifier));
    logged_in(
        json!({ "server_final": login.server_final, "user": login.user, "csrf": csrf }),
        &session,
        &login.device_token,
        secure,
    )
}

/// The answer to a login that made a session: `body` with the session's
/// cookie and a device token's.
fn logged_in(body: serde_json::Value, session: &str, device_token: &str, secure: bool) -> Response {
    let mut r = super::super::json(StatusCode::OK, body);
    let h = r.headers_mut();
    for c in [
        set_cookie(COOKIE, session, None, secure),
        set_cookie(
            DEVICE_COOKIE,
            device_token,
            Some(std::time::Duration::from_secs(180 * 24 * 3600)),
            secure,
        ),
    ] {
        if let Ok(v) = HeaderValue::from_str(&c) {
            h.append(header::SET_COOKIE, v);
        }
    }
    r
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordForm {
    user: String,
    password: String,
}

/// `POST /api/v1/login/password`: inside TLS only.
pub async fn password(
    State(s): State<ApiState>,
    parts: Parts,
    body: axum::body::Bytes,
) -> Response {
    if !over_tls(&parts) {
        return Refusal(
            StatusCode::FORBIDDEN,
            "a password is taken only inside TLS; over plain HTTP the page logs in with SCRAM"
                .into(),
        )
        .json();
    }
    let form: PasswordForm = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad(format!("the body: {e}")),
    };
    if form.user.is_empty() {
        return bad("the user name is empty");
    }
    let conn = parts.extensions.get::<crate::grpc::ConnInfo>();
    let device = cookie(&parts.headers, DEVICE_COOKIE);
    let mut outcome = Err(PasswordRefusal::Missing);
    // Either grant lets a user into the web UI.
    for service in [READ, ACT] {
        outcome = s
            .dispatcher
            .check_password_login(
                &form.user,
                &form.password,
                service,
                conn.map(|c| c.peer),
                Channel::Tls,
                device,
                None,
            )
            .await;
        if !matches!(outcome, Err(PasswordRefusal::NotAuthorized { .. })) {
            break;
        }
    }
    match outcome {
        Ok(login) => {
            tracing::info!(peer = ?conn.map(|c| c.peer), user = %form.user, "web login (password inside TLS)");
            let (session, csrf) = s.sessions.create(&form.user, login.credential);
            logged_in(
                json!({ "user": form.user, "csrf": csrf }),
                &session,
                &login.device_token,
                true,
            )
        }
        Err(e) => refused(e),
    }
}

/// `POST /api/v1/logout`: ends the session the cookie names (if any).
pub async fn logout(State(s): State<ApiState>, parts: Parts) -> Response {
    if let Some(who) = cookie(&parts.headers, COOKIE).and_then(|c| s.sessions.lookup(c)) {
        s.sessions.end(&who);
        tracing::info!(user = %who.user, "web logout");
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{}; Max-Age=0",
        set_cookie(COOKIE, "", None, over_tls(&parts))
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}
