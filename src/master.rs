//! The master: a config file, the secrets beside it, and one port.
//!
//! A [`Master`] is made from a validated config and serves its port until a
//! shutdown token is cancelled. [`Master::reload`] re-reads both files; it is
//! all or nothing (nothing changes unless both files validate) and reloads
//! are serialised, so two `SIGHUP`s in a row cannot interleave.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::MockCredentials;
use crate::builds::{BuildConfig, BuildMaster, BuildsReport, ReconfigOptions, SchedulingStore};
use crate::config::{Config, ConfigError, Loaded, Secrets, SecretsFileChecker};
use crate::debug::DebugApi;
use crate::dispatcher::{AccessPolicy, Dispatcher, Registration, RegistryError, ServiceOptions};
use crate::grpc::change_source::ChangeSourceService;
use crate::grpc::{GrpcAuth, HttpFrontDoor};
use crate::proto::change_source_server::ChangeSourceServer;
use crate::services::ping;
use crate::store::{StateDb, StateError};

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Tls(#[from] crate::dispatcher::tls::TlsError),
    #[error("cannot build the gRPC reflection service: {0}")]
    Reflection(String),
    #[error("cannot write the pid file {path}: {source}")]
    Pidfile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub users_added: Vec<String>,
    pub users_removed: Vec<String>,
    /// Users whose services or verifier changed.
    pub users_changed: Vec<String>,
    pub users_unchanged: usize,
    /// Sessions hung up, as (user, service, reason).
    pub hung_up: Vec<(String, String, &'static str)>,
    /// Settings that changed but only take effect on restart.
    pub restart_needed: Vec<&'static str>,
    /// Workers, builders and schedulers.
    pub builds: BuildsReport,
    /// TLS as reloaded (the new certificate's pin, or `off`), if the config
    /// has or had `[master.tls]`.
    pub tls: Option<String>,
}

impl std::fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "users: {} added {:?}, {} removed {:?}, {} changed {:?}, {} unchanged; {} session(s) hung up",
            self.users_added.len(),
            self.users_added,
            self.users_removed.len(),
            self.users_removed,
            self.users_changed.len(),
            self.users_changed,
            self.users_unchanged,
            self.hung_up.len()
        )?;
        write!(f, "; {}", self.builds)?;
        if let Some(tls) = &self.tls {
            write!(f, "; TLS: {tls}")?;
        }
        if !self.restart_needed.is_empty() {
            write!(
                f,
                "; needs a restart to apply: {}",
                self.restart_needed.join(", ")
            )?;
        }
        Ok(())
    }
}

pub struct Master {
    config: RwLock<Arc<Config>>,
    secrets: Arc<SecretsFileChecker>,
    dispatcher: Dispatcher,
    state: Arc<StateDb>,
    health: tonic_health::server::HealthReporter,
    reload_lock: tokio::sync::Mutex<()>,
    _ping: Registration,
    _grpc: Registration,
    _worker: Registration,
    _debug: Registration,
    builds: BuildMaster,
    reloads: std::sync::Mutex<Option<ReloadQueue>>,
    metrics: Arc<crate::api::metrics::Metrics>,
    /// The build events the metrics follow once the master serves (taken
    /// now, so none is missed).
    metrics_events:
        std::sync::Mutex<Option<tokio::sync::broadcast::Receiver<crate::builds::Stamped>>>,
    /// `[web] public_metrics`, as of the last (re)load.
    public_metrics: Arc<std::sync::atomic::AtomicBool>,
    /// `[web] public`, as of the last (re)load.
    public_web: Arc<std::sync::atomic::AtomicBool>,
    /// The web UI's sessions (their idle timeout follows reloads).
    web_sessions: Arc<crate::api::session::WebSessions>,
    /// `POST /hooks/<name>`: the webhooks served now.
    webhooks: Arc<crate::api::webhooks::Webhooks>,
    /// `[[poller]]`s: run by [`Master::serve`].
    pollers: Arc<crate::builds::poller::Pollers>,
    /// `[[reporter]]`s: their sender runs in [`Master::serve`].
    reporters: Arc<crate::builds::reporters::Reporters>,
    /// `build_retention` and `log_retention`: runs in [`Master::serve`].
    pruner: Arc<crate::builds::retention::Pruner>,
    /// `[master] lease_duration` (PostgreSQL state).
    lease_duration: std::time::Duration,
    /// Steps whose output could not all be stored, for [`Master::serve`]
    /// to act on.
    log_troubles: std::sync::Mutex<
        Option<tokio::sync::mpsc::UnboundedReceiver<crate::store::logs::LogTrouble>>,
    >,
}

