//! The master's configuration file and the secrets file beside it.
//!
//! Both are TOML. Everything is validated before anything is used, and every
//! error names the file, the line and the key, so an operator can fix a
//! broken file from the log line alone. Errors about the secrets file never
//! quote its contents.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

mod builds;

pub use builds::{BuilderConfig, OnLost, SchedulerConfig, StepConfig, WorkerConfig};

use crate::auth::{ThrottleConfig, Verifier};
use crate::dispatcher::Limits;

/// Why a config or secrets file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl ConfigError {
    fn at(path: &Path, text: &str, offset: usize, message: String) -> Self {
        let (line, column) = line_col(text, offset);
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            column,
            message,
        }
    }

    fn from_toml(path: &Path, text: &str, err: toml::de::Error) -> Self {
        let offset = err.span().map(|s| s.start).unwrap_or(0);
        // `message()` is the bare description: the Display form would quote
        // the offending line, which for the secrets file is a verifier.
        Self::at(path, text, offset, err.message().trim().to_string())
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = offset
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1)
        + 1;
    (line, column)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    master: RawMaster,
    #[serde(default)]
    user: Vec<RawUser>,
    #[serde(default)]
    worker: Vec<builds::RawWorker>,
    #[serde(default)]
    builder: Vec<builds::RawBuilder>,
    #[serde(default)]
    scheduler: Vec<builds::RawScheduler>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMaster {
    listen: Option<Spanned<String>>,
    secrets: Spanned<String>,
    state: Option<Spanned<String>>,
    sniff_timeout: Option<Spanned<String>>,
    handshake_timeout: Option<Spanned<String>>,
    heartbeat_interval: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    max_handshakes: Option<Spanned<i64>>,
    auth_max_failures: Option<Spanned<i64>>,
    auth_failure_window: Option<Spanned<String>>,
    auth_block: Option<Spanned<String>>,
    drain_removed_workers: Option<bool>,
    worker_reconnect_grace: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: Spanned<String>,
    #[serde(default)]
    services: Vec<Spanned<String>>,
}

/// A validated master configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The file it was read from; relative paths inside are resolved against
    /// its directory.
    pub path: PathBuf,
    pub listen: SocketAddr,
    pub secrets_path: PathBuf,
    /// The SQLite database holding changes, builds and the master's secrets.
    pub state_path: PathBuf,
    /// A worker removed by a reload finishes its current builds first.
    pub drain_removed_workers: bool,
    /// How long the steps of a worker whose link dropped wait for it.
    pub worker_reconnect_grace: Duration,
    pub limits: Limits,
    /// User name to the services it may use.
    pub users: BTreeMap<String, BTreeSet<String>>,
    /// Build machines, by name (each logs in as that user to `worker`).
    pub workers: BTreeMap<String, WorkerConfig>,
    pub builders: BTreeMap<String, BuilderConfig>,
    pub schedulers: BTreeMap<String, SchedulerConfig>,
}

/// The state database's default name, beside the config file.
pub const DEFAULT_STATE: &str = "state.sqlite";

/// The default port: Buildbot's worker port, which operators already open.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9989";

pub(crate) struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Validator<'_> {
    pub(crate) fn line_of(&self, offset: usize) -> usize {
        line_col(self.text, offset).0
    }

    pub(crate) fn err<T>(
        &self,
        span: std::ops::Range<usize>,
        key: &str,
        msg: impl std::fmt::Display,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::at(
            self.path,
            self.text,
            span.start,
            format!("key `{key}`: {msg}"),
        ))
    }

    pub(crate) fn duration(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) if !d.is_zero() => Ok(d),
            Ok(_) => self.err(v.span(), key, "must be more than zero"),
            Err(e) => self.err(
                v.span(),
                key,
                format_args!(
                    "`{}` is not a duration ({e}); write e.g. \"10s\" or \"500ms\"",
                    v.get_ref()
                ),
            ),
        }
    }

    pub(crate) fn count(
        &self,
        v: &Option<Spanned<i64>>,
        key: &str,
        default: usize,
    ) -> Result<usize, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        match usize::try_from(*v.get_ref()) {
            Ok(n) if n > 0 => Ok(n),
            _ => self.err(v.span(), key, "must be a whole number above zero"),
        }
    }
}

pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.chars().any(|c| c.is_control() || c.is_whitespace())
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        Self::parse(path, &text)
    }

    /// Validates config text as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::from_toml(path, text, e))?;
        let c = Validator { path, text };
        let m = &raw.master;
        let listen = match &m.listen {
            None => DEFAULT_LISTEN
                .parse()
                .expect("default listen address parses"),
            Some(l) => match l.get_ref().parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    return c.err(
                        l.span(),
                        "master.listen",
                        format_args!(
                            "`{}` is not an address:port such as \"127.0.0.1:9989\"",
                            l.get_ref()
                        ),
                    );
                }
            },
        };
        if m.secrets.get_ref().trim().is_empty() {
            return c.err(m.secrets.span(), "master.secrets", "names no file");
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let secrets_path = base.join(m.secrets.get_ref());
        let state_path = match &m.state {
            None => base.join(DEFAULT_STATE),
            Some(s) if s.get_ref().trim().is_empty() => {
                return c.err(s.span(), "master.state", "names no file");
            }
            Some(s) => base.join(s.get_ref()),
        };
        let defaults = Limits::default();
        let throttle_defaults = ThrottleConfig::default();
        let limits = Limits {
            max_connections: c.count(
                &m.max_connections,
                "master.max_connections",
                defaults.max_connections,
            )?,
            max_handshakes: c.count(
                &m.max_handshakes,
                "master.max_handshakes",
                defaults.max_handshakes,
            )?,
            sniff_timeout: c.duration(
                &m.sniff_timeout,
                "master.sniff_timeout",
                defaults.sniff_timeout,
            )?,
            handshake_timeout: c.duration(
                &m.handshake_timeout,
                "master.handshake_timeout",
                defaults.handshake_timeout,
            )?,
            heartbeat_interval: c.duration(
                &m.heartbeat_interval,
                "master.heartbeat_interval",
                defaults.heartbeat_interval,
            )?,
            throttle: ThrottleConfig {
                max_failures: c
                    .count(
                        &m.auth_max_failures,
                        "master.auth_max_failures",
                        throttle_defaults.max_failures as usize,
                    )?
                    .min(u32::MAX as usize) as u32,
                window: c.duration(
                    &m.auth_failure_window,
                    "master.auth_failure_window",
                    throttle_defaults.window,
                )?,
                block: c.duration(&m.auth_block, "master.auth_block", throttle_defaults.block)?,
                max_tracked: throttle_defaults.max_tracked,
            },
        };
        if limits.heartbeat_interval.as_millis() > u32::MAX as u128 {
            return c.err(
                m.heartbeat_interval
                    .as_ref()
                    .map(|s| s.span())
                    .unwrap_or(0..0),
                "master.heartbeat_interval",
                "is too long",
            );
        }
        let mut users: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut first_line: BTreeMap<String, usize> = BTreeMap::new();
        for u in &raw.user {
            let name = u.name.get_ref();
            if !valid_name(name) {
                return c.err(u.name.span(), "user.name", format_args!("`{name}` is not a valid user name (1 to 255 characters, no spaces or control characters)"));
            }
            if let Some(first) = first_line.get(name) {
                let line = line_col(text, *first).0;
                return c.err(
                    u.name.span(),
                    "user.name",
                    format_args!("user `{name}` is defined twice (first at line {line})"),
                );
            }
            first_line.insert(name.clone(), u.name.span().start);
            let mut services = BTreeSet::new();
            for s in &u.services {
                if s.get_ref() == crate::worker::SERVICE {
                    return c.err(s.span(), "user.services", format_args!("user `{name}` lists the service `worker`: build machines are declared with [[worker]]"));
                }
                if !valid_name(s.get_ref()) {
                    return c.err(
                        s.span(),
                        "user.services",
                        format_args!("`{}` is not a valid service name", s.get_ref()),
                    );
                }
                services.insert(s.get_ref().clone());
            }
            users.insert(name.clone(), services);
        }
        let builds = builds::validate(&c, &raw.worker, &raw.builder, &raw.scheduler, &users)?;
        Ok(Config {
            path: path.to_path_buf(),
            listen,
            secrets_path,
            state_path,
            drain_removed_workers: m.drain_removed_workers.unwrap_or(false),
            worker_reconnect_grace: c.duration(
                &m.worker_reconnect_grace,
                "master.worker_reconnect_grace",
                Duration::from_secs(300),
            )?,
            limits,
            users,
            workers: builds.workers,
            builders: builds.builders,
            schedulers: builds.schedulers,
        })
    }
}

/// The secrets file: `[verifiers]` mapping each user to its SCRAM verifier.
/// It holds no passwords, but it should still be readable by the master
/// alone: a verifier lets an attacker run an offline guessing attack.
#[derive(Clone, Debug, Default)]
pub struct Secrets {
    pub verifiers: std::collections::HashMap<String, Verifier>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecrets {
    #[serde(default)]
    verifiers: BTreeMap<String, Spanned<String>>,
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
        Ok(Secrets { verifiers })
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/sy/master.toml"), text)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(
            "[master]\nsecrets = \"s.toml\"\n[[user]]\nname = \"a\"\nservices = [\"ping\"]\n",
        )
        .unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(c.secrets_path, Path::new("/etc/sy/s.toml"));
        assert_eq!(c.state_path, Path::new("/etc/sy/state.sqlite"));
        assert_eq!(c.limits, Limits::default());
        assert!(c.users["a"].contains("ping"));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = parse("[master]\nsecrets = \"s.toml\"\nsniff_timeout = \"10 parsecs\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/etc/sy/master.toml:3:"), "{e}");
        assert!(e.contains("master.sniff_timeout"), "{e}");
        let e = parse(
            "[master]\nsecrets = \"s.toml\"\n[[user]]\nname = \"a\"\n[[user]]\nname = \"a\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(":6:") && e.contains("defined twice (first at line 4)"),
            "{e}"
        );
        let e = parse("[master]\nsecrets = \"s.toml\"\nlisten = 9989\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":3:"), "{e}");
        let e = parse("[master]\nsecrets = \"s.toml\"\nlisen = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":3:") && e.contains("lisen"), "{e}");
    }

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
