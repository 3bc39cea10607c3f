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
mod checkers;
mod pollers;
mod reporters;
mod secrets;
pub mod template;
mod webhooks;

pub use builds::{
    BuilderConfig, DownloadStep, GitMode, GitStep, Nightly, OnLost, PR_NUMBER, SchedulerConfig,
    StepConfig, UploadStep, WORKER_SELF, WorkerConfig, valid_artifact_name, valid_property_name,
};
pub use checkers::CheckerConfig;
pub use pollers::PollerConfig;
pub use reporters::{ReporterConfig, ReporterKind};
pub use secrets::{
    MIN_STEP_SECRET, MIN_WEBHOOK_SECRET, Secrets, SecretsFileChecker, StepSecrets, WebhookSecrets,
};
pub use webhooks::{Provider, RepositoryUrl, WebhookConfig};

use crate::auth::ThrottleConfig;
use crate::limits::Limits;

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

pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
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

/// Reads a whole file, refusing anything but a regular file: a FIFO or a
/// device would block the reader until someone writes to it.
fn read(path: &Path) -> Result<String, ConfigError> {
    let err = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if !meta.is_file() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    std::fs::read_to_string(path).map_err(err)
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
    web: Option<RawWeb>,
    #[serde(default)]
    checker: Vec<Spanned<checkers::RawChecker>>,
    #[serde(default)]
    webhook: Vec<webhooks::RawWebhook>,
    #[serde(default)]
    poller: Vec<pollers::RawPoller>,
    #[serde(default)]
    reporter: Vec<reporters::RawReporter>,
}

/// `[web]`: what the port's HTTP side shows to whom.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeb {
    /// The JSON API (and, later, the web UI) readable without credentials.
    public: Option<bool>,
    /// `/metrics` readable without credentials.
    public_metrics: Option<bool>,
    /// A web session unused this long is over.
    session_idle_timeout: Option<Spanned<String>>,
    /// The master's address as users reach it (links in reports).
    url: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMaster {
    listen: Option<Spanned<String>>,
    secrets: Spanned<String>,
    state: Option<Spanned<String>>,
    data_dir: Option<Spanned<String>>,
    sniff_timeout: Option<Spanned<String>>,
    handshake_timeout: Option<Spanned<String>>,
    heartbeat_interval: Option<Spanned<String>>,
    lease_duration: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    max_handshakes: Option<Spanned<i64>>,
    max_unauthenticated_per_address: Option<Spanned<i64>>,
    auth_max_failures: Option<Spanned<i64>>,
    auth_failure_window: Option<Spanned<String>>,
    auth_block: Option<Spanned<String>>,
    drain_removed_workers: Option<bool>,
    build_retention: Option<Spanned<String>>,
    log_retention: Option<Spanned<String>>,
    max_log_size: Option<Spanned<String>>,
    on_log_limit: Option<Spanned<String>>,
    max_artifact_size: Option<Spanned<String>>,
    max_build_artifacts_size: Option<Spanned<String>>,
    worker_reconnect_grace: Option<Spanned<String>>,
    tls: Option<Spanned<RawTls>>,
}

/// `[master.tls]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Spanned<String>,
    key: Spanned<String>,
    require: Option<bool>,
}

/// `[master.tls]`: the certificate chain and key files (PEM), resolved
/// against the config's directory; they are read with the config, so a
/// reload with a file that does not parse is rejected whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Cleartext connections are refused (but HTTP/1 `GET /healthz`).
    pub require: bool,
    /// Where `[master.tls]` is in the config (a byte offset), for errors.
    pub(crate) at: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: Spanned<String>,
    #[serde(default)]
    services: Vec<Spanned<String>>,
}

/// A config file and the secrets file it names, read and checked against
/// each other, with warnings (not errors) for the operator.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub secrets: Secrets,
    /// Each a line naming its file and line, e.g. a verifier for a name the
    /// config does not know.
    pub warnings: Vec<String>,
    /// `[master.tls]`'s certificate and key, loaded.
    pub tls: Option<crate::dispatcher::tls::TlsSettings>,
}