/// Renews the lease every third of `ttl` until `shutdown`, and each time
/// adopts the builds of masters whose leases have expired. A renewal that
/// fails for a moment (the database restarting) is tried again. A lease
/// found expired (this master was stopped, or cut off from the database,
/// for longer than the lease) is lost for good: the others may have
/// adopted this master's builds, and every write under it is refused. The
/// master then lets go of its builds and workers, and takes a new lease
/// to serve again ([`rejoin`]); so it does, too, when one of its builds
/// finds the lease gone first (its writes refused), ending the old lease
/// at once.
async fn keep_lease(builds: BuildMaster, ttl: std::time::Duration, shutdown: CancellationToken) {
    let mut next = tokio::time::Instant::now() + ttl / 3;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
            _ = builds.lease_doubted() => {
                // A build's write was refused for the lease before a
                // renewal said so: step down (the others may adopt at
                // once) and serve again under a new lease.
                tracing::error!("a build found this master's lease lapsed: stepping down; taking a new lease");
                step_down(&builds).await;
                if !rejoin(&builds, ttl, &shutdown).await {
                    return;
                }
                next = tokio::time::Instant::now() + ttl / 3;
                continue;
            }
        }
        next = tokio::time::Instant::now() + ttl / 3;
        match builds.state_db().renew_lease(ttl).await {
            Ok(()) => {
                match builds.adopt().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        builds = n,
                        "adopted the running builds of a master whose lease expired"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot adopt the builds of masters whose leases expired")
                    }
                }
                // What a dead master left uncompressed (the leader only).
                if let Err(e) = builds.state_db().compress_ended_logs().await {
                    tracing::warn!(error = %e, "cannot look for logs left to compress");
                }
            }
            Err(e @ crate::store::StateError::LeaseLost { .. }) => {
                tracing::error!(error = %e, "this master lost its lease: it lets go of its builds (the other masters adopt them) and hangs up its workers; taking a new lease");
                builds.lose_lease();
                if !rejoin(&builds, ttl, &shutdown).await {
                    return;
                }
                next = tokio::time::Instant::now() + ttl / 3;
            }
            Err(e) => tracing::warn!(error = %e, "cannot renew this master's lease; trying again"),
        }
    }
}

/// Ends this master's lease at once (the others may adopt its builds) and
/// lets go of its builds and workers ([`BuildMaster::lose_lease`]).
async fn step_down(builds: &BuildMaster) {
    if let Err(e) = builds.state_db().end_lease().await {
        tracing::warn!(error = %e, "cannot end this master's lease; it expires by itself");
    }
    builds.lose_lease();
}

/// After a lost lease: waits for the workers' sessions to end (at most a
/// lease's time: nothing of the old lease is written once they have), then
/// takes a new lease, trying again every third of `ttl`, and serves again
/// ([`BuildMaster::rejoin`]). `false` if `shutdown` came first.
async fn rejoin(
    builds: &BuildMaster,
    ttl: std::time::Duration,
    shutdown: &CancellationToken,
) -> bool {
    let quiet = tokio::time::Instant::now() + ttl;
    while !builds.connected().is_empty() && tokio::time::Instant::now() < quiet {
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
        }
    }
    loop {
        match builds.state_db().retake_lease(ttl).await {
            Ok(lease) => match builds.rejoin().await {
                Ok(n) => {
                    tracing::info!(
                        epoch = lease.0,
                        builds = n,
                        "took a new lease: serving again"
                    );
                    return true;
                }
                Err(e) => {
                    // Some of its builds may be the new lease's and not
                    // running: end that lease too (the next one takes them
                    // back) and let go of what was resumed.
                    tracing::warn!(epoch = lease.0, error = %e, "took a new lease but cannot take its builds back; ending it and trying again");
                    step_down(builds).await;
                }
            },
            Err(e) => tracing::warn!(error = %e, "cannot take a new lease; trying again"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
    }
}

/// The name this master's leases carry: its host, config file and
/// listening address, the same across its restarts and different for
/// every other master. A master restarted under the same name takes its
/// earlier leases' builds over at once (see [`StateDb::builds_to_resume`]).
fn lease_name(config: &Config) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let path = std::fs::canonicalize(&config.path).unwrap_or_else(|_| config.path.clone());
    format!("{host} {} {}", path.display(), config.listen)
}

