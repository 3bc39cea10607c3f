//! The master's state in PostgreSQL: `state = "postgres://USER@HOST/DB"`.
//!
//! Issue 15 grows this to everything the SQLite state keeps; what is here
//! so far: the change log ([`ChangeStore`], pushes once per client key, and
//! [`ChangeReader`]), the request queue ([`RequestQueue`]), builds, steps
//! and where their logs are ([`super::BuildStore`], in `builds`) and the
//! reporters' outbox ([`super::ReportOutbox`]): the same traits
//! [`StateDb`](super::StateDb) implements, run through the same test suite
//! (`store::suite`).
//!
//! Lifecycle: [`PgState::connect`] makes a pool of connections (at most
//! [`POOL_SIZE`]) and brings the schema up to date, under an advisory lock
//! so that masters starting together migrate once; the pool is dropped
//! with the last clone of the state. A connection that broke (the server
//! restarted) is replaced on the next use.
//!
//! Every write is one transaction; PostgreSQL syncs its WAL at commit
//! (`synchronous_commit` as the server is configured), so a change is
//! durable before its RPC returns, as with SQLite. Concurrent pushes each
//! commit on their own connection, and the server groups their syncs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;

mod builds;
mod lease;
mod notify;
mod rest;
pub mod testing;

pub use lease::Lease;
pub use notify::{Relayed, Wakeups};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use super::{
    BuildRequest, ChangeReader, ChangeStore, ClaimedRequest, NewChange, NewRequest, RequestQueue,
    StateError, StoredChange,
};

/// How long a master rides out its database being away (a restart, a
/// failover) before an operation fails: writes a build cannot do without
/// wait this long for the database to come back.
pub const OUTAGE: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs `f` until it does not fail with [`StateError::Unavailable`], for at
/// most [`OUTAGE`], pausing 50 ms, then twice as long each time, up to 1 s.
/// Only for what is safe to do again (no transaction of it committed, or
/// doing it twice is doing it once).
pub(super) async fn retrying<T, F, Fut>(mut f: F) -> Result<T, StateError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StateError>>,
{
    let deadline = tokio::time::Instant::now() + OUTAGE;
    let mut pause = std::time::Duration::from_millis(50);
    let mut told = false;
    loop {
        match f().await {
            Err(StateError::Unavailable(why)) if tokio::time::Instant::now() < deadline => {
                if !told {
                    tracing::warn!(error = %why, "the database is away; trying again");
                    told = true;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
            }
            r => return r,
        }
    }
}

/// Most connections one master holds.
pub const POOL_SIZE: usize = 16;

/// The advisory lock the schema migration runs under (any number no other
/// program on the database uses: "SWYD" in ASCII).
const MIGRATION_LOCK: i64 = 0x5357_5944;

/// Schema migrations; entry `i` takes the schema from version `i` to
/// `i + 1`. The version is kept in `switchyard_schema`.
const MIGRATIONS: &[&str] = &[
    // 1: changes, their files and properties, and the client keys pushes
    // were stored under (so a resent push stores nothing twice).
    "CREATE TABLE changes (
         id BIGSERIAL PRIMARY KEY,
         repository TEXT NOT NULL,
         branch TEXT NOT NULL,
         revision TEXT NOT NULL,
         author TEXT NOT NULL,
         comments TEXT NOT NULL,
         category TEXT NOT NULL,
         project TEXT NOT NULL,
         when_secs BIGINT,
         when_nanos INTEGER,
         received_ms BIGINT NOT NULL
     );
     CREATE TABLE change_files (
         change_id BIGINT NOT NULL REFERENCES changes(id) ON DELETE CASCADE,
         position INTEGER NOT NULL,
         path TEXT NOT NULL,
         PRIMARY KEY (change_id, position)
     );
     CREATE TABLE change_properties (
         change_id BIGINT NOT NULL REFERENCES changes(id) ON DELETE CASCADE,
         name TEXT NOT NULL,
         value TEXT NOT NULL,
         PRIMARY KEY (change_id, name)
     );
     CREATE TABLE change_keys (
         namespace TEXT NOT NULL,
         key TEXT NOT NULL,
         received_ms BIGINT NOT NULL,
         changes BIGINT[] NOT NULL,
         PRIMARY KEY (namespace, key)
     );
     CREATE INDEX change_keys_by_age ON change_keys (received_ms);",
    // 2: build requests, builds, and each builder's last build number.
    "CREATE TABLE build_requests (
         id BIGSERIAL PRIMARY KEY,
         builder TEXT NOT NULL,
         change_id BIGINT REFERENCES changes(id),
         reason TEXT NOT NULL,
         repository TEXT NOT NULL,
         branch TEXT NOT NULL,
         revision TEXT NOT NULL,
         created_ms BIGINT NOT NULL,
         properties TEXT NOT NULL DEFAULT '[]',
         not_before_ms BIGINT NOT NULL DEFAULT 0,
         collapse_key TEXT NOT NULL DEFAULT '',
         build_id BIGINT
     );
     CREATE INDEX build_requests_waiting ON build_requests (id) WHERE build_id IS NULL;
     CREATE TABLE builds (
         id BIGSERIAL PRIMARY KEY,
         request_id BIGINT NOT NULL REFERENCES build_requests(id),
         builder TEXT NOT NULL,
         worker TEXT NOT NULL,
         number BIGINT NOT NULL,
         started_ms BIGINT NOT NULL,
         finished_ms BIGINT,
         result TEXT,
         UNIQUE (builder, number)
     );
     CREATE TABLE builder_numbers (builder TEXT PRIMARY KEY, last BIGINT NOT NULL);",
    builds::MIGRATION_3,
    lease::MIGRATION_4,
    lease::MIGRATION_5,
    rest::MIGRATION_6,
];

