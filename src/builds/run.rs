//! One build: its steps in order on one worker, stopping at the first step
//! that does not succeed.
//!
//! Results: `success`; `failure` (a step exited non-zero, timed out, or could
//! not start); `exception` (the worker was lost, or the master could not
//! record the build); `interrupted` (an operator stopped it).

use crate::store::BuildStore;
use std::sync::Arc;
use std::time::Duration;

use super::properties::{Properties, Source};
use super::workers::{PendingStep, WorkerSlots};
use super::{BuildMaster, Event, Outcome, StopSignal};
use crate::config::{BuilderConfig, OnLost};
use crate::proto::{
    InterruptStep, MasterMessage, StartStep, StepFinished, master_message, step_finished,
};
use crate::store::{BuildRequest, PropertyRow, StepEndRecord};
use crate::wire::StepId;
use tokio::sync::oneshot;

/// Sends a step to the worker's current session. A worker that is away (its
/// link dropped) is waited for, within the reconnect grace. Records which
/// session the step went to, so a worker that comes back without it is
/// known to have lost it.
async fn send_start(
    bm: &BuildMaster,
    worker: &str,
    slots: &WorkerSlots,
    step_id: &[u8],
    start: StartStep,
    stop: &StopSignal,
) -> bool {
    let deadline = tokio::time::Instant::now() + bm.inner.reconnect_grace;
    loop {
        if stop.is_stopped() {
            return false;
        }
        if let Some(link) = bm
            .link_of(worker)
            .filter(|l| !l.probing.load(std::sync::atomic::Ordering::SeqCst))
        {
            if let Some(p) = slots
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(step_id)
            {
                p.sent_on = Some(link.session_id.clone());
                p.start = Some(start.clone());
                p.confirmed = false;
            }
            let msg = MasterMessage {
                kind: Some(master_message::Kind::Start(start.clone())),
            };
            if link.tx.send(msg).await.is_ok() {
                return true;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lost steps one build may recover from (by `retry` or `restart`) before it
/// ends as `exception`: a worker that loses every step must not loop forever.
const MAX_RECOVERIES: u32 = 5;

/// How long a stopped step's worker has to report the step's end.
const STOP_GRACE: Duration = Duration::from_secs(10);

struct StepResult {
    result: Outcome,
    exit_code: Option<i32>,
    signal: Option<i32>,
    detail: String,
}

fn judge(f: &StepFinished, timeout: Option<Duration>) -> StepResult {
    let (mut exit_code, mut signal, mut detail) = (None, None, String::new());
    let mut result = match &f.status {
        Some(step_finished::Status::ExitCode(0)) => Outcome::Success,
        Some(step_finished::Status::ExitCode(c)) => {
            exit_code = Some(*c);
            detail = format!("exited with code {c}");
            Outcome::Failure
        }
        Some(step_finished::Status::Signal(s)) => {
            signal = Some(*s);
            detail = format!("killed by signal {s}");
            Outcome::Failure
        }
        Some(step_finished::Status::StartError(e)) => {
            detail = format!("could not start: {e}");
            Outcome::Failure
        }
        None => {
            detail = "the worker reported no exit status".into();
            Outcome::Exception
        }
    };
    if result == Outcome::Success {
        exit_code = Some(0);
    }
    if f.timed_out {
        result = Outcome::Failure;
        detail = match timeout {
            Some(t) => format!("timed out after {t:?}; its process group was killed"),
            None => "timed out; its process group was killed".into(),
        };
    } else if f.interrupted {
        result = Outcome::Interrupted;
        detail = "interrupted; its process group was killed".into();
    }
    StepResult {
        result,
        exit_code,
        signal,
        detail,
    }
}

/// What a new build's properties are made of, besides what the database
/// holds (its change): gathered when the build is claimed.
pub(super) struct PropertySources {
    pub(super) request: BuildRequest,
    pub(super) builder: String,
    pub(super) worker: String,
    /// What the worker said of itself when it logged in.
    pub(super) hello: Option<crate::proto::WorkerHello>,
    /// `[[worker]] properties`.
    pub(super) worker_properties: std::collections::BTreeMap<String, String>,
}

impl PropertySources {
    /// The properties of a build just claimed, from its sources in order
    /// (change, scheduler, force, build, worker).
    pub(super) fn make(
        &self,
        build: i64,
        number: i64,
        change: Option<&crate::store::StoredChange>,
        change_ids: &[i64],
    ) -> Properties {
        let r = &self.request.request;
        let mut props = Properties::default();
        if let (Some(id), Some(c)) = (r.change_id, change) {
            let c = &c.change;
            for (name, value) in &c.properties {
                props.set(name, value, Source::Change);
            }
            for (name, value) in [
                ("repository", &c.repository),
                ("branch", &c.branch),
                ("revision", &c.revision),
                ("project", &c.project),
                ("category", &c.category),
                ("author", &c.author),
                ("comments", &c.comments),
            ] {
                props.set(name, value, Source::Change);
            }
            if let Some((secs, _)) = c.when {
                props.set("when", secs.to_string(), Source::Change);
            }
            props.set("files", c.files.join("\n"), Source::Change);
            // A build of collapsed requests records every change it covers.
            let ids: Vec<String> = if change_ids.is_empty() {
                vec![id.to_string()]
            } else {
                change_ids.iter().map(i64::to_string).collect()
            };
            props.set("change_ids", ids.join(","), Source::Change);
        }
        for (name, value, source) in &r.properties {
            props.set(name, value, Source::parse(source).unwrap_or(Source::Force));
        }
        if r.change_id.is_none() {
            for (name, value) in [
                ("repository", &r.repository),
                ("branch", &r.branch),
                ("revision", &r.revision),
            ] {
                if !value.is_empty() {
                    props.set(name, value, Source::Force);
                }
            }
        }
        let builder = &self.builder;
        props.set("builder", builder, Source::Build);
        props.set("build_number", number.to_string(), Source::Build);
        props.set("build_id", build.to_string(), Source::Build);
        props.set("worker", &self.worker, Source::Build);
        if let Some(h) = &self.hello
            && !h.basedir.is_empty()
        {
            props.set(
                "builddir",
                format!("{}/{builder}", h.basedir.trim_end_matches('/')),
                Source::Build,
            );
        }
        if let Ok(host) = nix::unistd::gethostname() {
            props.set("master", host.to_string_lossy(), Source::Build);
        }
        for (name, value) in &self.worker_properties {
            props.set(name, value, Source::Worker);
        }
        if let Some(h) = &self.hello {
            props.set("worker_os", &h.os, Source::Worker);
            props.set("worker_arch", &h.arch, Source::Worker);
            props.set("worker_hostname", &h.hostname, Source::Worker);
            props.set("worker_cpus", h.cpus.to_string(), Source::Worker);
        }
        props
    }
}

/// Properties as stored rows.
pub(super) fn property_rows(props: &Properties) -> Vec<PropertyRow> {
    props
        .iter()
        .map(|(n, v, s)| (n.to_string(), v.to_string(), s.as_str().to_string()))
        .collect()
}

/// The properties stored with a build (one resumed after a restart keeps
/// what it had).
async fn stored_properties(bm: &BuildMaster, build: i64) -> Properties {
    let mut props = Properties::default();
    if let Ok(Some(b)) = bm.inner.state.build(build).await {
        for (name, value, source) in &b.properties {
            props.set(name, value, Source::parse(source).unwrap_or(Source::Step));
        }
    }
    props
}

/// The environment variables every step gets from its build's properties.
const PROPERTY_ENV: &[(&str, &str)] = &[
    ("SWITCHYARD_REPOSITORY", "repository"),
    ("SWITCHYARD_BRANCH", "branch"),
    ("SWITCHYARD_REVISION", "revision"),
    ("SWITCHYARD_BUILDER", "builder"),
    ("SWITCHYARD_BUILD_NUMBER", "build_number"),
    ("SWITCHYARD_BUILD_ID", "build_id"),
    ("SWITCHYARD_WORKER", "worker"),
    ("SWITCHYARD_BUILDDIR", "builddir"),
    ("SWITCHYARD_GOT_REVISION", "got_revision"),
];

/// What a step is sent with, its properties filled in: argv (values
/// shell-quoted in a `shell` step), workdir, and the environment: the
/// `SWITCHYARD_*` variables, its worker's `[[worker]] env`, then the
/// step's own `env` (which wins). The worker adds these to the few
/// variables it passes from its own environment (see the README). With
/// them, the values of the secrets the step names, for the worker to mask.
struct RenderedStep {
    argv: Vec<String>,
    /// A download step's `from`, filled in.
    download_from: Option<String>,
    workdir: String,
    env: std::collections::HashMap<String, String>,
    secrets: Vec<crate::proto::StepSecret>,
}

/// Fills templates from a build's properties and the step secrets, and
/// remembers which secrets it filled in.
struct Fill<'a> {
    props: &'a Properties,
    secrets: &'a crate::config::StepSecrets,
    used: std::collections::BTreeSet<String>,
}

impl Fill<'_> {
    fn text(&mut self, template: &str, shell: bool) -> Result<String, String> {
        for name in crate::config::template::secrets_in(template) {
            self.used.insert(name.to_string());
        }
        self.props
            .render(template, self.secrets, shell)
            .map_err(|e| e.to_string())
    }

    fn secrets(&self) -> Vec<crate::proto::StepSecret> {
        self.used
            .iter()
            .filter_map(|n| {
                Some(crate::proto::StepSecret {
                    name: n.clone(),
                    value: self.secrets.get(n)?.as_bytes().to_vec(),
                })
            })
            .collect()
    }
}

/// The script a git step runs on the worker (values shell-quoted): make
/// the directory a repository when it is not one, fetch every branch, check
/// out exactly the revision (or the head of the branch), clean in `full`
/// mode, and print `got_revision=SHA`. The repository's URL (which may hold
/// a secret) is handed to git in its environment, as the URL of a remote
/// named `switchyard` (`GIT_CONFIG_COUNT`, git 2.31 or later), never on a
/// command line, which every user of the worker's machine can read.
fn git_script(g: &crate::config::GitStep, fill: &mut Fill<'_>) -> Result<GitScript, String> {
    use crate::config::template::shell_quote as q;
    let repository = fill.text(&g.repository, false)?;
    let branch = match &g.branch {
        Some(b) => fill.text(b, false)?,
        None => fill.props.get("branch").unwrap_or_default().to_string(),
    };
    let revision = match &g.revision {
        Some(r) => fill.text(r, false)?,
        None => fill.props.get("revision").unwrap_or_default().to_string(),
    };
    if revision.is_empty() && branch.is_empty() {
        return Err("the git step has no revision and no branch to check out".into());
    }
    let depth = g.depth.map(|d| format!(" --depth {d}")).unwrap_or_default();
    // No process more than needed (each costs milliseconds): the checkout
    // is tried first, and the revision fetched by id only if no branch had
    // it; `got_revision` is read from the detached HEAD.
    let mut script = format!(
        "set -e\nrev={}\nbranch={}\n\
         [ -d .git ] || git init -q .\n\
         git fetch -q --force{depth} switchyard '+refs/heads/*:refs/remotes/origin/*'\n\
         if [ -n \"$rev\" ]; then target=$rev; else target=refs/remotes/origin/$branch; fi\n\
         if ! git -c advice.detachedHead=false checkout -q --force --detach \"$target\" 2>/dev/null; then\n  \
           if [ -n \"$rev\" ]; then git fetch -q{depth} switchyard \"$rev\"\n  \
           elif ! git rev-parse -q --verify \"$target^{{commit}}\" >/dev/null; then\n    \
             echo \"the repository has no branch $branch\" >&2; exit 1\n  \
           fi\n  \
           git -c advice.detachedHead=false checkout -q --force --detach \"$target\"\n\
         fi\n",
        q(&revision),
        q(&branch)
    );
    if g.mode == crate::config::GitMode::Full {
        script.push_str("git clean -q -xffd\n");
    }
    if g.submodules {
        script.push_str("git submodule -q update --init --recursive\n");
    }
    script.push_str(
        "if [ -f .git/HEAD ]; then read -r got < .git/HEAD; else got=$(git rev-parse HEAD); fi\n\
         echo \"got_revision=$got\"\n",
    );
    Ok((
        vec!["sh".into(), "-c".into(), script],
        [
            ("GIT_CONFIG_COUNT", "1".to_string()),
            ("GIT_CONFIG_KEY_0", "remote.switchyard.url".to_string()),
            ("GIT_CONFIG_VALUE_0", repository),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .to_vec(),
    ))
}

/// A git step's argv, and the variables it adds to the step's environment.
type GitScript = (Vec<String>, Vec<(String, String)>);

/// Properties a step set: `NAME=VALUE` lines of its standard output (the
/// first MiB of it); a git step sets only `got_revision`.
async fn properties_from_output(
    state: &crate::store::StateDb,
    row: i64,
    git: bool,
    tail: &[crate::store::LogChunk],
) -> Vec<(String, String)> {
    const LIMIT: usize = 1024 * 1024;
    let mut out = Vec::new();
    let (mut after, mut read) = (0u64, 0usize);
    while read < LIMIT {
        let Ok(page) = state.log_page(row, after, 256 * 1024).await else {
            break;
        };
        let Some(last) = page.last() else { break };
        after = last.seq;
        for c in page {
            read += c.data.len();
            if c.stream == crate::proto::OutputStream::Stdout as i32 {
                out.extend_from_slice(&c.data);
            }
        }
    }
    // Then what is not stored yet (the step's last output), in order.
    for c in tail.iter().filter(|c| c.seq > after) {
        if read >= LIMIT {
            break;
        }
        read += c.data.len();
        if c.stream == crate::proto::OutputStream::Stdout as i32 {
            out.extend_from_slice(&c.data);
        }
    }
    String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(n, _)| crate::config::valid_property_name(n) && (!git || *n == "got_revision"))
        .map(|(n, v)| (n.to_string(), v.trim_end_matches('\r').to_string()))
        .collect()
}

fn render_step(
    step: &crate::config::StepConfig,
    props: &Properties,
    config: &super::BuildConfig,
    worker: &str,
) -> Result<RenderedStep, String> {
    let mut fill = Fill {
        props,
        secrets: &config.step_secrets,
        used: Default::default(),
    };
    let (argv, git_env) = match &step.git {
        Some(g) => git_script(g, &mut fill)?,
        None => (
            step.argv
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    // `sh -c LINE`: only LINE is a template, and its values are quoted.
                    let shell = step.shell && i == 2;
                    if step.shell && i < 2 {
                        Ok(a.clone())
                    } else {
                        fill.text(a, shell)
                    }
                })
                .collect::<Result<Vec<_>, _>>()?,
            Vec::new(),
        ),
    };
    let workdir = match &step.workdir {
        None => String::new(),
        Some(w) => {
            // No secret here: the config refuses them in paths.
            let w = fill.text(w, false)?;
            let inside = std::path::Path::new(&w).components().all(|c| {
                matches!(
                    c,
                    std::path::Component::Normal(_) | std::path::Component::CurDir
                )
            });
            if !inside {
                return Err(format!(
                    "workdir {w:?} is not a relative path inside the builder's directory"
                ));
            }
            w
        }
    };
    let mut env: std::collections::HashMap<String, String> = PROPERTY_ENV
        .iter()
        .filter_map(|(var, prop)| Some((var.to_string(), props.get(prop)?.to_string())))
        .collect();
    if let Some(w) = config.workers.get(worker) {
        env.extend(w.env.clone());
    }
    for (k, v) in &step.env {
        env.insert(k.clone(), fill.text(v, false)?);
    }
    env.extend(git_env);
    let download_from = match &step.download {
        Some(d) => Some(fill.text(&d.from, false)?),
        None => None,
    };
    Ok(RenderedStep {
        argv,
        download_from,
        workdir,
        env,
        secrets: fill.secrets(),
    })
}

