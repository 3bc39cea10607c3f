//! The SQLite backend's builds, steps, logs' places, the reporters'
//! outbox and the timers' marks: the store's traits on [`SqliteDb`].

use std::collections::HashMap;

use rusqlite::{OptionalExtension, params};

use super::SqliteDb;
use super::rows::*;
use crate::builds::events::Outcome;
use crate::store::records::*;
use crate::store::{BuildStore, LogSize, LogStorage, ReportOutbox, StateError, now_ms};
use crate::wire::StepId;

#[async_trait::async_trait]
impl BuildStore for SqliteDb {
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
    ) -> Result<i64, StateError> {
        let (name, on_lost) = (name.to_string(), on_lost.to_string());
        self.write(move |conn| {
            store_properties(conn, build, &properties)?;
            insert_step(conn, build, position, &name, attempt, &step_id, &on_lost)
        })
        .await
    }

    async fn finish_build(&self, build: i64, result: Outcome) -> Result<(), StateError> {
        self.write(move |conn| end_build(conn, build, result)).await
    }

    async fn set_build_properties(
        &self,
        build: i64,
        properties: Vec<PropertyRow>,
    ) -> Result<(), StateError> {
        self.write(move |conn| store_properties(conn, build, &properties))
            .await
    }

    async fn find_builds(&self, filter: BuildFilter) -> Result<Vec<BuildRecord>, StateError> {
        self.read(move |conn| {
            let sql = format!(
                "SELECT {BUILD_COLUMNS} FROM builds b JOIN build_requests r ON r.id = b.request_id
                 WHERE (?1 IS NULL OR b.builder = ?1) AND (?2 IS NULL OR r.branch = ?2)
                   AND (?3 IS NULL OR b.result = ?3) AND (?4 IS NULL OR b.id < ?4)
                 ORDER BY b.id DESC LIMIT ?5"
            );
            let mut builds: Vec<BuildRecord> = conn
                .prepare_cached(&sql)?
                .query_map(
                    params![
                        filter.builder,
                        filter.branch,
                        filter.result.map(Outcome::as_str),
                        filter.before,
                        filter.limit as i64
                    ],
                    build_row,
                )?
                .collect::<rusqlite::Result<_>>()?;
            for b in &mut builds {
                b.steps = load_steps(conn, b.id)?;
                b.properties = load_properties(conn, b.id)?;
            }
            Ok(builds)
        })
        .await
    }

    async fn build_by_number(&self, builder: &str, number: i64) -> Result<Option<i64>, StateError> {
        let builder = builder.to_string();
        self.read(move |conn| {
            conn.query_row(
                "SELECT id FROM builds WHERE builder = ?1 AND number = ?2",
                params![builder, number],
                |r| r.get(0),
            )
            .optional()
        })
        .await
    }

    async fn unfinished_builds(&self) -> Result<Vec<BuildRecord>, StateError> {
        self.read(|conn| {
            let sql = format!(
                "SELECT {BUILD_COLUMNS} FROM builds b JOIN build_requests r ON r.id = b.request_id
                 WHERE b.result IS NULL ORDER BY b.id"
            );
            let mut builds: Vec<BuildRecord> = conn
                .prepare_cached(&sql)?
                .query_map([], build_row)?
                .collect::<rusqlite::Result<_>>()?;
            for b in &mut builds {
                b.steps = load_steps(conn, b.id)?;
                b.properties = load_properties(conn, b.id)?;
            }
            Ok(builds)
        })
        .await
    }

    async fn build(&self, id: i64) -> Result<Option<BuildRecord>, StateError> {
        self.read(move |conn| {
            let sql = format!("SELECT {BUILD_COLUMNS} FROM builds b JOIN build_requests r ON r.id = b.request_id WHERE b.id = ?1");
            let Some(mut b) = conn.prepare_cached(&sql)?.query_row([id], build_row).optional()? else { return Ok(None) };
            b.steps = load_steps(conn, b.id)?;
            b.properties = load_properties(conn, b.id)?;
            Ok(Some(b))
        })
        .await
    }

    async fn build_change_ids(&self, build: i64) -> Result<Vec<i64>, StateError> {
        self.read(move |conn| change_ids_of(conn, build)).await
    }

    async fn request_build(&self, request: i64) -> Result<Option<i64>, StateError> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT build_id FROM build_requests WHERE id = ?1")?
                .query_row([request], |r| r.get::<_, Option<i64>>(0))
                .optional()?
                .flatten())
        })
        .await
    }

    async fn record_step_end(&self, end: StepEndRecord, log: LogSize) -> Result<(), StateError> {
        self.write(move |conn| {
            conn.execute(
                "UPDATE steps SET finished_ms = ?2, result = ?3, exit_code = ?4, signal = ?5, detail = ?6,
                                  log_bytes = ?7, log_lines = ?8
                 WHERE id = ?1",
                params![
                    end.row,
                    now_ms(),
                    end.result.as_str(),
                    end.exit_code,
                    end.signal,
                    end.detail,
                    log.bytes as i64,
                    log.lines as i64
                ],
            )?;
            if let Some((build, properties, build_result)) = &end.then {
                store_properties(conn, *build, properties)?;
                if let Some(result) = build_result {
                    end_build(conn, *build, *result)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn set_log_storage(&self, rows: Vec<i64>, stored: LogStorage) -> Result<(), StateError> {
        self.write(move |conn| {
            let mut mark = conn.prepare_cached("UPDATE steps SET log_stored = ?2 WHERE id = ?1")?;
            for r in &rows {
                mark.execute(params![r, stored.as_str()])?;
            }
            Ok(())
        })
        .await
    }

    async fn ended_logs_stored_as(&self, stored: LogStorage) -> Result<Vec<i64>, StateError> {
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT id FROM steps WHERE log_stored = ?1 AND finished_ms IS NOT NULL ORDER BY id",
            )?
            .query_map([stored.as_str()], |r| r.get(0))?
            .collect()
        })
        .await
    }

    async fn logs_to_prune(
        &self,
        ended_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<(i64, LogStorage)>, StateError> {
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT s.id, s.log_stored FROM steps s
                 WHERE s.build_id IN (SELECT id FROM builds WHERE finished_ms < ?1)
                   AND s.log_stored != 'pruned'
                 ORDER BY s.id LIMIT ?2",
            )?
            .query_map(params![ended_before_ms, limit as i64], |r| {
                Ok((r.get(0)?, LogStorage::parse(&r.get::<_, String>(1)?)))
            })?
            .collect()
        })
        .await
    }
}

