//! The step host: one long-lived process per worker that starts every
//! step, so that a step costs one process start, not two.
//!
//! Lifecycle. The worker starts the host (`switchyard-step __step --parent
//! PID --host`) from its runtime thread the first time a step runs, and
//! keeps it. The host's standard input takes orders, one JSON line each
//! (an id, the command, its environment and directory, and the paths of
//! two FIFOs the worker made and opened for reading: the step's stdout and
//! stderr); its standard output answers, one line each: `started ID PID`,
//! `failed ID WHY`, then `ended ID STATUS` (the raw wait status). Each step
//! runs as the leader of a process group of its own, a child of the host.
//!
//! The guarantee is the per-step supervisor's ([`super::step::supervise`]):
//! no step outlives its worker, even one killed with -9. The kernel sends
//! the host SIGTERM when the worker dies (its parent-death signal); the host
//! then kills every step's group and exits. Its input closing (the worker
//! let go of it) does the same. If the host itself dies, the worker kills
//! the groups of the steps it had, which fail saying so, and starts another
//! host for the next step.
//!
//! The host is small on purpose: no async runtime, no logging. One thread
//! reads orders and starts steps; the main thread takes SIGCHLD and SIGTERM
//! (blocked, taken with sigwait, so none is missed).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncBufReadExt;
use tokio::sync::oneshot;

/// The most one order may take (its command and environment).
const MAX_ORDER: usize = 64 * 1024 * 1024;

/// What the worker tells the host to start.
#[derive(serde::Serialize, serde::Deserialize)]
struct Order {
    id: u64,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    dir: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
}

// ---------------------------------------------------------------- host side

/// The steps the host runs, by pid: their order's id and their process.
type Running = Arc<Mutex<HashMap<u32, (u64, std::process::Child)>>>;

/// Runs the host until the worker dies or lets it go; returns the exit
/// code.
pub fn serve(parent: i32) -> i32 {
    // SIGTERM and SIGCHLD blocked before any thread starts: every thread
    // inherits the mask, so both wait for the main thread's sigwait.
    let Some(signals) = super::step::watch_parent(parent) else {
        return 125;
    };
    let running: Running = Default::default();
    let answers = Arc::new(Mutex::new(std::io::stdout()));
    {
        let (running, answers) = (running.clone(), answers.clone());
        if std::thread::Builder::new()
            .spawn(move || {
                take_orders(&running, &answers);
                // The worker let go of the host: nothing may outlive it.
                kill_all(&running);
                std::process::exit(0);
            })
            .is_err()
        {
            return 125;
        }
    }
    loop {
        match signals.wait() {
            Ok(Signal::SIGTERM) => {
                kill_all(&running);
                return 137;
            }
            Ok(Signal::SIGCHLD) => {
                // Every step that has ended (one SIGCHLD may stand for
                // several). The lock is held while a step is started and
                // recorded, so one that ends at once is still found here.
                let mut running = running.lock().unwrap_or_else(|e| e.into_inner());
                let ended: Vec<(u32, u64, i32)> = running
                    .iter_mut()
                    .filter_map(|(pid, (id, child))| {
                        use std::os::unix::process::ExitStatusExt;
                        match child.try_wait() {
                            Ok(Some(s)) => Some((*pid, *id, s.into_raw())),
                            Ok(None) => None,
                            Err(_) => Some((*pid, *id, 125 << 8)),
                        }
                    })
                    .collect();
                for (pid, id, raw) in ended {
                    running.remove(&pid);
                    answer(&answers, &format!("ended {id} {raw}"));
                }
            }
            _ => {}
        }
    }
}

