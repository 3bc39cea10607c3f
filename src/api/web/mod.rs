//! The web UI: pages rendered on the server (maud: templates compiled into
//! the binary, every interpolated string escaped), one hand-written
//! JavaScript file and one CSS file embedded in the binary. Pages read
//! without JavaScript; the script adds live updates (Server-Sent Events
//! from `/api/v1/events` and `/api/v1/builds/{id}/log/stream`) and the
//! login, which runs SCRAM-SHA-256 in the browser so the password never
//! leaves it (see [`super::session`]).
//!
//! Pages: `/` (builders, their last builds, running builds with their step
//! and time left, queues), `/builders/{name}` (builds, paged; waiting
//! requests; force), `/builds/{id}` (properties, changes, steps, logs;
//! stop, rebuild), `/workers` (hang up), `/changes`, `/login`. Actions are
//! forms posted with the session's CSRF token and a one-time submission id,
//! so one double click makes one build.

pub mod ansi;
mod assets;
pub(crate) mod login;

use crate::store::{BuildStore, ReportOutbox};
use std::collections::HashMap;

use axum::extract::{Form, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;

use super::ApiState;
use super::access::{FormActor, Refusal, Viewer};
use crate::builds::Outcome;
use crate::proto::BuildDetails;

/// Builds per page on a builder's page.
const PAGE: usize = 25;
/// Builds shown per builder on the home page.
const HOME_BUILDS: usize = 8;
/// Lines of each step's log a build page opens at.
const TAIL_LINES: usize = 500;
/// Most bytes of each step's log a build page opens at.
const TAIL_BYTES: usize = 256 * 1024;

/// Each builder's last builds, as the home page shows them, kept between
/// requests: a builder's entry is read again only when one of its builds
/// starts or ends (the build master's events say which), or after
/// [`OVERVIEW_TTL`] in any case. With 100 builders the home page then costs
/// no database reads at all while nothing changes.
pub struct Overview {
    entries:
        std::sync::Mutex<HashMap<String, (tokio::time::Instant, crate::store::BuilderOverview)>>,
    events: std::sync::Mutex<tokio::sync::broadcast::Receiver<crate::builds::events::Stamped>>,
}

/// How long an overview entry is trusted without an event.
const OVERVIEW_TTL: std::time::Duration = std::time::Duration::from_secs(5);

impl Overview {
    fn new(events: tokio::sync::broadcast::Receiver<crate::builds::events::Stamped>) -> Self {
        Overview {
            entries: Default::default(),
            events: std::sync::Mutex::new(events),
        }
    }

    /// Forgets what the events since the last call made stale.
    fn apply_events(&self) {
        use crate::builds::events::Event;
        use tokio::sync::broadcast::error::TryRecvError;
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match events.try_recv() {
                Ok(e) => match e.event {
                    Event::BuildStarted { builder, .. } | Event::BuildEnded { builder, .. } => {
                        entries.remove(&builder);
                    }
                    _ => {}
                },
                Err(TryRecvError::Lagged(_)) => entries.clear(),
                Err(TryRecvError::Empty | TryRecvError::Closed) => return,
            }
        }
    }

    /// The overview of `names`, in that order.
    async fn of(
        &self,
        state: &crate::store::StateDb,
        names: &[String],
    ) -> Result<Vec<crate::store::BuilderOverview>, crate::store::StateError> {
        self.apply_events();
        let missing: Vec<String> = {
            let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            names
                .iter()
                .filter(|n| {
                    entries
                        .get(*n)
                        .is_none_or(|(at, _)| at.elapsed() >= OVERVIEW_TTL)
                })
                .cloned()
                .collect()
        };
        let read_at = tokio::time::Instant::now();
        let fresh = if missing.is_empty() {
            Vec::new()
        } else {
            state.builder_overview(missing, HOME_BUILDS).await?
        };
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(names.len());
        let mut fresh: HashMap<String, crate::store::BuilderOverview> =
            fresh.into_iter().map(|o| (o.name.clone(), o)).collect();
        for n in names {
            let o = match fresh.remove(n) {
                Some(o) => {
                    entries.insert(n.clone(), (read_at, o.clone()));
                    o
                }
                None => match entries.get(n) {
                    Some((_, o)) => o.clone(),
                    None => continue,
                },
            };
            out.push(o);
        }
        // Builders removed by a reload leave.
        if entries.len() > names.len() * 2 {
            entries.retain(|k, _| names.contains(k));
        }
        Ok(out)
    }
}

