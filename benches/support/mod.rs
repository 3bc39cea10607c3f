//! What the benches share: real `switchyard` processes, killed when
//! dropped, their memory, and percentiles.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::auth::Verifier;

pub const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// A child process, killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// A field of `/proc/PID/status` in KiB (`VmRSS:`, `VmHWM:`).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// An encoded verifier for `password` (4096 iterations: benches log in
/// often).
pub fn verifier(password: &str) -> String {
    Verifier::from_password(password.as_bytes(), 4096)
        .unwrap()
        .encode()
}

/// Starts `switchyard master` on `dir/master.toml`; returns it and the
/// address it listens on.
pub fn spawn_master(dir: &Path) -> (Proc, String) {
    let mut child = Command::new(BIN)
        .args(["master", "--config"])
        .arg(dir.join("master.toml"))
        .env("RUST_LOG", "warn,switchyard::master=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("the master exited").unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines.by_ref() {});
    (Proc(child), addr)
}

/// Starts `switchyard worker NAME` (password `worker-pw`) against `addr`.
pub fn spawn_worker(addr: &str, name: &str, basedir: &Path) -> Proc {
    spawn_worker_args(addr, name, basedir, &[])
}

/// [`spawn_worker`] with more arguments (`--tls ...`).
pub fn spawn_worker_args(addr: &str, name: &str, basedir: &Path, args: &[&str]) -> Proc {
    Proc(
        Command::new(BIN)
            .args(["worker", "--master", addr, "--name", name, "--basedir"])
            .arg(basedir)
            .args(args)
            .env("SWITCHYARD_PASSWORD", "worker-pw")
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Runs `op` from `workers` tasks until `count` ops or `cap`; ops/s.
pub async fn rate<F, Fut>(workers: usize, count: usize, cap: Duration, op: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (op, done) = (op.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while start.elapsed() < cap
                && done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count
            {
                op().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = done.load(std::sync::atomic::Ordering::Relaxed).min(count);
    n as f64 / start.elapsed().as_secs_f64()
}

/// The shared port in this process, with `ping` and a user `bench`
/// (password `bench-pw`); with TLS if given. Its address, the port, and
/// the token that stops it.
pub async fn switchyard_port(
    tls: Option<switchyard::dispatcher::tls::TlsSettings>,
) -> (
    String,
    switchyard::dispatcher::Dispatcher,
    tokio_util::sync::CancellationToken,
) {
    use switchyard::dispatcher::{AccessPolicy, Dispatcher, Limits};
    let users = Arc::new(switchyard::auth::InMemoryChecker::new());
    users.insert("bench", Verifier::from_password(b"bench-pw", 4096).unwrap());
    let dispatcher = Dispatcher::new(
        Limits {
            max_connections: 50_000,
            ..Limits::default()
        },
        users,
        AccessPolicy::default().grant("bench", [switchyard::services::ping::NAME]),
    );
    dispatcher.set_tls(tls);
    let reg = dispatcher
        .registry()
        .register(
            switchyard::services::ping::NAME,
            Default::default(),
            switchyard::services::ping::serve,
        )
        .unwrap();
    std::mem::forget(reg); // the service stays for the whole bench
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (d, s) = (dispatcher.clone(), shutdown.clone());
    tokio::spawn(async move { d.serve(listener, s).await });
    (addr, dispatcher, shutdown)
}

/// Sends `payload` as one frame and waits for it to come back.
pub async fn framed_echo<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut tokio_util::codec::Framed<T, tokio_util::codec::LengthDelimitedCodec>,
    payload: &bytes::Bytes,
) {
    use futures_util::{SinkExt, StreamExt};
    stream.send(payload.clone()).await.unwrap();
    let back = stream.next().await.unwrap().unwrap();
    assert_eq!(back.len(), payload.len());
}

/// The machine's PostgreSQL server, as every test machine has it.
pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Runs SQL on that server's `test` database (making and dropping a
/// bench's own database).
pub async fn pg_admin(sql: &str) {
    let (client, conn) = tokio_postgres::connect(PG_ADMIN, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {PG_ADMIN}: {e}"));
    tokio::spawn(conn);
    client.batch_execute(sql).await.unwrap();
}