/// Reads and validates a config file and its secrets file together: every
/// `[[user]]` and `[[worker]]` must have a verifier (else an error naming
/// the config file and line: an empty or truncated secrets file must not log
/// everybody out) unless a `[[checker]]` can judge their passwords (then
/// one warning names those without), and a verifier for a name the config does not know is a
/// warning naming the secrets file's line (a typo). To disable someone,
/// remove them from the config. Every `%(secret:NAME)s` a step uses must be
/// in `[step_secrets]` (else an error naming the config line).
pub fn load_with_secrets(path: &Path) -> Result<Loaded, ConfigError> {
    let text = read(path)?;
    let config = Config::parse(path, &text)?;
    let secrets = match Secrets::load(&config.secrets_path) {
        Ok(s) => s,
        Err(ConfigError::Read { path: file, source }) => {
            let (line, column) = line_col(&text, config.secrets_at);
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                column,
                message: format!(
                    "key `master.secrets`: cannot read the secrets file {}: {source}",
                    file.display()
                ),
            });
        }
        Err(e) => return Err(e),
    };
    let warnings = check_verifiers(&config, &text, &secrets)?;
    let tls = match &config.tls {
        None => None,
        Some(t) => match crate::dispatcher::tls::TlsSettings::load(&t.cert, &t.key, t.require) {
            Ok(s) => Some(s),
            Err(e) => {
                let (line, column) = line_col(&text, t.at);
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    line,
                    column,
                    message: format!("`[master.tls]`: {e}"),
                });
            }
        },
    };
    Ok(Loaded {
        config,
        secrets,
        warnings,
        tls,
    })
}

/// See [`load_with_secrets`]; `text` is the config file's text.
fn check_verifiers(
    config: &Config,
    text: &str,
    secrets: &Secrets,
) -> Result<Vec<String>, ConfigError> {
    let mut checked = Vec::new();
    for name in config.users.keys().chain(config.workers.keys()) {
        if !secrets.verifiers.contains_key(name) && !config.checkers.is_empty() {
            checked.push(name.as_str());
        } else if !secrets.verifiers.contains_key(name) {
            let what = if config.workers.contains_key(name) {
                "worker"
            } else {
                "user"
            };
            let at = config.defined_at.get(name).copied().unwrap_or(0);
            return Err(ConfigError::at(
                &config.path,
                text,
                at,
                format!(
                    "key `{what}.name`: {what} `{name}` has no verifier in the secrets file {}; add one made by `switchyard passwd {name}`, or remove the {what} from this file",
                    config.secrets_path.display()
                ),
            ));
        }
    }
    for (name, &at) in &config.secret_at {
        if !secrets.step_secrets.contains(name) {
            return Err(ConfigError::at(
                &config.path,
                text,
                at,
                format!(
                    "`%(secret:{name})s`: the secrets file {} has no `{name}` in [step_secrets]",
                    config.secrets_path.display()
                ),
            ));
        }
    }
    for hook in config.webhooks.values() {
        if secrets.webhook_secrets.get(&hook.name).is_none() {
            return Err(ConfigError::at(
                &config.path,
                text,
                hook.at,
                format!(
                    "key `webhook.name`: webhook `{}` has no secret in the secrets file {}; add `{} = \"...\"` under [webhook_secrets] (the same secret as the provider's webhook settings)",
                    hook.name,
                    config.secrets_path.display(),
                    hook.name
                ),
            ));
        }
    }
    let mut unknown: Vec<(usize, &str)> = secrets
        .verifiers
        .keys()
        .filter(|n| !config.users.contains_key(*n) && !config.workers.contains_key(*n))
        .map(|n| (secrets.lines.get(n).copied().unwrap_or(0), n.as_str()))
        .collect();
    unknown.sort();
    let mut warnings: Vec<String> = unknown
        .into_iter()
        .map(|(line, name)| {
            format!(
                "{}:{line}: a verifier for `{name}`, which is neither a [[user]] nor a [[worker]] of {} (a typo?); it is ignored",
                config.secrets_path.display(),
                config.path.display()
            )
        })
        .collect();
    for r in &config.reporters {
        if r.kind != ReporterKind::Http && secrets.reporter_tokens.get(&r.name).is_none() {
            return Err(ConfigError::at(
                &config.path,
                text,
                r.at,
                format!(
                    "key `reporter.name`: reporter `{}` has no token in the secrets file {}; add `{} = \"...\"` under [reporter_tokens]",
                    r.name,
                    config.secrets_path.display(),
                    r.name
                ),
            ));
        }
    }
    for name in secrets.reporter_tokens.names() {
        if !config.reporters.iter().any(|r| r.name == name) {
            warnings.push(format!(
                "{}: a reporter token for `{name}`, which is no [[reporter]] of {} (a typo?); it is ignored",
                config.secrets_path.display(),
                config.path.display()
            ));
        }
    }
    for name in secrets.webhook_secrets.names() {
        if !config.webhooks.contains_key(name) {
            warnings.push(format!(
                "{}: a webhook secret for `{name}`, which is no [[webhook]] of {} (a typo?); it is ignored",
                config.secrets_path.display(),
                config.path.display()
            ));
        }
    }
    if !checked.is_empty() {
        let tls = if config.tls.is_some() {
            ""
        } else {
            ", which this master, without [master.tls], never does: they cannot log in"
        };
        warnings.push(format!(
            "{}: {} {} no verifier in {}: only the [[checker]]s can let them in, over TLS (PLAIN or HTTP Basic){tls}",
            config.path.display(),
            checked.join(", "),
            if checked.len() == 1 { "has" } else { "have" },
            config.secrets_path.display(),
        ));
    } else if !config.checkers.is_empty() && config.tls.is_none() {
        warnings.push(format!(
            "{}: the [[checker]]s are asked only for logins inside TLS, and this master has no [master.tls]: they are never asked",
            config.path.display()
        ));
    }
    Ok(warnings)
}

