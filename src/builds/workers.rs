//! The master's side of a worker session.
//!
//! A session starts with the worker's `WorkerHello`. A second login under a
//! name whose first session is still alive is refused; a first session that
//! does not answer a ping within a few seconds is replaced. Output chunks are
//! stored in batches (at most [`MAX_BATCH`] bytes or [`BATCH_DELAY`] old)
//! and acknowledged only once stored (written and synced). A batch is
//! written while the one before it syncs; while a batch waits for that,
//! the session reads nothing more, so a step that prints a gigabyte is
//! slowed to the disk's pace instead of filling the master's memory.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::BuildMaster;
use crate::dispatcher::Session;
use crate::proto::{
    Heartbeat, InterruptStep, MasterMessage, OutputAck, StepFinished, WorkerHello, WorkerMessage,
    master_message, worker_message,
};
use crate::store::{LogChunk, StateDb, now_ms};

/// Most output bytes stored in one batch.
pub const MAX_BATCH: usize = 2 * 1024 * 1024;
/// Longest a chunk waits to be stored.
pub const BATCH_DELAY: Duration = Duration::from_millis(20);
/// How long a live first session has to answer the ping that decides a
/// second login under its name.
const PROBE: Duration = Duration::from_secs(3);

/// A step's end as its session hands it to the build: the worker's report,
/// and the step's last output, not stored yet. The build stores that output
/// with the step's end (one durable write), then tells the worker it may
/// forget the step ([`finished_ack`]).
pub(crate) struct StepDone {
    pub(crate) finished: StepFinished,
    pub(crate) tail: Vec<LogChunk>,
}

pub(crate) struct PendingStep {
    pub(crate) build: i64,
    pub(crate) row: i64,
    pub(crate) done: oneshot::Sender<StepDone>,
    /// The session the step was sent on (`None` until it is sent). A worker
    /// that comes back without listing a step it confirmed has lost it.
    pub(crate) sent_on: Option<String>,
    /// What was sent, so that a step the worker never confirmed receiving
    /// can be sent again on its next session (`None` for a step carried over
    /// from before a master restart).
    pub(crate) start: Option<crate::proto::StartStep>,
    /// The worker confirmed receiving it (`StepAccepted`).
    pub(crate) confirmed: bool,
}

/// What a worker's builds hold on to across its sessions: its busy slots and
/// the steps it runs. A new session of the same worker takes them over, so a
/// link that blinks does not lose a build.
#[derive(Default)]
pub(crate) struct WorkerSlots {
    pub(crate) busy: AtomicUsize,
    pub(crate) pending: Mutex<HashMap<Vec<u8>, PendingStep>>,
}

/// A connected worker, as builds see it.
pub struct WorkerLink {
    pub name: String,
    pub session_id: String,
    pub hello: WorkerHello,
    pub connected_ms: i64,
    pub max_builds: usize,
    pub(crate) slots: Arc<WorkerSlots>,
    pub(crate) tx: mpsc::Sender<MasterMessage>,
    pub(crate) hangup: CancellationToken,
    last_heard_ms: AtomicI64,
    /// Set while a second login under this name probes this session: no
    /// step is sent to a session that may be dead.
    pub(crate) probing: std::sync::atomic::AtomicBool,
}

impl WorkerLink {
    pub fn running_builds(&self) -> usize {
        self.slots.busy.load(Ordering::SeqCst)
    }

    /// When the worker was last heard from (any message), Unix ms.
    pub fn last_heard_ms(&self) -> i64 {
        self.last_heard_ms.load(Ordering::SeqCst)
    }

    fn heard(&self) {
        self.last_heard_ms.store(now_ms(), Ordering::SeqCst);
    }

    /// Whether the worker answers a ping within [`PROBE`]. Nothing is
    /// dispatched to the session meanwhile.
    async fn answers_ping(&self) -> bool {
        self.probing.store(true, Ordering::SeqCst);
        let alive = self.ping().await;
        if alive {
            self.probing.store(false, Ordering::SeqCst);
        }
        alive
    }

