//! The rest of what the SQLite state keeps, in PostgreSQL: claims with the
//! build's first step, pushes with their requests, webhook deliveries,
//! pollers' heads, artifacts, the web UI's reads, deletions, and the
//! master's own secrets. Each mirrors the [`StateDb`](crate::store::StateDb)
//! method of the same name, which calls it when the state is PostgreSQL.

use std::collections::{BTreeMap, HashMap};

use super::{PgState, add_requests_in, insert_changes, load_changes, wake_others};
use crate::builds::Outcome;
use crate::store::{
    ArtifactRecord, BuildBrief, BuilderOverview, NewChange, NewRequest, PropertyRow, StateError,
    StoredChange, now_ms,
};
use crate::store::{Claim, ClaimedBuild};
use crate::wire::StepId;

/// 6: artifacts, the step columns uploads and downloads keep, pollers'
/// heads, and the master's own settings (secrets).
pub(super) const MIGRATION_6: &str = "
CREATE TABLE artifacts (
    build_id BIGINT NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    tar BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (build_id, name)
);
ALTER TABLE steps ADD COLUMN artifact TEXT;
ALTER TABLE steps ADD COLUMN download_build BIGINT;
ALTER TABLE steps ADD COLUMN download_name TEXT;
CREATE TABLE polled_repositories (repository TEXT PRIMARY KEY);
CREATE TABLE poller_heads (
    repository TEXT NOT NULL,
    branch TEXT NOT NULL,
    revision TEXT NOT NULL,
    PRIMARY KEY (repository, branch)
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL);
CREATE INDEX build_requests_by_change ON build_requests (change_id) WHERE change_id IS NOT NULL;
";

type RequestsFor = dyn FnOnce(&[i64], &[NewChange]) -> Vec<NewRequest> + Send;

