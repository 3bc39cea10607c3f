//! The build part of the config: `[[worker]]`, `[[builder]]` (with its
//! `[[builder.step]]`s) and `[[scheduler]]`.
//!
//! ```toml
//! [[worker]]
//! name = "linux-1"          # logs in as this user to the service `worker`
//! max_builds = 2            # default 1
//! env = { CCACHE_DIR = "/var/cache/ccache" }  # every step on this worker
//! properties = { arch = "x86_64" }              # every build on this worker
//!
//! [[builder]]
//! name = "widgets"
//! workers = ["linux-1"]
//! [[builder.step]]
//! name = "build"
//! command = ["make", "all"] # or: shell = "make all && make check"
//! workdir = "src"           # under the builder's directory on the worker
//! env = { CC = "clang" }
//! timeout = "20m"
//! on_lost = "retry"         # retry | restart | fail (default fail)
//!
//! [[scheduler]]
//! name = "main"
//! builders = ["widgets"]
//! branches = ["main"]       # empty: every branch
//! repository = "widgets"    # optional
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Validator, valid_name};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWorker {
    name: Spanned<String>,
    max_builds: Option<Spanned<i64>>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBuilder {
    name: Spanned<String>,
    #[serde(default)]
    workers: Vec<Spanned<String>>,
    #[serde(default)]
    step: Vec<Spanned<RawStep>>,
    #[serde(default)]
    collapse_requests: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStep {
    name: Spanned<String>,
    command: Option<Spanned<Vec<String>>>,
    shell: Option<Spanned<String>>,
    workdir: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    timeout: Option<Spanned<String>>,
    on_lost: Option<Spanned<String>>,
    git: Option<Spanned<RawGit>>,
    upload: Option<Spanned<RawUpload>>,
    download: Option<Spanned<RawDownload>>,
    set_properties: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpload {
    source: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDownload {
    name: String,
    from: String,
    dest: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGit {
    repository: String,
    mode: Option<String>,
    branch: Option<String>,
    revision: Option<String>,
    #[serde(default)]
    submodules: bool,
    depth: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawScheduler {
    name: Spanned<String>,
    #[serde(default)]
    builders: Vec<Spanned<String>>,
    #[serde(default)]
    branches: Vec<String>,
    repository: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
    #[serde(default)]
    file_filter: Vec<Spanned<String>>,
    tree_stable_timer: Option<Spanned<String>>,
    kind: Option<Spanned<String>>,
    cron: Option<Spanned<String>>,
    branch: Option<String>,
    #[serde(default)]
    only_if_changed: bool,
    #[serde(default)]
    pull_requests: bool,
}

/// The property that marks a change made for a pull or merge request.
pub const PR_NUMBER: &str = "pr_number";

/// A build machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerConfig {
    pub name: String,
    /// Builds it may run at once.
    pub max_builds: usize,
    /// Variables every step on this worker gets (a step's own `env` wins).
    pub env: BTreeMap<String, String>,
    /// Properties every build on this worker gets (source `worker`).
    pub properties: BTreeMap<String, String>,
}

/// What happens to a step that is truly lost (its worker restarted, or did
/// not come back in time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnLost {
    /// Run the step again (for `make all`).
    Retry,
    /// Run the whole build again from its first step (a checkout that
    /// cannot resume halfway).
    Restart,
    /// Fail the build.
    Fail,
}

impl OnLost {
    pub fn as_str(self) -> &'static str {
        match self {
            OnLost::Retry => "retry",
            OnLost::Restart => "restart",
            OnLost::Fail => "fail",
        }
    }
}

/// How a git step leaves its directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GitMode {
    /// Fetch and check out; untracked files stay (fast).
    Incremental,
    /// Also remove everything git does not track.
    Full,
}

/// A checkout step, run by the worker with the `git` command. Every field
/// may hold `%(prop:...)s`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitStep {
    pub repository: String,
    pub mode: GitMode,
    /// Default: the build's `branch` property.
    pub branch: Option<String>,
    /// Default: the build's `revision` property (then the head of the branch).
    pub revision: Option<String>,
    pub submodules: bool,
    pub depth: Option<u32>,
}

/// One step of a builder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepConfig {
    pub name: String,
    /// The program and its arguments (`shell = "..."` becomes `sh -c "..."`).
    /// Each may hold `%(prop:...)s`, filled in when the step starts.
    pub argv: Vec<String>,
    /// A `shell` step: values interpolated into its line are shell-quoted.
    pub shell: bool,
    /// A git checkout step (its argv is made when it starts).
    pub git: Option<GitStep>,
    /// An upload step: sends a file or directory of the step's directory
    /// to the master as an artifact of the build.
    pub upload: Option<UploadStep>,
    /// A download step: brings an artifact of another build into the
    /// step's directory.
    pub download: Option<DownloadStep>,
    /// `set_properties = "stdout"`: `NAME=VALUE` lines of its standard output
    /// become properties of the build for the steps after it.
    pub set_properties: bool,
    /// Relative to the builder's directory on the worker.
    pub workdir: Option<String>,
    pub env: BTreeMap<String, String>,
    pub timeout: Option<Duration>,
    pub on_lost: OnLost,
}

