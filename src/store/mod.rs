//! The master's durable state: changes, build requests, builds, steps,
//! the reporters' outbox and timers' marks, behind one seam (the traits
//! below, with typed records in `records`), in one of two backends:
//! `sqlite` (embedded, the default) or `postgres` (several masters on one
//! database). Log bytes, uploads and artifacts are files under the data
//! directory (`logs`) with either. [`StateDb`] is what the master holds:
//! the files, and the backend every database operation goes to.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::Connection;

use crate::builds::Outcome;
use crate::wire::StepId;

mod builds;
pub mod logs;
pub mod postgres;
mod sqlite;
#[cfg(test)]
mod suite;

mod records;

pub use records::*;

/// Why the state database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open the state database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "the state database {path} has schema version {found}, but this switchyard knows versions up to {known}: it was written by a newer switchyard"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("state database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the state database writer has stopped")]
    WriterGone,
    #[error("cannot start the state database writer: {0}")]
    Thread(std::io::Error),
    #[error("state database transaction failed: {0}")]
    Transaction(String),
    #[error("log files: {0}")]
    Logs(#[from] std::io::Error),
    #[error("PostgreSQL state: {0}")]
    Postgres(String),
    #[error("this operation reads the SQLite state, and the state is in PostgreSQL")]
    SqliteOnly,
    #[error("the database cannot be reached: {0}")]
    Unavailable(String),
    #[error(
        "build {build} is not this master's (lease {epoch}): its lease expired and another master adopted it; nothing was written"
    )]
    Fenced { build: i64, epoch: i64 },
    #[error(
        "this master's lease {epoch} expired before it was renewed; another master may have adopted its builds"
    )]
    LeaseLost { epoch: i64 },
}

impl StateError {
    /// Whether this master's lease is gone ([`StateError::LeaseLost`],
    /// [`StateError::Fenced`]): the build is another master's, or will be,
    /// and this one must write nothing more to it.
    pub fn lease_gone(&self) -> bool {
        matches!(
            self,
            StateError::LeaseLost { .. } | StateError::Fenced { .. }
        )
    }
}

/// Where pushed changes go. The master uses [`StateDb`]; benchmarks and
/// embedders may plug in their own.
#[async_trait]
pub trait ChangeStore: Send + Sync + 'static {
    /// Stores the whole batch, or none of it, and returns the ids in order.
    async fn add_changes(&self, batch: Vec<NewChange>) -> Result<Vec<i64>, StateError>;

    /// As [`ChangeStore::add_changes`], once per `key` (a namespace and the
    /// client's key): when the key was stored before (within 7 days),
    /// nothing is written and the first ids come back with `true`.
    async fn add_changes_keyed(
        &self,
        key: (String, String),
        batch: Vec<NewChange>,
    ) -> Result<(Vec<i64>, bool), StateError>;
}

/// Reading the change log back; implemented by every state backend.
#[async_trait]
pub trait ChangeReader: Send + Sync + 'static {
    /// One change by id.
    async fn change(&self, id: i64) -> Result<Option<StoredChange>, StateError>;

    /// Changes with ids above `after`, oldest first, at most `limit`.
    async fn changes_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredChange>, StateError>;

    /// How many changes are stored.
    async fn change_count(&self) -> Result<i64, StateError>;
}

/// The queue of build requests, shared by every master on one state: a
/// request is claimed by exactly one of them.
#[async_trait]
pub trait RequestQueue: Send + Sync + 'static {
    /// Stores build requests; returns their ids in order.
    async fn add_requests(&self, requests: Vec<NewRequest>) -> Result<Vec<i64>, StateError>;

    /// Requests no build has taken yet, oldest first.
    async fn waiting_requests(&self) -> Result<Vec<BuildRequest>, StateError>;

    /// Claims the oldest waiting request that is due (its `not_before_ms`
    /// past) for one of `builders`, for a build on `worker`: the build is
    /// made (numbered in its builder) in the same transaction. `None` when
    /// there is none to claim. However many claim at once, on however many
    /// masters, no request is claimed twice.
    async fn claim_next(
        &self,
        builders: &[String],
        worker: &str,
    ) -> Result<Option<ClaimedRequest>, StateError>;
}

/// Timers that fire once across masters (the nightly schedulers): the
/// last firing is a mark in the state, and a firing is stored only if the
/// mark is still what the master read, so two masters that saw the same
/// timer due make one firing between them.
#[async_trait]
pub trait TimerMarks: Send + Sync + 'static {
    /// A number kept under `key`.
    async fn mark(&self, key: &str) -> Result<Option<i64>, StateError>;

    /// Stores `requests` and sets `marks` in one transaction, if the mark
    /// `fired.0` still holds `fired.1` (`None`: no mark yet), and sets it
    /// to `fired.2`. Otherwise nothing is written and `None` comes back:
    /// another master fired first.
    async fn fire(
        &self,
        fired: (String, Option<i64>, i64),
        requests: Vec<NewRequest>,
        marks: Vec<(String, i64)>,
    ) -> Result<Option<Vec<i64>>, StateError>;
}