/// The retention a config asks for.
fn retention_of(config: &Config) -> crate::builds::retention::RetentionPolicy {
    crate::builds::retention::RetentionPolicy {
        builds: config.build_retention,
        logs: config.log_retention,
    }
}

/// Reloads asked for from the console, each with where to send the outcome.
type ReloadQueue =
    tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<Result<String, String>>>;

/// The name under which the unknown-user secret is kept in the state.
const MOCK_SECRET: &str = "mock-credentials";

/// The gRPC routes the master serves on its port.
fn grpc_routes(
    dispatcher: &Dispatcher,
    builds: &BuildMaster,
    debug_api: DebugApi,
) -> Result<(tonic::service::Routes, tonic_health::server::HealthReporter), MasterError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| MasterError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| MasterError::Reflection(e.to_string()))?;
    let store = Arc::new(SchedulingStore {
        builds: builds.clone(),
    });
    let changes = ChangeSourceService::new(store, GrpcAuth::new(dispatcher.clone())).into_server();
    let debug = crate::debug::grpc::DebugService::new(debug_api, GrpcAuth::new(dispatcher.clone()));
    let routes = tonic::service::Routes::new(changes)
        .add_service(debug.into_server())
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok((routes, health))
}

/// Users get the services their `[[user]]` lists; each `[[worker]]` gets
/// the service `worker` and nothing else.
fn policy_of(config: &Config) -> AccessPolicy {
    AccessPolicy::new(config.users.clone())
        .with_group(crate::worker::SERVICE, config.workers.keys().cloned())
}

impl Master {
    /// Reads and validates the config file and the secrets file it names.
    pub async fn load(path: &Path) -> Result<Self, MasterError> {
        let Loaded {
            config,
            secrets,
            warnings,
            tls,
        } = crate::config::load_with_secrets(path)?;
        for w in warnings {
            tracing::warn!("{w}");
        }
        let master = Self::new(config, secrets).await?;
        master.dispatcher.set_tls(tls);
        Ok(master)
    }

