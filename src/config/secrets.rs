//! The secrets file beside the config: `[verifiers]`, one SCRAM verifier per
//! user and worker the config names, and the checker that serves them to
//! the port.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, read};
use crate::auth::{Capability, Checker, CheckerError, InMemoryChecker, Verifier};

/// The secrets file: `[verifiers]` mapping each user to its SCRAM verifier,
/// and `[step_secrets]`, the values steps use through `%(secret:NAME)s`.
/// Verifiers are no passwords, but the file should still be readable by the
/// master alone: a verifier lets an attacker run an offline guessing
/// attack, and step secrets are plain values.
#[derive(Clone, Debug, Default)]
pub struct Secrets {
    pub verifiers: std::collections::HashMap<String, Verifier>,
    /// The line of the file each verifier is on (for warnings about names
    /// the config does not know).
    pub lines: std::collections::HashMap<String, usize>,
    pub step_secrets: StepSecrets,
    /// `[webhook_secrets]`: each `[[webhook]]`'s shared secret.
    pub webhook_secrets: WebhookSecrets,
    /// `[reporter_tokens]`: each `[[reporter]]`'s API token (for `http`,
    /// the key of its signature).
    pub reporter_tokens: WebhookSecrets,
}

/// `[webhook_secrets]`: webhook name to its secret (GitHub's and Gitea's
/// HMAC key, GitLab's token). `Debug` shows the names, never the values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct WebhookSecrets(BTreeMap<String, String>);

impl WebhookSecrets {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

impl std::fmt::Debug for WebhookSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// `[step_secrets]`: name to value. A value goes to a worker only inside a
/// step that names it, is never stored, and is masked in that step's
/// output. `Debug` shows the names, never the values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StepSecrets(BTreeMap<String, String>);

impl StepSecrets {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    #[cfg(test)]
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        StepSecrets(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

impl std::fmt::Debug for StepSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecrets {
    #[serde(default)]
    verifiers: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    step_secrets: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    webhook_secrets: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    reporter_tokens: BTreeMap<String, String>,
}

impl Secrets {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        warn_if_readable_by_others(path);
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawSecrets =
            toml::from_str(text).map_err(|e| ConfigError::from_toml(path, text, e))?;
        let mut verifiers = std::collections::HashMap::new();
        // Lines counted in one pass over the file, not once per entry.
        let mut lines = std::collections::HashMap::new();
        let mut by_offset: Vec<(usize, &String)> = raw
            .verifiers
            .iter()
            .map(|(user, v)| (v.span().start, user))
            .collect();
        by_offset.sort();
        let (mut line, mut pos) = (1, 0);
        for (offset, user) in by_offset {
            line += text.as_bytes()[pos..offset.min(text.len())]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            pos = offset.min(text.len());
            lines.insert(user.clone(), line);
        }
        for (user, v) in raw.verifiers {
            let verifier = Verifier::parse(v.get_ref()).map_err(|e| {
                ConfigError::at(
                    path,
                    text,
                    v.span().start,
                    format!("key `verifiers.{user}`: {e}"),
                )
            })?;
            verifiers.insert(user, verifier);
        }
        let mut step_secrets = BTreeMap::new();
        for (name, v) in raw.step_secrets {
            let at = v.span().start;
            let fail = |why: &str| {
                Err(ConfigError::at(
                    path,
                    text,
                    at,
                    format!("key `step_secrets.{name}`: {why}"),
                ))
            };
            if !super::builds::valid_property_name(&name) {
                return fail("not a valid name (letters, digits, `_`, `.`, `-`)");
            }
            let value = v.into_inner();
            // A short value would be masked wherever its letters appear in
            // a log, and is no secret anyway.
            if value.len() < MIN_STEP_SECRET {
                return fail(&format!(
                    "is shorter than {MIN_STEP_SECRET} bytes: too short to be a secret or to mask in logs"
                ));
            }
            step_secrets.insert(name, value);
        }
        let mut webhook_secrets = BTreeMap::new();
        for (name, v) in raw.webhook_secrets {
            let at = v.span().start;
            let value = v.into_inner();
            // GitHub asks for a high-entropy secret; a short one is guessable.
            if value.len() < MIN_WEBHOOK_SECRET {
                return Err(ConfigError::at(
                    path,
                    text,
                    at,
                    format!(
                        "key `webhook_secrets.{name}`: is shorter than {MIN_WEBHOOK_SECRET} bytes: too easy to guess"
                    ),
                ));
            }
            webhook_secrets.insert(name, value);
        }
        Ok(Secrets {
            verifiers,
            lines,
            step_secrets: StepSecrets(step_secrets),
            webhook_secrets: WebhookSecrets(webhook_secrets),
            reporter_tokens: WebhookSecrets(raw.reporter_tokens),
        })
    }
}

/// The shortest `[webhook_secrets]` value.
pub const MIN_WEBHOOK_SECRET: usize = 16;

/// The shortest `[step_secrets]` value.
pub const MIN_STEP_SECRET: usize = 4;

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o004 != 0
    {
        tracing::warn!(file = %path.display(), "secrets file is readable by every user on this machine; consider `chmod 600`");
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

/// Verifiers from the secrets file (see [`Secrets`]). The file
/// is read when the checker is made and again on [`SecretsFileChecker::reload`];
/// a file that does not parse leaves the current verifiers in place.
pub struct SecretsFileChecker {
    path: RwLock<PathBuf>,
    store: InMemoryChecker,
}

impl SecretsFileChecker {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let secrets = Secrets::load(path)?;
        Ok(Self::from_secrets(path, secrets))
    }

    pub fn from_secrets(path: &Path, secrets: Secrets) -> Self {
        SecretsFileChecker {
            path: RwLock::new(path.to_path_buf()),
            store: InMemoryChecker::from_map(secrets.verifiers),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.path.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every verifier loaded now (shared, not copied).
    pub fn snapshot(&self) -> Arc<HashMap<String, Verifier>> {
        self.store.snapshot()
    }

    /// Re-reads the file it was loaded from.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let path = self.path();
        let secrets = Secrets::load(&path)?;
        self.install(&path, secrets);
        Ok(())
    }

    /// Installs secrets already read and validated (possibly from a new path,
    /// when a reloaded config names another file).
    pub fn install(&self, path: &Path, secrets: Secrets) {
        *self.path.write().unwrap_or_else(|e| e.into_inner()) = path.to_path_buf();
        self.store.replace(secrets.verifiers);
    }
}

#[async_trait]
impl Checker for SecretsFileChecker {
    fn capability(&self) -> Capability {
        Capability::Verifier
    }

    async fn verifier(&self, user: &str) -> Result<Option<Verifier>, CheckerError> {
        self.store.verifier(user).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_errors_do_not_quote_the_file() {
        let text = "[verifiers]\nadmin = \"SCRAM-SHA-256$4096:c2FsdA==$AAAA:SECRETSECRET\"\n";
        let e = Secrets::parse(Path::new("s.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("s.toml:2:") && e.contains("verifiers.admin"),
            "{e}"
        );
        assert!(!e.contains("SECRETSECRET"), "{e}");
        let e = Secrets::parse(
            Path::new("s.toml"),
            "[verifiers]\nadmin = \"SCRAM-SHA-256$4096:SECRET\n",
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("SECRET\""), "{e}");
    }
}
