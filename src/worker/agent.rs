//! The worker agent: `switchyard worker`.
//!
//! It logs in to the master's `worker` service, says what it is, runs the
//! steps it is sent, streams their output in numbered chunks, and keeps every
//! chunk until the master acknowledges it. When the link drops (or goes
//! silent for two heartbeat intervals) it reconnects with exponential backoff
//! and jitter; its steps keep running meanwhile, and the new session starts by
//! listing them and replaying what was not acknowledged.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::download::Download;
use super::step::{self, StepEnd, StepEvent, StepSpec};
use crate::client::{self, ClientError, ClientOptions, ClientSession, Credentials};
use crate::proto::{
    Heartbeat, HeldStep, MasterMessage, OutputStream, StepAccepted, StepFinished, StepOutput,
    WorkerHello, WorkerMessage, master_message, step_finished, worker_message,
};

/// How long a worker waits for a master to finish its login.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Unacknowledged output bytes the agent holds before it stops reading its
/// steps' pipes (and so slows the steps) until the master catches up. Big
/// enough to cover the master's batch being synced while the next one
/// fills: 8 MiB held 1 GiB of output to about 450 MiB/s, 32 MiB lets it
/// run at about 650 MiB/s (BENCHMARKS.md, issue 14).
pub const WINDOW: usize = 32 * 1024 * 1024;

/// Most step events (output chunks, mostly) sent in one write.
const EVENTS_PER_WRITE: usize = 16;

/// Unacknowledged output the agent spills to disk (beyond [`WINDOW`] in
/// memory) before it stops reading its steps' pipes.
pub const SPILL_LIMIT: u64 = 1 << 30;

/// How a worker connects.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The masters' addresses, tried in turn: the worker stays with the one
    /// it is logged in to (reconnecting to it first when a session ends)
    /// and goes on to the next only when it cannot log in there. More than
    /// one is for masters that share one state database.
    pub masters: Vec<String>,
    pub name: String,
    pub password: String,
    /// Steps run in `basedir/<builder>/<workdir>`.
    pub basedir: PathBuf,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Runs each step under this program's `__step` supervisor (the
    /// `switchyard` binary), so that steps die with the worker.
    pub step_supervisor: Option<PathBuf>,
    /// What every step starts from, before the master's variables: see
    /// [`step::base_env`]. Empty by default (a step then sees only what the
    /// master sends).
    pub step_env: std::collections::BTreeMap<String, String>,
    /// Connect with TLS (`None`: plain TCP).
    pub tls: Option<crate::wire::tls::ClientTls>,
    /// How the worker logs in (PLAIN only inside TLS).
    pub mechanism: crate::client::Mechanism,
}

impl AgentOptions {
    /// Options for a worker logging in to `masters` (tried in turn; at
    /// least one) as `name`.
    pub fn new(
        masters: Vec<String>,
        name: impl Into<String>,
        password: impl Into<String>,
        basedir: impl Into<PathBuf>,
    ) -> Self {
        AgentOptions {
            masters,
            name: name.into(),
            password: password.into(),
            basedir: basedir.into(),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            step_supervisor: None,
            step_env: Default::default(),
            tls: None,
            mechanism: Default::default(),
        }
    }
}

/// A step this agent holds: running, or finished but not yet acknowledged.
struct Held {
    interrupt: CancellationToken,
    next_seq: u64,
    acked: u64,
    unacked: super::spool::Spool,
    finished: Option<StepFinished>,
}

struct Agent {
    opts: AgentOptions,
    creds: Arc<Credentials>,
    steps: HashMap<Vec<u8>, Held>,
    /// Unacknowledged output bytes in memory.
    unacked_bytes: usize,
    events_tx: mpsc::Sender<StepEvent>,
    events_rx: mpsc::Receiver<StepEvent>,
    /// Step supervisors, one started ahead (when `step_supervisor` is set).
    supervisors: Option<step::Supervisors>,
    /// Download steps receiving their artifact, by step id.
    downloads: HashMap<Vec<u8>, Download>,
}

/// Why a session ended.
enum End {
    Shutdown,
    Lost(String),
}

fn safe_component(name: &str) -> bool {
    let mut c = Path::new(name).components();
    matches!((c.next(), c.next()), (Some(Component::Normal(_)), None))
}

