//! Running one step on the worker: a process in its own process group, its
//! output read in chunks, its timeout and interrupt killing the whole group.
//!
//! A step task owns its child process from spawn to reaping. It reports
//! through a bounded channel, so a master that acknowledges slowly slows the
//! step's reads, then the step itself (its pipe fills): memory stays bounded
//! however much a step prints.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::mask::Masker;
use crate::proto::OutputStream;

/// The largest output chunk.
pub const CHUNK: usize = 64 * 1024;

/// The buffer a step's output is read into: reads take at most what is
/// left of it.
const READ_BUFFER: usize = 256 * 1024;

/// A buffer with less room than this left is set aside for a new one (what
/// is left of it is never used: at most this much of each buffer).
const MIN_READ: usize = 16 * 1024;
/// The size asked for a step's stdout pipe (the kernel's default is 64
/// KiB): room for the step to print on while the agent sends what it read.
/// A step printing 1 GiB made the worker switch 34,000 times with 64 KiB,
/// 14,000 with 1 MiB, and it spent 15% less CPU (BENCHMARKS.md, issue 14).
const STDOUT_PIPE: i32 = 1024 * 1024;

/// At most this many steps' pipes are grown at once: the kernel counts
/// pipe memory per user (`fs.pipe-user-pages-soft`, 64 MiB by default),
/// and once a user passes it, every new pipe of that user is cut to two
/// pages. 16 grown pipes take a quarter of it.
const MAX_GROWN_PIPES: usize = 16;

static GROWN_PIPES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A step's stdout pipe grown to [`STDOUT_PIPE`]; counted among the
/// [`MAX_GROWN_PIPES`] until dropped (when the step's output has all been
/// read).
struct GrownPipe;

impl GrownPipe {
    fn try_grow(pipe: &impl std::os::fd::AsFd) -> Option<GrownPipe> {
        use std::sync::atomic::Ordering;
        GROWN_PIPES
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_GROWN_PIPES).then_some(n + 1)
            })
            .ok()?;
        // Refused (over the user's limits): it stays as it is.
        match nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(STDOUT_PIPE)) {
            Ok(_) => Some(GrownPipe),
            Err(_) => {
                GROWN_PIPES.fetch_sub(1, Ordering::AcqRel);
                None
            }
        }
    }
}

