//! The SQLite backend's request queue, changes (pushed, by webhook,
//! polled), artifacts' records and the overviews the web UI reads: the
//! SQL behind the [`crate::store::StateDb`] operations of the same names.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, params};

use super::SqliteDb;
use super::rows::*;
use crate::store::builds::DELIVERY_MEMORY;
use crate::store::records::*;
use crate::store::{ClaimedRequest, Outcome, StateError, now_ms};
use crate::wire::StepId;

impl SqliteDb {
    /// See [`crate::store::StateDb::add_requests`].
    pub(in crate::store) async fn add_requests(
        &self,
        requests: Vec<NewRequest>,
    ) -> Result<Vec<i64>, StateError> {
        self.write(move |conn| insert_requests(conn, &requests, &[]))
            .await
    }

    /// See [`crate::store::StateDb::waiting_requests`].
    pub(in crate::store) async fn waiting_requests(&self) -> Result<Vec<BuildRequest>, StateError> {
        self.read(|conn| {
            conn.prepare_cached(&format!(
                "SELECT {REQUEST_COLUMNS} FROM build_requests WHERE build_id IS NULL ORDER BY id"
            ))?
            .query_map([], request_row)?
            .collect()
        })
        .await
    }

    /// See [`crate::store::StateDb::claim`].
    pub(in crate::store) async fn claim<T: Send + 'static>(
        &self,
        request: i64,
        merged: Vec<i64>,
        worker: &str,
        first_step: Option<(String, String, StepId)>,
        make: impl FnOnce(ClaimedBuild<'_>) -> (T, Vec<PropertyRow>) + Send + 'static,
    ) -> Result<Option<Claim<T>>, StateError> {
        let worker = worker.to_string();
        self.write(move |conn| claim_in(conn, request, &merged, &worker, first_step, make))
            .await
    }

    /// See [`crate::store::StateDb::claim_next`].
    pub(in crate::store) async fn claim_next(
        &self,
        builders: &[String],
        worker: &str,
    ) -> Result<Option<ClaimedRequest>, StateError> {
        let (builders, worker) = (builders.to_vec(), worker.to_string());
        self.write(move |conn| {
            let list = serde_json::to_string(&builders).unwrap_or_else(|_| "[]".into());
            let next: Option<i64> = conn
                .prepare_cached(
                    "SELECT id FROM build_requests WHERE build_id IS NULL AND not_before_ms <= ?1
                     AND builder IN (SELECT value FROM json_each(?2)) ORDER BY id LIMIT 1",
                )?
                .query_row(params![now_ms(), list], |r| r.get(0))
                .optional()?;
            let Some(id) = next else {
                return Ok(None);
            };
            let request = load_request(conn, id)?;
            Ok(
                claim_in(conn, id, &[], &worker, None, |b| (b.number, Vec::new()))?.map(|c| {
                    ClaimedRequest {
                        request,
                        build: c.build,
                        number: c.kept,
                    }
                }),
            )
        })
        .await
    }

    /// See [`crate::store::StateDb::add_changes_requesting`].
    pub(in crate::store) async fn add_changes_requesting(
        &self,
        batch: Vec<crate::store::NewChange>,
        requests_for: impl FnOnce(&[i64], &[crate::store::NewChange]) -> Vec<NewRequest>
        + Send
        + 'static,
    ) -> Result<(Vec<i64>, Vec<i64>), StateError> {
        self.write(move |conn| {
            let (ids, made) = store_changes(conn, &batch, requests_for)?;
            Ok((ids, made))
        })
        .await
    }