fn safe_relative(p: &str) -> bool {
    Path::new(p)
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn hello_info(steps: Vec<HeldStep>) -> WorkerHello {
    WorkerHello {
        hostname: nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        version: env!("CARGO_PKG_VERSION").to_string(),
        steps,
        basedir: String::new(),
        masks_secrets: true,
        downloads: true,
    }
}

fn frame(kind: worker_message::Kind) -> WorkerMessage {
    WorkerMessage { kind: Some(kind) }
}

/// Where unacknowledged output beyond the memory bound is spilled.
fn spill_dir(basedir: &Path) -> PathBuf {
    basedir.join(".switchyard").join("spill")
}

/// Where running steps' process groups are recorded.
fn pid_dir(basedir: &Path) -> PathBuf {
    basedir.join(".switchyard").join("steps")
}

/// Runs the agent until `shutdown`: connects, serves, reconnects. Returns
/// when shut down; every step it was running is killed first.
pub async fn run(opts: AgentOptions, shutdown: CancellationToken) {
    // Nothing a previous run started outlives it: its steps are killed, and
    // the master, not hearing of them, treats them as lost.
    let reaped = step::reap_leftovers(&pid_dir(&opts.basedir));
    if reaped > 0 {
        tracing::warn!(
            steps = reaped,
            "killed the steps a previous run of this worker left running"
        );
    }
    let (events_tx, events_rx) = mpsc::channel(64);
    let creds = Arc::new(Credentials::new(opts.name.clone(), opts.password.clone()));
    // The device token of the last login, kept across restarts of this
    // worker: others' failed logins never keep it out (see `auth::throttle`).
    let token_file = opts.basedir.join(".switchyard").join("device-token");
    creds.set_device_token(client::load_device_token(&token_file));
    let supervisors = opts
        .step_supervisor
        .clone()
        .map(|p| step::Supervisors::new(p, opts.basedir.join(".switchyard").join("fifos")));
    let mut agent = Agent {
        opts,
        supervisors,
        creds,
        steps: HashMap::new(),
        unacked_bytes: 0,
        events_tx,
        events_rx,
        downloads: HashMap::new(),
    };
    if agent.opts.masters.is_empty() {
        tracing::error!("no master to log in to");
        return;
    }
    // Consecutive failed logins, and where in the masters' list they are.
    let mut failures: u32 = 0;
    let mut current = 0usize;
    let client_opts = ClientOptions {
        client_agent: format!("switchyard-worker/{}", env!("CARGO_PKG_VERSION")),
        tls: agent.opts.tls.clone(),
        mechanism: agent.opts.mechanism,
        // A login takes milliseconds; a master that accepts the connection
        // and never answers (stopped, or hung) is given up on after this,
        // and the next master tried.
        timeout: LOGIN_TIMEOUT,
        ..Default::default()
    };
    'agent: loop {
        // Steps keep printing while we connect: hold their output meanwhile.
        let master = agent.opts.masters[current % agent.opts.masters.len()].clone();
        let creds = agent.creds.clone();
        let connect = client::connect_with(&master, super::SERVICE, &creds, &client_opts);
        tokio::pin!(connect);
        let session = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break 'agent,
                s = &mut connect => break s,
                ev = agent.events_rx.recv(), if agent.has_room() => {
                    if let Some(ev) = ev {
                        let _ = agent.on_step_event(ev);
                    }
                }
            }
        };
        let masters = agent.opts.masters.len();
        let (why, delay) = match session {
            Ok(session) => {
                failures = 0;
                if let Some(t) = agent.creds.device_token() {
                    client::save_device_token(&token_file, &t);
                }
                tracing::info!(%master, worker = %agent.opts.name, session = %session.session_id, "connected to the master");
                match agent.serve(session, &shutdown).await {
                    End::Shutdown => break 'agent,
                    // A lost session is tried again on the same master (the
                    // link blinked, or it restarted).
                    End::Lost(why) => (why, backoff(&agent.opts, 0)),
                }
            }
            Err(e) => {
                if let ClientError::Rejected { code, .. } = &e {
                    use crate::proto::RejectCode;
                    if matches!(code, RejectCode::AuthFailed | RejectCode::NotAuthorized) {
                        tracing::error!(worker = %agent.opts.name, "the master refused this worker: check its name is a [[worker]] in the master's config and its password matches the verifier in the secrets file");
                    }
                }
                // A failed login moves on to the next master at once; the
                // worker waits (backing off) only once every master has
                // failed in a row.
                failures = failures.saturating_add(1);
                current = (current + 1) % masters;
                let delay = if (failures as usize).is_multiple_of(masters) {
                    backoff(&agent.opts, (failures / masters as u32).saturating_sub(1))
                } else {
                    Duration::ZERO
                };
                (e.to_string(), delay)
            }
        };
        tracing::warn!(%master, reason = %why, retry_in = ?delay, next = %agent.opts.masters[current], "not connected to the master");
        if !agent
            .hold_output_until(tokio::time::Instant::now() + delay, &shutdown)
            .await
        {
            break 'agent;
        }
    }
    agent.stop_all().await;
}