/// The pages' routes, the login endpoints and the static files.
pub fn routes(state: ApiState) -> axum::Router {
    let overview = std::sync::Arc::new(Overview::new(state.api.subscribe()));
    axum::Router::new()
        .route("/", get(home))
        .route("/builders/{name}", get(builder))
        .route("/builders/{name}/force", post(force))
        .route("/builds/{id}", get(build))
        .route("/builds/{id}/stop", post(stop))
        .route("/builds/{id}/rebuild", post(rebuild))
        .route("/builds/{id}/log/html", get(log_html))
        .route("/workers", get(workers))
        .route("/workers/{name}/hangup", post(hangup))
        .route("/changes", get(changes))
        .route("/reports", get(reports))
        .route("/login", get(login::page))
        .route("/api/v1/login/start", post(login::start))
        .route("/api/v1/login/finish", post(login::finish))
        .route("/api/v1/login/password", post(login::password))
        .route("/api/v1/logout", post(login::logout))
        .route("/static/{file}", get(assets::serve))
        .layer(axum::Extension(overview))
        .with_state(state)
}

/// An HTML answer.
fn page(status: StatusCode, markup: Markup) -> Response {
    let mut r = (status, markup.into_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The page a refused request gets: why, and the login form.
pub fn refused_page(refusal: Refusal, password_login: bool) -> Response {
    let Refusal(status, why) = refusal;
    page(
        status,
        layout(
            "Log in",
            &Viewer::default(),
            html! {
                p.refusal { (why) }
                (login::form(password_login))
            },
        ),
    )
}

/// A request allowed to read a page; otherwise the login page.
struct PageViewer(Viewer);

impl axum::extract::FromRequestParts<ApiState> for PageViewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &ApiState) -> Result<Self, Response> {
        Viewer::of(parts, s)
            .await
            .map(PageViewer)
            .map_err(|r| refused_page(r, login::takes_passwords(parts, s)))
    }
}

/// An error page.
fn error_page(viewer: &Viewer, status: StatusCode, why: impl std::fmt::Display) -> Response {
    page(
        status,
        layout(
            status.canonical_reason().unwrap_or("Error"),
            viewer,
            html! { p.refusal { (why.to_string()) } },
        ),
    )
}

fn layout(title: &str, viewer: &Viewer, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(s) = &viewer.session {
                    meta name="csrf-token" content=(s.csrf);
                }
                title { (title) " · Switchyard" }
                link rel="stylesheet" href=(assets::url("app.css"));
                script src=(assets::url("app.js")) data-noble=(assets::url("noble-hashes.js")) defer {}
            }
            body {
                header.top {
                    a.brand href="/" { "Switchyard" }
                    nav {
                        a href="/" { "Builders" }
                        a href="/workers" { "Workers" }
                        a href="/changes" { "Changes" }
                        a href="/reports" { "Reports" }
                    }
                    span.who {
                        @if let Some(u) = &viewer.user {
                            "Logged in as " strong { (u) }
                            @if viewer.session.is_some() {
                                " "
                                button #logout type="button" { "Log out" }
                            }
                        } @else {
                            a href="/login" { "Log in" }
                        }
                    }
                }
                main #main data-live="main" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// How a result looks: its CSS class, icon and words (`running` while it
/// has none).
fn result_look(result: Option<&str>) -> (&'static str, &'static str, &str) {
    match result {
        None | Some("") => ("running", "▶", "running"),
        Some("success") => ("success", "✔", "success"),
        Some("failure") => ("failure", "✘", "failure"),
        Some("interrupted") => ("interrupted", "■", "interrupted"),
        Some(other) => ("exception", "⚠", other),
    }
}

/// A result as text and an icon, coloured too (never colour alone).
fn result_badge(result: Option<&str>) -> Markup {
    let (class, icon, text) = result_look(result);
    html! { span class={ "result " (class) } title=(text) { span.icon aria-hidden="true" { (icon) } " " (text) } }
}

/// A small result cell (the home page's history), its text in `title`
/// and for screen readers.
fn result_cell(id: i64, number: i64, result: Option<&str>) -> Markup {
    let (class, icon, text) = result_look(result);
    html! {
        a class={ "cell " (class) } href={ "/builds/" (id) } title={ "#" (number) ": " (text) } {
            span aria-hidden="true" { (icon) } span.sr { (text) } " " (number)
        }
    }
}

/// A time (Unix ms) in UTC; the script shows it in the reader's zone.
fn time(ms: i64) -> Markup {
    if ms <= 0 {
        return html! { "–" };
    }
    let t = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms).unwrap_or_default();
    html! { time datetime=(t.to_rfc3339()) { (t.format("%Y-%m-%d %H:%M:%S UTC")) } }
}