impl Drop for GrownPipe {
    fn drop(&mut self) {
        GROWN_PIPES.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// How long a step has between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// The variables a step gets from the worker's own environment, whatever
/// the worker was started with: enough to find programs and behave like a
/// login of the worker's user, nothing that could be a credential.
pub const PASSED_ENV: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR", "TZ"];

/// Variables that never reach a step from the worker's environment, even
/// when named with `--pass-env`: the worker's own credentials.
pub const NEVER_PASSED: &[&str] = &["SWITCHYARD_PASSWORD"];

/// Why a `--pass-env` name is refused.
#[derive(Debug, thiserror::Error)]
pub enum PassEnvError {
    #[error("`{0}` is the worker's credential and is never passed to steps")]
    Credential(String),
    #[error("`{0}` is not an environment variable name")]
    Invalid(String),
}

/// Checks the names given to `switchyard worker --pass-env`.
pub fn check_pass_env(names: &[String]) -> Result<(), PassEnvError> {
    for n in names {
        if NEVER_PASSED.contains(&n.as_str()) {
            return Err(PassEnvError::Credential(n.clone()));
        }
        if n.is_empty() || n.contains(['=', '\0']) {
            return Err(PassEnvError::Invalid(n.clone()));
        }
    }
    Ok(())
}

/// The part of a step's environment that comes from the worker: the
/// variables of [`PASSED_ENV`], every `LC_*`, and the names in `extra`
/// (`--pass-env`), as they are in `vars` (the worker's environment). Never a
/// name of [`NEVER_PASSED`].
pub fn base_env(
    vars: impl IntoIterator<Item = (String, String)>,
    extra: &[String],
) -> BTreeMap<String, String> {
    vars.into_iter()
        .filter(|(k, _)| {
            !NEVER_PASSED.contains(&k.as_str())
                && (PASSED_ENV.contains(&k.as_str())
                    || k.starts_with("LC_")
                    || extra.iter().any(|e| e == k))
        })
        .collect()
}

/// What to run.
#[derive(Clone, Debug)]
pub struct StepSpec {
    pub step_id: Vec<u8>,
    /// The directory to run in (created if missing).
    pub dir: PathBuf,
    pub argv: Vec<String>,
    /// The step's whole environment: nothing else of the worker's reaches
    /// it (see [`base_env`]).
    pub env: BTreeMap<String, String>,
    pub timeout: Option<Duration>,
    /// Where the step's process group is recorded while it runs, so that a
    /// worker restarted after a crash can kill what its previous run left.
    pub pid_dir: Option<PathBuf>,
    /// Where the step's supervisor comes from (see [`supervise`]); `None`:
    /// the command runs without one.
    pub supervisor: Option<Supervisors>,
    /// Step secrets (name, value) its argv or env hold: replaced by
    /// `<secret:NAME>` in its output and start error (see [`Masker`]).
    pub secrets: Vec<(String, Vec<u8>)>,
}

impl StepSpec {
    fn masker(&self) -> Option<Masker> {
        Masker::new(self.secrets.iter().map(|(n, v)| (n.as_str(), v.as_slice())))
    }
}

/// The step's supervisor: run by the worker as the leader of the step's
/// process group, it runs the step's command as its child and waits. The
/// kernel sends it SIGTERM when the worker dies (its parent-death signal), as
/// does the worker on a timeout or an interrupt; either way it kills the
/// whole group. So no step process outlives its worker, even one killed with
/// -9. Returns the exit code to exit with (a command killed by signal N
/// exits 128 + N).
///
/// It is small on purpose (a step that has one pays for it): no async
/// runtime, no logging; one thread takes the command's end (SIGCHLD) and
/// SIGTERM. Steps normally start through the worker's step host instead
/// ([`super::host`]), which does the same for all of them in one process;
/// a supervisor per step is for when the host cannot be had.
pub fn supervise(argv: &[String], parent: i32) -> i32 {
    let Some(term) = watch_parent(parent) else {
        return 125;
    };
    let Some((program, args)) = argv.split_first() else {
        eprintln!("switchyard: the step has no command");
        return 127;
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    run_supervised(cmd, program, term)
}

/// What a supervisor started ahead of its step ([`Supervisors`]) is told
/// on its standard input, as JSON, once the step starts.
#[derive(serde::Serialize, serde::Deserialize)]
struct Order {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    dir: PathBuf,
}

/// The most a supervisor reads from its standard input.
const MAX_ORDER: u64 = 64 * 1024 * 1024;

/// [`supervise`] for a supervisor started ahead of its step: it waits for
/// the step's command, directory and environment on its standard input
/// (JSON, then end of file). Its input closed with nothing on it means the
/// worker did not need it: it exits quietly.
pub fn supervise_from_stdin(parent: i32) -> i32 {
    use std::io::Read;
    let Some(term) = watch_parent(parent) else {
        return 125;
    };
    let mut text = Vec::new();
    if std::io::stdin()
        .take(MAX_ORDER)
        .read_to_end(&mut text)
        .is_err()
        || text.is_empty()
    {
        return 0;
    }
    let Ok(order) = serde_json::from_slice::<Order>(&text) else {
        eprintln!("switchyard: the worker sent the step supervisor an order it cannot read");
        return 125;
    };
    let Some((program, args)) = order.argv.split_first() else {
        eprintln!("switchyard: the step has no command");
        return 127;
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(&order.env)
        .current_dir(&order.dir)
        .stdin(Stdio::null());
    run_supervised(cmd, program, term)
}

/// Blocks SIGTERM and SIGCHLD (taken later with sigwait, so neither is
/// missed; threads started afterwards block them too) and asks the kernel
/// for SIGTERM when the worker dies. `None` if the worker is
/// already gone or cannot be watched: then nothing may start.
pub(super) fn watch_parent(parent: i32) -> Option<nix::sys::signal::SigSet> {
    use nix::sys::prctl::set_pdeathsig;
    use nix::sys::signal::SigSet;
    use nix::unistd::getppid;
    let mut term = SigSet::empty();
    term.add(Signal::SIGTERM);
    // And the step's end, taken the same way (no thread waits for it).
    term.add(Signal::SIGCHLD);
    term.thread_block().ok()?;
    if set_pdeathsig(Signal::SIGTERM).is_err() || getppid().as_raw() != parent {
        return None;
    }
    Some(term)
}

/// Starts the command (with no signal blocked: the standard library resets
/// the mask of the processes it starts), then exits with its status, or
/// kills the whole group on SIGTERM.
fn run_supervised(
    mut cmd: std::process::Command,
    program: &str,
    term: nix::sys::signal::SigSet,
) -> i32 {
    use nix::unistd::getpgrp;
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchyard: cannot start {program:?}: {e}");
            return 127;
        }
    };
    // Either the command ends (SIGCHLD: the supervisor exits with its
    // status), or a SIGTERM (an interrupt, a timeout, or the worker's
    // death) kills the whole group, this process included.
    loop {
        match term.wait() {
            Ok(Signal::SIGTERM) => {
                let _ = killpg(getpgrp(), Signal::SIGKILL);
                return 137;
            }
            Ok(Signal::SIGCHLD) => {
                use std::os::unix::process::ExitStatusExt;
                match child.try_wait() {
                    Ok(None) => continue,
                    Ok(Some(s)) => {
                        return s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
                    }
                    Err(_) => return 125,
                }
            }
            _ => continue,
        }
    }
}

impl std::fmt::Debug for Supervisors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisors")
            .field("program", &self.program)
            .finish_non_exhaustive()
    }
}