    /// Opens the state the config names (a SQLite file, or a PostgreSQL
    /// database) and sets up the port.
    pub async fn new(config: Config, secrets: Secrets) -> Result<Self, MasterError> {
        let state = Arc::new(match &config.state_url {
            Some(url) => {
                StateDb::open_postgres(
                    url,
                    &config.data_dir,
                    &lease_name(&config),
                    config.lease_duration,
                )
                .await?
            }
            None => StateDb::open_in(&config.state_path, &config.data_dir)?,
        });
        let mock = MockCredentials::from_secret(state.secret(MOCK_SECRET).await?);
        mock.set_iterations_like(secrets.verifiers.values());
        let build_config = BuildConfig::from_config(&config, secrets.step_secrets.clone());
        let webhook_secrets = secrets.webhook_secrets.clone();
        let reporter_tokens = secrets.reporter_tokens.clone();
        let checker = Arc::new(SecretsFileChecker::from_secrets(
            &config.secrets_path,
            secrets,
        ));
        let dispatcher = Dispatcher::with_mock_secret(
            config.limits.clone(),
            checker.clone(),
            policy_of(&config),
            mock,
        );
        dispatcher.set_password_checkers(config.checkers.iter().map(|c| c.build()).collect());
        let ping =
            dispatcher
                .registry()
                .register(ping::NAME, ServiceOptions::default(), ping::serve)?;
        let builds = BuildMaster::new(state.clone(), build_config);
        let worker = {
            let builds = builds.clone();
            dispatcher.registry().register(
                crate::worker::SERVICE,
                ServiceOptions::default(),
                move |session| builds.clone().serve_worker(session),
            )?
        };
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
        let debug_api = DebugApi::new(builds.clone())
            .with_reloader(reload_tx)
            .with_port(dispatcher.clone());
        let debug = {
            let api = debug_api.clone();
            dispatcher.registry().register(
                crate::debug::SERVICE,
                ServiceOptions::default(),
                move |session| crate::debug::service::serve(api.clone(), session),
            )?
        };
        let public_web = Arc::new(std::sync::atomic::AtomicBool::new(config.public_web));
        let web_sessions = Arc::new(crate::api::session::WebSessions::new(
            config.web_session_idle,
        ));
        let api_state = crate::api::ApiState {
            api: debug_api.clone(),
            dispatcher: dispatcher.clone(),
            public: public_web.clone(),
            sessions: web_sessions.clone(),
        };
        let pollers =
            crate::builds::poller::Pollers::new(config.data_dir.join("pollers"), builds.clone());
        pollers.set(config.pollers.clone());
        let reporters = crate::builds::reporters::Reporters::new(builds.clone());
        reporters.set(&config.reporters, &reporter_tokens, config.web_url.clone());
        let pruner = crate::builds::retention::Pruner::new(state.clone());
        pruner.set(retention_of(&config));
        state
            .log_files()
            .set_max_log_size(config.max_log_size, config.fail_on_log_limit);
        state.set_max_artifact_size(config.max_artifact_size);
        state.set_max_build_artifacts_size(config.max_build_artifacts_size);
        let (trouble_tx, log_troubles) = tokio::sync::mpsc::unbounded_channel();
        state.on_log_trouble(trouble_tx);
        let webhooks = crate::api::webhooks::Webhooks::new(builds.clone(), dispatcher.clone());
        webhooks.set(config.webhooks.values(), &webhook_secrets);
        let api_routes = crate::api::v1::routes(api_state.clone())
            .merge(crate::api::web::routes(api_state))
            .merge(crate::api::webhooks::routes(webhooks.clone()));
        let (routes, health) = grpc_routes(&dispatcher, &builds, debug_api)?;
        let metrics = Arc::new(crate::api::metrics::Metrics::new());
        let metrics_events = builds.subscribe();
        let public_metrics = Arc::new(std::sync::atomic::AtomicBool::new(config.public_metrics));
        let router =
            crate::api::router(routes)
                .merge(api_routes)
                .merge(crate::api::metrics::routes(
                    crate::api::metrics::MetricsEndpoint {
                        metrics: metrics.clone(),
                        builds: builds.clone(),
                        dispatcher: dispatcher.clone(),
                        public: public_metrics.clone(),
                    },
                ));
        let observer = {
            let metrics = metrics.clone();
            Arc::new(move |o: &crate::grpc::RequestOutcome| metrics.request(o))
        };
        let grpc = dispatcher
            .registry()
            .register_http(HttpFrontDoor::new(router).observed(observer))?;
        let lease_duration = config.lease_duration;
        let master = Master {
            config: RwLock::new(Arc::new(config)),
            secrets: checker,
            dispatcher,
            state,
            health,
            reload_lock: tokio::sync::Mutex::new(()),
            _ping: ping,
            _grpc: grpc,
            _worker: worker,
            _debug: debug,
            builds,
            reloads: std::sync::Mutex::new(Some(reload_rx)),
            metrics,
            metrics_events: std::sync::Mutex::new(Some(metrics_events)),
            public_metrics,
            public_web,
            web_sessions,
            webhooks,
            pollers,
            reporters,
            pruner,
            lease_duration,
            log_troubles: std::sync::Mutex::new(Some(log_troubles)),
        };
        master.warn_about_config();
        Ok(master)
    }

