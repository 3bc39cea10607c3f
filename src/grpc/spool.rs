//! A directory of changes the master has not acknowledged yet
//! (`sendchange --spool DIR`), sent in order by the next `sendchange` with
//! the same spool or by `switchyard sendchange --flush DIR`: a push made
//! while the master is down is built once it is back.
//!
//! Each change is one file, `NNNNNNNNNNNN.push` (the protobuf
//! `PushChangeRequest`: the change and a random `idempotency_key` chosen
//! when it was spooled), written to a temporary name, synced and renamed,
//! so a crash leaves either the whole change or none. A lock file keeps two
//! hooks running at once from sending the same change twice; changes are
//! numbered and sent in the order they were spooled. A change is removed
//! once the master acknowledged it (it is durable there by then). A crash,
//! or a lost answer, between the master storing it and the file's removal
//! sends it again on the next flush with the same key, and the master
//! stores nothing the second time: exactly once, never lost (within the
//! master's 7 days' memory of keys). A change the master refuses as
//! invalid would be refused forever: it is moved to `DIR/rejected/` with
//! the reason beside it, and the ones after it are sent.
//!
//! Spools written before keys existed hold `NNNNNNNNNNNN.change` files
//! (a bare `Change`); they are still sent in order, without a key.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prost::Message;

use super::client::{ChangeSourceConnection, SendChangeError};
use crate::proto::{Change, PushChangeRequest};

/// A spool directory.
#[derive(Debug, Clone)]
pub struct ChangeSpool {
    dir: PathBuf,
}

/// What went wrong with the spool itself (not with sending).
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("spool {0}: another sendchange held its lock for longer than {1:?}")]
    Busy(PathBuf, Duration),
    #[error("spool {path}: not a change this version can read: {why}")]
    Corrupt { path: PathBuf, why: String },
}

/// The spool, locked: only one process adds and sends at a time.
pub struct SpoolLock<'a> {
    spool: &'a ChangeSpool,
    _lock: nix::fcntl::Flock<File>,
}

/// What a flush did.
#[derive(Debug, Default)]
pub struct Flushed {
    /// Each change sent, as (its file, its id at the master), in order.
    pub sent: Vec<(PathBuf, i64)>,
    /// Changes the master refused as invalid, moved to `rejected/`, with
    /// why.
    pub rejected: Vec<(PathBuf, String)>,
    /// Why sending stopped early (the master went away, say); the changes
    /// not sent stay, in order.
    pub stopped: Option<SendChangeError>,
    /// Changes still waiting.
    pub left: usize,
}

impl ChangeSpool {
    /// The spool in `dir`, created (mode 700) if missing.
    pub fn open(dir: &Path) -> Result<Self, SpoolError> {
        let io = |source| SpoolError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        Ok(ChangeSpool {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self, source: std::io::Error) -> SpoolError {
        SpoolError::Io {
            dir: self.dir.clone(),
            source,
        }
    }

    /// Takes the spool's lock, waiting at most `wait` for another process
    /// to let go of it.
    pub async fn lock(&self, wait: Duration) -> Result<SpoolLock<'_>, SpoolError> {
        use nix::fcntl::{Flock, FlockArg};
        let until = Instant::now() + wait;
        loop {
            let file = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(self.dir.join(".lock"))
                .map_err(|e| self.io(e))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => {
                    return Ok(SpoolLock {
                        spool: self,
                        _lock: lock,
                    });
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(SpoolError::Busy(self.dir.clone(), wait));
                }
                Err((_, e)) => return Err(self.io(e.into())),
            }
        }
    }
}

/// A spooled file's number, for files this spool sends: `N.push`, and
/// `N.change` from before keys.
fn number_of(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".push")
        .or_else(|| name.strip_suffix(".change"))?
        .parse()
        .ok()
}

/// A fresh key for a spooled change: 128 random bits, in hex.
fn new_key() -> String {
    let mut raw = [0u8; 16];
    rand::fill(&mut raw[..]);
    crate::wire::hex(&raw)
}

/// The change a spooled file holds, with its key (none for old files).
fn read_spooled(path: &Path, bytes: &[u8]) -> Result<(Change, Option<String>), SpoolError> {
    let corrupt = |why: String| SpoolError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    if path.extension().is_some_and(|e| e == "change") {
        let change = Change::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
        return Ok((change, None));
    }
    let req = PushChangeRequest::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    let change = req
        .change
        .ok_or_else(|| corrupt("no change in it".into()))?;
    if req.idempotency_key.is_empty() {
        return Err(corrupt("no key in it".into()));
    }
    Ok((change, Some(req.idempotency_key)))
}

impl SpoolLock<'_> {
    /// The changes waiting, oldest first.
    pub fn pending(&self) -> Result<Vec<PathBuf>, SpoolError> {
        let mut found: Vec<(u64, PathBuf)> = fs::read_dir(&self.spool.dir)
            .map_err(|e| self.spool.io(e))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter_map(|p| number_of(&p).map(|n| (n, p)))
            .collect();
        found.sort();
        Ok(found.into_iter().map(|(_, p)| p).collect())
    }

    /// Adds a change after those waiting; durable when this returns.
    pub fn add(&self, change: &Change) -> Result<PathBuf, SpoolError> {
        let next = self
            .pending()?
            .last()
            .and_then(|p| number_of(p))
            .map_or(1, |n| n + 1);
        let path = self.spool.dir.join(format!("{next:012}.push"));
        let record = PushChangeRequest {
            change: Some(change.clone()),
            idempotency_key: new_key(),
        };
        let tmp = self.spool.dir.join(format!(".{next:012}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&record.encode_to_vec())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.spool.dir)?.sync_all()
        };
        write().map_err(|e| self.spool.io(e))?;
        Ok(path)
    }

    /// Sends the waiting changes in order over `conn`, removing each once
    /// the master acknowledged it; stops at the first failure that is not
    /// the change's own fault.
    pub async fn flush(&self, conn: &mut ChangeSourceConnection) -> Result<Flushed, SpoolError> {
        let mut out = Flushed::default();
        let pending = self.pending()?;
        let total = pending.len();
        for (i, path) in pending.into_iter().enumerate() {
            let bytes = fs::read(&path).map_err(|e| self.spool.io(e))?;
            let (change, key) = read_spooled(&path, &bytes)?;
            let pushed = match key {
                Some(key) => conn.push_once(change, &key).await,
                None => conn.push(change).await,
            };
            match pushed {
                Ok(id) => {
                    fs::remove_file(&path).map_err(|e| self.spool.io(e))?;
                    out.sent.push((path, id));
                }
                Err(SendChangeError::Invalid(why)) => {
                    let rejected = self.spool.dir.join("rejected");
                    fs::create_dir_all(&rejected).map_err(|e| self.spool.io(e))?;
                    let name = path.file_name().unwrap_or_default();
                    let to = rejected.join(name);
                    fs::rename(&path, &to).map_err(|e| self.spool.io(e))?;
                    let _ = fs::write(to.with_extension("why"), format!("{why}\n"));
                    out.rejected.push((to, why));
                }
                Err(e) => {
                    out.stopped = Some(e);
                    out.left = total - i;
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }
}
