//! `[[reporter]]`: where build statuses go (GitHub, GitLab, Gitea commit
//! statuses, or a JSON POST to any URL); tokens in the secrets file's
//! `[reporter_tokens]`.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Validator};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReporter {
    name: Spanned<String>,
    kind: Spanned<String>,
    api_url: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    #[serde(default)]
    builders: Vec<String>,
    #[serde(default)]
    branches: Vec<Spanned<String>>,
    max_age: Option<Spanned<String>>,
}

/// Where a reporter sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReporterKind {
    /// `POST {api_url}/repos/OWNER/REPO/statuses/SHA`, `Authorization:
    /// Bearer TOKEN`.
    GitHub,
    /// `POST {api_url}/projects/PATH/statuses/SHA`, `PRIVATE-TOKEN`.
    GitLab,
    /// `POST {api_url}/repos/OWNER/REPO/statuses/SHA`, `Authorization:
    /// token TOKEN`.
    Gitea,
    /// A JSON document of each build event POSTed to `url`, signed with
    /// `X-Switchyard-Signature-256` when a token is set.
    Http,
}

/// One `[[reporter]]`, validated.
#[derive(Clone, Debug)]
pub struct ReporterConfig {
    pub name: String,
    pub kind: ReporterKind,
    /// The API's base URL (the `http` kind: the URL it posts to), without
    /// a trailing `/`.
    pub url: String,
    /// Only builds of these builders (empty: all).
    pub builders: Vec<String>,
    /// Only builds of branches matching these globs (empty: all).
    pub branches: Vec<String>,
    matchers: Vec<globset::GlobMatcher>,
    /// A report not delivered after this long is given up, with a log line.
    pub max_age: Duration,
    pub(crate) at: usize,
}

impl PartialEq for ReporterConfig {
    fn eq(&self, o: &Self) -> bool {
        (
            &self.name,
            self.kind,
            &self.url,
            &self.builders,
            &self.branches,
            self.max_age,
        ) == (&o.name, o.kind, &o.url, &o.builders, &o.branches, o.max_age)
    }
}

impl Eq for ReporterConfig {}

impl ReporterConfig {
    /// Whether builds of `builder` on `branch` are reported here.
    pub fn wants(&self, builder: &str, branch: &str) -> bool {
        (self.builders.is_empty() || self.builders.iter().any(|b| b == builder))
            && (self.matchers.is_empty() || self.matchers.iter().any(|m| m.is_match(branch)))
    }
}

/// The default `max_age`.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

pub(super) fn validate(
    c: &Validator<'_>,
    raw: &[RawReporter],
) -> Result<Vec<ReporterConfig>, ConfigError> {
    let mut out: Vec<ReporterConfig> = Vec::new();
    for r in raw {
        let name = r.name.get_ref();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return c.err(
                r.name.span(),
                "reporter.name",
                format_args!(
                    "`{name}` is not a valid reporter name (letters, digits, `-`, `_`, `.`)"
                ),
            );
        }
        if out.iter().any(|o| &o.name == name) {
            return c.err(
                r.name.span(),
                "reporter.name",
                format_args!("reporter `{name}` is defined twice"),
            );
        }
        let (kind, default) = match r.kind.get_ref().as_str() {
            "github" => (ReporterKind::GitHub, Some("https://api.github.com")),
            "gitlab" => (ReporterKind::GitLab, Some("https://gitlab.com/api/v4")),
            "gitea" | "forgejo" => (ReporterKind::Gitea, None),
            "http" => (ReporterKind::Http, None),
            other => {
                return c.err(
                    r.kind.span(),
                    "reporter.kind",
                    format_args!("`{other}` is not one of github, gitlab, gitea, forgejo, http"),
                );
            }
        };
        let (given, key) = match kind {
            ReporterKind::Http => (&r.url, "reporter.url"),
            _ => (&r.api_url, "reporter.api_url"),
        };
        let url = match (given, default) {
            (Some(u), _) => {
                let v = u.get_ref().trim_end_matches('/');
                if !(v.starts_with("https://") || v.starts_with("http://")) {
                    return c.err(
                        u.span(),
                        key,
                        format_args!("`{v}` is not an http:// or https:// URL"),
                    );
                }
                v.to_string()
            }
            (None, Some(d)) => d.to_string(),
            (None, None) => {
                return c.err(
                    r.kind.span(),
                    key,
                    format_args!(
                        "reporter `{name}` of kind `{}` needs `{}`",
                        r.kind.get_ref(),
                        key.trim_start_matches("reporter.")
                    ),
                );
            }
        };
        let mut matchers = Vec::new();
        for b in &r.branches {
            matchers.push(
                globset::GlobBuilder::new(b.get_ref())
                    .literal_separator(true)
                    .build()
                    .map_err(|e| {
                        ConfigError::at(
                            c.path,
                            c.text,
                            b.span().start,
                            format!(
                                "key `reporter.branches`: `{}` is not a glob: {e}",
                                b.get_ref()
                            ),
                        )
                    })?
                    .compile_matcher(),
            );
        }
        out.push(ReporterConfig {
            name: name.clone(),
            kind,
            url,
            builders: r.builders.clone(),
            branches: r.branches.iter().map(|b| b.get_ref().clone()).collect(),
            matchers,
            max_age: c.duration(&r.max_age, "reporter.max_age", DEFAULT_MAX_AGE)?,
            at: r.name.span().start,
        });
    }
    Ok(out)
}
