//! Reading and writing the SQLite state's rows: the SQL each of the
//! state's operations runs, inside the transaction or on the connection
//! it is given.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};

use crate::builds::events::Outcome;
use crate::store::records::*;
use crate::store::{LogStorage, now_ms};
use crate::wire::StepId;

/// A stored result (`None` while the build or step runs).
pub(in crate::store) fn outcome_of(stored: Option<String>) -> Option<Outcome> {
    stored.as_deref().map(Outcome::parse)
}

/// A stored step id (16 bytes).
pub(in crate::store) fn step_id_of(v: rusqlite::types::ValueRef<'_>) -> rusqlite::Result<StepId> {
    let bytes = v.as_blob()?;
    StepId::from_slice(bytes).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            bytes.len(),
            rusqlite::types::Type::Blob,
            "a step id is 16 bytes".into(),
        )
    })
}

pub(in crate::store) fn load_steps(
    conn: &Connection,
    build: i64,
) -> rusqlite::Result<Vec<StepRecord>> {
    conn.prepare_cached(
        "SELECT id, position, name, attempt, step_id, on_lost, started_ms, finished_ms, result, exit_code, signal, detail,
                log_stored, log_bytes, log_lines
         FROM steps WHERE build_id = ?1 ORDER BY position, attempt",
    )?
    .query_map([build], |r| {
        Ok(StepRecord {
            row: r.get(0)?,
            position: r.get(1)?,
            name: r.get(2)?,
            attempt: r.get(3)?,
            step_id: step_id_of(r.get_ref(4)?)?,
            on_lost: r.get(5)?,
            started_ms: r.get(6)?,
            finished_ms: r.get(7)?,
            result: outcome_of(r.get(8)?),
            exit_code: r.get(9)?,
            signal: r.get(10)?,
            detail: r.get(11)?,
            log_stored: LogStorage::parse(&r.get::<_, String>(12)?),
            log_bytes: r.get::<_, Option<i64>>(13)?.map(|n| n as u64),
            log_lines: r.get::<_, Option<i64>>(14)?.map(|n| n as u64),
        })
    })?
    .collect()
}

/// Inserts changes and the build requests `requests_for` makes of their
/// ids (inside the caller's transaction); their ids and the requests'.
pub(in crate::store) fn store_changes(
    conn: &rusqlite::Connection,
    batch: &[crate::store::NewChange],
    requests_for: impl FnOnce(&[i64], &[crate::store::NewChange]) -> Vec<NewRequest>,
) -> rusqlite::Result<(Vec<i64>, Vec<i64>)> {
    let ids = insert_changes(conn, batch)?;
    let requests = requests_for(&ids, batch);
    let made = insert_requests(conn, &requests, &[])?;
    Ok((ids, made))
}

pub(in crate::store) const BUILD_COLUMNS: &str = "b.id, b.request_id, b.builder, b.worker, r.reason, r.repository, r.branch, r.revision, b.started_ms, b.finished_ms, b.result, COALESCE(b.number, 0)";

pub(in crate::store) fn load_properties(
    conn: &Connection,
    build: i64,
) -> rusqlite::Result<Vec<(String, String, String)>> {
    conn.prepare_cached(
        "SELECT name, value, source FROM build_properties WHERE build_id = ?1 ORDER BY name",
    )?
    .query_map([build], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
    .collect()
}

pub(in crate::store) fn build_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BuildRecord> {
    Ok(BuildRecord {
        id: r.get(0)?,
        request_id: r.get(1)?,
        builder: r.get(2)?,
        worker: r.get(3)?,
        reason: r.get(4)?,
        repository: r.get(5)?,
        branch: r.get(6)?,
        revision: r.get(7)?,
        started_ms: r.get(8)?,
        finished_ms: r.get(9)?,
        result: outcome_of(r.get(10)?),
        number: r.get(11)?,
        properties: Vec::new(),
        steps: Vec::new(),
    })
}

pub(in crate::store) fn store_properties(
    conn: &rusqlite::Connection,
    build: i64,
    properties: &[PropertyRow],
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT OR REPLACE INTO build_properties (build_id, name, value, source) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (name, value, source) in properties {
        stmt.execute(params![build, name, value, source])?;
    }
    Ok(())
}

pub(in crate::store) fn end_build(
    conn: &rusqlite::Connection,
    build: i64,
    result: Outcome,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE builds SET finished_ms = ?2, result = ?3 WHERE id = ?1",
        params![build, now_ms(), result.as_str()],
    )?;
    Ok(())
}

