//! `[[webhook]]`: where GitHub, GitLab and Gitea (or Forgejo) deliver
//! their events, at `POST /hooks/<name>`; each one's secret is in the
//! secrets file's `[webhook_secrets]`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Validator};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    name: Spanned<String>,
    kind: Spanned<String>,
    repository_url: Option<Spanned<String>>,
}

/// Who sends a webhook's deliveries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    /// `X-Hub-Signature-256`, `X-GitHub-Event`, `X-GitHub-Delivery`.
    GitHub,
    /// `X-Gitlab-Token`, `X-Gitlab-Event`, `X-Gitlab-Event-UUID`.
    GitLab,
    /// Gitea and Forgejo: `X-Gitea-Signature`, `X-Gitea-Event`,
    /// `X-Gitea-Delivery`.
    Gitea,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::GitHub => "github",
            Provider::GitLab => "gitlab",
            Provider::Gitea => "gitea",
        }
    }
}

/// Which of the repository's URLs a change carries as its `repository`
/// (what schedulers match and steps check out).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RepositoryUrl {
    /// The HTTPS clone URL (default).
    #[default]
    Clone,
    /// The SSH clone URL.
    Ssh,
    /// The repository's web page.
    Web,
}

/// One `[[webhook]]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookConfig {
    pub name: String,
    pub provider: Provider,
    pub repository_url: RepositoryUrl,
    /// Where it is in the config (a byte offset), for errors found later.
    pub(crate) at: usize,
}

fn valid_hook_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

pub(super) fn validate(
    c: &Validator<'_>,
    raw: &[RawWebhook],
) -> Result<BTreeMap<String, WebhookConfig>, ConfigError> {
    let mut out = BTreeMap::new();
    for r in raw {
        let name = r.name.get_ref();
        if !valid_hook_name(name) {
            return c.err(
                r.name.span(),
                "webhook.name",
                format_args!(
                    "`{name}` is not a valid webhook name (1 to 64 letters, digits, `-`, `_`, `.`: it is part of the URL)"
                ),
            );
        }
        if let Some(first) = out.get(name).map(|w: &WebhookConfig| w.at) {
            return c.err(
                r.name.span(),
                "webhook.name",
                format_args!(
                    "webhook `{name}` is defined twice (first at line {})",
                    c.line_of(first)
                ),
            );
        }
        let provider = match r.kind.get_ref().as_str() {
            "github" => Provider::GitHub,
            "gitlab" => Provider::GitLab,
            "gitea" | "forgejo" => Provider::Gitea,
            other => {
                return c.err(
                    r.kind.span(),
                    "webhook.kind",
                    format_args!("`{other}` is not one of github, gitlab, gitea, forgejo"),
                );
            }
        };
        let repository_url = match r.repository_url.as_ref().map(|u| (u, u.get_ref().as_str())) {
            None | Some((_, "clone")) => RepositoryUrl::Clone,
            Some((_, "ssh")) => RepositoryUrl::Ssh,
            Some((_, "web")) => RepositoryUrl::Web,
            Some((u, other)) => {
                return c.err(
                    u.span(),
                    "webhook.repository_url",
                    format_args!("`{other}` is not one of clone, ssh, web"),
                );
            }
        };
        out.insert(
            name.clone(),
            WebhookConfig {
                name: name.clone(),
                provider,
                repository_url,
                at: r.name.span().start,
            },
        );
    }
    Ok(out)
}
