//! The worker's side of a `download` step: an artifact of another build,
//! fetched from the master over the worker's session and written into the
//! step's directory.
//!
//! Lifecycle: [`Download::open`] checks where it may write (the
//! destination is relative, without `..`, and no symbolic link may lead it
//! out of the step's directory) and creates a hidden partial file beside
//! the destination. The agent then asks the master for the bytes the file
//! does not have yet, a few pieces ahead ([`Download::asks`]), and writes
//! each answer at the file's end ([`Download::take`]). When the link drops
//! nothing is lost: the next session asks again from the file's end
//! ([`Download::rewind`]). Once every byte is there, [`Download::finish`]
//! (blocking) syncs the file, checks its SHA-256, and moves it into place
//! (or unpacks a directory's tar stream into the destination); nothing takes
//! the destination's place before the check. [`Download::abandon`] removes
//! the partial file of a download that will not finish.

use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::proto::ArtifactWanted;

/// Bytes asked for in one request (the master answers at most a MiB).
pub const PIECE: u32 = 1 << 20;
/// Bytes asked for and not yet received, at most.
pub const AHEAD: u64 = 8 << 20;
/// Asked-for bytes that have not come for this long are asked for again.
pub const STALL: Duration = Duration::from_secs(10);

/// How far behind what is written the page cache is let go of: by then
/// its writeback (started as each piece is written) has ended.
const RELEASE_BEHIND: u64 = 32 << 20;

/// A download in progress.
pub struct Download {
    spec: crate::proto::Download,
    step_id: Vec<u8>,
    /// Where the artifact goes (the file, or the directory to unpack into).
    dest: PathBuf,
    partial: PathBuf,
    file: std::fs::File,
    hash: Sha256,
    written: u64,
    /// The file's bytes below this were let go of from the page cache.
    released: u64,
    asked: u64,
    progress: Instant,
    /// The step's timeout, as a point in time.
    deadline: Option<Instant>,
}