/// How the worker's steps are started: through its step host
/// ([`super::host`]), or, when no host can be had, each under a supervisor
/// process of its own. Once a step has needed one, a supervisor is started
/// ahead of the next such step (loading a program takes about a
/// millisecond, which the step would otherwise wait for): its own process
/// group leader, its output already piped to the worker; a step takes it
/// and tells it what to run. A ready supervisor dies with the worker like
/// any other.
#[derive(Clone)]
pub struct Supervisors {
    program: PathBuf,
    ready: std::sync::Arc<std::sync::Mutex<Option<tokio::process::Child>>>,
    /// The worker's step host, which starts steps without a supervisor
    /// process each (see [`super::host`]); the supervisors here are for
    /// when it cannot be had.
    host: super::host::StepHost,
}

impl Supervisors {
    /// Supervisors run as `PROGRAM __step --parent PID --stdin`, the host
    /// as `PROGRAM __step --parent PID --host`, with the steps' output
    /// FIFOs in `fifo_dir`.
    pub fn new(program: PathBuf, fifo_dir: PathBuf) -> Self {
        Supervisors {
            host: super::host::StepHost::new(program.clone(), fifo_dir),
            program,
            ready: Default::default(),
        }
    }

    fn start(&self) -> std::io::Result<tokio::process::Child> {
        start_helper(&self.program, "--stdin", Stdio::piped())
    }

    /// A supervisor for a step: the ready one if it is still alive, else a
    /// new one.
    fn take(&self) -> std::io::Result<tokio::process::Child> {
        let ready = self.ready.lock().unwrap_or_else(|e| e.into_inner()).take();
        match ready {
            Some(mut c) => match c.try_wait() {
                Ok(None) => Ok(c),
                _ => self.start(),
            },
            None => self.start(),
        }
    }

    /// Starts the next ready supervisor, unless one is waiting already.
    ///
    /// Called on the worker's runtime thread, never on a passing one: the
    /// kernel's parent-death signal, which kills a supervisor when its
    /// worker dies, follows the thread that started it, so a supervisor
    /// started on a thread that exits would die with that thread.
    fn refill(&self) {
        let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        if ready.is_none() {
            *ready = self.start().ok();
        }
    }
}

/// Starts `PROGRAM __step --parent PID MODE` (a step supervisor or the
/// step host) with nothing of the worker's environment, as the leader of a
/// process group of its own, its input and output piped to the worker.
pub(super) fn start_helper(
    program: &std::path::Path,
    mode: &str,
    stderr: Stdio,
) -> std::io::Result<tokio::process::Child> {
    Command::new(program)
        .arg("__step")
        .arg("--parent")
        .arg(std::process::id().to_string())
        .arg(mode)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
}