/// `upload = { source = "...", name = "..." }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadStep {
    /// Relative to the step's directory, without `..`.
    pub source: String,
    /// The artifact's name in the build: letters, digits, `-`, `_`, `.`.
    pub name: String,
}

/// `download = { name = "...", from = "...", dest = "..." }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownloadStep {
    /// The artifact's name in the build it comes from.
    pub name: String,
    /// Which build: `latest-success:BUILDER`, a build id or
    /// `BUILDER#NUMBER`; may hold `%(prop:...)s`, filled in when the step
    /// starts.
    pub from: String,
    /// Relative to the step's directory, without `..`: the file, or the
    /// directory a directory's artifact is unpacked into.
    pub dest: String,
}

/// Whether `name` may name an artifact (a file name of its own).
pub fn valid_artifact_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The program an upload step runs on the worker: the worker's own binary
/// (`@switchyard` is replaced by it there).
pub const WORKER_SELF: &str = "@switchyard";

/// A builder: steps, and the workers that may run them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuilderConfig {
    pub name: String,
    pub workers: Vec<String>,
    pub steps: Vec<StepConfig>,
    /// Waiting requests of one branch merge into one build of the newest.
    pub collapse_requests: bool,
}

/// Turns matching changes into build requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub name: String,
    pub builders: Vec<String>,
    /// Branches that match; empty matches every branch.
    pub branches: Vec<String>,
    /// If set, only changes to this repository match.
    pub repository: Option<String>,
    /// `[scheduler.properties]`: given to every build it makes.
    pub properties: BTreeMap<String, String>,
    /// `file_filter`: only changes touching a matching file trigger.
    pub file_filter: FileFilter,
    /// `tree_stable_timer`: build once no matching change has come for
    /// this long, one build of the newest with every change recorded.
    pub tree_stable_timer: Option<Duration>,
    /// `kind = "nightly"`: builds on a schedule instead of on changes.
    pub nightly: Option<Nightly>,
    /// `pull_requests = true`: changes made for pull or merge requests
    /// (those with a `pr_number` property, from webhooks) trigger it too,
    /// its `branches` matched against the request's base branch; otherwise
    /// they are ignored.
    pub pull_requests: bool,
}

/// A schedule: `cron` (five fields, or six with seconds first), the branch
/// to build, and whether to build only when it has new changes.
#[derive(Clone, Debug)]
pub struct Nightly {
    /// As written in the config.
    pub cron: String,
    pub schedule: cron::Schedule,
    pub branch: String,
    pub only_if_changed: bool,
}

impl PartialEq for Nightly {
    fn eq(&self, other: &Self) -> bool {
        (&self.cron, &self.branch, self.only_if_changed)
            == (&other.cron, &other.branch, other.only_if_changed)
    }
}

impl Eq for Nightly {}

impl Nightly {
    /// Parses a cron line: five fields (minute first) or six (second first).
    pub fn parse_cron(line: &str) -> Result<cron::Schedule, String> {
        use std::str::FromStr;
        let fields = line.split_whitespace().count();
        let full = match fields {
            5 => format!("0 {line}"),
            6 => line.to_string(),
            _ => {
                return Err(format!(
                    "`{line}` has {fields} fields; write five (minute hour day month weekday) or six (second first)"
                ));
            }
        };
        cron::Schedule::from_str(&full).map_err(|e| format!("`{line}` is not a cron schedule: {e}"))
    }
}

/// Globs over a change's files, `!` for exclusion, the last match winning:
/// a change triggers if one of its files is included (or it lists none).
#[derive(Clone, Debug, Default)]
pub struct FileFilter {
    /// (pattern as written, whether it includes), in order.
    patterns: Vec<(String, bool)>,
    matchers: Vec<globset::GlobMatcher>,
}

impl PartialEq for FileFilter {
    fn eq(&self, other: &Self) -> bool {
        self.patterns == other.patterns
    }
}

impl Eq for FileFilter {}

impl FileFilter {
    /// Compiles the patterns; `Err` names the one that is not a glob.
    pub fn new<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut f = FileFilter::default();
        for p in patterns {
            let (glob, include) = match p.strip_prefix('!') {
                Some(rest) => (rest, false),
                None => (p, true),
            };
            let m = globset::GlobBuilder::new(glob)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("`{p}` is not a glob: {e}"))?
                .compile_matcher();
            f.patterns.push((p.to_string(), include));
            f.matchers.push(m);
        }
        Ok(f)
    }

    /// Whether a change with these files passes the filter.
    pub fn passes(&self, files: &[String]) -> bool {
        if self.matchers.is_empty() || files.is_empty() {
            return true;
        }
        files.iter().any(|f| {
            self.matchers
                .iter()
                .zip(&self.patterns)
                .rev()
                .find(|(m, _)| m.is_match(f))
                .is_some_and(|(_, (_, include))| *include)
        })
    }
}