/// Whether an error is the database being away (restarting, unreachable,
/// the connection broken) rather than refusing what was asked: worth
/// trying again on a fresh connection.
fn unavailable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(c) => {
            let c = c.code();
            c.starts_with("08") || ["57P01", "57P02", "57P03"].contains(&c)
        }
        None => std::error::Error::source(e)
            .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some()),
    }
}

impl From<tokio_postgres::Error> for StateError {
    fn from(e: tokio_postgres::Error) -> Self {
        if unavailable(&e) {
            // "error connecting to server" says little without its cause.
            let mut why = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                why = format!("{why}: {c}");
                cause = c.source();
            }
            return StateError::Unavailable(why);
        }
        // The server's own message (with its detail) says most.
        match e.as_db_error() {
            Some(db) => StateError::Postgres(match db.detail() {
                Some(d) => format!("{}: {d}", db.message()),
                None => db.message().to_string(),
            }),
            None => StateError::Postgres(e.to_string()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for StateError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            e @ deadpool_postgres::PoolError::Timeout(_) => StateError::Unavailable(e.to_string()),
            e => StateError::Postgres(format!("no connection to the database: {e}")),
        }
    }
}

/// The state in a PostgreSQL database. Cheap to clone (a pool handle).
#[derive(Clone)]
pub struct PgState {
    pool: Pool,
    /// This master's lease, once taken (0: none): builds it claims are its
    /// own, and every write to a build checks it still owns it (see
    /// `lease`). Shared by the state's clones: a master that lost its lease
    /// takes a new one for all of them ([`PgState::retake_lease`]).
    lease: Arc<AtomicI64>,
    /// The name the lease was taken under (see [`PgState::take_lease`]).
    lease_name: Arc<str>,
    /// Which master process relays events (random, one per lease taken
    /// fresh): what it relayed comes back to it and is not news.
    origin: i64,
    /// Where the pool connects, for connections of its own (listening).
    config: tokio_postgres::Config,
    /// The address with any password left out, for messages.
    shown: String,
}

impl std::fmt::Debug for PgState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgState")
            .field("database", &self.shown)
            .finish_non_exhaustive()
    }
}

/// `url` without its password, for messages and logs.
pub fn shown_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    match auth {
        Some(a) => {
            let user = a.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{host}")
        }
        None => url.to_string(),
    }
}

