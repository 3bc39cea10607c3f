//! `[[poller]]`: repositories the master polls with git for new commits,
//! for hosts that cannot call a webhook.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Validator};

/// The shortest `interval`: polling a remote faster is abuse.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The default `interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPoller {
    repository: Spanned<String>,
    #[serde(default)]
    branches: Vec<Spanned<String>>,
    interval: Option<Spanned<String>>,
}

/// One `[[poller]]`, validated.
#[derive(Clone, Debug)]
pub struct PollerConfig {
    /// What `git fetch` is given (a URL or a path), and the changes'
    /// `repository`.
    pub repository: String,
    /// The branch patterns as written (`*` within a path segment, `**`
    /// across); empty: every branch.
    pub branches: Vec<String>,
    matchers: Vec<globset::GlobMatcher>,
    pub interval: Duration,
}

impl PartialEq for PollerConfig {
    fn eq(&self, other: &Self) -> bool {
        (&self.repository, &self.branches, self.interval)
            == (&other.repository, &other.branches, other.interval)
    }
}

impl Eq for PollerConfig {}

impl PollerConfig {
    /// Whether the poller follows `branch`.
    pub fn follows(&self, branch: &str) -> bool {
        self.matchers.is_empty() || self.matchers.iter().any(|m| m.is_match(branch))
    }
}

pub(super) fn validate(
    c: &Validator<'_>,
    raw: &[RawPoller],
) -> Result<Vec<PollerConfig>, ConfigError> {
    let mut out: Vec<PollerConfig> = Vec::new();
    for r in raw {
        let repository = r.repository.get_ref().trim().to_string();
        if repository.is_empty() {
            return c.err(
                r.repository.span(),
                "poller.repository",
                "names no repository",
            );
        }
        if repository.starts_with('-') {
            return c.err(
                r.repository.span(),
                "poller.repository",
                "cannot start with `-` (git would read it as an option)",
            );
        }
        if out.iter().any(|p| p.repository == repository) {
            return c.err(
                r.repository.span(),
                "poller.repository",
                format_args!("`{repository}` is polled twice"),
            );
        }
        let mut matchers = Vec::new();
        for b in &r.branches {
            let m = globset::GlobBuilder::new(b.get_ref())
                .literal_separator(true)
                .build()
                .map_err(|e| {
                    ConfigError::at(
                        c.path,
                        c.text,
                        b.span().start,
                        format!(
                            "key `poller.branches`: `{}` is not a glob: {e}",
                            b.get_ref()
                        ),
                    )
                })?
                .compile_matcher();
            matchers.push(m);
        }
        out.push(PollerConfig {
            repository,
            branches: r.branches.iter().map(|b| b.get_ref().clone()).collect(),
            matchers,
            interval: c.duration_at_least(
                &r.interval,
                "poller.interval",
                DEFAULT_INTERVAL,
                MIN_INTERVAL,
            )?,
        });
    }
    Ok(out)
}