    /// See [`crate::store::StateDb::add_changes_once`].
    pub(in crate::store) async fn add_changes_once(
        &self,
        delivery: (String, String),
        batch: Vec<crate::store::NewChange>,
        requests_for: impl FnOnce(&[i64], &[crate::store::NewChange]) -> Vec<NewRequest>
        + Send
        + 'static,
    ) -> Result<(Vec<i64>, Vec<i64>, bool), StateError> {
        self.write(move |conn| {
            let (hook, id) = delivery;
            let seen: Option<String> = conn
                .query_row(
                    "SELECT changes FROM webhook_deliveries WHERE hook = ?1 AND delivery = ?2",
                    params![hook, id],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(seen) = seen {
                let ids = seen
                    .split(',')
                    .filter_map(|i| i.parse().ok())
                    .collect();
                return Ok((ids, Vec::new(), true));
            }
            let (ids, made) = store_changes(conn, &batch, requests_for)?;
            let now = crate::store::now_ms();
            let list: Vec<String> = ids.iter().map(i64::to_string).collect();
            conn.execute(
                "INSERT INTO webhook_deliveries (hook, delivery, received_ms, changes) VALUES (?1, ?2, ?3, ?4)",
                params![hook, id, now, list.join(",")],
            )?;
            conn.execute(
                "DELETE FROM webhook_deliveries WHERE (hook, delivery) IN
                 (SELECT hook, delivery FROM webhook_deliveries WHERE received_ms < ?1 LIMIT 16)",
                params![now - DELIVERY_MEMORY.as_millis() as i64],
            )?;
            Ok((ids, made, false))
        })
        .await
    }

    /// See [`crate::store::StateDb::poller_heads`].
    pub(in crate::store) async fn poller_heads(
        &self,
        repository: &str,
    ) -> Result<Option<BTreeMap<String, String>>, StateError> {
        let repository = repository.to_string();
        self.read(move |conn| {
            let polled: Option<i64> = conn
                .query_row(
                    "SELECT 1 FROM polled_repositories WHERE repository = ?1",
                    params![repository],
                    |r| r.get(0),
                )
                .optional()?;
            if polled.is_none() {
                return Ok(None);
            }
            let mut s = conn.prepare_cached(
                "SELECT branch, revision FROM poller_heads WHERE repository = ?1",
            )?;
            let heads = s
                .query_map(params![repository], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            Ok(Some(heads))
        })
        .await
    }

    /// See [`crate::store::StateDb::add_polled_changes`].
    pub(in crate::store) async fn add_polled_changes(
        &self,
        repository: String,
        heads: BTreeMap<String, String>,
        batch: Vec<crate::store::NewChange>,
        requests_for: impl FnOnce(&[i64], &[crate::store::NewChange]) -> Vec<NewRequest>
        + Send
        + 'static,
    ) -> Result<(Vec<i64>, Vec<i64>), StateError> {
        self.write(move |conn| {
            let (ids, made) = store_changes(conn, &batch, requests_for)?;
            conn.execute(
                "INSERT OR IGNORE INTO polled_repositories (repository) VALUES (?1)",
                params![repository],
            )?;
            conn.execute(
                "DELETE FROM poller_heads WHERE repository = ?1",
                params![repository],
            )?;
            let mut insert = conn.prepare_cached(
                "INSERT INTO poller_heads (repository, branch, revision) VALUES (?1, ?2, ?3)",
            )?;
            for (branch, revision) in &heads {
                insert.execute(params![repository, branch, revision])?;
            }
            Ok((ids, made))
        })
        .await
    }

    /// See [`crate::store::StateDb::latest_change`].
    pub(in crate::store) async fn latest_change(
        &self,
        branch: &str,
        repository: Option<&str>,
    ) -> Result<Option<(i64, String, String)>, StateError> {
        let (branch, repository) = (branch.to_string(), repository.map(str::to_string));
        self.read(move |conn| {
            conn.query_row(
                "SELECT id, repository, revision FROM changes
                 WHERE branch = ?1 AND (?2 IS NULL OR repository = ?2) ORDER BY id DESC LIMIT 1",
                params![branch, repository],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
        })
        .await
    }

    /// See [`crate::store::StateDb::next_due_ms`].
    pub(in crate::store) async fn next_due_ms(&self) -> Result<Option<i64>, StateError> {
        self.read(|conn| {
            conn.query_row(
                "SELECT MIN(not_before_ms) FROM build_requests WHERE build_id IS NULL AND not_before_ms > ?1",
                [now_ms()],
                |r| r.get(0),
            )
        })
        .await
    }

    /// See [`crate::store::StateDb::artifacts`].
    pub(in crate::store) async fn artifacts(
        &self,
        build: i64,
    ) -> Result<Vec<ArtifactRecord>, StateError> {
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT name, size, sha256, tar FROM artifacts WHERE build_id = ?1 ORDER BY name",
            )?
            .query_map([build], |r| {
                Ok(ArtifactRecord {
                    build,
                    name: r.get(0)?,
                    size: r.get::<_, i64>(1)? as u64,
                    sha256: r.get(2)?,
                    tar: r.get(3)?,
                })
            })?
            .collect()
        })
        .await
    }