/// A validated master configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The file it was read from; relative paths inside are resolved against
    /// its directory.
    pub path: PathBuf,
    pub listen: SocketAddr,
    pub secrets_path: PathBuf,
    /// `[master.tls]`, if any.
    pub tls: Option<TlsFiles>,
    /// `[[checker]]`s, in the order they are asked.
    pub checkers: Vec<CheckerConfig>,
    /// `[[webhook]]`s, by name (served at `POST /hooks/<name>`).
    pub webhooks: BTreeMap<String, WebhookConfig>,
    /// `[[poller]]`s.
    pub pollers: Vec<PollerConfig>,
    /// `[[reporter]]`s.
    pub reporters: Vec<ReporterConfig>,
    /// `[web] url`: the master's address as users reach it, for links in
    /// reports (`{url}/builds/ID`).
    pub web_url: Option<String>,
    /// Where `master.secrets` is in the file (a byte offset).
    pub secrets_at: usize,
    /// Where each `[[user]]` and `[[worker]]` is named (byte offsets), for
    /// errors found later, against the secrets file.
    pub defined_at: BTreeMap<String, usize>,
    /// Each `%(secret:NAME)s` the steps use, and where (a byte offset): every
    /// one must be in the secrets file's `[step_secrets]`.
    pub secret_at: BTreeMap<String, usize>,
    /// The SQLite database holding changes, builds and the master's secrets.
    pub state_path: PathBuf,
    /// `[master] state = "postgres://USER@HOST/DB"`: the state is in that
    /// PostgreSQL database instead (`state_path` is then unused).
    pub state_url: Option<String>,
    /// `[master] lease_duration` (PostgreSQL state): how long this master's
    /// lease lasts unrenewed (renewed every third of it); once it has
    /// expired, another master adopts this one's running builds.
    pub lease_duration: Duration,
    /// `[master] data_dir`: where step logs (`logs/`) and pollers' mirrors
    /// (`pollers/`) live; by default the state database's directory.
    pub data_dir: PathBuf,
    /// A worker removed by a reload finishes its current builds first.
    pub drain_removed_workers: bool,
    /// `[master] build_retention`: builds that ended longer ago than this
    /// are deleted, with their steps and logs (`None`: kept for ever).
    pub build_retention: Option<Duration>,
    /// `[master] log_retention`: the logs of builds that ended longer ago
    /// than this are deleted; the builds stay (`None`: kept for ever).
    pub log_retention: Option<Duration>,
    /// `[master] max_log_size`: the most one step's log keeps.
    pub max_log_size: u64,
    /// `[master] on_log_limit`: a step past `max_log_size` goes on (its
    /// output cut, `false`) or fails (`true`).
    pub fail_on_log_limit: bool,
    /// `[master] max_artifact_size`: the largest artifact an upload step
    /// may send; past it the step is stopped and fails.
    pub max_artifact_size: u64,
    /// `[master] max_build_artifacts_size`: the most a build's artifacts
    /// may take together; an upload past it is stopped and fails.
    pub max_build_artifacts_size: u64,
    /// `[web] public_metrics`: `/metrics` needs no credentials (else a user
    /// granted `metrics`).
    pub public_metrics: bool,
    /// `[web] public`: the JSON API needs no credentials to read (else a
    /// user granted `web`); actions always do.
    pub public_web: bool,
    /// `[web] session_idle_timeout`: a web session unused this long is
    /// over (default 8 h).
    pub web_session_idle: Duration,
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