    fn warn_about_config(&self) {
        let config = self.config();
        let registry = self.dispatcher.registry();
        let mut unserved = BTreeSet::new();
        for services in config.users.values() {
            unserved.extend(
                services
                    .iter()
                    .filter(|s| {
                        !registry.contains(s)
                            && s.as_str() != crate::grpc::change_source::SERVICE
                            && s.as_str() != crate::api::metrics::SERVICE
                            && s.as_str() != crate::api::v1::SERVICE
                    })
                    .cloned(),
            );
        }
        if !unserved.is_empty() {
            tracing::warn!(services = ?unserved, "the config grants services this version does not serve yet");
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn config_path(&self) -> PathBuf {
        self.config().path.clone()
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// The state database.
    pub fn state(&self) -> &Arc<StateDb> {
        &self.state
    }

    /// Builders, workers and builds.
    pub fn builds(&self) -> &BuildMaster {
        &self.builds
    }

    /// Binds the configured address.
    pub async fn bind(&self) -> Result<TcpListener, MasterError> {
        let addr = self.config().listen;
        TcpListener::bind(addr)
            .await
            .map_err(|source| MasterError::Bind { addr, source })
    }

    /// Serves `listener` until `shutdown` is cancelled. The accept loop runs
    /// in the caller's task; console reloads run in a task of their own, so
    /// a reload, however long it takes, never runs inside the accept loop's
    /// future.
    pub async fn serve(self: &Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let events = self
            .metrics_events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(events) = events {
            self.metrics.follow(events);
        }
        self.health
            .set_serving::<ChangeSourceServer<ChangeSourceService>>()
            .await;
        // Builds a previous master left running continue before any worker
        // can log in, so that their steps are re-attached, not refused.
        match self.builds.recover().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                builds = n,
                "resuming builds left running by the previous master"
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot resume the builds left running by the previous master")
            }
        }
        let dispatch = {
            let (builds, shutdown) = (self.builds.clone(), shutdown.clone());
            tokio::spawn(async move { builds.run(shutdown).await })
        };
        match self.state.compress_ended_logs().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(steps = n, "compressing the logs of steps that ended before"),
            Err(e) => tracing::warn!(error = %e, "cannot look for logs left to compress"),
        }
        // Several masters on one database: the lease kept, and the others'
        // writes waking this one's dispatch.
        let lease = self.state.postgres().map(|_| {
            let (builds, ttl, shutdown) =
                (self.builds.clone(), self.lease_duration, shutdown.clone());
            tokio::spawn(async move { keep_lease(builds, ttl, shutdown).await })
        });
        let relay = self.state.postgres().map(|pg| {
            let (builds, pg, shutdown) = (self.builds.clone(), pg.clone(), shutdown.clone());
            tokio::spawn(crate::builds::relay::send(builds, pg, shutdown))
        });
        let wakeups = match self.state.wakeups().await {
            Ok(Some(w)) => {
                let (builds, shutdown) = (self.builds.clone(), shutdown.clone());
                Some(tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = w.woken() => builds.wake(),
                            Some(r) = w.relayed() => crate::builds::relay::receive(&builds, r),
                        }
                    }
                }))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for the other masters' wake-ups; requests they store wait for this master's next look (every 5 s)");
                None
            }
        };
        let polls = tokio::spawn(self.pollers.clone().run(shutdown.clone()));
        let reports = tokio::spawn(self.reporters.clone().run(shutdown.clone()));
        let prunes = tokio::spawn(self.pruner.clone().run(shutdown.clone()));
        let troubles = self
            .log_troubles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(|t| tokio::spawn(self.builds.clone().watch_log_troubles(t, shutdown.clone())));
        // Reloads asked for from the console run here, one at a time, while
        // the port keeps serving.
        let reloads = self
            .reloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let me = self.clone();
        let reload_shutdown = shutdown.clone();
        let console_reloads = tokio::spawn(async move {
            let (me, shutdown) = (me, reload_shutdown);
            let Some(mut reloads) = reloads else { return };
            loop {
                let reply = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = reloads.recv() => match r { Some(r) => r, None => return },
                };
                let outcome = match me.reload().await {
                    Ok(report) => {
                        tracing::info!(%report, "reload applied");
                        Ok(report.to_string())
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reload rejected; the running config is unchanged");
                        Err(e.to_string())
                    }
                };
                let _ = reply.send(outcome);
            }
        });
        // The accept loop stays in this task (spawning it elsewhere costs
        // each session ~3 KiB of allocator fragmentation, measured).
        self.dispatcher.serve(listener, shutdown.clone()).await;
        let _ = console_reloads.await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), dispatch).await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), polls).await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), reports).await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), prunes).await;
        if let Some(t) = troubles {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
        }
        for t in [lease, wakeups, relay].into_iter().flatten() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
        }
        self.health
            .set_not_serving::<ChangeSourceServer<ChangeSourceService>>()
            .await;
    }

    /// Re-reads the config file and its secrets file. On any error nothing
    /// changes and the error names the file and line. On success new logins
    /// see the new files at once, and live sessions whose user was removed,
    /// whose verifier changed or who lost their service are hung up.
    pub async fn reload(&self) -> Result<ReloadReport, ConfigError> {
        let _serial = self.reload_lock.lock().await;
        let started = std::time::Instant::now();
        let outcome = self.reload_serialised(started).await;
        self.metrics.reloaded(outcome.is_ok(), started.elapsed());
        outcome
    }

    /// [`Master::reload`], once it holds the reload lock.
    async fn reload_serialised(
        &self,
        started: std::time::Instant,
    ) -> Result<ReloadReport, ConfigError> {
        let old = self.config();
        let Loaded {
            config: new,
            secrets,
            warnings,
            tls,
        } = read_files(&old.path).await?;
        for w in warnings {
            tracing::warn!("{w}");
        }
        tracing::debug!(elapsed = ?started.elapsed(), "reload: files read and validated");

        let mut report = ReloadReport::default();
        // Compare verifiers map to map: no lookups, no copies.
        let before = self.secrets.snapshot();
        let verifier_changed = |name: &str| before.get(name) != secrets.verifiers.get(name);
        for (user, services) in &new.users {
            match old.users.get(user) {
                None => report.users_added.push(user.clone()),
                Some(s) if s != services || verifier_changed(user) => {
                    report.users_changed.push(user.clone())
                }
                Some(_) => report.users_unchanged += 1,
            }
        }
        report.users_removed = old
            .users
            .keys()
            .filter(|u| !new.users.contains_key(*u))
            .cloned()
            .collect();
        if new.listen != old.listen {
            report.restart_needed.push("listen");
        }
        if new.state_path != old.state_path {
            report.restart_needed.push("state");
        }
        if new.data_dir != old.data_dir {
            report.restart_needed.push("data_dir");
        }

        // Workers whose password changed: their builds are interrupted
        // before the port hangs their sessions up.
        let new_passwords: BTreeSet<String> = new
            .workers
            .keys()
            .filter(|w| old.workers.contains_key(*w) && verifier_changed(w))
            .cloned()
            .collect();
        tracing::debug!(elapsed = ?started.elapsed(), "reload: users and passwords compared");
        let opts = ReconfigOptions {
            drain_removed_workers: new.drain_removed_workers,
            new_passwords,
        };
        report.builds = self.builds.reconfigure(
            BuildConfig::from_config(&new, secrets.step_secrets.clone()),
            &opts,
        );

        // A draining worker keeps its session, and so its verifier, until its
        // builds end.
        let mut secrets = secrets;
        for w in &report.builds.workers_draining {
            if !secrets.verifiers.contains_key(w)
                && let Ok(Some(v)) = crate::auth::Checker::verifier(self.secrets.as_ref(), w).await
            {
                secrets.verifiers.insert(w.clone(), v);
            }
        }
        tracing::debug!(elapsed = ?started.elapsed(), "reload: builds reconfigured");
        self.dispatcher
            .set_typical_verifiers(secrets.verifiers.values());
        self.webhooks
            .set(new.webhooks.values(), &secrets.webhook_secrets);
        self.pollers.set(new.pollers.clone());
        self.reporters.set(
            &new.reporters,
            &secrets.reporter_tokens,
            new.web_url.clone(),
        );
        self.pruner.set(retention_of(&new));
        self.state
            .log_files()
            .set_max_log_size(new.max_log_size, new.fail_on_log_limit);
        self.state.set_max_artifact_size(new.max_artifact_size);
        self.state
            .set_max_build_artifacts_size(new.max_build_artifacts_size);
        self.secrets.install(&new.secrets_path, secrets);
        let mut policy = policy_of(&new);
        for w in &report.builds.workers_draining {
            policy = policy.grant(w, [crate::worker::SERVICE]);
        }
        self.dispatcher.set_policy(policy);
        self.public_metrics
            .store(new.public_metrics, std::sync::atomic::Ordering::Relaxed);
        self.public_web
            .store(new.public_web, std::sync::atomic::Ordering::Relaxed);
        self.web_sessions.set_idle_timeout(new.web_session_idle);
        // New connections get the new certificate; live ones keep theirs.
        if tls.is_some() || old.tls.is_some() {
            report.tls = Some(match &tls {
                Some(t) => format!("certificate sha256 {}", t.pin_sha256),
                None => "off".into(),
            });
        }
        self.dispatcher.set_tls(tls);
        let checkers_changed = new.checkers != old.checkers;
        if checkers_changed {
            self.dispatcher
                .set_password_checkers(new.checkers.iter().map(|c| c.build()).collect());
        }
        report
            .restart_needed
            .extend(self.dispatcher.set_limits(new.limits.clone()));
        // Only sessions of users something changed for need a look: an
        // unchanged user's sessions are left alone without even a lookup.
        let mut affected: BTreeSet<String> = report
            .users_removed
            .iter()
            .chain(&report.users_changed)
            .cloned()
            .collect();
        affected.extend(
            report
                .builds
                .workers_removed
                .iter()
                .filter(|w| !report.builds.workers_draining.contains(*w))
                .cloned(),
        );
        affected.extend(opts.new_passwords.iter().cloned());
        if checkers_changed {
            // Sessions a removed checker let in end with it.
            let verified = self.secrets.snapshot();
            affected.extend(
                old.users
                    .keys()
                    .chain(old.workers.keys())
                    .filter(|u| !verified.contains_key(*u))
                    .cloned(),
            );
        }
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        tracing::debug!(elapsed = ?started.elapsed(), "reload: policy set");
        report.hung_up = self.dispatcher.revalidate_users(&affected).await.hung_up;
        tracing::debug!(elapsed = ?started.elapsed(), "reload: sessions revalidated");
        self.warn_about_config();
        Ok(report)
    }
}