/// A duration, short: `45s`, `3m 07s`, `2h 05m`.
fn duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{}h {:02}m", s / 3600, (s % 3600) / 60)
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A name as one URL path segment: every byte but letters, digits and
/// `-._~` percent-encoded (a builder may be named `a/b?c#d`).
fn seg(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn short_rev(rev: &str) -> &str {
    rev.get(..12).unwrap_or(rev)
}

/// A fresh id for one form submission.
fn submission_id() -> String {
    let mut b = [0u8; 12];
    rand::fill(&mut b[..]);
    crate::wire::hex(&b)
}

/// The hidden fields every action form carries.
fn form_guard(viewer: &Viewer) -> Markup {
    html! {
        @if let Some(s) = &viewer.session {
            input type="hidden" name="csrf" value=(s.csrf);
        }
        input type="hidden" name="submission" value=(submission_id());
    }
}

/// A one-button action form (stop, rebuild, hang up).
fn action_button(viewer: &Viewer, action: &str, label: &str, danger: bool) -> Markup {
    html! {
        form.action method="post" action=(action) {
            (form_guard(viewer))
            button type="submit" class=[danger.then_some("danger")] { (label) }
        }
    }
}

async fn home(
    PageViewer(viewer): PageViewer,
    State(s): State<ApiState>,
    axum::Extension(overview): axum::Extension<std::sync::Arc<Overview>>,
) -> Response {
    match home_markup(&s, &overview).await {
        Ok(m) => page(StatusCode::OK, layout("Builders", &viewer, m)),
        Err(e) => error_page(&viewer, StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn home_markup(
    s: &ApiState,
    overview: &Overview,
) -> Result<Markup, crate::debug::DebugError> {
    let builders = s.api.builders().await?;
    let names: Vec<String> = builders.builders.iter().map(|b| b.name.clone()).collect();
    let overview = overview.of(s.api.state(), &names).await?;
    let running = s.api.state().unfinished_builds().await?;
    let now = now_ms();
    Ok(html! {
        table.builders {
            thead { tr { th { "Builder" } th { "Last builds (newest first)" } th { "Running" } th { "Waiting" } } }
            tbody {
                @for (b, o) in builders.builders.iter().zip(&overview) {
                    tr {
                        td { a href={ "/builders/" (seg(&b.name)) } { (b.name) } }
                        td.cells {
                            @for x in &o.builds {
                                (result_cell(x.id, x.number, x.result.map(Outcome::as_str)))
                            }
                            @if o.builds.is_empty() { span.muted { "no builds yet" } }
                        }
                        td.running {
                            @for r in running.iter().filter(|r| r.builder == b.name) {
                                @let step = r.steps.iter().rev().find(|st| st.result.is_none());
                                @let elapsed = now - r.started_ms;
                                div {
                                    a href={ "/builds/" (r.id) } { "#" (r.number) }
                                    " on " (r.worker)
                                    @if let Some(st) = step { " · step " strong { (st.name) } }
                                    " · " (duration(elapsed))
                                    @match o.last_success_ms {
                                        Some(took) if took > elapsed => { " · about " (duration(took - elapsed)) " left" }
                                        Some(_) => { " · longer than the last success" }
                                        None => {}
                                    }
                                }
                            }
                        }
                        td.waiting { (b.waiting) }
                    }
                }
            }
        }
        @if builders.builders.is_empty() { p.muted { "No builders are configured." } }
    })
}

#[derive(Deserialize)]
struct BuilderQuery {
    before: Option<i64>,
}

async fn builder(
    PageViewer(viewer): PageViewer,
    State(s): State<ApiState>,
    Path(name): Path<String>,
    q: Result<Query<BuilderQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error_page(
            &viewer,
            StatusCode::BAD_REQUEST,
            "before must be a build's id",
        );
    };
    let filter = crate::store::BuildFilter {
        builder: Some(name.clone()),
        before: q.before,
        limit: PAGE,
        ..Default::default()
    };
    let builds = match s.api.find_builds(filter).await {
        Ok(b) => b,
        Err(crate::debug::DebugError::NotFound(m)) => {
            return error_page(&viewer, StatusCode::NOT_FOUND, m);
        }
        Err(e) => return error_page(&viewer, StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let waiting: Vec<_> = match s.api.state().waiting_requests().await {
        Ok(w) => w
            .into_iter()
            .filter(|r| r.request.builder == name)
            .collect(),
        Err(e) => return error_page(&viewer, StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let now = now_ms();
    let next = (builds.len() == PAGE)
        .then(|| builds.last().map(|b| b.id))
        .flatten();
    let body = html! {
        @if viewer.may_act {
            details.force {
                summary { "Force a build" }
                form method="post" action={ "/builders/" (seg(&name)) "/force" } {
                    (form_guard(&viewer))
                    label { "Branch " input name="branch" placeholder="(the default)"; }
                    label { "Revision " input name="revision" placeholder="(the branch's head)"; }
                    label { "Properties (NAME=VALUE, one per line) " textarea name="properties" rows="3" {} }
                    button type="submit" { "Force build" }
                }
            }
        }
        section data-live="builder" {
        h2 { "Waiting requests (" (waiting.len()) ")" }
        @if waiting.is_empty() { p.muted { "None." } } @else {
            table {
                thead { tr { th { "Request" } th { "Reason" } th { "Branch" } th { "Revision" } th { "Since" } } }
                tbody { @for r in &waiting { tr {
                    td { (r.id) } td { (r.request.reason) } td { (r.request.branch) }
                    td.mono { (short_rev(&r.request.revision)) } td { (time(r.created_ms)) }
                } } }
            }
        }
        h2 { "Builds" }
        table.builds {
            thead { tr { th { "#" } th { "Branch" } th { "Revision" } th { "Reason" } th { "Started" } th { "Duration" } th { "Result" } } }
            tbody { @for b in &builds { tr {
                td { a href={ "/builds/" (b.id) } { "#" (b.number) } }
                td { (b.branch) }
                td.mono { (short_rev(&b.revision)) }
                td { (b.reason) }
                td { (time(b.started_unix_ms)) }
                td { (duration(if b.finished_unix_ms > 0 { b.finished_unix_ms } else { now } - b.started_unix_ms)) }
                td { (result_badge(Some(b.result.as_str()))) }
            } } }
        }
        @if builds.is_empty() { p.muted { "No builds." } }
        nav.pages {
            @if q.before.is_some() { a href={ "/builders/" (seg(&name)) } { "Newest" } }
            @if let Some(n) = next { a href={ "/builders/" (seg(&name)) "?before=" (n) } { "Older →" } }
        }
        }
    };
    page(StatusCode::OK, layout(&name, &viewer, body))
}

async fn build(
    PageViewer(viewer): PageViewer,
    State(s): State<ApiState>,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> Response {
    let Ok(Path(id)) = id else {
        return error_page(&viewer, StatusCode::BAD_REQUEST, "a build's id is a number");
    };
    let b = match s.api.one_build(id).await {
        Ok(b) => b,
        Err(crate::debug::DebugError::NotFound(m)) => {
            return error_page(&viewer, StatusCode::NOT_FOUND, m);
        }
        Err(e) => return error_page(&viewer, StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let tails = match s.api.state().log_tails(id, TAIL_LINES, TAIL_BYTES).await {
        Ok(t) => t,
        Err(e) => return error_page(&viewer, StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let artifacts = match s.api.state().artifacts(id).await {
        Ok(a) => a,
        Err(e) => return error_page(&viewer, StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let title = format!("{} #{}", b.builder, b.number);
    page(
        StatusCode::OK,
        layout(
            &title,
            &viewer,
            build_markup(&viewer, &b, &tails, &artifacts),
        ),
    )
}

fn build_markup(
    viewer: &Viewer,
    b: &BuildDetails,
    tails: &[crate::store::LogTail],
    artifacts: &[crate::store::ArtifactRecord],
) -> Markup {
    let running = b.result.is_empty();
    let now = now_ms();
    let end = if b.finished_unix_ms > 0 {
        b.finished_unix_ms
    } else {
        now
    };
    // Where the whole build's output ends, as the live stream counts it.
    let live_start: u64 = tails.iter().map(|t| t.end).sum();
    html! {
        section #summary data-live="summary" {
            p {
                (result_badge(Some(b.result.as_str())))
                " · builder " a href={ "/builders/" (seg(&b.builder)) } { (b.builder) }
                " · worker " (b.worker)
                " · " (b.reason)
            }
            p { "Started " (time(b.started_unix_ms)) " · took " (duration(end - b.started_unix_ms)) }
            p { "Branch " strong { (b.branch) } " · revision " span.mono { (b.revision) } " · " (b.repository) }
            div.actions {
                @if viewer.may_act {
                    @if running { (action_button(viewer, &format!("/builds/{}/stop", b.id), "Stop", true)) }
                    (action_button(viewer, &format!("/builds/{}/rebuild", b.id), "Rebuild", false))
                }
                a href={ "/api/v1/builds/" (b.id) "/log" } { "Raw log" }
            }
            h2 { "Steps" }
            table.steps {
                thead { tr { th { "Step" } th { "Attempt" } th { "Result" } th { "Duration" } th { "Detail" } } }
                tbody { @for st in &b.steps { tr {
                    td { a href={ "#log-" (st.position) "-" (st.attempt) } { (st.name) } }
                    td { (st.attempt) }
                    td { (result_badge(Some(st.result.as_str()))) }
                    td { (duration(if st.finished_unix_ms > 0 { st.finished_unix_ms } else { now } - st.started_unix_ms)) }
                    td { (st.detail) }
                } } }
            }
        }
        h2 { "Logs" }
        div #logs data-build=(b.id) data-running=(running) data-live-start=(live_start) {
            @for (st, t) in b.steps.iter().zip(tails) {
                section.log id={ "log-" (st.position) "-" (st.attempt) } {
                    h3 {
                        (st.name)
                        @if st.attempt > 1 { " (attempt " (st.attempt) ")" }
                        " " a href={ "/api/v1/builds/" (b.id) "/log?step=" (st.position) } { "raw" }
                    }
                    @if st.log_stored == "pruned" {
                        p.muted { "This log was removed: the build is older than log_retention." }
                    }
                    @if let (Some(bytes), Some(lines)) = (st.log_bytes, st.log_lines) {
                        @if st.log_stored != "pruned" { p.muted { (bytes) " bytes, " (lines) " lines" } }
                    }
                    @if t.start > 0 {
                        button.earlier type="button" data-start=(t.start) data-step=(st.position) data-attempt=(st.attempt) { "Load earlier output" }
                    }
                    pre data-step-key={ (st.name) "#" (st.attempt) } {
                        (PreEscaped(ansi::AnsiHtml::new().push(&t.data)))
                    }
                }
            }
        }
        @if !artifacts.is_empty() {
            h2 { "Artifacts" }
            table.artifacts {
                thead { tr { th { "Name" } th { "Size" } th { "SHA-256" } } }
                tbody { @for a in artifacts { tr {
                    td { a href={ "/api/v1/builds/" (b.id) "/artifacts/" (a.name) } { (a.name) } }
                    td { (a.size) " bytes" }
                    td.mono { (a.sha256) }
                } } }
            }
        }
        h2 { "Properties" }
        table.props {
            thead { tr { th { "Name" } th { "Value" } th { "Source" } } }
            tbody { @for p in &b.properties { tr { td { (p.name) } td.mono { (p.value) } td { (p.source) } } } }
        }
        h2 { "Changes" }
        @if b.changes.is_empty() { p.muted { "No changes (forced)." } }
        @for c in &b.changes {
            article.change {
                p { span.mono { (short_rev(&c.revision)) } " on " (c.branch) " by " strong { (c.author) } " · " (time(c.when_unix_ms)) }
                pre.comments { (c.comments) }
                @if !c.files.is_empty() { ul.files { @for f in &c.files { li.mono { (f) } } } }
            }
        }
    }
}

#[derive(Deserialize)]
struct LogHtmlQuery {
    step: u32,
    attempt: u32,
    start: u64,
    end: u64,
}

/// `GET /builds/{id}/log/html?step=POS&attempt=N&start=&end=`: a byte range
/// of one step attempt's output as HTML (what "load earlier" fetches), at
/// most 1 MiB.
async fn log_html(
    PageViewer(viewer): PageViewer,
    State(s): State<ApiState>,
    Path(id): Path<i64>,
    q: Result<Query<LogHtmlQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error_page(
            &viewer,
            StatusCode::BAD_REQUEST,
            "step, attempt, start and end are needed",
        );
    };
    if q.end < q.start || q.end - q.start > 1024 * 1024 {
        return error_page(&viewer, StatusCode::BAD_REQUEST, "a range of at most 1 MiB");
    }
    let record = match s.api.state().build(id).await {
        Ok(Some(r)) => r,
        Ok(None) => return error_page(&viewer, StatusCode::NOT_FOUND, format!("no build {id}")),
        Err(e) => return error_page(&viewer, StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let Some(row) = record
        .steps
        .iter()
        .find(|st| st.position == q.step && st.attempt == q.attempt)
        .map(|st| st.row)
    else {
        return error_page(&viewer, StatusCode::NOT_FOUND, "no such step");
    };
    let mut out = Vec::new();
    let (mut pos, mut after) = (0u64, 0u64);
    'read: loop {
        let page_ = match s.api.state().log_page(row, after, 256 * 1024).await {
            Ok(p) => p,
            Err(e) => return error_page(&viewer, StatusCode::INTERNAL_SERVER_ERROR, e),
        };
        let Some(last) = page_.last() else { break };
        after = last.seq;
        for c in page_ {
            let (from, to) = (pos, pos + c.data.len() as u64);
            pos = to;
            if to > q.start {
                let a = q.start.saturating_sub(from) as usize;
                let b = (q.end.min(to) - from) as usize;
                out.extend_from_slice(&c.data[a..b]);
            }
            if to >= q.end {
                break 'read;
            }
        }
    }
    let mut r = (StatusCode::OK, ansi::AnsiHtml::new().push(&out)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

async fn workers(PageViewer(viewer): PageViewer, State(s): State<ApiState>) -> Response {
    let w = s.api.workers();
    let running = match s.api.state().unfinished_builds().await {
        Ok(r) => r,
        Err(e) => return error_page(&viewer, StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let body = html! {
        table.workers {
            thead { tr {
                th { "Worker" } th { "State" } th { "Host" } th { "OS" } th { "Arch" } th { "CPUs" }
                th { "Version" } th { "Since" } th { "Running" } th { "Last heard" } th {}
            } }
            tbody { @for w in &w.workers { tr {
                td { (w.name) }
                td { @if w.connected { span.result.success { "● connected" } } @else { span.result.exception { "○ not connected" } } }
                td { (w.hostname) } td { (w.os) } td { (w.arch) }
                td { @if w.cpus > 0 { (w.cpus) } }
                td { (w.version) }
                td { @if w.connected { (time(w.connected_unix_ms)) } }
                td { @for r in running.iter().filter(|r| r.worker == w.name) {
                    a href={ "/builds/" (r.id) } { (r.builder) " #" (r.number) } " "
                } }
                td { @if w.connected { (time(w.last_heard_unix_ms)) } }
                td { @if w.connected && viewer.may_act {
                    (action_button(&viewer, &format!("/workers/{}/hangup", seg(&w.name)), "Hang up", true))
                } }
            } } }
        }
    };
    page(StatusCode::OK, layout("Workers", &viewer, body))
}

/// `/reports`: the reports `[[reporter]]`s could not deliver yet.
async fn reports(PageViewer(viewer): PageViewer, State(s): State<ApiState>) -> Response {
    let found = match s.api.state().undelivered_reports(1000).await {
        Ok(r) => r,
        Err(e) => return error_page(&viewer, StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let body = html! {
        @if found.is_empty() {
            p { "Every report was delivered." }
        } @else {
            table.reports {
                thead { tr {
                    th { "Reporter" } th { "Build" } th { "Event" } th { "Queued" }
                    th { "Attempts" } th { "Next attempt" } th { "Last error" }
                } }
                tbody { @for r in &found { tr {
                    td { (r.reporter) }
                    td { a href={ "/builds/" (r.build_id) } { (r.builder) " #" (r.number) } }
                    td { @if r.finished { "finished" } @else { "started" } }
                    td { (time(r.created_ms)) }
                    td { (r.attempts) }
                    td { (time(r.next_ms)) }
                    td { (r.last_error) }
                } } }
            }
        }
    };
    page(StatusCode::OK, layout("Undelivered reports", &viewer, body))
}

#[derive(Deserialize)]
struct ChangesQuery {
    before: Option<i64>,
}

async fn changes(
    PageViewer(viewer): PageViewer,
    State(s): State<ApiState>,
    q: Result<Query<ChangesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error_page(
            &viewer,
            StatusCode::BAD_REQUEST,
            "before must be a change's id",
        );
    };
    let found = match s.api.state().recent_changes(q.before, PAGE).await {
        Ok(f) => f,
        Err(e) => return error_page(&viewer, StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let next = (found.len() == PAGE)
        .then(|| found.last().map(|(c, _)| c.id))
        .flatten();
    let body = html! {
        table.changes {
            thead { tr { th { "Change" } th { "Revision" } th { "Branch" } th { "Author" } th { "Comments" } th { "Files" } th { "Received" } th { "Builds" } } }
            tbody { @for (c, builds) in &found { tr {
                td { (c.id) }
                td.mono { (short_rev(&c.change.revision)) }
                td { (c.change.branch) }
                td { (c.change.author) }
                td { pre.comments { (c.change.comments) } }
                td { (c.change.files.len()) }
                td { (time(c.received_ms)) }
                td { @for b in builds { a href={ "/builds/" (b) } { (b) } " " } }
            } } }
        }
        @if found.is_empty() { p.muted { "No changes yet." } }
        nav.pages { @if let Some(n) = next { a href={ "/changes?before=" (n) } { "Older →" } } }
    };
    page(StatusCode::OK, layout("Changes", &viewer, body))
}

// ------------------------------------------------------------------ actions

/// What every action form sends besides its own fields.
#[derive(Deserialize)]
struct Guard {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    submission: String,
}

/// Checks an action form's CSRF token and takes its submission id: `Err`
/// is the answer to give at once (403; or, for a submission already acted
/// on, or being acted on by a double click's first request, the redirect
/// it got).
async fn guarded(
    s: &ApiState,
    who: &crate::api::session::SessionUser,
    g: &Guard,
) -> Result<(), Box<Response>> {
    use crate::api::session::Submission;
    if !who.csrf_matches(&g.csrf) {
        return Err(Box::new(error_page(
            &Viewer::default(),
            StatusCode::FORBIDDEN,
            "this form's CSRF token is missing or wrong: reload the page and try again",
        )));
    }
    if g.submission.is_empty() {
        return Ok(());
    }
    // A twin request waits (bounded) for the first to answer.
    for _ in 0..100 {
        match s.sessions.begin_submission(who, &g.submission) {
            Submission::New => return Ok(()),
            Submission::Answered(to) => return Err(Box::new(Redirect::to(&to).into_response())),
            Submission::InProgress => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
        }
    }
    Err(Box::new(error_page(
        &Viewer::default(),
        StatusCode::CONFLICT,
        "this form is still being acted on; reload the page",
    )))
}

/// Answers an action with a redirect to `to`, remembered for the
/// submission.
fn done(s: &ApiState, who: &crate::api::session::SessionUser, g: &Guard, to: String) -> Response {
    if !g.submission.is_empty() {
        s.sessions.end_submission(who, &g.submission, Some(&to));
    }
    Redirect::to(&to).into_response()
}

#[derive(Deserialize)]
struct ForceForm {
    #[serde(flatten)]
    guard: Guard,
    #[serde(default)]
    branch: String,
    #[serde(default)]
    revision: String,
    #[serde(default)]
    properties: String,
}

async fn force(
    FormActor(who): FormActor,
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Form(f): Form<ForceForm>,
) -> Response {
    act(&s, &who, &f.guard, async {
        let mut properties = HashMap::new();
        for line in f
            .properties
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
        {
            let (k, v) = line.split_once('=').ok_or_else(|| {
                crate::debug::DebugError::Invalid(format!("a property is NAME=VALUE, not {line:?}"))
            })?;
            properties.insert(k.trim().to_string(), v.trim().to_string());
        }
        let req = crate::proto::ForceRequest {
            builder: name.clone(),
            branch: f.branch.trim().to_string(),
            revision: f.revision.trim().to_string(),
            properties,
            ..Default::default()
        };
        let r = s.api.force(req, &who.user).await?;
        Ok(format!("/builders/{}?queued={}", seg(&name), r.request_id))
    })
    .await
}

/// Runs an action posted by a form, once its CSRF token and submission id
/// are checked: redirects to where `action` says, or shows why it failed.
async fn act(
    s: &ApiState,
    who: &crate::api::session::SessionUser,
    g: &Guard,
    action: impl std::future::Future<Output = Result<String, crate::debug::DebugError>>,
) -> Response {
    if let Err(answer) = guarded(s, who, g).await {
        return *answer;
    }
    let result = action.await;
    if result.is_err() && !g.submission.is_empty() {
        s.sessions.end_submission(who, &g.submission, None);
    }
    match result {
        Ok(to) => done(s, who, g, to),
        Err(crate::debug::DebugError::NotFound(m)) => {
            error_page(&Viewer::default(), StatusCode::NOT_FOUND, m)
        }
        Err(crate::debug::DebugError::Invalid(m)) => {
            error_page(&Viewer::default(), StatusCode::BAD_REQUEST, m)
        }
        Err(e) => error_page(&Viewer::default(), StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn stop(
    FormActor(who): FormActor,
    State(s): State<ApiState>,
    Path(id): Path<i64>,
    Form(g): Form<Guard>,
) -> Response {
    act(&s, &who, &g, async {
        s.api.stop(crate::proto::StopRequest { build: id })?;
        Ok(format!("/builds/{id}"))
    })
    .await
}

async fn rebuild(
    FormActor(who): FormActor,
    State(s): State<ApiState>,
    Path(id): Path<i64>,
    Form(g): Form<Guard>,
) -> Response {
    act(&s, &who, &g, async {
        let b = s.api.one_build(id).await?;
        let r = s
            .api
            .force(super::v1::rebuild_request(&b), &who.user)
            .await?;
        Ok(format!(
            "/builders/{}?queued={}",
            seg(&b.builder),
            r.request_id
        ))
    })
    .await
}

async fn hangup(
    FormActor(who): FormActor,
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Form(g): Form<Guard>,
) -> Response {
    act(&s, &who, &g, async {
        s.api.hangup(crate::proto::HangupRequest { worker: name })?;
        Ok("/workers".to_string())
    })
    .await
}