impl SchedulerConfig {
    pub fn matches(&self, repository: &str, branch: &str) -> bool {
        (self.branches.is_empty() || self.branches.iter().any(|b| b == branch))
            && self.repository.as_deref().is_none_or(|r| r == repository)
    }

    /// Whether a change triggers this scheduler: its repository, branch
    /// and files (a nightly scheduler is triggered by its clock only).
    pub fn matches_change(&self, repository: &str, branch: &str, files: &[String]) -> bool {
        self.nightly.is_none() && self.matches(repository, branch) && self.file_filter.passes(files)
    }

    /// Whether a change triggers this scheduler, pull requests included:
    /// a change with a `pr_number` property only triggers schedulers with
    /// `pull_requests = true`.
    /// For such a change, `branches` are matched against the branch the
    /// request would merge into (`pr_base`).
    pub fn triggered_by(&self, change: &crate::store::NewChange) -> bool {
        match change.properties.get(PR_NUMBER) {
            None => self.matches_change(&change.repository, &change.branch, &change.files),
            Some(_) => {
                let base = change.properties.get("pr_base").map_or("", String::as_str);
                self.pull_requests && self.matches_change(&change.repository, base, &change.files)
            }
        }
    }
}

pub(crate) struct Builds {
    pub(crate) workers: BTreeMap<String, WorkerConfig>,
    /// Where each worker is named in the file (a byte offset).
    pub(crate) worker_at: BTreeMap<String, usize>,
    pub(crate) builders: BTreeMap<String, BuilderConfig>,
    pub(crate) schedulers: BTreeMap<String, SchedulerConfig>,
    /// Each `%(secret:NAME)s` a step uses and where (a byte offset), to be
    /// checked against the secrets file.
    pub(crate) secret_at: BTreeMap<String, usize>,
}

/// A relative path that stays inside the builder's directory.
fn safe_relative(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// The longest step timeout (a longer one is a typo, and would overflow
/// the milliseconds it is sent in).
pub const MAX_STEP_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// A name a step's environment may hold: not empty, no `=`, no NUL.
/// A property's (or step secret's) name: a letter or `_`, then letters,
/// digits, `_`, `.` or `-`.
pub fn valid_property_name(n: &str) -> bool {
    n.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

pub(crate) fn valid_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['=', '\0'])
}

/// Checks a name is valid and not seen before. `seen` maps names to where
/// they were first defined (byte offsets: the line is counted only for an
/// error, so a config with thousands of names stays linear to check).
fn unique<'a>(
    c: &Validator<'_>,
    seen: &mut BTreeMap<String, usize>,
    name: &'a Spanned<String>,
    key: &str,
    what: &str,
) -> Result<&'a str, ConfigError> {
    let n = name.get_ref();
    if !valid_name(n) {
        return c.err(name.span(), key, format_args!("`{n}` is not a valid {what} name (1 to 255 characters, no spaces or control characters)"));
    }
    if let Some(first) = seen.get(n) {
        let line = c.line_of(*first);
        return c.err(
            name.span(),
            key,
            format_args!("{what} `{n}` is defined twice (first at line {line})"),
        );
    }
    seen.insert(n.clone(), name.span().start);
    Ok(n)
}

