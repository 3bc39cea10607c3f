//! The JSON API, `/api/v1/`: builders, builds (filtered and paged), one
//! build with its steps, properties and changes, its log (whole, a byte
//! range or the last lines, streamed), workers, changes, waiting requests;
//! and the actions force, stop and rebuild. Its JSON is the console's
//! (`switchyard debug --json`). Reading needs a user granted `web` (HTTP
//! Basic) unless `[web] public = true`; acting always needs `debug`. Every
//! refusal is a status with `{"error": ...}` saying why.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::debug::console::{build_json, builders_json, workers_json};
use crate::debug::{DebugApi, DebugError};
use crate::dispatcher::Dispatcher;
use crate::state::BuildFilter;

/// The grant a user needs to read the UI and the API.
pub const SERVICE: &str = "web";

/// Most builds one page holds.
pub const MAX_LIMIT: usize = 1000;

/// What the API's routes need.
#[derive(Clone)]
pub struct ApiState {
    pub api: DebugApi,
    pub dispatcher: Dispatcher,
    /// `[web] public`: readable without credentials.
    pub public: Arc<AtomicBool>,
}

/// The `/api/v1/` routes.
pub fn routes(state: ApiState) -> axum::Router {
    axum::Router::new()
        .route("/api/v1/builders", get(builders))
        .route("/api/v1/builds", get(builds))
        .route("/api/v1/builds/{id}", get(build))
        .route("/api/v1/builds/{id}/log", get(log))
        .route("/api/v1/workers", get(workers))
        .route("/api/v1/changes", get(changes))
        .route("/api/v1/requests", get(requests))
        .route("/api/v1/builders/{name}/force", axum::routing::post(force))
        .route("/api/v1/builds/{id}/stop", axum::routing::post(stop))
        .route("/api/v1/builds/{id}/rebuild", axum::routing::post(rebuild))
        .with_state(state)
}

fn json_response(status: StatusCode, v: Value) -> Response {
    let mut r = (status, v.to_string()).into_response();
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Why a request failed: its status, and `{"error": ...}` saying why.
struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(why: impl std::fmt::Display) -> Self {
        ApiError(StatusCode::BAD_REQUEST, why.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.0, json!({ "error": self.1 }))
    }
}

impl From<DebugError> for ApiError {
    fn from(e: DebugError) -> Self {
        match e {
            DebugError::NotFound(m) => ApiError(StatusCode::NOT_FOUND, m),
            DebugError::Invalid(m) => ApiError(StatusCode::BAD_REQUEST, m),
            DebugError::Internal(m) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, m),
        }
    }
}

impl From<crate::state::StateError> for ApiError {
    fn from(e: crate::state::StateError) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

/// What a handler answers.
type ApiResult = Result<Response, ApiError>;

/// A request allowed to read: the API is public, or it carries the
/// credentials of a user granted `web`. As an extractor it refuses the
/// request otherwise (401, 403, 429).
struct Reader;

impl axum::extract::FromRequestParts<ApiState> for Reader {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &ApiState,
    ) -> Result<Self, Response> {
        if s.public.load(Ordering::Relaxed) {
            return Ok(Reader);
        }
        let conn = parts.extensions.get::<crate::grpc::ConnInfo>();
        super::check_basic(&s.dispatcher, &parts.headers, conn, SERVICE)
            .await
            .map(|_| Reader)
    }
}

/// The user acting, who must be granted `debug`: actions always need a
/// login, public or not.
struct Actor(String);

impl axum::extract::FromRequestParts<ApiState> for Actor {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &ApiState,
    ) -> Result<Self, Response> {
        let conn = parts.extensions.get::<crate::grpc::ConnInfo>();
        super::check_basic(&s.dispatcher, &parts.headers, conn, crate::debug::SERVICE)
            .await
            .map(Actor)
    }
}

/// A query string, or the 400 saying what is wrong with it.
fn query<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad(e.body_text()))
}

/// A page size: 20 unless given, at most [`MAX_LIMIT`].
fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(20);
    if (1..=MAX_LIMIT).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::bad(format!(
            "limit must be from 1 to {MAX_LIMIT}"
        )))
    }
}

/// Where the next page starts: a full page may have more after it.
fn next_before(found: usize, limit: usize, last_id: Option<i64>) -> Option<i64> {
    (found == limit).then_some(last_id).flatten()
}