fn pid_file(dir: &std::path::Path, step_id: &[u8]) -> PathBuf {
    dir.join(crate::wire::hex(step_id))
}

/// Kills the process groups that a previous run of this worker left behind
/// (it crashed or was killed with its steps running), and forgets them.
/// Returns how many it found.
pub fn reap_leftovers(pid_dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(pid_dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        if let Ok(text) = std::fs::read_to_string(e.path())
            && let Ok(pgid) = text.trim().parse::<i32>()
            && pgid > 1
        {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            tracing::warn!(step = %e.file_name().to_string_lossy(), pgid, "killed a step left running by this worker's previous run");
            n += 1;
        }
        let _ = std::fs::remove_file(e.path());
    }
    n
}

/// How a step ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepEnd {
    Exited(i32),
    Signalled(i32),
    StartFailed(String),
}

/// What a step task reports.
#[derive(Debug)]
pub enum StepEvent {
    Output {
        step_id: Vec<u8>,
        stream: OutputStream,
        data: bytes::Bytes,
    },
    Finished {
        step_id: Vec<u8>,
        end: StepEnd,
        timed_out: bool,
        interrupted: bool,
    },
}

/// Signals the whole process group `pgid`; a group that is already gone is
/// not an error.
fn signal_group(pgid: u32, sig: Signal) {
    let _ = killpg(Pid::from_raw(pgid as i32), sig);
}

async fn pump(
    mut pipe: impl tokio::io::AsyncRead + Unpin,
    stream: OutputStream,
    step_id: Vec<u8>,
    events: mpsc::Sender<StepEvent>,
    mut masker: Option<Masker>,
) {
    // Read into the free end of a big buffer; what a read brings is split
    // off and sent as it is (chunks of at most CHUNK bytes sharing the
    // buffer), never copied. A buffer is freed once the master has
    // acknowledged every chunk cut from it, so a slow step pins at most one
    // buffer beyond what is unacknowledged anyway.
    let mut buf = bytes::BytesMut::new();
    let send = |data: bytes::Bytes| {
        let ev = StepEvent::Output {
            step_id: step_id.clone(),
            stream,
            data,
        };
        events.send(ev)
    };
    loop {
        if buf.capacity() < MIN_READ {
            buf = bytes::BytesMut::with_capacity(READ_BUFFER);
        }
        let mut data = match pipe.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => match masker.as_mut() {
                None => buf.split().freeze(),
                Some(m) => {
                    let masked = m.feed(&buf);
                    buf.clear();
                    masked.into()
                }
            },
        };
        // A read (or masked output, a short secret replaced many times)
        // can be longer than a chunk: it goes in chunks of at most CHUNK.
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(CHUNK));
            if send(piece).await.is_err() {
                return;
            }
        }
    }
    if let Some(rest) = masker
        .as_mut()
        .map(Masker::finish)
        .filter(|r| !r.is_empty())
    {
        let _ = send(rest.into()).await;
    }
}

/// Hands the step to a supervisor (a ready one when there is one), and
/// starts the next.
async fn start_supervised(
    pool: &Supervisors,
    spec: &StepSpec,
) -> std::io::Result<tokio::process::Child> {
    use tokio::io::AsyncWriteExt;
    let mut child = pool.take()?;
    let order = Order {
        argv: spec.argv.clone(),
        env: spec.env.clone(),
        dir: spec.dir.clone(),
    };
    let text = serde_json::to_vec(&order).map_err(std::io::Error::other)?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("the supervisor has no input"))?;
    stdin.write_all(&text).await?;
    drop(stdin);
    pool.refill();
    Ok(child)
}

