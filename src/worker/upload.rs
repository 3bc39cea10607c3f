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
//! stored as links, never followed); a glob (`dist/*.whl`, `out/**/*.log`)
//! as a tar stream of what it matches, at their paths relative to the
//! step's directory (`*` stays within one directory, `**` crosses them;
//! symbolic links are not followed while looking). SOURCE must be
//! relative, without `..`, and must not lead out of the step's directory
//! through a symbolic link.

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

/// Whether `source` (or a download's `dest`) is a relative path with no
/// `..` (what the config accepts).
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
    if is_glob(source) {
        return upload_glob(&here, source);
    }
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
    let mut w = hashing_stdout();
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
        std::fs::File::open(&path).and_then(|f| send_file(f, &mut w))
    };
    sent_and_said(source, sent, w, dir)
}

/// Sends a file in big reads, each written straight to standard output
/// (`io::copy` would go 8 KiB at a time through the buffer).
fn send_file<W: Write>(mut f: std::fs::File, w: &mut Hashing<io::BufWriter<W>>) -> io::Result<()> {
    use std::io::Read;
    w.flush()?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // BufWriter passes a write at least as big as its buffer through.
        w.inner.write_all(&buf[..n])?;
        w.hash.update(&buf[..n]);
        w.bytes += n as u64;
    }
}

/// Standard output, bigger pipe and buffer, counted and hashed.
fn hashing_stdout() -> Hashing<io::BufWriter<io::StdoutLock<'static>>> {
    // A bigger pipe to the worker: fewer, larger reads on its side.
    #[cfg(target_os = "linux")]
    {
        let _ = nix::fcntl::fcntl(io::stdout(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    }
    Hashing {
        inner: io::BufWriter::with_capacity(256 * 1024, io::stdout().lock()),
        hash: Sha256::new(),
        bytes: 0,
    }
}

/// Ends an upload: flushes, and says its digest (or why it failed).
fn sent_and_said<W: Write>(
    source: &str,
    sent: io::Result<()>,
    mut w: Hashing<W>,
    tar: bool,
) -> i32 {
    let mut err = io::stderr();
    if let Err(e) = sent.and_then(|_| w.flush()) {
        let _ = writeln!(err, "switchyard: cannot upload {source:?}: {e}");
        return 1;
    }
    let digest = crate::wire::hex(&w.hash.finalize());
    let tar = if tar { TAR_SUFFIX } else { "" };
    let _ = writeln!(err, "{DIGEST_PREFIX}{digest}, {} bytes{tar}", w.bytes);
    0
}

/// Whether `source` is a glob rather than a path.
pub fn is_glob(source: &str) -> bool {
    source.contains(['*', '?', '[', '{'])
}

/// Most directory entries a glob looks at.
const MAX_GLOB_WALK: usize = 1_000_000;

/// The paths (relative to `here`) that `pattern` matches: symbolic links
/// are matched but never followed, a matched directory is not looked
/// into (it goes whole).
fn glob_matches(here: &Path, pattern: &str) -> Result<Vec<std::path::PathBuf>, String> {
    let clean: std::path::PathBuf = Path::new(pattern)
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    let text = clean.to_string_lossy().into_owned();
    let glob = globset::GlobBuilder::new(&text)
        .literal_separator(true)
        .build()
        .map_err(|e| format!("{pattern:?} is not a glob: {e}"))?
        .compile_matcher();
    // Only under the part before the first wildcard.
    let base: std::path::PathBuf = clean
        .components()
        .take_while(|c| !is_glob(&c.as_os_str().to_string_lossy()))
        .collect();
    let mut found = Vec::new();
    let mut todo = vec![base];
    let mut seen = 0usize;
    while let Some(rel) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(here.join(&rel)) else {
            continue;
        };
        for entry in entries.flatten() {
            seen += 1;
            if seen > MAX_GLOB_WALK {
                return Err(format!(
                    "{pattern:?} looks at more than {MAX_GLOB_WALK} files; narrow it"
                ));
            }
            let path = rel.join(entry.file_name());
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if glob.is_match(&path) {
                found.push(path);
            } else if kind.is_dir() {
                todo.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Uploads what a glob matches as one tar stream.
fn upload_glob(here: &Path, source: &str) -> i32 {
    let mut err = io::stderr();
    let found = match glob_matches(here, source) {
        Ok(f) => f,
        Err(why) => {
            let _ = writeln!(err, "switchyard: cannot upload: {why}");
            return 2;
        }
    };
    if found.is_empty() {
        let _ = writeln!(
            err,
            "switchyard: cannot upload {source:?}: nothing matches it"
        );
        return 2;
    }
    let _ = writeln!(
        err,
        "switchyard: uploading {} path(s) matching {source:?} as a tar stream",
        found.len()
    );
    let mut w = hashing_stdout();
    let sent = {
        let mut tar = tar::Builder::new(&mut w);
        tar.follow_symlinks(false);
        found
            .iter()
            .try_for_each(|rel| {
                let full = here.join(rel);
                if std::fs::symlink_metadata(&full)?.is_dir() {
                    tar.append_dir_all(rel, &full)
                } else {
                    tar.append_path_with_name(&full, rel)
                }
            })
            .and_then(|_| tar.finish())
    };
    sent_and_said(source, sent, w, true)
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

    #[test]
    fn globs_match_within_the_directory_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let here = dir.path();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("x.whl"), b"no").unwrap();
        for f in [
            "dist/a.whl",
            "dist/b.whl",
            "dist/c.txt",
            "dist/sub/d.whl",
            "logs/x/y/z.log",
        ] {
            std::fs::create_dir_all(here.join(f).parent().unwrap()).unwrap();
            std::fs::write(here.join(f), f).unwrap();
        }
        std::os::unix::fs::symlink(outside.path(), here.join("dist/out")).unwrap();
        let m = |p: &str| {
            glob_matches(here, p)
                .unwrap()
                .into_iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(m("dist/*.whl"), ["dist/a.whl", "dist/b.whl"]);
        assert_eq!(
            m("./dist/**/*.whl"),
            ["dist/a.whl", "dist/b.whl", "dist/sub/d.whl"]
        );
        assert_eq!(m("**/*.log"), ["logs/x/y/z.log"]);
        assert_eq!(m("dist/s*"), ["dist/sub"]);
        assert!(m("nothing/*").is_empty());
        assert!(is_glob("dist/*.whl") && !is_glob("dist/a.whl"));
    }
}