/// The shortest `sniff_timeout`, `handshake_timeout` and
/// `[master] lease_duration` by default: a dead master's builds are adopted
/// within about this long, and a master may be stopped (or cut off from
/// the database) this long before it loses its builds.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// `heartbeat_interval`: below it a busy machine would drop good clients.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);

/// How long a web session may go unused by default.
pub const DEFAULT_WEB_SESSION_IDLE: Duration = Duration::from_secs(8 * 3600);

/// `[master] max_log_size` by default: 2 GiB per step.
pub const DEFAULT_MAX_LOG_SIZE: u64 = 2 << 30;

/// `[master] max_artifact_size` by default: 10 GiB.
pub const DEFAULT_MAX_ARTIFACT_SIZE: u64 = 10 << 30;

/// `[master] max_build_artifacts_size` by default: 50 GiB.
pub const DEFAULT_MAX_BUILD_ARTIFACTS_SIZE: u64 = 50 << 30;

/// A size in bytes: a whole number with an optional unit (`B`, `KiB`,
/// `MiB`, `GiB`, `TiB`, or `KB`, `MB`, `GB`, `TB` in powers of ten).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n.parse().ok()?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(scale)
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

    /// [`Validator::duration`], refusing values under `min`.
    pub(crate) fn duration_at_least(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
        min: Duration,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(v, key, default)?;
        match v {
            Some(v) if d < min => self.err(
                v.span(),
                key,
                format_args!("`{}` is too short: at least {min:?}", v.get_ref()),
            ),
            _ => Ok(d),
        }
    }

    /// A size (see [`parse_size`]), at least `min` bytes.
    pub(crate) fn size(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
        default: u64,
        min: u64,
    ) -> Result<u64, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        match parse_size(v.get_ref()) {
            Some(n) if n >= min => Ok(n),
            Some(_) => self.err(
                v.span(),
                key,
                format_args!("`{}` is too small: at least {min} bytes", v.get_ref()),
            ),
            None => self.err(
                v.span(),
                key,
                format_args!(
                    "`{}` is not a size; write e.g. \"2GiB\" or \"500MiB\"",
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
        let mut state_url = None;
        let state_path = match &m.state {
            None => base.join(DEFAULT_STATE),
            Some(s) if s.get_ref().trim().is_empty() => {
                return c.err(s.span(), "master.state", "names no file");
            }
            // Not a file name (a file named `postgres:` would be made).
            Some(s) if s.get_ref().contains("://") => {
                let url = s.get_ref().trim();
                if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
                    return c.err(
                        s.span(),
                        "master.state",
                        "a database address must be postgres://USER@HOST/DB (or a SQLite file name)",
                    );
                }
                if let Err(e) = url.parse::<tokio_postgres::Config>() {
                    return c.err(
                        s.span(),
                        "master.state",
                        format!("is not a PostgreSQL address: {e}"),
                    );
                }
                if m.data_dir.is_none() {
                    return c.err(
                        s.span(),
                        "master.state",
                        "with a PostgreSQL state, set master.data_dir too: the directory of logs and artifacts, shared by every master on the database",
                    );
                }
                state_url = Some(url.to_string());
                base.join(DEFAULT_STATE)
            }
            Some(s) => base.join(s.get_ref()),
        };
        let data_dir = match &m.data_dir {
            None => state_path.parent().unwrap_or(base).to_path_buf(),
            Some(d) if d.get_ref().trim().is_empty() => {
                return c.err(d.span(), "master.data_dir", "names no directory");
            }
            Some(d) => base.join(d.get_ref()),
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
            max_unauthenticated_per_address: c.count(
                &m.max_unauthenticated_per_address,
                "master.max_unauthenticated_per_address",
                defaults.max_unauthenticated_per_address,
            )?,
            sniff_timeout: c.duration_at_least(
                &m.sniff_timeout,
                "master.sniff_timeout",
                defaults.sniff_timeout,
                MIN_TIMEOUT,
            )?,
            handshake_timeout: c.duration_at_least(
                &m.handshake_timeout,
                "master.handshake_timeout",
                defaults.handshake_timeout,
                MIN_TIMEOUT,
            )?,
            heartbeat_interval: c.duration_at_least(
                &m.heartbeat_interval,
                "master.heartbeat_interval",
                defaults.heartbeat_interval,
                MIN_TIMEOUT,
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
            secrets_at: m.secrets.span().start,
            defined_at: {
                let mut at = first_line;
                at.extend(builds.worker_at);
                at
            },
            secret_at: builds.secret_at,
            state_path,
            state_url,
            lease_duration: c.duration_at_least(
                &m.lease_duration,
                "master.lease_duration",
                DEFAULT_LEASE,
                Duration::from_millis(300),
            )?,
            data_dir,
            drain_removed_workers: m.drain_removed_workers.unwrap_or(false),
            build_retention: match &m.build_retention {
                None => None,
                Some(_) => Some(c.duration(
                    &m.build_retention,
                    "master.build_retention",
                    Duration::ZERO,
                )?),
            },
            log_retention: match &m.log_retention {
                None => None,
                Some(_) => {
                    Some(c.duration(&m.log_retention, "master.log_retention", Duration::ZERO)?)
                }
            },
            max_log_size: c.size(
                &m.max_log_size,
                "master.max_log_size",
                DEFAULT_MAX_LOG_SIZE,
                1024,
            )?,
            max_artifact_size: c.size(
                &m.max_artifact_size,
                "master.max_artifact_size",
                DEFAULT_MAX_ARTIFACT_SIZE,
                1,
            )?,
            max_build_artifacts_size: c.size(
                &m.max_build_artifacts_size,
                "master.max_build_artifacts_size",
                DEFAULT_MAX_BUILD_ARTIFACTS_SIZE,
                1,
            )?,
            fail_on_log_limit: match &m.on_log_limit {
                None => false,
                Some(v) => match v.get_ref().as_str() {
                    "truncate" => false,
                    "fail" => true,
                    other => {
                        return c.err(
                            v.span(),
                            "master.on_log_limit",
                            format_args!("`{other}` is not one of truncate, fail"),
                        );
                    }
                },
            },
            public_metrics: raw
                .web
                .as_ref()
                .and_then(|w| w.public_metrics)
                .unwrap_or(false),
            public_web: raw.web.as_ref().and_then(|w| w.public).unwrap_or(false),
            web_session_idle: c.duration_at_least(
                &raw.web
                    .as_ref()
                    .and_then(|w| w.session_idle_timeout.clone()),
                "web.session_idle_timeout",
                DEFAULT_WEB_SESSION_IDLE,
                Duration::from_secs(1),
            )?,
            tls: match &m.tls {
                None => None,
                Some(t) => {
                    let t_at = t.span().start;
                    let t = t.get_ref();
                    for (v, key) in [(&t.cert, "master.tls.cert"), (&t.key, "master.tls.key")] {
                        if v.get_ref().trim().is_empty() {
                            return c.err(v.span(), key, "names no file");
                        }
                    }
                    Some(TlsFiles {
                        cert: base.join(t.cert.get_ref()),
                        key: base.join(t.key.get_ref()),
                        require: t.require.unwrap_or(false),
                        at: t_at,
                    })
                }
            },
            checkers: checkers::validate(&c, base, &raw.checker)?,
            webhooks: webhooks::validate(&c, &raw.webhook)?,
            pollers: pollers::validate(&c, &raw.poller)?,
            reporters: reporters::validate(&c, &raw.reporter)?,
            web_url: raw
                .web
                .as_ref()
                .and_then(|w| w.url.as_ref())
                .map(|u| u.trim_end_matches('/').to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/sy/master.toml"), text)
    }

    /// Writes a config with one worker and one builder whose step is
    /// `step`, and a secrets file with `step_secrets`, then loads both.
    fn load_step(step: &str, step_secrets: &str) -> Result<Loaded, String> {
        let dir = tempfile::tempdir().unwrap();
        let v = crate::auth::Verifier::from_password(b"pw", 4096)
            .unwrap()
            .encode();
        std::fs::write(
            dir.path().join("master.toml"),
            format!(
                "[master]\nsecrets = \"secrets.toml\"\n\n[[worker]]\nname = \"w1\"\n\n\
                 [[builder]]\nname = \"b\"\nworkers = [\"w1\"]\n[[builder.step]]\nname = \"s\"\n{step}\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("secrets.toml"),
            format!("[verifiers]\nw1 = {v:?}\n\n[step_secrets]\n{step_secrets}"),
        )
        .unwrap();
        load_with_secrets(&dir.path().join("master.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn step_secrets_are_checked_against_the_secrets_file() {
        let ok = load_step(
            "shell = \"deploy --token %(secret:token)s\"",
            "token = \"abcd-1234\"\n",
        )
        .unwrap();
        assert_eq!(ok.secrets.step_secrets.get("token"), Some("abcd-1234"));
        // Debug shows names, never values.
        assert!(!format!("{:?}", ok.secrets).contains("abcd-1234"));
        let e = load_step(
            "shell = \"deploy %(secret:tokn)s\"",
            "token = \"abcd-1234\"\n",
        )
        .unwrap_err();
        assert!(
            e.contains("master.toml:12:") && e.contains("no `tokn` in [step_secrets]"),
            "{e}"
        );
        let e = load_step(
            "shell = \"true\"\nworkdir = \"out/%(secret:token)s\"",
            "token = \"abcd-1234\"\n",
        )
        .unwrap_err();
        assert!(
            e.contains("builder.step.workdir") && e.contains("cannot be part of a path"),
            "{e}"
        );
        let e = load_step("shell = \"true\"", "token = \"abc\"\n").unwrap_err();
        assert!(
            e.contains("secrets.toml:5:") && e.contains("shorter than 4 bytes"),
            "{e}"
        );
        let e = load_step("shell = \"echo %(secret:token:-x)s\"", "").unwrap_err();
        assert!(e.contains("a secret cannot have"), "{e}");
    }

    #[test]
    fn checkers_are_checked_and_let_users_go_without_verifiers() {
        let dir = tempfile::tempdir().unwrap();
        let load = |checker: &str| {
            std::fs::write(
                dir.path().join("master.toml"),
                format!(
                    "[master]\nsecrets = \"secrets.toml\"\n\n[[user]]\nname = \"carol\"\nservices = [\"debug\"]\n{checker}"
                ),
            )
            .unwrap();
            std::fs::write(dir.path().join("secrets.toml"), "[verifiers]\n").unwrap();
            load_with_secrets(&dir.path().join("master.toml")).map_err(|e| e.to_string())
        };
        // Without a checker, a user without a verifier is an error.
        let e = load("").unwrap_err();
        assert!(e.contains("has no verifier"), "{e}");
        // With one, it is a warning that says how they log in, and that
        // without TLS nobody can.
        let ok = load("\n[[checker]]\nkind = \"command\"\ncommand = [\"true\"]\n").unwrap();
        assert_eq!(ok.config.checkers.len(), 1);
        assert!(
            ok.warnings
                .iter()
                .any(|w| w.contains("carol has no verifier") && w.contains("without [master.tls]")),
            "{:?}",
            ok.warnings
        );
        for (checker, line, says) in [
            (
                "kind = \"ldap\"\ncommand = [\"true\"]",
                9,
                "the kinds are command",
            ),
            ("kind = \"command\"", 8, "a command checker needs `command"),
            ("kind = \"command\"\ncommand = []", 10, "names no program"),
            (
                "kind = \"command\"\ncommand = [\"./nowhere\"]",
                10,
                "is not an executable file",
            ),
            (
                "kind = \"command\"\ncommand = [\"no-such-program-here\"]",
                10,
                "no executable `no-such-program-here` on PATH",
            ),
            (
                "kind = \"command\"\ncommand = [\"true\"]\ntimeout = \"soon\"",
                11,
                "checker.timeout",
            ),
            (
                "kind = \"command\"\ncommand = [\"true\"]\nconcurrency = 0",
                11,
                "checker.concurrency",
            ),
        ] {
            let e = load(&format!("\n[[checker]]\n{checker}\n")).unwrap_err();
            assert!(
                e.contains(&format!("master.toml:{line}:")) && e.contains(says),
                "{checker}: {e}"
            );
        }
    }

    #[test]
    fn webhooks_need_a_known_kind_a_unique_name_and_a_secret() {
        let dir = tempfile::tempdir().unwrap();
        let load = |hooks: &str, secrets: &str| {
            std::fs::write(
                dir.path().join("master.toml"),
                format!("[master]\nsecrets = \"secrets.toml\"\n{hooks}"),
            )
            .unwrap();
            std::fs::write(dir.path().join("secrets.toml"), secrets).unwrap();
            load_with_secrets(&dir.path().join("master.toml")).map_err(|e| e.to_string())
        };
        let hook = "\n[[webhook]]\nname = \"gh\"\nkind = \"github\"\n";
        let secret = "[webhook_secrets]\ngh = \"0123456789abcdef0123\"\n";
        let ok = load(hook, secret).unwrap();
        assert_eq!(ok.config.webhooks["gh"].provider, Provider::GitHub);
        assert!(!format!("{:?}", ok.secrets).contains("0123456789abcdef0123"));
        let e = load(hook, "").unwrap_err();
        assert!(
            e.contains("master.toml:5:") && e.contains("webhook `gh` has no secret"),
            "{e}"
        );
        let e = load(hook, "[webhook_secrets]\ngh = \"short\"\n").unwrap_err();
        assert!(e.contains("shorter than 16 bytes"), "{e}");
        let e = load(
            "\n[[webhook]]\nname = \"gh\"\nkind = \"bitbucket\"\n",
            secret,
        )
        .unwrap_err();
        assert!(e.contains(":6:") && e.contains("not one of github"), "{e}");
        let e = load(&format!("{hook}{hook}"), secret).unwrap_err();
        assert!(e.contains("defined twice (first at line 5)"), "{e}");
        let e = load("\n[[webhook]]\nname = \"a/b\"\nkind = \"github\"\n", secret).unwrap_err();
        assert!(e.contains("not a valid webhook name"), "{e}");
        let warned = load("", secret).unwrap();
        assert!(
            warned
                .warnings
                .iter()
                .any(|w| w.contains("webhook secret for `gh`")),
            "{:?}",
            warned.warnings
        );
    }

    #[test]
    fn pollers_are_checked() {
        let base = "[master]\nsecrets = \"s.toml\"\n";
        let c = parse(&format!(
            "{base}[[poller]]\nrepository = \"https://git.example.org/w.git\"\nbranches = [\"main\", \"release/*\"]\n"
        ))
        .unwrap();
        let p = &c.pollers[0];
        assert_eq!(p.interval, std::time::Duration::from_secs(60));
        assert!(p.follows("main") && p.follows("release/1.0"));
        assert!(!p.follows("release/1.0/x") && !p.follows("feature"));
        for (poller, says) in [
            ("repository = \"r\"\nbranches = [\"[\"]", "is not a glob"),
            ("repository = \"r\"\ninterval = \"10ms\"", "too short"),
            ("repository = \"--upload-pack=x\"", "cannot start with `-`"),
        ] {
            let e = parse(&format!("{base}[[poller]]\n{poller}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{poller}: {e}");
        }
        let e = parse(&format!(
            "{base}[[poller]]\nrepository = \"r\"\n[[poller]]\nrepository = \"r\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains(":6:") && e.contains("polled twice"), "{e}");
    }

    #[test]
    fn reporters_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let load = |reporter: &str, tokens: &str| {
            std::fs::write(
                dir.path().join("master.toml"),
                format!("[master]\nsecrets = \"secrets.toml\"\n\n[[reporter]]\nname = \"r\"\n{reporter}\n"),
            )
            .unwrap();
            std::fs::write(dir.path().join("secrets.toml"), tokens).unwrap();
            load_with_secrets(&dir.path().join("master.toml")).map_err(|e| e.to_string())
        };
        let token = "[reporter_tokens]\nr = \"t\"\n";
        let ok = load("kind = \"github\"\nbranches = [\"release/*\"]", token).unwrap();
        let r = &ok.config.reporters[0];
        assert_eq!(r.url, "https://api.github.com");
        assert!(r.wants("any", "release/1") && !r.wants("any", "main"));
        assert!(load("kind = \"http\"\nurl = \"http://127.0.0.1:1/x\"", "").is_ok());
        for (reporter, tokens, says) in [
            ("kind = \"github\"", "", "has no token"),
            ("kind = \"gitea\"", token, "needs `api_url`"),
            ("kind = \"http\"", "", "needs `url`"),
            ("kind = \"jenkins\"", token, "not one of github"),
            (
                "kind = \"gitlab\"\napi_url = \"gitlab.example.org\"",
                token,
                "not an http",
            ),
            (
                "kind = \"github\"\nmax_age = \"soon\"",
                token,
                "reporter.max_age",
            ),
        ] {
            let e = load(reporter, tokens).unwrap_err();
            assert!(e.contains(says), "{reporter}: {e}");
        }
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
    fn a_database_address_as_state_is_postgresql_with_a_data_dir() {
        let c = parse(
            "[master]\nsecrets = \"s.toml\"\nstate = \"postgres://root@127.0.0.1/test\"\ndata_dir = \"/srv/shared\"\n",
        )
        .unwrap();
        assert_eq!(
            c.state_url.as_deref(),
            Some("postgres://root@127.0.0.1/test")
        );
        assert_eq!(c.data_dir, Path::new("/srv/shared"));
        let e =
            parse("[master]\nsecrets = \"s.toml\"\nstate = \"postgres://root@127.0.0.1/test\"\n")
                .unwrap_err()
                .to_string();
        assert!(e.starts_with("/etc/sy/master.toml:3:"), "{e}");
        assert!(
            e.contains("master.state") && e.contains("master.data_dir"),
            "{e}"
        );
        let e = parse(
            "[master]\nsecrets = \"s.toml\"\nstate = \"mysql://root@h/db\"\ndata_dir = \"d\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(":3:") && e.contains("postgres://USER@HOST/DB"),
            "{e}"
        );
        let e = parse("[master]\nsecrets = \"s.toml\"\nstate = \"postgres://root@h:notaport/db\"\ndata_dir = \"d\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":3:") && e.contains("not a PostgreSQL address"),
            "{e}"
        );
        assert_eq!(
            parse("[master]\nsecrets = \"s.toml\"\n").unwrap().state_url,
            None
        );
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
}
