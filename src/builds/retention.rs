//! `[master] build_retention` and `log_retention`: old builds and logs are
//! deleted in the background, in small batches, each followed by a pause
//! four times as long as it took, so that pruning a large history never
//! holds the database (or the disk) for long and builds that run meanwhile
//! get most of both.
//!
//! A pass runs when the master starts, after each reload and then every
//! [`EVERY`]; it goes on, batch after batch, until nothing is left to
//! prune.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::{StateDb, StateError};

/// How often pruning looks for old builds and logs.
pub const EVERY: Duration = Duration::from_secs(600);
/// Steps whose logs one batch deletes.
const LOG_BATCH: usize = 50;
/// Builds one batch deletes.
const BUILD_BATCH: usize = 20;
/// The shortest pause between two batches.
const PAUSE: Duration = Duration::from_millis(20);
/// Each batch is followed by a pause this many times as long as the batch
/// took: pruning holds the database (and the disk) at most a fifth of the
/// time, however slow the machine, and builds get the rest.
const YIELD: u32 = 4;

/// How long builds and logs are kept (`None`: for ever).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub builds: Option<Duration>,
    pub logs: Option<Duration>,
}

/// The pruner: its policy, changed by reloads, and a bell to run a pass
/// now.
pub struct Pruner {
    state: Arc<StateDb>,
    policy: RwLock<RetentionPolicy>,
    now: Notify,
}

/// What one pass deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub builds: usize,
    pub logs: usize,
}

impl Pruner {
    pub fn new(state: Arc<StateDb>) -> Arc<Self> {
        Arc::new(Pruner {
            state,
            policy: RwLock::new(RetentionPolicy::default()),
            now: Notify::new(),
        })
    }

    /// Prunes by `policy` from now on, starting with a pass now.
    pub fn set(&self, policy: RetentionPolicy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = policy;
        self.now.notify_one();
    }

    /// Runs passes until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            match self.pass(&shutdown).await {
                Ok(p) if p != Pruned::default() => {
                    tracing::info!(
                        builds = p.builds,
                        logs = p.logs,
                        "pruned old builds and logs"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "cannot prune old builds and logs"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.now.notified() => {}
                _ = tokio::time::sleep(EVERY) => {}
            }
        }
    }

    /// One pass: every log, then every build, past its retention.
    pub async fn pass(&self, shutdown: &CancellationToken) -> Result<Pruned, StateError> {
        let policy = *self.policy.read().unwrap_or_else(|e| e.into_inner());
        let mut pruned = Pruned::default();
        // Masters sharing a database prune once between them.
        if !self.state.leads("retention").await {
            return Ok(pruned);
        }
        let before = |keep: Duration| crate::store::now_ms() - keep.as_millis() as i64;
        // A build's logs go with it, so they are kept no longer than it.
        let logs = match (policy.logs, policy.builds) {
            (Some(l), Some(b)) => Some(l.min(b)),
            (l, b) => l.or(b),
        };
        if let Some(keep) = logs {
            loop {
                let t = std::time::Instant::now();
                let n = self.state.prune_logs(before(keep), LOG_BATCH).await?;
                pruned.logs += n;
                if n == 0 || shutdown.is_cancelled() {
                    break;
                }
                tokio::time::sleep((t.elapsed() * YIELD).max(PAUSE)).await;
            }
        }
        if let Some(keep) = policy.builds {
            loop {
                let t = std::time::Instant::now();
                let n = self.state.prune_builds(before(keep), BUILD_BATCH).await?;
                pruned.builds += n;
                if n == 0 || shutdown.is_cancelled() {
                    break;
                }
                tokio::time::sleep((t.elapsed() * YIELD).max(PAUSE)).await;
            }
        }
        Ok(pruned)
    }
}