/// How long a reload may take to read its two files before it is
/// rejected (a hung network filesystem, say).
pub const RELOAD_READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and checks the config and secrets files on a blocking thread, under
/// [`RELOAD_READ_DEADLINE`]: file I/O that hangs never stalls the runtime
/// that serves the port, the heartbeats and the console.
async fn read_files(path: &Path) -> Result<Loaded, ConfigError> {
    let p = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || crate::config::load_with_secrets(&p));
    match tokio::time::timeout(RELOAD_READ_DEADLINE, read).await {
        Ok(Ok(loaded)) => loaded,
        Ok(Err(e)) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::other(format!("the reader failed: {e}")),
        }),
        Err(_) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "reading the config and its secrets file took over {RELOAD_READ_DEADLINE:?}"
                ),
            ),
        }),
    }
}

/// Runs a master from a config file until `SIGINT` or `SIGTERM`, reloading
/// on `SIGHUP`. This is `switchyard master`.
#[cfg(unix)]
pub async fn run(config_path: &Path, pidfile: Option<&Path>) -> Result<(), MasterError> {
    use tokio::signal::unix::{SignalKind, signal};

    let master = Arc::new(Master::load(config_path).await?);
    let listener = master.bind().await?;
    let addr = listener.local_addr().map_err(|source| MasterError::Bind {
        addr: master.config().listen,
        source,
    })?;
    let mut hup = signal(SignalKind::hangup()).map_err(MasterError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(MasterError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(MasterError::Signals)?;
    let shutdown = CancellationToken::new();
    let pid = std::process::id();
    if let Some(f) = pidfile {
        std::fs::write(f, format!("{pid}\n")).map_err(|source| MasterError::Pidfile {
            path: f.to_path_buf(),
            source,
        })?;
    }
    tracing::info!(config = %config_path.display(), "switchyard master listening on {addr} (pid {pid}; `kill -HUP {pid}` reloads)");

    let signals = {
        let master = master.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP: reloading the config and the secrets");
                        match master.reload().await {
                            Ok(report) => tracing::info!(%report, "reload applied"),
                            Err(e) => tracing::error!(error = %e, "reload rejected; the running config is unchanged"),
                        }
                    }
                    _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
                    _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
                }
            }
            shutdown.cancel();
        })
    };
    master.serve(listener, shutdown).await;
    signals.abort();
    if let Some(f) = pidfile {
        let _ = std::fs::remove_file(f);
    }
    tracing::info!("switchyard master stopped");
    Ok(())
}
