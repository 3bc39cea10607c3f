//! The store's records: what every backend reads and writes, typed (a
//! result is an [`Outcome`], a step attempt's id a [`StepId`], where a log
//! is a [`LogStorage`]), shared by the traits in [`super`] and both
//! backends.

use std::collections::BTreeMap;

use crate::builds::Outcome;
use crate::wire::StepId;

/// A change as pushed, validated, before it has an id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewChange {
    pub repository: String,
    pub branch: String,
    pub revision: String,
    pub author: String,
    pub comments: String,
    pub category: String,
    pub project: String,
    pub files: Vec<String>,
    /// The commit time, as (seconds, nanoseconds) since the Unix epoch.
    pub when: Option<(i64, i32)>,
    pub properties: BTreeMap<String, String>,
}

/// A change as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredChange {
    pub id: i64,
    pub change: NewChange,
    /// When the master received it, milliseconds since the Unix epoch.
    pub received_ms: i64,
}

/// A request [`super::RequestQueue::claim_next`] claimed, and the build made for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimedRequest {
    pub request: BuildRequest,
    pub build: i64,
    /// The build's number in its builder (`widgets#12`).
    pub number: i64,
}

/// A step attempt's log: its size and line count, recorded with its end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogSize {
    pub bytes: u64,
    pub lines: u64,
}

/// Where a step attempt's log is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogStorage {
    /// Being written, or ended and not compressed yet: a file under the
    /// data directory.
    File,
    /// Compressed (zstd, with a frame table) under the data directory.
    Compressed,
    /// Deleted by retention; the step's record stays.
    Pruned,
    /// In the database's `log_chunks` (logs stored before schema 8).
    Database,
}

impl LogStorage {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStorage::File => "file",
            LogStorage::Compressed => "compressed",
            LogStorage::Pruned => "pruned",
            LogStorage::Database => "database",
        }
    }

    /// What a stored name says (anything unknown: the database, where
    /// the oldest logs are).
    pub fn parse(s: &str) -> LogStorage {
        match s {
            "file" => LogStorage::File,
            "compressed" => LogStorage::Compressed,
            "pruned" => LogStorage::Pruned,
            _ => LogStorage::Database,
        }
    }
}

impl std::fmt::Display for LogStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A build request to create.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewRequest {
    pub builder: String,
    pub change_id: Option<i64>,
    pub reason: String,
    pub repository: String,
    pub branch: String,
    pub revision: String,
    /// Properties the request brings: (name, value, source), from its
    /// scheduler or a force.
    pub properties: Vec<(String, String, String)>,
    /// Not to be built before this time (ms since the epoch; 0: at once).
    pub not_before_ms: i64,
    /// Non-empty: a tree-stable group. A new request of the group (same
    /// builder, branch and key) moves every waiting one's `not_before_ms`
    /// to its own, and they are built together, as one build of the newest.
    pub collapse_key: String,
}

/// A stored build request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildRequest {
    pub id: i64,
    pub request: NewRequest,
    pub created_ms: i64,
}

/// The end of a step attempt's output (see [`super::StateDb::log_tails`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogTail {
    /// The step attempt's row.
    pub row: i64,
    pub data: bytes::Bytes,
    /// Where `data` starts and ends in the step's output.
    pub start: u64,
    pub end: u64,
}

/// A build in a list: no steps, no properties.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildBrief {
    pub id: i64,
    pub number: i64,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    pub result: Option<Outcome>,
}