pub(crate) fn validate(
    c: &Validator<'_>,
    raw_workers: &[RawWorker],
    raw_builders: &[RawBuilder],
    raw_schedulers: &[RawScheduler],
    users: &BTreeMap<String, BTreeSet<String>>,
) -> Result<Builds, ConfigError> {
    let mut secret_at = BTreeMap::new();
    let mut seen = BTreeMap::new();
    let mut workers = BTreeMap::new();
    for w in raw_workers {
        let name = unique(c, &mut seen, &w.name, "worker.name", "worker")?;
        if users.contains_key(name) {
            return c.err(
                w.name.span(),
                "worker.name",
                format_args!(
                    "`{name}` is both a [[user]] and a [[worker]]; give the worker its own name"
                ),
            );
        }
        let max_builds = c.count(&w.max_builds, "worker.max_builds", 1)?;
        let mut env = BTreeMap::new();
        for (k, v) in &w.env {
            if !valid_env_name(k) {
                return c.err(
                    v.span(),
                    "worker.env",
                    format_args!("`{k}` is not a valid environment variable name"),
                );
            }
            env.insert(k.clone(), v.get_ref().clone());
        }
        workers.insert(
            name.to_string(),
            WorkerConfig {
                name: name.to_string(),
                max_builds,
                env,
                properties: w.properties.clone(),
            },
        );
    }

    let worker_at = seen;
    let mut seen = BTreeMap::new();
    let mut builders = BTreeMap::new();
    for b in raw_builders {
        let name = unique(c, &mut seen, &b.name, "builder.name", "builder")?;
        if name.contains('/') || name.starts_with('.') {
            return c.err(
                b.name.span(),
                "builder.name",
                format_args!(
                    "`{name}` names the builder's directory on workers: no `/`, and not starting with `.`"
                ),
            );
        }
        let mut names = Vec::new();
        for w in &b.workers {
            if !workers.contains_key(w.get_ref()) {
                return c.err(
                    w.span(),
                    "builder.workers",
                    format_args!(
                        "builder `{name}` names worker `{}`, which is not a [[worker]]",
                        w.get_ref()
                    ),
                );
            }
            names.push(w.get_ref().clone());
        }
        if b.step.is_empty() {
            return c.err(
                b.name.span(),
                "builder.step",
                format_args!("builder `{name}` has no [[builder.step]]"),
            );
        }
        let mut steps = Vec::new();
        let mut step_names = BTreeSet::new();
        for s in &b.step {
            let span = s.span();
            let s = s.get_ref();
            let sname = s.name.get_ref();
            if sname.trim().is_empty() {
                return c.err(s.name.span(), "builder.step.name", "is empty");
            }
            if !step_names.insert(sname.clone()) {
                return c.err(
                    s.name.span(),
                    "builder.step.name",
                    format_args!("builder `{name}` has two steps named `{sname}`"),
                );
            }
            let git = match &s.git {
                None => None,
                Some(g) => {
                    let raw = g.get_ref();
                    if s.command.is_some() || s.shell.is_some() {
                        return c.err(
                            g.span(),
                            "builder.step.git",
                            format_args!(
                                "step `{sname}` has `git` and `command` or `shell`; keep one"
                            ),
                        );
                    }
                    let mode = match raw.mode.as_deref() {
                        None | Some("incremental") => GitMode::Incremental,
                        Some("full") => GitMode::Full,
                        Some(other) => {
                            return c.err(
                                g.span(),
                                "builder.step.git.mode",
                                format_args!("`{other}` is not one of incremental, full"),
                            );
                        }
                    };
                    let depth = match raw.depth {
                        None => None,
                        Some(d) if (1..=i64::from(u32::MAX)).contains(&d) => Some(d as u32),
                        Some(_) => {
                            return c.err(
                                g.span(),
                                "builder.step.git.depth",
                                "must be a whole number above zero",
                            );
                        }
                    };
                    if raw.repository.trim().is_empty() {
                        return c.err(g.span(), "builder.step.git.repository", "is empty");
                    }
                    for text in [
                        Some(&raw.repository),
                        raw.branch.as_ref(),
                        raw.revision.as_ref(),
                    ]
                    .into_iter()
                    .flatten()
                    {
                        if let Err(e) = super::template::check(text) {
                            return c.err(g.span(), "builder.step.git", e);
                        }
                        for name in super::template::secrets_in(text) {
                            secret_at.entry(name.to_string()).or_insert(g.span().start);
                        }
                    }
                    Some(GitStep {
                        repository: raw.repository.clone(),
                        mode,
                        branch: raw.branch.clone(),
                        revision: raw.revision.clone(),
                        submodules: raw.submodules,
                        depth,
                    })
                }
            };
            let upload = match &s.upload {
                None => None,
                Some(u) => {
                    let raw = u.get_ref();
                    if s.command.is_some() || s.shell.is_some() || s.git.is_some() {
                        return c.err(
                            u.span(),
                            "builder.step.upload",
                            format_args!(
                                "step `{sname}` has `upload` and `command`, `shell` or `git`; keep one"
                            ),
                        );
                    }
                    if !safe_relative(&raw.source) {
                        return c.err(
                            u.span(),
                            "builder.step.upload.source",
                            format_args!(
                                "`{}` must be a relative path inside the step's directory (no `..`, not absolute)",
                                raw.source
                            ),
                        );
                    }
                    if !valid_artifact_name(&raw.name) {
                        return c.err(
                            u.span(),
                            "builder.step.upload.name",
                            format_args!(
                                "`{}` is not an artifact name (letters, digits, `-`, `_`, `.`; not starting with `.`)",
                                raw.name
                            ),
                        );
                    }
                    Some(UploadStep {
                        source: raw.source.clone(),
                        name: raw.name.clone(),
                    })
                }
            };
            let download = match &s.download {
                None => None,
                Some(d) => {
                    let raw = d.get_ref();
                    if s.command.is_some()
                        || s.shell.is_some()
                        || s.git.is_some()
                        || s.upload.is_some()
                    {
                        return c.err(
                            d.span(),
                            "builder.step.download",
                            format_args!(
                                "step `{sname}` has `download` and `command`, `shell`, `git` or `upload`; keep one"
                            ),
                        );
                    }
                    if raw.dest.is_empty() || !safe_relative(&raw.dest) || raw.dest.contains("%(") {
                        return c.err(
                            d.span(),
                            "builder.step.download.dest",
                            format_args!(
                                "`{}` must be a relative path inside the step's directory (no `..`, not absolute, no `%(...)s`)",
                                raw.dest
                            ),
                        );
                    }
                    if !valid_artifact_name(&raw.name) {
                        return c.err(
                            d.span(),
                            "builder.step.download.name",
                            format_args!(
                                "`{}` is not an artifact name (letters, digits, `-`, `_`, `.`; not starting with `.`)",
                                raw.name
                            ),
                        );
                    }
                    if raw.from.trim().is_empty() {
                        return c.err(
                            d.span(),
                            "builder.step.download.from",
                            "is empty: give `latest-success:BUILDER`, a build id, `BUILDER#NUMBER` or `%(prop:...)s`",
                        );
                    }
                    Some(DownloadStep {
                        name: raw.name.clone(),
                        from: raw.from.clone(),
                        dest: raw.dest.clone(),
                    })
                }
            };
            let set_properties = match &s.set_properties {
                None => false,
                Some(v) if v.get_ref() == "stdout" => true,
                Some(v) => {
                    return c.err(
                        v.span(),
                        "builder.step.set_properties",
                        format_args!(
                            "`{}` is not \"stdout\" (the only source of step properties)",
                            v.get_ref()
                        ),
                    );
                }
            };
            let argv = match (&s.command, &s.shell) {
                (None, None) if git.is_some() || download.is_some() => Vec::new(),
                (None, None) if let Some(u) = &upload => {
                    vec![WORKER_SELF.into(), "__upload".into(), u.source.clone()]
                }
                (Some(cmd), None) if !cmd.get_ref().is_empty() && !cmd.get_ref()[0].is_empty() => {
                    cmd.get_ref().clone()
                }
                (Some(cmd), None) => {
                    return c.err(
                        cmd.span(),
                        "builder.step.command",
                        "is empty: give the program and its arguments",
                    );
                }
                (None, Some(sh)) if !sh.get_ref().trim().is_empty() => {
                    vec!["sh".into(), "-c".into(), sh.get_ref().clone()]
                }
                (None, Some(sh)) => return c.err(sh.span(), "builder.step.shell", "is empty"),
                (Some(_), Some(sh)) => {
                    return c.err(
                        sh.span(),
                        "builder.step",
                        format_args!("step `{sname}` has both `command` and `shell`; keep one"),
                    );
                }
                (None, None) => {
                    return c.err(
                        span,
                        "builder.step",
                        format_args!("step `{sname}` needs `command = [...]`, `shell = \"...\"`, `git = {{ ... }}`, `upload = {{ ... }}` or `download = {{ ... }}`"),
                    );
                }
            };
            let workdir = match &s.workdir {
                None => None,
                // Normalised: `./././x/.` is `x`, and `.` is the builder's
                // directory itself.
                Some(w) if safe_relative(w.get_ref()) => {
                    let parts: Vec<&str> = Path::new(w.get_ref())
                        .components()
                        .filter_map(|c| match c {
                            Component::Normal(p) => p.to_str(),
                            _ => None,
                        })
                        .collect();
                    (!parts.is_empty()).then(|| parts.join("/"))
                }
                Some(w) => return c.err(w.span(), "builder.step.workdir", format_args!("`{}` must be a relative path inside the builder's directory (no `..`, not absolute)", w.get_ref())),
            };
            let timeout = match &s.timeout {
                None => None,
                Some(t) => {
                    let d = c.duration(&s.timeout, "builder.step.timeout", Duration::ZERO)?;
                    if d < Duration::from_millis(1) || d > MAX_STEP_TIMEOUT {
                        return c.err(
                            t.span(),
                            "builder.step.timeout",
                            format_args!("`{}` is out of range: from 1ms to 365 days", t.get_ref()),
                        );
                    }
                    Some(d)
                }
            };
            let on_lost = match &s.on_lost {
                // A checkout cannot resume halfway: run the build again.
                None if git.is_some() => OnLost::Restart,
                None => OnLost::Fail,
                Some(v) => match v.get_ref().as_str() {
                    "retry" => OnLost::Retry,
                    "restart" => OnLost::Restart,
                    "fail" => OnLost::Fail,
                    other => {
                        return c.err(
                            v.span(),
                            "builder.step.on_lost",
                            format_args!("`{other}` is not one of retry, restart, fail"),
                        );
                    }
                },
            };
            // Interpolations are checked now, so a typo is a config error
            // with its line, not a failed build.
            let templates = s
                .command
                .iter()
                .flat_map(|c| {
                    c.get_ref()
                        .iter()
                        .map(move |a| (a.as_str(), c.span(), "builder.step.command"))
                })
                .chain(
                    s.shell
                        .iter()
                        .map(|sh| (sh.get_ref().as_str(), sh.span(), "builder.step.shell")),
                )
                .chain(
                    s.workdir
                        .iter()
                        .map(|w| (w.get_ref().as_str(), w.span(), "builder.step.workdir")),
                )
                .chain(
                    s.env
                        .values()
                        .map(|v| (v.as_str(), span.clone(), "builder.step.env")),
                )
                .chain(s.download.iter().map(|d| {
                    (
                        d.get_ref().from.as_str(),
                        d.span(),
                        "builder.step.download.from",
                    )
                }));
            for (text, at, key) in templates {
                if let Err(e) = super::template::check(text) {
                    return c.err(at, key, e);
                }
                for name in super::template::secrets_in(text) {
                    if key == "builder.step.workdir" || key == "builder.step.download.from" {
                        // A directory name is on disk and in the worker's
                        // log; a build's name is in the step's log.
                        return c.err(
                            at,
                            key,
                            format_args!("`%(secret:{name})s`: a secret cannot be part of a path"),
                        );
                    }
                    secret_at.entry(name.to_string()).or_insert(at.start);
                }
            }
            steps.push(StepConfig {
                name: sname.clone(),
                shell: s.shell.is_some(),
                git,
                upload,
                download,
                set_properties,
                argv,
                workdir,
                env: s.env.clone(),
                timeout,
                on_lost,
            });
        }
        builders.insert(
            name.to_string(),
            BuilderConfig {
                name: name.to_string(),
                workers: names,
                steps,
                collapse_requests: b.collapse_requests,
            },
        );
    }

    let mut seen = BTreeMap::new();
    let mut schedulers = BTreeMap::new();
    for s in raw_schedulers {
        let name = unique(c, &mut seen, &s.name, "scheduler.name", "scheduler")?;
        let mut list = Vec::new();
        for b in &s.builders {
            if !builders.contains_key(b.get_ref()) {
                return c.err(
                    b.span(),
                    "scheduler.builders",
                    format_args!(
                        "scheduler `{name}` names builder `{}`, which is not a [[builder]]",
                        b.get_ref()
                    ),
                );
            }
            list.push(b.get_ref().clone());
        }
        schedulers.insert(
            name.to_string(),
            SchedulerConfig {
                name: name.to_string(),
                builders: list,
                branches: s.branches.clone(),
                repository: s.repository.clone(),
                properties: s.properties.clone(),
                file_filter: {
                    for p in &s.file_filter {
                        if let Err(e) = FileFilter::new([p.get_ref().as_str()]) {
                            return c.err(p.span(), "scheduler.file_filter", e);
                        }
                    }
                    FileFilter::new(s.file_filter.iter().map(|p| p.get_ref().as_str()))
                        .unwrap_or_default()
                },
                nightly: match s.kind.as_ref().map(|k| k.get_ref().as_str()) {
                    None | Some("change") => {
                        if let Some(cr) = &s.cron {
                            return c.err(
                                cr.span(),
                                "scheduler.cron",
                                "only a `kind = \"nightly\"` scheduler has a `cron`",
                            );
                        }
                        if s.branch.is_some() {
                            return c.err(s.name.span(), "scheduler.branch", format_args!("scheduler `{name}` reacts to changes: give `branches = [...]`; `branch` is for a nightly scheduler"));
                        }
                        None
                    }
                    Some("nightly") => {
                        let kind_span = s.kind.as_ref().map(|k| k.span()).unwrap_or(0..0);
                        let Some(cr) = &s.cron else {
                            return c.err(
                                kind_span,
                                "scheduler.cron",
                                format_args!(
                                    "nightly scheduler `{name}` needs `cron = \"0 3 * * *\"`"
                                ),
                            );
                        };
                        let schedule = match Nightly::parse_cron(cr.get_ref()) {
                            Ok(sch) => sch,
                            Err(e) => return c.err(cr.span(), "scheduler.cron", e),
                        };
                        let Some(branch) = s.branch.clone().filter(|b| !b.is_empty()) else {
                            return c.err(
                                kind_span,
                                "scheduler.branch",
                                format_args!(
                                    "nightly scheduler `{name}` needs the `branch` it builds"
                                ),
                            );
                        };
                        Some(Nightly {
                            cron: cr.get_ref().clone(),
                            schedule,
                            branch,
                            only_if_changed: s.only_if_changed,
                        })
                    }
                    Some(other) => {
                        return c.err(
                            s.kind.as_ref().map(|k| k.span()).unwrap_or(0..0),
                            "scheduler.kind",
                            format_args!("`{other}` is not one of change, nightly"),
                        );
                    }
                },
                pull_requests: s.pull_requests,
                tree_stable_timer: match &s.tree_stable_timer {
                    None => None,
                    Some(_) => Some(c.duration(
                        &s.tree_stable_timer,
                        "scheduler.tree_stable_timer",
                        Duration::ZERO,
                    )?),
                },
            },
        );
    }
    Ok(Builds {
        workers,
        worker_at,
        builders,
        schedulers,
        secret_at,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, OnLost};

    const BASE: &str = "[master]\nsecrets = \"s.toml\"\n";

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse(Path::new("m.toml"), &format!("{BASE}{extra}")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_build_config_parses() {
        let c = parse(
            r#"
[[worker]]
name = "w1"
max_builds = 3
[[builder]]
name = "b"
workers = ["w1"]
[[builder.step]]
name = "one"
command = ["make", "all"]
workdir = "src/sub"
env = { CC = "clang" }
timeout = "20m"
on_lost = "retry"
[[builder.step]]
name = "two"
shell = "make check"
[[scheduler]]
name = "s"
builders = ["b"]
branches = ["main"]
repository = "r"
"#,
        )
        .unwrap();
        assert_eq!(c.workers["w1"].max_builds, 3);
        let b = &c.builders["b"];
        assert_eq!(b.steps[0].argv, ["make", "all"]);
        assert_eq!(b.steps[0].on_lost, OnLost::Retry);
        assert_eq!(
            b.steps[0].timeout,
            Some(std::time::Duration::from_secs(1200))
        );
        assert_eq!(b.steps[1].argv, ["sh", "-c", "make check"]);
        assert_eq!(b.steps[1].on_lost, OnLost::Fail);
        assert!(c.schedulers["s"].matches("r", "main"));
        assert!(!c.schedulers["s"].matches("r", "dev"));
        assert!(!c.schedulers["s"].matches("other", "main"));
    }

    #[test]
    fn file_filters_take_the_last_match() {
        let f =
            super::FileFilter::new(["src/**", "!src/generated/**", "*.md", "!docs/**"]).unwrap();
        let files = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(f.passes(&files(&["src/a.rs"])));
        assert!(!f.passes(&files(&["src/generated/x.rs"])));
        assert!(f.passes(&files(&["src/generated/x.rs", "src/b.rs"])));
        assert!(!f.passes(&files(&["docs/guide.md"])));
        assert!(f.passes(&files(&["README.md"])));
        assert!(!f.passes(&files(&["Cargo.lock"])));
        assert!(f.passes(&[]), "a change with no file list matches");
        let e = parse("[[scheduler]]\nname = \"s\"\nfile_filter = [\"src/[\"]\n").unwrap_err();
        assert!(
            e.contains("m.toml:5:") && e.contains("scheduler.file_filter"),
            "{e}"
        );
    }

    #[test]
    fn nightly_schedulers_need_a_valid_cron_and_a_branch() {
        let c = parse("[[scheduler]]\nname = \"n\"\nkind = \"nightly\"\ncron = \"0 3 * * *\"\nbranch = \"main\"\n").unwrap();
        let n = c.schedulers["n"].nightly.as_ref().unwrap();
        assert_eq!(n.branch, "main");
        assert!(!c.schedulers["n"].matches_change("r", "main", &[]));
        for (extra, key) in [
            ("cron = \"61 3 * * *\"\nbranch = \"main\"", "scheduler.cron"),
            ("cron = \"3 * *\"\nbranch = \"main\"", "scheduler.cron"),
            ("cron = \"0 3 * * *\"", "scheduler.branch"),
            ("branch = \"main\"", "scheduler.cron"),
        ] {
            let e = parse(&format!(
                "[[scheduler]]\nname = \"n\"\nkind = \"nightly\"\n{extra}\n"
            ))
            .unwrap_err();
            assert!(e.contains("m.toml:") && e.contains(key), "{extra}: {e}");
        }
        let e = parse("[[scheduler]]\nname = \"n\"\nkind = \"weekly\"\n").unwrap_err();
        assert!(e.contains("scheduler.kind"), "{e}");
        let e = parse("[[scheduler]]\nname = \"n\"\nbranch = \"main\"\n").unwrap_err();
        assert!(
            e.contains("scheduler.branch") && e.contains("branches"),
            "{e}"
        );
    }

    #[test]
    fn numbers_and_paths_out_of_range_are_config_errors() {
        let step = |extra: &str| {
            format!(
                "[[worker]]\nname = \"w\"\n[[builder]]\nname = \"b\"\nworkers = [\"w\"]\n[[builder.step]]\nname = \"x\"\nshell = \"a\"\n{extra}\n"
            )
        };
        for (extra, key) in [
            ("timeout = \"500us\"", "builder.step.timeout"),
            ("timeout = \"10000years\"", "builder.step.timeout"),
        ] {
            let e = parse(&step(extra)).unwrap_err();
            assert!(e.contains("m.toml:11:") && e.contains(key), "{e}");
        }
        for (line, key) in [
            ("sniff_timeout = \"10ms\"", "master.sniff_timeout"),
            ("handshake_timeout = \"1ms\"", "master.handshake_timeout"),
            ("heartbeat_interval = \"99ms\"", "master.heartbeat_interval"),
        ] {
            let e = Config::parse(Path::new("m.toml"), &format!("{BASE}{line}\n")).unwrap_err();
            let e = e.to_string();
            assert!(
                e.contains("m.toml:3:") && e.contains(key) && e.contains("at least"),
                "{e}"
            );
        }
        let e = parse("[[worker]]\nname = \"w\"\nenv = { \"A=B\" = \"x\" }\n").unwrap_err();
        assert!(e.contains("worker.env"), "{e}");
        // A malformed interpolation is an error at its line.
        let e = parse("[[worker]]\nname = \"w\"\n[[builder]]\nname = \"b\"\nworkers = [\"w\"]\n[[builder.step]]\nname = \"x\"\nshell = \"echo %(prop:branch\"\n").unwrap_err();
        assert!(
            e.contains("m.toml:10:") && e.contains("builder.step.shell") && e.contains("malformed"),
            "{e}"
        );
        // A workdir of `.`s is normalised, not failing later on the worker.
        let c = parse(&step("workdir = \"./././x/.\"")).unwrap();
        assert_eq!(c.builders["b"].steps[0].workdir.as_deref(), Some("x"));
        let c = parse(&step("workdir = \"./.\"")).unwrap();
        assert_eq!(c.builders["b"].steps[0].workdir, None);
    }

    #[test]
    fn mistakes_name_file_line_and_key() {
        let cases = [
            (
                "[[builder]]\nname = \"b\"\nworkers = [\"ghost\"]\n[[builder.step]]\nname = \"x\"\nshell = \"true\"\n",
                "m.toml:5:",
                "builder.workers",
                "not a [[worker]]",
            ),
            (
                "[[worker]]\nname = \"w\"\n[[worker]]\nname = \"w\"\n",
                "m.toml:6:",
                "worker.name",
                "defined twice",
            ),
            (
                "[[worker]]\nname = \"w\"\n[[builder]]\nname = \"b\"\nworkers = [\"w\"]\n[[builder.step]]\nname = \"x\"\nshell = \"a\"\ncommand = [\"b\"]\n",
                "m.toml:",
                "builder.step",
                "both `command` and `shell`",
            ),
            (
                "[[worker]]\nname = \"w\"\n[[builder]]\nname = \"b\"\nworkers = [\"w\"]\n[[builder.step]]\nname = \"x\"\n",
                "m.toml:",
                "builder.step",
                "needs `command",
            ),
            (
                "[[worker]]\nname = \"w\"\n[[builder]]\nname = \"b\"\nworkers = [\"w\"]\n[[builder.step]]\nname = \"x\"\nshell = \"a\"\nworkdir = \"../up\"\n",
                "m.toml:11:",
                "builder.step.workdir",
                "relative path",
            ),
            (
                "[[worker]]\nname = \"w\"\n[[builder]]\nname = \"b\"\nworkers = [\"w\"]\n[[builder.step]]\nname = \"x\"\nshell = \"a\"\non_lost = \"maybe\"\n",
                "m.toml:11:",
                "builder.step.on_lost",
                "not one of retry, restart, fail",
            ),
            (
                "[[scheduler]]\nname = \"s\"\nbuilders = [\"nope\"]\n",
                "m.toml:5:",
                "scheduler.builders",
                "not a [[builder]]",
            ),
            (
                "[[builder]]\nname = \"a/b\"\n[[builder.step]]\nname = \"x\"\nshell = \"a\"\n",
                "m.toml:4:",
                "builder.name",
                "no `/`",
            ),
            (
                "[[worker]]\nname = \"admin\"\n[[user]]\nname = \"admin\"\n",
                "m.toml:4:",
                "worker.name",
                "both a [[user]] and a [[worker]]",
            ),
            (
                "[[user]]\nname = \"u\"\nservices = [\"ping\", \"worker\"]\n",
                "m.toml:5:",
                "user.services",
                "declared with [[worker]]",
            ),
        ];
        for (toml, at, key, words) in cases {
            let e = parse(toml).unwrap_err();
            assert!(
                e.starts_with(at) && e.contains(key) && e.contains(words),
                "{toml}\n=> {e}"
            );
        }
    }
}