/// Builds and their steps, and where each step's log is: the records every
/// state backend keeps (the log bytes themselves live in files, see
/// [`logs`]).
#[async_trait]
pub trait BuildStore: Send + Sync + 'static {
    /// Records a step attempt starting, and `properties` of its build in
    /// the same transaction (a build's first step carries the properties it
    /// was made with: one durable write instead of two before the step can
    /// go out); returns the step's row id.
    #[allow(clippy::too_many_arguments)]
    async fn start_step(
        &self,
        build: i64,
        position: u32,
        name: &str,
        attempt: u32,
        step_id: StepId,
        on_lost: &str,
        properties: Vec<PropertyRow>,
    ) -> Result<i64, StateError>;

    /// Records a step attempt's end, its log's size, and what follows from
    /// it in the same transaction: properties the step set, and the build's
    /// end when this step ends it.
    async fn record_step_end(&self, end: StepEndRecord, log: LogSize) -> Result<(), StateError>;

    /// Records a build's end.
    async fn finish_build(&self, build: i64, result: Outcome) -> Result<(), StateError>;

    /// Stores properties of a build (replacing any of the same name).
    async fn set_build_properties(
        &self,
        build: i64,
        properties: Vec<PropertyRow>,
    ) -> Result<(), StateError>;

    /// One build, with its steps (by position, then attempt) and
    /// properties (by name).
    async fn build(&self, id: i64) -> Result<Option<BuildRecord>, StateError>;

    /// Builds matching `filter`, newest first, with their steps.
    async fn find_builds(&self, filter: BuildFilter) -> Result<Vec<BuildRecord>, StateError>;

    /// The most recent builds, newest first, with their steps.
    async fn builds(
        &self,
        builder: Option<String>,
        limit: usize,
    ) -> Result<Vec<BuildRecord>, StateError> {
        self.find_builds(BuildFilter {
            builder,
            limit,
            ..Default::default()
        })
        .await
    }

    /// The id of a builder's build of this number.
    async fn build_by_number(&self, builder: &str, number: i64) -> Result<Option<i64>, StateError>;

    /// Builds not ended yet, oldest first, with their steps.
    async fn unfinished_builds(&self) -> Result<Vec<BuildRecord>, StateError>;

    /// The changes of every request a build was made for, oldest first.
    async fn build_change_ids(&self, build: i64) -> Result<Vec<i64>, StateError>;

    /// The build a request was claimed by, if any.
    async fn request_build(&self, request: i64) -> Result<Option<i64>, StateError>;

    /// Records where these step attempts' logs now are.
    async fn set_log_storage(&self, rows: Vec<i64>, stored: LogStorage) -> Result<(), StateError>;

    /// Step attempts that have ended whose logs are stored as `stored`.
    async fn ended_logs_stored_as(&self, stored: LogStorage) -> Result<Vec<i64>, StateError>;

    /// At most `limit` step attempts of builds that ended before
    /// `ended_before_ms` whose logs are not pruned yet, and where each is.
    async fn logs_to_prune(
        &self,
        ended_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<(i64, LogStorage)>, StateError>;
}

/// The reporters' outbox: a row for each build's start and end, written in
/// the same transaction as the build's own row, and each reporter's
/// progress on each row.
#[async_trait]
pub trait ReportOutbox: Send + Sync + 'static {
    /// The oldest `limit` rows `reporter` has not done with, oldest first,
    /// and its progress on them. Each reporter reads its own queue, so one
    /// that keeps failing never hides newer rows from the others.
    async fn report_queue(
        &self,
        reporter: String,
        limit: usize,
    ) -> Result<(Vec<QueuedReport>, HashMap<i64, ReportProgress>), StateError>;

    /// Records a reporter's progress on an outbox row.
    async fn set_report_progress(
        &self,
        outbox_id: i64,
        reporter: String,
        progress: ReportProgress,
    ) -> Result<(), StateError>;

    /// Marks rows done for `reporter` without sending them (rows it does
    /// not want, or gave up), in one transaction.
    async fn skip_reports(&self, reporter: String, ids: Vec<i64>) -> Result<(), StateError>;

    /// Removes (at most `limit`) rows every one of `reporters` is done
    /// with, with their progress; all of them when there are no reporters.
    /// Returns how many went.
    async fn forget_delivered_reports(
        &self,
        reporters: Vec<String>,
        limit: usize,
    ) -> Result<usize, StateError>;

    /// Reports a reporter tried to deliver and could not yet, oldest first
    /// (at most `limit`).
    async fn undelivered_reports(&self, limit: usize)
    -> Result<Vec<UndeliveredReport>, StateError>;

    /// How many reports a reporter tried to deliver and could not yet.
    async fn undelivered_report_count(&self) -> Result<u64, StateError>;
}

pub use sqlite::SCHEMA_VERSION;

/// What a backend keeps for [`StateDb`] beyond the request queue: changes,
/// builds and steps, the reporters' outbox, the timers' marks.
trait Backend: ChangeStore + ChangeReader + BuildStore + ReportOutbox + TimerMarks {}
impl<T: ChangeStore + ChangeReader + BuildStore + ReportOutbox + TimerMarks> Backend for T {}

