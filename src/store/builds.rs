//! [`StateDb`]'s build requests, builds, steps, their logs and artifacts:
//! the files (log chunks, uploads, artifacts) it keeps itself, and the
//! rows, which its backend keeps (`sqlite`, `postgres`), in the order that
//! keeps them in step: a step's output is durable in its file before its
//! end is recorded; a build's rows go before its files.
//!
//! A request waits (`build_id IS NULL`) until a worker claims it; claiming
//! creates the build in the same write, so two workers can never take the
//! same request. Log chunks are keyed by (step, seq): a chunk replayed
//! after a reconnect is stored once.

use std::collections::{BTreeMap, HashMap};

use super::records::*;
use super::{BuildStore, LogSize, LogStorage, ReportOutbox, RequestQueue, StateDb, StateError};
use crate::builds::events::Outcome;
use crate::wire::StepId;

/// How long a webhook delivery id is remembered: providers redeliver
/// within hours (GitHub keeps deliveries for 3 days).
pub const DELIVERY_MEMORY: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

impl StateDb {
    /// Stores build requests; returns their ids in order.
    pub async fn add_requests(&self, requests: Vec<NewRequest>) -> Result<Vec<i64>, StateError> {
        match &self.pg {
            Some(pg) => pg.add_requests(requests).await,
            None => self.sqlite_db()?.add_requests(requests).await,
        }
    }

    /// Requests no build has taken yet, oldest first.
    pub async fn waiting_requests(&self) -> Result<Vec<BuildRequest>, StateError> {
        match &self.pg {
            Some(pg) => pg.waiting_requests().await,
            None => self.sqlite_db()?.waiting_requests().await,
        }
    }

    /// Claims a waiting request (and `merged` ones, collapsed into it) for
    /// a build on `worker`, in one transaction with what the build starts
    /// with: `make` gets the new build and its change and returns what to
    /// keep plus the build's properties, stored here, and `first_step` (its
    /// name, `on_lost` and step id) gets its row. `None` if the request was
    /// claimed already.
    pub async fn claim<T: Send + 'static>(
        &self,
        request: i64,
        merged: Vec<i64>,
        worker: &str,
        first_step: Option<(String, String, StepId)>,
        make: impl FnOnce(ClaimedBuild<'_>) -> (T, Vec<PropertyRow>) + Send + 'static,
    ) -> Result<Option<Claim<T>>, StateError> {
        match &self.pg {
            Some(pg) => pg.claim(request, merged, worker, first_step, make).await,
            None => {
                self.sqlite_db()?
                    .claim(request, merged, worker, first_step, make)
                    .await
            }
        }
    }

    /// Claims the oldest waiting request that is due for one of
    /// `builders`, for a build on `worker`, in one write: the
    /// [`super::RequestQueue`]'s claim.
    pub async fn claim_next(
        &self,
        builders: &[String],
        worker: &str,
    ) -> Result<Option<super::ClaimedRequest>, StateError> {
        match &self.pg {
            Some(pg) => pg.claim_next(builders, worker).await,
            None => self.sqlite_db()?.claim_next(builders, worker).await,
        }
    }

    /// Stores changes and the build requests `requests_for` makes of their
    /// ids in one transaction: a change is never on disk without the builds
    /// it asked for, and the push costs one durable write. Returns the
    /// changes' ids and the requests'.
    pub async fn add_changes_requesting(
        &self,
        batch: Vec<crate::store::NewChange>,
        requests_for: impl FnOnce(&[i64], &[crate::store::NewChange]) -> Vec<NewRequest>
        + Send
        + 'static,
    ) -> Result<(Vec<i64>, Vec<i64>), StateError> {
        match &self.pg {
            Some(pg) => {
                pg.add_changes_requesting(batch, Box::new(requests_for))
                    .await
            }
            None => {
                self.sqlite_db()?
                    .add_changes_requesting(batch, requests_for)
                    .await
            }
        }
    }

