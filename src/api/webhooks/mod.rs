//! Webhooks on the port: `POST /hooks/<name>` for each `[[webhook]]`, over
//! HTTP/1.1 and HTTP/2, inside TLS or not.
//!
//! A delivery is handled in this order, and nothing is parsed before it is
//! verified:
//!
//! 1. The webhook must exist (404) and the address must not be blocked by
//!    the login throttle (429).
//! 2. The body is read under [`BODY_DEADLINE`] and at most [`MAX_BODY`]
//!    bytes (GitHub's own cap is 25 MB): 408 or 413 otherwise; all bodies
//!    being read at once hold at most [`BODIES_IN_FLIGHT`] bytes.
//! 3. The signature is checked over the raw body, in constant time:
//!    GitHub's `X-Hub-Signature-256` (`sha256=` and the hex HMAC-SHA256 of
//!    the body under the secret), Gitea's `X-Gitea-Signature` (the hex HMAC
//!    alone), GitLab's `X-Gitlab-Token` (the secret itself). Missing or
//!    wrong: 401 with no detail, counted in the throttle per (address,
//!    webhook).
//! 4. The payload, `application/json` or GitHub's form-encoded `payload=`,
//!    is read as the event header says ([`providers`]): a ping answers 200,
//!    an event this master does not act on 202, malformed JSON 400.
//! 5. The changes are stored, with their build requests, before the 2xx
//!    answer; a redelivery of the same delivery id stores nothing and
//!    answers with the changes the first made.

pub mod providers;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::builds::BuildMaster;
use crate::config::{Provider, WebhookConfig, WebhookSecrets};
use crate::dispatcher::{Dispatcher, PasswordRefusal};
use providers::Event;

/// The largest body a delivery may have.
pub const MAX_BODY: usize = 25 * 1024 * 1024;
/// How long reading a delivery's body may take.
pub const BODY_DEADLINE: Duration = Duration::from_secs(30);
/// The most bytes all deliveries being read at once may hold: a body is
/// read whole before its signature can be checked, so strangers must not
/// be able to make the master hold 25 MB per connection. A delivery
/// reserves its `Content-Length` (or [`MAX_BODY`] when it sends none) and
/// waits, within [`BODY_DEADLINE`], for room.
pub const BODIES_IN_FLIGHT: usize = 128 * 1024 * 1024;

/// A webhook as the port serves it: its config and its secret.
struct Hook {
    config: WebhookConfig,
    secret: String,
}

/// The webhooks the port serves now; a reload replaces them all at once.
pub struct Webhooks {
    hooks: RwLock<Arc<HashMap<String, Hook>>>,
    builds: BuildMaster,
    dispatcher: Dispatcher,
    /// [`BODIES_IN_FLIGHT`], in KiB.
    body_budget: Arc<tokio::sync::Semaphore>,
}

impl Webhooks {
    pub fn new(builds: BuildMaster, dispatcher: Dispatcher) -> Arc<Self> {
        Arc::new(Webhooks {
            hooks: RwLock::new(Arc::new(HashMap::new())),
            builds,
            dispatcher,
            body_budget: Arc::new(tokio::sync::Semaphore::new(BODIES_IN_FLIGHT / 1024)),
        })
    }

    /// Serves exactly these webhooks from now on. Every one must have its
    /// secret (the config's loading checks it); one without is not served.
    pub fn set<'a>(
        &self,
        hooks: impl IntoIterator<Item = &'a WebhookConfig>,
        secrets: &WebhookSecrets,
    ) {
        let map = hooks
            .into_iter()
            .filter_map(|h| {
                Some((
                    h.name.clone(),
                    Hook {
                        config: h.clone(),
                        secret: secrets.get(&h.name)?.to_string(),
                    },
                ))
            })
            .collect();
        *self.hooks.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
    }

    fn get(&self, name: &str) -> Option<(WebhookConfig, String)> {
        self.hooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|h| (h.config.clone(), h.secret.clone()))
    }
}

