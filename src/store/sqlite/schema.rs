//! The SQLite schema: versioned with `PRAGMA user_version` and migrated
//! forward on open; a file from a newer Switchyard is refused rather than
//! damaged.

use std::path::Path;

use rusqlite::Connection;

use crate::store::StateError;

/// Schema migrations; entry `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: changes, and a key/value table for the master's own settings.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
     CREATE TABLE changes (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         repository TEXT NOT NULL,
         branch TEXT NOT NULL,
         revision TEXT NOT NULL,
         author TEXT NOT NULL,
         comments TEXT NOT NULL,
         category TEXT NOT NULL,
         project TEXT NOT NULL,
         when_secs INTEGER,
         when_nanos INTEGER,
         received_ms INTEGER NOT NULL
     );
     CREATE TABLE change_files (
         change_id INTEGER NOT NULL REFERENCES changes(id) ON DELETE CASCADE,
         position INTEGER NOT NULL,
         path TEXT NOT NULL,
         PRIMARY KEY (change_id, position)
     );
     CREATE TABLE change_properties (
         change_id INTEGER NOT NULL REFERENCES changes(id) ON DELETE CASCADE,
         name TEXT NOT NULL,
         value TEXT NOT NULL,
         PRIMARY KEY (change_id, name)
     );",
    MIGRATION_2,
    MIGRATION_3,
    MIGRATION_4,
    // 5: webhook deliveries already stored, so a redelivery makes nothing
    // twice.
    "CREATE TABLE webhook_deliveries (
         hook TEXT NOT NULL,
         delivery TEXT NOT NULL,
         received_ms INTEGER NOT NULL,
         changes TEXT NOT NULL,
         PRIMARY KEY (hook, delivery)
     ) WITHOUT ROWID;
     CREATE INDEX webhook_deliveries_by_age ON webhook_deliveries (received_ms);",
    // 6: what each [[poller]] has seen: the branches' heads at its last
    // poll (a repository polled once, even with no branch, has a row in
    // polled_repositories, so its first poll makes no changes).
    "CREATE TABLE polled_repositories (repository TEXT PRIMARY KEY) WITHOUT ROWID;
     CREATE TABLE poller_heads (
         repository TEXT NOT NULL,
         branch TEXT NOT NULL,
         revision TEXT NOT NULL,
         PRIMARY KEY (repository, branch)
     ) WITHOUT ROWID;",
    // 7: the reporters' outbox: a row per build start and end, written by
    // triggers in the build's own transaction, so a crash cannot lose a
    // report; each reporter's progress on each row.
    "CREATE TABLE report_outbox (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         build_id INTEGER NOT NULL,
         finished INTEGER NOT NULL,
         created_ms INTEGER NOT NULL
     );
     CREATE TABLE report_progress (
         outbox_id INTEGER NOT NULL,
         reporter TEXT NOT NULL,
         done INTEGER NOT NULL,
         attempts INTEGER NOT NULL,
         next_ms INTEGER NOT NULL,
         last_error TEXT NOT NULL,
         PRIMARY KEY (outbox_id, reporter)
     ) WITHOUT ROWID;
     CREATE TRIGGER report_build_started AFTER INSERT ON builds BEGIN
         INSERT INTO report_outbox (build_id, finished, created_ms)
         VALUES (NEW.id, 0, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
     END;
     CREATE TRIGGER report_build_finished AFTER UPDATE OF finished_ms ON builds
     WHEN NEW.finished_ms IS NOT NULL AND OLD.finished_ms IS NULL BEGIN
         INSERT INTO report_outbox (build_id, finished, created_ms)
         VALUES (NEW.id, 1, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
     END;",
    // 8: step output in files under the data directory (see `logs`); the
    // database keeps where (`database` for logs stored before, in
    // `log_chunks`, which stay readable there; `file`; `compressed`), and
    // the size and line count once the step has ended.
    "ALTER TABLE steps ADD COLUMN log_stored TEXT NOT NULL DEFAULT 'database';
     ALTER TABLE steps ADD COLUMN log_bytes INTEGER;
     ALTER TABLE steps ADD COLUMN log_lines INTEGER;
     CREATE INDEX steps_log_uncompressed ON steps(id) WHERE log_stored = 'file';
     CREATE INDEX builds_by_end ON builds(finished_ms) WHERE finished_ms IS NOT NULL;",
    // 9: artifacts a build's upload steps stored, under
    // `data_dir/artifacts/BUILD/NAME`.
    "CREATE TABLE artifacts (
         build_id INTEGER NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
         name TEXT NOT NULL,
         size INTEGER NOT NULL,
         sha256 TEXT NOT NULL,
         created_ms INTEGER NOT NULL,
         PRIMARY KEY (build_id, name)
     );
     ALTER TABLE steps ADD COLUMN artifact TEXT;",
    // 10: whether an artifact is a directory's tar stream; which artifact a
    // download step sends (chosen once, so that a master restart resumes
    // the same bytes even if a newer build has one of that name).
    "ALTER TABLE artifacts ADD COLUMN tar INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE steps ADD COLUMN download_build INTEGER;
     ALTER TABLE steps ADD COLUMN download_name TEXT;",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const MIGRATION_2: &str = "
CREATE TABLE build_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    builder TEXT NOT NULL,
    change_id INTEGER REFERENCES changes(id),
    reason TEXT NOT NULL,
    repository TEXT NOT NULL,
    branch TEXT NOT NULL,
    revision TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    build_id INTEGER
);
CREATE INDEX build_requests_waiting ON build_requests(id) WHERE build_id IS NULL;
CREATE TABLE builds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id INTEGER NOT NULL REFERENCES build_requests(id),
    builder TEXT NOT NULL,
    worker TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    finished_ms INTEGER,
    result TEXT
);
CREATE INDEX builds_by_builder ON builds(builder, id);
CREATE TABLE steps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id INTEGER NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    step_id BLOB NOT NULL UNIQUE,
    on_lost TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    finished_ms INTEGER,
    result TEXT,
    exit_code INTEGER,
    signal INTEGER,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX steps_by_build ON steps(build_id, position, attempt);