/// Exponential backoff with jitter: a random delay in [d/2, d], d doubling
/// from the initial delay up to the maximum.
fn backoff(opts: &AgentOptions, failures: u32) -> Duration {
    let d = opts
        .initial_backoff
        .saturating_mul(1u32 << failures.min(16))
        .min(opts.max_backoff);
    let half = d / 2;
    half + half.mul_f64(rand::random::<f64>())
}

impl Agent {
    /// Whether the agent may take more step output (in memory, or spilled).
    fn has_room(&self) -> bool {
        self.unacked_bytes < WINDOW
            || self
                .steps
                .values()
                .map(|h| h.unacked.spilled_bytes())
                .sum::<u64>()
                < SPILL_LIMIT
    }

    /// Keeps step output coming while there is no session to send it on:
    /// the steps keep running, their output is held until the next session.
    async fn hold_output_until(
        &mut self,
        deadline: tokio::time::Instant,
        shutdown: &CancellationToken,
    ) -> bool {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep_until(deadline) => return true,
                ev = self.events_rx.recv(), if self.has_room() => {
                    if let Some(ev) = ev {
                        let _ = self.on_step_event(ev);
                    }
                }
            }
        }
    }

    fn held_list(&self) -> Vec<HeldStep> {
        self.steps
            .iter()
            .map(|(id, h)| HeldStep {
                step_id: id.clone(),
                acked_seq: h.acked,
                finished: h.finished.is_some(),
            })
            .collect()
    }

    async fn serve(&mut self, session: ClientSession, shutdown: &CancellationToken) -> End {
        let heartbeat = if session.heartbeat_interval.is_zero() {
            Duration::from_secs(10)
        } else {
            session.heartbeat_interval
        };
        let (mut stream, mut sink) = super::link::split(session.stream);
        let lost = |e: std::io::Error| End::Lost(format!("link failed: {e}"));
        if let Err(e) = sink
            .send(frame(worker_message::Kind::Hello(WorkerHello {
                basedir: std::path::absolute(&self.opts.basedir)
                    .unwrap_or_else(|_| self.opts.basedir.clone())
                    .to_string_lossy()
                    .into_owned(),
                ..hello_info(self.held_list())
            })))
            .await
        {
            return lost(e);
        }
        // Replay what the master has not acknowledged, oldest first.
        for h in self.steps.values_mut() {
            for chunk in h.unacked.replay() {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read spilled step output back");
                        break;
                    }
                };
                if let Err(e) = sink.feed(frame(worker_message::Kind::Output(chunk))).await {
                    return lost(e);
                }
            }
            if let Some(f) = &h.finished
                && let Err(e) = sink
                    .feed(frame(worker_message::Kind::Finished(f.clone())))
                    .await
            {
                return lost(e);
            }
        }
        // Downloads ask again from where their files end.
        for d in self.downloads.values_mut() {
            d.rewind();
            for ask in d.asks() {
                if let Err(e) = sink.feed(frame(worker_message::Kind::Wanted(ask))).await {
                    return lost(e);
                }
            }
        }
        if let Err(e) = sink.flush().await {
            return lost(e);
        }
        let mut stalls = tokio::time::interval(super::download::STALL / 2);
        stalls.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = tokio::time::Instant::now();
        // One timer for the master's silence, moved on only when it goes
        // off early (not made anew for every message).
        let silence = tokio::time::sleep_until(last_heard + heartbeat * 2);
        let shut = shutdown.cancelled();
        tokio::pin!(silence, shut);
        loop {
            tokio::select! {
                _ = &mut shut => return End::Shutdown,
                _ = &mut silence => {
                    let due = last_heard + heartbeat * 2;
                    if due > tokio::time::Instant::now() {
                        silence.as_mut().reset(due);
                        continue;
                    }
                    return End::Lost(format!("no word from the master for {:?} (two heartbeat intervals)", heartbeat * 2));
                }
                msg = stream.next() => {
                    last_heard = tokio::time::Instant::now();
                    let bytes = match msg {
                        None => return End::Lost("the master closed the session".into()),
                        Some(Err(e)) => return lost(e),
                        Some(Ok(b)) => b,
                    };
                    let Ok(MasterMessage { kind: Some(kind) }) = MasterMessage::decode(bytes.freeze()) else {
                        return End::Lost("the master sent a message this worker does not understand".into());
                    };
                    for reply in self.on_master(kind) {
                        if let Err(e) = sink.feed(frame(reply)).await {
                            return lost(e);
                        }
                    }
                    if let Err(e) = sink.flush().await {
                        return lost(e);
                    }
                }
                _ = stalls.tick() => {
                    // Downloads past their timeout end; asked-for bytes
                    // that never came (the master was restarting) are
                    // asked for again.
                    let late: Vec<Vec<u8>> = self
                        .downloads
                        .iter()
                        .filter(|(_, d)| d.timed_out())
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in late {
                        for m in self.time_out_download(id) {
                            if let Err(e) = sink.feed(frame(m)).await {
                                return lost(e);
                            }
                        }
                    }
                    for d in self.downloads.values_mut().filter(|d| d.stalled()) {
                        d.rewind();
                        for ask in d.asks() {
                            if let Err(e) = sink.feed(frame(worker_message::Kind::Wanted(ask))).await {
                                return lost(e);
                            }
                        }
                    }
                    if let Err(e) = sink.flush().await {
                        return lost(e);
                    }
                }
                ev = self.events_rx.recv(), if self.has_room() => {
                    // This event and those already waiting behind it (a
                    // few), in one write.
                    let mut next = ev;
                    let mut taken = 0;
                    while let Some(ev) = next.take() {
                        if let Some(out) = self.on_step_event(ev)
                            && let Err(e) = sink.push(frame(out))
                        {
                            return lost(e);
                        }
                        taken += 1;
                        if taken < EVENTS_PER_WRITE && self.has_room() {
                            next = self.events_rx.try_recv().ok();
                        }
                    }
                    if let Err(e) = sink.flush().await {
                        return lost(e);
                    }
                }
                _ = tick.tick() => {
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
                    if let Err(e) = sink.send(frame(worker_message::Kind::Heartbeat(Heartbeat { sent_unix_ms: now }))).await {
                        return lost(e);
                    }
                }
            }
        }
    }

    /// Acts on a master message; returns what to send.
    fn on_master(&mut self, kind: master_message::Kind) -> Vec<worker_message::Kind> {
        match kind {
            master_message::Kind::Start(s) => {
                let accepted = vec![worker_message::Kind::Accepted(StepAccepted {
                    step_id: s.step_id.clone(),
                })];
                if self.steps.contains_key(&s.step_id) {
                    return accepted; // already running: a repeat after a reconnect
                }
                let interrupt = CancellationToken::new();
                self.steps.insert(
                    s.step_id.clone(),
                    Held {
                        interrupt: interrupt.clone(),
                        next_seq: 1,
                        acked: 0,
                        unacked: super::spool::Spool::new(&s.step_id),
                        finished: None,
                    },
                );
                let tx = self.events_tx.clone();
                if !safe_component(&s.builder) || !safe_relative(&s.workdir) {
                    let msg = format!(
                        "refusing builder {:?} / workdir {:?}: not a path inside the basedir",
                        s.builder, s.workdir
                    );
                    tokio::spawn(async move {
                        let _ = tx
                            .send(StepEvent::Finished {
                                step_id: s.step_id,
                                end: StepEnd::StartFailed(msg),
                                timed_out: false,
                                interrupted: false,
                            })
                            .await;
                    });
                    return accepted;
                }
                let dir = self.opts.basedir.join(&s.builder).join(&s.workdir);
                if let Some(spec) = s.download {
                    let timeout = (s.timeout_ms > 0).then(|| Duration::from_millis(s.timeout_ms));
                    return self.start_download(s.step_id, spec, &dir, timeout, accepted);
                }
                tracing::info!(builder = %s.builder, step = %s.name, dir = %dir.display(), "starting step");
                let spec = StepSpec {
                    step_id: s.step_id,
                    dir,
                    argv: s.argv,
                    env: {
                        let mut env = self.opts.step_env.clone();
                        env.extend(s.env);
                        env
                    },
                    timeout: (s.timeout_ms > 0).then(|| Duration::from_millis(s.timeout_ms)),
                    pid_dir: Some(pid_dir(&self.opts.basedir)),
                    supervisor: self.supervisors.clone(),
                    secrets: s.secrets.into_iter().map(|x| (x.name, x.value)).collect(),
                };
                tokio::spawn(step::run(spec, tx, interrupt));
                accepted
            }
            master_message::Kind::Interrupt(i) => {
                if let Some(h) = self.steps.get(&i.step_id) {
                    tracing::info!(reason = %i.reason, "interrupting step");
                    h.interrupt.cancel();
                }
                if let Some(d) = self.downloads.remove(&i.step_id) {
                    d.abandon();
                    return self
                        .on_step_event(StepEvent::Finished {
                            step_id: i.step_id,
                            end: StepEnd::Signalled(nix::sys::signal::Signal::SIGTERM as i32),
                            timed_out: false,
                            interrupted: true,
                        })
                        .into_iter()
                        .collect();
                }
                Vec::new()
            }
            master_message::Kind::Ack(a) => {
                let Some(h) = self.steps.get_mut(&a.step_id) else {
                    return Vec::new();
                };
                self.unacked_bytes -= h.unacked.ack(a.seq);
                h.acked = h.acked.max(a.seq);
                if a.finished && h.finished.is_some() {
                    self.steps.remove(&a.step_id);
                }
                Vec::new()
            }
            // The master's heartbeat doubles as a ping: answer it (the
            // master never answers ours, so this does not echo forever).
            master_message::Kind::Heartbeat(hb) => vec![worker_message::Kind::Heartbeat(hb)],
            master_message::Kind::Data(data) => self.on_artifact_data(data),
        }
    }

    /// Starts a download step: checks where it writes, says what it
    /// fetches, and asks for the first pieces.
    fn start_download(
        &mut self,
        step_id: Vec<u8>,
        spec: crate::proto::Download,
        dir: &Path,
        timeout: Option<Duration>,
        mut out: Vec<worker_message::Kind>,
    ) -> Vec<worker_message::Kind> {
        tracing::info!(artifact = %spec.name, bytes = spec.size, dest = %spec.dest, "starting download");
        match Download::open(&step_id, spec, dir, timeout) {
            Ok(mut d) => {
                let line = d.started_line();
                out.extend(self.say(&step_id, OutputStream::Stdout, line));
                out.extend(d.asks().into_iter().map(worker_message::Kind::Wanted));
                let complete = d.complete();
                self.downloads.insert(step_id.clone(), d);
                if complete {
                    // Nothing to fetch (an empty artifact).
                    self.finish_download(step_id);
                }
            }
            Err(why) => out.extend(self.on_step_event(StepEvent::Finished {
                step_id,
                end: StepEnd::StartFailed(why),
                timed_out: false,
                interrupted: false,
            })),
        }
        out
    }

    /// A line of a step's output, numbered like the rest of it.
    fn say(
        &mut self,
        step_id: &[u8],
        stream: OutputStream,
        line: String,
    ) -> Option<worker_message::Kind> {
        self.on_step_event(StepEvent::Output {
            step_id: step_id.to_vec(),
            stream,
            data: Bytes::from(line),
        })
    }

    /// Writes a piece of a download's artifact; asks for more, or
    /// finishes the download once it is all there.
    fn on_artifact_data(&mut self, data: crate::proto::ArtifactData) -> Vec<worker_message::Kind> {
        let Some(d) = self.downloads.get_mut(&data.step_id) else {
            return Vec::new(); // interrupted meanwhile
        };
        if d.timed_out() {
            return self.time_out_download(data.step_id);
        }
        let taken = if data.error.is_empty() {
            d.take(data.offset, &data.data)
        } else {
            Err(data.error)
        };
        match taken {
            Ok(()) if d.complete() => {
                self.finish_download(data.step_id);
                Vec::new()
            }
            Ok(()) => d
                .asks()
                .into_iter()
                .map(worker_message::Kind::Wanted)
                .collect(),
            Err(why) => {
                if let Some(d) = self.downloads.remove(&data.step_id) {
                    d.abandon();
                }
                self.fail_download(data.step_id, why)
            }
        }
    }

    /// The end of a download past its step's timeout: its partial file
    /// goes.
    fn time_out_download(&mut self, step_id: Vec<u8>) -> Vec<worker_message::Kind> {
        if let Some(d) = self.downloads.remove(&step_id) {
            d.abandon();
        }
        tracing::warn!("download timed out");
        self.on_step_event(StepEvent::Finished {
            step_id,
            end: StepEnd::Signalled(nix::sys::signal::Signal::SIGTERM as i32),
            timed_out: true,
            interrupted: false,
        })
        .into_iter()
        .collect()
    }

    /// The end of a download that cannot go on: why, on its log, and a
    /// failure.
    fn fail_download(&mut self, step_id: Vec<u8>, why: String) -> Vec<worker_message::Kind> {
        tracing::warn!(error = %why, "download failed");
        let mut out: Vec<_> = self
            .say(
                &step_id,
                OutputStream::Stderr,
                format!("switchyard: {why}\n"),
            )
            .into_iter()
            .collect();
        out.extend(self.on_step_event(StepEvent::Finished {
            step_id,
            end: StepEnd::Exited(1),
            timed_out: false,
            interrupted: false,
        }));
        out
    }

    /// Checks and places a download with every byte written, off the
    /// session's task; its last line and end come back as step events.
    fn finish_download(&mut self, step_id: Vec<u8>) {
        let Some(d) = self.downloads.remove(&step_id) else {
            return;
        };
        let tx = self.events_tx.clone();
        tokio::task::spawn_blocking(move || {
            let (stream, line, end) = match d.finish() {
                Ok(line) => (OutputStream::Stdout, line, StepEnd::Exited(0)),
                Err(why) => (
                    OutputStream::Stderr,
                    format!("switchyard: {why}\n"),
                    StepEnd::Exited(1),
                ),
            };
            let _ = tx.blocking_send(StepEvent::Output {
                step_id: step_id.clone(),
                stream,
                data: Bytes::from(line),
            });
            let _ = tx.blocking_send(StepEvent::Finished {
                step_id,
                end,
                timed_out: false,
                interrupted: false,
            });
        });
    }

    /// The message to send for a step event; `None` for an event of a step
    /// this agent no longer holds (late output after its end was
    /// acknowledged), which is dropped.
    fn on_step_event(&mut self, ev: StepEvent) -> Option<worker_message::Kind> {
        Some(match ev {
            StepEvent::Output {
                step_id,
                stream,
                data,
            } => {
                let h = self
                    .steps
                    .get_mut(&step_id)
                    .filter(|h| h.finished.is_none())?;
                let chunk = StepOutput {
                    step_id,
                    seq: h.next_seq,
                    stream: stream as i32,
                    data,
                };
                h.next_seq += 1;
                let memory_full = self.unacked_bytes >= WINDOW;
                self.unacked_bytes +=
                    h.unacked
                        .push(chunk.clone(), &spill_dir(&self.opts.basedir), memory_full);
                worker_message::Kind::Output(chunk)
            }
            StepEvent::Finished {
                step_id,
                end,
                timed_out,
                interrupted,
            } => {
                let h = self.steps.get_mut(&step_id)?;
                let status = match end {
                    StepEnd::Exited(c) => step_finished::Status::ExitCode(c),
                    StepEnd::Signalled(s) => step_finished::Status::Signal(s),
                    StepEnd::StartFailed(e) => step_finished::Status::StartError(e),
                };
                let f = StepFinished {
                    step_id,
                    last_seq: h.next_seq - 1,
                    status: Some(status),
                    timed_out,
                    interrupted,
                };
                h.finished = Some(f.clone());
                worker_message::Kind::Finished(f)
            }
        })
    }

    /// Kills every running step and waits (briefly) for them to end.
    async fn stop_all(&mut self) {
        for (id, d) in self.downloads.drain() {
            d.abandon();
            self.steps.remove(&id);
        }
        let running = self.steps.values().filter(|h| h.finished.is_none()).count();
        for h in self.steps.values() {
            h.interrupt.cancel();
        }
        let mut left = running;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while left > 0 {
            match tokio::time::timeout_at(deadline, self.events_rx.recv()).await {
                Ok(Some(StepEvent::Finished { .. })) => left -= 1,
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }
}

/// Output streams by number, for logs.
pub fn stream_name(s: i32) -> &'static str {
    match OutputStream::try_from(s) {
        Ok(OutputStream::Stdout) => "stdout",
        Ok(OutputStream::Stderr) => "stderr",
        _ => "output",
    }
}