impl PgState {
    /// Connects to `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`) and
    /// brings the schema up to date; a database written by a newer
    /// Switchyard is refused, not changed.
    pub async fn connect(url: &str) -> Result<Self, StateError> {
        let shown = shown_url(url);
        let config: tokio_postgres::Config = url.parse().map_err(|e| {
            StateError::Postgres(format!("{shown} is not a PostgreSQL address: {e}"))
        })?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .build()
            .map_err(|e| StateError::Postgres(format!("{shown}: {e}")))?;
        let state = PgState {
            pool,
            shown,
            lease: Default::default(),
            lease_name: Arc::from(""),
            origin: 0,
            config,
        };
        state.migrate().await.map_err(|e| match e {
            StateError::Postgres(m) => StateError::Postgres(format!("{}: {m}", state.shown)),
            StateError::Unavailable(m) => StateError::Unavailable(format!("{}: {m}", state.shown)),
            e => e,
        })?;
        Ok(state)
    }

    /// A pooled connection; while the database is away (restarting), tried
    /// again with a growing pause for up to [`OUTAGE`].
    pub(super) async fn client(&self) -> Result<deadpool_postgres::Object, StateError> {
        retrying(|| async { Ok(self.pool.get().await?) }).await
    }

    async fn migrate(&self) -> Result<(), StateError> {
        // Not retried: a master that cannot reach its database at start
        // says so at once.
        let mut client = self.pool.get().await.map_err(StateError::from)?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS switchyard_schema (version INTEGER NOT NULL)")
            .await?;
        let found: Option<i32> = tx
            .query_opt("SELECT version FROM switchyard_schema", &[])
            .await?
            .map(|r| r.get(0));
        let found = match found {
            Some(v) => v as usize,
            None => {
                tx.execute("INSERT INTO switchyard_schema (version) VALUES (0)", &[])
                    .await?;
                0
            }
        };
        if found > MIGRATIONS.len() {
            return Err(StateError::TooNew {
                path: self.shown.clone().into(),
                found: found as i64,
                known: MIGRATIONS.len() as i64,
            });
        }
        for m in &MIGRATIONS[found..] {
            tx.batch_execute(m).await?;
        }
        tx.execute(
            "UPDATE switchyard_schema SET version = $1",
            &[&(MIGRATIONS.len() as i32)],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Wakes every listening master when the transaction commits (see
/// `notify`).
pub(super) async fn wake_others(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), StateError> {
    tx.batch_execute(&format!("NOTIFY {}", notify::CHANNEL))
        .await?;
    Ok(())
}

/// Inserts `batch` in the transaction; returns the ids in order.
pub(super) async fn insert_changes(
    tx: &deadpool_postgres::Transaction<'_>,
    batch: &[NewChange],
) -> Result<Vec<i64>, StateError> {
    let received = super::now_ms();
    let change = tx
        .prepare_cached(
            "INSERT INTO changes (repository, branch, revision, author, comments, category, project, when_secs, when_nanos, received_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
        )
        .await?;
    let files = tx
        .prepare_cached(
            "INSERT INTO change_files (change_id, position, path)
             SELECT $1, p.ord::INTEGER - 1, p.path FROM UNNEST($2::TEXT[]) WITH ORDINALITY AS p(path, ord)",
        )
        .await?;
    let props = tx
        .prepare_cached(
            "INSERT INTO change_properties (change_id, name, value)
             SELECT $1, p.name, p.value FROM UNNEST($2::TEXT[], $3::TEXT[]) AS p(name, value)",
        )
        .await?;
    let mut ids = Vec::with_capacity(batch.len());
    for c in batch {
        let id: i64 = tx
            .query_one(
                &change,
                &[
                    &c.repository,
                    &c.branch,
                    &c.revision,
                    &c.author,
                    &c.comments,
                    &c.category,
                    &c.project,
                    &c.when.map(|w| w.0),
                    &c.when.map(|w| w.1),
                    &received,
                ],
            )
            .await?
            .get(0);
        if !c.files.is_empty() {
            tx.execute(&files, &[&id, &c.files]).await?;
        }
        if !c.properties.is_empty() {
            let names: Vec<&String> = c.properties.keys().collect();
            let values: Vec<&String> = c.properties.values().collect();
            tx.execute(&props, &[&id, &names, &values]).await?;
        }
        ids.push(id);
    }
    Ok(ids)
}

#[async_trait]
impl ChangeStore for PgState {
    async fn add_changes(&self, batch: Vec<NewChange>) -> Result<Vec<i64>, StateError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let ids = insert_changes(&tx, &batch).await?;
        wake_others(&tx).await?;
        tx.commit().await?;
        Ok(ids)
    }

    async fn add_changes_keyed(
        &self,
        key: (String, String),
        batch: Vec<NewChange>,
    ) -> Result<(Vec<i64>, bool), StateError> {
        let (namespace, key) = key;
        let now = super::now_ms();
        let forgotten = now - super::builds::DELIVERY_MEMORY.as_millis() as i64;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // A key older than the memory is forgotten: its push is new.
        tx.execute(
            "DELETE FROM change_keys WHERE namespace = $1 AND key = $2 AND received_ms < $3",
            &[&namespace, &key, &forgotten],
        )
        .await?;
        // Claims the key; a push with the same key in flight on another
        // connection (another master) makes this wait for it, then find
        // its row.
        let claimed = tx
            .execute(
                "INSERT INTO change_keys (namespace, key, received_ms, changes) VALUES ($1, $2, $3, '{}')
                 ON CONFLICT (namespace, key) DO NOTHING",
                &[&namespace, &key, &now],
            )
            .await?;
        if claimed == 0 {
            let ids: Vec<i64> = tx
                .query_one(
                    "SELECT changes FROM change_keys WHERE namespace = $1 AND key = $2",
                    &[&namespace, &key],
                )
                .await?
                .get(0);
            tx.commit().await?;
            return Ok((ids, true));
        }
        let ids = insert_changes(&tx, &batch).await?;
        wake_others(&tx).await?;
        tx.execute(
            "UPDATE change_keys SET changes = $3 WHERE namespace = $1 AND key = $2",
            &[&namespace, &key, &ids],
        )
        .await?;
        // A few expired keys go with each push: never one huge delete.
        tx.execute(
            "DELETE FROM change_keys WHERE ctid IN
             (SELECT ctid FROM change_keys WHERE received_ms < $1 LIMIT 16)",
            &[&forgotten],
        )
        .await?;
        tx.commit().await?;
        Ok((ids, false))
    }
}

/// The changes with these ids that exist, in the order asked.
pub(super) async fn load_changes(
    client: &impl deadpool_postgres::GenericClient,
    ids: &[i64],
) -> Result<Vec<StoredChange>, StateError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT id, repository, branch, revision, author, comments, category, project, when_secs, when_nanos, received_ms
             FROM changes WHERE id = ANY($1)",
            &[&ids],
        )
        .await?;
    let mut by_id: BTreeMap<i64, StoredChange> = rows
        .iter()
        .map(|r| {
            let when_secs: Option<i64> = r.get(8);
            let when_nanos: Option<i32> = r.get(9);
            let id: i64 = r.get(0);
            (
                id,
                StoredChange {
                    id,
                    change: NewChange {
                        repository: r.get(1),
                        branch: r.get(2),
                        revision: r.get(3),
                        author: r.get(4),
                        comments: r.get(5),
                        category: r.get(6),
                        project: r.get(7),
                        files: Vec::new(),
                        when: when_secs.map(|s| (s, when_nanos.unwrap_or(0))),
                        properties: BTreeMap::new(),
                    },
                    received_ms: r.get(10),
                },
            )
        })
        .collect();
    for r in client
        .query(
            "SELECT change_id, path FROM change_files WHERE change_id = ANY($1) ORDER BY change_id, position",
            &[&ids],
        )
        .await?
    {
        if let Some(c) = by_id.get_mut(&r.get::<_, i64>(0)) {
            c.change.files.push(r.get(1));
        }
    }
    for r in client
        .query(
            "SELECT change_id, name, value FROM change_properties WHERE change_id = ANY($1)",
            &[&ids],
        )
        .await?
    {
        if let Some(c) = by_id.get_mut(&r.get::<_, i64>(0)) {
            c.change.properties.insert(r.get(1), r.get(2));
        }
    }
    Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
}

#[async_trait]
impl ChangeReader for PgState {
    async fn change(&self, id: i64) -> Result<Option<StoredChange>, StateError> {
        let client = self.client().await?;
        Ok(load_changes(&client, &[id]).await?.pop())
    }