fn answer(answers: &Mutex<std::io::Stdout>, line: &str) {
    let mut out = answers.lock().unwrap_or_else(|e| e.into_inner());
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

fn kill_all(running: &Running) {
    let running = running.lock().unwrap_or_else(|e| e.into_inner());
    for pid in running.keys() {
        let _ = killpg(Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
}

/// Reads orders until the input ends, starting each.
fn take_orders(running: &Running, answers: &Mutex<std::io::Stdout>) {
    let mut input = std::io::stdin().lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        match std::io::Read::take(&mut input, MAX_ORDER as u64 + 1).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with(b"\n") => return, // over MAX_ORDER, or cut
            Ok(_) => {}
        }
        let Ok(order) = serde_json::from_slice::<Order>(&line) else {
            return; // not the worker speaking: stop
        };
        let id = order.id;
        if let Err(why) = start(order, running, answers) {
            answer(answers, &format!("failed {id} {}", why.replace('\n', " ")));
        }
    }
}

/// Starts one step, its output into the order's FIFOs, records it and
/// says so (before its end can be said: both under the same lock).
fn start(order: Order, running: &Running, answers: &Mutex<std::io::Stdout>) -> Result<(), String> {
    let Some((program, args)) = order.argv.split_first() else {
        return Err("the step has no command".into());
    };
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .map_err(|e| format!("cannot open the step's output {}: {e}", p.display()))
    };
    let (out, err) = (open(&order.stdout)?, open(&order.stderr)?);
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(&order.env)
        .current_dir(&order.dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let mut running = running.lock().unwrap_or_else(|e| e.into_inner());
    // (The standard library starts it with no signal blocked.)
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {program:?}: {e}"))?;
    let pid = child.id();
    running.insert(pid, (order.id, child));
    answer(answers, &format!("started {} {pid}", order.id));
    Ok(())
}

// -------------------------------------------------------------- worker side

/// The worker's handle on its step host, started on first use (from the
/// worker's runtime thread: the kernel's parent-death signal follows the
/// thread that started a process) and again after the host died.
#[derive(Clone)]
pub struct StepHost {
    program: PathBuf,
    fifo_dir: PathBuf,
    live: Arc<Mutex<Option<Arc<Connection>>>>,
}

/// A running host: its process, its input, and the steps waiting on it.
struct Connection {
    _process: tokio::process::Child,
    orders: tokio::sync::Mutex<tokio::process::ChildStdin>,
    next_id: AtomicU64,
    waiting: Arc<Mutex<HashMap<u64, Waiter>>>,
}

#[derive(Default)]
struct Waiter {
    started: Option<oneshot::Sender<Result<u32, String>>>,
    ended: Option<oneshot::Sender<i32>>,
}

/// A step the host started: its pid (its process group's id), its output,
/// and its end to come.
pub struct Hosted {
    pub pid: u32,
    pub stdout: Option<tokio::net::unix::pipe::Receiver>,
    pub stderr: Option<tokio::net::unix::pipe::Receiver>,
    ended: Option<oneshot::Receiver<i32>>,
    status: Option<i32>,
}

impl Hosted {
    /// Waits for the step's end (cancel-safe). An error: the host died
    /// first (the caller kills the step's group).
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        if let Some(raw) = self.status {
            return Ok(std::process::ExitStatus::from_raw(raw));
        }
        let Some(ended) = self.ended.as_mut() else {
            return Err(std::io::Error::other("the step host died"));
        };
        match ended.await {
            Ok(raw) => {
                self.status = Some(raw);
                self.ended = None;
                Ok(std::process::ExitStatus::from_raw(raw))
            }
            Err(_) => {
                self.ended = None;
                Err(std::io::Error::other("the step host died"))
            }
        }
    }
}

impl StepHost {
    /// Steps are started by `PROGRAM __step --parent PID --host`; their
    /// output FIFOs are made in `fifo_dir`.
    pub fn new(program: PathBuf, fifo_dir: PathBuf) -> Self {
        // FIFOs a previous run of this worker left (it died while starting
        // a step) go.
        let _ = std::fs::remove_dir_all(&fifo_dir);
        StepHost {
            program,
            fifo_dir,
            live: Default::default(),
        }
    }

