//! The JSON API, `/api/v1/`: builders, builds (filtered and paged), one
//! build with its steps, properties and changes, its log (whole, a byte
//! range or the last lines, streamed), workers, changes, waiting requests;
//! and the actions force, stop and rebuild. Its JSON is the console's
//! (`switchyard debug --json`). Reading needs a user granted `web` (HTTP
//! Basic) unless `[web] public = true`; acting always needs `debug`. Every
//! refusal is a status with `{"error": ...}` saying why.

use crate::store::{BuildStore, ReportOutbox};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiState;
use super::access::{Actor, Reader};
use super::json::{build_json, builders_json, workers_json};
use crate::builds::Outcome;
use crate::debug::DebugError;
use crate::store::{BuildFilter, LogStorage};

/// The grant a user needs to read the UI and the API.
pub const SERVICE: &str = super::access::READ;

/// Most builds one page holds.
pub const MAX_LIMIT: usize = 1000;

/// The `/api/v1/` routes.
pub fn routes(state: ApiState) -> axum::Router {
    axum::Router::new()
        .route("/api/v1/builders", get(builders))
        .route("/api/v1/builds", get(builds))
        .route("/api/v1/builds/{id}", get(build))
        .route("/api/v1/builds/{id}/log", get(log))
        .route("/api/v1/builds/{id}/log/stream", get(log_stream))
        .route("/api/v1/builds/{id}/artifacts", get(artifacts))
        .route("/api/v1/builds/{id}/artifacts/{name}", get(artifact))
        .route("/api/v1/events", get(events))
        .route("/api/v1/reload", axum::routing::post(reload))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/workers", get(workers))
        .route("/api/v1/changes", get(changes))
        .route("/api/v1/requests", get(requests))
        .route("/api/v1/reports", get(reports))
        .route("/api/v1/builders/{name}/force", axum::routing::post(force))
        .route("/api/v1/builds/{id}/stop", axum::routing::post(stop))
        .route("/api/v1/builds/{id}/rebuild", axum::routing::post(rebuild))
        .with_state(state)
}

fn json_response(status: StatusCode, v: Value) -> Response {
    super::json(status, v)
}

/// The OpenAPI 3 document of this API (`tests/web.rs` checks that every
/// operation in it answers as it says).
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    let mut r = (StatusCode::OK, OPENAPI).into_response();
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

impl From<crate::store::StateError> for ApiError {
    fn from(e: crate::store::StateError) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

/// What a handler answers.
type ApiResult = Result<Response, ApiError>;

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
    let result = match &q.result {
        None => None,
        Some(r) => Some(r.parse::<Outcome>().map_err(|_| {
            ApiError::bad("result must be one of success, failure, exception, interrupted")
        })?),
    };
    let filter = BuildFilter {
        builder: q.builder,
        branch: q.branch,
        result,
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

/// `GET /api/v1/builds/{id}/artifacts`: what the build's upload steps
/// stored.
async fn artifacts(
    _: Reader,
    State(s): State<ApiState>,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> ApiResult {
    let id = build_id(id)?;
    s.api.one_build(id).await?;
    let list = s.api.state().artifacts(id).await?;
    let list: Vec<Value> = list
        .iter()
        .map(|a| json!({"name": a.name, "size": a.size, "sha256": a.sha256}))
        .collect();
    Ok(json_response(StatusCode::OK, json!({ "artifacts": list })))
}

/// `GET /api/v1/builds/{id}/artifacts/{name}`: one artifact's bytes,
/// streamed.
async fn artifact(
    _: Reader,
    State(s): State<ApiState>,
    path: Result<Path<(i64, String)>, axum::extract::rejection::PathRejection>,
) -> ApiResult {
    let Ok(Path((id, name))) = path else {
        return Err(ApiError::bad("a build id and an artifact name, please"));
    };
    let known = s.api.state().artifacts(id).await?;
    let Some(a) = known.iter().find(|a| a.name == name) else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("build {id} has no artifact {name:?}"),
        ));
    };
    let file = tokio::fs::File::open(s.api.state().artifact_path(id, &a.name))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::GONE,
                format!("the artifact {name:?} of build {id} is gone: {e}"),
            )
        })?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    let mut r = (StatusCode::OK, body).into_response();
    let headers = r.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = axum::http::HeaderValue::from_str(&a.size.to_string()) {
        headers.insert(axum::http::header::CONTENT_LENGTH, v);
    }
    Ok(r)
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

