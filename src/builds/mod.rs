//! The build master: schedulers turn changes into build requests, connected
//! workers take the oldest request of their builders, and each build runs its
//! steps in order on one worker, stopping at the first failure. Everything
//! lands in the state database; everything that happens is broadcast as a
//! [`DebugEvent`] for `watch`.
//!
//! Lifecycle: [`BuildMaster::start`] runs the dispatch loop, which wakes when
//! a request is added, a worker connects or a build ends. Worker sessions
//! arrive through the `worker` service ([`BuildMaster::serve_worker`]); each
//! build is a task of its own ([`run`]).

mod reconfig;
mod run;
mod workers;

pub use reconfig::{BuildsReport, ReconfigOptions};

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::config::{BuilderConfig, Config, SchedulerConfig, WorkerConfig};
use crate::proto::{DebugEvent, debug_event};
use crate::state::{ChangeStore, NewChange, NewRequest, StateDb, StateError};

pub use workers::WorkerLink;
use workers::WorkerSlots;

/// What went wrong with an operator's request.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no builder named {0:?}")]
    UnknownBuilder(String),
    #[error("no running build {0}")]
    NotRunning(i64),
    #[error("worker {0:?} is not connected")]
    NotConnected(String),
    #[error(transparent)]
    State(#[from] StateError),
}

/// The build part of the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildConfig {
    /// `[master] worker_reconnect_grace`: how long the steps of a worker
    /// whose link dropped wait for it to come back (fixed at start).
    pub reconnect_grace: Duration,
    pub workers: BTreeMap<String, WorkerConfig>,
    pub builders: BTreeMap<String, BuilderConfig>,
    pub schedulers: BTreeMap<String, SchedulerConfig>,
}

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            reconnect_grace: Duration::from_secs(300),
            workers: BTreeMap::new(),
            builders: BTreeMap::new(),
            schedulers: BTreeMap::new(),
        }
    }
}

impl BuildConfig {
    pub fn from_config(c: &Config) -> Self {
        BuildConfig {
            reconnect_grace: c.worker_reconnect_grace,
            workers: c.workers.clone(),
            builders: c.builders.clone(),
            schedulers: c.schedulers.clone(),
        }
    }
}

struct RunningBuild {
    builder: String,
    worker: String,
    stop: StopSignal,
}

/// Stops a running build, saying why.
#[derive(Clone, Default)]
pub(crate) struct StopSignal {
    token: CancellationToken,
    reason: Arc<Mutex<String>>,
}

impl StopSignal {
    pub(crate) fn stop(&self, reason: &str) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason.to_string();
        self.token.cancel();
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    pub(crate) async fn stopped(&self) {
        self.token.cancelled().await
    }

    pub(crate) fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub(crate) struct Inner {
    state: Arc<StateDb>,
    config: RwLock<Arc<BuildConfig>>,
    workers: Mutex<HashMap<String, Arc<WorkerLink>>>,
    running: Mutex<HashMap<i64, RunningBuild>>,
    events: broadcast::Sender<DebugEvent>,
    wake: Notify,
    /// Changed builders waiting for their running builds to end.
    pending_builders: Mutex<BTreeMap<String, BuilderConfig>>,
    /// Removed workers finishing their current builds.
    draining: Mutex<std::collections::BTreeSet<String>>,
    /// Per worker name, what its builds hold across its sessions.
    slots: Mutex<HashMap<String, Arc<WorkerSlots>>>,
    /// How long a disconnected worker's steps wait for it to come back.
    reconnect_grace: Duration,
}

/// The build master. Cheap to clone.
#[derive(Clone)]
pub struct BuildMaster {
    inner: Arc<Inner>,
}

pub(crate) fn event(kind: debug_event::Kind) -> DebugEvent {
    DebugEvent {
        unix_ms: crate::state::now_ms(),
        kind: Some(kind),
    }
}

impl Inner {
    fn emit(&self, kind: debug_event::Kind) {
        let _ = self.events.send(event(kind));
    }

