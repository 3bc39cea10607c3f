//! `/metrics` in Prometheus text format.
//!
//! The build metrics follow the build master's domain events (a task reads
//! them as they come, so a scrape never walks the database for them); the
//! queue length per builder is read when scraped. Reading needs a user
//! granted `metrics` (HTTP Basic, the port's checkers and login throttle),
//! unless `[web] public_metrics = true`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::builds::{BuildMaster, Event, Stamped};
use crate::dispatcher::Dispatcher;

/// The grant a user needs to read `/metrics`.
pub const SERVICE: &str = "metrics";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    builder: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuilderLabel {
    builder: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabel {
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    method: String,
    code: String,
}

/// A gRPC status code's name, as gRPC writes it.
fn grpc_code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    builder: String,
    step: String,
    result: String,
}

fn duration_histogram() -> Histogram {
    // 0.1 s to about 3.6 hours.
    Histogram::new(exponential_buckets(0.1, 2.0, 18))
}

/// The metrics a master exposes, and what is needed to keep them.
pub struct Metrics {
    registry: Registry,
    builds: Family<BuildLabels, Counter>,
    build_seconds: Family<BuilderLabel, Histogram>,
    step_seconds: Family<StepLabels, Histogram>,
    log_bytes: Counter,
    workers_connected: Gauge,
    lease_epoch: Gauge,
    reloads: Family<OutcomeLabel, Counter>,
    reload_seconds: Histogram,
    queue: Family<BuilderLabel, Gauge>,
    connections: Family<ProtocolLabel, Counter>,
    http_requests: Family<RouteLabels, Counter>,
    grpc_requests: Family<GrpcLabels, Counter>,
    logins: Family<OutcomeLabel, Counter>,
    sessions: Family<ServiceLabel, Counter>,
    /// The port's counts as of the last scrape (the counters above take
    /// the difference).
    port_seen: Mutex<crate::dispatcher::counters::PortCounts>,
    /// Running builds (builder, started) and steps (started), to time them.
    running: Mutex<Running>,
}