/// A builder at a glance (see [`super::StateDb::builder_overview`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuilderOverview {
    pub name: String,
    /// Newest first.
    pub builds: Vec<BuildBrief>,
    /// How long its last successful build took.
    pub last_success_ms: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepRecord {
    /// The row id (what log chunks hang off).
    pub row: i64,
    pub position: u32,
    pub name: String,
    pub attempt: u32,
    pub step_id: StepId,
    pub on_lost: String,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    /// `None` while it runs.
    pub result: Option<Outcome>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub detail: String,
    /// Where its log is.
    pub log_stored: LogStorage,
    /// Once it has ended: its log's size and line count.
    pub log_bytes: Option<u64>,
    pub log_lines: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildRecord {
    pub id: i64,
    pub request_id: i64,
    pub builder: String,
    pub worker: String,
    pub reason: String,
    pub repository: String,
    pub branch: String,
    pub revision: String,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    pub result: Option<Outcome>,
    /// Per builder: 1, 2, 3 …, never reused.
    pub number: i64,
    /// (name, value, source), by name.
    pub properties: Vec<(String, String, String)>,
    pub steps: Vec<StepRecord>,
}

/// An artifact a build stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactRecord {
    pub build: i64,
    pub name: String,
    pub size: u64,
    /// Hex.
    pub sha256: String,
    /// A directory, stored as a tar stream (a download unpacks it).
    pub tar: bool,
}

/// One stored chunk of a step's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogChunk {
    pub step: i64,
    pub seq: u64,
    pub stream: i32,
    pub data: bytes::Bytes,
}

/// A build event waiting in the reporters' outbox, with what a report
/// needs of its build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedReport {
    pub outbox_id: i64,
    pub build_id: i64,
    /// `false`: the build started; `true`: it ended.
    pub finished: bool,
    pub created_ms: i64,
    /// `None` when the build is gone (its builder was deleted).
    pub build: Option<ReportedBuild>,
}

/// What a report says of a build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportedBuild {
    pub builder: String,
    pub number: i64,
    pub result: Option<Outcome>,
    pub repository: String,
    pub branch: String,
    pub revision: String,
}

/// One reporter's progress on one outbox row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReportProgress {
    pub done: bool,
    pub attempts: i64,
    pub next_ms: i64,
    pub last_error: String,
}

/// A report a reporter has not delivered yet, after trying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UndeliveredReport {
    pub reporter: String,
    pub build_id: i64,
    pub builder: String,
    pub number: i64,
    /// `false`: the build's start; `true`: its end.
    pub finished: bool,
    pub created_ms: i64,
    pub attempts: i64,
    pub next_ms: i64,
    pub last_error: String,
}

/// A build property as stored: name, value, source.
pub type PropertyRow = (String, String, String);

/// A step attempt's end (see [`super::StateDb::finish_step`]).
#[derive(Clone, Debug)]
pub struct StepEndRecord {
    pub row: i64,
    pub result: Outcome,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub detail: String,
    /// The build, the properties the step set, and the build's result if
    /// the step ends it.
    pub then: Option<(i64, Vec<PropertyRow>, Option<Outcome>)>,
}

impl StepEndRecord {
    /// The end of the step attempt `row`, with no exit status, no last
    /// output and nothing following from it.
    pub fn new(row: i64, result: Outcome, detail: impl Into<String>) -> StepEndRecord {
        StepEndRecord {
            row,
            result,
            exit_code: None,
            signal: None,
            detail: detail.into(),
            then: None,
        }
    }
}

/// Which builds [`super::StateDb::find_builds`] returns (every set field must
/// match).
#[derive(Clone, Debug, Default)]
pub struct BuildFilter {
    pub builder: Option<String>,
    pub branch: Option<String>,
    pub result: Option<Outcome>,
    /// Only builds with a smaller id (the next page).
    pub before: Option<i64>,
    pub limit: usize,
}

/// A build just claimed, as [`super::StateDb::claim`] hands it to `make`.
pub struct ClaimedBuild<'a> {
    pub build: i64,
    pub number: i64,
    pub change: Option<&'a crate::store::StoredChange>,
    pub change_ids: &'a [i64],
}

/// What [`super::StateDb::claim`] made.
#[derive(Debug)]
pub struct Claim<T> {
    pub build: i64,
    /// The first step's row, if one was asked for.
    pub first_row: Option<i64>,
    pub kept: T,
}
