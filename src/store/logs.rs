//! Step output in files: one append-only file per step attempt under
//! `DATA_DIR/logs/`, an index beside it, compressed once the step has
//! ended. The state database keeps only what is small (sizes, line counts,
//! where the log is).
//!
//! Files of a step attempt (its row in `steps`), under `logs/N/` where N
//! is ROW / 1000 (so no directory grows past a thousand steps):
//!
//! - `ROW.log`: the output's bytes, as the worker sent them, in order.
//! - `ROW.idx`: one 32-byte record per chunk: its sequence number, where it
//!   starts in the output, its length, its stream, and how many newlines
//!   the output holds up to its end. Records are in the order of all four,
//!   so a byte offset, a sequence number or the start of the last N lines
//!   is found by binary search, reading a few records, never the log.
//! - once the step has ended, `ROW.zst` and `ROW.frames` replace `ROW.log`:
//!   the output in independent zstd frames of [`FRAME`] bytes each, and a
//!   16-byte record per frame (where it starts in the output and in the
//!   compressed file), so a range is read by decompressing only the frames
//!   it touches. `ROW.idx` stays as it was.
//!
//! Durability: a batch of chunks is written (bytes first, then their
//! records) and both files are synced before [`LogFiles::append`] returns;
//! the master acknowledges the chunks to the worker only after that. A
//! crash may leave bytes without a record, or a record whose bytes did not
//! reach the disk: neither was acknowledged, so the worker sends them
//! again. Readers only believe records whose bytes are there; the writer,
//! when it next opens the step, cuts both files back to the last whole
//! chunk before appending. A chunk whose sequence number is not above the
//! last one stored is a replay and is skipped: nothing doubles.
//!
//! Compression writes the new files under temporary names, syncs them and
//! renames them into place (`.frames` first: a `.zst` always has its
//! frames), then removes `.log`. A reader that finds `.zst` reads it; a
//! reader that opened `.log` just before keeps reading its open file.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::LogChunk;

/// One index record's size.
const RECORD: u64 = 32;
/// One frame record's size.
const FRAME_RECORD: u64 = 16;
/// The output's bytes per compressed frame: a read decompresses at most
/// this much more than it needs at each end.
pub const FRAME: usize = 64 * 1024;
/// zstd's level for ended logs: fast, and logs shrink well even so.
const LEVEL: i32 = 3;
/// Writers kept open at once; past it the least recently used is closed
/// (and reopened when its step writes again).
const MAX_OPEN: usize = 256;
/// Readers of compressed logs kept open (their files do not change): a
/// log being viewed is read without opening it again.
const MAX_CACHED_READERS: usize = 64;
/// The end of a log is kept uncompressed (its last frames, covering at
/// least this much), so its last lines are read without decompressing.
const TAIL_PLAIN: u64 = 128 * 1024;
/// Only logs of at least this size keep their end uncompressed (so the
/// plain end is at most a small part of what a log takes on disk; smaller
/// logs decompress fast whole).
const PLAIN_TAIL_FROM: u64 = 8 << 20;
/// Marks a frame stored as it is (in a frame record's packed offset).
const RAW_FRAME: u64 = 1 << 63;

/// One chunk's index record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// Where the chunk starts in the step's output.
    pub offset: u64,
    pub len: u32,
    pub stream: i32,
    /// Newlines in the output up to the chunk's end.
    pub lines: u64,
}

impl Record {
    pub fn end(&self) -> u64 {
        self.offset + self.len as u64
    }

    fn encode(&self) -> [u8; RECORD as usize] {
        let mut b = [0u8; RECORD as usize];
        b[0..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.len.to_le_bytes());
        b[20..24].copy_from_slice(&self.stream.to_le_bytes());
        b[24..32].copy_from_slice(&self.lines.to_le_bytes());
        b
    }

    fn decode(b: &[u8; RECORD as usize]) -> Self {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Record {
            seq: u64_at(0),
            offset: u64_at(8),
            len: u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")),
            stream: i32::from_le_bytes(b[20..24].try_into().expect("4 bytes")),
            lines: u64_at(24),
        }
    }
}

/// What a step's log holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    pub bytes: u64,
    pub lines: u64,
    pub last_seq: u64,
}

/// The open files of a step being written.
struct Writer {
    /// Shared with the readers of a running step's log.
    data: Arc<File>,
    index: Arc<File>,
    stats: LogStats,
    /// Chunks in the index, and the last one's record.
    count: u64,
    last: Option<Record>,
    /// Its output was cut at `max_log_size`.
    cut: bool,
    /// The SHA-256 of everything stored, when this store keeps digests and
    /// the writer saw the file from its start.
    digest: Option<sha2::Sha256>,
    /// The data file's bytes below this offset were synced and let go of
    /// from the page cache ([`release_synced`]).
    released: u64,
}

/// Bytes at the end of a log file kept in the page cache after they are
/// synced: what live readers (the last lines, a follower's next page)
/// read.
const KEEP_CACHED: u64 = 8 << 20;

/// Lets the kernel drop a writer's synced bytes (those below `synced`),
/// all but the last [`KEEP_CACHED`], from the page cache: see
/// [`crate::pagecache`]. The master rarely reads a log back soon (readers
/// want the end; compression reads each file once).
fn release_synced(w: &mut Writer, synced: u64) {
    crate::pagecache::release(&w.data, &mut w.released, synced.saturating_sub(KEEP_CACHED));
}

impl Writer {
    fn last_byte(&self) -> io::Result<Option<u8>> {
        if self.stats.bytes == 0 {
            return Ok(None);
        }
        let mut b = [0u8];
        read_exact_at(&self.data, &mut b, self.stats.bytes - 1)?;
        Ok(Some(b[0]))
    }
}

