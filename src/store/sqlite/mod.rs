//! The master's durable state in an embedded SQLite database (the default).
//!
//! One writer thread owns the write connection. Writes arrive as jobs on a
//! channel; the thread takes every job that is waiting (up to a bound), runs
//! them in one transaction, each inside its own savepoint so that one bad job
//! cannot undo another, commits with a full sync, and only then answers. So
//! a change is on disk before its RPC returns, and concurrent pushes share
//! one fsync ("group commit"). Reads go to a connection of their own.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::store::LogChunk;
use crate::store::StateError;
use crate::store::logs;

mod builds;
mod changes;
mod legacy_logs;
mod rest;
pub(in crate::store) mod rows;
mod schema;

pub use schema::SCHEMA_VERSION;

/// Most jobs the writer puts in one transaction.
const MAX_GROUP: usize = 256;

/// Called once the group a job ran in has committed (`None`) or failed to
/// (`Some(error)`): only then is the job's caller answered.
type Completion = Box<dyn FnOnce(Option<String>) + Send>;
/// A write, run by the writer thread inside its own savepoint.
type Job = Box<dyn FnOnce(&Connection) -> Completion + Send>;

/// Runs `f` in a savepoint: on error, exactly its own writes are undone.
fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.execute_batch("SAVEPOINT job")?;
    match f(conn) {
        Ok(v) => {
            conn.execute_batch("RELEASE job")?;
            Ok(v)
        }
        Err(e) => {
            conn.execute_batch("ROLLBACK TO job; RELEASE job")?;
            Err(e)
        }
    }
}

/// The SQLite database: the writer thread's queue and the reader
/// connection. Cheap to clone; the writer finishes what is queued and
/// stops once the last clone is dropped.
#[derive(Clone)]
pub(in crate::store) struct SqliteDb {
    jobs: std::sync::mpsc::Sender<Job>,
    reader: Arc<Mutex<Connection>>,
}

impl SqliteDb {
    /// Opens (creating if needed) and migrates the database at `path`,
    /// moves the output an old master kept in it into `logs`, and starts
    /// the writer thread. Also returns the step rows of uploads in flight
    /// when the master stopped: their stdout is still the artifact when the
    /// worker replays it.
    pub(in crate::store) fn open(
        path: &Path,
        logs: &logs::LogFiles,
    ) -> Result<(SqliteDb, std::collections::HashSet<i64>), StateError> {
        let mut writer = open_connection(path)?;
        schema::migrate(&mut writer, path)?;
        move_running_logs(&mut writer, logs)?;
        let uploading: std::collections::HashSet<i64> = writer
            .prepare("SELECT id FROM steps WHERE artifact IS NOT NULL AND finished_ms IS NULL")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let reader = open_connection(path)?;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let thread_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("switchyard-state".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut group = vec![first];
                    while group.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(job) => group.push(job),
                            Err(_) => break,
                        }
                    }
                    run_group(&writer, group);
                }
                tracing::debug!(file = %thread_path.display(), "state writer stopped");
            })
            .map_err(StateError::Thread)?;
        Ok((
            SqliteDb {
                jobs: tx,
                reader: Arc::new(Mutex::new(reader)),
            },
            uploading,
        ))
    }

    /// Runs a write on the writer thread, in its own savepoint inside the
    /// next group commit; answers once it is durable (or failed, with
    /// nothing of it left behind).
    pub(in crate::store) async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StateError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = in_savepoint(conn, f);
            Box::new(move |commit_error| {
                let _ = tx.send(match commit_error {
                    None => result.map_err(StateError::from),
                    Some(e) => Err(StateError::Transaction(e)),
                });
            })
        });
        self.jobs.send(job).map_err(|_| StateError::WriterGone)?;
        rx.await.map_err(|_| StateError::WriterGone)?
    }

    /// Runs a read on the reader connection (off the async runtime).
    pub(in crate::store) async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StateError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|e| e.into_inner());
            f(&conn).map_err(StateError::from)
        })
        .await
        .map_err(|_| StateError::WriterGone)?
    }

    /// Runs `f` on the reader connection, here and now (it is quick).
    pub(in crate::store) fn read_now<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let conn = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        f(&conn)
    }
}

fn open_connection(path: &Path) -> Result<Connection, StateError> {
    let open = |path: &Path| -> rusqlite::Result<Connection> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit is synced to disk before it returns.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        Ok(conn)
    };
    open(path).map_err(|source| StateError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Moves the output of steps still running that a master before schema 8
/// kept in the database into their log files, so that their logs go on
/// in one place; ended steps' logs stay where they are and are read there.
fn move_running_logs(conn: &mut Connection, logs: &logs::LogFiles) -> Result<(), StateError> {
    let rows: Vec<i64> = conn
        .prepare("SELECT id FROM steps WHERE log_stored = 'database' AND finished_ms IS NULL")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for row in rows {
        let chunks: Vec<LogChunk> = conn
            .prepare("SELECT seq, stream, data FROM log_chunks WHERE step = ?1 ORDER BY seq")?
            .query_map([row], |r| {
                Ok(LogChunk {
                    step: row,
                    seq: r.get::<_, i64>(0)? as u64,
                    stream: r.get(1)?,
                    data: r.get::<_, Vec<u8>>(2)?.into(),
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        let _ = logs.append(&chunks)?;
        logs.close(row);
        let tx = conn.transaction()?;
        tx.execute("UPDATE steps SET log_stored = 'file' WHERE id = ?1", [row])?;
        tx.execute("DELETE FROM log_chunks WHERE step = ?1", [row])?;
        tx.commit()?;
        tracing::info!(
            step = row,
            chunks = chunks.len(),
            "a running step's log moved to its file"
        );
    }
    Ok(())
}

/// Runs a group of jobs in one transaction, each in its own savepoint, and
/// answers them all once the transaction has committed.
fn run_group(conn: &Connection, jobs: Vec<Job>) {
    let began = conn.execute_batch("BEGIN IMMEDIATE");
    if let Err(e) = &began {
        // Each job's savepoint then commits on its own.
        tracing::error!(error = %e, "state database: cannot begin a transaction");
    }
    let completions: Vec<Completion> = jobs.into_iter().map(|job| job(conn)).collect();
    let outcome = if began.is_ok() {
        match conn.execute_batch("COMMIT") {
            Ok(()) => None,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                tracing::error!(error = %e, "state database commit failed");
                Some(e.to_string())
            }
        }
    } else {
        None
    };
    for done in completions {
        done(outcome.clone());
    }
}