/// Runs a step to its end. `interrupt` stops it (the whole group is
/// killed). Always ends with exactly one `Finished` event.
pub async fn run(
    mut spec: StepSpec,
    events: mpsc::Sender<StepEvent>,
    interrupt: CancellationToken,
) {
    // `@switchyard` (an upload step) is this worker's own binary.
    if spec.argv.first().map(String::as_str) == Some(crate::config::WORKER_SELF)
        && let Ok(me) = std::env::current_exe()
    {
        spec.argv[0] = me.to_string_lossy().into_owned();
    }
    let finish = |end: StepEnd, timed_out: bool, interrupted: bool| StepEvent::Finished {
        step_id: spec.step_id.clone(),
        end: match (end, spec.masker()) {
            (StepEnd::StartFailed(e), Some(mut m)) => StepEnd::StartFailed(m.mask_text(&e)),
            (end, _) => end,
        },
        timed_out,
        interrupted,
    };
    if let Err(e) = std::fs::create_dir_all(&spec.dir) {
        let msg = format!(
            "cannot create the step's directory {}: {e}",
            spec.dir.display()
        );
        let _ = events
            .send(finish(StepEnd::StartFailed(msg), false, false))
            .await;
        return;
    }
    let Some((program, args)) = spec.argv.split_first() else {
        let _ = events
            .send(finish(
                StepEnd::StartFailed("the step has no command".into()),
                false,
                false,
            ))
            .await;
        return;
    };
    let started = match &spec.supervisor {
        Some(pool) => match pool.host.spawn(&spec.argv, &spec.env, &spec.dir).await {
            Ok(h) => Ok(StepChild::Hosted(h)),
            Err(super::host::SpawnError::Refused(why)) => {
                let _ = events
                    .send(finish(StepEnd::StartFailed(why), false, false))
                    .await;
                return;
            }
            Err(super::host::SpawnError::Unavailable(e)) => {
                // The host cannot be had: this step gets a supervisor of
                // its own.
                tracing::warn!(error = %e, "the step host is not available; starting a supervisor for this step");
                start_supervised(pool, &spec).await.map(StepChild::Direct)
            }
        },
        None => Command::new(program)
            .args(args)
            .env_clear()
            .envs(&spec.env)
            .current_dir(&spec.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map(StepChild::Direct),
    };
    let mut child = match started {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("cannot start {program:?}: {e}");
            let _ = events
                .send(finish(StepEnd::StartFailed(msg), false, false))
                .await;
            return;
        }
    };
    let pgid = child.id().unwrap_or(0);
    let recorded = spec.pid_dir.as_ref().filter(|_| pgid != 0).map(|d| {
        let f = pid_file(d, &spec.step_id);
        let _ = std::fs::create_dir_all(d).and_then(|_| std::fs::write(&f, pgid.to_string()));
        f
    });
    let (stdout, stderr) = child.take_output();
    let out = stdout.map(|p| {
        let grown = GrownPipe::try_grow(&p);
        let pumping = pump(
            p,
            OutputStream::Stdout,
            spec.step_id.clone(),
            events.clone(),
            spec.masker(),
        );
        tokio::spawn(async move {
            pumping.await;
            drop(grown);
        })
    });
    let err = stderr.map(|p| {
        tokio::spawn(pump(
            p,
            OutputStream::Stderr,
            spec.step_id.clone(),
            events.clone(),
            spec.masker(),
        ))
    });

    let timeout = async {
        match spec.timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let (status, timed_out, interrupted) = tokio::select! {
        s = child.wait() => (s, false, false),
        _ = timeout => (kill_and_wait(&mut child, pgid).await, true, false),
        _ = interrupt.cancelled() => (kill_and_wait(&mut child, pgid).await, false, true),
    };
    // Whatever the step left running in its group dies with it: nothing
    // outlives its step, and the pipes close.
    if pgid != 0 {
        signal_group(pgid, Signal::SIGKILL);
    }
    for pump in [out, err].into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(5), pump).await;
    }
    if let Some(f) = recorded {
        let _ = std::fs::remove_file(f);
    }
    let end = match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            match (s.code(), s.signal()) {
                (Some(code), _) => StepEnd::Exited(code),
                (None, Some(sig)) => StepEnd::Signalled(sig),
                (None, None) => StepEnd::StartFailed("unknown exit status".into()),
            }
        }
        Err(e) => StepEnd::StartFailed(format!("cannot wait for the step: {e}")),
    };
    let _ = events.send(finish(end, timed_out, interrupted)).await;
}

/// A step's process: started directly (or under a supervisor of its own),
/// or by the worker's step host.
enum StepChild {
    Direct(tokio::process::Child),
    Hosted(super::host::Hosted),
}

/// A step's output pipe, however it was started.
enum OutputPipe {
    Child(tokio::process::ChildStdout),
    ChildErr(tokio::process::ChildStderr),
    Fifo(tokio::net::unix::pipe::Receiver),
}