/// Why a step's output could not all be stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogTrouble {
    /// Its log passed `max_log_size`, and was cut there.
    OverLimit { row: i64, max: u64 },
    /// Its files could not be written (a full disk, say).
    CannotWrite { row: i64, why: String },
}

impl LogTrouble {
    pub fn row(&self) -> i64 {
        match self {
            LogTrouble::OverLimit { row, .. } | LogTrouble::CannotWrite { row, .. } => *row,
        }
    }
}

/// What [`LogFiles::write`] wrote and [`LogFiles::sync`] must make
/// durable: a step's files, and the data file's length once synced.
pub struct Unsynced(Vec<ToSync>);

struct ToSync {
    row: i64,
    writer: Arc<Mutex<Writer>>,
    data: Arc<File>,
    index: Arc<File>,
    end: u64,
}

/// An open writer, with when it was last used.
type OpenWriter = (Arc<Mutex<Writer>>, u64);

/// The log files of every step, under one directory.
pub struct LogFiles {
    dir: PathBuf,
    /// Writers by step row, with when each was last used (for closing the
    /// least recently used).
    open: Mutex<HashMap<i64, OpenWriter>>,
    uses: std::sync::atomic::AtomicU64,
    /// Steps being compressed: appends to them are refused.
    sealed: Mutex<HashSet<i64>>,
    /// Readers of compressed logs, kept open (at most
    /// [`MAX_CACHED_READERS`]); dropped when their log is removed.
    readers: Mutex<HashMap<i64, LogReader>>,
    /// `[master] max_log_size`.
    max_size: std::sync::atomic::AtomicU64,
    /// Steps held to less than `max_size` (an upload within what its
    /// build may still store).
    row_limits: Mutex<HashMap<i64, u64>>,
    /// `[master] on_log_limit = "fail"`.
    fail_on_limit: std::sync::atomic::AtomicBool,
    /// Writers keep the SHA-256 of what they store (uploads).
    digests: std::sync::atomic::AtomicBool,
    /// Steps whose files could not be written, and why.
    broken: Mutex<HashMap<i64, String>>,
}

/// A step's files, by kind.
struct Paths {
    dir: PathBuf,
    data: PathBuf,
    index: PathBuf,
    zst: PathBuf,
    frames: PathBuf,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn read_exact_at(f: &File, buf: &mut [u8], at: u64) -> io::Result<()> {
    f.read_exact_at(buf, at)
}

impl LogFiles {
    /// The log files under `dir` (created when the first log is written).
    pub fn new(dir: PathBuf) -> Self {
        LogFiles {
            dir,
            open: Mutex::new(HashMap::new()),
            uses: std::sync::atomic::AtomicU64::new(0),
            sealed: Mutex::new(HashSet::new()),
            readers: Mutex::new(HashMap::new()),
            max_size: std::sync::atomic::AtomicU64::new(u64::MAX),
            row_limits: Mutex::new(HashMap::new()),
            fail_on_limit: std::sync::atomic::AtomicBool::new(false),
            digests: std::sync::atomic::AtomicBool::new(false),
            broken: Mutex::new(HashMap::new()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn paths(&self, row: i64) -> Paths {
        let dir = self.dir.join((row / 1000).to_string());
        Paths {
            data: dir.join(format!("{row}.log")),
            index: dir.join(format!("{row}.idx")),
            zst: dir.join(format!("{row}.zst")),
            frames: dir.join(format!("{row}.frames")),
            dir,
        }
    }

    /// The writer of `row`, opened (and its files cut back to their last
    /// whole chunk) if it is not open; `None` if the step's log is already
    /// compressed or being compressed (it has ended: nothing more is
    /// written to it).
    fn writer(&self, row: i64) -> io::Result<Option<Arc<Mutex<Writer>>>> {
        let stamp = self.uses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((w, used)) = open.get_mut(&row) {
            *used = stamp;
            return Ok(Some(w.clone()));
        }
        if self
            .sealed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&row)
        {
            return Ok(None);
        }
        let p = self.paths(row);
        if p.zst.exists() {
            return Ok(None);
        }
        let created = !p.dir.exists();
        fs::create_dir_all(&p.dir)?;
        if created {
            sync_dir(&self.dir)?;
        }
        let new = !p.data.exists();
        let options = || {
            let mut o = OpenOptions::new();
            o.read(true).append(true).create(true);
            o
        };
        let data = options().open(&p.data)?;
        let index = options().open(&p.index)?;
        if new {
            sync_dir(&p.dir)?;
        }
        let stats = recover(&data, &index)?;
        let (count, last) = whole_records(&index, stats.bytes)?;
        let max = self.max_for(row);
        if open.len() >= MAX_OPEN
            && let Some(oldest) = open
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(r, _)| *r)
        {
            open.remove(&oldest);
        }
        let digests = self.digests.load(std::sync::atomic::Ordering::Relaxed);
        let w = Arc::new(Mutex::new(Writer {
            data: Arc::new(data),
            index: Arc::new(index),
            stats,
            count,
            last,
            cut: stats.bytes > max,
            digest: (digests && stats.bytes == 0).then(<sha2::Sha256 as sha2::Digest>::new),
            released: 0,
        }));
        open.insert(row, (w.clone(), stamp));
        Ok(Some(w))
    }

    /// The most bytes one step's log keeps (`[master] max_log_size`); past
    /// it, one marker line, then nothing more; and whether the step then
    /// fails (`on_log_limit = "fail"`) or goes on.
    pub fn set_max_log_size(&self, max: u64, fail: bool) {
        self.max_size
            .store(max, std::sync::atomic::Ordering::Relaxed);
        self.fail_on_limit
            .store(fail, std::sync::atomic::Ordering::Relaxed);
    }

    /// Holds `row` to at most `max` bytes (below `max_log_size`), until
    /// it is closed.
    pub fn limit_row(&self, row: i64, max: u64) {
        self.row_limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(row, max);
    }

    /// The most bytes `row` keeps.
    fn max_for(&self, row: i64) -> u64 {
        let max = self.max_size.load(std::sync::atomic::Ordering::Relaxed);
        match self
            .row_limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&row)
        {
            Some(m) => max.min(*m),
            None => max,
        }
    }

