//! The build master: schedulers turn changes into build requests, connected
//! workers take the oldest request of their builders, and each build runs its
//! steps in order on one worker, stopping at the first failure. Everything
//! lands in the state database; everything that happens is broadcast as an
//! [`Event`] (see [`events`]).
//!
//! Lifecycle: [`BuildMaster::start`] runs the dispatch loop, which wakes when
//! a request is added, a worker connects or a build ends. Worker sessions
//! arrive through the `worker` service ([`BuildMaster::serve_worker`]); each
//! build is a task of its own ([`run`]).

mod downloads;
pub mod events;
pub mod poller;
pub mod properties;
mod reconfig;
pub(crate) mod relay;
pub mod reporters;
pub mod retention;
mod run;
mod workers;

pub use events::{Event, Outcome, Stamped};
pub use reconfig::{BuildsReport, ReconfigOptions};

use crate::store::{BuildStore, TimerMarks};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::config::{BuilderConfig, Config, SchedulerConfig, StepSecrets, WorkerConfig};
use crate::store::{ChangeStore, NewChange, NewRequest, StateDb, StateError};
use crate::wire::StepId;

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
    /// `[step_secrets]` of the secrets file.
    pub step_secrets: StepSecrets,
}

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            reconnect_grace: Duration::from_secs(300),
            workers: BTreeMap::new(),
            builders: BTreeMap::new(),
            schedulers: BTreeMap::new(),
            step_secrets: StepSecrets::default(),
        }
    }
}

impl BuildConfig {
    pub fn from_config(c: &Config, step_secrets: StepSecrets) -> Self {
        BuildConfig {
            reconnect_grace: c.worker_reconnect_grace,
            workers: c.workers.clone(),
            builders: c.builders.clone(),
            schedulers: c.schedulers.clone(),
            step_secrets,
        }
    }
}

/// A build this master runs: made by [`BuildMaster::spawn_build`], removed
/// by its task when the build ends, or by [`BuildMaster::lose_lease`],
/// which aborts the task.
struct RunningBuild {
    builder: String,
    worker: String,
    stop: StopSignal,
    task: tokio::task::AbortHandle,
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
    /// Adoptions one at a time (a build is taken over once per master).
    adopting: tokio::sync::Mutex<()>,
    /// The lease on a shared database was lost: nothing is claimed, and
    /// workers are sent to the other masters.
    lease_lost: std::sync::atomic::AtomicBool,
    /// How many leases this master has lost: a build task or a worker
    /// session of an earlier lease leaves no trace in the tables of a
    /// later one.
    generation: std::sync::atomic::AtomicU64,
    /// A build found the lease gone before the renewals did: the
    /// generation it ran under, plus one (0: none). See
    /// [`BuildMaster::doubt_lease`].
    doubted: std::sync::atomic::AtomicU64,
    lease_doubt: Notify,
    events: broadcast::Sender<Stamped>,
    wake: Notify,
    /// Changed builders waiting for their running builds to end.
    pending_builders: Mutex<BTreeMap<String, BuilderConfig>>,
    /// Removed workers finishing their current builds.
    draining: Mutex<std::collections::BTreeSet<String>>,
    /// Per worker name, what its builds hold across its sessions.
    slots: Mutex<HashMap<String, Arc<WorkerSlots>>>,
    /// How long a disconnected worker's steps wait for it to come back.
    reconnect_grace: Duration,
    /// Artifacts offered to running download steps.
    downloads: Arc<downloads::Downloads>,
}

/// The build master. Cheap to clone.
#[derive(Clone)]
pub struct BuildMaster {
    inner: Arc<Inner>,
}

