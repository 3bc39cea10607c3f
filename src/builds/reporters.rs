//! `[[reporter]]`: commit statuses on GitHub, GitLab and Gitea, and JSON
//! build events to any URL, delivered from an outbox in the state
//! database.
//!
//! - A build's start and end each put a row in the outbox, written by
//!   triggers in the build's own transaction: a master killed right after a
//!   build ended still reports it once it is back. Delivery never blocks a
//!   build.
//! - The sender delivers each row to every reporter that wants it (builder
//!   and branch filters), one reporter's failures never holding up
//!   another's. A `429` or `5xx`, a timeout or a refused connection is
//!   retried with exponential backoff (1 s doubling to 10 min) or after the
//!   `Retry-After` the answer names; any other answer too (a token an
//!   operator is fixing), and a row still undelivered after the reporter's
//!   `max_age` is given up with a log line.
//! - Order per commit and context: a reporter sends a build's rows in
//!   order, skips a start whose end is already queued (a late `pending`
//!   never overwrites `success`), and holds a build's rows until the same
//!   commit and builder's earlier builds are delivered.
//! - Statuses: `pending` when a build starts; `success`, `failure` or
//!   `error` when it ends (interrupted and lost builds included), context
//!   `switchyard/<builder>`, target URL `[web] url` + `/builds/ID`. The
//!   owner and repository come from the change's repository URL.

use crate::store::ReportOutbox;
use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::BuildMaster;
use super::events::Outcome;
use crate::config::{ReporterConfig, ReporterKind, WebhookSecrets};
use crate::store::{QueuedReport, ReportProgress, ReportedBuild};

/// The most rows one pass of the sender looks at.
const BATCH: usize = 5000;
/// The longest wait between two attempts of one report.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// How long one delivery may take.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// A reporter with its token.
#[derive(Clone)]
struct Reporter {
    config: ReporterConfig,
    token: Option<String>,
}

/// The reporters and their sender.
pub struct Reporters {
    reporters: RwLock<Arc<Vec<Reporter>>>,
    web_url: RwLock<Option<String>>,
    builds: BuildMaster,
    http: reqwest::Client,
}

/// How one delivery went.
enum Sent {
    Ok,
    /// Retry, not before this long (the answer's `Retry-After`), and why.
    Retry(Option<Duration>, String),
}

impl Reporters {
    pub fn new(builds: BuildMaster) -> Arc<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
        let tls = rustls::ClientConfig::builder_with_provider(crate::dispatcher::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(SEND_TIMEOUT)
            .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an HTTP client with a rustls config");
        Arc::new(Reporters {
            reporters: RwLock::new(Arc::new(Vec::new())),
            web_url: RwLock::new(None),
            builds,
            http,
        })
    }

    /// Reports to exactly these from now on.
    pub fn set(
        &self,
        reporters: &[ReporterConfig],
        tokens: &WebhookSecrets,
        web_url: Option<String>,
    ) {
        let list = reporters
            .iter()
            .map(|r| Reporter {
                config: r.clone(),
                token: tokens.get(&r.name).map(str::to_string),
            })
            .collect();
        *self.reporters.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(list);
        *self.web_url.write().unwrap_or_else(|e| e.into_inner()) = web_url;
    }