/// The artifact a download step sends, and its file opened: the one the
/// step's row records (a step resumed after a master restart), or the one
/// `from` names now (recorded before it is sent).
async fn prepare_download(
    bm: &BuildMaster,
    row: i64,
    step: &crate::config::DownloadStep,
    from: &str,
) -> Result<(crate::proto::Download, std::fs::File), String> {
    let state = &bm.inner.state;
    let db = |e: crate::store::StateError| format!("the master cannot read its database: {e}");
    let found = match state.recorded_download(row).await.map_err(db)? {
        Some((build, name)) => state.find_artifact(&build.to_string(), &name).await,
        None => state.find_artifact(from, &step.name).await,
    }
    .map_err(db)??;
    state
        .record_download(row, found.build, found.name.clone())
        .await
        .map_err(db)?;
    let path = state.artifact_path(found.build, &found.name);
    let file = std::fs::File::open(&path)
        .and_then(|f| {
            let len = f.metadata()?.len();
            if len != found.size {
                return Err(std::io::Error::other(format!(
                    "it has {len} bytes, {} were stored",
                    found.size
                )));
            }
            Ok(f)
        })
        .map_err(|e| {
            format!(
                "the artifact `{}` of build {} cannot be read on the master: {e}",
                found.name, found.build
            )
        })?;
    Ok((
        crate::proto::Download {
            name: found.name,
            size: found.size,
            sha256: found.sha256,
            dest: step.dest.clone(),
            unpack: found.tar,
        },
        file,
    ))
}