impl Inner {
    fn emit(&self, event: Event) {
        let _ = self.events.send(Stamped {
            unix_ms: crate::store::now_ms(),
            event,
            elsewhere: false,
        });
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
                adopting: tokio::sync::Mutex::new(()),
                lease_lost: Default::default(),
                generation: Default::default(),
                doubted: Default::default(),
                lease_doubt: Notify::new(),
                events,
                wake: Notify::new(),
                pending_builders: Mutex::new(BTreeMap::new()),
                draining: Mutex::new(Default::default()),
                slots: Mutex::new(HashMap::new()),
                reconnect_grace,
                downloads: Default::default(),
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
    /// Tells whichever worker runs the step of this row to kill it.
    pub(crate) fn interrupt_step_row(&self, row: i64, reason: &str) -> bool {
        let links: Vec<Arc<WorkerLink>> = self
            .inner
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        links.iter().any(|l| l.interrupt_row(row, reason))
    }

    /// Acts on what went wrong with steps' logs until `shutdown`: a step
    /// whose output cannot be stored is stopped (and fails, see the run);
    /// so is one past `max_log_size` when `on_log_limit = "fail"`.
    pub async fn watch_log_troubles(
        self,
        mut troubles: tokio::sync::mpsc::UnboundedReceiver<crate::store::logs::LogTrouble>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        use crate::store::logs::LogTrouble;
        loop {
            let t = tokio::select! {
                _ = shutdown.cancelled() => return,
                t = troubles.recv() => match t { Some(t) => t, None => return },
            };
            let fails = self.inner.state.log_files().fails_on_limit();
            let reason = match &t {
                LogTrouble::CannotWrite { why, .. } => why.clone(),
                LogTrouble::OverLimit { row, .. } if self.inner.state.is_upload(*row) => {
                    format!(
                        "the artifact passed {}",
                        self.inner.state.upload_limit(*row)
                    )
                }
                LogTrouble::OverLimit { max, .. } if fails => {
                    format!("its output passed max_log_size ({max} bytes)")
                }
                LogTrouble::OverLimit { row, max } => {
                    tracing::warn!(
                        step = row,
                        max,
                        "a step's output passed max_log_size; the rest is not stored"
                    );
                    continue;
                }
            };
            tracing::warn!(step = t.row(), %reason, "stopping a step");
            self.interrupt_step_row(t.row(), &reason);
        }
    }

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

    /// Live events, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Stamped> {
        self.inner.events.subscribe()
    }

    /// Runs the dispatch loop until `shutdown`. Builds left unfinished by a
    /// previous master process are marked `exception` first.
    pub async fn run(&self, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.dispatch().await {
                tracing::error!(error = %e, "cannot dispatch build requests");
            }
            let nightly = self.fire_nightlies().await;
            // Wake for the next tree-stable group that comes due, too.
            let next_due = self
                .inner
                .state
                .next_due_ms()
                .await
                .ok()
                .flatten()
                .map(|at| Duration::from_millis((at - crate::store::now_ms()).max(0) as u64 + 5));
            let nap = [next_due, nightly]
                .into_iter()
                .flatten()
                .fold(Duration::from_secs(5), Duration::min);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
        // Running builds are left as they are: their workers keep running
        // the steps, and the next master process resumes them.
    }

