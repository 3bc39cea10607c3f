//! The operator's console: status, workers, builders, builds, logs, force,
//! stop, hangup and watch.
//!
//! [`DebugApi`] is the one implementation. It is served twice on the port:
//! over the native protocol as service `debug` ([`service`]), and as the gRPC
//! service `switchyard.v1.Debug` ([`grpc`]). [`console`] is the client behind
//! `switchyard debug`.

pub mod console;
pub mod grpc;
pub mod service;

use crate::store::{BuildStore, ReportOutbox};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};

use crate::builds::{BuildError, BuildMaster, Event, Stamped};
use crate::proto::{
    BuildChange, BuildDetails, BuilderDetails, BuildersReply, BuildsReply, BuildsRequest,
    DebugEvent, ForceReply, ForceRequest, HangupReply, HangupRequest, LogReply, LogRequest,
    OutputStream, StatusReply, StepDetails, StopReply, StopRequest, WorkerDetails, WorkersReply,
};
use crate::proto::{ReloadReply, UnblockReply, UnblockRequest};
use crate::store::{BuildRecord, StateError};

/// The service name users must be granted to use the console.
pub const SERVICE: &str = "debug";

/// Why a console command failed; the text is shown to the operator.
#[derive(Debug, thiserror::Error)]
pub enum DebugError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Internal(String),
}

impl From<BuildError> for DebugError {
    fn from(e: BuildError) -> Self {
        match e {
            BuildError::State(s) => DebugError::Internal(s.to_string()),
            other => DebugError::NotFound(other.to_string()),
        }
    }
}

impl From<StateError> for DebugError {
    fn from(e: StateError) -> Self {
        DebugError::Internal(e.to_string())
    }
}

/// Log bytes per reply when streaming a log.
const LOG_PAGE: usize = 256 * 1024;

/// The longest a `force` waits for its build to start.
const MAX_FORCE_WAIT: Duration = Duration::from_secs(60);

/// How often a followed log looks for new output of a running build when
/// no event says there is some (events can be missed by a slow reader).
const FOLLOW_POLL: Duration = Duration::from_secs(1);

/// Asks the master to reload; answered with the summary or the error.
pub type Reloader = mpsc::Sender<tokio::sync::oneshot::Sender<Result<String, String>>>;

/// The console's operations, on one build master.
#[derive(Clone)]
pub struct DebugApi {
    builds: BuildMaster,
    reloader: Option<Reloader>,
    /// The port, for `unblock`.
    port: Option<crate::dispatcher::Dispatcher>,
    /// `watch`es running now (what `status` reports; other listeners of the
    /// build master's events, such as the metrics, are not watches).
    watching: Arc<std::sync::atomic::AtomicUsize>,
}

/// A running `watch`: the build master's events from now on, counted by
/// `status` until it is dropped.
pub struct Watch {
    pub events: broadcast::Receiver<Stamped>,
    watching: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.watching
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn build_details(b: BuildRecord) -> BuildDetails {
    BuildDetails {
        id: b.id,
        builder: b.builder,
        worker: b.worker,
        result: b.result.map(|o| o.as_str().to_string()).unwrap_or_default(),
        reason: b.reason,
        repository: b.repository,
        branch: b.branch,
        revision: b.revision,
        number: b.number,
        properties: b
            .properties
            .into_iter()
            .map(|(name, value, source)| crate::proto::Property {
                name,
                value,
                source,
            })
            .collect(),
        started_unix_ms: b.started_ms,
        finished_unix_ms: b.finished_ms.unwrap_or(0),
        steps: b
            .steps
            .into_iter()
            .map(|s| StepDetails {
                name: s.name,
                position: s.position,
                attempt: s.attempt,
                step_id: s.step_id.to_string(),
                result: s.result.map(|o| o.as_str().to_string()).unwrap_or_default(),
                exit_code: s.exit_code,
                signal: s.signal,
                detail: s.detail,
                started_unix_ms: s.started_ms,
                finished_unix_ms: s.finished_ms.unwrap_or(0),
                on_lost: s.on_lost,
                log_stored: s.log_stored.as_str().to_string(),
                log_bytes: s.log_bytes,
                log_lines: s.log_lines,
            })
            .collect(),
        changes: Vec::new(),
    }
}

impl DebugApi {
    pub fn new(builds: BuildMaster) -> Self {
        DebugApi {
            builds,
            reloader: None,
            port: None,
            watching: Arc::default(),
        }
    }