    /// The newest successful build of `builder` that stored an artifact
    /// `name`.
    pub(in crate::store) async fn latest_success_with(
        &self,
        builder: &str,
        name: &str,
    ) -> Result<Option<i64>, StateError> {
        let (builder, name) = (builder.to_string(), name.to_string());
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT b.id FROM builds b JOIN artifacts a ON a.build_id = b.id AND a.name = ?2
                 WHERE b.builder = ?1 AND b.result = 'success' ORDER BY b.id DESC LIMIT 1",
            )?
            .query_row(params![builder, name], |r| r.get(0))
            .optional()
        })
        .await
    }

    /// See [`crate::store::StateDb::record_download`].
    pub(in crate::store) async fn record_download(
        &self,
        row: i64,
        build: i64,
        name: String,
    ) -> Result<(), StateError> {
        self.write(move |conn| {
            conn.execute(
                "UPDATE steps SET download_build = ?2, download_name = ?3 WHERE id = ?1",
                params![row, build, name],
            )
        })
        .await
        .map(|_| ())
    }

    /// See [`crate::store::StateDb::recorded_download`].
    pub(in crate::store) async fn recorded_download(
        &self,
        row: i64,
    ) -> Result<Option<(i64, String)>, StateError> {
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT download_build, download_name FROM steps WHERE id = ?1 AND download_build IS NOT NULL",
            )?
            .query_row([row], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
        })
        .await
    }

    /// See [`crate::store::StateDb::builder_overview`].
    pub(in crate::store) async fn builder_overview(
        &self,
        builders: Vec<String>,
        per: usize,
    ) -> Result<Vec<BuilderOverview>, StateError> {
        self.read(move |conn| {
            let mut recent = conn.prepare_cached(
                "SELECT id, number, started_ms, finished_ms, result FROM builds
                 WHERE builder = ?1 ORDER BY id DESC LIMIT ?2",
            )?;
            let mut success = conn.prepare_cached(
                "SELECT finished_ms - started_ms FROM builds
                 WHERE builder = ?1 AND result = 'success' ORDER BY id DESC LIMIT 1",
            )?;
            let mut out = Vec::with_capacity(builders.len());
            for name in builders {
                let builds = recent
                    .query_map(params![name, per as i64], |r| {
                        Ok(BuildBrief {
                            id: r.get(0)?,
                            number: r.get::<_, Option<i64>>(1)?.unwrap_or(0),
                            started_ms: r.get(2)?,
                            finished_ms: r.get(3)?,
                            result: outcome_of(r.get(4)?),
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                // Most builders' last success is among their last builds.
                let last_success_ms =
                    match builds.iter().find(|b| b.result == Some(Outcome::Success)) {
                        Some(b) => b.finished_ms.map(|f| f - b.started_ms),
                        None => success
                            .query_row([&name], |r| r.get::<_, Option<i64>>(0))
                            .optional()?
                            .flatten(),
                    };
                out.push(BuilderOverview {
                    name,
                    builds,
                    last_success_ms,
                });
            }
            Ok(out)
        })
        .await
    }

    /// See [`crate::store::StateDb::waiting_counts`].
    pub(in crate::store) async fn waiting_counts(
        &self,
    ) -> Result<std::collections::BTreeMap<String, u64>, StateError> {
        self.read(|conn| {
            conn.prepare_cached("SELECT builder, COUNT(*) FROM build_requests WHERE build_id IS NULL GROUP BY builder")?
                .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
                .collect()
        })
        .await
    }

    /// The size of `build`'s artifacts other than `name`.
    pub(in crate::store) async fn other_artifacts_size(
        &self,
        build: i64,
        name: &str,
    ) -> Result<i64, StateError> {
        let name = name.to_string();
        self.read(move |conn| {
            conn.query_row(
                "SELECT COALESCE(SUM(size), 0) FROM artifacts WHERE build_id = ?1 AND name != ?2",
                params![build, name],
                |r| r.get(0),
            )
        })
        .await
    }

    /// Marks the step of `row` as the upload of artifact `name`.
    pub(in crate::store) async fn set_step_artifact(
        &self,
        row: i64,
        name: &str,
    ) -> Result<(), StateError> {
        let name = name.to_string();
        self.write(move |conn| {
            conn.execute(
                "UPDATE steps SET artifact = ?2 WHERE id = ?1",
                params![row, name],
            )
        })
        .await?;
        Ok(())
    }

    /// Records a stored artifact (in place of one of the same name).
    pub(in crate::store) async fn put_artifact(
        &self,
        a: &ArtifactRecord,
    ) -> Result<(), StateError> {
        let a = a.clone();
        self.write(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO artifacts (build_id, name, size, sha256, created_ms, tar) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![a.build, a.name, a.size as i64, a.sha256, now_ms(), a.tar],
            )
        })
        .await?;
        Ok(())
    }

    /// Deletes a builder's requests, builds, steps and the logs kept in the
    /// database; returns how many builds went, their steps' rows and their
    /// ids (whose files the caller removes).
    pub(in crate::store) async fn delete_builder(
        &self,
        builder: &str,
    ) -> Result<(usize, Vec<i64>, Vec<i64>), StateError> {
        let builder = builder.to_string();
        self.write(move |conn| {
            let ids: Vec<i64> = conn
                .prepare_cached("SELECT id FROM builds WHERE builder = ?1")?
                .query_map([&builder], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let rows: Vec<i64> = conn
                .prepare_cached(
                    "SELECT s.id FROM steps s JOIN builds b ON b.id = s.build_id WHERE b.builder = ?1",
                )?
                .query_map([&builder], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            conn.execute(
                "DELETE FROM log_chunks WHERE step IN
                   (SELECT s.id FROM steps s JOIN builds b ON b.id = s.build_id WHERE b.builder = ?1)",
                [&builder],
            )?;
            conn.execute("DELETE FROM steps WHERE build_id IN (SELECT id FROM builds WHERE builder = ?1)", [&builder])?;
            conn.execute("DELETE FROM build_properties WHERE build_id IN (SELECT id FROM builds WHERE builder = ?1)", [&builder])?;
            let builds = conn.execute("DELETE FROM builds WHERE builder = ?1", [&builder])?;
            conn.execute("DELETE FROM build_requests WHERE builder = ?1", [&builder])?;
            Ok((builds, rows, ids))
        })
        .await
    }

    /// Deletes (at most `limit`) builds that ended before
    /// `ended_before_ms`, with their requests, steps and properties;
    /// returns their ids and their steps' rows (whose files the caller
    /// removes).
    pub(in crate::store) async fn prune_builds(
        &self,
        ended_before_ms: i64,
        limit: usize,
    ) -> Result<(Vec<i64>, Vec<i64>), StateError> {
        self.write(move |conn| {
            let ids: Vec<i64> = conn
                .prepare_cached(
                    "SELECT id FROM builds WHERE finished_ms < ?1 ORDER BY finished_ms LIMIT ?2",
                )?
                .query_map(params![ended_before_ms, limit as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut rows = Vec::new();
            for id in &ids {
                rows.extend(
                    conn.prepare_cached("SELECT id FROM steps WHERE build_id = ?1")?
                        .query_map([id], |r| r.get::<_, i64>(0))?
                        .collect::<rusqlite::Result<Vec<_>>>()?,
                );
                conn.execute("DELETE FROM builds WHERE id = ?1", [id])?;
                conn.execute(
                    "DELETE FROM build_requests WHERE build_id = ?1
                       AND id NOT IN (SELECT request_id FROM builds)",
                    [id],
                )?;
            }
            Ok((ids, rows))
        })
        .await
    }
}