    fn config(&self) -> Arc<BuildConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl BuildMaster {
    pub fn new(state: Arc<StateDb>, config: BuildConfig) -> Self {
        let reconnect_grace = config.reconnect_grace;
        let (events, _) = broadcast::channel(4096);
        BuildMaster {
            inner: Arc::new(Inner {
                state,
                config: RwLock::new(Arc::new(config)),
                workers: Mutex::new(HashMap::new()),
                running: Mutex::new(HashMap::new()),
                events,
                wake: Notify::new(),
                pending_builders: Mutex::new(BTreeMap::new()),
                draining: Mutex::new(Default::default()),
                slots: Mutex::new(HashMap::new()),
                reconnect_grace,
            }),
        }
    }

    pub fn state(&self) -> &Arc<StateDb> {
        &self.inner.state
    }

    pub fn config(&self) -> Arc<BuildConfig> {
        self.inner.config()
    }

    /// Swaps in a new build configuration. New requests and new builds use
    /// it at once; a build already running keeps the definition it started
    /// with until it ends.
    pub fn set_config(&self, config: BuildConfig) {
        *self.inner.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        self.wake();
    }

    pub(crate) fn slots_for(&self, worker: &str) -> Arc<WorkerSlots> {
        self.inner
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(worker.to_string())
            .or_default()
            .clone()
    }

    /// The current session of a worker, if it is connected.
    pub(crate) fn link_of(&self, worker: &str) -> Option<Arc<WorkerLink>> {
        self.inner
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(worker)
            .cloned()
    }

    /// After the grace, the steps a worker was sent on `session` and that no
    /// later session re-attached are lost: their builds stop waiting.
    pub(crate) fn lose_steps_after_grace(
        &self,
        worker: String,
        session: String,
        slots: Arc<WorkerSlots>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(me.inner.reconnect_grace).await;
            if me.link_of(&worker).is_some() {
                return; // it came back: its new session sorted its steps out
            }
            let mut pending = slots.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.retain(|_, p| {
                let lost = p.sent_on.as_deref() == Some(session.as_str());
                if lost {
                    tracing::warn!(worker = %worker, build = p.build, grace = ?me.inner.reconnect_grace, "worker did not come back in time: step lost");
                }
                !lost
            });
        });
    }

    /// How many `watch`es are subscribed now.
    pub fn watchers(&self) -> usize {
        self.inner.events.receiver_count()
    }

    /// Live events, for `watch`.
    pub fn subscribe(&self) -> broadcast::Receiver<DebugEvent> {
        self.inner.events.subscribe()
    }