    /// Whether a step past `max_log_size` fails.
    pub fn fails_on_limit(&self) -> bool {
        self.fail_on_limit
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `max_log_size`.
    pub fn max_log_size(&self) -> u64 {
        self.max_size.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Why `row`'s log could not take its output, if it could not (the
    /// disk was full, say): the step fails with this.
    pub fn trouble(&self, row: i64) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&row)
            .cloned()
    }

    /// Whether `row`'s log went past `max_log_size` (and so was cut).
    pub fn over_limit(&self, row: i64) -> io::Result<bool> {
        let max = self.max_for(row);
        Ok(self.stats(row)?.is_some_and(|s| s.bytes > max))
    }

    /// Appends chunks (of any steps, each step's in order) and syncs them
    /// to disk before returning. A chunk whose sequence number is not above
    /// its step's last stored one is a replay and is skipped; chunks of a
    /// step whose log is compressed (it has ended) are skipped too.
    ///
    /// What went wrong for one step does not stop the others: a step whose
    /// files cannot be written (a full disk) is cut back to what was
    /// stored, takes no more output, and is reported; so is a step whose
    /// log passes `max_log_size` (its output is cut there, with a marker
    /// line). Its later chunks count as stored, so that the worker lets
    /// go of them.
    pub fn append(&self, chunks: &[LogChunk]) -> io::Result<Vec<LogTrouble>> {
        let (mut troubles, unsynced) = self.write(chunks)?;
        troubles.extend(self.sync(unsynced));
        Ok(troubles)
    }

    /// [`LogFiles::append`]'s first half: writes the chunks, without
    /// syncing them; returns what [`LogFiles::sync`] must then make
    /// durable. The next batch may be written while this one syncs (in
    /// order: after this returns); nothing is acknowledged before its sync.
    pub fn write(&self, chunks: &[LogChunk]) -> io::Result<(Vec<LogTrouble>, Unsynced)> {
        let mut unsynced = Unsynced(Vec::new());
        let mut by_step: Vec<(i64, Vec<&LogChunk>)> = Vec::new();
        for c in chunks {
            match by_step.iter_mut().find(|(r, _)| *r == c.step) {
                Some((_, v)) => v.push(c),
                None => by_step.push((c.step, vec![c])),
            }
        }
        let mut troubles = Vec::new();
        for (row, chunks) in by_step {
            if self.trouble(row).is_some() {
                continue;
            }
            let max = self.max_for(row);
            let w = match self.writer(row) {
                Ok(Some(w)) => w,
                Ok(None) => {
                    tracing::warn!(
                        step = row,
                        "output for a step whose log is already compressed; not stored"
                    );
                    continue;
                }
                Err(e) => {
                    troubles.push(self.broke(row, &e));
                    continue;
                }
            };
            let w_arc = w;
            let mut guard = w_arc.lock().unwrap_or_else(|e| e.into_inner());
            let w = &mut *guard;
            // What is written: the chunks' bytes where they are (no copy),
            // and the marker line where a step passes its limit (once).
            let mut parts: Vec<&[u8]> = Vec::new();
            let mut marked: Option<(usize, Vec<u8>)> = None;
            let mut records = Vec::new();
            let mut stats = w.stats;
            let mut last = w.last;
            let mut cut = false;
            for c in chunks {
                if c.seq <= stats.last_seq || c.data.is_empty() {
                    continue;
                }
                let mut stored = &c.data[..];
                let mut marker = Vec::new();
                if stats.bytes > max || w.cut {
                    // Cut already: only the sequence number moves on.
                    stored = &[];
                } else if stats.bytes + stored.len() as u64 > max {
                    stored = &stored[..(max - stats.bytes) as usize];
                    let ends_line = match stored.last() {
                        Some(b) => *b == b'\n',
                        None => stats.bytes == 0 || w.last_byte()? == Some(b'\n'),
                    };
                    if !ends_line {
                        marker.push(b'\n');
                    }
                    marker.extend_from_slice(
                        format!(
                            "[switchyard: this step's output passed max_log_size ({max} bytes); the rest was not stored]\n"
                        )
                        .as_bytes(),
                    );
                    cut = true;
                    w.cut = true;
                }
                let len = stored.len() + marker.len();
                let lines = stats.lines + memchr_count(stored) + memchr_count(&marker);
                let record = Record {
                    seq: c.seq,
                    offset: stats.bytes,
                    len: len as u32,
                    stream: c.stream,
                    lines,
                };
                records.extend_from_slice(&record.encode());
                last = Some(record);
                parts.push(stored);
                if !marker.is_empty() {
                    marked = Some((parts.len(), marker));
                }
                stats = LogStats {
                    bytes: stats.bytes + len as u64,
                    lines,
                    last_seq: c.seq,
                };
            }
            if records.is_empty() {
                continue;
            }
            if let Some((at, marker)) = &marked {
                parts.insert(*at, marker);
            }
            let from = w.stats.bytes;
            let written = (|| {
                write_all_parts(&w.data, &parts)?;
                (&*w.index).write_all(&records)?;
                // The index's few new bytes start for the disk now, so that
                // the data's sync commits both (one journal commit, not
                // two, on ext4); the index's own sync then finds them done.
                crate::pagecache::start_writeback(&w.index, w.count * RECORD, records.len() as u64);
                // An upload is hashed while the disk takes the batch: its
                // writeback starts first, the sync then waits for less.
                // (If the sync fails, the writer and its digest go.)
                if let Some(h) = w.digest.as_mut() {
                    crate::pagecache::start_writeback(&w.data, from, stats.bytes - from);
                    for p in &parts {
                        sha2::Digest::update(&mut *h, p);
                    }
                }
                Ok::<(), io::Error>(())
            })();
            if let Err(e) = written {
                // Back to what was stored: nothing stored is damaged.
                let _ = recover(&w.data, &w.index);
                drop(guard);
                troubles.push(self.broke(row, &e));
                continue;
            }
            w.stats = stats;
            w.count += (records.len() as u64) / RECORD;
            w.last = last;
            unsynced.0.push(ToSync {
                row,
                writer: w_arc.clone(),
                data: w.data.clone(),
                index: w.index.clone(),
                end: stats.bytes,
            });
            if cut {
                troubles.push(LogTrouble::OverLimit { row, max });
            }
        }
        Ok((troubles, unsynced))
    }

