//! `[[poller]]`: the master fetches each repository into a bare mirror of
//! its own (beside the state database, under `pollers/`) every `interval`,
//! and makes a change for each new commit on the branches it follows
//! (author, message, time, files), with category `poll`.
//!
//! - The heads it saw are kept in the state database with the changes, in
//!   one transaction: across restarts nothing is missed or made twice.
//! - The first poll of a repository records its heads and makes no change
//!   (no flood of old history); a new branch makes one change, its head; a
//!   force-push makes changes for the commits the new head has and the old
//!   one did not; a deleted branch is forgotten.
//! - A failure (the repository is gone, the network is down) is logged with
//!   git's own message once per failure streak and retried at the next
//!   interval; the master goes on serving.
//! - git runs without a terminal prompt (`GIT_TERMINAL_PROMPT=0`), each
//!   command bounded by [`GIT_DEADLINE`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::BuildMaster;
use crate::config::PollerConfig;
use crate::store::NewChange;

/// The longest a git command of a poll may take.
pub const GIT_DEADLINE: Duration = Duration::from_secs(600);
/// The most commits one branch update makes changes for (a push of a
/// long-lived branch's history is not a flood of builds).
pub const MAX_COMMITS_PER_POLL: usize = 200;

/// The pollers the master runs; a reload replaces the list.
pub struct Pollers {
    config: RwLock<Arc<Vec<PollerConfig>>>,
    /// Where the mirrors are.
    dir: PathBuf,
    builds: BuildMaster,
}

/// Why a poll did not happen.
#[derive(Debug, thiserror::Error)]
enum PollError {
    #[error("git {0}: {1}")]
    Git(String, String),
    #[error("cannot store the poll: {0}")]
    State(#[from] crate::store::StateError),
}

impl Pollers {
    pub fn new(dir: PathBuf, builds: BuildMaster) -> Arc<Self> {
        Arc::new(Pollers {
            config: RwLock::new(Arc::new(Vec::new())),
            dir,
            builds,
        })
    }

    /// Polls exactly these from now on.
    pub fn set(&self, pollers: Vec<PollerConfig>) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(pollers);
    }

    fn current(&self) -> Arc<Vec<PollerConfig>> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Polls each repository when it is due, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut last: HashMap<String, Instant> = HashMap::new();
        let mut failing: HashMap<String, String> = HashMap::new();
        loop {
            // Masters sharing a database poll once between them: the one
            // leading `pollers` (the mirrors are in the shared data_dir).
            let mut pollers = self.current();
            if !pollers.is_empty() && !self.builds.state_db().leads("pollers").await {
                pollers = Arc::new(Vec::new());
            }
            for p in pollers.iter() {
                if last
                    .get(&p.repository)
                    .is_some_and(|at| at.elapsed() < p.interval)
                {
                    continue;
                }
                last.insert(p.repository.clone(), Instant::now());
                let outcome = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = self.poll(p) => r,
                };
                match outcome {
                    Ok(n) => {
                        if failing.remove(&p.repository).is_some() {
                            tracing::info!(repository = %p.repository, "polling works again");
                        }
                        if n > 0 {
                            tracing::info!(repository = %p.repository, changes = n, "new commits polled");
                        }
                    }
                    Err(e) => {
                        let why = e.to_string();
                        if failing.get(&p.repository) != Some(&why) {
                            tracing::warn!(repository = %p.repository, error = %why, interval = ?p.interval, "cannot poll the repository; retrying every interval");
                        }
                        failing.insert(p.repository.clone(), why);
                    }
                }
            }
            last.retain(|r, _| pollers.iter().any(|p| &p.repository == r));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// The mirror of `repository`.
    fn mirror(&self, repository: &str) -> PathBuf {
        let digest = crate::auth::verifier::sha256(repository.as_bytes());
        let name = crate::wire::hex(&digest[..12]);
        self.dir.join(format!("{name}.git"))
    }