/// Where a build picks up: from its first step, or (after the master
/// restarted) from the step it had reached, possibly still running on its
/// worker.
#[derive(Default)]
pub(super) struct Resume {
    pub(super) position: usize,
    /// Attempts already made, per step.
    pub(super) runs: Vec<u32>,
    /// The step that was running: its id and row.
    pub(super) in_flight: Option<StepRow>,
    /// A build just claimed: its properties, and its first step's id and
    /// row, recorded with the claim (not sent yet).
    pub(super) fresh: Option<(Properties, Option<StepRow>)>,
}

/// A step attempt's id and its row in the database.
pub(super) type StepRow = (StepId, i64);

/// The `sent_on` of steps that were running when the previous master
/// process stopped: no session of this process has that id.
pub(super) const BEFORE_RESTART: &str = "before the master restarted";

/// A build whose master lost its lease goes no further here: it is
/// another master's now (or this one's again under a new lease, in a task
/// of its own), and nothing of this run may be written or announced. The
/// master is told, and steps down if it has not yet (see
/// [`BuildMaster::doubt_lease`]).
fn let_go(bm: &BuildMaster, generation: u64, build: i64, why: &crate::store::StateError) {
    tracing::warn!(build, error = %why, "this master no longer owns the build: leaving it");
    bm.doubt_lease(generation);
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn run_build(
    bm: &BuildMaster,
    build: i64,
    request: BuildRequest,
    builder: BuilderConfig,
    worker: String,
    slots: Arc<WorkerSlots>,
    stop: StopSignal,
    resume: Resume,
) {
    let inner = &bm.inner;
    // The lease it runs under (a task is aborted before it sees another).
    let generation = bm.generation();
    let resumed = resume.position > 0 || resume.in_flight.is_some();
    let verb = if resumed {
        "build resumed after a master restart"
    } else {
        "build started"
    };
    tracing::info!(build, builder = %builder.name, worker = %worker, reason = %request.request.reason, "{verb}");
    inner.emit(Event::BuildStarted {
        build,
        builder: builder.name.clone(),
        worker: worker.clone(),
    });
    let mut outcome = Outcome::Success;
    // How often each step has been started (its attempt number), and how
    // many lost steps this build has recovered from (bounded).
    let mut runs = resume.runs;
    runs.resize(builder.steps.len(), 0);
    let mut in_flight = resume.in_flight;
    let mut recoveries = 0u32;
    let mut position = resume.position;
    let (mut props, mut first) = match resume.fresh {
        Some((props, first)) => (props, first),
        None => (stored_properties(bm, build).await, None),
    };
    // Whether the build's end is recorded (with its last step's end).
    let mut ended = false;
    while position < builder.steps.len() {
        let step = &builder.steps[position];
        let carried = in_flight.take();
        if carried.is_none() {
            runs[position] += 1;
        }
        let attempt = runs[position].max(1);
        if stop.is_stopped() {
            outcome = Outcome::Interrupted;
            break;
        }
        let (step_id, row) = match carried.or_else(|| first.take()) {
            Some(c) => c,
            None => {
                let step_id = StepId::random();
                let row = match inner
                    .state
                    .start_step(
                        build,
                        position as u32,
                        &step.name,
                        attempt,
                        step_id,
                        step.on_lost.as_str(),
                        Vec::new(),
                    )
                    .await
                {
                    Ok(row) => row,
                    Err(e) if e.lease_gone() => return let_go(bm, generation, build, &e),
                    Err(e) => {
                        tracing::error!(build, error = %e, "cannot record a step; the build ends as exception");
                        outcome = Outcome::Exception;
                        break;
                    }
                };
                (step_id, row)
            }
        };
        // An upload step's stdout is the artifact, not its log.
        if let Some(u) = &step.upload
            && let Err(e) = inner.state.expect_upload(build, row, u.name.clone()).await
        {
            tracing::error!(build, error = %e, "cannot record an upload step");
        }
        let (done_tx, done_rx) = oneshot::channel();
        slots
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                step_id.to_vec(),
                PendingStep {
                    build,
                    row,
                    done: done_tx,
                    sent_on: carried.map(|_| BEFORE_RESTART.to_string()),
                    start: None,
                    confirmed: carried.is_some(),
                },
            );
        inner.emit(Event::StepStarted {
            build,
            step: step.name.clone(),
            attempt,
        });
        let rendered = render_step(step, &props, &inner.config(), &worker).and_then(|r| {
            // A worker that cannot mask secrets never gets one.
            match bm.link_of(&worker) {
                Some(l) if !r.secrets.is_empty() && !l.hello.masks_secrets => Err(format!(
                    "worker {worker} (version {}) cannot mask step secrets in its output; upgrade it",
                    l.hello.version
                )),
                Some(l) if step.download.is_some() && !l.hello.downloads => Err(format!(
                    "worker {worker} (version {}) cannot run download steps; upgrade it",
                    l.hello.version
                )),
                _ => Ok(r),
            }
        });
        // A download step's artifact is chosen (once: a resumed step gets
        // the one it was given) and offered to the worker.
        let rendered = match (rendered, &step.download) {
            (Ok(r), Some(d)) => {
                let from = r.download_from.clone().unwrap_or_default();
                match prepare_download(bm, row, d, &from).await {
                    Ok((download, file)) => {
                        let offered =
                            bm.inner
                                .downloads
                                .offer(step_id.as_bytes(), file, download.size);
                        Ok((r, Some((download, offered))))
                    }
                    Err(why) => Err(why),
                }
            }
            (r, _) => r.map(|r| (r, None)),
        };
        let (
            RenderedStep {
                argv,
                workdir,
                env,
                secrets,
                ..
            },
            download,
        ) = match rendered {
            Ok(r) => r,
            Err(why) => {
                // The step cannot be what it says: it fails, with why.
                slots
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&step_id.as_bytes()[..]);
                let detail = format!("cannot start: {why}");
                let end = StepEndRecord {
                    then: Some((build, Vec::new(), Some(Outcome::Failure))),
                    ..StepEndRecord::new(row, Outcome::Failure, detail.clone())
                };
                match inner.state.finish_step(end, Vec::new()).await {
                    Ok(()) => ended = true,
                    Err(e) => tracing::error!(build, error = %e, "cannot record a step's end"),
                }
                tracing::info!(build, step = %step.name, detail = %detail, "step failed before it started");
                inner.emit(Event::StepEnded {
                    build,
                    step: step.name.clone(),
                    attempt,
                    outcome: Outcome::Failure,
                    detail,
                });
                outcome = Outcome::Failure;
                break;
            }
        };
        let start = StartStep {
            step_id: step_id.to_vec(),
            builder: builder.name.clone(),
            name: step.name.clone(),
            argv,
            env,
            workdir,
            timeout_ms: step.timeout.map(|t| t.as_millis() as u64).unwrap_or(0),
            secrets,
            download: download.as_ref().map(|(d, _)| d.clone()),
        };
        // A step carried over from before a restart is already running (or
        // finished) on its worker: it is re-attached, not sent again.
        let sent = carried.is_some()
            || send_start(bm, &worker, &slots, step_id.as_bytes(), start, &stop).await;
        // The step's last output, stored with its end.
        let mut tail = Vec::new();
        let mut finished: Option<StepFinished> = if !sent {
            None
        } else {
            tokio::pin!(done_rx);
            tokio::select! {
                r = &mut done_rx => r.ok().map(|d| {
                    tail = d.tail;
                    d.finished
                }),
                _ = stop.stopped() => {
                    let interrupt = InterruptStep { step_id: step_id.to_vec(), reason: stop.reason() };
                    // Queued before the session may be hung up: it is sent first.
                    if let Some(l) = bm.link_of(&worker) {
                        let _ = l.tx.try_send(MasterMessage { kind: Some(master_message::Kind::Interrupt(interrupt)) });
                    }
                    // Interrupted, whether the worker confirms it or goes away meanwhile.
                    let interrupted = StepFinished { interrupted: true, ..Default::default() };
                    // Wait for the worker to confirm, but not for a worker
                    // that is gone (nobody would answer).
                    let deadline = tokio::time::Instant::now() + STOP_GRACE;
                    loop {
                        tokio::select! {
                            r = &mut done_rx => break match r {
                                Ok(d) => {
                                    tail = d.tail;
                                    Some(StepFinished { interrupted: true, ..d.finished })
                                }
                                Err(_) => Some(interrupted),
                            },
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                                if bm.link_of(&worker).is_none() || tokio::time::Instant::now() >= deadline {
                                    break Some(interrupted);
                                }
                            }
                        }
                    }
                }
            }
        };
        slots
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&step_id.as_bytes()[..]);
        // The step has ended: its artifact is no longer offered.
        drop(download);
        // Stopped while the worker went away: the stop is what happened.
        if finished.is_none() && stop.is_stopped() {
            finished = Some(StepFinished {
                interrupted: true,
                ..Default::default()
            });
        }
        // Truly lost: the worker came back without it, or not at all within
        // the grace. The step's `on_lost` decides what happens next.
        let lost = finished.is_none() && recoveries < MAX_RECOVERIES;
        let mut judged = match &finished {
            Some(f) => judge(f, step.timeout),
            None => StepResult {
                result: Outcome::Exception,
                exit_code: None,
                signal: None,
                detail: format!(
                    "lost: worker {worker} restarted or did not come back within {:?}{}",
                    inner.reconnect_grace,
                    match (lost, step.on_lost) {
                        (false, _) => "; too many lost steps in this build".to_string(),
                        (true, OnLost::Retry) =>
                            "; on_lost = retry: running the step again".to_string(),
                        (true, OnLost::Restart) =>
                            "; on_lost = restart: running the build again from its first step"
                                .to_string(),
                        (true, OnLost::Fail) => "; on_lost = fail: the build fails".to_string(),
                    }
                ),
            },
        };
        if step.download.is_some() && finished.as_ref().is_some_and(|f| f.timed_out) {
            judged.detail = match step.timeout {
                Some(t) => format!(
                    "timed out after {t:?}; the download was stopped and its partial file removed"
                ),
                None => "timed out; the download was stopped and its partial file removed".into(),
            };
        }
        if judged.result == Outcome::Interrupted && stop.is_stopped() {
            judged.detail = format!("{}; its process group was killed", stop.reason());
        }
        // Its last output goes to its log first: whether the log could take
        // it all is part of how the step went.
        if !tail.is_empty()
            && let Err(e) = inner.state.append_logs(tail.clone()).await
        {
            tracing::error!(build, error = %e, "cannot store a step's last output");
        }
        if step.upload.is_some() && inner.state.upload_over_limit(row) {
            judged.result = Outcome::Failure;
            judged.detail = format!(
                "the artifact passed {}; the step was stopped{}",
                inner.state.upload_limit(row),
                if judged.detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", judged.detail)
                }
            );
        } else if let (Some(u), Some(_), Outcome::Success) =
            (&step.upload, &finished, judged.result)
        {
            match inner
                .state
                .publish_artifact(build, row, u.name.clone())
                .await
            {
                Ok(Ok(a)) => {
                    tracing::info!(build, artifact = %a.name, bytes = a.size, sha256 = %a.sha256, "artifact stored")
                }
                Ok(Err(why)) => {
                    judged.result = Outcome::Failure;
                    judged.detail = why;
                }
                Err(e) => {
                    judged.result = Outcome::Exception;
                    judged.detail = format!("the master could not store the artifact: {e}");
                }
            }
        }
        if finished.is_some() {
            let logs = inner.state.log_files();
            if let Some(why) = logs
                .trouble(row)
                .or_else(|| inner.state.upload_trouble(row))
            {
                judged.result = Outcome::Failure;
                judged.detail = why;
            } else if logs.fails_on_limit() && logs.over_limit(row).unwrap_or(false) {
                judged.result = Outcome::Failure;
                judged.detail = format!(
                    "its output passed max_log_size ({} bytes); the step was stopped",
                    logs.max_log_size()
                );
            }
        }
        // An upload that did not become an artifact leaves nothing behind.
        if step.upload.is_some()
            && judged.result != Outcome::Success
            && let Err(e) = inner.state.discard_upload(row).await
        {
            tracing::warn!(build, error = %e, "cannot remove a failed upload's files");
        }
        // What the step set, and what the build comes to if this step ends
        // it: recorded with the step's end, in one write.
        let set = if !lost
            && judged.result == Outcome::Success
            && (step.set_properties || step.git.is_some())
        {
            properties_from_output(&inner.state, row, step.git.is_some(), &tail).await
        } else {
            Vec::new()
        };
        let build_ends: Option<Outcome> = match (lost, step.on_lost) {
            (true, OnLost::Fail) => Some(Outcome::Failure),
            (true, _) => None,
            (false, _) if judged.result != Outcome::Success => Some(judged.result),
            (false, _) if position + 1 == builder.steps.len() => Some(Outcome::Success),
            (false, _) => None,
        };
        let last_seq = finished.as_ref().map(|f| f.last_seq);
        let tail_bytes: u64 = tail.iter().map(|c| c.data.len() as u64).sum();
        let end = StepEndRecord {
            row,
            result: judged.result,
            exit_code: judged.exit_code,
            signal: judged.signal,
            detail: judged.detail.clone(),
            then: Some((
                build,
                set.iter()
                    .map(|(n, v)| (n.clone(), v.clone(), Source::Step.as_str().to_string()))
                    .collect(),
                build_ends,
            )),
        };
        match inner
            .state
            .finish_step(end, std::mem::take(&mut tail))
            .await
        {
            Ok(()) => {
                ended = build_ends.is_some();
                if tail_bytes > 0 {
                    inner.emit(Event::OutputStored {
                        build,
                        step: row,
                        bytes: tail_bytes,
                    });
                }
                // Its output and end are durable: the worker may forget it.
                // (A worker away now is told when it comes back.)
                if let (Some(last), Some(link)) = (last_seq, bm.link_of(&worker)) {
                    let ack = super::workers::finished_ack(step_id.to_vec(), last);
                    let _ = tokio::time::timeout(Duration::from_secs(1), link.tx.send(ack)).await;
                }
            }
            Err(e) if e.lease_gone() => return let_go(bm, generation, build, &e),
            Err(e) => tracing::error!(build, error = %e, "cannot record a step's end"),
        }
        for (name, value) in &set {
            props.set(name, value, Source::Step);
        }
        tracing::info!(build, step = %step.name, result = %judged.result, detail = %judged.detail, "step finished");
        inner.emit(Event::StepEnded {
            build,
            step: step.name.clone(),
            attempt,
            outcome: judged.result,
            detail: judged.detail.clone(),
        });
        if lost {
            recoveries += 1;
            match step.on_lost {
                OnLost::Retry => continue,
                OnLost::Restart => {
                    position = 0;
                    continue;
                }
                OnLost::Fail => {
                    outcome = Outcome::Failure;
                    break;
                }
            }
        }
        if judged.result != Outcome::Success {
            outcome = judged.result;
            break;
        }
        position += 1;
    }
    // A first step recorded with the claim but never started (the build
    // was stopped first) ends with the build.
    if let Some((_, row)) = first.take() {
        let end = StepEndRecord::new(row, Outcome::Interrupted, "stopped before it started");
        if let Err(e) = inner.state.finish_step(end, Vec::new()).await {
            tracing::error!(build, error = %e, "cannot record a step's end");
        }
    }
    if !ended && let Err(e) = inner.state.finish_build(build, outcome).await {
        tracing::error!(build, error = %e, "cannot record the build's end");
    }
    tracing::info!(build, builder = %builder.name, result = %outcome, "build finished");
    inner.emit(Event::BuildEnded {
        build,
        builder: builder.name.clone(),
        outcome,
    });
}