    fn connection(&self) -> std::io::Result<Arc<Connection>> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = live.as_ref() {
            return Ok(c.clone());
        }
        let c = Arc::new(self.start()?);
        *live = Some(c.clone());
        Ok(c)
    }

    fn start(&self) -> std::io::Result<Connection> {
        let mut process = super::step::start_helper(&self.program, "--host", Stdio::null())?;
        let orders = process
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("the step host has no input"))?;
        let answers = process
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("the step host has no output"))?;
        let waiting: Arc<Mutex<HashMap<u64, Waiter>>> = Default::default();
        let live = self.live.clone();
        let reading = waiting.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(answers).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                dispatch(&reading, &line);
            }
            // The host is gone: the steps waiting on it learn so (their
            // senders drop), and the next step starts another.
            live.lock().unwrap_or_else(|e| e.into_inner()).take();
            reading.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        Ok(Connection {
            _process: process,
            orders: tokio::sync::Mutex::new(orders),
            next_id: AtomicU64::new(1),
            waiting,
        })
    }

    /// Starts a step on the host.
    pub async fn spawn(
        &self,
        argv: &[String],
        env: &BTreeMap<String, String>,
        dir: &Path,
    ) -> Result<Hosted, SpawnError> {
        use tokio::io::AsyncWriteExt;
        let conn = self.connection()?;
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        std::fs::create_dir_all(&self.fifo_dir)?;
        let fifo = |stream: &str| {
            self.fifo_dir
                .join(format!("{}-{id}.{stream}", std::process::id()))
        };
        let (out_path, err_path) = (fifo("out"), fifo("err"));
        let fifos = Fifos(vec![out_path.clone(), err_path.clone()]);
        for p in &fifos.0 {
            let _ = std::fs::remove_file(p);
            nix::unistd::mkfifo(
                p,
                nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
            )
            .map_err(|e| SpawnError::Unavailable(e.into()))?;
        }
        let open = |p: &Path| tokio::net::unix::pipe::OpenOptions::new().open_receiver(p);
        let (stdout, stderr) = (open(&out_path)?, open(&err_path)?);
        let (started_tx, started_rx) = oneshot::channel();
        let (ended_tx, ended_rx) = oneshot::channel();
        conn.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                Waiter {
                    started: Some(started_tx),
                    ended: Some(ended_tx),
                },
            );
        let order = Order {
            id,
            argv: argv.to_vec(),
            env: env.clone(),
            dir: dir.to_path_buf(),
            stdout: out_path,
            stderr: err_path,
        };
        let mut line = serde_json::to_vec(&order).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let sent = {
            let mut orders = conn.orders.lock().await;
            orders.write_all(&line).await.and(orders.flush().await)
        };
        let gone = || std::io::Error::other("the step host died before starting the step");
        if let Err(e) = sent {
            conn.waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            self.forget(&conn);
            return Err(SpawnError::Unavailable(std::io::Error::new(
                e.kind(),
                format!("the step host did not take the step: {e}"),
            )));
        }
        let pid = match started_rx.await {
            Ok(Ok(pid)) => pid,
            Ok(Err(why)) => return Err(SpawnError::Refused(why)),
            Err(_) => return Err(SpawnError::Unavailable(gone())),
        };
        drop(fifos); // both ends are open: the names can go
        Ok(Hosted {
            pid,
            stdout: Some(stdout),
            stderr: Some(stderr),
            ended: Some(ended_rx),
            status: None,
        })
    }

    /// Lets go of a host that no longer takes orders.
    fn forget(&self, conn: &Arc<Connection>) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            live.take();
        }
    }
}

/// Why a step was not started on the host.
#[derive(Debug)]
pub enum SpawnError {
    /// The host tried and could not (no such command, say): the step
    /// fails with this.
    Refused(String),
    /// The host could not be had, or died: the step may start otherwise.
    Unavailable(std::io::Error),
}

impl From<std::io::Error> for SpawnError {
    fn from(e: std::io::Error) -> Self {
        SpawnError::Unavailable(e)
    }
}

/// FIFO names removed when dropped.
struct Fifos(Vec<PathBuf>);

impl Drop for Fifos {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Hands one of the host's answers to the step it is about.
fn dispatch(waiting: &Mutex<HashMap<u64, Waiter>>, line: &str) {
    let mut words = line.splitn(3, ' ');
    let (Some(kind), Some(id), rest) = (words.next(), words.next(), words.next()) else {
        return;
    };
    let Ok(id) = id.parse::<u64>() else { return };
    let mut waiting = waiting.lock().unwrap_or_else(|e| e.into_inner());
    let Some(w) = waiting.get_mut(&id) else {
        return;
    };
    match kind {
        "started" => {
            if let (Some(tx), Some(Ok(pid))) = (w.started.take(), rest.map(str::parse::<u32>)) {
                let _ = tx.send(Ok(pid));
            }
        }
        "failed" => {
            if let Some(tx) = w.started.take() {
                let _ = tx.send(Err(rest.unwrap_or("the step could not start").to_string()));
            }
            waiting.remove(&id);
        }
        "ended" => {
            if let (Some(tx), Some(Ok(raw))) = (w.ended.take(), rest.map(str::parse::<i32>)) {
                let _ = tx.send(raw);
            }
            waiting.remove(&id);
        }
        _ => {}
    }
}
