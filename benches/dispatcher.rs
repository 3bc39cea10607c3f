//! Benchmarks of the shared port, each against a baseline measured in the
//! same run on the same machine, reported as a ratio:
//!
//! 1. authenticated `ping` sessions per second (connect, SCRAM handshake, one
//!    echo, close; the client caches its SaltedPassword per salt) against a
//!    plain TCP connect, echo and close loop;
//! 2. resident memory per idle authenticated session of a real `switchyard
//!    master` process holding 10,000 sessions;
//! 3. echo round trips per second on one authenticated session against a raw
//!    TCP echo server.
//!
//! Run: `cargo bench --bench dispatcher` (add `-- quick` for a short run).
//! Everything talks to 127.0.0.1 only, and every loop is bounded in count and
//! time.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

mod support;
use support::{framed_echo, median, rate, switchyard_port};
use switchyard::auth::Verifier;
use switchyard::client::{self, Credentials};
use switchyard::services::ping;

struct Settings {
    rounds: usize,
    /// Per measurement: stop at this count or this time, whichever first.
    sessions: usize,
    echoes: usize,
    time_cap: Duration,
    idle_sessions: usize,
}

/// The baseline: a plain TCP server echoing bytes, one task per connection.
async fn plain_echo_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

async fn bench_sessions(s: &Settings) -> (f64, f64) {
    let (addr, _, _) = switchyard_port(None).await;
    let plain = plain_echo_port().await;
    let creds = Arc::new(Credentials::new("bench", "bench-pw"));
    let payload = Bytes::from_static(&[42u8; 64]);
    // Warm the client's SaltedPassword cache, as a real client's would be.
    client::connect(&addr, ping::NAME, &creds).await.unwrap();
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for _ in 0..s.rounds {
        let (a, c, p) = (addr.clone(), creds.clone(), payload.clone());
        ours.push(
            rate(4, s.sessions, s.time_cap, move || {
                let (a, c, p) = (a.clone(), c.clone(), p.clone());
                async move {
                    let mut session = client::connect(&a, ping::NAME, &c).await.unwrap();
                    framed_echo(&mut session.stream, &p).await;
                }
            })
            .await,
        );
        let (a, p) = (plain.clone(), payload.clone());
        base.push(
            rate(4, s.sessions, s.time_cap, move || {
                let (a, p) = (a.clone(), p.clone());
                async move {
                    let stream = TcpStream::connect(&a).await.unwrap();
                    stream.set_nodelay(true).unwrap();
                    let mut f = Framed::new(stream, LengthDelimitedCodec::new());
                    framed_echo(&mut f, &p).await;
                }
            })
            .await,
        );
    }
    (median(ours), median(base))
}

async fn bench_echo(s: &Settings) -> (f64, f64) {
    let (addr, _, _) = switchyard_port(None).await;
    let plain = plain_echo_port().await;
    let creds = Credentials::new("bench", "bench-pw");
    let payload = Bytes::from_static(&[42u8; 64]);
    let mut session = client::connect(&addr, ping::NAME, &creds).await.unwrap();
    let stream = TcpStream::connect(&plain).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut raw = Framed::new(stream, LengthDelimitedCodec::new());
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for _ in 0..s.rounds {
        // Ours, then the raw TCP echo.
        let start = Instant::now();
        let mut n = 0;
        while n < s.echoes && start.elapsed() < s.time_cap {
            framed_echo(&mut session.stream, &payload).await;
            n += 1;
        }
        ours.push(n as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        let mut n = 0;
        while n < s.echoes && start.elapsed() < s.time_cap {
            framed_echo(&mut raw, &payload).await;
            n += 1;
        }
        base.push(n as f64 / start.elapsed().as_secs_f64());
    }
    (median(ours), median(base))
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Starts a real master process, opens `n` idle sessions, and returns the
/// growth of its resident memory per session, in bytes.
async fn bench_idle_memory(n: usize) -> (f64, u64, u64) {
    let dir = std::env::temp_dir().join(format!("switchyard-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let v = Verifier::from_password(b"bench-pw", 4096).unwrap();
    std::fs::write(
        dir.join("master.toml"),
        format!(
            // Every bench client comes from 127.0.0.1: let 64 logins in
            // flight (and their stragglers) through the per-address cap.
            "[master]\nlisten = \"127.0.0.1:0\"\nsecrets = \"secrets.toml\"\nmax_connections = {}\nmax_unauthenticated_per_address = 1024\n\n[[user]]\nname = \"bench\"\nservices = [\"ping\"]\n",
            n + 100
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("secrets.toml"),
        format!("[verifiers]\nbench = {:?}\n", v.encode()),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["master", "--config"])
        .arg(dir.join("master.toml"))
        .env("RUST_LOG", "warn,switchyard::master=info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("master exited").unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines.by_ref() {});
    let creds = Arc::new(Credentials::new("bench", "bench-pw"));
    // Warm up: the runtime's threads and first allocations are not sessions.
    let mut warm = Vec::new();
    for _ in 0..200 {
        warm.push(client::connect(&addr, ping::NAME, &creds).await.unwrap());
    }
    drop(warm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    let mut sessions = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut pending = futures_util::stream::iter(0..n)
        .map(|_| {
            let (a, c) = (addr.clone(), creds.clone());
            async move { client::connect(&a, ping::NAME, &c).await }
        })
        .buffer_unordered(64);
    while let Some(s) = pending.next().await {
        sessions.push(s.expect("login"));
        assert!(
            Instant::now() < deadline,
            "opening {n} sessions took over 120 s"
        );
    }
    // Every session is live: one echo each would make them not idle, so
    // check a sample.
    for s in sessions.iter_mut().step_by(1000) {
        framed_echo(&mut s.stream, &Bytes::from_static(b"alive")).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid);
    let per = (after.saturating_sub(before) * 1024) as f64 / n as f64;
    drop(sessions);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    (per, before, after)
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let s = if quick {
        Settings {
            rounds: 1,
            sessions: 500,
            echoes: 5_000,
            time_cap: Duration::from_secs(3),
            idle_sessions: 2_000,
        }
    } else {
        Settings {
            rounds: 3,
            sessions: 5_000,
            echoes: 50_000,
            time_cap: Duration::from_secs(10),
            idle_sessions: 10_000,
        }
    };
    // 10,000 sessions need 10,000 descriptors on each side.
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (ours, base) = bench_sessions(&s).await;
        println!(
            "1. authenticated ping sessions/s: switchyard {ours:.0}, plain TCP {base:.0}, ratio {:.2} (target >= 0.5)",
            ours / base
        );
        let (per, before, after) = bench_idle_memory(s.idle_sessions).await;
        println!(
            "2. idle session memory: {per:.0} bytes/session over {} sessions (master RSS {before} KiB -> {after} KiB) (target <= 16384)",
            s.idle_sessions
        );
        let (ours, base) = bench_echo(&s).await;
        println!(
            "3. echo round trips/s on one session: switchyard {ours:.0}, raw TCP {base:.0}, ratio {:.2} (target >= 0.8)",
            ours / base
        );
    });
}
