//! The worker's side of an `upload` step: `switchyard __upload SOURCE`,
//! run as the step's command in its directory. It writes the artifact to
//! its standard output, which is the step's output stream: so an upload
//! goes in numbered chunks that the master acknowledges once stored, is
//! held (and spilled) while the link is down, and resumes where the
//! acknowledgements left off, like any step's output. Messages go to
//! standard error (the step's log); the last line there is
//! `switchyard: sha256 HEX, N bytes`, which the master checks against what
//! it stored.
//!
//! A file is sent as it is; a directory as a tar stream (symbolic links
//! stored as links, never followed). SOURCE must be relative, without
//! `..`, and must not lead out of the step's directory through a symbolic
//! link.

use std::io::{self, Write};
use std::path::{Component, Path};

use sha2::{Digest, Sha256};

/// The line on standard error that ends a successful upload.
pub const DIGEST_PREFIX: &str = "switchyard: sha256 ";

/// Counts and hashes what it writes through.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Whether `source` is a relative path with no `..` (what the config
/// accepts).
pub fn safe_source(source: &str) -> bool {
    !source.is_empty()
        && Path::new(source)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Runs `__upload SOURCE` in the current directory; returns the exit
/// status (0 sent, 2 refused or missing, 1 could not be read or written).
pub fn run(source: &str) -> i32 {
    let mut err = io::stderr();
    if !safe_source(source) {
        let _ = writeln!(
            err,
            "switchyard: refused: {source:?} must be a relative path inside the step's directory"
        );
        return 2;
    }
    let here = match std::env::current_dir().and_then(|d| d.canonicalize()) {
        Ok(d) => d,
        Err(e) => {
            let _ = writeln!(err, "switchyard: cannot find the step's directory: {e}");
            return 1;
        }
    };
    let path = match here.join(source).canonicalize() {
        Ok(p) => p,
        Err(e) => {
            let _ = writeln!(err, "switchyard: cannot upload {source:?}: {e}");
            return 2;
        }
    };
    if !path.starts_with(&here) {
        let _ = writeln!(
            err,
            "switchyard: refused: {source:?} leads outside the step's directory (a symbolic link)"
        );
        return 2;
    }
    // A bigger pipe to the worker: fewer, larger reads on its side.
    #[cfg(target_os = "linux")]
    {
        let _ = nix::fcntl::fcntl(io::stdout(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    }
    let out = io::stdout().lock();
    let mut w = Hashing {
        inner: io::BufWriter::with_capacity(256 * 1024, out),
        hash: Sha256::new(),
        bytes: 0,
    };
    let dir = path.is_dir();
    let sent = if dir {
        let _ = writeln!(
            err,
            "switchyard: uploading the directory {source:?} as a tar stream"
        );
        let mut tar = tar::Builder::new(&mut w);
        tar.follow_symlinks(false);
        tar.append_dir_all(".", &path).and_then(|_| tar.finish())
    } else {
        let _ = writeln!(err, "switchyard: uploading the file {source:?}");
        std::fs::File::open(&path).and_then(|mut f| io::copy(&mut f, &mut w).map(|_| ()))
    };
    if let Err(e) = sent.and_then(|_| w.flush()) {
        let _ = writeln!(err, "switchyard: cannot upload {source:?}: {e}");
        return 1;
    }
    let digest = crate::wire::hex(&w.hash.finalize());
    let tar = if dir { TAR_SUFFIX } else { "" };
    let _ = writeln!(err, "{DIGEST_PREFIX}{digest}, {} bytes{tar}", w.bytes);
    0
}

/// What the digest line of a directory's upload ends with.
const TAR_SUFFIX: &str = ", a directory as tar";

/// The digest, size and whether it is a directory's tar stream, as an
/// upload's log ends with them, if it does.
pub fn digest_in_log(log: &str) -> Option<(String, u64, bool)> {
    let line = log.lines().rev().find(|l| l.starts_with(DIGEST_PREFIX))?;
    let rest = line.strip_prefix(DIGEST_PREFIX)?;
    let (rest, tar) = match rest.strip_suffix(TAR_SUFFIX) {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let (hex, bytes) = rest.split_once(", ")?;
    let bytes = bytes.strip_suffix(" bytes")?.parse().ok()?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| (hex.to_string(), bytes, tar))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_and_digest_lines() {
        assert!(safe_source("target/release/app"));
        assert!(safe_source("./dist"));
        for bad in ["", "/etc/passwd", "../x", "a/../../b"] {
            assert!(!safe_source(bad), "{bad}");
        }
        let hex = "ab".repeat(32);
        let log = format!("switchyard: uploading the file \"a\"\n{DIGEST_PREFIX}{hex}, 12 bytes\n");
        assert_eq!(digest_in_log(&log), Some((hex.clone(), 12, false)));
        let log = format!("{DIGEST_PREFIX}{hex}, 3072 bytes{TAR_SUFFIX}\n");
        assert_eq!(digest_in_log(&log), Some((hex, 3072, true)));
        assert_eq!(digest_in_log("nothing\n"), None);
    }
}