    /// As [`StateDb::add_changes_requesting`], once per webhook delivery:
    /// when `delivery` (hook, delivery id) was stored before, nothing is
    /// written and the changes it made then are returned with `true`.
    /// Deliveries older than [`DELIVERY_MEMORY`] are forgotten a few at a
    /// time as new ones come.
    pub async fn add_changes_once(
        &self,
        delivery: (String, String),
        batch: Vec<crate::store::NewChange>,
        requests_for: impl FnOnce(&[i64], &[crate::store::NewChange]) -> Vec<NewRequest>
        + Send
        + 'static,
    ) -> Result<(Vec<i64>, Vec<i64>, bool), StateError> {
        match &self.pg {
            Some(pg) => {
                pg.add_changes_once(delivery, batch, Box::new(requests_for))
                    .await
            }
            None => {
                self.sqlite_db()?
                    .add_changes_once(delivery, batch, requests_for)
                    .await
            }
        }
    }

    /// The branch heads a poller saw at its last poll of `repository`, or
    /// `None` if it never polled it.
    pub async fn poller_heads(
        &self,
        repository: &str,
    ) -> Result<Option<BTreeMap<String, String>>, StateError> {
        match &self.pg {
            Some(pg) => pg.poller_heads(repository).await,
            None => self.sqlite_db()?.poller_heads(repository).await,
        }
    }

    /// Stores a poll's changes, with their build requests, and the heads
    /// it saw, in one transaction: a crash leaves either both or neither, so
    /// no commit is missed or made twice.
    pub async fn add_polled_changes(
        &self,
        repository: String,
        heads: BTreeMap<String, String>,
        batch: Vec<crate::store::NewChange>,
        requests_for: impl FnOnce(&[i64], &[crate::store::NewChange]) -> Vec<NewRequest>
        + Send
        + 'static,
    ) -> Result<(Vec<i64>, Vec<i64>), StateError> {
        match &self.pg {
            Some(pg) => {
                pg.add_polled_changes(repository, heads, batch, Box::new(requests_for))
                    .await
            }
            None => {
                self.sqlite_db()?
                    .add_polled_changes(repository, heads, batch, requests_for)
                    .await
            }
        }
    }

    /// The newest change on `branch` (of `repository`, if given).
    pub async fn latest_change(
        &self,
        branch: &str,
        repository: Option<&str>,
    ) -> Result<Option<(i64, String, String)>, StateError> {
        match &self.pg {
            Some(pg) => pg.latest_change(branch, repository).await,
            None => self.sqlite_db()?.latest_change(branch, repository).await,
        }
    }

    /// When the earliest waiting request that is not due yet comes due.
    pub async fn next_due_ms(&self) -> Result<Option<i64>, StateError> {
        match &self.pg {
            Some(pg) => pg.next_due_ms().await,
            None => self.sqlite_db()?.next_due_ms().await,
        }
    }