impl PgState {
    /// See [`StateDb::claim`](crate::store::StateDb::claim).
    pub async fn claim<T: Send + 'static>(
        &self,
        request: i64,
        merged: Vec<i64>,
        worker: &str,
        first_step: Option<(String, String, StepId)>,
        make: impl FnOnce(ClaimedBuild<'_>) -> (T, Vec<PropertyRow>) + Send + 'static,
    ) -> Result<Option<Claim<T>>, StateError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        self.check_live(&tx).await?;
        // Held, not skipped: this master chose this request; another
        // holding it means it is being claimed there.
        let Some(row) = tx
            .query_opt(
                "SELECT builder, change_id FROM build_requests WHERE id = $1 AND build_id IS NULL
                 FOR UPDATE SKIP LOCKED",
                &[&request],
            )
            .await?
        else {
            return Ok(None);
        };
        let (builder, change_id): (String, Option<i64>) = (row.get(0), row.get(1));
        let number: i64 = tx
            .query_one(
                "INSERT INTO builder_numbers (builder, last) VALUES ($1, 1)
                 ON CONFLICT (builder) DO UPDATE SET last = builder_numbers.last + 1 RETURNING last",
                &[&builder],
            )
            .await?
            .get(0);
        let build: i64 = tx
            .query_one(
                "INSERT INTO builds (request_id, builder, worker, number, started_ms, owner)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                &[
                    &request,
                    &builder,
                    &worker,
                    &number,
                    &now_ms(),
                    &self.lease().map(|l| l.0),
                ],
            )
            .await?
            .get(0);
        let ids: Vec<i64> = std::iter::once(request).chain(merged).collect();
        tx.execute(
            "UPDATE build_requests SET build_id = $1 WHERE id = ANY($2) AND build_id IS NULL",
            &[&build, &ids],
        )
        .await?;
        let change = match change_id {
            Some(id) => load_changes(&tx, &[id]).await?.pop(),
            None => None,
        };
        let change_ids: Vec<i64> = tx
            .query(
                "SELECT change_id FROM build_requests WHERE build_id = $1 AND change_id IS NOT NULL ORDER BY change_id",
                &[&build],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let (kept, properties) = make(ClaimedBuild {
            build,
            number,
            change: change.as_ref(),
            change_ids: &change_ids,
        });
        super::builds::store_properties(&tx, build, &properties).await?;
        let first_row = match first_step {
            Some((name, on_lost, step_id)) => {
                Some(super::builds::insert_step(&tx, build, 0, &name, 1, step_id, &on_lost).await?)
            }
            None => None,
        };
        tx.commit().await?;
        Ok(Some(Claim {
            build,
            first_row,
            kept,
        }))
    }

    /// See [`StateDb::add_changes_requesting`](crate::store::StateDb::add_changes_requesting).
    pub async fn add_changes_requesting(
        &self,
        batch: Vec<NewChange>,
        requests_for: Box<RequestsFor>,
    ) -> Result<(Vec<i64>, Vec<i64>), StateError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let ids = insert_changes(&tx, &batch).await?;
        let made = add_requests_in(&tx, &requests_for(&ids, &batch)).await?;
        wake_others(&tx).await?;
        tx.commit().await?;
        Ok((ids, made))
    }

    /// See [`StateDb::add_changes_once`](crate::store::StateDb::add_changes_once):
    /// a webhook delivery is a change key in namespace `webhook:HOOK`.
    pub async fn add_changes_once(
        &self,
        delivery: (String, String),
        batch: Vec<NewChange>,
        requests_for: Box<RequestsFor>,
    ) -> Result<(Vec<i64>, Vec<i64>, bool), StateError> {
        let (hook, id) = delivery;
        let namespace = format!("webhook:{hook}");
        let now = now_ms();
        let forgotten = now - crate::store::builds::DELIVERY_MEMORY.as_millis() as i64;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "DELETE FROM change_keys WHERE namespace = $1 AND key = $2 AND received_ms < $3",
            &[&namespace, &id, &forgotten],
        )
        .await?;
        let claimed = tx
            .execute(
                "INSERT INTO change_keys (namespace, key, received_ms, changes) VALUES ($1, $2, $3, '{}')
                 ON CONFLICT (namespace, key) DO NOTHING",
                &[&namespace, &id, &now],
            )
            .await?;
        if claimed == 0 {
            let ids: Vec<i64> = tx
                .query_one(
                    "SELECT changes FROM change_keys WHERE namespace = $1 AND key = $2",
                    &[&namespace, &id],
                )
                .await?
                .get(0);
            tx.commit().await?;
            return Ok((ids, Vec::new(), true));
        }
        let ids = insert_changes(&tx, &batch).await?;
        let made = add_requests_in(&tx, &requests_for(&ids, &batch)).await?;
        tx.execute(
            "UPDATE change_keys SET changes = $3 WHERE namespace = $1 AND key = $2",
            &[&namespace, &id, &ids],
        )
        .await?;
        wake_others(&tx).await?;
        tx.commit().await?;
        Ok((ids, made, false))
    }

    /// See [`StateDb::poller_heads`](crate::store::StateDb::poller_heads).
    pub async fn poller_heads(
        &self,
        repository: &str,
    ) -> Result<Option<BTreeMap<String, String>>, StateError> {
        let client = self.client().await?;
        let polled = client
            .query_opt(
                "SELECT 1 FROM polled_repositories WHERE repository = $1",
                &[&repository],
            )
            .await?;
        if polled.is_none() {
            return Ok(None);
        }
        Ok(Some(
            client
                .query(
                    "SELECT branch, revision FROM poller_heads WHERE repository = $1",
                    &[&repository],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        ))
    }

    /// See [`StateDb::add_polled_changes`](crate::store::StateDb::add_polled_changes).
    pub async fn add_polled_changes(
        &self,
        repository: String,
        heads: BTreeMap<String, String>,
        batch: Vec<NewChange>,
        requests_for: Box<RequestsFor>,
    ) -> Result<(Vec<i64>, Vec<i64>), StateError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let ids = insert_changes(&tx, &batch).await?;
        let made = add_requests_in(&tx, &requests_for(&ids, &batch)).await?;
        tx.execute(
            "INSERT INTO polled_repositories (repository) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&repository],
        )
        .await?;
        tx.execute(
            "DELETE FROM poller_heads WHERE repository = $1",
            &[&repository],
        )
        .await?;
        for (branch, revision) in &heads {
            tx.execute(
                "INSERT INTO poller_heads (repository, branch, revision) VALUES ($1, $2, $3)",
                &[&repository, branch, revision],
            )
            .await?;
        }
        wake_others(&tx).await?;
        tx.commit().await?;
        Ok((ids, made))
    }

    /// See [`StateDb::latest_change`](crate::store::StateDb::latest_change).
    pub async fn latest_change(
        &self,
        branch: &str,
        repository: Option<&str>,
    ) -> Result<Option<(i64, String, String)>, StateError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT id, repository, revision FROM changes
                 WHERE branch = $1 AND ($2::TEXT IS NULL OR repository = $2) ORDER BY id DESC LIMIT 1",
                &[&branch, &repository],
            )
            .await?
            .map(|r| (r.get(0), r.get(1), r.get(2))))
    }

    /// See [`StateDb::next_due_ms`](crate::store::StateDb::next_due_ms).
    pub async fn next_due_ms(&self) -> Result<Option<i64>, StateError> {
        let client = self.client().await?;
        Ok(client
            .query_one(
                "SELECT MIN(not_before_ms) FROM build_requests WHERE build_id IS NULL AND not_before_ms > $1",
                &[&now_ms()],
            )
            .await?
            .get(0))
    }

    /// See [`StateDb::waiting_counts`](crate::store::StateDb::waiting_counts).
    pub async fn waiting_counts(&self) -> Result<BTreeMap<String, u64>, StateError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT builder, COUNT(*) FROM build_requests WHERE build_id IS NULL GROUP BY builder",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    /// See [`StateDb::recent_changes`](crate::store::StateDb::recent_changes).
    pub async fn recent_changes(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(StoredChange, Vec<i64>)>, StateError> {
        let client = self.client().await?;
        let ids: Vec<i64> = client
            .query(
                "SELECT id FROM changes WHERE ($1::BIGINT IS NULL OR id < $1) ORDER BY id DESC LIMIT $2",
                &[&before, &(limit as i64)],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let changes = load_changes(&client, &ids).await?;
        let mut builds: HashMap<i64, Vec<i64>> = HashMap::new();
        for r in client
            .query(
                "SELECT change_id, build_id FROM build_requests
                 WHERE change_id = ANY($1) AND build_id IS NOT NULL ORDER BY build_id",
                &[&ids],
            )
            .await?
        {
            builds.entry(r.get(0)).or_default().push(r.get(1));
        }
        Ok(changes
            .into_iter()
            .map(|c| {
                let b = builds.remove(&c.id).unwrap_or_default();
                (c, b)
            })
            .collect())
    }

    /// See [`StateDb::builder_overview`](crate::store::StateDb::builder_overview).
    pub async fn builder_overview(
        &self,
        builders: Vec<String>,
        per: usize,
    ) -> Result<Vec<BuilderOverview>, StateError> {
        let client = self.client().await?;
        let mut out = Vec::with_capacity(builders.len());
        for name in builders {
            let builds: Vec<BuildBrief> = client
                .query(
                    "SELECT id, number, started_ms, finished_ms, result FROM builds
                     WHERE builder = $1 ORDER BY id DESC LIMIT $2",
                    &[&name, &(per as i64)],
                )
                .await?
                .iter()
                .map(|r| BuildBrief {
                    id: r.get(0),
                    number: r.get(1),
                    started_ms: r.get(2),
                    finished_ms: r.get(3),
                    result: r.get::<_, Option<String>>(4).as_deref().map(Outcome::parse),
                })
                .collect();
            let last_success_ms = match builds.iter().find(|b| b.result == Some(Outcome::Success)) {
                Some(b) => b.finished_ms.map(|f| f - b.started_ms),
                None => client
                    .query_opt(
                        "SELECT finished_ms - started_ms FROM builds
                         WHERE builder = $1 AND result = 'success' ORDER BY id DESC LIMIT 1",
                        &[&name],
                    )
                    .await?
                    .and_then(|r| r.get(0)),
            };
            out.push(BuilderOverview {
                name,
                builds,
                last_success_ms,
            });
        }
        Ok(out)
    }

    /// The rows of a build's step attempts, by position and attempt.
    pub async fn step_rows(&self, build: i64) -> Result<Vec<i64>, StateError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT id FROM steps WHERE build_id = $1 ORDER BY position, attempt",
                &[&build],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Deletes a builder's requests, builds, steps and properties; returns
    /// how many builds went, the step rows and the build ids (whose files
    /// the caller removes).
    pub async fn delete_builder(
        &self,
        builder: &str,
    ) -> Result<(usize, Vec<i64>, Vec<i64>), StateError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let ids: Vec<i64> = tx
            .query("SELECT id FROM builds WHERE builder = $1", &[&builder])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let rows: Vec<i64> = tx
            .query("SELECT id FROM steps WHERE build_id = ANY($1)", &[&ids])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let builds = tx
            .execute("DELETE FROM builds WHERE builder = $1", &[&builder])
            .await? as usize;
        tx.execute("DELETE FROM build_requests WHERE builder = $1", &[&builder])
            .await?;
        tx.commit().await?;
        Ok((builds, rows, ids))
    }

    /// Deletes (at most `limit`) builds that ended before
    /// `ended_before_ms`, with their requests; the build ids and step rows
    /// (whose files the caller removes).
    pub async fn prune_builds(
        &self,
        ended_before_ms: i64,
        limit: usize,
    ) -> Result<(Vec<i64>, Vec<i64>), StateError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let ids: Vec<i64> = tx
            .query(
                "SELECT id FROM builds WHERE finished_ms < $1 ORDER BY finished_ms LIMIT $2",
                &[&ended_before_ms, &(limit as i64)],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let rows: Vec<i64> = tx
            .query("SELECT id FROM steps WHERE build_id = ANY($1)", &[&ids])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.execute("DELETE FROM builds WHERE id = ANY($1)", &[&ids])
            .await?;
        tx.execute(
            "DELETE FROM build_requests WHERE build_id = ANY($1)
               AND id NOT IN (SELECT request_id FROM builds)",
            &[&ids],
        )
        .await?;
        tx.commit().await?;
        Ok((ids, rows))
    }

    /// The size of a build's artifacts other than `name`.
    pub async fn other_artifacts_size(&self, build: i64, name: &str) -> Result<i64, StateError> {
        let client = self.client().await?;
        Ok(client
            .query_one(
                "SELECT COALESCE(SUM(size), 0)::BIGINT FROM artifacts WHERE build_id = $1 AND name != $2",
                &[&build, &name],
            )
            .await?
            .get(0))
    }

    /// Records that the step of `row` uploads the artifact `name`.
    pub async fn set_step_artifact(&self, row: i64, name: &str) -> Result<(), StateError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE steps SET artifact = $2 WHERE id = $1",
                &[&row, &name],
            )
            .await?;
        Ok(())
    }

    /// Step rows still running that upload (their stdout is an artifact).
    pub async fn uploading_rows(&self) -> Result<Vec<i64>, StateError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT id FROM steps WHERE artifact IS NOT NULL AND finished_ms IS NULL",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Stores an artifact's record (replacing one of the same name).
    pub async fn put_artifact(&self, a: &ArtifactRecord) -> Result<(), StateError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO artifacts (build_id, name, size, sha256, created_ms, tar) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (build_id, name) DO UPDATE SET size = EXCLUDED.size, sha256 = EXCLUDED.sha256,
                     created_ms = EXCLUDED.created_ms, tar = EXCLUDED.tar",
                &[&a.build, &a.name, &(a.size as i64), &a.sha256, &now_ms(), &a.tar],
            )
            .await?;
        Ok(())
    }

    /// See [`StateDb::artifacts`](crate::store::StateDb::artifacts).
    pub async fn artifacts(&self, build: i64) -> Result<Vec<ArtifactRecord>, StateError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT name, size, sha256, tar FROM artifacts WHERE build_id = $1 ORDER BY name",
                &[&build],
            )
            .await?
            .iter()
            .map(|r| ArtifactRecord {
                build,
                name: r.get(0),
                size: r.get::<_, i64>(1) as u64,
                sha256: r.get(2),
                tar: r.get(3),
            })
            .collect())
    }

    /// The newest successful build of `builder` that stored an artifact
    /// `name`.
    pub async fn latest_success_with(
        &self,
        builder: &str,
        name: &str,
    ) -> Result<Option<i64>, StateError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT b.id FROM builds b JOIN artifacts a ON a.build_id = b.id AND a.name = $2
                 WHERE b.builder = $1 AND b.result = 'success' ORDER BY b.id DESC LIMIT 1",
                &[&builder, &name],
            )
            .await?
            .map(|r| r.get(0)))
    }

    /// See [`StateDb::record_download`](crate::store::StateDb::record_download).
    pub async fn record_download(
        &self,
        row: i64,
        build: i64,
        name: &str,
    ) -> Result<(), StateError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE steps SET download_build = $2, download_name = $3 WHERE id = $1",
                &[&row, &build, &name],
            )
            .await?;
        Ok(())
    }

    /// See [`StateDb::recorded_download`](crate::store::StateDb::recorded_download).
    pub async fn recorded_download(&self, row: i64) -> Result<Option<(i64, String)>, StateError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT download_build, download_name FROM steps WHERE id = $1 AND download_build IS NOT NULL",
                &[&row],
            )
            .await?
            .map(|r| (r.get(0), r.get(1))))
    }

    /// The unfinished build of another master (not this state's lease) a
    /// step attempt (by its id) belongs to, if any.
    pub async fn others_running_build_of_step(
        &self,
        step_id: &[u8],
    ) -> Result<Option<i64>, StateError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT b.id FROM steps s JOIN builds b ON b.id = s.build_id
                 WHERE s.step_id = $1 AND b.result IS NULL AND b.owner IS DISTINCT FROM $2",
                &[&step_id, &self.lease().map(|l| l.0)],
            )
            .await?
            .map(|r| r.get(0)))
    }

    /// Ended step attempts whose logs are still plain files, of builds no
    /// live lease owns (their master died before compressing them).
    pub async fn orphaned_logs_to_compress(&self) -> Result<Vec<i64>, StateError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT s.id FROM steps s JOIN builds b ON b.id = s.build_id
                 WHERE s.log_stored = 'file' AND s.finished_ms IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM masters m
                                   WHERE m.id = b.owner AND m.expires_at > clock_timestamp())
                 ORDER BY s.id",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// A secret of the master's own (the mock challenges' seed), made once
    /// and shared by every master on the database.
    pub async fn secret(&self, name: &str) -> Result<[u8; 32], StateError> {
        let key = format!("secret:{name}");
        let mut fresh = [0u8; 32];
        rand::fill(&mut fresh[..]);
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                &[&key, &&fresh[..]],
            )
            .await?;
        let v: Vec<u8> = client
            .query_one("SELECT value FROM meta WHERE key = $1", &[&key])
            .await?
            .get(0);
        Ok(<[u8; 32]>::try_from(v).unwrap_or(fresh))
    }
}