    /// Delivers the outbox until `shutdown`: at once when a build starts or
    /// ends, else every second.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut events = self.builds.subscribe();
        loop {
            if let Err(e) = self.pass().await {
                tracing::error!(error = %e, "cannot read the reporters' outbox");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = events.recv() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// One pass over the outbox: each reporter's own queue, then the rows
    /// every reporter is done with are removed.
    async fn pass(&self) -> Result<(), crate::store::StateError> {
        let state = self.builds.state_db().clone();
        // Masters sharing a database send each report once between them:
        // the one leading `reporters` does.
        if !state.leads("reporters").await {
            return Ok(());
        }
        let reporters = self
            .reporters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let web_url = self
            .web_url
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for r in reporters.iter() {
            self.pass_for(r, web_url.as_deref()).await?;
        }
        let names = reporters.iter().map(|r| r.config.name.clone()).collect();
        state.forget_delivered_reports(names, BATCH).await?;
        Ok(())
    }

    /// One pass over one reporter's queue.
    async fn pass_for(
        &self,
        r: &Reporter,
        web_url: Option<&str>,
    ) -> Result<(), crate::store::StateError> {
        let state = self.builds.state_db();
        let (rows, progress) = state.report_queue(r.config.name.clone(), BATCH).await?;
        let now = crate::store::now_ms();
        // Builds whose end is queued: their start need not be sent.
        let ended: BTreeSet<i64> = rows
            .iter()
            .filter(|r| r.finished)
            .map(|r| r.build_id)
            .collect();
        // Rows done without sending: not wanted, superseded or expired.
        let mut skip = Vec::new();
        // (revision, builder) with an earlier row not yet done: later rows
        // of the same commit and context wait for it.
        let mut blocked: BTreeSet<(String, String)> = BTreeSet::new();
        for row in &rows {
            let Some(b) = &row.build else {
                skip.push(row.outbox_id);
                continue;
            };
            if !r.config.wants(&b.builder, &b.branch) {
                skip.push(row.outbox_id);
                continue;
            }
            let p = progress.get(&row.outbox_id).cloned().unwrap_or_default();
            let context = (b.revision.clone(), b.builder.clone());
            if blocked.contains(&context) {
                continue;
            }
            let superseded = !row.finished && ended.contains(&row.build_id);
            let expired = now - row.created_ms > r.config.max_age.as_millis() as i64;
            if superseded || expired {
                if expired && !superseded {
                    tracing::warn!(reporter = %r.config.name, build = row.build_id, attempts = p.attempts, last_error = %p.last_error, "giving up a report older than max_age");
                }
                skip.push(row.outbox_id);
                continue;
            }
            if p.next_ms > now {
                blocked.insert(context);
                continue;
            }
            let next = match self.send(r, row, b, web_url).await {
                Sent::Ok => ReportProgress {
                    done: true,
                    attempts: p.attempts + 1,
                    next_ms: 0,
                    last_error: String::new(),
                },
                Sent::Retry(after, why) => {
                    let backoff = Duration::from_secs(1)
                        .saturating_mul(1u32 << p.attempts.clamp(0, 10) as u32)
                        .min(MAX_BACKOFF);
                    let wait = after.unwrap_or(backoff).min(MAX_BACKOFF);
                    if p.attempts == 0 || p.last_error != why {
                        tracing::warn!(reporter = %r.config.name, build = row.build_id, error = %why, retry_in = ?wait, "a report was not delivered; retrying");
                    }
                    blocked.insert(context);
                    ReportProgress {
                        done: false,
                        attempts: p.attempts + 1,
                        next_ms: now + wait.as_millis() as i64,
                        last_error: why,
                    }
                }
            };
            state
                .set_report_progress(row.outbox_id, r.config.name.clone(), next)
                .await?;
        }
        state.skip_reports(r.config.name.clone(), skip).await
    }

    /// One delivery of one row to one reporter.
    async fn send(
        &self,
        r: &Reporter,
        row: &QueuedReport,
        b: &ReportedBuild,
        web_url: Option<&str>,
    ) -> Sent {
        let target = web_url.map(|u| format!("{u}/builds/{}", row.build_id));
        let outcome = b.result;
        let context = format!("switchyard/{}", b.builder);
        let description = match (row.finished, outcome) {
            (false, _) => format!("build {} running", b.number),
            (true, Some(o)) => format!("build {} {o}", b.number),
            (true, None) => format!("build {} ended", b.number),
        };
        let request = match r.config.kind {
            ReporterKind::Http => {
                let body = serde_json::json!({
                    "event": if row.finished { "finished" } else { "started" },
                    "build": {
                        "id": row.build_id,
                        "builder": b.builder,
                        "number": b.number,
                        "result": b.result,
                        "repository": b.repository,
                        "branch": b.branch,
                        "revision": b.revision,
                        "url": target,
                    },
                })
                .to_string();
                let mut req = self
                    .http
                    .post(&r.config.url)
                    .header("content-type", "application/json");
                if let Some(t) = &r.token {
                    let mac = crate::auth::verifier::hmac(t.as_bytes(), body.as_bytes());
                    let hex = crate::wire::hex(&mac);
                    req = req.header("x-switchyard-signature-256", format!("sha256={hex}"));
                }
                req.body(body)
            }
            kind => {
                let Some(path) = repository_path(&b.repository) else {
                    // Nothing to report against: done, with a log line.
                    tracing::warn!(reporter = %r.config.name, repository = %b.repository, "cannot tell the owner and repository from this URL; no status sent");
                    return Sent::Ok;
                };
                if b.revision.is_empty() {
                    return Sent::Ok;
                }
                let state = status_state(kind, row.finished, outcome);
                let token = r.token.clone().unwrap_or_default();
                match kind {
                    ReporterKind::GitLab => {
                        let id: String = form_urlencoded_path(&path);
                        self.http
                            .post(format!(
                                "{}/projects/{id}/statuses/{}",
                                r.config.url, b.revision
                            ))
                            .header("private-token", token)
                            .header("content-type", "application/json")
                            .body(
                                serde_json::json!({
                                    "state": state, "name": context, "target_url": target,
                                    "description": description,
                                })
                                .to_string(),
                            )
                    }
                    _ => {
                        let auth = if kind == ReporterKind::GitHub {
                            format!("Bearer {token}")
                        } else {
                            format!("token {token}")
                        };
                        self.http
                            .post(format!(
                                "{}/repos/{path}/statuses/{}",
                                r.config.url, b.revision
                            ))
                            .header("authorization", auth)
                            .header("accept", "application/vnd.github+json")
                            .header("content-type", "application/json")
                            .body(
                                serde_json::json!({
                                    "state": state, "context": context, "target_url": target,
                                    "description": description,
                                })
                                .to_string(),
                            )
                    }
                }
            }
        };
        match request.send().await {
            Ok(resp) if resp.status().is_success() => Sent::Ok,
            Ok(resp) => {
                let after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                Sent::Retry(after, format!("HTTP {}", resp.status()))
            }
            Err(e) => Sent::Retry(None, error_chain(&e)),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut at = e.source();
    while let Some(inner) = at {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        at = inner.source();
    }
    s
}

/// The state a provider's API takes.
fn status_state(kind: ReporterKind, finished: bool, outcome: Option<Outcome>) -> &'static str {
    match (kind, finished, outcome) {
        (ReporterKind::GitLab, false, _) => "running",
        (_, false, _) => "pending",
        (_, true, Some(Outcome::Success)) => "success",
        (ReporterKind::GitLab, true, Some(Outcome::Interrupted)) => "canceled",
        (ReporterKind::GitLab, true, _) => "failed",
        (_, true, Some(Outcome::Failure)) => "failure",
        (_, true, _) => "error",
    }
}

/// `OWNER/REPO` (GitLab: the whole project path) from a repository URL:
/// `https://host/OWNER/REPO(.git)`, `git@host:OWNER/REPO.git`,
/// `ssh://git@host/OWNER/REPO.git`.
pub fn repository_path(url: &str) -> Option<String> {
    let rest = if let Some((_, r)) = url.split_once("://") {
        r.split_once('/')?.1
    } else {
        url.split_once(':')?.1
    };
    let path = rest.trim_matches('/').trim_end_matches(".git");
    (path.contains('/') && !path.split('/').any(str::is_empty)).then(|| path.to_string())
}

/// A GitLab project path as its URL-encoded id (`group%2Fproject`).
fn form_urlencoded_path(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_and_repository_from_urls() {
        for (url, path) in [
            ("https://github.com/octo/widgets.git", Some("octo/widgets")),
            ("https://github.com/octo/widgets", Some("octo/widgets")),
            ("git@github.com:octo/widgets.git", Some("octo/widgets")),
            (
                "ssh://git@gitlab.example.org/group/sub/proj.git",
                Some("group/sub/proj"),
            ),
            ("widgets", None),
            ("https://github.com/", None),
        ] {
            assert_eq!(repository_path(url).as_deref(), path, "{url}");
        }
        assert_eq!(form_urlencoded_path("group/sub/proj"), "group%2Fsub%2Fproj");
    }

    #[test]
    fn states_per_provider() {
        use ReporterKind::*;
        assert_eq!(status_state(GitHub, false, None), "pending");
        assert_eq!(status_state(GitLab, false, None), "running");
        assert_eq!(
            status_state(GitHub, true, Some(Outcome::Failure)),
            "failure"
        );
        assert_eq!(
            status_state(GitHub, true, Some(Outcome::Interrupted)),
            "error"
        );
        assert_eq!(
            status_state(GitLab, true, Some(Outcome::Interrupted)),
            "canceled"
        );
        assert_eq!(status_state(Gitea, true, Some(Outcome::Exception)), "error");
    }
}