    async fn ping(&self) -> bool {
        let asked = now_ms();
        let ping = MasterMessage {
            kind: Some(master_message::Kind::Heartbeat(Heartbeat {
                sent_unix_ms: asked as u64,
            })),
        };
        if self.tx.try_send(ping).is_err() {
            return false;
        }
        let deadline = tokio::time::Instant::now() + PROBE;
        while tokio::time::Instant::now() < deadline {
            if self.last_heard_ms.load(Ordering::SeqCst) >= asked {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    /// Tells the worker to kill the steps of these builds (all its steps when
    /// `builds` is `None`), ahead of anything else the session may do.
    pub(crate) fn interrupt_steps(&self, builds: Option<&[i64]>, reason: &str) {
        let pending = self.slots.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (step_id, p) in pending.iter() {
            if builds.is_none_or(|b| b.contains(&p.build)) {
                let msg = MasterMessage {
                    kind: Some(master_message::Kind::Interrupt(InterruptStep {
                        step_id: step_id.clone(),
                        reason: reason.to_string(),
                    })),
                };
                let _ = self.tx.try_send(msg);
            }
        }
    }

    /// Tells the worker to kill the step of this row, if it runs it.
    pub(crate) fn interrupt_row(&self, row: i64, reason: &str) -> bool {
        let pending = self.slots.pending.lock().unwrap_or_else(|e| e.into_inner());
        let Some(step_id) = pending
            .iter()
            .find(|(_, p)| p.row == row)
            .map(|(id, _)| id.clone())
        else {
            return false;
        };
        let msg = MasterMessage {
            kind: Some(master_message::Kind::Interrupt(InterruptStep {
                step_id,
                reason: reason.to_string(),
            })),
        };
        self.tx.try_send(msg).is_ok()
    }

    /// The build and row of a step this session's worker runs.
    fn row_of(&self, step_id: &[u8]) -> Option<(i64, i64)> {
        self.slots
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(step_id)
            .map(|p| (p.build, p.row))
    }
}

fn encode(msg: MasterMessage) -> Bytes {
    Bytes::from(msg.encode_to_vec())
}

/// Tells the worker a finished step is stored, output and end: it may
/// forget it.
pub(crate) fn finished_ack(step_id: Vec<u8>, last_seq: u64) -> MasterMessage {
    ack(step_id, last_seq, true)
}

fn ack(step_id: Vec<u8>, seq: u64, finished: bool) -> MasterMessage {
    MasterMessage {
        kind: Some(master_message::Kind::Ack(OutputAck {
            step_id,
            seq,
            finished,
        })),
    }
}

pub(crate) async fn serve(bm: BuildMaster, session: Session) {
    let heartbeat = session.heartbeat_interval;
    let name = session.user.clone();
    let session_id = session.id.clone();
    let peer = session.peer;
    let hangup = session.hangup.clone();
    let Session { stream, .. } = session;
    let (mut sink, mut stream) = stream.split();

    // The first message says what the worker is.
    let first =
        tokio::time::timeout(heartbeat.max(Duration::from_secs(5)) * 2, stream.next()).await;
    let hello = match first {
        Ok(Some(Ok(b))) => match WorkerMessage::decode(b.freeze()) {
            Ok(WorkerMessage {
                kind: Some(worker_message::Kind::Hello(h)),
            }) => h,
            _ => {
                tracing::warn!(worker = %name, %peer, "worker session did not start with WorkerHello; closing");
                return;
            }
        },
        _ => {
            tracing::warn!(worker = %name, %peer, "worker sent no WorkerHello in time; closing");
            return;
        }
    };
    let generation = bm.generation();
    if bm.lease_lost() {
        tracing::warn!(worker = %name, %peer, "refused a worker session: this master lost its lease on the shared database");
        return;
    }
    let Some(wc) = bm.inner.config().workers.get(&name).cloned() else {
        tracing::warn!(worker = %name, %peer, "refused worker session: not a [[worker]] in the config");
        return;
    };
    let existing = bm
        .inner
        .workers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&name)
        .cloned();
    if let Some(old) = existing {
        if old.answers_ping().await {
            tracing::warn!(worker = %name, %peer, live_session = %old.session_id, "refused a second login for a worker whose first session is alive");
            return;
        }
        tracing::warn!(worker = %name, %peer, old_session = %old.session_id, "the worker's previous session does not answer; replacing it");
        old.hangup.cancel();
    }

    let slots = bm.slots_for(&name);
    // Masters sharing a database: the steps the worker holds may be of
    // builds another master ran. Those whose master's lease has expired are
    // adopted now and re-attached below; while it has not, the worker is
    // sent away (it tries again) rather than told to stop them.
    if !bm
        .held_steps_are_ours(&name, &slots, &hello, heartbeat / 2)
        .await
    {
        tracing::warn!(worker = %name, %peer, "the worker holds steps of builds another master still owns (its lease has not expired); closing, the worker tries again");
        return;
    }
    let (tx, mut rx) = mpsc::channel::<MasterMessage>(1024);
    let link = Arc::new(WorkerLink {
        name: name.clone(),
        session_id: session_id.clone(),
        hello: hello.clone(),
        connected_ms: now_ms(),
        max_builds: wc.max_builds,
        slots: slots.clone(),
        tx,
        hangup: CancellationToken::new(),
        last_heard_ms: AtomicI64::new(now_ms()),
        probing: Default::default(),
    });
    {
        let mut workers = bm.inner.workers.lock().unwrap_or_else(|e| e.into_inner());
        // The lease this session began under was lost while it logged in:
        // its steps' builds are no longer this master's to run.
        if bm.generation() != generation || bm.lease_lost() {
            tracing::warn!(worker = %name, %peer, "refused a worker session: this master lost its lease while the worker logged in");
            return;
        }
        workers.insert(name.clone(), link.clone());
    }
    tracing::info!(worker = %name, %peer, session = %session_id, host = %hello.hostname, os = %hello.os, arch = %hello.arch, cpus = hello.cpus, version = %hello.version, "worker connected");
    bm.inner.emit(super::Event::WorkerConnected {
        worker: name.clone(),
        session_id: session_id.clone(),
    });

    // The steps the worker still holds: those a build is waiting for are
    // re-attached to this session (the worker replays what we did not
    // acknowledge); the others belong to builds that have ended: stop them
    // and let the worker forget them. A step we sent on an earlier session
    // that the worker does not list is lost (the worker restarted).
    {
        let mut pending = slots.pending.lock().unwrap_or_else(|e| e.into_inner());
        for held in &hello.steps {
            match pending.get_mut(&held.step_id) {
                Some(p) => {
                    tracing::info!(worker = %name, build = p.build, acked = held.acked_seq, finished = held.finished, "step re-attached after a reconnect");
                    p.sent_on = Some(session_id.clone());
                }
                None => {
                    let msg = if held.finished {
                        ack(held.step_id.clone(), u64::MAX, true)
                    } else {
                        MasterMessage {
                            kind: Some(master_message::Kind::Interrupt(InterruptStep {
                                step_id: held.step_id.clone(),
                                reason: "the master no longer runs this step's build".into(),
                            })),
                        }
                    };
                    let _ = link.tx.try_send(msg);
                }
            }
        }
        let listed: std::collections::HashSet<&[u8]> =
            hello.steps.iter().map(|h| &h.step_id[..]).collect();
        pending.retain(|step_id, p| {
            let missing =
                p.sent_on.as_ref().is_some_and(|s| s != &session_id) && !listed.contains(&step_id[..]);
            if !missing {
                return true;
            }
            // Never confirmed: it went to a session that was already dead.
            // Not lost: it starts now, on this session.
            if let (false, Some(start)) = (p.confirmed, &p.start) {
                tracing::info!(worker = %name, build = p.build, "a step sent to a previous session was never received; sending it again");
                p.sent_on = Some(session_id.clone());
                let _ = link.tx.try_send(MasterMessage {
                    kind: Some(master_message::Kind::Start(start.clone())),
                });
                return true;
            }
            tracing::warn!(worker = %name, build = p.build, "the worker came back without a step it was running: lost");
            false
        });
    }
    bm.wake();

    // The next output sequence number expected of each step: 1 for a step
    // sent on this session, one past what the master acknowledged for a
    // step re-attached. A chunk below it is a replay (stored once); above
    // it, a gap: the worker is broken, and the session ends.
    let mut expected: HashMap<Vec<u8>, u64> = hello
        .steps
        .iter()
        .map(|h| (h.step_id.clone(), h.acked_seq.saturating_add(1)))
        .collect();
    let mut logs = LogBatcher::new(bm.inner.state.clone(), bm.inner.events.clone());
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = tokio::time::Instant::now();
    // Made once, not on every turn of the loop: a timer made and dropped
    // for every frame read takes the runtime's timer lock twice a frame,
    // and the runtime's threads then queue on it (BENCHMARKS.md, issue 14).
    // The silence timer is moved on only when it goes off early; the
    // batch's when a new batch starts.
    let hung_up = hangup.requested();
    let replaced = link.hangup.clone().cancelled_owned();
    let silence = tokio::time::sleep_until(last_heard + heartbeat * 2);
    let batch_timer = tokio::time::sleep_until(logs.deadline);
    tokio::pin!(hung_up, replaced, silence, batch_timer);
    let mut batch_timer_at = logs.deadline;

    let reason: String = 'session: loop {
        let flush_now;
        let has_batch = logs.has_batch();
        if has_batch && batch_timer_at != logs.deadline {
            batch_timer_at = logs.deadline;
            batch_timer.as_mut().reset(batch_timer_at);
        }
        tokio::select! {
            _ = &mut hung_up => break 'session "the master hung up the session".into(),
            _ = &mut replaced => break 'session "hung up by an operator or replaced".into(),
            _ = &mut silence => {
                let due = last_heard + heartbeat * 2;
                if due > tokio::time::Instant::now() {
                    silence.as_mut().reset(due);
                    continue;
                }
                break 'session format!("no word from the worker for {:?} (two heartbeat intervals)", heartbeat * 2);
            }
            Some(msg) = rx.recv() => {
                if let Err(e) = sink.send(encode(msg)).await {
                    break 'session format!("link failed: {e}");
                }
                continue;
            }
            _ = tick.tick() => {
                let hb = MasterMessage { kind: Some(master_message::Kind::Heartbeat(Heartbeat { sent_unix_ms: now_ms() as u64 })) };
                if let Err(e) = sink.send(encode(hb)).await {
                    break 'session format!("link failed: {e}");
                }
                continue;
            }
            landed = logs.landed() => {
                if let Err(why) = send_acks(&mut sink, landed).await {
                    break 'session why;
                }
                continue;
            }
            _ = &mut batch_timer, if has_batch => flush_now = true,
            frame = stream.next() => {
                last_heard = tokio::time::Instant::now();
                link.heard();
                let bytes = match frame {
                    None => break 'session "the worker closed the session".into(),
                    Some(Err(e)) => break 'session format!("link failed: {e}"),
                    Some(Ok(b)) => b,
                };
                let kind = match WorkerMessage::decode(bytes.freeze()) {
                    Ok(WorkerMessage { kind: Some(k) }) => k,
                    _ => break 'session "the worker sent a message the master does not understand".into(),
                };
                match kind {
                    worker_message::Kind::Output(o) => match link.row_of(&o.step_id) {
                        Some((build, row)) => {
                            let next = expected.entry(o.step_id.clone()).or_insert(1);
                            if o.seq == 0 || o.seq > i64::MAX as u64 || o.seq > *next {
                                tracing::warn!(worker = %name, %peer, seq = o.seq, expected = *next, "the worker sent an output chunk out of sequence; closing its session");
                                break 'session format!("output chunk {} out of sequence (expected {})", o.seq, next);
                            }
                            if o.seq == *next {
                                *next += 1;
                            }
                            flush_now = logs.push(build, row, o)
                        }
                        None => {
                            // A step whose build has ended: let the worker forget the chunk.
                            if let Err(e) = sink.send(encode(ack(o.step_id, o.seq, false))).await {
                                break 'session format!("link failed: {e}");
                            }
                            continue;
                        }
                    },
                    worker_message::Kind::Finished(f) => {
                        expected.remove(&f.step_id);
                        let pending = link.slots.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&f.step_id);
                        let Some(p) = pending else {
                            // A step no build waits for: store its output, let it go.
                            if let Err(why) = send_acks(&mut sink, logs.drain().await).await {
                                break 'session why;
                            }
                            if let Err(e) = sink.send(encode(ack(f.step_id, f.last_seq, true))).await {
                                break 'session format!("link failed: {e}");
                            }
                            continue;
                        };
                        // Its output not yet stored goes with its end, in the
                        // build's write; what is already on its way lands first.
                        let tail = logs.take_step(p.row, &f.step_id);
                        if let Err(why) = send_acks(&mut sink, logs.settle().await).await {
                            break 'session why;
                        }
                        let _ = p.done.send(StepDone { finished: f, tail });
                        continue;
                    }
                    worker_message::Kind::Accepted(a) => {
                        if let Some(p) = link.slots.pending.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&a.step_id) {
                            p.confirmed = true;
                        }
                        continue;
                    }
                    worker_message::Kind::Wanted(w) => {
                        // Only the worker running the step gets its artifact;
                        // a download no build waits for any more is stopped.
                        if link.row_of(&w.step_id).is_none() {
                            let stop = MasterMessage {
                                kind: Some(master_message::Kind::Interrupt(InterruptStep {
                                    step_id: w.step_id,
                                    reason: "the master no longer runs this step's build".into(),
                                })),
                            };
                            if let Err(e) = sink.send(encode(stop)).await {
                                break 'session format!("link failed: {e}");
                            }
                            continue;
                        }
                        if let Some(data) = bm.inner.downloads.answer(w).await {
                            let msg = MasterMessage { kind: Some(master_message::Kind::Data(data)) };
                            if let Err(e) = sink.send(encode(msg)).await {
                                break 'session format!("link failed: {e}");
                            }
                        }
                        continue;
                    }
                    worker_message::Kind::Heartbeat(_) | worker_message::Kind::Hello(_) => continue,
                }
            }
        }
        if flush_now && let Err(why) = send_acks(&mut sink, logs.start().await).await {
            break 'session why;
        }
    };

    // Say what is queued (interrupts, above all) before hanging up.
    while let Ok(msg) = rx.try_recv() {
        if !matches!(
            tokio::time::timeout(Duration::from_secs(1), sink.send(encode(msg))).await,
            Ok(Ok(()))
        ) {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;

    // Leave the table (unless a newer session already took our place), and
    // fail the steps waiting on us: their builds end as `exception`.
    {
        let mut workers = bm.inner.workers.lock().unwrap_or_else(|e| e.into_inner());
        if workers.get(&name).is_some_and(|l| Arc::ptr_eq(l, &link)) {
            workers.remove(&name);
        }
    }
    // Its steps stay pending: the worker may come back and re-attach them
    // within the grace; after it, they are lost.
    let superseded = bm
        .inner
        .workers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(&name);
    if !superseded {
        bm.lose_steps_after_grace(name.clone(), session_id.clone(), slots.clone());
    }
    link.hangup.cancel();
    tracing::warn!(worker = %name, session = %session_id, reason = %reason, "worker lost");
    bm.inner.emit(super::Event::WorkerLost {
        worker: name,
        reason,
    });
    bm.wake();
}

type Acks = Vec<(Vec<u8>, u64)>;
type Landing = Pin<Box<dyn Future<Output = Result<Acks, String>> + Send>>;

/// Output on its way to disk: the batch being filled, and at most two
/// batches stored meanwhile: one syncing while the next is written (so
/// reading the worker, writing and syncing overlap). Batches are written
/// in order (the next starts once the one before is written) and land in
/// order; acknowledgements go out only for batches that have landed.
struct LogBatcher {
    state: Arc<StateDb>,
    /// Told of each batch that lands, per step: [`super::Event::OutputStored`].
    events: tokio::sync::broadcast::Sender<super::Stamped>,
    batch: Vec<LogChunk>,
    /// Bytes in the batch per (build, step row).
    per_step: HashMap<(i64, i64), u64>,
    bytes: usize,
    acks: HashMap<Vec<u8>, u64>,
    deadline: tokio::time::Instant,
    /// Oldest first, at most two.
    in_flight: std::collections::VecDeque<Flight>,
}

/// A batch being stored: told once written, resolved once landed.
struct Flight {
    written: Option<oneshot::Receiver<()>>,
    landing: Landing,
}

impl LogBatcher {
    fn new(state: Arc<StateDb>, events: tokio::sync::broadcast::Sender<super::Stamped>) -> Self {
        LogBatcher {
            state,
            events,
            per_step: HashMap::new(),
            batch: Vec::new(),
            bytes: 0,
            acks: HashMap::new(),
            deadline: tokio::time::Instant::now(),
            in_flight: Default::default(),
        }
    }

    fn has_batch(&self) -> bool {
        !self.batch.is_empty()
    }

    /// Adds a chunk; says whether the batch is full.
    fn push(&mut self, build: i64, row: i64, o: crate::proto::StepOutput) -> bool {
        if self.batch.is_empty() {
            self.deadline = tokio::time::Instant::now() + BATCH_DELAY;
        }
        self.bytes += o.data.len();
        *self.per_step.entry((build, row)).or_insert(0) += o.data.len() as u64;
        let seq = self.acks.entry(o.step_id).or_insert(0);
        *seq = (*seq).max(o.seq);
        self.batch.push(LogChunk {
            step: row,
            seq: o.seq,
            stream: o.stream,
            data: o.data,
        });
        self.bytes >= MAX_BATCH
    }

    /// Sends the batch to disk. First waits for the batch before it to be
    /// written (and, with two in flight, for the older to land); returns
    /// the acknowledgements of what landed meanwhile.
    async fn start(&mut self) -> Result<Acks, String> {
        let mut landed = Vec::new();
        while self.in_flight.len() >= 2 {
            let f = self.in_flight.pop_front().expect("two in flight");
            landed.extend(f.landing.await?);
        }
        if let Some(w) = self.in_flight.back_mut().and_then(|f| f.written.take()) {
            // An error ends its batch's landing too: that reports it.
            let _ = w.await;
        }
        if !self.batch.is_empty() {
            let chunks = std::mem::take(&mut self.batch);
            let acks: Acks = self.acks.drain().collect();
            let stored: Vec<((i64, i64), u64)> = self.per_step.drain().collect();
            self.bytes = 0;
            let state = self.state.clone();
            let events = self.events.clone();
            let (written, written_rx) = oneshot::channel();
            let mut write: Landing = Box::pin(async move {
                match state.append_logs_then(chunks, Some(written)).await {
                    Ok(()) => {
                        for ((build, step), bytes) in stored {
                            let _ = events.send(super::Stamped {
                                unix_ms: now_ms(),
                                event: super::Event::OutputStored { build, step, bytes },
                                elsewhere: false,
                            });
                        }
                        Ok(acks)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot store step output");
                        Err(format!("cannot store step output: {e}"))
                    }
                }
            });
            // Poll once now: that hands the batch to the writer thread.
            let waker = futures_util::task::noop_waker();
            if let std::task::Poll::Ready(r) = write
                .as_mut()
                .poll(&mut std::task::Context::from_waker(&waker))
            {
                landed.extend(r?);
                return Ok(landed);
            }
            self.in_flight.push_back(Flight {
                written: Some(written_rx),
                landing: write,
            });
        }
        Ok(landed)
    }

    /// Resolves when the oldest batch in flight has landed (never, if
    /// none).
    async fn landed(&mut self) -> Result<Acks, String> {
        match self.in_flight.front_mut() {
            Some(f) => {
                let r = (&mut f.landing).await;
                self.in_flight.pop_front();
                r
            }
            None => std::future::pending().await,
        }
    }

    /// Takes the chunks of one step (its row) out of the batch being
    /// filled, with their acknowledgement: whoever stores them acknowledges
    /// them.
    fn take_step(&mut self, row: i64, step_id: &[u8]) -> Vec<LogChunk> {
        let (mine, rest): (Vec<LogChunk>, Vec<LogChunk>) = std::mem::take(&mut self.batch)
            .into_iter()
            .partition(|c| c.step == row);
        self.batch = rest;
        self.per_step.retain(|(_, r), _| *r != row);
        self.bytes = self.batch.iter().map(|c| c.data.len()).sum();
        self.acks.remove(step_id);
        mine
    }

    /// Waits for the batches in flight, if any; returns their
    /// acknowledgements.
    async fn settle(&mut self) -> Result<Acks, String> {
        let mut acks = Vec::new();
        while let Some(f) = self.in_flight.pop_front() {
            acks.extend(f.landing.await?);
        }
        Ok(acks)
    }

    /// Stores everything received so far, and waits for it.
    async fn drain(&mut self) -> Result<Acks, String> {
        let mut acks = self.start().await?;
        acks.extend(self.settle().await?);
        Ok(acks)
    }
}

async fn send_acks<S>(sink: &mut S, acks: Result<Acks, String>) -> Result<(), String>
where
    S: futures_util::Sink<Bytes, Error = std::io::Error> + Unpin,
{
    let acks = acks?;
    if acks.is_empty() {
        return Ok(());
    }
    for (step_id, seq) in acks {
        sink.feed(encode(ack(step_id, seq, false)))
            .await
            .map_err(|e| format!("link failed: {e}"))?;
    }
    sink.flush().await.map_err(|e| format!("link failed: {e}"))
}