/// Inserts build requests (a request with a collapse key pushes back the
/// waiting ones of its group) and sets `marks`; returns the requests' ids.
pub(in crate::store) fn insert_requests(
    conn: &rusqlite::Connection,
    requests: &[NewRequest],
    marks: &[(String, i64)],
) -> rusqlite::Result<Vec<i64>> {
    let now = now_ms();
    let mut stmt = conn.prepare_cached(
        "INSERT INTO build_requests (builder, change_id, reason, repository, branch, revision, created_ms, properties, not_before_ms, collapse_key)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    let mut stable = conn.prepare_cached(
        "UPDATE build_requests SET not_before_ms = ?1
         WHERE build_id IS NULL AND builder = ?2 AND branch = ?3 AND collapse_key = ?4",
    )?;
    let ids = requests
        .iter()
        .map(|q| {
            let props = serde_json::to_string(&q.properties).unwrap_or_else(|_| "[]".into());
            if !q.collapse_key.is_empty() {
                // The tree is not stable yet: the group waits longer.
                stable.execute(params![
                    q.not_before_ms,
                    q.builder,
                    q.branch,
                    q.collapse_key
                ])?;
            }
            stmt.execute(params![
                q.builder,
                q.change_id,
                q.reason,
                q.repository,
                q.branch,
                q.revision,
                now,
                props,
                q.not_before_ms,
                q.collapse_key
            ])?;
            Ok(conn.last_insert_rowid())
        })
        .collect::<rusqlite::Result<Vec<i64>>>()?;
    for (key, value) in marks {
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
            params![format!("mark:{key}"), &value.to_be_bytes()[..]],
        )?;
    }
    Ok(ids)
}

pub(in crate::store) fn change_ids_of(
    conn: &rusqlite::Connection,
    build: i64,
) -> rusqlite::Result<Vec<i64>> {
    conn.prepare_cached(
        "SELECT change_id FROM build_requests WHERE build_id = ?1 AND change_id IS NOT NULL ORDER BY change_id",
    )?
    .query_map([build], |r| r.get(0))?
    .collect()
}

pub(in crate::store) const REQUEST_COLUMNS: &str = "id, builder, change_id, reason, repository, branch, revision, created_ms, properties, not_before_ms, collapse_key";

pub(in crate::store) fn request_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BuildRequest> {
    let props: String = r.get(8)?;
    Ok(BuildRequest {
        id: r.get(0)?,
        request: NewRequest {
            builder: r.get(1)?,
            change_id: r.get(2)?,
            reason: r.get(3)?,
            repository: r.get(4)?,
            branch: r.get(5)?,
            revision: r.get(6)?,
            properties: serde_json::from_str(&props).unwrap_or_default(),
            not_before_ms: r.get(9)?,
            collapse_key: r.get(10)?,
        },
        created_ms: r.get(7)?,
    })
}

/// [`StateDb::claim`]'s transaction body.
pub(in crate::store) fn claim_in<T>(
    conn: &rusqlite::Connection,
    request: i64,
    merged: &[i64],
    worker: &str,
    first_step: Option<(String, String, StepId)>,
    make: impl FnOnce(ClaimedBuild<'_>) -> (T, Vec<PropertyRow>),
) -> rusqlite::Result<Option<Claim<T>>> {
    let claimed: Option<(String, Option<i64>)> = conn
        .query_row(
            "SELECT builder, change_id FROM build_requests WHERE id = ?1 AND build_id IS NULL",
            [request],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((builder, change_id)) = claimed else {
        return Ok(None);
    };
    let number: i64 = conn.query_row(
        "INSERT INTO builder_numbers (builder, last) VALUES (?1, 1)
                 ON CONFLICT (builder) DO UPDATE SET last = last + 1 RETURNING last",
        [&builder],
        |r| r.get(0),
    )?;
    conn.execute(
                "INSERT INTO builds (request_id, builder, worker, started_ms, number) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![request, builder, worker, now_ms(), number],
            )?;
    let build = conn.last_insert_rowid();
    let mut stmt = conn.prepare_cached(
        "UPDATE build_requests SET build_id = ?1 WHERE id = ?2 AND build_id IS NULL",
    )?;
    for id in std::iter::once(&request).chain(merged) {
        stmt.execute(params![build, id])?;
    }
    let change = match change_id {
        Some(id) => load_change(conn, id)?,
        None => None,
    };
    let change_ids = change_ids_of(conn, build)?;
    let (kept, properties) = make(ClaimedBuild {
        build,
        number,
        change: change.as_ref(),
        change_ids: &change_ids,
    });
    store_properties(conn, build, &properties)?;
    let first_row = match &first_step {
        Some((name, on_lost, step_id)) => {
            Some(insert_step(conn, build, 0, name, 1, step_id, on_lost)?)
        }
        None => None,
    };
    Ok(Some(Claim {
        build,
        first_row,
        kept,
    }))
}

/// One stored build request.
pub(in crate::store) fn load_request(
    conn: &rusqlite::Connection,
    id: i64,
) -> rusqlite::Result<BuildRequest> {
    conn.prepare_cached(&format!(
        "SELECT {REQUEST_COLUMNS} FROM build_requests WHERE id = ?1"
    ))?
    .query_row([id], request_row)
}

pub(in crate::store) fn insert_step(
    conn: &rusqlite::Connection,
    build: i64,
    position: u32,
    name: &str,
    attempt: u32,
    step_id: &StepId,
    on_lost: &str,
) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "INSERT INTO steps (build_id, position, name, attempt, step_id, on_lost, started_ms, log_stored)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'file')",
    )?
    .execute(params![
        build,
        position,
        name,
        attempt,
        &step_id.as_bytes()[..],
        on_lost,
        now_ms()
    ])?;
    Ok(conn.last_insert_rowid())
}