    /// Fires the nightly schedulers that are due: once per firing, however
    /// many were missed while the master was down, the requests and the
    /// record of the firing stored together (so a restart never fires one
    /// twice). Returns how long until the next firing.
    async fn fire_nightlies(&self) -> Option<Duration> {
        let config = self.inner.config();
        let state = &self.inner.state;
        let now_ms = crate::store::now_ms();
        let now = chrono::DateTime::from_timestamp_millis(now_ms)?;
        let mut next_in: Option<Duration> = None;
        for s in config.schedulers.values() {
            let Some(n) = &s.nightly else { continue };
            let fired_key = format!("nightly:{}:fired", s.name);
            let last = match state.mark(&fired_key).await {
                Ok(Some(ms)) => ms,
                Ok(None) => {
                    // First sight: the schedule starts now, not in the past
                    // (or where another master started it meanwhile).
                    match state
                        .fire((fired_key.clone(), None, now_ms), Vec::new(), Vec::new())
                        .await
                    {
                        Ok(Some(_)) => now_ms,
                        _ => state
                            .mark(&fired_key)
                            .await
                            .ok()
                            .flatten()
                            .unwrap_or(now_ms),
                    }
                }
                Err(e) => {
                    tracing::error!(scheduler = %s.name, error = %e, "cannot read the nightly scheduler's last firing");
                    continue;
                }
            };
            let after = chrono::DateTime::from_timestamp_millis(last).unwrap_or(now);
            let Some(due) = n.schedule.after(&after).next() else {
                continue;
            };
            if due > now {
                let d = (due - now).to_std().unwrap_or_default();
                next_in = Some(next_in.map_or(d, |x| x.min(d)));
                continue;
            }
            let change_key = format!("nightly:{}:change", s.name);
            let seen = state.mark(&change_key).await.ok().flatten().unwrap_or(0);
            let latest = state
                .latest_change(&n.branch, s.repository.as_deref())
                .await
                .ok()
                .flatten();
            let mut marks = Vec::new();
            let changed = latest.as_ref().is_some_and(|(id, _, _)| *id > seen);
            let requests: Vec<NewRequest> = if n.only_if_changed && !changed {
                tracing::info!(scheduler = %s.name, branch = %n.branch, "nightly scheduler fired; no new change on the branch, no build");
                Vec::new()
            } else {
                if let Some((id, _, _)) = &latest {
                    marks.push((change_key, *id));
                }
                s.builders
                    .iter()
                    .map(|b| NewRequest {
                        builder: b.clone(),
                        change_id: latest.as_ref().map(|(id, _, _)| *id),
                        reason: format!("nightly scheduler {}", s.name),
                        repository: latest
                            .as_ref()
                            .map(|(_, r, _)| r.clone())
                            .or_else(|| s.repository.clone())
                            .unwrap_or_default(),
                        branch: n.branch.clone(),
                        revision: latest
                            .as_ref()
                            .map(|(_, _, rev)| rev.clone())
                            .unwrap_or_default(),
                        properties: scheduler_properties(s),
                        ..Default::default()
                    })
                    .collect()
            };
            let made = requests.len();
            // Fired once, by whichever master moves the mark from `last`.
            match state
                .fire((fired_key, Some(last), now_ms), requests, marks)
                .await
            {
                Ok(Some(_)) if made > 0 => {
                    tracing::info!(scheduler = %s.name, branch = %n.branch, requests = made, "nightly scheduler fired");
                    self.wake();
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    tracing::info!(scheduler = %s.name, "nightly scheduler fired by another master");
                }
                Err(e) => {
                    tracing::error!(scheduler = %s.name, error = %e, "cannot record a nightly firing");
                }
            }
            if let Some(d) = n
                .schedule
                .after(&now)
                .next()
                .and_then(|due| (due - now).to_std().ok())
            {
                next_in = Some(next_in.map_or(d, |x| x.min(d)));
            }
        }
        next_in
    }

    /// Emits an event that happened elsewhere (see `relay`).
    pub(crate) fn emit_stamped(&self, s: Stamped) {
        let _ = self.inner.events.send(s);
    }