    /// [`LogFiles::append`]'s second half: syncs what [`LogFiles::write`]
    /// wrote. A step whose files cannot be synced is cut back and takes no
    /// more output, as for a failed write.
    pub fn sync(&self, unsynced: Unsynced) -> Vec<LogTrouble> {
        let mut troubles = Vec::new();
        for s in unsynced.0 {
            if let Err(e) = s.data.sync_data().and_then(|()| s.index.sync_data()) {
                {
                    let w = s.writer.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = recover(&w.data, &w.index);
                }
                if self.trouble(s.row).is_none() {
                    troubles.push(self.broke(s.row, &e));
                }
                continue;
            }
            let mut w = s.writer.lock().unwrap_or_else(|e| e.into_inner());
            release_synced(&mut w, s.end);
        }
        troubles
    }

    /// Marks `row` as unable to take output, for `e`.
    fn broke(&self, row: i64, e: &io::Error) -> LogTrouble {
        let why = format!("the master could not store this step's output: {e}");
        tracing::error!(step = row, error = %e, "cannot write a step's log; the step fails");
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&row);
        self.broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(row, why.clone());
        LogTrouble::CannotWrite { row, why }
    }

    /// What `row`'s log holds, from its files (`None`: it has none).
    pub fn stats(&self, row: i64) -> io::Result<Option<LogStats>> {
        if let Some((w, _)) = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&row)
        {
            return Ok(Some(w.lock().unwrap_or_else(|e| e.into_inner()).stats));
        }
        Ok(self.reader(row)?.map(|r| r.stats()))
    }

    /// Closes `row`'s writer: its step has ended (and what went wrong
    /// with its log has been told). A reader kept open for it goes too
    /// (its log is about to be compressed or removed).
    pub fn close(&self, row: i64) {
        self.readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&row);
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&row);
        self.broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&row);
        self.row_limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&row);
    }

    /// A reader of `row`'s log, or `None` if it has no files (no output
    /// yet, or a log kept in the database by an older master).
    pub fn reader(&self, row: i64) -> io::Result<Option<LogReader>> {
        // A running step's: its writer's files, as far as they are written.
        if let Some((w, _)) = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&row)
        {
            let w = w.lock().unwrap_or_else(|e| e.into_inner());
            return Ok(Some(LogReader {
                index: w.index.clone(),
                count: w.count,
                last: w.last,
                body: Body::Plain(w.data.clone()),
            }));
        }
        if let Some(r) = self
            .readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&row)
        {
            return Ok(Some(r.clone()));
        }
        let p = self.paths(row);
        // Twice: compression may swap the files between the two looks.
        for _ in 0..2 {
            let index = match File::open(&p.index) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            // The frames are looked for only beside a compressed log (one
            // failed open less for a plain one).
            let compressed = File::open(&p.zst).map(|zst| (zst, File::open(&p.frames)));
            match compressed {
                Ok((zst, Ok(frames))) => {
                    let n = frames.metadata()?.len() / FRAME_RECORD;
                    let r = LogReader::new(
                        index,
                        Body::Compressed {
                            packed_len: zst.metadata()?.len(),
                            zst: Arc::new(zst),
                            frames: Arc::new(frames),
                            count: n,
                        },
                    )?;
                    let mut cached = self.readers.lock().unwrap_or_else(|e| e.into_inner());
                    if cached.len() >= MAX_CACHED_READERS
                        && let Some(any) = cached.keys().next().copied()
                    {
                        cached.remove(&any);
                    }
                    cached.insert(row, r.clone());
                    return Ok(Some(r));
                }
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            match File::open(&p.data) {
                Ok(data) => return LogReader::new(index, Body::Plain(Arc::new(data))).map(Some),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Refuses appends to `row` from now on (its writer is closed): an
    /// upload checked and kept, or discarded, takes no replayed chunk.
    pub fn seal(&self, row: i64) {
        self.sealed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(row);
        self.close(row);
    }

    /// Takes appends to `row` again (its step's end is recorded).
    pub fn unseal(&self, row: i64) {
        self.sealed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&row);
    }

    /// Compresses `row`'s ended log (see the module's doc). Nothing to do
    /// if it has no plain log.
    pub fn compress(&self, row: i64) -> io::Result<()> {
        self.sealed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(row);
        self.close(row);
        let result = self.compress_sealed(row);
        self.sealed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&row);
        result
    }

    fn compress_sealed(&self, row: i64) -> io::Result<()> {
        let p = self.paths(row);
        let mut data = match OpenOptions::new().read(true).write(true).open(&p.data) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if p.zst.exists() {
            // Compressed before a crash that left the plain file.
            return remove_if_there(&p.data);
        }
        let index = OpenOptions::new().read(true).write(true).open(&p.index)?;
        let stats = recover(&data, &index)?;
        let tmp_zst = p.dir.join(format!(".{row}.zst.tmp"));
        let tmp_frames = p.dir.join(format!(".{row}.frames.tmp"));
        let tail_plain = if stats.bytes >= PLAIN_TAIL_FROM {
            TAIL_PLAIN
        } else {
            0
        };
        let written = write_compressed(&mut data, stats, &tmp_zst, &tmp_frames, tail_plain);
        if written.is_err() {
            // A full disk, say: the plain log stays, and takes no room twice.
            let _ = remove_if_there(&tmp_zst);
            let _ = remove_if_there(&tmp_frames);
        }
        written?;
        fs::rename(&tmp_frames, &p.frames)?;
        fs::rename(&tmp_zst, &p.zst)?;
        sync_dir(&p.dir)?;
        fs::remove_file(&p.data)?;
        sync_dir(&p.dir)
    }

    /// Writers keep the SHA-256 of what they store from now on (see
    /// [`LogFiles::digest`]).
    pub fn keep_digests(&self) {
        self.digests
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The SHA-256 (hex) of everything `row`'s log holds, if its writer
    /// kept it (it saw the file from its start, in this process).
    pub fn digest(&self, row: i64) -> Option<String> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (w, _) = open.get(&row)?;
        let w = w.lock().unwrap_or_else(|e| e.into_inner());
        let h = w.digest.clone()?;
        Some(crate::wire::hex(&sha2::Digest::finalize(h)))
    }

    /// The plain log file and the index of `row`.
    pub fn files_of(&self, row: i64) -> (PathBuf, PathBuf) {
        let p = self.paths(row);
        (p.data, p.index)
    }

    /// Removes every file of `row`'s log.
    pub fn remove(&self, row: i64) -> io::Result<()> {
        self.close(row);
        let p = self.paths(row);
        for f in [&p.zst, &p.frames, &p.data, &p.index] {
            remove_if_there(f)?;
        }
        Ok(())
    }
}