/// The webhook routes.
pub fn routes(hooks: Arc<Webhooks>) -> axum::Router {
    axum::Router::new()
        .route("/hooks/{name}", axum::routing::post(deliver))
        .with_state(hooks)
}

fn answer(status: StatusCode, v: serde_json::Value) -> Response {
    super::json(status, v)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

use crate::wire::hex;

/// Whether the delivery carries the right signature (or token) for
/// `secret`, compared in constant time.
fn verified(provider: Provider, headers: &HeaderMap, body: &[u8], secret: &str) -> bool {
    let mac = || hex(&crate::auth::verifier::hmac(secret.as_bytes(), body));
    let (given, expected) = match provider {
        Provider::GitHub => match header(headers, "x-hub-signature-256") {
            Some(g) => (g.to_string(), format!("sha256={}", mac())),
            None => return false,
        },
        Provider::Gitea => match header(headers, "x-gitea-signature")
            .map(str::to_string)
            .or_else(|| {
                header(headers, "x-hub-signature-256")
                    .and_then(|s| s.strip_prefix("sha256="))
                    .map(str::to_string)
            }) {
            Some(g) => (g, mac()),
            None => return false,
        },
        Provider::GitLab => match header(headers, "x-gitlab-token") {
            Some(g) => (g.to_string(), secret.to_string()),
            None => return false,
        },
    };
    bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// The provider's event name and delivery id headers.
fn event_headers(provider: Provider) -> (&'static str, &'static [&'static str]) {
    match provider {
        Provider::GitHub => ("x-github-event", &["x-github-delivery"]),
        Provider::Gitea => ("x-gitea-event", &["x-gitea-delivery", "x-github-delivery"]),
        Provider::GitLab => (
            "x-gitlab-event",
            &["x-gitlab-event-uuid", "idempotency-key"],
        ),
    }
}

/// Reads the body, bounded in size and time, once there is room for it
/// under `budget`.
async fn read_body(
    budget: &Arc<tokio::sync::Semaphore>,
    body: axum::body::Body,
    headers: &HeaderMap,
) -> Result<bytes::Bytes, Response> {
    let too_big = || {
        answer(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({ "error": format!("the body is larger than {MAX_BODY} bytes") }),
        )
    };
    if header(headers, "content-length")
        .and_then(|l| l.parse::<u64>().ok())
        .is_some_and(|l| l > MAX_BODY as u64)
    {
        return Err(too_big());
    }
    let declared = header(headers, "content-length").and_then(|l| l.parse::<usize>().ok());
    let kib = declared.unwrap_or(MAX_BODY).div_ceil(1024).max(1) as u32;
    let limited = http_body_util::Limited::new(body, declared.unwrap_or(MAX_BODY).min(MAX_BODY));
    let read = async {
        let _room = budget.acquire_many(kib).await;
        http_body_util::BodyExt::collect(limited).await
    };
    match tokio::time::timeout(BODY_DEADLINE, read).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_big()),
        Ok(Err(e)) => Err(answer(
            StatusCode::BAD_REQUEST,
            json!({ "error": format!("the body could not be read: {e}") }),
        )),
        Err(_) => Err(answer(
            StatusCode::REQUEST_TIMEOUT,
            json!({ "error": format!("the body did not arrive within {BODY_DEADLINE:?}") }),
        )),
    }
}

/// The JSON of a delivery: the body, or its form-encoded `payload=`.
fn payload(headers: &HeaderMap, body: &[u8]) -> Result<serde_json::Value, String> {
    let form = header(headers, "content-type")
        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    if form {
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
            .map_err(|e| format!("the form does not parse: {e}"))?;
        let json = fields
            .into_iter()
            .find(|(k, _)| k == "payload")
            .map(|(_, v)| v)
            .ok_or("the form has no `payload` field")?;
        serde_json::from_str(&json).map_err(|e| format!("the payload is not JSON: {e}"))
    } else {
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))
    }
}