/// Makes the directory `dir` (inside `root`, canonical) and what it lacks
/// of its parents, refusing if an existing part leads outside `root`
/// through a symbolic link. Returns it canonical.
fn make_dir_inside(root: &Path, dir: &Path) -> Result<PathBuf, String> {
    let mut existing = dir;
    while std::fs::symlink_metadata(existing).is_err() {
        existing = existing
            .parent()
            .ok_or_else(|| format!("{} has no existing parent", dir.display()))?;
    }
    let outside = |p: &Path| {
        format!(
            "refused: {} leads outside the step's directory (a symbolic link)",
            p.display()
        )
    };
    let canon = existing
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", existing.display()))?;
    if !canon.starts_with(root) {
        return Err(outside(existing));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let canon = dir
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
    if !canon.starts_with(root) {
        return Err(outside(dir));
    }
    Ok(canon)
}

impl Download {
    /// Prepares the download of `spec` into `step_dir` (created if need
    /// be). `Err` says why it may not or cannot start.
    pub fn open(
        step_id: &[u8],
        spec: crate::proto::Download,
        step_dir: &Path,
        timeout: Option<Duration>,
    ) -> Result<Download, String> {
        if !super::upload::safe_source(&spec.dest) {
            return Err(format!(
                "refused: dest {:?} must be a relative path inside the step's directory",
                spec.dest
            ));
        }
        std::fs::create_dir_all(step_dir)
            .map_err(|e| format!("cannot create {}: {e}", step_dir.display()))?;
        let root = step_dir
            .canonicalize()
            .map_err(|e| format!("cannot resolve {}: {e}", step_dir.display()))?;
        let rel: PathBuf = Path::new(&spec.dest)
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        let (dest, partial) = if spec.unpack {
            // Unpacked into the directory `dest` (`.` is the step's own).
            let dest = make_dir_inside(&root, &root.join(&rel))?;
            let partial = dest.join(format!(".{}.switchyard-download", spec.name));
            (dest, partial)
        } else {
            let Some(name) = rel.file_name() else {
                return Err(format!("refused: dest {:?} names no file", spec.dest));
            };
            let parent = make_dir_inside(&root, &root.join(rel.parent().unwrap_or(Path::new(""))))?;
            let dest = parent.join(name);
            if std::fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
                return Err(format!(
                    "cannot download the file {:?} to {:?}: a directory is there",
                    spec.name, spec.dest
                ));
            }
            let partial = parent.join(format!(".{}.switchyard-download", name.to_string_lossy()));
            (dest, partial)
        };
        // Never written through a link someone left under that name.
        let _ = std::fs::remove_file(&partial);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
        Ok(Download {
            spec,
            step_id: step_id.to_vec(),
            dest,
            partial,
            file,
            hash: Sha256::new(),
            written: 0,
            released: 0,
            asked: 0,
            progress: Instant::now(),
            deadline: timeout.map(|t| Instant::now() + t),
        })
    }

    /// The line the step's log starts with.
    pub fn started_line(&self) -> String {
        format!(
            "switchyard: downloading the artifact {:?} ({} bytes{}) to {:?}\n",
            self.spec.name,
            self.spec.size,
            if self.spec.unpack {
                ", a directory"
            } else {
                ""
            },
            self.spec.dest
        )
    }

    /// Whether every byte has been written.
    pub fn complete(&self) -> bool {
        self.written == self.spec.size
    }

    /// The requests that keep [`AHEAD`] bytes asked for.
    pub fn asks(&mut self) -> Vec<ArtifactWanted> {
        let mut out = Vec::new();
        while self.asked < self.spec.size && self.asked - self.written < AHEAD {
            let length = (self.spec.size - self.asked).min(PIECE as u64) as u32;
            out.push(ArtifactWanted {
                step_id: self.step_id.clone(),
                offset: self.asked,
                length,
            });
            self.asked += length as u64;
        }
        out
    }

    /// Forgets what was asked and not received (a new session, or a
    /// stall): the next [`Self::asks`] start at the file's end.
    pub fn rewind(&mut self) {
        self.asked = self.written;
        self.progress = Instant::now();
    }

    /// Whether the step's timeout has passed.
    pub fn timed_out(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Whether asked-for bytes have not come for [`STALL`].
    pub fn stalled(&self) -> bool {
        self.asked > self.written && self.progress.elapsed() >= STALL
    }

    /// Writes an answer at the file's end. An answer for another offset
    /// (one asked for before a rewind) is ignored.
    pub fn take(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        if offset != self.written || data.is_empty() {
            return Ok(());
        }
        if self.written + data.len() as u64 > self.spec.size {
            return Err("the master sent more bytes than the artifact has".into());
        }
        self.file
            .write_all(data)
            .map_err(|e| format!("cannot write {}: {e}", self.partial.display()))?;
        // To the disk now, and out of memory once written (see
        // crate::pagecache): the step reads its download, if at all, after
        // it has all come.
        crate::pagecache::start_writeback(&self.file, self.written, data.len() as u64);
        self.hash.update(data);
        self.written += data.len() as u64;
        crate::pagecache::release(
            &self.file,
            &mut self.released,
            self.written.saturating_sub(RELEASE_BEHIND),
        );
        self.progress = Instant::now();
        Ok(())
    }

    /// Checks and places the downloaded artifact (blocking); returns the
    /// line the step's log ends with.
    pub fn finish(self) -> Result<String, String> {
        let Download {
            spec,
            dest,
            partial,
            file,
            hash,
            written,
            ..
        } = self;
        let gone = |why: String| {
            let _ = std::fs::remove_file(&partial);
            why
        };
        file.sync_all()
            .map_err(|e| gone(format!("cannot write {}: {e}", partial.display())))?;
        drop(file);
        let got = crate::wire::hex(&hash.finalize());
        if written != spec.size || got != spec.sha256 {
            return Err(gone(format!(
                "the artifact arrived damaged: {written} bytes with sha256 {got}, the master stored {} bytes with sha256 {}",
                spec.size, spec.sha256
            )));
        }
        if spec.unpack {
            let unpacked = std::fs::File::open(&partial).and_then(|f| {
                let mut archive = tar::Archive::new(std::io::BufReader::new(f));
                archive.set_overwrite(true);
                // Refuses entries that would land outside `dest`, also
                // through links the archive itself makes.
                archive.unpack(&dest)
            });
            let _ = std::fs::remove_file(&partial);
            unpacked
                .map_err(|e| format!("cannot unpack {:?} into {:?}: {e}", spec.name, spec.dest))?;
        } else {
            std::fs::rename(&partial, &dest).map_err(|e| {
                gone(format!(
                    "cannot put {:?} in place as {:?}: {e}",
                    spec.name, spec.dest
                ))
            })?;
            if let Some(dir) = dest.parent() {
                let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
            }
        }
        Ok(format!(
            "switchyard: downloaded {:?} to {:?}: {} bytes, sha256 {got}\n",
            spec.name, spec.dest, spec.size
        ))
    }

    /// Removes what a download that will not finish wrote.
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.partial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dest: &str, data: &[u8], unpack: bool) -> crate::proto::Download {
        crate::proto::Download {
            name: "app".into(),
            size: data.len() as u64,
            sha256: crate::wire::hex(&Sha256::digest(data)),
            dest: dest.into(),
            unpack,
        }
    }

    #[test]
    fn asks_ahead_rewinds_and_checks_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(3 * PIECE as usize + 7)).map(|i| i as u8).collect();
        let mut d = Download::open(b"id", spec("bin/app", &data, false), dir.path(), None).unwrap();
        let asks = d.asks();
        assert_eq!(asks.len(), 4);
        assert_eq!(asks[3].length, 7);
        assert!(d.asks().is_empty(), "all of it is asked for");
        // The first piece arrives; the rest is lost with the link.
        d.take(0, &data[..PIECE as usize]).unwrap();
        d.rewind();
        let asks = d.asks();
        assert_eq!(asks[0].offset, PIECE as u64);
        // A stale answer for another offset is ignored.
        d.take(0, &data[..10]).unwrap();
        d.take(PIECE as u64, &data[PIECE as usize..]).unwrap();
        assert!(d.complete());
        d.finish().unwrap();
        assert_eq!(std::fs::read(dir.path().join("bin/app")).unwrap(), data);
        // A damaged one never takes the destination's place.
        let mut s = spec("bin/app", b"new", false);
        s.sha256 = "00".repeat(32);
        let mut d = Download::open(b"id", s, dir.path(), None).unwrap();
        d.take(0, b"new").unwrap();
        assert!(d.finish().unwrap_err().contains("damaged"));
        assert_eq!(std::fs::read(dir.path().join("bin/app")).unwrap(), data);
        let left: Vec<_> = std::fs::read_dir(dir.path().join("bin")).unwrap().collect();
        assert_eq!(left.len(), 1, "the partial file is gone");
    }

    #[test]
    fn a_destination_cannot_leave_the_steps_directory() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let step = dir.path().join("step");
        std::fs::create_dir_all(&step).unwrap();
        std::os::unix::fs::symlink(outside.path(), step.join("out")).unwrap();
        for dest in ["../x", "/etc/x", "", "out/x", "out/new/x"] {
            let err = Download::open(b"id", spec(dest, b"x", false), &step, None)
                .err()
                .unwrap_or_else(|| panic!("{dest} was accepted"));
            assert!(err.starts_with("refused"), "{dest}: {err}");
        }
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // A link that stays inside is fine.
        std::fs::create_dir_all(step.join("real")).unwrap();
        std::os::unix::fs::symlink(step.join("real"), step.join("in")).unwrap();
        let mut d = Download::open(b"id", spec("in/x", b"x", false), &step, None).unwrap();
        d.take(0, b"x").unwrap();
        d.finish().unwrap();
        assert_eq!(std::fs::read(step.join("real/x")).unwrap(), b"x");
    }
}