    async fn changes_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredChange>, StateError> {
        let client = self.client().await?;
        let ids: Vec<i64> = client
            .query(
                "SELECT id FROM changes WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after, &(limit as i64)],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        load_changes(&client, &ids).await
    }

    async fn change_count(&self) -> Result<i64, StateError> {
        let client = self.client().await?;
        Ok(client
            .query_one("SELECT COUNT(*) FROM changes", &[])
            .await?
            .get(0))
    }
}

const REQUEST_COLUMNS: &str = "id, builder, change_id, reason, repository, branch, revision, created_ms, properties, not_before_ms, collapse_key";

fn request_row(r: &tokio_postgres::Row) -> BuildRequest {
    let props: String = r.get(8);
    BuildRequest {
        id: r.get(0),
        request: NewRequest {
            builder: r.get(1),
            change_id: r.get(2),
            reason: r.get(3),
            repository: r.get(4),
            branch: r.get(5),
            revision: r.get(6),
            properties: serde_json::from_str(&props).unwrap_or_default(),
            not_before_ms: r.get(9),
            collapse_key: r.get(10),
        },
        created_ms: r.get(7),
    }
}

/// Stores build requests in the transaction (a request with a collapse
/// key pushes back the waiting ones of its group) and wakes the other
/// masters at commit; their ids in order.
pub(super) async fn add_requests_in(
    tx: &deadpool_postgres::Transaction<'_>,
    requests: &[NewRequest],
) -> Result<Vec<i64>, StateError> {
    let now = super::now_ms();
    let insert = tx
        .prepare_cached(
            "INSERT INTO build_requests (builder, change_id, reason, repository, branch, revision, created_ms, properties, not_before_ms, collapse_key)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
        )
        .await?;
    // A tree-stable group waits as long as its newest request.
    let stable = tx
        .prepare_cached(
            "UPDATE build_requests SET not_before_ms = $1
             WHERE build_id IS NULL AND builder = $2 AND branch = $3 AND collapse_key = $4",
        )
        .await?;
    let mut ids = Vec::with_capacity(requests.len());
    for q in requests {
        if !q.collapse_key.is_empty() {
            tx.execute(
                &stable,
                &[&q.not_before_ms, &q.builder, &q.branch, &q.collapse_key],
            )
            .await?;
        }
        let props = serde_json::to_string(&q.properties).unwrap_or_else(|_| "[]".into());
        let id: i64 = tx
            .query_one(
                &insert,
                &[
                    &q.builder,
                    &q.change_id,
                    &q.reason,
                    &q.repository,
                    &q.branch,
                    &q.revision,
                    &now,
                    &props,
                    &q.not_before_ms,
                    &q.collapse_key,
                ],
            )
            .await?
            .get(0);
        ids.push(id);
    }
    wake_others(tx).await?;
    Ok(ids)
}

#[async_trait]
impl RequestQueue for PgState {
    async fn add_requests(&self, requests: Vec<NewRequest>) -> Result<Vec<i64>, StateError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let ids = add_requests_in(&tx, &requests).await?;
        tx.commit().await?;
        Ok(ids)
    }