    /// Lets `reload` ask the master to re-read its files.
    pub fn with_reloader(mut self, reloader: Reloader) -> Self {
        self.reloader = Some(reloader);
        self
    }

    /// Re-reads the config and secrets (as SIGHUP does).
    pub async fn reload(&self, who: &str) -> Result<ReloadReply, DebugError> {
        let reloader = self
            .reloader
            .as_ref()
            .ok_or_else(|| DebugError::Invalid("this master cannot reload".into()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        tracing::info!(by = %who, "reload requested from the console");
        reloader
            .send(tx)
            .await
            .map_err(|_| DebugError::Internal("the master is shutting down".into()))?;
        match rx.await {
            Ok(Ok(summary)) => Ok(ReloadReply { summary }),
            Ok(Err(e)) => Err(DebugError::Invalid(format!(
                "reload rejected, nothing changed: {e}"
            ))),
            Err(_) => Err(DebugError::Internal("the master is shutting down".into())),
        }
    }

    pub async fn status(&self) -> Result<StatusReply, DebugError> {
        let config = self.builds.config();
        let waiting: u64 = self.builds.state().waiting_counts().await?.values().sum();
        Ok(StatusReply {
            version: env!("CARGO_PKG_VERSION").to_string(),
            workers_configured: config.workers.len() as u32,
            workers_connected: self.builds.connected().len() as u32,
            builders: config.builders.len() as u32,
            builds_running: self.builds.running_builds() as u32,
            requests_waiting: waiting,
            watchers: self.watching.load(std::sync::atomic::Ordering::SeqCst) as u32,
            reports_undelivered: self.state().undelivered_report_count().await?,
            lease_epoch: self.builds.lease_epoch(),
            lease_lost: self.builds.lease_lost(),
        })
    }

    pub fn workers(&self) -> WorkersReply {
        let config = self.builds.config();
        let connected: std::collections::HashMap<String, _> = self
            .builds
            .connected()
            .into_iter()
            .map(|l| (l.name.clone(), l))
            .collect();
        let workers = config
            .workers
            .values()
            .map(|w| match connected.get(&w.name) {
                Some(l) => WorkerDetails {
                    name: w.name.clone(),
                    connected: true,
                    hostname: l.hello.hostname.clone(),
                    os: l.hello.os.clone(),
                    arch: l.hello.arch.clone(),
                    cpus: l.hello.cpus,
                    version: l.hello.version.clone(),
                    max_builds: w.max_builds as u32,
                    running_builds: l.running_builds() as u32,
                    connected_unix_ms: l.connected_ms,
                    session_id: l.session_id.clone(),
                    last_heard_unix_ms: l.last_heard_ms(),
                },
                None => WorkerDetails {
                    name: w.name.clone(),
                    max_builds: w.max_builds as u32,
                    ..Default::default()
                },
            })
            .collect();
        WorkersReply { workers }
    }

    pub async fn builders(&self) -> Result<BuildersReply, DebugError> {
        let config = self.builds.config();
        let waiting = self.builds.state().waiting_counts().await?;
        Ok(BuildersReply {
            builders: config
                .builders
                .values()
                .map(|b| BuilderDetails {
                    name: b.name.clone(),
                    workers: b.workers.clone(),
                    steps: b.steps.iter().map(|s| s.name.clone()).collect(),
                    waiting: waiting.get(&b.name).copied().unwrap_or(0),
                })
                .collect(),
        })
    }

    /// The state database (for reads the console has no command for).
    pub fn state(&self) -> &crate::store::StateDb {
        self.builds.state()
    }

    /// Builds matching `filter`, newest first (an unknown builder is an
    /// error, not an empty list).
    pub async fn find_builds(
        &self,
        filter: crate::store::BuildFilter,
    ) -> Result<Vec<BuildDetails>, DebugError> {
        if let Some(b) = &filter.builder
            && !self.builds.config().builders.contains_key(b)
        {
            return Err(DebugError::NotFound(format!("no builder named {b:?}")));
        }
        let builds = self.builds.state().find_builds(filter).await?;
        Ok(builds.into_iter().map(build_details).collect())
    }

    /// One build in detail: with the changes it covers.
    pub async fn one_build(&self, id: i64) -> Result<BuildDetails, DebugError> {
        let state = self.builds.state();
        let b = state
            .build(id)
            .await?
            .ok_or_else(|| DebugError::NotFound(format!("no build {id}")))?;
        let mut details = build_details(b);
        for change in state.build_change_ids(id).await? {
            if let Some(c) = state.change(change).await? {
                details.changes.push(BuildChange {
                    id: c.id,
                    when_unix_ms: c
                        .change
                        .when
                        .map(|(s, n)| s * 1000 + i64::from(n) / 1_000_000)
                        .unwrap_or(c.received_ms),
                    repository: c.change.repository,
                    branch: c.change.branch,
                    revision: c.change.revision,
                    author: c.change.author,
                    comments: c.change.comments,
                    files: c.change.files,
                });
            }
        }
        Ok(details)
    }

    pub async fn builds(&self, req: BuildsRequest) -> Result<BuildsReply, DebugError> {
        // One build, by id or by builder#number.
        let one = match (req.build, req.number) {
            (0, 0) => None,
            (0, n) => Some(
                self.builds
                    .state()
                    .build_by_number(&req.builder, n)
                    .await?
                    .ok_or_else(|| DebugError::NotFound(format!("no build {}#{n}", req.builder)))?,
            ),
            (id, _) => Some(id),
        };
        if let Some(id) = one {
            return Ok(BuildsReply {
                builds: vec![self.one_build(id).await?],
            });
        }
        let builder = (!req.builder.is_empty()).then_some(req.builder);
        if let Some(b) = &builder
            && !self.builds.config().builders.contains_key(b)
        {
            return Err(DebugError::NotFound(format!("no builder named {b:?}")));
        }
        let limit = if req.limit == 0 {
            20
        } else {
            req.limit.min(1000)
        } as usize;
        let builds = self.builds.state().builds(builder, limit).await?;
        Ok(BuildsReply {
            builds: builds.into_iter().map(build_details).collect(),
        })
    }

    /// Sends the log of a build (or of one step: its name or position) to
    /// `out`, page by page, oldest first. With `follow`, a running build's
    /// output keeps coming until it ends, and the last reply carries its
    /// result.
    pub async fn log(
        &self,
        req: LogRequest,
        out: mpsc::Sender<LogReply>,
    ) -> Result<(), DebugError> {
        let state = self.builds.state();
        // Where each step attempt's log has been sent up to, by its row.
        let mut sent: std::collections::HashMap<i64, u64> = Default::default();
        let mut events = self.builds.subscribe();
        loop {
            let build = state
                .build(req.build)
                .await?
                .ok_or_else(|| DebugError::NotFound(format!("no build {}", req.build)))?;
            let finished = build.result;
            let steps: Vec<_> = if req.step.is_empty() {
                build.steps
            } else {
                let chosen: Vec<_> = build
                    .steps
                    .into_iter()
                    .filter(|s| s.name == req.step || s.position.to_string() == req.step)
                    .collect();
                if chosen.is_empty() && !(req.follow && finished.is_none()) {
                    return Err(DebugError::NotFound(format!(
                        "build {} has no step {:?}",
                        req.build, req.step
                    )));
                }
                chosen
            };
            for s in steps {
                let after = sent.entry(s.row).or_insert(0);
                loop {
                    let page = state.log_page(s.row, *after, LOG_PAGE).await?;
                    let Some(last) = page.last() else { break };
                    *after = last.seq;
                    for c in page {
                        let reply = LogReply {
                            step: s.name.clone(),
                            attempt: s.attempt,
                            stream: OutputStream::try_from(c.stream)
                                .unwrap_or(OutputStream::Unspecified)
                                as i32,
                            data: c.data.into(),
                            build_result: String::new(),
                        };
                        if out.send(reply).await.is_err() {
                            return Ok(());
                        }
                    }
                }
            }
            if !req.follow {
                return Ok(());
            }
            // The build's end is recorded after its last output is stored:
            // read once more after seeing it, then stop.
            if let Some(result) = finished {
                let _ = out
                    .send(LogReply {
                        build_result: result.as_str().to_string(),
                        ..Default::default()
                    })
                    .await;
                return Ok(());
            }
            // Until this build's output is stored, a step of it starts or
            // ends, or it ends.
            let this_build = async {
                loop {
                    match events.recv().await {
                        Ok(e) => {
                            let ours = match e.event {
                                Event::OutputStored { build, .. }
                                | Event::StepStarted { build, .. }
                                | Event::StepEnded { build, .. }
                                | Event::BuildEnded { build, .. } => build == req.build,
                                _ => false,
                            };
                            if ours {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_POLL) => {}
                _ = this_build => {}
                _ = out.closed() => return Ok(()),
            }
        }
    }

    pub async fn force(&self, req: ForceRequest, who: &str) -> Result<ForceReply, DebugError> {
        if req.builder.is_empty() {
            return Err(DebugError::Invalid("force needs a builder name".into()));
        }
        // The limits of a pushed change's fields apply to a forced one.
        let max = crate::grpc::change_source::ChangeLimits::default().max_field;
        for (field, value) in [
            ("builder", &req.builder),
            ("branch", &req.branch),
            ("revision", &req.revision),
            ("repository", &req.repository),
        ] {
            if value.len() > max {
                return Err(DebugError::Invalid(format!(
                    "force: --{field} is {} bytes, over the limit of {max}",
                    value.len()
                )));
            }
        }
        let limits = crate::grpc::change_source::ChangeLimits::default();
        if req.properties.len() > limits.max_properties {
            return Err(DebugError::Invalid(format!(
                "force: more than {} properties",
                limits.max_properties
            )));
        }
        for (k, v) in &req.properties {
            if k.is_empty()
                || k.len() > limits.max_property_name
                || v.len() > limits.max_property_value
            {
                return Err(DebugError::Invalid(format!(
                    "force: property {k:?} has an empty or too long name, or too long a value"
                )));
            }
        }
        let id = self
            .builds
            .force_with(
                &req.builder,
                &req.branch,
                &req.revision,
                &req.repository,
                who,
                req.properties.into_iter().collect(),
            )
            .await?;
        tracing::info!(builder = %req.builder, request = id, by = %who, "build forced");
        let wait = Duration::from_millis(u64::from(req.wait_ms)).min(MAX_FORCE_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let build = loop {
            if wait.is_zero() {
                break None; // asked not to wait: a request, whatever happens next
            }
            if let Some(build) = self.builds.state().request_build(id).await? {
                break self.one_build(build).await.ok();
            }
            if tokio::time::Instant::now() >= deadline {
                break None;
            }
            // A build starts within a scheduling pass; no need for an event.
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Ok(ForceReply {
            request_id: id,
            build,
        })
    }

    pub fn stop(&self, req: StopRequest) -> Result<StopReply, DebugError> {
        self.builds.stop(req.build)?;
        Ok(StopReply {})
    }

    /// Lets the console lift throttle blocks on `port`.
    pub fn with_port(mut self, port: crate::dispatcher::Dispatcher) -> Self {
        self.port = Some(port);
        self
    }

    pub fn unblock(&self, req: UnblockRequest, who: &str) -> Result<UnblockReply, DebugError> {
        let ip: std::net::IpAddr = req.address.trim().parse().map_err(|_| {
            DebugError::Invalid(format!(
                "{:?} is not an IP address (e.g. 192.0.2.7 or 2001:db8::7)",
                req.address
            ))
        })?;
        let port = self
            .port
            .as_ref()
            .ok_or_else(|| DebugError::Invalid("this console has no port to unblock".into()))?;
        let forgotten = port.unblock(ip);
        tracing::info!(peer = %ip, by = %who, forgotten, "address unblocked from the console");
        Ok(UnblockReply {
            forgotten: forgotten as u32,
        })
    }

    /// The artifacts a build's upload steps stored.
    pub async fn artifacts(
        &self,
        req: crate::proto::ArtifactsRequest,
    ) -> Result<crate::proto::ArtifactsReply, DebugError> {
        self.one_build(req.build).await?;
        let found = self.state().artifacts(req.build).await?;
        Ok(crate::proto::ArtifactsReply {
            artifacts: found
                .into_iter()
                .map(|a| crate::proto::Artifact {
                    name: a.name,
                    size: a.size,
                    sha256: a.sha256,
                })
                .collect(),
        })
    }

    /// The reports `[[reporter]]`s tried to deliver and could not yet.
    pub async fn reports(&self) -> Result<crate::proto::ReportsReply, DebugError> {
        let found = self.state().undelivered_reports(1000).await?;
        Ok(crate::proto::ReportsReply {
            reports: found
                .into_iter()
                .map(|r| crate::proto::UndeliveredReport {
                    reporter: r.reporter,
                    build_id: r.build_id,
                    builder: r.builder,
                    number: r.number,
                    event: if r.finished { "finished" } else { "started" }.into(),
                    queued_unix_ms: r.created_ms,
                    attempts: r.attempts,
                    next_attempt_unix_ms: r.next_ms,
                    last_error: r.last_error,
                })
                .collect(),
        })
    }

    pub fn hangup(&self, req: HangupRequest) -> Result<HangupReply, DebugError> {
        self.builds.hangup(&req.worker)?;
        tracing::info!(worker = %req.worker, "worker hung up from the console");
        Ok(HangupReply {})
    }

    /// The build master's events, from now on, for a front end that keeps
    /// its own view up to date (not counted as a watcher).
    pub fn subscribe(&self) -> broadcast::Receiver<Stamped> {
        self.builds.subscribe()
    }

    /// The build master's events, from now on (each turned into the wire
    /// type with [`wire_event`]).
    pub fn watch(&self) -> Watch {
        self.watching
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Watch {
            events: self.builds.subscribe(),
            watching: self.watching.clone(),
        }
    }
}

/// The console's wire form of a domain event (`None`: the console's
/// `watch` does not show it).
pub fn wire_event(e: &Stamped) -> Option<DebugEvent> {
    use crate::proto::{
        BuildEndedEvent, BuildStartedEvent, ReloadedEvent, StepEndedEvent, StepStartedEvent,
        WorkerConnectedEvent, WorkerLostEvent, debug_event::Kind,
    };
    let kind = match e.event.clone() {
        Event::WorkerConnected { worker, session_id } => {
            Kind::WorkerConnected(WorkerConnectedEvent { worker, session_id })
        }
        Event::WorkerLost { worker, reason } => {
            Kind::WorkerLost(WorkerLostEvent { worker, reason })
        }
        Event::BuildStarted {
            build,
            builder,
            worker,
        } => Kind::BuildStarted(BuildStartedEvent {
            build,
            builder,
            worker,
        }),
        Event::StepStarted {
            build,
            step,
            attempt,
        } => Kind::StepStarted(StepStartedEvent {
            build,
            step,
            attempt,
        }),
        Event::StepEnded {
            build,
            step,
            attempt,
            outcome,
            detail,
        } => Kind::StepEnded(StepEndedEvent {
            build,
            step,
            attempt,
            result: outcome.as_str().into(),
            detail,
        }),
        Event::BuildEnded {
            build,
            builder,
            outcome,
        } => Kind::BuildEnded(BuildEndedEvent {
            build,
            builder,
            result: outcome.as_str().into(),
        }),
        Event::Reloaded { summary } => Kind::Reloaded(ReloadedEvent { summary }),
        // Not on the console's wire: `log -f` reads the output itself.
        Event::OutputStored { .. } => return None,
    };
    Some(DebugEvent {
        unix_ms: e.unix_ms,
        kind: Some(kind),
    })
}