    /// Records a step attempt's end, with what follows from it in the same
    /// transaction: properties the step set, and the build's end when this
    /// step ends it. Its last output is made durable in its log file first;
    /// the log is compressed afterwards, in the background.
    pub async fn finish_step(
        &self,
        end: StepEndRecord,
        last_output: Vec<LogChunk>,
    ) -> Result<(), StateError> {
        let row = end.row;
        self.check_lease()?;
        // An upload's own bytes were stored, checked and kept (or
        // discarded) before its end: they never go to the log.
        let (_upload, logs) = self.split_uploads(last_output);
        let (troubles, stats) = self
            .on_logs(move |l| Ok((l.append(&logs)?, l.stats(row)?)))
            .await?;
        self.tell_log_troubles(troubles);
        let stats = stats.unwrap_or_default();
        let size = LogSize {
            bytes: stats.bytes,
            lines: stats.lines,
        };
        self.record_step_end(end, size).await?;
        self.logs.close(row);
        if self
            .upload_rows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&row)
        {
            self.uploads.unseal(row);
        }
        self.compress_later(vec![row]);
        Ok(())
    }

    /// Stores log chunks in their steps' files, durably when this returns;
    /// a chunk already stored (same step, a seq not above the last) is
    /// skipped, so replays never double a log.
    pub async fn append_logs(&self, chunks: Vec<LogChunk>) -> Result<(), StateError> {
        self.append_logs_then(chunks, None).await
    }

    /// [`StateDb::append_logs`], telling `written` once the chunks are
    /// written but not yet synced: the next batch (of the same session)
    /// may then be written while these sync.
    pub async fn append_logs_then(
        &self,
        chunks: Vec<LogChunk>,
        written: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<(), StateError> {
        self.check_lease()?;
        let (uploads, chunks) = self.split_uploads(chunks);
        let (files, logs) = (self.uploads.clone(), self.logs.clone());
        let troubles = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let (mut troubles, uploaded) = if uploads.is_empty() {
                (Vec::new(), None)
            } else {
                let (t, u) = files.write(&uploads)?;
                (t, Some(u))
            };
            let (t, logged) = logs.write(&chunks)?;
            troubles.extend(t);
            if let Some(w) = written {
                let _ = w.send(());
            }
            if let Some(u) = uploaded {
                troubles.extend(files.sync(u));
            }
            troubles.extend(logs.sync(logged));
            Ok(troubles)
        })
        .await
        .map_err(|_| StateError::WriterGone)??;
        self.tell_log_troubles(troubles);
        Ok(())
    }

    /// Takes out the chunks that are uploads (the stdout of upload steps).
    fn split_uploads(&self, chunks: Vec<LogChunk>) -> (Vec<LogChunk>, Vec<LogChunk>) {
        let rows = self.upload_rows.lock().unwrap_or_else(|e| e.into_inner());
        if rows.is_empty() {
            return (Vec::new(), chunks);
        }
        chunks.into_iter().partition(|c| {
            rows.contains(&c.step) && c.stream == crate::proto::OutputStream::Stdout as i32
        })
    }

    /// The largest artifact an upload may send (`max_artifact_size`).
    pub fn set_max_artifact_size(&self, max: u64) {
        self.uploads.set_max_log_size(max, true);
    }

    /// The most a build's artifacts may take together
    /// (`max_build_artifacts_size`).
    pub fn set_max_build_artifacts_size(&self, max: u64) {
        self.max_build_artifacts
            .store(max, std::sync::atomic::Ordering::Relaxed);
    }

    /// Which limit the upload of `row` passed, as its failure says it.
    pub fn upload_limit(&self, row: i64) -> String {
        self.build_limited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&row)
            .cloned()
            .unwrap_or_else(|| format!("max_artifact_size ({} bytes)", self.uploads.max_log_size()))
    }

    /// Whether the step of `row` is an upload.
    pub fn is_upload(&self, row: i64) -> bool {
        self.upload_rows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&row)
    }

    /// Why the upload of `row` could not be stored, if it could not.
    pub fn upload_trouble(&self, row: i64) -> Option<String> {
        self.uploads.trouble(row)
    }

    /// Forgets the upload of `row` (its step failed): its files go.
    pub async fn discard_upload(&self, row: i64) -> Result<(), StateError> {
        self.build_limited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&row);
        let files = self.uploads.clone();
        files.seal(row);
        tokio::task::spawn_blocking(move || files.remove(row))
            .await
            .map_err(|_| StateError::WriterGone)??;
        Ok(())
    }

    /// Whether the upload of `row` went past `max_artifact_size`.
    pub fn upload_over_limit(&self, row: i64) -> bool {
        self.uploads.over_limit(row).unwrap_or(false)
    }

    /// The stdout of the step of `row` is the upload of artifact `name` of
    /// `build`, from now on (and after a restart: it is recorded). It may
    /// take what the build's other artifacts leave of
    /// `max_build_artifacts_size`, if that is less than
    /// `max_artifact_size`.
    pub async fn expect_upload(
        &self,
        build: i64,
        row: i64,
        name: String,
    ) -> Result<(), StateError> {
        self.upload_rows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(row);
        let max_build = self
            .max_build_artifacts
            .load(std::sync::atomic::Ordering::Relaxed);
        let n = name.clone();
        let others: i64 = match &self.pg {
            Some(pg) => pg.other_artifacts_size(build, &n).await?,
            None => self.sqlite_db()?.other_artifacts_size(build, &n).await?,
        };
        let left = max_build.saturating_sub(others as u64);
        if left < self.uploads.max_log_size() {
            self.uploads.limit_row(row, left);
            self.build_limited
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    row,
                    format!(
                        "max_build_artifacts_size ({max_build} bytes; the build's other artifacts take {others})"
                    ),
                );
        }
        match &self.pg {
            Some(pg) => pg.set_step_artifact(row, &name).await,
            None => self.sqlite_db()?.set_step_artifact(row, &name).await,
        }
    }

    /// Checks the upload of the step of `row` against the digest its log
    /// ends with and, if they agree, stores it as the artifact `name` of
    /// `build`. `Ok(Err(why))`: the upload is not what the worker sent.
    pub async fn publish_artifact(
        &self,
        build: i64,
        row: i64,
        name: String,
    ) -> Result<Result<ArtifactRecord, String>, StateError> {
        self.check_lease()?;
        let log = self
            .on_logs(move |l| match l.reader(row)? {
                Some(r) => r.last_lines(4).map(|(_, b)| b),
                None => Ok(Vec::new()),
            })
            .await?;
        let said = crate::worker::upload::digest_in_log(&String::from_utf8_lossy(&log));
        let files = self.uploads.clone();
        let dest_dir = self.artifacts_dir.join(build.to_string());
        let dest = dest_dir.join(&name);
        let checked = tokio::task::spawn_blocking(move || -> std::io::Result<Result<(String, u64, bool), String>> {
            use sha2::Digest;
            let Some((hex, size, tar)) = said else {
                return Ok(Err("the upload did not say its checksum".into()));
            };
            // Moved into place before a crash that came before the step's
            // end was recorded: nothing is left to receive, the artifact
            // is there; it is checked again and recorded.
            if files.stats(row)?.is_none() && dest.exists() {
                let (mut hash, mut len) = (sha2::Sha256::new(), 0u64);
                let mut file = std::fs::File::open(&dest)?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = std::io::Read::read(&mut file, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hash.update(&buf[..n]);
                    len += n as u64;
                }
                let got = crate::wire::hex(&hash.finalize());
                if len == size && got == hex {
                    return Ok(Ok((got, len, tar)));
                }
            }
            // Kept while it was stored, or (after a restart) read again.
            let stored = files.stats(row)?.map_or(0, |s| s.bytes);
            let got = match files.digest(row) {
                Some(d) => d,
                None => {
                    let mut hash = sha2::Sha256::new();
                    if let Some(r) = files.reader(row)? {
                        let len = r.stats().bytes;
                        let mut at = 0;
                        while at < len {
                            let to = (at + (1 << 20)).min(len);
                            hash.update(r.read(at, to)?);
                            at = to;
                        }
                    }
                    crate::wire::hex(&hash.finalize())
                }
            };
            if stored != size || got != hex {
                return Ok(Err(format!(
                    "the upload arrived damaged: {stored} bytes with sha256 {got}, the worker sent {size} bytes with sha256 {hex}"
                )));
            }
            // A chunk replayed before the step's end is recorded must not
            // start a new upload file.
            files.seal(row);
            std::fs::create_dir_all(&dest_dir)?;
            let (data, index) = files.files_of(row);
            if stored == 0 {
                std::fs::write(&dest, b"")?;
            } else {
                std::fs::rename(&data, &dest)?;
            }
            std::fs::File::open(&dest_dir)?.sync_all()?;
            let _ = std::fs::remove_file(&index);
            let _ = std::fs::remove_file(&data);
            Ok(Ok((got, stored, tar)))
        })
        .await
        .map_err(|_| StateError::WriterGone)??;
        self.build_limited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&row);
        let (sha256, size, tar) = match checked {
            Ok(c) => c,
            Err(why) => return Ok(Err(why)),
        };
        let record = ArtifactRecord {
            build,
            name,
            size,
            sha256,
            tar,
        };
        match &self.pg {
            Some(pg) => pg.put_artifact(&record).await?,
            None => self.sqlite_db()?.put_artifact(&record).await?,
        }
        Ok(Ok(record))
    }

    /// The artifacts of a build, by name.
    pub async fn artifacts(&self, build: i64) -> Result<Vec<ArtifactRecord>, StateError> {
        match &self.pg {
            Some(pg) => pg.artifacts(build).await,
            None => self.sqlite_db()?.artifacts(build).await,
        }
    }

    /// The artifact a download step should send, from `from` (already
    /// interpolated): `latest-success:BUILDER` (the newest successful
    /// build of BUILDER that stored `name`), a build id, or
    /// `BUILDER#NUMBER`. `Ok(Err(why))` when there is none.
    pub async fn find_artifact(
        &self,
        from: &str,
        name: &str,
    ) -> Result<Result<ArtifactRecord, String>, StateError> {
        let from = from.trim();
        let build: Option<i64> = if let Some(builder) = from.strip_prefix("latest-success:") {
            let found = match &self.pg {
                Some(pg) => pg.latest_success_with(builder, name).await?,
                None => self.sqlite_db()?.latest_success_with(builder, name).await?,
            };
            if found.is_none() {
                return Ok(Err(format!(
                    "no successful build of builder `{builder}` stored an artifact `{name}`"
                )));
            }
            found
        } else if let Some((builder, number)) = from.rsplit_once('#')
            && let Ok(number) = number.parse::<i64>()
        {
            self.build_by_number(builder, number).await?
        } else if let Ok(id) = from.parse::<i64>() {
            Some(id)
        } else {
            return Ok(Err(format!(
                "`{from}` names no build (a build id, BUILDER#NUMBER or latest-success:BUILDER)"
            )));
        };
        let Some(build) = build else {
            return Ok(Err(format!("there is no build `{from}`")));
        };
        let found = self
            .artifacts(build)
            .await?
            .into_iter()
            .find(|a| a.name == name);
        Ok(found.ok_or_else(|| format!("build {build} has no artifact `{name}`")))
    }

    /// Records which artifact the download step of `row` sends.
    pub async fn record_download(
        &self,
        row: i64,
        build: i64,
        name: String,
    ) -> Result<(), StateError> {
        match &self.pg {
            Some(pg) => pg.record_download(row, build, &name).await,
            None => self.sqlite_db()?.record_download(row, build, name).await,
        }
    }

    /// The artifact the download step of `row` was given, if it was.
    pub async fn recorded_download(&self, row: i64) -> Result<Option<(i64, String)>, StateError> {
        match &self.pg {
            Some(pg) => pg.recorded_download(row).await,
            None => self.sqlite_db()?.recorded_download(row).await,
        }
    }

    /// Where an artifact's bytes are.
    pub fn artifact_path(&self, build: i64, name: &str) -> std::path::PathBuf {
        self.artifacts_dir.join(build.to_string()).join(name)
    }

    /// A page of a step's log: chunks after `after_seq`, at most about
    /// `max_bytes` (at least one chunk).
    pub async fn log_page(
        &self,
        step_row: i64,
        after_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<LogChunk>, StateError> {
        let from_files = self
            .on_logs(move |l| {
                let Some(r) = l.reader(step_row)? else {
                    return Ok(None);
                };
                let from = r.first(|c| c.seq > after_seq)?;
                let (mut to, mut bytes) = (from, 0usize);
                while to < r.count() && bytes < max_bytes {
                    bytes += r.record(to)?.len as usize;
                    to += 1;
                }
                r.chunks(step_row, from, to).map(Some)
            })
            .await?;
        if let Some(chunks) = from_files {
            return Ok(chunks);
        }
        // Logs kept in the database (before schema 8) are SQLite's only.
        match (&self.pg, &self.sqlite) {
            (None, Some(db)) => db.legacy_log_page(step_row, after_seq, max_bytes).await,
            _ => Ok(Vec::new()),
        }
    }

    /// A step's log read backwards: the chunks before `before_seq` (all,
    /// if `None`), newest first, up to about `max_bytes`.
    pub async fn log_page_back(
        &self,
        step_row: i64,
        before_seq: Option<u64>,
        max_bytes: usize,
    ) -> Result<Vec<LogChunk>, StateError> {
        let from_files = self
            .on_logs(move |l| {
                let Some(r) = l.reader(step_row)? else {
                    return Ok(None);
                };
                let to = match before_seq {
                    Some(b) => r.first(|c| c.seq >= b)?,
                    None => r.count(),
                };
                let (mut from, mut bytes) = (to, 0usize);
                while from > 0 && bytes < max_bytes {
                    from -= 1;
                    bytes += r.record(from)?.len as usize;
                }
                let mut chunks = r.chunks(step_row, from, to)?;
                chunks.reverse();
                Ok(Some(chunks))
            })
            .await?;
        if let Some(chunks) = from_files {
            return Ok(chunks);
        }
        // Logs kept in the database (before schema 8) are SQLite's only.
        match (&self.pg, &self.sqlite) {
            (None, Some(db)) => {
                db.legacy_log_page_back(step_row, before_seq, max_bytes)
                    .await
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Deletes a builder's requests, builds, steps and logs. Returns how
    /// many builds went.
    pub async fn delete_builder(&self, builder: &str) -> Result<usize, StateError> {
        let (builds, rows, ids) = match &self.pg {
            Some(pg) => pg.delete_builder(builder).await?,
            None => self.sqlite_db()?.delete_builder(builder).await?,
        };
        // The rows are gone: nothing reads these files any more.
        self.on_logs(move |l| rows.iter().try_for_each(|r| l.remove(*r)))
            .await?;
        self.remove_artifacts(&ids).await?;
        Ok(builds)
    }

    /// Removes the artifacts' files of these (deleted) builds.
    async fn remove_artifacts(&self, builds: &[i64]) -> Result<(), StateError> {
        let dirs: Vec<std::path::PathBuf> = builds
            .iter()
            .map(|b| self.artifacts_dir.join(b.to_string()))
            .collect();
        tokio::task::spawn_blocking(move || {
            for d in dirs {
                match std::fs::remove_dir_all(&d) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Ok(())
        })
        .await
        .map_err(|_| StateError::WriterGone)??;
        Ok(())
    }

    /// For each of `builders`: its last `per` builds (newest first, without
    /// steps or properties) and how long its last successful build took.
    /// One read, one indexed lookup per builder: what the home page needs
    /// however many builds are stored.
    pub async fn builder_overview(
        &self,
        builders: Vec<String>,
        per: usize,
    ) -> Result<Vec<BuilderOverview>, StateError> {
        match &self.pg {
            Some(pg) => pg.builder_overview(builders, per).await,
            None => self.sqlite_db()?.builder_overview(builders, per).await,
        }
    }

    /// How many bytes of output each step attempt of a build has stored, by
    /// the step's row.
    pub async fn log_sizes(
        &self,
        build: i64,
    ) -> Result<std::collections::HashMap<i64, u64>, StateError> {
        let (rows, mut sizes): (Vec<i64>, HashMap<i64, u64>) = match &self.pg {
            Some(pg) => (pg.step_rows(build).await?, HashMap::new()),
            None => self.sqlite_db()?.step_rows_and_legacy_sizes(build).await?,
        };
        let from_files = self
            .on_logs(move |l| {
                let mut out = Vec::new();
                for row in rows {
                    if let Some(s) = l.stats(row)? {
                        out.push((row, s.bytes));
                    }
                }
                Ok(out)
            })
            .await?;
        sizes.extend(from_files);
        Ok(sizes)
    }

    /// The last `lines` lines (at most about `max_bytes`, cut at a line's
    /// start) of every step attempt of a build, with where they start and
    /// end in the step's output. A live view that goes on from each `end`
    /// misses and doubles nothing.
    pub async fn log_tails(
        &self,
        build: i64,
        lines: usize,
        max_bytes: usize,
    ) -> Result<Vec<LogTail>, StateError> {
        let rows: Vec<i64> = match &self.pg {
            Some(pg) => pg.step_rows(build).await?,
            None => self.sqlite_db()?.step_rows(build).await?,
        };
        let from_files = {
            let rows = rows.clone();
            self.on_logs(move |l| {
                let mut out = HashMap::new();
                for row in rows {
                    let Some(r) = l.reader(row)? else { continue };
                    let end = r.stats().bytes;
                    let (mut start, mut data) = r.last_lines(lines as u64)?;
                    if data.len() > max_bytes {
                        // Too long: from the first line that starts in the
                        // last `max_bytes`, or cut mid-line if none does.
                        let from = data.len() - max_bytes;
                        let cut = data[from..]
                            .iter()
                            .position(|&b| b == b'\n')
                            .map_or(from, |i| from + i + 1);
                        data.drain(..cut);
                        start += cut as u64;
                    }
                    let data = bytes::Bytes::from(data);
                    out.insert(
                        row,
                        LogTail {
                            row,
                            data,
                            start,
                            end,
                        },
                    );
                }
                Ok(out)
            })
            .await?
        };
        let mut from_files = from_files;
        let in_db: Vec<i64> = rows
            .iter()
            .copied()
            .filter(|r| !from_files.contains_key(r))
            .collect();
        let mut from_db: HashMap<i64, LogTail> = match (&self.pg, &self.sqlite) {
            (None, Some(db)) if !in_db.is_empty() => {
                db.legacy_log_tails(in_db, lines, max_bytes).await?
            }
            _ => HashMap::new(),
        };
        Ok(rows
            .iter()
            .filter_map(|r| from_files.remove(r).or_else(|| from_db.remove(r)))
            .collect())
    }

    /// Where byte `offset` of a step attempt's output is: the chunk seq to
    /// read after (0: from the first) and the offset that chunk starts at.
    /// Reads chunk lengths only, not their bytes.
    pub async fn log_seek(&self, step_row: i64, offset: u64) -> Result<(u64, u64), StateError> {
        let from_files = self
            .on_logs(move |l| {
                let Some(r) = l.reader(step_row)? else {
                    return Ok(None);
                };
                let i = r.first(|c| c.end() > offset)?;
                if i == 0 {
                    return Ok(Some((0, 0)));
                }
                let before = r.record(i - 1)?;
                Ok(Some((before.seq, before.end())))
            })
            .await?;
        if let Some(found) = from_files {
            return Ok(found);
        }
        match (&self.pg, &self.sqlite) {
            (None, Some(db)) => db.legacy_log_seek(step_row, offset).await,
            _ => Ok((0, 0)),
        }
    }

    /// Deletes the logs of (at most `limit`) steps of builds that ended
    /// before `ended_before_ms`, in small writes; the builds and steps
    /// stay. Returns how many steps' logs went.
    pub async fn prune_logs(
        &self,
        ended_before_ms: i64,
        limit: usize,
    ) -> Result<usize, StateError> {
        let steps = self.logs_to_prune(ended_before_ms, limit).await?;
        let mut files = Vec::new();
        for (row, stored) in &steps {
            let row = *row;
            if *stored == LogStorage::Database {
                self.sqlite_db()?.delete_legacy_log(row).await?;
            } else {
                files.push(row);
            }
        }
        // The files first: a crash before the mark below only means they
        // are looked for again.
        self.on_logs(move |l| files.iter().try_for_each(|r| l.remove(*r)))
            .await?;
        let rows: Vec<i64> = steps.iter().map(|(r, _)| *r).collect();
        self.set_log_storage(rows, LogStorage::Pruned).await?;
        Ok(steps.len())
    }

    /// Deletes (at most `limit`) builds that ended before
    /// `ended_before_ms`, with their requests, steps, properties and logs.
    /// Returns how many went.
    pub async fn prune_builds(
        &self,
        ended_before_ms: i64,
        limit: usize,
    ) -> Result<usize, StateError> {
        // Their logs first, a few at a time: the delete below is small.
        while self.prune_logs(ended_before_ms, 100).await? > 0 {}
        let (builds, rows) = match &self.pg {
            Some(pg) => pg.prune_builds(ended_before_ms, limit).await?,
            None => {
                self.sqlite_db()?
                    .prune_builds(ended_before_ms, limit)
                    .await?
            }
        };
        // Steps that ended after the logs were pruned (none, normally).
        self.on_logs(move |l| rows.iter().try_for_each(|r| l.remove(*r)))
            .await?;
        self.remove_artifacts(&builds).await?;
        Ok(builds.len())
    }

    /// Requests waiting, per builder.
    pub async fn waiting_counts(
        &self,
    ) -> Result<std::collections::BTreeMap<String, u64>, StateError> {
        match &self.pg {
            Some(pg) => pg.waiting_counts().await,
            None => self.sqlite_db()?.waiting_counts().await,
        }
    }
}

#[async_trait::async_trait]
impl BuildStore for StateDb {
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
        self.db()?
            .start_step(build, position, name, attempt, step_id, on_lost, properties)
            .await
    }

    async fn finish_build(&self, build: i64, result: Outcome) -> Result<(), StateError> {
        self.db()?.finish_build(build, result).await
    }

    async fn set_build_properties(
        &self,
        build: i64,
        properties: Vec<PropertyRow>,
    ) -> Result<(), StateError> {
        self.db()?.set_build_properties(build, properties).await
    }

    async fn find_builds(&self, filter: BuildFilter) -> Result<Vec<BuildRecord>, StateError> {
        self.db()?.find_builds(filter).await
    }

    async fn build_by_number(&self, builder: &str, number: i64) -> Result<Option<i64>, StateError> {
        self.db()?.build_by_number(builder, number).await
    }

    async fn unfinished_builds(&self) -> Result<Vec<BuildRecord>, StateError> {
        self.db()?.unfinished_builds().await
    }

    async fn build(&self, id: i64) -> Result<Option<BuildRecord>, StateError> {
        self.db()?.build(id).await
    }

    async fn build_change_ids(&self, build: i64) -> Result<Vec<i64>, StateError> {
        self.db()?.build_change_ids(build).await
    }

    async fn request_build(&self, request: i64) -> Result<Option<i64>, StateError> {
        self.db()?.request_build(request).await
    }

    async fn record_step_end(&self, end: StepEndRecord, log: LogSize) -> Result<(), StateError> {
        self.db()?.record_step_end(end, log).await
    }

    async fn set_log_storage(&self, rows: Vec<i64>, stored: LogStorage) -> Result<(), StateError> {
        self.db()?.set_log_storage(rows, stored).await
    }

    async fn ended_logs_stored_as(&self, stored: LogStorage) -> Result<Vec<i64>, StateError> {
        self.db()?.ended_logs_stored_as(stored).await
    }

    async fn logs_to_prune(
        &self,
        ended_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<(i64, LogStorage)>, StateError> {
        self.db()?.logs_to_prune(ended_before_ms, limit).await
    }
}

#[async_trait::async_trait]
impl ReportOutbox for StateDb {
    async fn report_queue(
        &self,
        reporter: String,
        limit: usize,
    ) -> Result<(Vec<QueuedReport>, HashMap<i64, ReportProgress>), StateError> {
        self.db()?.report_queue(reporter, limit).await
    }

    async fn skip_reports(&self, reporter: String, ids: Vec<i64>) -> Result<(), StateError> {
        self.db()?.skip_reports(reporter, ids).await
    }

    async fn forget_delivered_reports(
        &self,
        reporters: Vec<String>,
        limit: usize,
    ) -> Result<usize, StateError> {
        self.db()?.forget_delivered_reports(reporters, limit).await
    }

    async fn undelivered_reports(
        &self,
        limit: usize,
    ) -> Result<Vec<UndeliveredReport>, StateError> {
        self.db()?.undelivered_reports(limit).await
    }

    async fn undelivered_report_count(&self) -> Result<u64, StateError> {
        self.db()?.undelivered_report_count().await
    }

    async fn set_report_progress(
        &self,
        outbox_id: i64,
        reporter: String,
        p: ReportProgress,
    ) -> Result<(), StateError> {
        self.db()?.set_report_progress(outbox_id, reporter, p).await
    }
}

#[async_trait::async_trait]
impl super::TimerMarks for StateDb {
    async fn mark(&self, key: &str) -> Result<Option<i64>, StateError> {
        self.db()?.mark(key).await
    }

    async fn fire(
        &self,
        fired: (String, Option<i64>, i64),
        requests: Vec<NewRequest>,
        marks: Vec<(String, i64)>,
    ) -> Result<Option<Vec<i64>>, StateError> {
        self.db()?.fire(fired, requests, marks).await
    }
}