    /// Runs the dispatch loop until `shutdown`. Builds left unfinished by a
    /// previous master process are marked `exception` first.
    pub async fn run(&self, shutdown: CancellationToken) {
        match self
            .inner
            .state
            .abandon_unfinished("the master restarted while the step ran")
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                builds = n,
                "builds left running by the previous master marked as exception"
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot mark the previous master's unfinished builds")
            }
        }
        loop {
            if let Err(e) = self.dispatch().await {
                tracing::error!(error = %e, "cannot dispatch build requests");
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
        for r in self
            .inner
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            r.stop.stop("the master is shutting down");
        }
    }

    fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Gives waiting requests, oldest first, to connected workers with a free
    /// slot.
    async fn dispatch(&self) -> Result<(), StateError> {
        let waiting = self.inner.state.waiting_requests().await?;
        if waiting.is_empty() {
            return Ok(());
        }
        let config = self.inner.config();
        let paused: std::collections::BTreeSet<String> = self
            .inner
            .pending_builders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let draining = self
            .inner
            .draining
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for req in waiting {
            let Some(builder) = config.builders.get(&req.request.builder) else {
                continue;
            };
            if paused.contains(&builder.name) {
                continue; // its new definition waits for its running build
            }
            let link = {
                let workers = self.inner.workers.lock().unwrap_or_else(|e| e.into_inner());
                builder
                    .workers
                    .iter()
                    .filter(|w| !draining.contains(*w))
                    .filter_map(|w| workers.get(w))
                    .filter(|l| l.slots.busy.load(Ordering::SeqCst) < l.max_builds)
                    .min_by_key(|l| l.slots.busy.load(Ordering::SeqCst))
                    .cloned()
            };
            let Some(link) = link else { continue };
            link.slots.busy.fetch_add(1, Ordering::SeqCst);
            match self.inner.state.claim_request(req.id, &link.name).await {
                Ok(Some(build)) => {
                    let stop = StopSignal::default();
                    self.inner
                        .running
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(
                            build,
                            RunningBuild {
                                builder: builder.name.clone(),
                                worker: link.name.clone(),
                                stop: stop.clone(),
                            },
                        );
                    let me = self.clone();
                    let builder = builder.clone();
                    tokio::spawn(async move {
                        let name = builder.name.clone();
                        run::run_build(&me, build, req, builder, link.clone(), stop).await;
                        link.slots.busy.fetch_sub(1, Ordering::SeqCst);
                        me.inner
                            .running
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&build);
                        me.after_build(&name, &link);
                        me.wake();
                    });
                }
                Ok(None) => {
                    link.slots.busy.fetch_sub(1, Ordering::SeqCst);
                }
                Err(e) => {
                    link.slots.busy.fetch_sub(1, Ordering::SeqCst);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Requests builds for the changes that match a scheduler.
    pub async fn changes_added(
        &self,
        ids: &[i64],
        changes: &[NewChange],
    ) -> Result<Vec<i64>, StateError> {
        let config = self.inner.config();
        let mut requests = Vec::new();
        for (id, c) in ids.iter().zip(changes) {
            for s in config.schedulers.values() {
                if !s.matches(&c.repository, &c.branch) {
                    continue;
                }
                for b in &s.builders {
                    requests.push(NewRequest {
                        builder: b.clone(),
                        change_id: Some(*id),
                        reason: format!("change {id} matched scheduler {}", s.name),
                        repository: c.repository.clone(),
                        branch: c.branch.clone(),
                        revision: c.revision.clone(),
                    });
                }
            }
        }
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let ids = self.inner.state.add_requests(requests).await?;
        self.wake();
        Ok(ids)
    }

    /// An operator asks for a build.
    pub async fn force(
        &self,
        builder: &str,
        branch: &str,
        revision: &str,
        repository: &str,
        who: &str,
    ) -> Result<i64, BuildError> {
        if !self.inner.config().builders.contains_key(builder) {
            return Err(BuildError::UnknownBuilder(builder.to_string()));
        }
        let ids = self
            .inner
            .state
            .add_requests(vec![NewRequest {
                builder: builder.to_string(),
                change_id: None,
                reason: format!("forced by {who}"),
                repository: repository.to_string(),
                branch: branch.to_string(),
                revision: revision.to_string(),
            }])
            .await?;
        self.wake();
        Ok(ids[0])
    }

    /// Stops a running build: its worker kills the running step's process
    /// group, and the build ends `interrupted`.
    pub fn stop(&self, build: i64) -> Result<(), BuildError> {
        let running = self.inner.running.lock().unwrap_or_else(|e| e.into_inner());
        let r = running.get(&build).ok_or(BuildError::NotRunning(build))?;
        tracing::info!(build, builder = %r.builder, worker = %r.worker, "stopping build");
        r.stop.stop("stopped by an operator");
        Ok(())
    }

    /// Hangs up a worker's session (it will reconnect).
    pub fn hangup(&self, worker: &str) -> Result<(), BuildError> {
        let workers = self.inner.workers.lock().unwrap_or_else(|e| e.into_inner());
        let link = workers
            .get(worker)
            .ok_or_else(|| BuildError::NotConnected(worker.to_string()))?;
        link.hangup.cancel();
        Ok(())
    }

    /// The connected workers.
    pub fn connected(&self) -> Vec<Arc<WorkerLink>> {
        self.inner
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn running_builds(&self) -> usize {
        self.inner
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Serves one session of the `worker` service.
    pub async fn serve_worker(self, session: crate::dispatcher::Session) {
        workers::serve(self, session).await
    }
}

/// The change store the master's `ChangeSource` uses: stores the change,
/// then asks the schedulers for builds.
pub struct SchedulingStore {
    pub builds: BuildMaster,
}

#[async_trait]
impl ChangeStore for SchedulingStore {
    async fn add_changes(&self, batch: Vec<NewChange>) -> Result<Vec<i64>, StateError> {
        let ids = self.builds.inner.state.add_changes(batch.clone()).await?;
        if let Err(e) = self.builds.changes_added(&ids, &batch).await {
            // The changes are stored; only their builds are missing.
            tracing::error!(error = %e, "changes stored, but their build requests could not be");
        }
        Ok(ids)
    }
}