#[derive(Default)]
struct Running {
    builds: HashMap<i64, (String, i64)>,
    steps: HashMap<(i64, String, u32), i64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchyard");
        let builds = Family::<BuildLabels, Counter>::default();
        registry.register(
            "builds",
            "Builds ended, by builder and result",
            builds.clone(),
        );
        let build_seconds = Family::<BuilderLabel, Histogram>::new_with_constructor(
            duration_histogram as fn() -> _,
        );
        registry.register(
            "build_duration_seconds",
            "How long builds took, by builder",
            build_seconds.clone(),
        );
        let step_seconds =
            Family::<StepLabels, Histogram>::new_with_constructor(duration_histogram as fn() -> _);
        registry.register(
            "step_duration_seconds",
            "How long step attempts took, by builder, step and result",
            step_seconds.clone(),
        );
        let log_bytes = Counter::default();
        registry.register(
            "log_bytes_stored",
            "Bytes of step output stored",
            log_bytes.clone(),
        );
        let workers_connected = Gauge::default();
        registry.register(
            "workers_connected",
            "Workers with a session now",
            workers_connected.clone(),
        );
        let lease_epoch = Gauge::default();
        registry.register(
            "lease_epoch",
            "Several masters on one database: this master's lease (its epoch; a new one after each lease lost); 0 while it holds none (SQLite, or lost and not yet taken again)",
            lease_epoch.clone(),
        );
        let reloads = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "reloads",
            "Reloads (SIGHUP, `debug reload`), by outcome: applied or rejected",
            reloads.clone(),
        );
        let reload_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "reload_duration_seconds",
            "How long reloads took, reading the files included",
            reload_seconds.clone(),
        );
        let queue = Family::<BuilderLabel, Gauge>::default();
        registry.register(
            "queue_length",
            "Build requests waiting, by builder",
            queue.clone(),
        );
        let connections = Family::<ProtocolLabel, Counter>::default();
        registry.register(
            "connections",
            "Connections accepted, by the protocol they spoke (native, http1, http2, tls, unknown, closed)",
            connections.clone(),
        );
        let logins = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "logins",
            "Logins (native and HTTP Basic), by outcome: ok, failed, throttled",
            logins.clone(),
        );
        let sessions = Family::<ServiceLabel, Counter>::default();
        registry.register(
            "sessions_opened",
            "Native sessions opened, by service",
            sessions.clone(),
        );
        let http_requests = Family::<RouteLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests other than gRPC, by route (`other` for paths not served) and status",
            http_requests.clone(),
        );
        let grpc_requests = Family::<GrpcLabels, Counter>::default();
        registry.register(
            "grpc_requests",
            "gRPC calls, by method (`other` for methods not served) and status code",
            grpc_requests.clone(),
        );
        Metrics {
            registry,
            connections,
            http_requests,
            grpc_requests,
            logins,
            sessions,
            port_seen: Mutex::default(),
            builds,
            build_seconds,
            step_seconds,
            log_bytes,
            workers_connected,
            lease_epoch,
            reloads,
            reload_seconds,
            queue,
            running: Mutex::default(),
        }
    }

    /// Takes one domain event into account.
    pub fn observe(&self, e: &Stamped) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        match &e.event {
            Event::WorkerConnected { .. } => {
                self.workers_connected.inc();
            }
            Event::WorkerLost { .. } => {
                self.workers_connected.dec();
            }
            Event::BuildStarted { build, builder, .. } => {
                running.builds.insert(*build, (builder.clone(), e.unix_ms));
            }
            Event::StepStarted {
                build,
                step,
                attempt,
            } => {
                running
                    .steps
                    .insert((*build, step.clone(), *attempt), e.unix_ms);
            }
            Event::StepEnded {
                build,
                step,
                attempt,
                outcome,
                ..
            } => {
                let started = running.steps.remove(&(*build, step.clone(), *attempt));
                let builder = running.builds.get(build).map(|(b, _)| b.clone());
                if let (Some(started), Some(builder)) = (started, builder) {
                    self.step_seconds
                        .get_or_create(&StepLabels {
                            builder,
                            step: step.clone(),
                            result: outcome.to_string(),
                        })
                        .observe(seconds(started, e.unix_ms));
                }
            }
            Event::BuildEnded {
                build,
                builder,
                outcome,
            } => {
                self.builds
                    .get_or_create(&BuildLabels {
                        builder: builder.clone(),
                        result: outcome.to_string(),
                    })
                    .inc();
                if let Some((_, started)) = running.builds.remove(build) {
                    self.build_seconds
                        .get_or_create(&BuilderLabel {
                            builder: builder.clone(),
                        })
                        .observe(seconds(started, e.unix_ms));
                }
                running.steps.retain(|(b, _, _), _| b != build);
            }
            Event::OutputStored { bytes, .. } => {
                self.log_bytes.inc_by(*bytes);
            }
            // Counted by the master as it reloads, rejected ones too.
            Event::Reloaded { .. } => {}
        }
    }

    /// Follows the build master's events (`events`, from
    /// [`BuildMaster::subscribe`]) until their channel closes.
    pub fn follow(self: &Arc<Self>, mut events: tokio::sync::broadcast::Receiver<Stamped>) {
        let me = self.clone();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match events.recv().await {
                    Ok(e) => me.observe(&e),
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "metrics fell behind the build events");
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
    }

    /// Counts a reload, applied or rejected, and how long it took.
    pub fn reloaded(&self, applied: bool, took: std::time::Duration) {
        let outcome = if applied { "applied" } else { "rejected" };
        self.reloads
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
        self.reload_seconds.observe(took.as_secs_f64());
    }

    /// Counts one request through the port's HTTP router. Only paths that
    /// were served become labels: a stranger's made-up paths are `other`.
    pub fn request(&self, o: &crate::grpc::RequestOutcome) {
        match o.grpc_status {
            Some(code) => {
                // UNIMPLEMENTED: no such method here.
                let method = if code == 12 { "other" } else { o.path.as_str() };
                self.grpc_requests
                    .get_or_create(&GrpcLabels {
                        method: method.to_string(),
                        code: grpc_code_name(code).to_string(),
                    })
                    .inc();
            }
            None => {
                let route = if o.status == 404 {
                    "other"
                } else {
                    o.path.as_str()
                };
                self.http_requests
                    .get_or_create(&RouteLabels {
                        route: route.to_string(),
                        status: o.status.to_string(),
                    })
                    .inc();
            }
        }
    }

    /// Brings the port's counters up to `now`.
    fn port(&self, now: crate::dispatcher::counters::PortCounts) {
        let mut seen = self.port_seen.lock().unwrap_or_else(|e| e.into_inner());
        for (protocol, n) in &now.connections {
            let before = seen.connections.get(protocol).copied().unwrap_or(0);
            self.connections
                .get_or_create(&ProtocolLabel {
                    protocol: protocol.to_string(),
                })
                .inc_by(n.saturating_sub(before));
        }
        for (outcome, n) in &now.logins {
            let before = seen.logins.get(outcome).copied().unwrap_or(0);
            self.logins
                .get_or_create(&OutcomeLabel {
                    outcome: outcome.to_string(),
                })
                .inc_by(n.saturating_sub(before));
        }
        for (service, n) in &now.sessions {
            let before = seen.sessions.get(service).copied().unwrap_or(0);
            self.sessions
                .get_or_create(&ServiceLabel {
                    service: service.clone(),
                })
                .inc_by(n.saturating_sub(before));
        }
        *seen = now;
    }

    /// The text a scrape gets, with the queue lengths and the port's counts
    /// read now.
    pub async fn render(&self, builds: &BuildMaster, port: &Dispatcher) -> String {
        self.port(port.counts());
        self.lease_epoch.set(if builds.lease_lost() {
            0
        } else {
            builds.lease_epoch()
        });
        if let Ok(waiting) = builds.state().waiting_counts().await {
            self.queue.clear();
            for name in builds.config().builders.keys() {
                self.queue
                    .get_or_create(&BuilderLabel {
                        builder: name.clone(),
                    })
                    .set(waiting.get(name).copied().unwrap_or(0) as i64);
            }
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

fn seconds(from_ms: i64, to_ms: i64) -> f64 {
    (to_ms - from_ms).max(0) as f64 / 1000.0
}

/// What the `/metrics` route needs.
#[derive(Clone)]
pub struct MetricsEndpoint {
    pub metrics: Arc<Metrics>,
    pub builds: BuildMaster,
    pub dispatcher: Dispatcher,
    /// `[web] public_metrics`: readable without credentials.
    pub public: Arc<AtomicBool>,
}

/// The `/metrics` route.
pub fn routes(end: MetricsEndpoint) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(serve))
        .with_state(end)
}

/// `GET /metrics`.
pub async fn serve(
    State(end): State<MetricsEndpoint>,
    conn: Option<axum::Extension<crate::grpc::ConnInfo>>,
    headers: axum::http::HeaderMap,
) -> Response {
    if !end.public.load(Ordering::Relaxed)
        && let Err(refused) =
            super::access::check_basic(&end.dispatcher, &headers, conn.as_deref(), &[SERVICE]).await
    {
        return refused.text();
    }
    let body = end.metrics.render(&end.builds, &end.dispatcher).await;
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}