/// Log chunk rows (seq, stream, data) of `step_row`, until about
/// `max_bytes` have been read.
pub(in crate::store) fn chunks_upto(
    mut rows: rusqlite::Rows<'_>,
    step_row: i64,
    max_bytes: usize,
) -> rusqlite::Result<Vec<LogChunk>> {
    let (mut out, mut bytes) = (Vec::new(), 0usize);
    while let Some(r) = rows.next()? {
        let data: Vec<u8> = r.get(2)?;
        bytes += data.len();
        out.push(LogChunk {
            step: step_row,
            seq: r.get::<_, i64>(0)? as u64,
            stream: r.get(1)?,
            data: data.into(),
        });
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(out)
}

/// Inserts a batch of changes, received now; returns their ids.
pub(in crate::store) fn insert_changes(
    conn: &Connection,
    batch: &[NewChange],
) -> rusqlite::Result<Vec<i64>> {
    let received = now_ms();
    batch
        .iter()
        .map(|c| insert_change(conn, c, received))
        .collect()
}

pub(in crate::store) fn insert_change(
    conn: &Connection,
    c: &NewChange,
    received_ms: i64,
) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "INSERT INTO changes (repository, branch, revision, author, comments, category, project, when_secs, when_nanos, received_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        c.repository,
        c.branch,
        c.revision,
        c.author,
        c.comments,
        c.category,
        c.project,
        c.when.map(|w| w.0),
        c.when.map(|w| w.1),
        received_ms
    ])?;
    let id = conn.last_insert_rowid();
    let mut files = conn.prepare_cached(
        "INSERT INTO change_files (change_id, position, path) VALUES (?1, ?2, ?3)",
    )?;
    for (i, f) in c.files.iter().enumerate() {
        files.execute(params![id, i as i64, f])?;
    }
    let mut props = conn.prepare_cached(
        "INSERT INTO change_properties (change_id, name, value) VALUES (?1, ?2, ?3)",
    )?;
    for (k, v) in &c.properties {
        props.execute(params![id, k, v])?;
    }
    Ok(id)
}

pub(in crate::store) fn load_change(
    conn: &Connection,
    id: i64,
) -> rusqlite::Result<Option<StoredChange>> {
    let row = conn
        .prepare_cached(
            "SELECT repository, branch, revision, author, comments, category, project, when_secs, when_nanos, received_ms
             FROM changes WHERE id = ?1",
        )?
        .query_row([id], |r| {
            let when_secs: Option<i64> = r.get(7)?;
            let when_nanos: Option<i32> = r.get(8)?;
            Ok((
                NewChange {
                    repository: r.get(0)?,
                    branch: r.get(1)?,
                    revision: r.get(2)?,
                    author: r.get(3)?,
                    comments: r.get(4)?,
                    category: r.get(5)?,
                    project: r.get(6)?,
                    files: Vec::new(),
                    when: when_secs.map(|s| (s, when_nanos.unwrap_or(0))),
                    properties: BTreeMap::new(),
                },
                r.get::<_, i64>(9)?,
            ))
        })
        .optional()?;
    let Some((mut change, received_ms)) = row else {
        return Ok(None);
    };
    change.files = conn
        .prepare_cached("SELECT path FROM change_files WHERE change_id = ?1 ORDER BY position")?
        .query_map([id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    change.properties = conn
        .prepare_cached("SELECT name, value FROM change_properties WHERE change_id = ?1")?
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(Some(StoredChange {
        id,
        change,
        received_ms,
    }))
}

/// The 32-byte secret stored under `name`, made at random the first time
/// (see [`crate::store::StateDb::secret`]).
pub(in crate::store) fn secret(
    conn: &Connection,
    name: &str,
) -> Result<[u8; 32], crate::store::StateError> {
    let key = format!("secret:{name}");
    let existing: Option<Vec<u8>> = conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [&key], |r| {
            r.get(0)
        })
        .optional()?;
    if let Some(v) = existing.and_then(|v| <[u8; 32]>::try_from(v).ok()) {
        return Ok(v);
    }
    let mut fresh = [0u8; 32];
    rand::fill(&mut fresh[..]);
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)",
        params![key, &fresh[..]],
    )?;
    // Another master process on the same file may have won the race.
    let v: Vec<u8> = conn.query_row("SELECT value FROM meta WHERE key = ?1", [&key], |r| {
        r.get(0)
    })?;
    Ok(<[u8; 32]>::try_from(v).unwrap_or(fresh))
}