CREATE TABLE log_chunks (
    step INTEGER NOT NULL REFERENCES steps(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (step, seq)
);
";

/// Build numbers per builder (1, 2, 3 …, never reused) and build
/// properties with their sources.
/// Indexes for what the web UI reads on every page: running builds, the
/// requests (and so the changes) of a build, and each builder's last builds
/// (covering: the home page reads them without touching the table).
const MIGRATION_4: &str = "
CREATE INDEX builds_unfinished ON builds(id) WHERE result IS NULL;
CREATE INDEX builds_by_builder_brief ON builds(builder, id, number, started_ms, finished_ms, result);
CREATE INDEX build_requests_by_build ON build_requests(build_id) WHERE build_id IS NOT NULL;
";

const MIGRATION_3: &str = "
ALTER TABLE builds ADD COLUMN number INTEGER;
UPDATE builds SET number = (SELECT COUNT(*) FROM builds b2 WHERE b2.builder = builds.builder AND b2.id <= builds.id);
CREATE TABLE builder_numbers (builder TEXT PRIMARY KEY, last INTEGER NOT NULL);
ALTER TABLE build_requests ADD COLUMN properties TEXT NOT NULL DEFAULT '[]';
ALTER TABLE build_requests ADD COLUMN not_before_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE build_requests ADD COLUMN collapse_key TEXT NOT NULL DEFAULT '';
INSERT INTO builder_numbers (builder, last) SELECT builder, MAX(number) FROM builds GROUP BY builder;
CREATE TABLE build_properties (
    build_id INTEGER NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (build_id, name)
);
";

/// Brings the schema of the database at `path` up to [`SCHEMA_VERSION`].
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StateError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StateError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(file = %path.display(), version = i + 1, "state database migrated");
    }
    Ok(())
}