#[async_trait::async_trait]
impl ReportOutbox for SqliteDb {
    async fn report_queue(
        &self,
        reporter: String,
        limit: usize,
    ) -> Result<(Vec<QueuedReport>, HashMap<i64, ReportProgress>), StateError> {
        self.read(move |conn| {
            let mut s = conn.prepare_cached(
                "SELECT o.id, o.build_id, o.finished, o.created_ms,
                        b.builder, COALESCE(b.number, 0), b.result, r.repository, r.branch, r.revision,
                        p.attempts, p.next_ms, p.last_error
                 FROM report_outbox o
                 LEFT JOIN report_progress p ON p.outbox_id = o.id AND p.reporter = ?2
                 LEFT JOIN builds b ON b.id = o.build_id
                 LEFT JOIN build_requests r ON r.id = b.request_id
                 WHERE COALESCE(p.done, 0) = 0
                 ORDER BY o.id LIMIT ?1",
            )?;
            let mut progress = HashMap::new();
            let rows = s
                .query_map(params![limit as i64, reporter], |r| {
                    let builder: Option<String> = r.get(4)?;
                    let attempts: Option<i64> = r.get(10)?;
                    let progress = match attempts {
                        None => None,
                        Some(attempts) => Some(ReportProgress {
                            done: false,
                            attempts,
                            next_ms: r.get(11)?,
                            last_error: r.get(12)?,
                        }),
                    };
                    let row = QueuedReport {
                        outbox_id: r.get(0)?,
                        build_id: r.get(1)?,
                        finished: r.get::<_, i64>(2)? != 0,
                        created_ms: r.get(3)?,
                        build: match builder {
                            None => None,
                            Some(builder) => Some(ReportedBuild {
                                builder,
                                number: r.get(5)?,
                                result: outcome_of(r.get(6)?),
                                repository: r.get::<_, Option<String>>(7)?.unwrap_or_default(),
                                branch: r.get::<_, Option<String>>(8)?.unwrap_or_default(),
                                revision: r.get::<_, Option<String>>(9)?.unwrap_or_default(),
                            }),
                        },
                    };
                    Ok((row, progress))
                })?
                .map(|r| {
                    r.map(|(row, p)| {
                        if let Some(p) = p {
                            progress.insert(row.outbox_id, p);
                        }
                        row
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((rows, progress))
        })
        .await
    }

    async fn skip_reports(&self, reporter: String, ids: Vec<i64>) -> Result<(), StateError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.write(move |conn| {
            let mut s = conn.prepare_cached(
                "INSERT INTO report_progress (outbox_id, reporter, done, attempts, next_ms, last_error)
                 VALUES (?1, ?2, 1, 0, 0, '')
                 ON CONFLICT (outbox_id, reporter) DO UPDATE SET done = 1",
            )?;
            for id in &ids {
                s.execute(params![id, reporter])?;
            }
            Ok(())
        })
        .await
    }

    async fn forget_delivered_reports(
        &self,
        reporters: Vec<String>,
        limit: usize,
    ) -> Result<usize, StateError> {
        let names = serde_json::to_string(&reporters).expect("a list of strings is JSON");
        let wanted = reporters.len() as i64;
        self.write(move |conn| {
            let ids: Vec<i64> = conn
                .prepare_cached(
                    "SELECT o.id FROM report_outbox o
                     WHERE (SELECT COUNT(*) FROM report_progress p
                            WHERE p.outbox_id = o.id AND p.done = 1
                              AND p.reporter IN (SELECT value FROM json_each(?1))) = ?2
                     ORDER BY o.id LIMIT ?3",
                )?
                .query_map(params![names, wanted, limit as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for id in &ids {
                conn.execute(
                    "DELETE FROM report_progress WHERE outbox_id = ?1",
                    params![id],
                )?;
                conn.execute("DELETE FROM report_outbox WHERE id = ?1", params![id])?;
            }
            Ok(ids.len())
        })
        .await
    }

    async fn undelivered_reports(
        &self,
        limit: usize,
    ) -> Result<Vec<UndeliveredReport>, StateError> {
        self.read(move |conn| {
            let mut s = conn.prepare_cached(
                "SELECT p.reporter, o.build_id, o.finished, o.created_ms, p.attempts, p.next_ms,
                        p.last_error, COALESCE(b.builder, ''), COALESCE(b.number, 0)
                 FROM report_progress p JOIN report_outbox o ON o.id = p.outbox_id
                 LEFT JOIN builds b ON b.id = o.build_id
                 WHERE p.done = 0 ORDER BY o.id LIMIT ?1",
            )?;
            let rows = s
                .query_map(params![limit as i64], |r| {
                    Ok(UndeliveredReport {
                        reporter: r.get(0)?,
                        build_id: r.get(1)?,
                        finished: r.get::<_, i64>(2)? != 0,
                        created_ms: r.get(3)?,
                        attempts: r.get(4)?,
                        next_ms: r.get(5)?,
                        last_error: r.get(6)?,
                        builder: r.get(7)?,
                        number: r.get(8)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn undelivered_report_count(&self) -> Result<u64, StateError> {
        self.read(|conn| {
            let n: i64 = conn.query_row(
                "SELECT COUNT(*) FROM report_progress WHERE done = 0",
                [],
                |r| r.get(0),
            )?;
            Ok(n as u64)
        })
        .await
    }

    async fn set_report_progress(
        &self,
        outbox_id: i64,
        reporter: String,
        p: ReportProgress,
    ) -> Result<(), StateError> {
        self.write(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO report_progress (outbox_id, reporter, done, attempts, next_ms, last_error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![outbox_id, reporter, p.done as i64, p.attempts, p.next_ms, p.last_error],
            )?;
            Ok(())
        })
        .await
    }
}

#[async_trait::async_trait]
impl crate::store::TimerMarks for SqliteDb {
    async fn mark(&self, key: &str) -> Result<Option<i64>, StateError> {
        let key = format!("mark:{key}");
        self.read(move |conn| {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [&key], |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .optional()
            .map(|v| {
                v.and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(i64::from_be_bytes)
            })
        })
        .await
    }

    async fn fire(
        &self,
        fired: (String, Option<i64>, i64),
        requests: Vec<NewRequest>,
        marks: Vec<(String, i64)>,
    ) -> Result<Option<Vec<i64>>, StateError> {
        self.write(move |conn| {
            let (key, expected, value) = fired;
            let now: Option<i64> = conn
                .query_row(
                    "SELECT value FROM meta WHERE key = ?1",
                    [format!("mark:{key}")],
                    |r| r.get::<_, Vec<u8>>(0),
                )
                .optional()?
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(i64::from_be_bytes);
            if now != expected {
                return Ok(None);
            }
            let mut marks = marks;
            marks.push((key, value));
            insert_requests(conn, &requests, &marks).map(Some)
        })
        .await
    }
}