    /// Looks at the waiting requests again now.
    pub(crate) fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Gives waiting requests, oldest first, to connected workers with a free
    /// slot.
    async fn dispatch(&self) -> Result<(), StateError> {
        if self.lease_lost() {
            return Ok(());
        }
        let generation = self.generation();
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
        let mut taken = std::collections::HashSet::new();
        let now = crate::store::now_ms();
        for req in &waiting {
            if taken.contains(&req.id) {
                continue; // merged into a build already made this round
            }
            if req.request.not_before_ms > now {
                continue; // its tree is not stable yet
            }
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
                    .filter(|l| !l.probing.load(Ordering::SeqCst))
                    .min_by_key(|l| l.slots.busy.load(Ordering::SeqCst))
                    .cloned()
            };
            let Some(link) = link else { continue };
            // Collapsing: every waiting request of this builder and branch
            // goes into one build of the newest.
            let (req, merged) = if builder.collapse_requests || !req.request.collapse_key.is_empty()
            {
                let same: Vec<&crate::store::BuildRequest> = waiting
                    .iter()
                    .filter(|r| {
                        r.request.builder == req.request.builder
                            && r.request.branch == req.request.branch
                            && (builder.collapse_requests
                                || r.request.collapse_key == req.request.collapse_key)
                            && r.request.not_before_ms <= now
                            && !taken.contains(&r.id)
                    })
                    .collect();
                let newest = same.iter().max_by_key(|r| r.id).copied().unwrap_or(req);
                let merged: Vec<i64> = same
                    .iter()
                    .map(|r| r.id)
                    .filter(|id| *id != newest.id)
                    .collect();
                (newest, merged)
            } else {
                (req, Vec::new())
            };
            taken.insert(req.id);
            taken.extend(merged.iter().copied());
            link.slots.busy.fetch_add(1, Ordering::SeqCst);
            // The claim, the build's properties and its first step's row
            // are one durable write: the step can go out right after it.
            let sources = run::PropertySources {
                request: req.clone(),
                builder: builder.name.clone(),
                worker: link.name.clone(),
                hello: Some(link.hello.clone()),
                worker_properties: config
                    .workers
                    .get(&link.name)
                    .map(|w| w.properties.clone())
                    .unwrap_or_default(),
            };
            let first_step = builder.steps.first().map(|s| {
                (
                    s.name.clone(),
                    s.on_lost.as_str().to_string(),
                    StepId::random(),
                )
            });
            let first_id = first_step.as_ref().map(|(_, _, id)| *id);
            let claimed = self
                .inner
                .state
                .claim(req.id, merged, &link.name, first_step, move |b| {
                    let props = sources.make(b.build, b.number, b.change, b.change_ids);
                    let rows = run::property_rows(&props);
                    (props, rows)
                })
                .await;
            match claimed {
                Ok(Some(claim)) => {
                    let build = claim.build;
                    let first = first_id.zip(claim.first_row);
                    let spawned = self.spawn_build(
                        build,
                        req.clone(),
                        builder.clone(),
                        link.name.clone(),
                        run::Resume {
                            fresh: Some((claim.kept, first)),
                            ..Default::default()
                        },
                        generation,
                    );
                    if !spawned {
                        link.slots.busy.fetch_sub(1, Ordering::SeqCst);
                        tracing::warn!(
                            build,
                            "this master lost its lease as it claimed a build: the build is left to whoever adopts it"
                        );
                        return Ok(());
                    }
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

    /// Picks up the builds a previous master process left running (it was
    /// stopped, or killed): each continues where it was, on its worker. A step
    /// that was running is re-attached when its worker comes back and lists
    /// it (its output replayed from the last acknowledgement); a worker that
    /// comes back without it, or not within the grace, has lost it, and the
    /// step's `on_lost` applies. Call before the port serves workers.
    pub async fn recover(&self) -> Result<usize, StateError> {
        let unfinished = self.inner.state.builds_to_resume().await?;
        let mut resumed = 0;
        for b in unfinished {
            resumed += self.resume(b).await? as usize;
        }
        Ok(resumed)
    }

    /// Takes over, while it runs, the builds of masters sharing the database
    /// whose leases have expired (their machine died, or they lost the
    /// database), and runs them on from where they are, as [`Self::recover`]
    /// does: their workers fail over to this master and their steps are
    /// re-attached. Nothing to do on SQLite. Returns how many it took.
    pub async fn adopt(&self) -> Result<usize, StateError> {
        let Some(pg) = self.inner.state.postgres() else {
            return Ok(0);
        };
        let _one_at_a_time = self.inner.adopting.lock().await;
        let mut resumed = 0;
        for id in pg.adopt_orphans().await? {
            let Some(b) = self.inner.state.build(id).await? else {
                continue;
            };
            tracing::info!(build = id, builder = %b.builder, worker = %b.worker, "adopted a build whose master's lease expired");
            resumed += self.resume(b).await? as usize;
        }
        Ok(resumed)
    }

    /// This master's lease on a shared database expired before it was
    /// renewed (it was stopped, or cut off): the other masters may have
    /// adopted its builds, and the database refuses its writes to them.
    /// It claims nothing more, hangs up every worker (they go on to the
    /// other masters, which re-attach their steps, or come back once this
    /// one has a new lease) and lets go of its builds silently: their tasks
    /// are aborted, never to write again, and its workers' slots start
    /// afresh. [`Self::rejoin`] serves again under a new lease.
    pub(crate) fn lose_lease(&self) {
        self.inner
            .lease_lost
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let links: Vec<Arc<WorkerLink>> = self
            .inner
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for l in links {
            tracing::warn!(worker = %l.name, "hanging up: this master lost its lease");
            l.hangup.cancel();
        }
        let dropped: Vec<(i64, RunningBuild)> = self
            .inner
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        self.inner
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        for (build, r) in dropped {
            r.task.abort();
            tracing::warn!(build, builder = %r.builder, worker = %r.worker, "let go of a build: this master lost its lease");
            self.after_build(&r.builder, &r.worker);
        }
    }

    /// Serves again after [`Self::lose_lease`], once the state holds a new
    /// lease: takes back the builds of its earlier leases that nobody
    /// adopted meanwhile (and those of masters whose leases expired) and
    /// runs them on from where they are, as after a restart; then admits
    /// workers and claims requests again. Returns how many builds it took.
    /// On an error it stays out (the lease lost, no worker admitted): the
    /// caller ends the new lease and tries again.
    pub(crate) async fn rejoin(&self) -> Result<usize, StateError> {
        let resumed = self.recover().await?;
        self.inner
            .lease_lost
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.wake();
        Ok(resumed)
    }

    /// Whether this master has lost its lease and not yet taken a new
    /// one (see [`Self::lose_lease`]): it runs no builds meanwhile.
    pub fn lease_lost(&self) -> bool {
        self.inner
            .lease_lost
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A build running under the lease of `generation` found it gone (a
    /// write was refused: the lease lapsed by this master's clock, or the
    /// database fenced it) before the renewals noticed: the master is to
    /// step down and take a new lease ([`Self::lease_doubted`]).
    pub(crate) fn doubt_lease(&self, generation: u64) {
        self.inner
            .doubted
            .store(generation + 1, std::sync::atomic::Ordering::SeqCst);
        self.inner.lease_doubt.notify_one();
    }

    /// Resolves once a build of the current lease has found it gone (see
    /// [`Self::doubt_lease`]); doubts about earlier leases are passed over.
    pub(crate) async fn lease_doubted(&self) {
        loop {
            self.inner.lease_doubt.notified().await;
            if self.inner.doubted.load(std::sync::atomic::Ordering::SeqCst) == self.generation() + 1
            {
                return;
            }
        }
    }

    /// The epoch of this master's lease on a shared database; 0 on SQLite,
    /// where there is none.
    pub fn lease_epoch(&self) -> i64 {
        self.inner
            .state
            .postgres()
            .and_then(|pg| pg.lease())
            .map_or(0, |l| l.0)
    }

    /// How many leases this master has lost (see [`Self::lose_lease`]).
    pub(crate) fn generation(&self) -> u64 {
        self.inner
            .generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether every step a worker says it holds is known here, or of no
    /// build another master runs (the session then re-attaches, acknowledges
    /// or stops them): on a shared database, a step of another master's
    /// build is adopted when that master's lease has expired, and waited
    /// for until its resumed build expects it, for at most `wait` (the
    /// worker hears nothing meanwhile: keep it under its heartbeat
    /// interval). `false`: a build another master still owns holds it.
    pub(crate) async fn held_steps_are_ours(
        &self,
        worker: &str,
        slots: &WorkerSlots,
        hello: &crate::proto::WorkerHello,
        wait: Duration,
    ) -> bool {
        let Some(pg) = self.inner.state.postgres() else {
            return true;
        };
        let unknown = || -> Vec<Vec<u8>> {
            let pending = slots.pending.lock().unwrap_or_else(|e| e.into_inner());
            hello
                .steps
                .iter()
                .filter(|h| !pending.contains_key(&h.step_id))
                .map(|h| h.step_id.clone())
                .collect()
        };
        if unknown().is_empty() {
            return true;
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut next_adoption = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next_adoption {
                if let Err(e) = self.adopt().await {
                    tracing::warn!(worker, error = %e, "cannot adopt the builds of masters whose leases expired");
                }
                next_adoption = tokio::time::Instant::now() + Duration::from_millis(200);
            }
            let left = unknown();
            if left.is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                for id in left {
                    match pg.others_running_build_of_step(&id).await {
                        Ok(None) => {}
                        Ok(Some(build)) => {
                            tracing::info!(
                                worker,
                                build,
                                "a step the worker holds is of a build another master owns"
                            );
                            return false;
                        }
                        Err(e) => {
                            tracing::warn!(worker, error = %e, "cannot tell whose build a held step is of");
                            return false;
                        }
                    }
                }
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs an unfinished build on from where its records say it is; `false`
    /// when it cannot be (its builder is gone, or its end was only not
    /// recorded): it is ended instead.
    async fn resume(&self, b: crate::store::BuildRecord) -> Result<bool, StateError> {
        let generation = self.generation();
        let config = self.inner.config();
        let Some(builder) = config.builders.get(&b.builder).cloned() else {
            tracing::warn!(build = b.id, builder = %b.builder, "a build left running has no builder any more: marked exception");
            for s in b.steps.iter().filter(|s| s.result.is_none()) {
                self.inner
                    .state
                    .finish_step(
                        crate::store::StepEndRecord::new(
                            s.row,
                            Outcome::Exception,
                            "the builder was removed while the master was down",
                        ),
                        Vec::new(),
                    )
                    .await?;
            }
            self.inner
                .state
                .finish_build(b.id, Outcome::Exception)
                .await?;
            return Ok(false);
        };
        let mut resume = run::Resume {
            runs: vec![0; builder.steps.len()],
            ..Default::default()
        };
        for s in &b.steps {
            if let Some(r) = resume.runs.get_mut(s.position as usize) {
                *r = (*r).max(s.attempt);
            }
        }
        let last = b.steps.iter().max_by_key(|s| (s.started_ms, s.row));
        match last {
            None => {}
            Some(s) if s.result.is_none() => {
                resume.position = s.position as usize;
                resume.in_flight = Some((s.step_id, s.row));
            }
            Some(s) if s.result == Some(Outcome::Success) => {
                resume.position = s.position as usize + 1
            }
            Some(s) => {
                // It had ended but its end was not recorded: record it now.
                let result = s.result.unwrap_or(Outcome::Exception);
                self.inner.state.finish_build(b.id, result).await?;
                return Ok(false);
            }
        }
        let request = crate::store::BuildRequest {
            id: b.request_id,
            request: crate::store::NewRequest {
                builder: b.builder.clone(),
                change_id: None,
                reason: b.reason.clone(),
                repository: b.repository.clone(),
                branch: b.branch.clone(),
                revision: b.revision.clone(),
                ..Default::default()
            },
            created_ms: b.started_ms,
        };
        let slots = self.slots_for(&b.worker);
        slots.busy.fetch_add(1, Ordering::SeqCst);
        if resume.in_flight.is_some() {
            // Lost if the worker does not come back in time.
            self.lose_steps_after_grace(
                b.worker.clone(),
                run::BEFORE_RESTART.to_string(),
                slots.clone(),
            );
        }
        tracing::info!(build = b.id, builder = %b.builder, worker = %b.worker, position = resume.position, "resuming a build left running by the previous master");
        if !self.spawn_build(b.id, request, builder, b.worker.clone(), resume, generation) {
            slots.busy.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(
                build = b.id,
                "this master lost its lease as it resumed a build: the build is left to whoever adopts it"
            );
            return Ok(false);
        }
        Ok(true)
    }

    /// Runs a build (its worker's slot already taken) in a task of its own,
    /// listed as running until it ends; then frees the slot. `false`, and
    /// nothing run, if the lease of `generation` (under which the build was
    /// claimed or adopted) has been lost since.
    #[must_use]
    fn spawn_build(
        &self,
        build: i64,
        req: crate::store::BuildRequest,
        builder: BuilderConfig,
        worker: String,
        resume: run::Resume,
        generation: u64,
    ) -> bool {
        let me = self.clone();
        let slots = self.slots_for(&worker);
        let stop = StopSignal::default();
        // Listed before the task can end and unlist it, and checked under
        // the same lock [`Self::lose_lease`] takes to let go of builds.
        let mut running = self.inner.running.lock().unwrap_or_else(|e| e.into_inner());
        if self.generation() != generation {
            return false;
        }
        let listed = RunningBuild {
            builder: builder.name.clone(),
            worker: worker.clone(),
            stop: stop.clone(),
            task: tokio::spawn(async move {
                let name = builder.name.clone();
                run::run_build(
                    &me,
                    build,
                    req,
                    builder,
                    worker.clone(),
                    slots.clone(),
                    stop,
                    resume,
                )
                .await;
                if me.generation() != generation {
                    return; // its lease was lost meanwhile: nothing of it is listed
                }
                slots.busy.fetch_sub(1, Ordering::SeqCst);
                me.inner
                    .running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&build);
                me.after_build(&name, &worker);
                me.wake();
            })
            .abort_handle(),
        };
        running.insert(build, listed);
        true
    }

    /// What makes a batch's build requests: the schedulers of the config
    /// in force now.
    fn requester(&self) -> impl FnOnce(&[i64], &[NewChange]) -> Vec<NewRequest> + Send + 'static {
        let config = self.inner.config();
        move |ids, changes| requests_for(&config, ids, changes)
    }

    /// Wakes the dispatcher if a store made build requests.
    fn woken_by(&self, requests: &[i64]) {
        if !requests.is_empty() {
            self.wake();
        }
    }

    /// Stores pushed changes with the build requests of the schedulers they
    /// match, in one transaction, and wakes the dispatcher.
    pub async fn add_changes(&self, batch: Vec<NewChange>) -> Result<Vec<i64>, StateError> {
        let (ids, requests) = self
            .inner
            .state
            .add_changes_requesting(batch, self.requester())
            .await?;
        self.woken_by(&requests);
        Ok(ids)
    }

    /// As [`BuildMaster::add_changes`], once per webhook delivery (hook,
    /// delivery id): a redelivery stores nothing and returns the changes the
    /// first delivery made, with `true`.
    pub async fn add_changes_once(
        &self,
        delivery: (String, String),
        batch: Vec<NewChange>,
    ) -> Result<(Vec<i64>, bool), StateError> {
        let (ids, requests, again) = self
            .inner
            .state
            .add_changes_once(delivery, batch, self.requester())
            .await?;
        self.woken_by(&requests);
        Ok((ids, again))
    }

    /// Stores a poll's changes with their build requests and the heads it
    /// saw, in one transaction (see [`crate::store::StateDb::add_polled_changes`]).
    pub async fn add_polled_changes(
        &self,
        repository: String,
        heads: std::collections::BTreeMap<String, String>,
        batch: Vec<NewChange>,
    ) -> Result<Vec<i64>, StateError> {
        let (ids, requests) = self
            .inner
            .state
            .add_polled_changes(repository, heads, batch, self.requester())
            .await?;
        self.woken_by(&requests);
        Ok(ids)
    }

    /// The state database.
    pub(crate) fn state_db(&self) -> &Arc<crate::store::StateDb> {
        &self.inner.state
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
        self.force_with(
            builder,
            branch,
            revision,
            repository,
            who,
            Default::default(),
        )
        .await
    }

    /// [`BuildMaster::force`] with properties (source `force`).
    pub async fn force_with(
        &self,
        builder: &str,
        branch: &str,
        revision: &str,
        repository: &str,
        who: &str,
        properties: std::collections::BTreeMap<String, String>,
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
                properties: properties
                    .into_iter()
                    .map(|(n, v)| (n, v, "force".to_string()))
                    .collect(),
                ..Default::default()
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
        self.builds.add_changes(batch).await
    }

    async fn add_changes_keyed(
        &self,
        key: (String, String),
        batch: Vec<NewChange>,
    ) -> Result<(Vec<i64>, bool), StateError> {
        self.builds.add_changes_once(key, batch).await
    }
}

/// The build requests for changes (by id) that match the schedulers of
/// `config`: one per builder of each matching change scheduler.
fn requests_for(config: &BuildConfig, ids: &[i64], changes: &[NewChange]) -> Vec<NewRequest> {
    let mut requests = Vec::new();
    for (id, c) in ids.iter().zip(changes) {
        for s in config.schedulers.values() {
            if !s.triggered_by(c) {
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
                    properties: scheduler_properties(s),
                    not_before_ms: s
                        .tree_stable_timer
                        .map_or(0, |t| crate::store::now_ms() + t.as_millis() as i64),
                    collapse_key: if s.tree_stable_timer.is_some() {
                        format!("scheduler:{}", s.name)
                    } else {
                        String::new()
                    },
                });
            }
        }
    }
    requests
}

/// What a scheduler gives the builds it makes: its name and its
/// `[scheduler.properties]`, with source `scheduler`.
fn scheduler_properties(s: &SchedulerConfig) -> Vec<(String, String, String)> {
    std::iter::once(("scheduler".to_string(), s.name.clone()))
        .chain(s.properties.clone())
        .map(|(n, v)| (n, v, "scheduler".to_string()))
        .collect()
}
