//! Builds, steps, their log records and the reporters' outbox in
//! PostgreSQL: [`BuildStore`] and [`ReportOutbox`], as the SQLite state
//! keeps them.

use std::collections::HashMap;

use async_trait::async_trait;

use super::{PgState, retrying};
use crate::builds::Outcome;
use crate::store::{
    BuildFilter, BuildRecord, BuildStore, LogSize, LogStorage, PropertyRow, QueuedReport,
    ReportOutbox, ReportProgress, ReportedBuild, StateError, StepEndRecord, StepRecord,
    UndeliveredReport, now_ms,
};
use crate::wire::StepId;

/// 3: steps, build properties, the indexes the web UI reads by, and the
/// reporters' outbox (filled by triggers in the build's own transaction).
pub(super) const MIGRATION_3: &str = "
CREATE TABLE steps (
    id BIGSERIAL PRIMARY KEY,
    build_id BIGINT NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    step_id BYTEA NOT NULL UNIQUE,
    on_lost TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    finished_ms BIGINT,
    result TEXT,
    exit_code INTEGER,
    signal INTEGER,
    detail TEXT NOT NULL DEFAULT '',
    log_stored TEXT NOT NULL DEFAULT 'file',
    log_bytes BIGINT,
    log_lines BIGINT
);
CREATE INDEX steps_by_build ON steps (build_id, position, attempt);
CREATE INDEX steps_log_uncompressed ON steps (id) WHERE log_stored = 'file';
CREATE TABLE build_properties (
    build_id BIGINT NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (build_id, name)
);
CREATE INDEX builds_unfinished ON builds (id) WHERE result IS NULL;
CREATE INDEX builds_by_builder ON builds (builder, id);
CREATE INDEX builds_by_end ON builds (finished_ms) WHERE finished_ms IS NOT NULL;
CREATE INDEX build_requests_by_build ON build_requests (build_id) WHERE build_id IS NOT NULL;
CREATE TABLE report_outbox (
    id BIGSERIAL PRIMARY KEY,
    build_id BIGINT NOT NULL,
    finished BOOLEAN NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE report_progress (
    outbox_id BIGINT NOT NULL,
    reporter TEXT NOT NULL,
    done BOOLEAN NOT NULL,
    attempts BIGINT NOT NULL,
    next_ms BIGINT NOT NULL,
    last_error TEXT NOT NULL,
    PRIMARY KEY (outbox_id, reporter)
);
CREATE FUNCTION switchyard_report_build() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR (NEW.finished_ms IS NOT NULL AND OLD.finished_ms IS NULL) THEN
        INSERT INTO report_outbox (build_id, finished, created_ms)
        VALUES (NEW.id, TG_OP = 'UPDATE', (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER report_build_started AFTER INSERT ON builds
    FOR EACH ROW EXECUTE FUNCTION switchyard_report_build();
CREATE TRIGGER report_build_finished AFTER UPDATE OF finished_ms ON builds
    FOR EACH ROW EXECUTE FUNCTION switchyard_report_build();
";

const BUILD_COLUMNS: &str = "b.id, b.request_id, b.builder, b.worker, r.reason, r.repository, r.branch, r.revision, b.started_ms, b.finished_ms, b.result, b.number";

fn outcome_of(stored: Option<String>) -> Option<Outcome> {
    stored.as_deref().map(Outcome::parse)
}

fn build_row(r: &tokio_postgres::Row) -> BuildRecord {
    BuildRecord {
        id: r.get(0),
        request_id: r.get(1),
        builder: r.get(2),
        worker: r.get(3),
        reason: r.get(4),
        repository: r.get(5),
        branch: r.get(6),
        revision: r.get(7),
        started_ms: r.get(8),
        finished_ms: r.get(9),
        result: outcome_of(r.get(10)),
        number: r.get(11),
        properties: Vec::new(),
        steps: Vec::new(),
    }
}

/// Fills in the steps and properties of `builds`, in two queries.
async fn load_details(
    client: &impl deadpool_postgres::GenericClient,
    builds: &mut [BuildRecord],
) -> Result<(), StateError> {
    if builds.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = builds.iter().map(|b| b.id).collect();
    let at: HashMap<i64, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    for r in client
        .query(
            "SELECT build_id, id, position, name, attempt, step_id, on_lost, started_ms, finished_ms, result,
                    exit_code, signal, detail, log_stored, log_bytes, log_lines
             FROM steps WHERE build_id = ANY($1) ORDER BY build_id, position, attempt",
            &[&ids],
        )
        .await?
    {
        let step_id: Vec<u8> = r.get(5);
        let stored: String = r.get(13);
        let step = StepRecord {
            row: r.get(1),
            position: r.get::<_, i32>(2) as u32,
            name: r.get(3),
            attempt: r.get::<_, i32>(4) as u32,
            step_id: StepId::from_slice(&step_id)
                .ok_or_else(|| StateError::Postgres("a stored step id is not 16 bytes".into()))?,
            on_lost: r.get(6),
            started_ms: r.get(7),
            finished_ms: r.get(8),
            result: outcome_of(r.get(9)),
            exit_code: r.get(10),
            signal: r.get(11),
            detail: r.get(12),
            log_stored: LogStorage::parse(&stored),
            log_bytes: r.get::<_, Option<i64>>(14).map(|n| n as u64),
            log_lines: r.get::<_, Option<i64>>(15).map(|n| n as u64),
        };
        builds[at[&r.get::<_, i64>(0)]].steps.push(step);
    }
    for r in client
        .query(
            "SELECT build_id, name, value, source FROM build_properties
             WHERE build_id = ANY($1) ORDER BY build_id, name",
            &[&ids],
        )
        .await?
    {
        builds[at[&r.get::<_, i64>(0)]]
            .properties
            .push((r.get(1), r.get(2), r.get(3)));
    }
    Ok(())
}

pub(super) async fn store_properties(
    client: &impl deadpool_postgres::GenericClient,
    build: i64,
    properties: &[PropertyRow],
) -> Result<(), StateError> {
    if properties.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = properties.iter().map(|p| p.0.as_str()).collect();
    let values: Vec<&str> = properties.iter().map(|p| p.1.as_str()).collect();
    let sources: Vec<&str> = properties.iter().map(|p| p.2.as_str()).collect();
    client
        .execute(
            "INSERT INTO build_properties (build_id, name, value, source)
             SELECT $1, p.name, p.value, p.source FROM UNNEST($2::TEXT[], $3::TEXT[], $4::TEXT[]) AS p(name, value, source)
             ON CONFLICT (build_id, name) DO UPDATE SET value = EXCLUDED.value, source = EXCLUDED.source",
            &[&build, &names, &values, &sources],
        )
        .await?;
    Ok(())
}

async fn end_build(
    client: &impl deadpool_postgres::GenericClient,
    build: i64,
    result: Outcome,
) -> Result<(), StateError> {
    client
        .execute(
            "UPDATE builds SET finished_ms = $2, result = $3 WHERE id = $1",
            &[&build, &now_ms(), &result.as_str()],
        )
        .await?;
    Ok(())
}

/// Inserts a step attempt's row (its log in a file); its id. Once per
/// step id: done again (a retry after the commit's answer was lost), it
/// finds the row made the first time.
pub(super) async fn insert_step(
    client: &impl deadpool_postgres::GenericClient,
    build: i64,
    position: u32,
    name: &str,
    attempt: u32,
    step_id: StepId,
    on_lost: &str,
) -> Result<i64, StateError> {
    Ok(client
        .query_one(
            "WITH made AS (
                 INSERT INTO steps (build_id, position, name, attempt, step_id, on_lost, started_ms, log_stored)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'file')
                 ON CONFLICT (step_id) DO NOTHING RETURNING id
             )
             SELECT id FROM made UNION ALL SELECT id FROM steps WHERE step_id = $5",
            &[
                &build,
                &(position as i32),
                &name,
                &(attempt as i32),
                &&step_id.as_bytes()[..],
                &on_lost,
                &now_ms(),
            ],
        )
        .await?
        .get(0))
}

#[async_trait]
impl BuildStore for PgState {
    // The four writes below are retried while the database is away (see
    // `retrying`): each is the same whether it ran once or twice.

    async fn start_step(
        &self,
        build: i64,
        position: u32,
        name: &str,
        attempt: u32,
        step_id: StepId,
        on_lost: &str,
        properties: Vec<PropertyRow>,
    ) -> Result<i64, StateError> {
        retrying(|| async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            self.fence(&tx, build).await?;
            store_properties(&tx, build, &properties).await?;
            let row = insert_step(&tx, build, position, name, attempt, step_id, on_lost).await?;
            tx.commit().await?;
            Ok(row)
        })
        .await
    }

    async fn record_step_end(&self, end: StepEndRecord, log: LogSize) -> Result<(), StateError> {
        retrying(|| async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let build: Option<i64> = tx
                .query_opt("SELECT build_id FROM steps WHERE id = $1", &[&end.row])
                .await?
                .map(|r| r.get(0));
            if let Some(build) = build {
                self.fence(&tx, build).await?;
            }
            tx.execute(
                "UPDATE steps SET finished_ms = $2, result = $3, exit_code = $4, signal = $5, detail = $6,
                                  log_bytes = $7, log_lines = $8
                 WHERE id = $1",
                &[
                    &end.row,
                    &now_ms(),
                    &end.result.as_str(),
                    &end.exit_code,
                    &end.signal,
                    &end.detail,
                    &(log.bytes as i64),
                    &(log.lines as i64),
                ],
            )
            .await?;
            if let Some((build, properties, build_result)) = &end.then {
                store_properties(&tx, *build, properties).await?;
                if let Some(result) = build_result {
                    end_build(&tx, *build, *result).await?;
                }
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn finish_build(&self, build: i64, result: Outcome) -> Result<(), StateError> {
        retrying(|| async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            self.fence(&tx, build).await?;
            end_build(&tx, build, result).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn set_build_properties(
        &self,
        build: i64,
        properties: Vec<PropertyRow>,
    ) -> Result<(), StateError> {
        retrying(|| async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            self.fence(&tx, build).await?;
            store_properties(&tx, build, &properties).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn build(&self, id: i64) -> Result<Option<BuildRecord>, StateError> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt(
                &format!(
                    "SELECT {BUILD_COLUMNS} FROM builds b JOIN build_requests r ON r.id = b.request_id WHERE b.id = $1"
                ),
                &[&id],
            )
            .await?
        else {
            return Ok(None);
        };
        let mut builds = [build_row(&row)];
        load_details(&client, &mut builds).await?;
        let [b] = builds;
        Ok(Some(b))
    }

    async fn find_builds(&self, filter: BuildFilter) -> Result<Vec<BuildRecord>, StateError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {BUILD_COLUMNS} FROM builds b JOIN build_requests r ON r.id = b.request_id
                     WHERE ($1::TEXT IS NULL OR b.builder = $1) AND ($2::TEXT IS NULL OR r.branch = $2)
                       AND ($3::TEXT IS NULL OR b.result = $3) AND ($4::BIGINT IS NULL OR b.id < $4)
                     ORDER BY b.id DESC LIMIT $5"
                ),
                &[
                    &filter.builder,
                    &filter.branch,
                    &filter.result.map(Outcome::as_str),
                    &filter.before,
                    &(filter.limit as i64),
                ],
            )
            .await?;
        let mut builds: Vec<BuildRecord> = rows.iter().map(build_row).collect();
        load_details(&client, &mut builds).await?;
        Ok(builds)
    }

    async fn build_by_number(&self, builder: &str, number: i64) -> Result<Option<i64>, StateError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT id FROM builds WHERE builder = $1 AND number = $2",
                &[&builder, &number],
            )
            .await?
            .map(|r| r.get(0)))
    }

    async fn unfinished_builds(&self) -> Result<Vec<BuildRecord>, StateError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {BUILD_COLUMNS} FROM builds b JOIN build_requests r ON r.id = b.request_id
                     WHERE b.result IS NULL ORDER BY b.id"
                ),
                &[],
            )
            .await?;
        let mut builds: Vec<BuildRecord> = rows.iter().map(build_row).collect();
        load_details(&client, &mut builds).await?;
        Ok(builds)
    }

    async fn build_change_ids(&self, build: i64) -> Result<Vec<i64>, StateError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT change_id FROM build_requests WHERE build_id = $1 AND change_id IS NOT NULL ORDER BY change_id",
                &[&build],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn request_build(&self, request: i64) -> Result<Option<i64>, StateError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT build_id FROM build_requests WHERE id = $1",
                &[&request],
            )
            .await?
            .and_then(|r| r.get(0)))
    }

    async fn set_log_storage(&self, rows: Vec<i64>, stored: LogStorage) -> Result<(), StateError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE steps SET log_stored = $2 WHERE id = ANY($1)",
                &[&rows, &stored.as_str()],
            )
            .await?;
        Ok(())
    }

    async fn ended_logs_stored_as(&self, stored: LogStorage) -> Result<Vec<i64>, StateError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT id FROM steps WHERE log_stored = $1 AND finished_ms IS NOT NULL ORDER BY id",
                &[&stored.as_str()],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn logs_to_prune(
        &self,
        ended_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<(i64, LogStorage)>, StateError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT s.id, s.log_stored FROM steps s
                 WHERE s.build_id IN (SELECT id FROM builds WHERE finished_ms < $1)
                   AND s.log_stored != 'pruned'
                 ORDER BY s.id LIMIT $2",
                &[&ended_before_ms, &(limit as i64)],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), LogStorage::parse(r.get(1))))
            .collect())
    }
}