/// A build's id from the path, or a 400.
fn build_id(
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> Result<i64, ApiError> {
    id.map(|Path(id)| id)
        .map_err(|_| ApiError::bad("a build's id is a number"))
}

/// Text as the steps wrote it.
fn plain(body: impl Into<axum::body::Body>) -> Response {
    let mut r = (StatusCode::OK, body.into()).into_response();
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn builders(_: Reader, State(s): State<ApiState>) -> ApiResult {
    let b = s.api.builders().await?;
    Ok(json_response(
        StatusCode::OK,
        json!({ "builders": builders_json(&b) }),
    ))
}

async fn workers(_: Reader, State(s): State<ApiState>) -> ApiResult {
    Ok(json_response(
        StatusCode::OK,
        json!({ "workers": workers_json(&s.api.workers()) }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildsQuery {
    builder: Option<String>,
    branch: Option<String>,
    result: Option<String>,
    limit: Option<usize>,
    before: Option<i64>,
}

async fn builds(
    _: Reader,
    State(s): State<ApiState>,
    q: Result<Query<BuildsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let q = query(q)?;
    let limit = page_limit(q.limit)?;
    if let Some(r) = &q.result
        && !["success", "failure", "exception", "interrupted"].contains(&r.as_str())
    {
        return Err(ApiError::bad(
            "result must be one of success, failure, exception, interrupted",
        ));
    }
    let filter = BuildFilter {
        builder: q.builder,
        branch: q.branch,
        result: q.result,
        before: q.before,
        limit,
    };
    let builds = s.api.find_builds(filter).await?;
    Ok(json_response(
        StatusCode::OK,
        json!({
            "builds": builds.iter().map(build_json).collect::<Vec<_>>(),
            "next_before": next_before(builds.len(), limit, builds.last().map(|b| b.id)),
        }),
    ))
}

async fn build(
    _: Reader,
    State(s): State<ApiState>,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> ApiResult {
    let b = s.api.one_build(build_id(id)?).await?;
    Ok(json_response(StatusCode::OK, build_json(&b)))
}

/// `POST /api/v1/builders/{name}/force`'s body (all optional).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForceBody {
    #[serde(default)]
    branch: String,
    #[serde(default)]
    revision: String,
    #[serde(default)]
    repository: String,
    #[serde(default)]
    properties: std::collections::HashMap<String, String>,
}

/// Queues a request as `user`: 202 with its id.
async fn queue(s: &ApiState, req: crate::proto::ForceRequest, user: &str) -> ApiResult {
    let r = s.api.force(req, user).await?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        json!({ "request_id": r.request_id }),
    ))
}

async fn force(
    Actor(user): Actor,
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let b: ForceBody = if body.iter().all(u8::is_ascii_whitespace) {
        ForceBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("the body: {e}")))?
    };
    let req = crate::proto::ForceRequest {
        builder: name,
        branch: b.branch,
        revision: b.revision,
        repository: b.repository,
        properties: b.properties,
        wait_ms: 0,
    };
    queue(&s, req, &user).await
}

async fn stop(
    _: Actor,
    State(s): State<ApiState>,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> ApiResult {
    let id = build_id(id)?;
    s.api.stop(crate::proto::StopRequest { build: id })?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        json!({ "stopping": id }),
    ))
}

/// Asks for a new build of what build `id` built: its builder, repository,
/// branch and revision, and the properties it was forced with, plus
/// `rebuild_of`.
async fn rebuild(
    Actor(user): Actor,
    State(s): State<ApiState>,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> ApiResult {
    let id = build_id(id)?;
    let b = s.api.one_build(id).await?;
    let mut properties: std::collections::HashMap<String, String> = b
        .properties
        .iter()
        .filter(|p| p.source == "force")
        .map(|p| (p.name.clone(), p.value.clone()))
        .collect();
    properties.insert("rebuild_of".into(), id.to_string());
    let req = crate::proto::ForceRequest {
        builder: b.builder,
        branch: b.branch,
        revision: b.revision,
        repository: b.repository,
        properties,
        wait_ms: 0,
    };
    queue(&s, req, &user).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    limit: Option<usize>,
    before: Option<i64>,
}

/// `GET /api/v1/changes`: the newest changes, and the builds each made.
async fn changes(
    _: Reader,
    State(s): State<ApiState>,
    q: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let q = query(q)?;
    let limit = page_limit(q.limit)?;
    let found = s.api.state().recent_changes(q.before, limit).await?;
    let changes: Vec<Value> = found
        .iter()
        .map(|(c, builds)| {
            json!({
                "id": c.id,
                "repository": c.change.repository,
                "branch": c.change.branch,
                "revision": c.change.revision,
                "author": c.change.author,
                "comments": c.change.comments,
                "files": c.change.files,
                "received_unix_ms": c.received_ms,
                "builds": builds,
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        json!({
            "changes": changes,
            "next_before": next_before(found.len(), limit, found.last().map(|(c, _)| c.id)),
        }),
    ))
}

/// `GET /api/v1/requests`: build requests no worker has taken yet, oldest
/// first.
async fn requests(_: Reader, State(s): State<ApiState>) -> ApiResult {
    let waiting = s.api.state().waiting_requests().await?;
    let requests: Vec<Value> = waiting
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "builder": r.request.builder,
                "reason": r.request.reason,
                "repository": r.request.repository,
                "branch": r.request.branch,
                "revision": r.request.revision,
                "change_id": r.request.change_id,
                "created_unix_ms": r.created_ms,
                "not_before_unix_ms": (r.request.not_before_ms > 0).then_some(r.request.not_before_ms),
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        json!({ "requests": requests }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    /// A step's name or position; absent: every step in order.
    step: Option<String>,
    /// A byte range of the output: from `start` (default 0) to before
    /// `end` (default: its end).
    start: Option<u64>,
    end: Option<u64>,
    /// Only the last this many lines.
    tail: Option<usize>,
}

/// The most lines `tail` asks for, and the most bytes it answers with.
const MAX_TAIL_LINES: usize = 100_000;
const MAX_TAIL_BYTES: usize = 16 * 1024 * 1024;

/// The last `lines` lines of the output of `steps` (rows, in order), read
/// backwards from the database: what a huge log opens at. At most
/// [`MAX_TAIL_BYTES`], cut at a line's start.
async fn tail_of(
    state: &crate::state::StateDb,
    steps: &[i64],
    lines: usize,
) -> Result<bytes::Bytes, crate::state::StateError> {
    let mut pieces: Vec<bytes::Bytes> = Vec::new();
    let (mut newlines, mut bytes) = (0usize, 0usize);
    'steps: for &row in steps.iter().rev() {
        let mut before = None;
        loop {
            let page = state.log_page_back(row, before, 256 * 1024).await?;
            let Some(last) = page.last() else { break };
            before = Some(last.seq);
            for c in page {
                newlines += c.data.iter().filter(|&&b| b == b'\n').count();
                bytes += c.data.len();
                pieces.push(c.data);
                // One line more than asked for: its end is where the tail starts.
                if newlines > lines || bytes >= MAX_TAIL_BYTES {
                    break 'steps;
                }
            }
        }
    }
    let mut all = Vec::with_capacity(bytes);
    for p in pieces.iter().rev() {
        all.extend_from_slice(p);
    }
    // Past the last line's own end, count `lines` line ends back.
    let body = all.strip_suffix(b"\n").unwrap_or(&all);
    let mut start = 0;
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == lines {
                start = i + 1;
                break;
            }
        }
    }
    if start == 0 && bytes >= MAX_TAIL_BYTES {
        // Cut short by size: start at a line's start.
        start = all.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
    }
    Ok(bytes::Bytes::from(all).slice(start..))
}

/// `GET /api/v1/builds/{id}/log`: a build's output (every step in order,
/// or `step`), as stored, raw (`text/plain`), streamed page by page: the
/// master never holds it whole, however big.
async fn log(
    _: Reader,
    State(s): State<ApiState>,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
    q: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let id = build_id(id)?;
    let q = query(q)?;
    let (start, end) = (q.start.unwrap_or(0), q.end.unwrap_or(u64::MAX));
    if start > end {
        return Err(ApiError::bad("start is past end"));
    }
    if q.tail.is_some() && (q.start.is_some() || q.end.is_some()) {
        return Err(ApiError::bad("tail or a byte range, not both"));
    }
    if q.tail.is_some_and(|n| !(1..=MAX_TAIL_LINES).contains(&n)) {
        return Err(ApiError::bad(format!(
            "tail must be from 1 to {MAX_TAIL_LINES} lines"
        )));
    }
    // Unknown builds and steps are 404 before anything is streamed.
    let record = s
        .api
        .state()
        .build(id)
        .await?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no build {id}")))?;
    let chosen: Vec<i64> = record
        .steps
        .iter()
        .filter(|st| {
            q.step
                .as_ref()
                .is_none_or(|want| &st.name == want || st.position.to_string() == *want)
        })
        .map(|st| st.row)
        .collect();
    if let Some(step) = &q.step
        && chosen.is_empty()
    {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("build {id} has no step {step:?}"),
        ));
    }
    if let Some(lines) = q.tail {
        return Ok(plain(tail_of(s.api.state(), &chosen, lines).await?));
    }
    // A page or two ahead of the client, no more.
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let api = s.api.clone();
    let request = crate::proto::LogRequest {
        build: id,
        step: q.step.unwrap_or_default(),
        follow: false,
    };
    tokio::spawn(async move {
        if let Err(e) = api.log(request, tx).await {
            tracing::warn!(build = id, error = %e, "a log download ended early");
        }
    });
    // Where the stream is in the output, and the range wanted of it.
    let body = futures_util::stream::unfold((rx, 0u64), move |(mut rx, pos)| async move {
        if pos >= end {
            return None; // dropping `rx` ends the reading
        }
        let data = bytes::Bytes::from(rx.recv().await?.data);
        let (from, to) = (pos, pos + data.len() as u64);
        // Before the range: nothing of this chunk (an empty piece).
        let piece = if to <= start {
            bytes::Bytes::new()
        } else {
            data.slice(start.saturating_sub(from) as usize..(end.min(to) - from) as usize)
        };
        Some((Ok::<_, std::convert::Infallible>(piece), (rx, to)))
    });
    Ok(plain(axum::body::Body::from_stream(body)))
}