/// `POST /api/v1/reload`: re-reads the config and secrets, as `SIGHUP`
/// does; `200 {"summary"}`, or `400 {"error"}` saying why the new config
/// was rejected (the running one stays).
async fn reload(Actor(user): Actor, State(s): State<ApiState>) -> ApiResult {
    let r = s.api.reload(&user).await?;
    Ok(json_response(
        StatusCode::OK,
        json!({ "summary": r.summary }),
    ))
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

/// A request for a new build of what `b` built: its builder, repository,
/// branch and revision, and the properties it was forced with, plus
/// `rebuild_of`.
pub fn rebuild_request(b: &crate::proto::BuildDetails) -> crate::proto::ForceRequest {
    let mut properties: std::collections::HashMap<String, String> = b
        .properties
        .iter()
        .filter(|p| p.source == "force")
        .map(|p| (p.name.clone(), p.value.clone()))
        .collect();
    properties.insert("rebuild_of".into(), b.id.to_string());
    crate::proto::ForceRequest {
        builder: b.builder.clone(),
        branch: b.branch.clone(),
        revision: b.revision.clone(),
        repository: b.repository.clone(),
        properties,
        wait_ms: 0,
    }
}

/// `POST /api/v1/builds/{id}/rebuild`: see [`rebuild_request`].
async fn rebuild(
    Actor(user): Actor,
    State(s): State<ApiState>,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> ApiResult {
    let b = s.api.one_build(build_id(id)?).await?;
    queue(&s, rebuild_request(&b), &user).await
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

/// `GET /api/v1/reports`: the reports `[[reporter]]`s have not delivered
/// yet after trying, oldest first.
async fn reports(_: Reader, State(s): State<ApiState>) -> ApiResult {
    let found = s.api.state().undelivered_reports(1000).await?;
    let undelivered: Vec<Value> = found
        .iter()
        .map(|r| {
            json!({
                "reporter": r.reporter,
                "build_id": r.build_id,
                "builder": r.builder,
                "number": r.number,
                "event": if r.finished { "finished" } else { "started" },
                "queued_unix_ms": r.created_ms,
                "attempts": r.attempts,
                "next_attempt_unix_ms": r.next_ms,
                "last_error": r.last_error,
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        json!({ "undelivered": undelivered }),
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
    state: &crate::store::StateDb,
    steps: &[i64],
    lines: usize,
) -> Result<bytes::Bytes, crate::store::StateError> {
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

/// Sends bytes `start..end` of the output of `steps` (rows, in order) to
/// `out`, page by page; stops when `out` is dropped.
async fn send_range(
    state: &crate::store::StateDb,
    steps: &[i64],
    sizes: &std::collections::HashMap<i64, u64>,
    start: u64,
    end: u64,
    out: tokio::sync::mpsc::Sender<bytes::Bytes>,
) -> Result<(), crate::store::StateError> {
    // Where the current step's output starts in the whole.
    let mut base = 0u64;
    for &row in steps {
        let size = sizes.get(&row).copied().unwrap_or(0);
        if base + size <= start && size > 0 {
            base += size;
            continue;
        }
        let (mut after, mut at) = if start > base {
            state.log_seek(row, start - base).await?
        } else {
            (0, 0)
        };
        loop {
            let page = state.log_page(row, after, 1024 * 1024).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for c in page {
                let (from, to) = (base + at, base + at + c.data.len() as u64);
                at += c.data.len() as u64;
                if to <= start {
                    continue;
                }
                if from >= end {
                    return Ok(());
                }
                let piece = c
                    .data
                    .slice(start.saturating_sub(from) as usize..(end.min(to) - from) as usize);
                if out.send(piece).await.is_err() {
                    return Ok(());
                }
            }
        }
        base += at;
        if base >= end {
            return Ok(());
        }
    }
    Ok(())
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
    // Removed by `log_retention`: say so, rather than answer nothing.
    let pruned = record
        .steps
        .iter()
        .filter(|st| chosen.contains(&st.row))
        .all(|st| st.log_stored == LogStorage::Pruned);
    if pruned && !chosen.is_empty() {
        return Err(ApiError(
            StatusCode::GONE,
            format!("the log of build {id} was removed: the build is older than log_retention"),
        ));
    }
    if let Some(lines) = q.tail {
        return Ok(plain(tail_of(s.api.state(), &chosen, lines).await?));
    }
    // A page or two ahead of the client, no more; a range starts at its
    // chunk (found by the chunks' lengths), not by reading what is before.
    let sizes = s.api.state().log_sizes(id).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(2);
    let api = s.api.clone();
    tokio::spawn(async move {
        if let Err(e) = send_range(api.state(), &chosen, &sizes, start, end, tx).await {
            tracing::warn!(build = id, error = %e, "a log download ended early");
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        let piece = rx.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(piece), rx))
    });
    Ok(plain(axum::body::Body::from_stream(body)))
}

/// How often a quiet event stream sends a comment, so that proxies and
/// the port's stall check ([`crate::grpc::HTTP1_WRITE_STALL`]) see it alive.
pub const SSE_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// A domain event as the API shows it: its SSE event name and its JSON.
pub fn event_json(e: &crate::builds::events::Stamped) -> (&'static str, Value) {
    use crate::builds::events::Event;
    let (name, mut v) = match &e.event {
        Event::WorkerConnected { worker, session_id } => (
            "worker_connected",
            json!({ "worker": worker, "session_id": session_id }),
        ),
        Event::WorkerLost { worker, reason } => {
            ("worker_lost", json!({ "worker": worker, "reason": reason }))
        }
        Event::BuildStarted {
            build,
            builder,
            worker,
        } => (
            "build_started",
            json!({ "build": build, "builder": builder, "worker": worker }),
        ),
        Event::StepStarted {
            build,
            step,
            attempt,
        } => (
            "step_started",
            json!({ "build": build, "step": step, "attempt": attempt }),
        ),
        Event::StepEnded {
            build,
            step,
            attempt,
            outcome,
            detail,
        } => (
            "step_ended",
            json!({ "build": build, "step": step, "attempt": attempt, "result": outcome.as_str(), "detail": detail }),
        ),
        Event::BuildEnded {
            build,
            builder,
            outcome,
        } => (
            "build_ended",
            json!({ "build": build, "builder": builder, "result": outcome.as_str() }),
        ),
        Event::OutputStored { build, step, bytes } => (
            "output_stored",
            json!({ "build": build, "step_row": step, "bytes": bytes }),
        ),
        Event::Reloaded { summary } => ("reloaded", json!({ "summary": summary })),
    };
    v["unix_ms"] = json!(e.unix_ms);
    (name, v)
}

fn event_build(e: &crate::builds::events::Event) -> Option<i64> {
    use crate::builds::events::Event;
    match e {
        Event::BuildStarted { build, .. }
        | Event::StepStarted { build, .. }
        | Event::StepEnded { build, .. }
        | Event::BuildEnded { build, .. }
        | Event::OutputStored { build, .. } => Some(*build),
        _ => None,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Only this build's events.
    build: Option<i64>,
}

/// `GET /api/v1/events`: the build master's events as Server-Sent Events
/// (`event: build_started`, `data: {...}`), from now on. A client too slow
/// to keep up is told `event: lagged` with how many it missed (then it
/// should re-read what it shows).
async fn events(
    _: Reader,
    State(s): State<ApiState>,
    q: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    let q = query(q)?;
    let watch = s.api.watch();
    let stream = futures_util::stream::unfold(watch, move |mut watch| async move {
        loop {
            match watch.events.recv().await {
                Ok(e) => {
                    if q.build.is_some() && event_build(&e.event) != q.build {
                        continue;
                    }
                    let (name, v) = event_json(&e);
                    let ev = SseEvent::default().event(name).data(v.to_string());
                    return Some((Ok::<_, std::convert::Infallible>(ev), watch));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let ev = SseEvent::default()
                        .event("lagged")
                        .data(json!({ "missed": n }).to_string());
                    return Some((Ok(ev), watch));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE))
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogStreamQuery {
    /// A step's name or position; absent: every step in order.
    step: Option<String>,
    /// Skip this many bytes of the output first (where the page's copy
    /// ends). A reconnecting `EventSource`'s `Last-Event-ID` wins over it.
    start: Option<u64>,
    /// `text` (default) or `html` (escaped, ANSI colours as spans).
    format: Option<String>,
}

/// `GET /api/v1/builds/{id}/log/stream`: a build's output as Server-Sent
/// Events, live until the build ends: `event: output` with
/// `{"step", "text"|"html", "offset"}` (the event's id is the offset after
/// it, so a reconnecting client goes on where it was), then `event: end`
/// with `{"result"}`.
async fn log_stream(
    _: Reader,
    State(s): State<ApiState>,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
    q: Result<Query<LogStreamQuery>, axum::extract::rejection::QueryRejection>,
    headers: axum::http::HeaderMap,
) -> ApiResult {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    let id = build_id(id)?;
    let q = query(q)?;
    let html = match q.format.as_deref() {
        None | Some("text") => false,
        Some("html") => true,
        Some(_) => return Err(ApiError::bad("format is text or html")),
    };
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let start = resume.or(q.start).unwrap_or(0);
    // Unknown builds are 404 before anything is streamed.
    s.api.one_build(id).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let api = s.api.clone();
    let request = crate::proto::LogRequest {
        build: id,
        step: q.step.unwrap_or_default(),
        follow: true,
    };
    tokio::spawn(async move {
        if let Err(e) = api.log(request, tx).await {
            tracing::debug!(build = id, error = %e, "a live log ended early");
        }
    });
    struct Reading {
        rx: tokio::sync::mpsc::Receiver<crate::proto::LogReply>,
        pos: u64,
        start: u64,
        html: bool,
        render: super::web::ansi::AnsiHtml,
        text_carry: Vec<u8>,
        done: bool,
    }
    let reading = Reading {
        rx,
        pos: 0,
        start,
        html,
        render: Default::default(),
        text_carry: Vec::new(),
        done: false,
    };
    let stream = futures_util::stream::unfold(reading, |mut r| async move {
        loop {
            if r.done {
                return None;
            }
            let reply = r.rx.recv().await?;
            if !reply.build_result.is_empty() {
                r.done = true;
                let ev = SseEvent::default()
                    .event("end")
                    .data(json!({ "result": reply.build_result }).to_string());
                return Some((Ok::<_, std::convert::Infallible>(ev), r));
            }
            let data = reply.data;
            let (from, to) = (r.pos, r.pos + data.len() as u64);
            r.pos = to;
            if to <= r.start {
                continue;
            }
            let piece = &data[r.start.saturating_sub(from) as usize..];
            let body = if r.html {
                json!({ "step": reply.step, "attempt": reply.attempt, "html": r.render.push(piece), "offset": to })
            } else {
                r.text_carry.extend_from_slice(piece);
                let whole = match std::str::from_utf8(&r.text_carry) {
                    Ok(_) => r.text_carry.len(),
                    Err(e) if e.error_len().is_none() => e.valid_up_to(),
                    Err(_) => r.text_carry.len(),
                };
                let rest = r.text_carry.split_off(whole);
                let text = String::from_utf8_lossy(&r.text_carry).into_owned();
                r.text_carry = rest;
                json!({ "step": reply.step, "attempt": reply.attempt, "text": text, "offset": to })
            };
            let ev = SseEvent::default()
                .event("output")
                .id(to.to_string())
                .data(body.to_string());
            return Some((Ok(ev), r));
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE))
        .into_response())
}