#[async_trait]
impl ReportOutbox for PgState {
    async fn report_queue(
        &self,
        reporter: String,
        limit: usize,
    ) -> Result<(Vec<QueuedReport>, HashMap<i64, ReportProgress>), StateError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT o.id, o.build_id, o.finished, o.created_ms,
                        b.builder, b.number, b.result, r.repository, r.branch, r.revision,
                        p.attempts, p.next_ms, p.last_error
                 FROM report_outbox o
                 LEFT JOIN report_progress p ON p.outbox_id = o.id AND p.reporter = $2
                 LEFT JOIN builds b ON b.id = o.build_id
                 LEFT JOIN build_requests r ON r.id = b.request_id
                 WHERE NOT COALESCE(p.done, FALSE)
                 ORDER BY o.id LIMIT $1",
                &[&(limit as i64), &reporter],
            )
            .await?;
        let mut progress = HashMap::new();
        let queue = rows
            .iter()
            .map(|r| {
                let outbox_id: i64 = r.get(0);
                if let Some(attempts) = r.get::<_, Option<i64>>(10) {
                    progress.insert(
                        outbox_id,
                        ReportProgress {
                            done: false,
                            attempts,
                            next_ms: r.get(11),
                            last_error: r.get(12),
                        },
                    );
                }
                QueuedReport {
                    outbox_id,
                    build_id: r.get(1),
                    finished: r.get(2),
                    created_ms: r.get(3),
                    build: r.get::<_, Option<String>>(4).map(|builder| ReportedBuild {
                        builder,
                        number: r.get(5),
                        result: outcome_of(r.get(6)),
                        repository: r.get::<_, Option<String>>(7).unwrap_or_default(),
                        branch: r.get::<_, Option<String>>(8).unwrap_or_default(),
                        revision: r.get::<_, Option<String>>(9).unwrap_or_default(),
                    }),
                }
            })
            .collect();
        Ok((queue, progress))
    }

    async fn set_report_progress(
        &self,
        outbox_id: i64,
        reporter: String,
        p: ReportProgress,
    ) -> Result<(), StateError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO report_progress (outbox_id, reporter, done, attempts, next_ms, last_error)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (outbox_id, reporter) DO UPDATE SET done = EXCLUDED.done,
                     attempts = EXCLUDED.attempts, next_ms = EXCLUDED.next_ms, last_error = EXCLUDED.last_error",
                &[&outbox_id, &reporter, &p.done, &p.attempts, &p.next_ms, &p.last_error],
            )
            .await?;
        Ok(())
    }

    async fn skip_reports(&self, reporter: String, ids: Vec<i64>) -> Result<(), StateError> {
        if ids.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO report_progress (outbox_id, reporter, done, attempts, next_ms, last_error)
                 SELECT id, $2, TRUE, 0, 0, '' FROM UNNEST($1::BIGINT[]) AS ids(id)
                 ON CONFLICT (outbox_id, reporter) DO UPDATE SET done = TRUE",
                &[&ids, &reporter],
            )
            .await?;
        Ok(())
    }

    async fn forget_delivered_reports(
        &self,
        reporters: Vec<String>,
        limit: usize,
    ) -> Result<usize, StateError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let ids: Vec<i64> = tx
            .query(
                "SELECT o.id FROM report_outbox o
                 WHERE (SELECT COUNT(*) FROM report_progress p
                        WHERE p.outbox_id = o.id AND p.done AND p.reporter = ANY($1)) = $2
                 ORDER BY o.id LIMIT $3",
                &[&reporters, &(reporters.len() as i64), &(limit as i64)],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.execute(
            "DELETE FROM report_progress WHERE outbox_id = ANY($1)",
            &[&ids],
        )
        .await?;
        tx.execute("DELETE FROM report_outbox WHERE id = ANY($1)", &[&ids])
            .await?;
        tx.commit().await?;
        Ok(ids.len())
    }

    async fn undelivered_reports(
        &self,
        limit: usize,
    ) -> Result<Vec<UndeliveredReport>, StateError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT p.reporter, o.build_id, o.finished, o.created_ms, p.attempts, p.next_ms,
                        p.last_error, COALESCE(b.builder, ''), COALESCE(b.number, 0)
                 FROM report_progress p JOIN report_outbox o ON o.id = p.outbox_id
                 LEFT JOIN builds b ON b.id = o.build_id
                 WHERE NOT p.done ORDER BY o.id LIMIT $1",
                &[&(limit as i64)],
            )
            .await?
            .iter()
            .map(|r| UndeliveredReport {
                reporter: r.get(0),
                build_id: r.get(1),
                finished: r.get(2),
                created_ms: r.get(3),
                attempts: r.get(4),
                next_ms: r.get(5),
                last_error: r.get(6),
                builder: r.get(7),
                number: r.get(8),
            })
            .collect())
    }

    async fn undelivered_report_count(&self) -> Result<u64, StateError> {
        let client = self.client().await?;
        let n: i64 = client
            .query_one("SELECT COUNT(*) FROM report_progress WHERE NOT done", &[])
            .await?
            .get(0);
        Ok(n as u64)
    }
}