impl std::os::fd::AsFd for OutputPipe {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            OutputPipe::Child(p) => p.as_fd(),
            OutputPipe::ChildErr(p) => p.as_fd(),
            OutputPipe::Fifo(p) => p.as_fd(),
        }
    }
}

impl tokio::io::AsyncRead for OutputPipe {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            OutputPipe::Child(p) => std::pin::Pin::new(p).poll_read(cx, buf),
            OutputPipe::ChildErr(p) => std::pin::Pin::new(p).poll_read(cx, buf),
            OutputPipe::Fifo(p) => std::pin::Pin::new(p).poll_read(cx, buf),
        }
    }
}

impl StepChild {
    /// The step's pid: the id of its process group.
    fn id(&self) -> Option<u32> {
        match self {
            StepChild::Direct(c) => c.id(),
            StepChild::Hosted(h) => Some(h.pid),
        }
    }

    fn take_output(&mut self) -> (Option<OutputPipe>, Option<OutputPipe>) {
        match self {
            StepChild::Direct(c) => (
                c.stdout.take().map(OutputPipe::Child),
                c.stderr.take().map(OutputPipe::ChildErr),
            ),
            StepChild::Hosted(h) => (
                h.stdout.take().map(OutputPipe::Fifo),
                h.stderr.take().map(OutputPipe::Fifo),
            ),
        }
    }

    async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self {
            StepChild::Direct(c) => c.wait().await,
            StepChild::Hosted(h) => h.wait().await,
        }
    }
}

async fn kill_and_wait(
    child: &mut StepChild,
    pgid: u32,
) -> std::io::Result<std::process::ExitStatus> {
    if pgid != 0 {
        signal_group(pgid, Signal::SIGTERM);
    }
    match tokio::time::timeout(KILL_GRACE, child.wait()).await {
        Ok(s) => s,
        Err(_) => {
            if pgid != 0 {
                signal_group(pgid, Signal::SIGKILL);
            }
            child.wait().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_pipes_grow_to_a_megabyte_but_never_more_than_sixteen_at_once() {
        use nix::fcntl::{FcntlArg, fcntl};
        let pipes: Vec<_> = (0..20).map(|_| nix::unistd::pipe().unwrap()).collect();
        let grown: Vec<_> = pipes.iter().map(|(r, _)| GrownPipe::try_grow(r)).collect();
        let n = grown.iter().filter(|g| g.is_some()).count();
        assert!((1..=MAX_GROWN_PIPES).contains(&n), "{n} grown");
        for ((r, _), g) in pipes.iter().zip(&grown) {
            let size = fcntl(r, FcntlArg::F_GETPIPE_SZ).unwrap();
            assert_eq!(size == STDOUT_PIPE, g.is_some(), "a pipe of {size} bytes");
        }
        // Their steps ended: room again.
        drop(grown);
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(GrownPipe::try_grow(&r).is_some());
    }

    #[test]
    fn base_env_passes_the_documented_names_and_never_the_password() {
        let vars = [
            ("PATH", "/bin"),
            ("HOME", "/home/w"),
            ("LC_ALL", "C.UTF-8"),
            ("SWITCHYARD_PASSWORD", "hunter2"),
            ("AWS_SECRET_ACCESS_KEY", "x"),
            ("CCACHE_DIR", "/cache"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let env = base_env(
            vars,
            &["CCACHE_DIR".to_string(), "SWITCHYARD_PASSWORD".to_string()],
        );
        let names: Vec<&str> = env.keys().map(String::as_str).collect();
        assert_eq!(names, ["CCACHE_DIR", "HOME", "LC_ALL", "PATH"]);
        assert!(check_pass_env(&["SWITCHYARD_PASSWORD".into()]).is_err());
        assert!(check_pass_env(&["A=B".into()]).is_err());
        assert!(check_pass_env(&["CCACHE_DIR".into()]).is_ok());
    }

    #[test]
    fn reaps_the_process_groups_a_previous_run_left() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30"])
            .process_group(0)
            .spawn()
            .unwrap();
        std::fs::write(dir.path().join("abcd"), child.id().to_string()).unwrap();
        assert_eq!(reap_leftovers(dir.path()), 1);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