    /// One poll: fetch, compare with the heads seen last, store. Returns
    /// how many changes it made.
    async fn poll(&self, p: &PollerConfig) -> Result<usize, PollError> {
        let mirror = self.mirror(&p.repository);
        if !mirror.join("HEAD").exists() {
            std::fs::create_dir_all(&mirror)
                .map_err(|e| PollError::Git("init".into(), e.to_string()))?;
            git(&mirror, &["init", "--bare", "-q"]).await?;
        }
        git(
            &mirror,
            &[
                "fetch",
                "--prune",
                "--no-tags",
                "--quiet",
                "--",
                &p.repository,
                "+refs/heads/*:refs/heads/*",
            ],
        )
        .await?;
        let listed = git(
            &mirror,
            &[
                "for-each-ref",
                "--format=%(refname:lstrip=2) %(objectname)",
                "refs/heads/",
            ],
        )
        .await?;
        let heads: BTreeMap<String, String> = listed
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(branch, _)| p.follows(branch))
            .map(|(b, s)| (b.to_string(), s.to_string()))
            .collect();
        let seen = self.builds.state_db().poller_heads(&p.repository).await?;
        let mut changes = Vec::new();
        if let Some(seen) = &seen {
            for (branch, head) in &heads {
                match seen.get(branch) {
                    Some(old) if old == head => {}
                    Some(old) => {
                        let range = format!("{old}..{head}");
                        changes.extend(commits(&mirror, &p.repository, branch, &range).await?);
                    }
                    // A new branch: its head only.
                    None => changes.extend(
                        commits(&mirror, &p.repository, branch, &format!("-1 {head}")).await?,
                    ),
                }
            }
        } else if seen.is_none() && !heads.is_empty() {
            tracing::info!(repository = %p.repository, branches = heads.len(), "first poll: heads recorded, no changes made for the history before");
        }
        if seen.as_ref() == Some(&heads) {
            return Ok(0);
        }
        let n = changes.len();
        self.builds
            .add_polled_changes(p.repository.clone(), heads, changes)
            .await?;
        Ok(n)
    }
}

/// Runs git in `dir`; its standard output, or its message.
async fn git(dir: &Path, args: &[&str]) -> Result<String, PollError> {
    let what = args.first().copied().unwrap_or_default().to_string();
    let run = tokio::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(GIT_DEADLINE, run)
        .await
        .map_err(|_| PollError::Git(what.clone(), format!("no answer within {GIT_DEADLINE:?}")))?
        .map_err(|e| PollError::Git(what.clone(), format!("cannot run git: {e}")))?;
    if !out.status.success() {
        let message = String::from_utf8_lossy(&out.stderr);
        let message: String = message
            .trim()
            .lines()
            .take(3)
            .collect::<Vec<_>>()
            .join(" / ");
        return Err(PollError::Git(what, message));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A polled repository's project name, as webhooks name theirs: the path
/// on its host (`owner/repo`, GitLab's `group/sub/repo`) for a remote
/// URL, the directory's name for a repository on disk; without `.git`.
pub fn project_of(repository: &str) -> String {
    let local = repository.starts_with("file://")
        || repository.starts_with('/')
        || repository.starts_with('.');
    if !local && let Some(path) = super::reporters::repository_path(repository) {
        return path;
    }
    let last = repository
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or_default();
    last.strip_suffix(".git").unwrap_or(last).to_string()
}

/// The commits `range` names (`OLD..NEW`, or `-1 HEAD`), oldest first, as
/// changes on `branch`.
async fn commits(
    mirror: &Path,
    repository: &str,
    branch: &str,
    range: &str,
) -> Result<Vec<NewChange>, PollError> {
    let max = format!("--max-count={MAX_COMMITS_PER_POLL}");
    let mut args = vec![
        "log",
        &max,
        "--format=%x1e%H%x1f%an <%ae>%x1f%ct%x1f%B%x1f",
        "--name-only",
        "--no-renames",
    ];
    args.extend(range.split(' '));
    let out = git(mirror, &args).await?;
    let mut changes: Vec<NewChange> = out
        .split('\u{1e}')
        .filter(|r| !r.trim().is_empty())
        .filter_map(|record| {
            let mut f = record.split('\u{1f}');
            let (revision, author, time, message, files) = (
                f.next()?,
                f.next()?,
                f.next()?,
                f.next()?,
                f.next().unwrap_or(""),
            );
            Some(NewChange {
                repository: repository.to_string(),
                branch: branch.to_string(),
                revision: revision.trim().to_string(),
                author: author.to_string(),
                comments: message.trim_end().to_string(),
                category: "poll".into(),
                project: project_of(repository),
                files: files
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect(),
                when: time.trim().parse().ok().map(|s| (s, 0)),
                properties: BTreeMap::new(),
            })
        })
        .collect();
    // git log lists newest first; changes go in the order they were made.
    changes.reverse();
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::project_of;

    #[test]
    fn a_polled_repository_is_named_like_a_webhooks_project() {
        for (url, project) in [
            ("https://github.com/octo/widgets.git", "octo/widgets"),
            (
                "https://gitlab.example.org/group/sub/widgets",
                "group/sub/widgets",
            ),
            ("git@github.com:octo/widgets.git", "octo/widgets"),
            ("ssh://git@host:2222/octo/widgets.git", "octo/widgets"),
            ("/srv/git/widgets.git", "widgets"),
            ("file:///srv/git/widgets.git/", "widgets"),
            ("./widgets", "widgets"),
        ] {
            assert_eq!(project_of(url), project, "{url}");
        }
    }
}