    async fn waiting_requests(&self) -> Result<Vec<BuildRequest>, StateError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {REQUEST_COLUMNS} FROM build_requests WHERE build_id IS NULL ORDER BY id"),
                &[],
            )
            .await?;
        Ok(rows.iter().map(request_row).collect())
    }

    async fn claim_next(
        &self,
        builders: &[String],
        worker: &str,
    ) -> Result<Option<ClaimedRequest>, StateError> {
        let now = super::now_ms();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        self.check_live(&tx).await?;
        // A request another transaction (this master's or another's) holds
        // is skipped, not waited for: claimers never queue on each other.
        let Some(row) = tx
            .query_opt(
                &format!(
                    "SELECT {REQUEST_COLUMNS} FROM build_requests
                     WHERE build_id IS NULL AND not_before_ms <= $1 AND builder = ANY($2)
                     ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
                ),
                &[&now, &builders],
            )
            .await?
        else {
            return Ok(None);
        };
        let request = request_row(&row);
        let number: i64 = tx
            .query_one(
                "INSERT INTO builder_numbers (builder, last) VALUES ($1, 1)
                 ON CONFLICT (builder) DO UPDATE SET last = builder_numbers.last + 1 RETURNING last",
                &[&request.request.builder],
            )
            .await?
            .get(0);
        let build: i64 = tx
            .query_one(
                "INSERT INTO builds (request_id, builder, worker, number, started_ms, owner) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                &[&request.id, &request.request.builder, &worker, &number, &now, &self.lease().map(|l| l.0)],
            )
            .await?
            .get(0);
        tx.execute(
            "UPDATE build_requests SET build_id = $1 WHERE id = $2",
            &[&build, &request.id],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(ClaimedRequest {
            request,
            build,
            number,
        }))
    }
}