/// Writes `data`'s first `stats.bytes` as frames to `zst`, and the
/// frame table to `frames`, both synced; the frames covering the last
/// `tail_plain` bytes are stored as they are (masters before that stored
/// every frame compressed: both read alike).
fn write_compressed(
    data: &mut File,
    stats: LogStats,
    tmp_zst: &Path,
    tmp_frames: &Path,
    tail_plain: u64,
) -> io::Result<()> {
    let mut zst = File::create(tmp_zst)?;
    let mut frames = io::BufWriter::new(File::create(tmp_frames)?);
    let mut compressor = zstd::bulk::Compressor::new(LEVEL)?;
    let mut buf = vec![0u8; FRAME];
    let (mut raw, mut packed) = (0u64, 0u64);
    while raw < stats.bytes {
        let n = (stats.bytes - raw).min(FRAME as u64) as usize;
        data.read_exact(&mut buf[..n])?;
        // The last frames as they are: the end is what is read most.
        let plain = tail_plain > 0 && raw + n as u64 > stats.bytes.saturating_sub(tail_plain);
        let frame = if plain {
            buf[..n].to_vec()
        } else {
            compressor.compress(&buf[..n])?
        };
        zst.write_all(&frame)?;
        frames.write_all(&raw.to_le_bytes())?;
        let mark = if plain { RAW_FRAME } else { 0 };
        frames.write_all(&(packed | mark).to_le_bytes())?;
        raw += n as u64;
        packed += frame.len() as u64;
    }
    zst.sync_all()?;
    let frames = frames.into_inner().map_err(|e| e.into_error())?;
    frames.sync_all()
}