/// `POST /hooks/<name>`.
async fn deliver(
    State(hooks): State<Arc<Webhooks>>,
    Path(name): Path<String>,
    request: axum::extract::Request,
) -> Response {
    let (parts, body): (Parts, _) = request.into_parts();
    let Some((hook, secret)) = hooks.get(&name) else {
        return answer(
            StatusCode::NOT_FOUND,
            json!({ "error": format!("no webhook named {name:?} on this master") }),
        );
    };
    let peer = parts
        .extensions
        .get::<crate::grpc::ConnInfo>()
        .map(|c| c.peer);
    let attempt = match hooks.dispatcher.begin_webhook_attempt(&name, peer).await {
        Ok(a) => a,
        Err(PasswordRefusal::Throttled(r)) => {
            return answer(
                StatusCode::TOO_MANY_REQUESTS,
                json!({ "error": format!("too many bad deliveries from this address; retry in {} s", r.retry_secs()) }),
            );
        }
        Err(e) => {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "error": e.to_string() }),
            );
        }
    };
    let body = match read_body(&hooks.body_budget, body, &parts.headers).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if !verified(hook.provider, &parts.headers, &body, &secret) {
        hooks.dispatcher.count_failed_login();
        let delay = attempt.failed();
        tracing::info!(peer = ?peer, webhook = %name, "refused a webhook delivery: missing or wrong signature");
        tokio::time::sleep(delay).await;
        return answer(StatusCode::UNAUTHORIZED, json!({ "error": "unauthorized" }));
    }
    attempt.succeeded();
    let (event_header, delivery_headers) = event_headers(hook.provider);
    let event = header(&parts.headers, event_header).unwrap_or_default();
    let delivery = delivery_headers
        .iter()
        .find_map(|h| header(&parts.headers, h))
        .filter(|d| !d.is_empty() && d.len() <= 128)
        .map(str::to_string);
    let payload = match payload(&parts.headers, &body) {
        Ok(p) => p,
        Err(why) => return answer(StatusCode::BAD_REQUEST, json!({ "error": why })),
    };
    let changes = match providers::parse(hook.provider, event, &payload, hook.repository_url) {
        Ok(Event::Ping) => return answer(StatusCode::OK, json!({ "ok": true, "event": "ping" })),
        Ok(Event::Ignored(what)) => {
            tracing::info!(webhook = %name, event = %event, "webhook delivery acknowledged and ignored: {what}");
            return answer(
                StatusCode::ACCEPTED,
                json!({ "ignored": what, "changes": [] }),
            );
        }
        Ok(Event::Changes(c)) => {
            let limits = crate::grpc::change_source::ChangeLimits::default();
            match c
                .into_iter()
                .map(|c| providers::fit(c, &limits))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(c) => c,
                Err(why) => return answer(StatusCode::BAD_REQUEST, json!({ "error": why })),
            }
        }
        Err(e) => return answer(StatusCode::BAD_REQUEST, json!({ "error": e.to_string() })),
    };
    if changes.is_empty() {
        return answer(
            StatusCode::OK,
            json!({ "changes": [], "note": "a deleted branch or tag makes no change" }),
        );
    }
    let n = changes.len();
    let stored = match &delivery {
        Some(d) => {
            hooks
                .builds
                .add_changes_once((name.clone(), d.clone()), changes)
                .await
        }
        None => hooks
            .builds
            .add_changes(changes)
            .await
            .map(|ids| (ids, false)),
    };
    match stored {
        Ok((ids, again)) => {
            if again {
                tracing::info!(webhook = %name, delivery = ?delivery, "webhook redelivery: its changes were stored before");
            } else {
                tracing::info!(webhook = %name, event = %event, changes = n, "webhook delivery stored");
            }
            answer(
                StatusCode::OK,
                json!({ "changes": ids, "redelivery": again }),
            )
        }
        Err(e) => {
            tracing::error!(webhook = %name, error = %e, "cannot store a webhook delivery's changes");
            answer(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "error": "the changes could not be stored; redeliver later" }),
            )
        }
    }
}