/// The master's state database. Cheap to share (`Arc`); dropping the last
/// handle lets the writer finish what is queued and stop.
pub struct StateDb {
    path: PathBuf,
    /// SQLite: `None` when the state is in PostgreSQL (`pg`).
    sqlite: Option<sqlite::SqliteDb>,
    /// PostgreSQL: every database operation goes there; the files (logs,
    /// uploads, artifacts) stay under the data directory.
    pg: Option<postgres::PgState>,
    logs: Arc<logs::LogFiles>,
    /// Uploads being received: the stdout of upload steps, as log files of
    /// their own (`data_dir/uploads/`), until they are checked and moved to
    /// `data_dir/artifacts/`.
    uploads: Arc<logs::LogFiles>,
    /// The step rows whose stdout is an upload.
    upload_rows: Mutex<std::collections::HashSet<i64>>,
    /// `[master] max_build_artifacts_size`.
    max_build_artifacts: std::sync::atomic::AtomicU64,
    /// Uploads held below `max_artifact_size` by what their build may
    /// still store: why, for the step's failure.
    build_limited: Mutex<std::collections::HashMap<i64, String>>,
    /// `data_dir/artifacts`.
    artifacts_dir: PathBuf,
    /// One log compressed at a time, in the background.
    compressing: Arc<tokio::sync::Semaphore>,
    /// Who hears of steps whose output could not all be stored.
    log_troubles: Mutex<Option<tokio::sync::mpsc::UnboundedSender<logs::LogTrouble>>>,
    /// PostgreSQL: until when (on this process's monotonic clock) this
    /// master may write files for its builds (see [`StateDb::lease_holds`]).
    lease_until: Mutex<Option<std::time::Instant>>,
    /// PostgreSQL: the jobs this master leads (`None`), or when it last
    /// found another leading them (see [`StateDb::leads`]).
    leading: Mutex<HashMap<String, Option<std::time::Instant>>>,
}