#[async_trait]
impl super::TimerMarks for PgState {
    async fn mark(&self, key: &str) -> Result<Option<i64>, StateError> {
        let client = self.client().await?;
        Ok(client
            .query_opt("SELECT value FROM marks WHERE key = $1", &[&key])
            .await?
            .map(|r| r.get(0)))
    }

    async fn fire(
        &self,
        fired: (String, Option<i64>, i64),
        requests: Vec<NewRequest>,
        marks: Vec<(String, i64)>,
    ) -> Result<Option<Vec<i64>>, StateError> {
        let (key, expected, value) = fired;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // The compare-and-set: a master that read the same mark and fires
        // at the same time waits for this one's row, then finds it moved.
        let moved = match expected {
            None => {
                tx.execute(
                    "INSERT INTO marks (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                    &[&key, &value],
                )
                .await?
            }
            Some(old) => {
                tx.execute(
                    "UPDATE marks SET value = $3 WHERE key = $1 AND value = $2",
                    &[&key, &old, &value],
                )
                .await?
            }
        };
        if moved == 0 {
            return Ok(None);
        }
        for (k, v) in &marks {
            tx.execute(
                "INSERT INTO marks (key, value) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[k, v],
            )
            .await?;
        }
        let ids = add_requests_in(&tx, &requests).await?;
        tx.commit().await?;
        Ok(Some(ids))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_shown_without_their_password() {
        assert_eq!(
            shown_url("postgres://ci:s3cret@db.example:5432/switchyard"),
            "postgres://ci@db.example:5432/switchyard"
        );
        assert_eq!(
            shown_url("postgres://root@127.0.0.1/test"),
            "postgres://root@127.0.0.1/test"
        );
        assert_eq!(shown_url("postgres://h/db"), "postgres://h/db");
    }

    /// The store suite, against a database of its own on the machine's
    /// PostgreSQL server.
    #[tokio::test]
    async fn the_store_suite_passes_on_postgresql() {
        let db = super::super::suite::TempPg::new().await;
        let state = std::sync::Arc::new(PgState::connect(&db.url).await.unwrap());
        super::super::suite::changes(&state).await;
        super::super::suite::builds(&*state).await;
        // A second master on the same database finds the schema in place,
        // and the two share one request queue.
        let again = std::sync::Arc::new(PgState::connect(&db.url).await.unwrap());
        super::super::suite::requests(&[state.clone(), again.clone()]).await;
        super::super::suite::timers(&[state.clone(), again.clone()]).await;
        assert_eq!(
            again.change_count().await.unwrap(),
            state.change_count().await.unwrap()
        );
        drop((state, again));
        db.drop_database().await;
    }

    /// Two masters on one database: a build claimed under A's lease is
    /// A's; B adopts it only once A's lease has expired, and from then on
    /// A's late writes are refused and change nothing, and A cannot renew.
    #[tokio::test]
    async fn a_master_that_lost_its_lease_is_fenced_and_its_builds_adopted() {
        use crate::builds::Outcome;
        use crate::store::{BuildStore, LogSize, StepEndRecord};
        use crate::wire::StepId;
        use std::time::Duration;

        let db = super::super::suite::TempPg::new().await;
        let base = PgState::connect(&db.url).await.unwrap();
        let a = base.take_lease("a", Duration::from_secs(10)).await.unwrap();
        let b = base.take_lease("b", Duration::from_secs(60)).await.unwrap();
        assert_ne!(a.lease(), b.lease());
        a.add_requests(vec![NewRequest {
            builder: "x".into(),
            reason: "lease".into(),
            ..Default::default()
        }])
        .await
        .unwrap();
        let c = a.claim_next(&["x".into()], "w1").await.unwrap().unwrap();
        let row = a
            .start_step(
                c.build,
                0,
                "compile",
                1,
                StepId::random(),
                "fail",
                Vec::new(),
            )
            .await
            .unwrap();
        // While A's lease lives, B adopts nothing and cannot write to A's
        // build.
        assert!(b.adopt_orphans().await.unwrap().is_empty());
        let err = b.finish_build(c.build, Outcome::Failure).await.unwrap_err();
        assert!(matches!(err, StateError::Fenced { .. }), "{err}");
        // A's last renewal, short; then its machine is gone.
        let short = Duration::from_millis(300);
        a.renew_lease(short).await.unwrap();
        tokio::time::sleep(short + Duration::from_millis(200)).await;
        assert_eq!(b.adopt_orphans().await.unwrap(), vec![c.build]);
        // A comes back: nothing it writes lands.
        let late = a
            .record_step_end(
                StepEndRecord::new(row, Outcome::Failure, "late"),
                LogSize::default(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(late, StateError::Fenced { build, .. } if build == c.build),
            "{late}"
        );
        assert!(
            late.to_string().contains("another master adopted it"),
            "{late}"
        );
        let err = a.finish_build(c.build, Outcome::Failure).await.unwrap_err();
        assert!(matches!(err, StateError::Fenced { .. }), "{err}");
        let err = a
            .start_step(c.build, 1, "test", 1, StepId::random(), "fail", Vec::new())
            .await
            .unwrap_err();
        assert!(matches!(err, StateError::Fenced { .. }), "{err}");
        let err = a
            .set_build_properties(c.build, vec![("p".into(), "v".into(), "step".into())])
            .await
            .unwrap_err();
        assert!(matches!(err, StateError::Fenced { .. }), "{err}");
        let err = a.renew_lease(short).await.unwrap_err();
        assert!(matches!(err, StateError::LeaseLost { .. }), "{err}");
        let record = b.build(c.build).await.unwrap().unwrap();
        assert_eq!((record.result, record.steps.len()), (None, 1));
        assert_eq!((record.steps[0].result, record.properties.len()), (None, 0));
        // B, the owner now, finishes it.
        b.record_step_end(
            StepEndRecord::new(row, Outcome::Success, ""),
            LogSize { bytes: 5, lines: 1 },
        )
        .await
        .unwrap();
        b.finish_build(c.build, Outcome::Success).await.unwrap();
        let record = b.build(c.build).await.unwrap().unwrap();
        assert_eq!(record.result, Some(Outcome::Success));
        assert_eq!(record.steps[0].result, Some(Outcome::Success));
        // Jobs that run once across masters: A led the pollers while its
        // lease lived (asked before it expired, below, with a fresh one);
        // once a lease is gone, the next master to ask takes over.
        assert!(
            !a.leads("pollers").await.unwrap(),
            "an expired lease leads nothing"
        );
        assert!(b.leads("pollers").await.unwrap());
        assert!(b.leads("pollers").await.unwrap(), "a leader keeps its job");
        // A restarted takes a new lease, a later epoch, owning nothing.
        let again = base.take_lease("a", Duration::from_secs(10)).await.unwrap();
        assert!(again.lease().unwrap().0 > a.lease().unwrap().0);
        assert!(again.adopt_orphans().await.unwrap().is_empty());
        assert!(
            !again.leads("pollers").await.unwrap(),
            "b's lease lives: b leads"
        );
        assert!(again.leads("pruning").await.unwrap());
        assert!(!b.leads("pruning").await.unwrap());
        // Or A, running on, takes a new lease in place of the lost one:
        // every clone of its state (the master's other parts) is under
        // the new epoch, renews it, and still writes nothing to the build
        // B adopted.
        let part = a.clone();
        let lost = a.lease().unwrap();
        let new = a.retake_lease(Duration::from_secs(10)).await.unwrap();
        assert!(new.0 > again.lease().unwrap().0 && new.0 > lost.0);
        assert_eq!(part.lease(), Some(new));
        part.renew_lease(Duration::from_secs(10)).await.unwrap();
        let err = part
            .set_build_properties(c.build, vec![("p".into(), "v".into(), "step".into())])
            .await
            .unwrap_err();
        assert!(matches!(err, StateError::Fenced { .. }), "{err}");
        assert!(part.adopt_own_and_orphans().await.unwrap().is_empty());
        drop((a, b, again, base, part));
        db.drop_database().await;
    }

    /// A change or a request stored through one master wakes the others;
    /// a listening connection that breaks (the server restarted, or an
    /// operator ended it) comes back, wakes once, and hears writes again.
    #[tokio::test]
    async fn a_write_on_one_master_wakes_the_others() {
        use std::time::Duration;
        let db = super::super::suite::TempPg::new().await;
        let a = PgState::connect(&db.url).await.unwrap();
        let b = PgState::connect(&db.url).await.unwrap();
        let wakeups = b.listen().await.unwrap();
        let woken = async |why: &str| {
            tokio::time::timeout(Duration::from_secs(10), wakeups.woken())
                .await
                .unwrap_or_else(|_| panic!("not woken: {why}"))
        };
        let request = || NewRequest {
            builder: "x".into(),
            reason: "wake".into(),
            ..Default::default()
        };
        a.add_requests(vec![request()]).await.unwrap();
        woken("a request").await;
        a.add_changes(vec![NewChange::default()]).await.unwrap();
        woken("a change").await;
        a.add_changes_keyed(("hook".into(), "k1".into()), vec![NewChange::default()])
            .await
            .unwrap();
        woken("a keyed change").await;
        // Nothing written, nothing to wake for.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), wakeups.woken())
                .await
                .is_err()
        );
        // The listening connection is ended from the server's side.
        let (admin, conn) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
        tokio::spawn(conn);
        let ended: i64 = admin
            .query_one(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = current_database() AND query LIKE 'LISTEN%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(ended, 1);
        woken("listening again").await;
        a.add_requests(vec![request()]).await.unwrap();
        woken("a request after the connection came back").await;
        drop((wakeups, admin, a, b));
        db.drop_database().await;
    }

    /// A database a newer Switchyard wrote is refused, and not changed.
    #[tokio::test]
    async fn refuses_a_newer_schema() {
        let db = super::super::suite::TempPg::new().await;
        let (client, conn) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(
                "CREATE TABLE switchyard_schema (version INTEGER NOT NULL);
                 INSERT INTO switchyard_schema VALUES (99);",
            )
            .await
            .unwrap();
        let err = PgState::connect(&db.url).await.unwrap_err().to_string();
        assert!(err.contains("schema version 99"), "{err}");
        let v: i32 = client
            .query_one("SELECT version FROM switchyard_schema", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, 99);
        drop(client);
        db.drop_database().await;
    }

    /// No server at the address: a clear error naming it, no password.
    #[tokio::test]
    async fn an_unreachable_server_is_a_clear_error() {
        // A port nothing listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("postgres://ci:s3cret@127.0.0.1:{port}/nothing?connect_timeout=5");
        let err = PgState::connect(&url).await.unwrap_err().to_string();
        assert!(
            err.contains(&format!("postgres://ci@127.0.0.1:{port}")),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
    }
}
