//! Logs an earlier master kept in the database (before schema 8: the
//! `log_chunks` table), read where they are; a running step's were moved
//! to its file at start. Only SQLite has them.

use std::collections::HashMap;

use rusqlite::params;

use super::SqliteDb;
use super::rows::chunks_upto;
use crate::store::records::LogTail;
use crate::store::{LogChunk, StateError};

impl SqliteDb {
    /// A step's log kept in the database (before schema 8): its chunks
    /// after `after_seq`, up to about `max_bytes`.
    pub(in crate::store) async fn legacy_log_page(
        &self,
        step_row: i64,
        after_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<LogChunk>, StateError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, stream, data FROM log_chunks WHERE step = ?1 AND seq > ?2 ORDER BY seq LIMIT 4096",
            )?;
            let rows = stmt.query(params![step_row, after_seq as i64])?;
            chunks_upto(rows, step_row, max_bytes)
        })
        .await
    }

    /// As [`Self::legacy_log_page`], backwards: the chunks before
    /// `before_seq` (all, if `None`), newest first.
    pub(in crate::store) async fn legacy_log_page_back(
        &self,
        step_row: i64,
        before_seq: Option<u64>,
        max_bytes: usize,
    ) -> Result<Vec<LogChunk>, StateError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, stream, data FROM log_chunks WHERE step = ?1 AND (?2 IS NULL OR seq < ?2) ORDER BY seq DESC LIMIT 4096",
            )?;
            let rows = stmt.query(params![step_row, before_seq.map(|s| s as i64)])?;
            chunks_upto(rows, step_row, max_bytes)
        })
        .await
    }

    /// A build's step rows, and the size of each step's log kept in the
    /// database (before schema 8).
    pub(in crate::store) async fn step_rows_and_legacy_sizes(
        &self,
        build: i64,
    ) -> Result<(Vec<i64>, HashMap<i64, u64>), StateError> {
        self.read(move |conn| {
            let rows = conn
                .prepare_cached("SELECT id FROM steps WHERE build_id = ?1")?
                .query_map([build], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let sizes = conn
                .prepare_cached(
                    "SELECT c.step, SUM(length(c.data)) FROM log_chunks c
                     WHERE c.step IN (SELECT id FROM steps WHERE build_id = ?1) GROUP BY c.step",
                )?
                .query_map([build], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
                .collect::<rusqlite::Result<_>>()?;
            Ok((rows, sizes))
        })
        .await
    }

    /// A build's step rows, in order (position, attempt).
    pub(in crate::store) async fn step_rows(&self, build: i64) -> Result<Vec<i64>, StateError> {
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT id FROM steps WHERE build_id = ?1 ORDER BY position, attempt",
            )?
            .query_map([build], |r| r.get(0))?
            .collect()
        })
        .await
    }

    /// [`crate::store::StateDb::log_tails`] of the steps of `rows` whose
    /// logs are kept in the database (before schema 8).
    pub(in crate::store) async fn legacy_log_tails(
        &self,
        in_db: Vec<i64>,
        lines: usize,
        max_bytes: usize,
    ) -> Result<HashMap<i64, LogTail>, StateError> {
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let rows = in_db;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let end: i64 = tx
                    .prepare_cached(
                        "SELECT COALESCE(SUM(length(data)), 0) FROM log_chunks WHERE step = ?1",
                    )?
                    .query_row([row], |r| r.get(0))?;
                let mut stmt = tx.prepare_cached(
                    "SELECT data FROM log_chunks WHERE step = ?1 ORDER BY seq DESC",
                )?;
                let mut chunks = stmt.query([row])?;
                let (mut pieces, mut newlines, mut bytes) = (Vec::new(), 0usize, 0usize);
                while let Some(r) = chunks.next()? {
                    let data: Vec<u8> = r.get(0)?;
                    // The last line's own end does not count.
                    let skip_last = usize::from(bytes == 0 && data.last() == Some(&b'\n'));
                    newlines += data.iter().filter(|&&b| b == b'\n').count() - skip_last;
                    bytes += data.len();
                    pieces.push(data);
                    if newlines >= lines || bytes >= max_bytes {
                        break;
                    }
                }
                let mut all = Vec::with_capacity(bytes);
                for p in pieces.iter().rev() {
                    all.extend_from_slice(p);
                }
                let body = all.strip_suffix(b"\n").unwrap_or(&all);
                let mut cut = 0;
                let mut seen = 0;
                for (i, b) in body.iter().enumerate().rev() {
                    if *b == b'\n' {
                        seen += 1;
                        if seen == lines {
                            cut = i + 1;
                            break;
                        }
                    }
                }
                if cut == 0 && all.len() > max_bytes {
                    let from = all.len() - max_bytes;
                    cut = all[from..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(from, |i| from + i + 1);
                }
                let data = bytes::Bytes::from(all).slice(cut..);
                let end = end as u64;
                out.push(LogTail {
                    row,
                    start: end - data.len() as u64,
                    end,
                    data,
                });
            }
            tx.commit()?;
            Ok(out.into_iter().map(|t| (t.row, t)).collect())
        })
        .await
    }

    /// [`crate::store::StateDb::log_seek`] in a log kept in the database
    /// (before schema 8).
    pub(in crate::store) async fn legacy_log_seek(
        &self,
        step_row: i64,
        offset: u64,
    ) -> Result<(u64, u64), StateError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, length(data) FROM log_chunks WHERE step = ?1 ORDER BY seq",
            )?;
            let mut rows = stmt.query([step_row])?;
            let (mut pos, mut after) = (0u64, 0u64);
            while let Some(r) = rows.next()? {
                let (seq, len): (i64, i64) = (r.get(0)?, r.get(1)?);
                if pos + len as u64 > offset {
                    break;
                }
                pos += len as u64;
                after = seq as u64;
            }
            Ok((after, pos))
        })
        .await
    }

    /// Deletes the log of the step of `row` kept in the database, a
    /// thousand chunks a write.
    pub(in crate::store) async fn delete_legacy_log(&self, row: i64) -> Result<(), StateError> {
        while self
            .write(move |conn| {
                conn.execute(
                    "DELETE FROM log_chunks WHERE rowid IN
                       (SELECT rowid FROM log_chunks WHERE step = ?1 LIMIT 1000)",
                    [row],
                )
            })
            .await?
            > 0
        {}
        Ok(())
    }
}