/// How long after a renewal was sent a master still writes its builds'
/// files: three quarters of the lease (see [`StateDb::lease_holds`]).
fn lease_margin(lease: std::time::Duration) -> std::time::Duration {
    lease * 3 / 4
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl StateDb {
    /// Opens (creating if needed) and migrates the database at `path`, with
    /// log files beside it (`logs/` in its directory).
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::open_in(path, dir)
    }

    /// Opens (creating if needed) and migrates the database at `path`, with
    /// log files under `data_dir/logs/`.
    pub fn open_in(path: &Path, data_dir: &Path) -> Result<Self, StateError> {
        let logs = Arc::new(logs::LogFiles::new(data_dir.join("logs")));
        let (db, uploading) = sqlite::SqliteDb::open(path, &logs)?;
        let mut state = StateDb::with_files(path.to_path_buf(), logs, data_dir, uploading);
        state.sqlite = Some(db);
        Ok(state)
    }

    /// A state with its files under `data_dir` (`logs` already open) and no
    /// database yet: each backend's constructor sets its own.
    fn with_files(
        path: PathBuf,
        logs: Arc<logs::LogFiles>,
        data_dir: &Path,
        uploading: std::collections::HashSet<i64>,
    ) -> StateDb {
        StateDb {
            path,
            sqlite: None,
            pg: None,
            logs,
            uploads: {
                let u = logs::LogFiles::new(data_dir.join("uploads"));
                u.keep_digests();
                Arc::new(u)
            },
            upload_rows: Mutex::new(uploading),
            max_build_artifacts: std::sync::atomic::AtomicU64::new(u64::MAX),
            build_limited: Mutex::new(Default::default()),
            artifacts_dir: data_dir.join("artifacts"),
            compressing: Arc::new(tokio::sync::Semaphore::new(1)),
            log_troubles: Mutex::new(None),
            lease_until: Mutex::new(None),
            leading: Mutex::new(HashMap::new()),
        }
    }

    /// The state in the PostgreSQL database at `url` (see
    /// [`postgres`]), with the files (logs, uploads, artifacts) under
    /// `data_dir`, which every master sharing the database must share too
    /// (see the README's "Several masters"). The master takes a lease
    /// named `master` lasting `lease`, which it must renew
    /// ([`StateDb::renew_lease`]) every third of that.
    pub async fn open_postgres(
        url: &str,
        data_dir: &Path,
        master: &str,
        lease: std::time::Duration,
    ) -> Result<Self, StateError> {
        let taken = std::time::Instant::now();
        let pg = postgres::PgState::connect(url)
            .await?
            .take_lease(master, lease)
            .await?;
        let uploading = pg.uploading_rows().await?.into_iter().collect();
        let logs = Arc::new(logs::LogFiles::new(data_dir.join("logs")));
        let mut state =
            StateDb::with_files(postgres::shown_url(url).into(), logs, data_dir, uploading);
        state.pg = Some(pg);
        state.lease_until = Mutex::new(Some(taken + lease_margin(lease)));
        Ok(state)
    }

    /// Whether this master may still write the files of its builds (log
    /// chunks, uploads): always on SQLite; on PostgreSQL, while its lease
    /// holds by its own clock, which runs on while the process is stopped.
    /// The database refuses a lapsed lease's writes to build records; this
    /// keeps a master that comes back from writing files another master
    /// has taken over. The bound is a quarter of the lease short of the
    /// database's, so a write begun just before it ends well before
    /// another master can adopt the build.
    pub fn lease_holds(&self) -> bool {
        match *self.lease_until.lock().unwrap_or_else(|e| e.into_inner()) {
            None => true,
            Some(until) => std::time::Instant::now() < until,
        }
    }

    /// `Err(LeaseLost)` unless [`StateDb::lease_holds`].
    fn check_lease(&self) -> Result<(), StateError> {
        if self.lease_holds() {
            return Ok(());
        }
        let epoch = self.pg.as_ref().and_then(|p| p.lease()).map_or(0, |l| l.0);
        Err(StateError::LeaseLost { epoch })
    }

    /// The SQLite state, when the state is there.
    fn sqlite_db(&self) -> Result<&sqlite::SqliteDb, StateError> {
        self.sqlite.as_ref().ok_or(StateError::SqliteOnly)
    }

    /// The backend the database operations go to.
    fn db(&self) -> Result<&dyn Backend, StateError> {
        match (&self.pg, &self.sqlite) {
            (Some(pg), _) => Ok(pg),
            (None, Some(db)) => Ok(db),
            (None, None) => Err(StateError::SqliteOnly),
        }
    }

    /// The PostgreSQL state, when the state is there.
    pub fn postgres(&self) -> Option<&postgres::PgState> {
        self.pg.as_ref()
    }

    /// Whether this master runs `job` (pollers, the reporters' sender,
    /// pruning), which runs once across the masters sharing a database:
    /// always on SQLite; on PostgreSQL, while it holds the job's lead.
    ///
    /// Asked often (each poller and reporter pass): a lead held is kept
    /// without asking while the lease holds (nobody can take it before the
    /// lease expires), and a lead another master holds is asked about again
    /// a second later, not sooner.
    pub async fn leads(&self, job: &str) -> bool {
        let Some(pg) = &self.pg else {
            return true;
        };
        let known = self
            .leading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(job)
            .copied();
        match known {
            Some(None) if self.lease_holds() => return true,
            Some(Some(asked)) if asked.elapsed() < std::time::Duration::from_secs(1) => {
                return false;
            }
            _ => {}
        }
        let led = match pg.leads(job).await {
            Ok(led) => led,
            Err(e) => {
                tracing::warn!(job, error = %e, "cannot tell whether this master leads a job; leaving it to the others");
                false
            }
        };
        self.leading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job.to_string(), (!led).then(std::time::Instant::now));
        led
    }

    /// Renews this master's lease for `ttl` (PostgreSQL; nothing to do on
    /// SQLite). [`StateError::LeaseLost`] once it has expired.
    pub async fn renew_lease(&self, ttl: std::time::Duration) -> Result<(), StateError> {
        let Some(pg) = &self.pg else {
            return Ok(());
        };
        // Counted from before the renewal was sent: the database's expiry
        // is no earlier.
        let sent = std::time::Instant::now();
        pg.renew_lease(ttl).await?;
        *self.lease_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(sent + lease_margin(ttl));
        Ok(())
    }

    /// Ends this master's lease at once (PostgreSQL; a master stepping
    /// down): file writes stop here, and the database refuses its writes.
    pub async fn end_lease(&self) -> Result<(), StateError> {
        let Some(pg) = &self.pg else {
            return Ok(());
        };
        *self.lease_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(std::time::Instant::now());
        pg.end_lease().await
    }

    /// Takes a new lease for `ttl` in place of one that was lost
    /// (PostgreSQL; see [`postgres::PgState::retake_lease`]): file writes
    /// are allowed again, and which jobs this master leads is asked anew.
    pub async fn retake_lease(
        &self,
        ttl: std::time::Duration,
    ) -> Result<postgres::Lease, StateError> {
        let Some(pg) = &self.pg else {
            return Err(StateError::Postgres(
                "only a master on PostgreSQL holds a lease".into(),
            ));
        };
        let sent = std::time::Instant::now();
        let lease = pg.retake_lease(ttl).await?;
        self.leading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        *self.lease_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(sent + lease_margin(ttl));
        Ok(lease)
    }

    /// The builds this master is to run on from where they are: on SQLite,
    /// every unfinished build (a previous process left them); on
    /// PostgreSQL, those it adopts: the builds of its own earlier leases
    /// (a restart) and of every master whose lease expired.
    pub async fn builds_to_resume(&self) -> Result<Vec<BuildRecord>, StateError> {
        let Some(pg) = &self.pg else {
            return self.unfinished_builds().await;
        };
        let adopted = pg.adopt_own_and_orphans().await?;
        let mut builds = Vec::with_capacity(adopted.len());
        for id in adopted {
            if let Some(b) = pg.build(id).await? {
                builds.push(b);
            }
        }
        Ok(builds)
    }

    /// Wake-ups from the other masters sharing the database (PostgreSQL);
    /// `None` on SQLite, where this master is alone.
    pub async fn wakeups(&self) -> Result<Option<postgres::Wakeups>, StateError> {
        match &self.pg {
            None => Ok(None),
            Some(pg) => pg.listen().await.map(Some),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The log files.
    pub fn log_files(&self) -> &Arc<logs::LogFiles> {
        &self.logs
    }

    /// Sends what goes wrong with steps' logs (see
    /// [`logs::LogFiles::append`]) to `tx` from now on.
    pub fn on_log_trouble(&self, tx: tokio::sync::mpsc::UnboundedSender<logs::LogTrouble>) {
        *self.log_troubles.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    }

    /// Tells of log troubles.
    pub(crate) fn tell_log_troubles(&self, troubles: Vec<logs::LogTrouble>) {
        if troubles.is_empty() {
            return;
        }
        if let Some(tx) = &*self.log_troubles.lock().unwrap_or_else(|e| e.into_inner()) {
            for t in troubles {
                let _ = tx.send(t);
            }
        }
    }

    /// Runs blocking work on the log files, off the async runtime.
    pub(crate) async fn on_logs<T: Send + 'static>(
        &self,
        f: impl FnOnce(&logs::LogFiles) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, StateError> {
        let logs = self.logs.clone();
        tokio::task::spawn_blocking(move || f(&logs))
            .await
            .map_err(|_| StateError::WriterGone)?
            .map_err(StateError::Logs)
    }

    /// Runs a write on the writer thread, in its own savepoint inside the
    /// next group commit; answers once it is durable (or failed, with
    /// nothing of it left behind).
    pub async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StateError> {
        match &self.sqlite {
            Some(db) => db.write(f).await,
            None => Err(StateError::SqliteOnly),
        }
    }

    /// Compresses the logs of these ended steps, one at a time, in the
    /// background (see [`logs`]); a log that cannot be compressed stays
    /// readable as it is.
    pub(crate) fn compress_later(&self, rows: Vec<i64>) {
        let (logs, permits, db, pg) = (
            self.logs.clone(),
            self.compressing.clone(),
            self.sqlite.clone(),
            self.pg.clone(),
        );
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            for row in rows {
                let Ok(_permit) = permits.acquire().await else {
                    return;
                };
                let l = logs.clone();
                match tokio::task::spawn_blocking(move || l.compress(row)).await {
                    Ok(Ok(())) => {
                        let marked = match (&pg, &db) {
                            (Some(pg), _) => {
                                pg.set_log_storage(vec![row], LogStorage::Compressed).await
                            }
                            (None, Some(db)) => {
                                db.set_log_storage(vec![row], LogStorage::Compressed).await
                            }
                            (None, None) => Err(StateError::SqliteOnly),
                        };
                        if let Err(e) = marked {
                            tracing::warn!(step = row, error = %e, "cannot record a compressed log");
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(step = row, error = %e, "cannot compress a step's log; it stays readable uncompressed")
                    }
                    Err(_) => return,
                }
            }
        });
    }

    /// Compresses the logs of steps that ended while the master was not
    /// there to (it stopped or died first), in the background.
    ///
    /// On a shared database, each master compresses the logs of the steps
    /// it ends; what a master left when it died (its lease expired) is
    /// compressed by the master leading `compression`, and never a log of
    /// a build whose master's lease is live (that master may be
    /// compressing it right now).
    pub async fn compress_ended_logs(&self) -> Result<usize, StateError> {
        if let Some(pg) = &self.pg {
            if !self.leads("compression").await {
                return Ok(0);
            }
            let rows = pg.orphaned_logs_to_compress().await?;
            let n = rows.len();
            self.compress_later(rows);
            return Ok(n);
        }
        let rows = self.ended_logs_stored_as(LogStorage::File).await?;
        let n = rows.len();
        self.compress_later(rows);
        Ok(n)
    }

    /// Runs a read on the reader connection (off the async runtime).
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StateError> {
        match &self.sqlite {
            Some(db) => db.read(f).await,
            None => Err(StateError::SqliteOnly),
        }
    }

    /// A 32-byte secret that belongs to this master and survives restarts,
    /// made at random the first time it is asked for under `name`.
    pub async fn secret(&self, name: &str) -> Result<[u8; 32], StateError> {
        if let Some(pg) = &self.pg {
            return pg.secret(name).await;
        }
        let db = self.sqlite.as_ref().ok_or(StateError::SqliteOnly)?;
        db.read_now(|conn| sqlite::rows::secret(conn, name))
    }

    /// One change by id.
    pub async fn change(&self, id: i64) -> Result<Option<StoredChange>, StateError> {
        self.db()?.change(id).await
    }

    /// Changes with ids above `after`, oldest first, at most `limit`.
    pub async fn changes_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredChange>, StateError> {
        self.db()?.changes_after(after, limit).await
    }

    /// The newest changes (below id `before`, if given), newest first,
    /// each with the ids of the builds made for it.
    pub async fn recent_changes(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(StoredChange, Vec<i64>)>, StateError> {
        match &self.pg {
            Some(pg) => pg.recent_changes(before, limit).await,
            None => self.sqlite_db()?.recent_changes(before, limit).await,
        }
    }

    /// How many changes are stored.
    pub async fn change_count(&self) -> Result<i64, StateError> {
        self.db()?.change_count().await
    }
}

#[async_trait]
impl ChangeStore for StateDb {
    async fn add_changes(&self, batch: Vec<NewChange>) -> Result<Vec<i64>, StateError> {
        self.db()?.add_changes(batch).await
    }

    async fn add_changes_keyed(
        &self,
        key: (String, String),
        batch: Vec<NewChange>,
    ) -> Result<(Vec<i64>, bool), StateError> {
        self.db()?.add_changes_keyed(key, batch).await
    }
}

#[async_trait]
impl RequestQueue for StateDb {
    async fn add_requests(&self, requests: Vec<NewRequest>) -> Result<Vec<i64>, StateError> {
        StateDb::add_requests(self, requests).await
    }

    async fn waiting_requests(&self) -> Result<Vec<BuildRequest>, StateError> {
        StateDb::waiting_requests(self).await
    }

    async fn claim_next(
        &self,
        builders: &[String],
        worker: &str,
    ) -> Result<Option<ClaimedRequest>, StateError> {
        StateDb::claim_next(self, builders, worker).await
    }
}

#[async_trait]
impl ChangeReader for StateDb {
    async fn change(&self, id: i64) -> Result<Option<StoredChange>, StateError> {
        StateDb::change(self, id).await
    }

    async fn changes_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredChange>, StateError> {
        StateDb::changes_after(self, after, limit).await
    }

    async fn change_count(&self) -> Result<i64, StateError> {
        StateDb::change_count(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::params;

    /// Two masters' states on one PostgreSQL database: each job is led by
    /// one of them, and asking again (from what a master remembers, or the
    /// database) gives the same answer.
    #[tokio::test]
    async fn on_postgresql_one_master_leads_each_job() {
        let db = suite::TempPg::new().await;
        let dir = tempfile::tempdir().unwrap();
        let ttl = std::time::Duration::from_secs(10);
        let a = StateDb::open_postgres(&db.url, dir.path(), "a", ttl)
            .await
            .unwrap();
        let b = StateDb::open_postgres(&db.url, dir.path(), "b", ttl)
            .await
            .unwrap();
        assert!(a.leads("pollers").await);
        assert!(!b.leads("pollers").await);
        assert!(b.leads("retention").await);
        assert!(!a.leads("retention").await);
        for _ in 0..3 {
            assert!(a.leads("pollers").await && b.leads("retention").await);
            assert!(!b.leads("pollers").await && !a.leads("retention").await);
        }
        drop((a, b));
        db.drop_database().await;
    }

    /// A master that died after a step ended but before compressing its
    /// log (its lease expired) leaves it plain: the master leading
    /// `compression` compresses it; a live master's plain logs are left to
    /// that master.
    #[tokio::test]
    async fn on_postgresql_logs_a_dead_master_left_plain_are_compressed_by_the_leader() {
        let db = suite::TempPg::new().await;
        let dir = tempfile::tempdir().unwrap();
        let short = std::time::Duration::from_millis(400);
        let dead = StateDb::open_postgres(&db.url, dir.path(), "dead", short)
            .await
            .unwrap();
        let leader = StateDb::open_postgres(&db.url, dir.path(), "leader", 10 * short)
            .await
            .unwrap();
        dead.add_requests(vec![NewRequest {
            builder: "b".into(),
            reason: "compress".into(),
            ..Default::default()
        }])
        .await
        .unwrap();
        let claimed = dead.claim_next(&["b".into()], "w").await.unwrap().unwrap();
        let row = dead
            .start_step(
                claimed.build,
                0,
                "s",
                1,
                StepId::random(),
                "fail",
                Vec::new(),
            )
            .await
            .unwrap();
        let chunk = LogChunk {
            step: row,
            seq: 1,
            stream: 1,
            data: "kept\n".repeat(50_000).into(),
        };
        dead.append_logs(vec![chunk]).await.unwrap();
        // Its end recorded, and then the master is gone.
        dead.record_step_end(
            StepEndRecord::new(row, Outcome::Success, ""),
            LogSize::default(),
        )
        .await
        .unwrap();
        assert_eq!(
            leader.compress_ended_logs().await.unwrap(),
            0,
            "its master is alive"
        );
        tokio::time::sleep(short + std::time::Duration::from_millis(200)).await;
        assert_eq!(leader.compress_ended_logs().await.unwrap(), 1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let b = leader.build(claimed.build).await.unwrap().unwrap();
            if b.steps[0].log_stored == LogStorage::Compressed {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "not compressed");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let page = leader.log_page(row, 0, usize::MAX).await.unwrap();
        let text: Vec<u8> = page.iter().flat_map(|c| c.data.iter().copied()).collect();
        assert_eq!(text, "kept\n".repeat(50_000).into_bytes());
        drop((dead, leader));
        db.drop_database().await;
    }

    /// The store suite, against a SQLite file in a temporary directory.
    #[tokio::test]
    async fn the_store_suite_passes_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(StateDb::open(&dir.path().join("state.sqlite")).unwrap());
        suite::changes(&db).await;
        suite::builds(&*db).await;
        suite::requests(&[db.clone(), db.clone()]).await;
        suite::timers(&[db.clone(), db]).await;
    }

    #[tokio::test]
    async fn stores_reads_back_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let change = NewChange {
            repository: "https://example.org/repo.git".into(),
            branch: "main".into(),
            files: vec!["a.c".into(), "b/c.h".into()],
            when: Some((1_700_000_000, 5)),
            properties: [("k".to_string(), "v".to_string())].into(),
            ..Default::default()
        };
        let secret;
        {
            let db = StateDb::open(&path).unwrap();
            let ids = db
                .add_changes(vec![change.clone(), change.clone()])
                .await
                .unwrap();
            assert_eq!(ids.len(), 2);
            assert!(ids[1] > ids[0]);
            secret = db.secret("mock").await.unwrap();
            assert_eq!(db.secret("mock").await.unwrap(), secret);
        }
        let db = StateDb::open(&path).unwrap();
        let all = db.changes_after(0, 10).await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].change, change);
        assert_eq!(db.secret("mock").await.unwrap(), secret);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = StateDb::open(&path).err().unwrap().to_string();
        assert!(err.contains("schema version 99"), "{err}");
    }

    #[tokio::test]
    async fn each_reporter_reads_its_own_queue_past_another_ones_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("state.sqlite")).unwrap();
        db.write(|conn| {
            for build in 1..=10 {
                conn.execute(
                    "INSERT INTO report_outbox (build_id, finished, created_ms) VALUES (?1, 1, 0)",
                    params![build],
                )?;
            }
            Ok(())
        })
        .await
        .unwrap();
        let ids =
            |q: &(Vec<QueuedReport>, _)| -> Vec<i64> { q.0.iter().map(|r| r.build_id).collect() };
        // "slow" keeps failing its first four rows; "fast" delivered them.
        for id in 1..=4 {
            let failing = ReportProgress {
                done: false,
                attempts: 3,
                next_ms: i64::MAX,
                last_error: "HTTP 500".into(),
            };
            db.set_report_progress(id, "slow".into(), failing)
                .await
                .unwrap();
            let done = ReportProgress {
                done: true,
                ..Default::default()
            };
            db.set_report_progress(id, "fast".into(), done)
                .await
                .unwrap();
        }
        // With room for four rows a pass, "fast" still sees the newer ones.
        let slow = db.report_queue("slow".into(), 4).await.unwrap();
        assert_eq!(ids(&slow), [1, 2, 3, 4]);
        assert_eq!(slow.1[&1].last_error, "HTTP 500");
        let fast = db.report_queue("fast".into(), 4).await.unwrap();
        assert_eq!(ids(&fast), [5, 6, 7, 8]);
        assert!(fast.1.is_empty());
        // Rows go once every reporter is done with them.
        db.skip_reports("fast".into(), (5..=10).collect())
            .await
            .unwrap();
        let names = vec!["slow".to_string(), "fast".to_string()];
        assert_eq!(
            db.forget_delivered_reports(names.clone(), 100)
                .await
                .unwrap(),
            0
        );
        db.skip_reports("slow".into(), vec![1, 2, 9]).await.unwrap();
        assert_eq!(db.forget_delivered_reports(names, 100).await.unwrap(), 3);
        assert_eq!(
            ids(&db.report_queue("slow".into(), 100).await.unwrap()),
            [3, 4, 5, 6, 7, 8, 10]
        );
        assert_eq!(
            ids(&db.report_queue("fast".into(), 100).await.unwrap()),
            Vec::<i64>::new()
        );
        // With no reporters left, nothing is kept.
        assert_eq!(
            db.forget_delivered_reports(Vec::new(), 100).await.unwrap(),
            7
        );
    }

    #[tokio::test]
    async fn an_upload_moved_into_place_before_a_crash_is_recorded_when_its_end_comes_again() {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let data = b"artifact bytes\n".to_vec();
        let hex = crate::wire::hex(&sha2::Sha256::digest(&data));
        let said = format!("switchyard: sha256 {hex}, {} bytes\n", data.len());
        let (build, row) = {
            let db = StateDb::open(&path).unwrap();
            let build = db.write(insert_build).await.unwrap();
            let row = db
                .start_step(build, 0, "up", 1, [1; 16].into(), "fail", Vec::new())
                .await
                .unwrap();
            db.expect_upload(build, row, "app".into()).await.unwrap();
            db.append_logs(vec![
                LogChunk {
                    step: row,
                    seq: 1,
                    stream: 1,
                    data: data.clone().into(),
                },
                LogChunk {
                    step: row,
                    seq: 2,
                    stream: 2,
                    data: said.clone().into_bytes().into(),
                },
            ])
            .await
            .unwrap();
            let a = db.publish_artifact(build, row, "app".into()).await.unwrap();
            assert_eq!(a.unwrap().sha256, hex);
            // The master dies here: the step's end is not recorded.
            (build, row)
        };
        let db = StateDb::open(&path).unwrap();
        let a = db
            .publish_artifact(build, row, "app".into())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (a.size, a.sha256.as_str()),
            (data.len() as u64, hex.as_str())
        );
        assert_eq!(std::fs::read(db.artifact_path(build, "app")).unwrap(), data);
        assert_eq!(db.artifacts(build).await.unwrap().len(), 1);
        // Something else in its place is not taken for it.
        std::fs::write(db.artifact_path(build, "app"), b"other").unwrap();
        let why = db
            .publish_artifact(build, row, "app".into())
            .await
            .unwrap()
            .unwrap_err();
        assert!(why.contains("damaged"), "{why}");
    }

    /// A request and its build (builder `b`, worker `w`); the build's id.
    fn insert_build(c: &Connection) -> rusqlite::Result<i64> {
        c.execute(
            "INSERT INTO build_requests (builder, reason, repository, branch, revision, created_ms)
             VALUES ('b', 'r', 'repo', 'main', 'abc', 0)",
            [],
        )?;
        let request = c.last_insert_rowid();
        c.execute(
            "INSERT INTO builds (request_id, builder, worker, started_ms) VALUES (?1, 'b', 'w', 0)",
            [request],
        )?;
        Ok(c.last_insert_rowid())
    }

    #[tokio::test]
    async fn logs_an_earlier_master_kept_in_the_database_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        // What a master before schema 8 left: a build with an ended step
        // and a running one, their output in `log_chunks`.
        let (ended, running) = {
            let db = StateDb::open(&path).unwrap();
            db.write(|c| {
                let build = insert_build(c)?;
                let mut rows = Vec::new();
                for (position, finished) in [(0, Some(1i64)), (1, None)] {
                    c.execute(
                        "INSERT INTO steps (build_id, position, name, attempt, step_id, on_lost, started_ms, finished_ms)
                         VALUES (?1, ?2, 's', 1, ?3, 'fail', 0, ?4)",
                        params![build, position, vec![position as u8; 16], finished],
                    )?;
                    let row = c.last_insert_rowid();
                    for seq in 1..=3i64 {
                        c.execute(
                            "INSERT INTO log_chunks (step, seq, stream, data) VALUES (?1, ?2, 1, ?3)",
                            params![row, seq, format!("{position}-{seq}\n").into_bytes()],
                        )?;
                    }
                    rows.push(row);
                }
                Ok((rows[0], rows[1]))
            })
            .await
            .unwrap()
        };
        let db = StateDb::open(&path).unwrap();
        let text = |chunks: Vec<LogChunk>| {
            chunks
                .iter()
                .map(|c| String::from_utf8_lossy(&c.data).into_owned())
                .collect::<String>()
        };
        // The ended step's log is read where it is.
        assert_eq!(
            text(db.log_page(ended, 0, 1 << 20).await.unwrap()),
            "0-1\n0-2\n0-3\n"
        );
        assert!(db.log_files().reader(ended).unwrap().is_none());
        // The running step's log moved to its file at start, and goes on
        // there (a replay of chunk 3 is stored once).
        assert!(db.log_files().reader(running).unwrap().is_some());
        let left: i64 = db
            .read(move |c| {
                c.query_row(
                    "SELECT COUNT(*) FROM log_chunks WHERE step = ?1",
                    [running],
                    |r| r.get(0),
                )
            })
            .await
            .unwrap();
        assert_eq!(left, 0);
        db.append_logs(vec![
            LogChunk {
                step: running,
                seq: 3,
                stream: 1,
                data: "1-3\n".into(),
            },
            LogChunk {
                step: running,
                seq: 4,
                stream: 1,
                data: "1-4\n".into(),
            },
        ])
        .await
        .unwrap();
        assert_eq!(
            text(db.log_page(running, 0, 1 << 20).await.unwrap()),
            "1-1\n1-2\n1-3\n1-4\n"
        );
        assert_eq!(db.log_seek(running, 9).await.unwrap(), (2, 8));
        assert_eq!(db.log_seek(ended, 9).await.unwrap(), (2, 8));
        let build: i64 = db
            .read(move |c| {
                c.query_row("SELECT build_id FROM steps WHERE id = ?1", [ended], |r| {
                    r.get(0)
                })
            })
            .await
            .unwrap();
        let tails = db.log_tails(build, 2, 1 << 20).await.unwrap();
        assert_eq!(tails.len(), 2);
        assert_eq!(tails[0].data, "0-2\n0-3\n");
        assert_eq!(
            (tails[1].data.as_ref(), tails[1].end),
            (&b"1-3\n1-4\n"[..], 16)
        );
        let sizes = db.log_sizes(build).await.unwrap();
        assert_eq!((sizes[&ended], sizes[&running]), (12, 16));
    }

    #[tokio::test]
    async fn logs_of_steps_that_ended_before_a_restart_are_compressed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let row = {
            let db = StateDb::open(&path).unwrap();
            let row = db
                .write(|c| {
                    let build = insert_build(c)?;
                    // Ended, its log still plain: the master died before
                    // compressing it.
                    c.execute(
                        "INSERT INTO steps (build_id, position, name, attempt, step_id, on_lost, started_ms, finished_ms, log_stored)
                         VALUES (?1, 0, 's', 1, ?2, 'fail', 0, 1, 'file')",
                        params![build, vec![7u8; 16]],
                    )?;
                    Ok(c.last_insert_rowid())
                })
                .await
                .unwrap();
            let chunk = LogChunk {
                step: row,
                seq: 1,
                stream: 1,
                data: "kept\n".repeat(50_000).into(),
            };
            db.append_logs(vec![chunk]).await.unwrap();
            row
        };
        let db = StateDb::open(&path).unwrap();
        assert_eq!(db.compress_ended_logs().await.unwrap(), 1);
        let stored = || async {
            db.read(move |c| {
                c.query_row("SELECT log_stored FROM steps WHERE id = ?1", [row], |r| {
                    r.get::<_, String>(0)
                })
            })
            .await
            .unwrap()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stored().await != "compressed" {
            assert!(std::time::Instant::now() < deadline, "not compressed");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let logs = dir.path().join("logs/0");
        assert!(logs.join(format!("{row}.zst")).exists());
        assert!(!logs.join(format!("{row}.log")).exists());
        let page = db.log_page(row, 0, usize::MAX).await.unwrap();
        let text: Vec<u8> = page.iter().flat_map(|c| c.data.iter().copied()).collect();
        assert_eq!(text, "kept\n".repeat(50_000).as_bytes());
        assert_eq!(db.compress_ended_logs().await.unwrap(), 0);
    }
}