/// Writes `parts` one after the other, in as few `writev` calls as the
/// system allows.
fn write_all_parts(mut f: &File, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| io::IoSlice::new(p))
        .collect();
    let mut left = &mut slices[..];
    while !left.is_empty() {
        match f.write_vectored(left) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut left, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn remove_if_there(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn memchr_count(data: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', data).count() as u64
}

/// The number of whole records in `index` whose bytes `data_len` holds,
/// and the last of them.
fn whole_records(index: &File, data_len: u64) -> io::Result<(u64, Option<Record>)> {
    let mut n = index.metadata()?.len() / RECORD;
    while n > 0 {
        let mut b = [0u8; RECORD as usize];
        read_exact_at(index, &mut b, (n - 1) * RECORD)?;
        let r = Record::decode(&b);
        if r.end() <= data_len {
            return Ok((n, Some(r)));
        }
        n -= 1;
    }
    Ok((0, None))
}

/// Cuts a step's files back to their last whole chunk (what a crash
/// mid-append leaves); returns what they then hold.
fn recover(data: &File, index: &File) -> io::Result<LogStats> {
    let data_len = data.metadata()?.len();
    let (n, last) = whole_records(index, data_len)?;
    let stats = last.map_or(LogStats::default(), |r| LogStats {
        bytes: r.end(),
        lines: r.lines,
        last_seq: r.seq,
    });
    if index.metadata()?.len() != n * RECORD {
        index.set_len(n * RECORD)?;
        index.sync_data()?;
    }
    if data_len != stats.bytes {
        data.set_len(stats.bytes)?;
        data.sync_data()?;
    }
    Ok(stats)
}

#[derive(Clone)]
enum Body {
    Plain(Arc<File>),
    Compressed {
        zst: Arc<File>,
        frames: Arc<File>,
        count: u64,
        packed_len: u64,
    },
}

/// Reads one step's log: chunks by sequence number, byte ranges, the last
/// lines. Sees the log as it was when it was opened.
#[derive(Clone)]
pub struct LogReader {
    index: Arc<File>,
    count: u64,
    last: Option<Record>,
    body: Body,
}

impl LogReader {
    fn new(index: File, body: Body) -> io::Result<Self> {
        let index = Arc::new(index);
        let data_len = match &body {
            Body::Plain(f) => f.metadata()?.len(),
            Body::Compressed { .. } => u64::MAX,
        };
        let (count, last) = whole_records(&index, data_len)?;
        Ok(LogReader {
            index,
            count,
            last,
            body,
        })
    }

    /// What the log holds.
    pub fn stats(&self) -> LogStats {
        self.last.map_or(LogStats::default(), |r| LogStats {
            bytes: r.end(),
            lines: r.lines,
            last_seq: r.seq,
        })
    }

    /// How many chunks it holds.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Chunk `i`'s record.
    pub fn record(&self, i: u64) -> io::Result<Record> {
        let mut b = [0u8; RECORD as usize];
        read_exact_at(&self.index, &mut b, i * RECORD)?;
        Ok(Record::decode(&b))
    }

    /// The first chunk for which `past` is true (all chunks after it too),
    /// or `count()`.
    pub fn first(&self, past: impl Fn(&Record) -> bool) -> io::Result<u64> {
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if past(&self.record(mid)?) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(lo)
    }

    /// The output's bytes `start..end` (within what the log holds).
    pub fn read(&self, start: u64, end: u64) -> io::Result<Vec<u8>> {
        let end = end.min(self.stats().bytes);
        if start >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; (end - start) as usize];
        self.read_into(start, &mut buf)?;
        Ok(buf)
    }

    /// Fills `out` with the output's bytes from `start` (all within what
    /// the log holds). A compressed log's stored frames (its end) are read
    /// as they are; the others are decompressed, each once.
    fn read_into(&self, start: u64, out: &mut [u8]) -> io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let end = start + out.len() as u64;
        match &self.body {
            Body::Plain(f) => read_exact_at(f, out, start),
            Body::Compressed {
                zst,
                frames,
                count,
                packed_len,
            } => {
                // (raw offset, packed offset, stored as it is)
                let frame = |i: u64| -> io::Result<(u64, u64, bool)> {
                    let mut b = [0u8; FRAME_RECORD as usize];
                    read_exact_at(frames, &mut b, i * FRAME_RECORD)?;
                    let packed = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
                    Ok((
                        u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
                        packed & !RAW_FRAME,
                        packed & RAW_FRAME != 0,
                    ))
                };
                let short = || {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a compressed log is shorter than its index",
                    )
                };
                // Frames hold FRAME bytes each but the last.
                let first = start / FRAME as u64;
                let last = ((end - 1) / FRAME as u64).min(count.saturating_sub(1));
                let (raw_from, packed_from, stored) = frame(first)?;
                if stored {
                    // The stored frames are the last ones: one read.
                    if packed_from + (end - raw_from) > *packed_len {
                        return Err(short());
                    }
                    return read_exact_at(zst, out, packed_from + (start - raw_from));
                }
                let packed_to = if last + 1 < *count {
                    frame(last + 1)?.1
                } else {
                    *packed_len
                };
                let mut packed = vec![0u8; (packed_to - packed_from) as usize];
                read_exact_at(zst, &mut packed, packed_from)?;
                let mut raw = Vec::with_capacity(((last - first + 1) as usize) * FRAME);
                let mut d = zstd::bulk::Decompressor::new()?;
                let mut at = 0usize;
                let mut stored = false;
                for i in first..=last {
                    let (next, next_stored) = if i + 1 < *count && i < last {
                        let (_, p, s) = frame(i + 1)?;
                        ((p - packed_from) as usize, s)
                    } else {
                        (packed.len(), false)
                    };
                    if stored {
                        raw.extend_from_slice(&packed[at..next]);
                    } else {
                        raw.extend(d.decompress(&packed[at..next], FRAME)?);
                    }
                    at = next;
                    stored = next_stored;
                }
                let from = (start - raw_from) as usize;
                let to = (end - raw_from) as usize;
                if to > raw.len() {
                    return Err(short());
                }
                out.copy_from_slice(&raw[from..to]);
                Ok(())
            }
        }
    }

    /// Chunks `from..to` (indexes), with their bytes.
    pub fn chunks(&self, row: i64, from: u64, to: u64) -> io::Result<Vec<LogChunk>> {
        if from >= to {
            return Ok(Vec::new());
        }
        let records: Vec<Record> = (from..to)
            .map(|i| self.record(i))
            .collect::<io::Result<_>>()?;
        let start = records[0].offset;
        let bytes = bytes::Bytes::from(self.read(start, records[records.len() - 1].end())?);
        Ok(records
            .iter()
            .map(|r| LogChunk {
                step: row,
                seq: r.seq,
                stream: r.stream,
                data: bytes.slice((r.offset - start) as usize..(r.end() - start) as usize),
            })
            .collect())
    }

    /// Where the last `lines` lines start (a trailing newline ends the last
    /// line, it does not begin another).
    pub fn start_of_last_lines(&self, lines: u64) -> io::Result<u64> {
        Ok(self.last_lines(lines)?.0)
    }

    /// The last `lines` lines: where they start, and their bytes. Reads the
    /// index's last records in one read (the wanted lines are usually in
    /// the last few chunks), else searches it; then the bytes from the
    /// chunk where the lines start, once.
    pub fn last_lines(&self, lines: u64) -> io::Result<(u64, Vec<u8>)> {
        let stats = self.stats();
        let Some(last) = self.last else {
            return Ok((0, Vec::new()));
        };
        if lines == 0 {
            return Ok((stats.bytes, Vec::new()));
        }
        const TAIL_RECORDS: u64 = 32;
        let from = self.count.saturating_sub(TAIL_RECORDS);
        let mut buf = vec![0u8; ((self.count - from) * RECORD) as usize];
        read_exact_at(&self.index, &mut buf, from * RECORD)?;
        let tail: Vec<Record> = buf
            .chunks_exact(RECORD as usize)
            .map(|b| Record::decode(b.try_into().expect("a record")))
            .collect();
        // Most logs end with a newline (which ends the last line rather
        // than starting another): assumed first, checked on the bytes.
        for ends_line in [true, false] {
            let wanted = lines + u64::from(ends_line);
            if stats.lines < wanted {
                let data = self.read(0, stats.bytes)?;
                if (data.last() == Some(&b'\n')) == ends_line {
                    return Ok((0, data));
                }
                continue;
            }
            // The newline just before the wanted lines is number `target`
            // (counting from 1): found in the first chunk whose running
            // count reaches it.
            let target = stats.lines - wanted + 1;
            let r = match tail.iter().position(|r| r.lines >= target) {
                Some(0) if from > 0 => self.record(self.first(|r| r.lines >= target)?)?,
                Some(i) => tail[i],
                None => last,
            };
            // The newline before the lines is the `after`th from chunk
            // `r`'s end: found reading back from there a block at a time
            // (the chunk may be much longer than what is left of it).
            let after = r.lines - target + 1;
            // (Where a compressed log's frames are decompressed, a frame.)
            let block = match self.body {
                Body::Compressed { .. } if stats.bytes - r.offset > TAIL_PLAIN => FRAME as u64,
                _ => 16 * 1024,
            };
            let (mut hi, mut seen) = (r.end(), 0u64);
            let start = loop {
                let lo = hi.saturating_sub(block).max(r.offset);
                let block = self.read(lo, hi)?;
                let n = memchr_count(&block);
                if seen + n >= after {
                    let i = memchr::memrchr_iter(b'\n', &block)
                        .nth((after - seen - 1) as usize)
                        .expect("counted");
                    break lo + i as u64 + 1;
                }
                if lo == r.offset {
                    break r.offset; // the index said otherwise: from the chunk's start
                }
                seen += n;
                hi = lo;
            };
            let mut data = vec![0u8; (stats.bytes - start) as usize];
            self.read_into(start, &mut data)?;
            if (data.last() == Some(&b'\n')) != ends_line {
                continue;
            }
            return Ok((start, data));
        }
        unreachable!("a log ends with a newline or it does not")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(step: i64, seq: u64, text: &str) -> LogChunk {
        LogChunk {
            step,
            seq,
            stream: if seq.is_multiple_of(2) { 2 } else { 1 },
            data: bytes::Bytes::copy_from_slice(text.as_bytes()),
        }
    }

    fn all(r: &LogReader) -> Vec<u8> {
        r.read(0, r.stats().bytes).unwrap()
    }

    #[test]
    fn synced_pages_are_let_go_of_and_the_log_and_its_digest_stay_exact() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogFiles::new(dir.path().join("logs"));
        logs.keep_digests();
        // 20 MiB of distinct 64 KiB chunks, in 2 MiB batches.
        let mut expected = Vec::new();
        let chunks: Vec<LogChunk> = (1..=320u64)
            .map(|seq| {
                let line = format!("chunk {seq:04} {}\n", "y".repeat(1000));
                let text = line.repeat(65_536 / line.len());
                expected.extend_from_slice(text.as_bytes());
                chunk(77, seq, &text)
            })
            .collect();
        // As a session stores them: each batch written while the one
        // before it syncs.
        let mut syncing = None;
        for batch in chunks.chunks(32) {
            let (troubles, unsynced) = logs.write(batch).unwrap();
            assert!(troubles.is_empty());
            if let Some(before) = syncing.replace(unsynced) {
                assert!(logs.sync(before).is_empty());
            }
        }
        assert!(logs.sync(syncing.unwrap()).is_empty());
        let total = expected.len() as u64;
        let released = {
            let open = logs.open.lock().unwrap();
            open.get(&77).unwrap().0.lock().unwrap().released
        };
        // All but the last KEEP_CACHED bytes (to a page) were let go of.
        assert!(
            released > total - KEEP_CACHED - 4096,
            "{released} of {total}"
        );
        assert!(released <= total - KEEP_CACHED);
        assert_eq!(released % 4096, 0);
        // Read back (from the disk, for the part let go of): byte-exact.
        let r = logs.reader(77).unwrap().unwrap();
        assert_eq!(r.stats().bytes, total);
        assert_eq!(all(&r), expected);
        // The digest, taken while the disk took each batch, is the data's.
        assert_eq!(
            logs.digest(77).unwrap(),
            crate::wire::hex(&<sha2::Sha256 as sha2::Digest>::digest(&expected))
        );
    }

    #[test]
    fn appends_reads_by_seq_range_and_last_lines_before_and_after_compression() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogFiles::new(dir.path().join("logs"));
        let mut expected = Vec::new();
        let mut chunks = Vec::new();
        for seq in 1..=3000u64 {
            let pad = "x".repeat(80);
            let text = format!(
                "line {seq} {pad}\n{}",
                if seq % 7 == 0 { "part " } else { "" }
            );
            expected.extend_from_slice(text.as_bytes());
            chunks.push(chunk(12_345, seq, &text));
        }
        // In two batches, the second replaying part of the first.
        logs.append(&chunks[..2000]).unwrap();
        logs.append(&chunks[1500..]).unwrap();
        // A copy compressed with its end kept plain, as a log of 8 MiB or
        // more is (this one is smaller: the store compresses it whole, as
        // masters before plain ends did), read after the store's own.
        let old = dir.path().join("old");
        std::fs::create_dir_all(old.join("logs/12")).unwrap();
        for f in ["12345.log", "12345.idx"] {
            std::fs::copy(
                dir.path().join("logs/12").join(f),
                old.join("logs/12").join(f),
            )
            .unwrap();
        }
        {
            let p = LogFiles::new(old.join("logs")).paths(12_345);
            let mut data = File::open(&p.data).unwrap();
            let stats = recover(&data, &File::open(&p.index).unwrap()).unwrap();
            write_compressed(&mut data, stats, &p.zst, &p.frames, TAIL_PLAIN).unwrap();
            std::fs::remove_file(&p.data).unwrap();
        }
        let old_logs = LogFiles::new(old.join("logs"));
        for (round, compressed) in [false, true, true].into_iter().enumerate() {
            let logs = if round == 2 { &old_logs } else { &logs };
            let r = logs.reader(12_345).unwrap().unwrap();
            assert_eq!(all(&r), expected, "compressed: {compressed}");
            assert_eq!(r.count(), 3000);
            assert_eq!(r.stats().last_seq, 3000);
            assert_eq!(r.stats().lines, 3000);
            // By sequence number.
            let i = r.first(|c| c.seq > 2500).unwrap();
            let page = r.chunks(12_345, i, i + 2).unwrap();
            assert_eq!(page[0].seq, 2501);
            assert_eq!(page[0].data, chunks[2500].data);
            assert_eq!(page[1].stream, chunks[2501].stream);
            // Any byte range, across frames.
            for (a, b) in [(0, 10), (65_530, 65_550), (1000, 150_000), (5, 5)] {
                let b = (b as usize).min(expected.len());
                assert_eq!(r.read(a, b as u64).unwrap(), expected[a as usize..b]);
            }
            // The last lines.
            let text = String::from_utf8(expected.clone()).unwrap();
            let line = |n: u64| format!("line {n} {}\n", "x".repeat(80));
            let from = r.start_of_last_lines(3).unwrap() as usize;
            assert_eq!(text[from..], line(2998) + &line(2999) + &line(3000));
            let from = r.start_of_last_lines(5).unwrap() as usize;
            assert_eq!(
                text[from..],
                line(2996) + "part " + &line(2997) + &line(2998) + &line(2999) + &line(3000)
            );
            assert!(expected.len() > 4 * FRAME, "several frames");
            let from = r.start_of_last_lines(100_000).unwrap();
            assert_eq!(from, 0);
            logs.compress(12_345).unwrap();
        }
        assert!(!dir.path().join("logs/12/12345.log").exists());
        // This one compressed whole; the copy's end stored as it is.
        let marks = |path: &Path| -> Vec<bool> {
            std::fs::read(path)
                .unwrap()
                .chunks_exact(FRAME_RECORD as usize)
                .map(|r| u64::from_le_bytes(r[8..16].try_into().unwrap()) & RAW_FRAME != 0)
                .collect()
        };
        assert_eq!(
            marks(&old.join("logs/12/12345.frames")),
            [false, false, true, true, true]
        );
        assert!(!marks(&dir.path().join("logs/12/12345.frames")).contains(&true));
        // A compressed log takes no more output.
        logs.append(&[chunk(12_345, 3001, "late\n")]).unwrap();
        assert_eq!(logs.stats(12_345).unwrap().unwrap().last_seq, 3000);
        logs.remove(12_345).unwrap();
        assert!(logs.reader(12_345).unwrap().is_none());
    }

    #[test]
    fn the_last_lines_of_a_log_that_does_not_end_its_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogFiles::new(dir.path().join("logs"));
        logs.append(&[chunk(3, 1, "a\nb\n"), chunk(3, 2, "c\nd"), chunk(3, 3, "e")])
            .unwrap();
        let r = logs.reader(3).unwrap().unwrap();
        assert_eq!(r.last_lines(1).unwrap(), (6, b"de".to_vec()));
        assert_eq!(r.last_lines(2).unwrap(), (4, b"c\nde".to_vec()));
        assert_eq!(r.last_lines(9).unwrap(), (0, b"a\nb\nc\nde".to_vec()));
        assert_eq!(r.last_lines(0).unwrap(), (8, Vec::new()));
    }

    #[test]
    fn a_sealed_step_takes_no_replayed_chunk_until_unsealed() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogFiles::new(dir.path().join("logs"));
        logs.append(&[chunk(4, 1, "bytes")]).unwrap();
        // Moved away (as a kept upload is), then sealed: a replay of its
        // chunks makes no new file.
        logs.seal(4);
        logs.remove(4).unwrap();
        logs.append(&[chunk(4, 1, "bytes"), chunk(4, 2, "more")])
            .unwrap();
        assert!(logs.reader(4).unwrap().is_none(), "a new file was started");
        logs.unseal(4);
        logs.append(&[chunk(4, 1, "again")]).unwrap();
        assert!(logs.reader(4).unwrap().is_some());
    }

    #[test]
    fn a_torn_append_is_cut_back_and_the_replay_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogFiles::new(dir.path().join("logs"));
        logs.append(&[chunk(7, 1, "one\n"), chunk(7, 2, "two\n")])
            .unwrap();
        logs.close(7);
        // A crash mid-append: bytes of chunk 3 and half its record.
        let p = logs.paths(7);
        OpenOptions::new()
            .append(true)
            .open(&p.data)
            .unwrap()
            .write_all(b"thr")
            .unwrap();
        let half = Record {
            seq: 3,
            offset: 8,
            len: 6,
            stream: 1,
            lines: 3,
        }
        .encode();
        OpenOptions::new()
            .append(true)
            .open(&p.index)
            .unwrap()
            .write_all(&half[..20])
            .unwrap();
        // A reader believes only whole chunks.
        assert_eq!(all(&logs.reader(7).unwrap().unwrap()), b"one\ntwo\n");
        // The worker sends 2 and 3 again.
        logs.append(&[chunk(7, 2, "two\n"), chunk(7, 3, "three\n")])
            .unwrap();
        let r = logs.reader(7).unwrap().unwrap();
        assert_eq!(all(&r), b"one\ntwo\nthree\n");
        assert_eq!(r.count(), 3);
    }
}
