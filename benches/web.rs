//! The web UI and the JSON API against a real `switchyard master` process
//! and a real worker on 127.0.0.1:
//!
//! 1. the home page and a build page with 100 builders and 100,000 builds
//!    in the database: request time (connect, request, whole answer; one
//!    request per HTTP/1 connection, as browsers' page loads here are) p50
//!    and p99, against the console's `builds` (`Debug.Builds`, the last 20
//!    builds with their steps, formatted as `debug --json builds`) on the
//!    same master, alternating, in one run;
//! 2. a line printed by a step to the same line arriving over Server-Sent
//!    Events (`/api/v1/builds/{id}/log/stream`), p50 and p99, against push
//!    to the first output line stored (the master's database polled) in
//!    the same run;
//! 3. a 1 GiB raw log download (`/api/v1/builds/{id}/log`) against reading
//!    the same stored log straight from its files (the store's reader), with the
//!    master's resident memory before and its peak during the download.
//!
//! Run: `cargo bench --bench web` (`-- quick` for a short run with a
//! 64 MiB log; `-- only 1,3` for some parts). Every loop is bounded in
//! count and time.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Request;

use support::{Proc, percentile, spawn_master, spawn_worker, status_kib};
use switchyard::proto::debug_client::DebugClient;
use switchyard::proto::{BuildsRequest, Change, ForceRequest, WatchRequest, debug_event};

const BUILDERS: usize = 100;
const BUILDS_EACH: usize = 1000;

struct Master {
    dir: PathBuf,
    addr: String,
    proc: Proc,
    _worker: Proc,
}

impl Drop for Master {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn basic() -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("admin:admin-pw")
    )
}

fn req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", basic().parse().unwrap());
    r
}

/// Fills a fresh state database with `BUILDERS` x `BUILDS_EACH` finished
/// builds of one step each, interleaved by builder; the last build's step
/// gets a 1,000-line log.
fn seed(path: &std::path::Path) -> i64 {
    drop(switchyard::store::StateDb::open(path).unwrap());
    let mut db = rusqlite::Connection::open(path).unwrap();
    let tx = db.transaction().unwrap();
    let t0: i64 = 1_700_000_000_000;
    let mut last = 0;
    {
        let mut request = tx
            .prepare("INSERT INTO build_requests (builder, reason, repository, branch, revision, created_ms) VALUES (?1, 'seeded', 'https://example.org/r.git', 'main', ?2, ?3)")
            .unwrap();
        let mut build = tx
            .prepare("INSERT INTO builds (request_id, builder, worker, started_ms, finished_ms, result, number) VALUES (?1, ?2, 'w1', ?3, ?4, ?5, ?6)")
            .unwrap();
        let mut link = tx
            .prepare("UPDATE build_requests SET build_id = ?1 WHERE id = ?2")
            .unwrap();
        let mut step = tx
            .prepare("INSERT INTO steps (build_id, position, name, attempt, step_id, on_lost, started_ms, finished_ms, result, exit_code) VALUES (?1, 0, 'compile', 1, ?2, 'fail', ?3, ?4, ?5, ?6)")
            .unwrap();
        for n in 1..=BUILDS_EACH {
            for b in 0..BUILDERS {
                let at = t0 + (n * BUILDERS + b) as i64 * 1000;
                let builder = format!("b{b:03}");
                let ok = (n + b) % 7 != 0;
                let result = if ok { "success" } else { "failure" };
                request
                    .execute(rusqlite::params![builder, format!("{n:040x}"), at])
                    .unwrap();
                let rid = tx.last_insert_rowid();
                build
                    .execute(rusqlite::params![
                        rid,
                        builder,
                        at,
                        at + 60_000,
                        result,
                        n as i64
                    ])
                    .unwrap();
                let bid = tx.last_insert_rowid();
                link.execute([bid, rid]).unwrap();
                step.execute(rusqlite::params![
                    bid,
                    bid.to_be_bytes().to_vec(),
                    at,
                    at + 59_000,
                    result,
                    if ok { 0 } else { 1 }
                ])
                .unwrap();
                last = bid;
            }
        }
        for b in 0..BUILDERS {
            tx.execute(
                "INSERT INTO builder_numbers (builder, last) VALUES (?1, ?2)",
                rusqlite::params![format!("b{b:03}"), BUILDS_EACH as i64],
            )
            .unwrap();
        }
        let row: i64 = tx
            .query_row("SELECT id FROM steps WHERE build_id = ?1", [last], |r| {
                r.get(0)
            })
            .unwrap();
        for seq in 1..=10i64 {
            let text: String = (0..100)
                .map(|i| {
                    format!(
                        "\x1b[32mok\x1b[0m line {} of the compiler's output\n",
                        seq * 100 + i
                    )
                })
                .collect();
            tx.execute(
                "INSERT INTO log_chunks (step, seq, stream, data) VALUES (?1, ?2, 1, ?3)",
                rusqlite::params![row, seq, text.into_bytes()],
            )
            .unwrap();
        }
    }
    tx.commit().unwrap();
    last
}

/// The step rows of a build.
fn step_rows(db: &rusqlite::Connection, build: i64) -> Vec<i64> {
    db.prepare("SELECT id FROM steps WHERE build_id = ?1")
        .and_then(|mut s| {
            s.query_map([build], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<i64>>>()
        })
        .unwrap_or_default()
}

fn start_master(tag: &str, log_bytes: u64, seeded: bool) -> (Master, i64) {
    let dir =
        std::env::temp_dir().join(format!("switchyard-web-bench-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = String::from(
        "[master]\nlisten = \"127.0.0.1:0\"\nsecrets = \"secrets.toml\"\n\n[[user]]\nname = \"admin\"\nservices = [\"debug\", \"change-source\"]\n\n[[worker]]\nname = \"w1\"\n",
    );
    if seeded {
        for b in 0..BUILDERS {
            config.push_str(&format!(
                "\n[[builder]]\nname = \"b{b:03}\"\nworkers = [\"w1\"]\n[[builder.step]]\nname = \"compile\"\ncommand = [\"true\"]\n"
            ));
        }
    }
    config.push_str(&format!(
        r#"
[[builder]]
name = "echo"
workers = ["w1"]
[[builder.step]]
name = "first"
shell = "echo first line"

[[builder]]
name = "ticks"
workers = ["w1"]
[[builder.step]]
name = "ticks"
shell = "for i in $(seq 1 300); do echo \"t $(date +%s%N)\"; sleep 0.01; done"

[[builder]]
name = "big"
workers = ["w1"]
[[builder.step]]
name = "print"
shell = "head -c {log_bytes} /dev/zero | tr '\\0' x"

[[scheduler]]
name = "latency"
builders = ["echo"]
branches = ["latency"]
"#
    ));
    std::fs::write(dir.join("master.toml"), config).unwrap();
    std::fs::write(
        dir.join("secrets.toml"),
        format!(
            "[verifiers]\nadmin = {:?}\nw1 = {:?}\n",
            support::verifier("admin-pw"),
            support::verifier("worker-pw")
        ),
    )
    .unwrap();
    let seeded_build = if seeded {
        seed(&dir.join("state.sqlite"))
    } else {
        0
    };
    let (proc, addr) = spawn_master(&dir);
    let worker = spawn_worker(&addr, "w1", &dir.join("basedir-w1"));
    (
        Master {
            dir,
            addr,
            proc,
            _worker: worker,
        },
        seeded_build,
    )
}

/// `GET path` on its own connection: the whole answer's size and how long
/// it took.
async fn get(addr: &str, path: &str) -> (usize, Duration) {
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
            basic()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut body = Vec::new();
    s.read_to_end(&mut body).await.unwrap();
    assert!(
        body.starts_with(b"HTTP/1.1 200"),
        "{path}: {}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    (body.len(), start.elapsed())
}

async fn connect_debug(addr: &str) -> DebugClient<tonic::transport::Channel> {
    DebugClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

async fn wait_worker(addr: &str) {
    let mut c = connect_debug(addr).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let w = c
            .workers(req(switchyard::proto::WorkersRequest {}))
            .await
            .unwrap()
            .into_inner();
        if w.workers.iter().any(|w| w.connected) {
            return;
        }
        assert!(Instant::now() < deadline, "the worker did not connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Pages {
    home: Vec<f64>,
    build: Vec<f64>,
    console: Vec<f64>,
    sizes: (usize, usize, usize),
}

async fn pages(rounds: usize) -> Pages {
    let (m, build) = start_master("pages", 1, true);
    wait_worker(&m.addr).await;
    let mut debug = connect_debug(&m.addr).await;
    let mut p = Pages {
        home: Vec::new(),
        build: Vec::new(),
        console: Vec::new(),
        sizes: (0, 0, 0),
    };
    let build_path = format!("/builds/{build}");
    for round in 0..rounds + 5 {
        let (home_size, home) = get(&m.addr, "/").await;
        let (build_size, b) = get(&m.addr, &build_path).await;
        let start = Instant::now();
        let reply = debug
            .builds(req(BuildsRequest {
                limit: 20,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let json: Vec<_> = reply
            .builds
            .iter()
            .map(switchyard::api::json::build_json)
            .collect();
        let text = serde_json::to_string_pretty(&json).unwrap();
        let console = start.elapsed();
        // The first rounds warm the caches.
        if round >= 5 {
            p.home.push(home.as_secs_f64() * 1000.0);
            p.build.push(b.as_secs_f64() * 1000.0);
            p.console.push(console.as_secs_f64() * 1000.0);
        }
        p.sizes = (home_size, build_size, text.len());
    }
    drop(m);
    p
}

/// The id of the next build that starts.
async fn next_started(events: &mut tonic::Streaming<switchyard::proto::DebugEvent>) -> i64 {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .expect("a build starts")
            .unwrap()
            .unwrap();
        if let Some(debug_event::Kind::BuildStarted(b)) = e.kind {
            return b.build;
        }
    }
}

struct Live {
    sse: Vec<f64>,
    stored: Vec<f64>,
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

async fn live(samples: usize) -> Live {
    let (m, _) = start_master("live", 1, false);
    wait_worker(&m.addr).await;
    let mut debug = connect_debug(&m.addr).await;
    let mut events = debug
        .watch(req(WatchRequest {}))
        .await
        .unwrap()
        .into_inner();
    // Baseline: push to first output stored, the database polled.
    let db = rusqlite::Connection::open_with_flags(
        m.dir.join("state.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut push =
        switchyard::grpc::client::ChangeSourceConnection::connect(&m.addr, "admin", "admin-pw")
            .await
            .unwrap();
    let mut stored = Vec::new();
    for i in 0..samples {
        let start = Instant::now();
        push.push(Change {
            repository: "r".into(),
            branch: "latency".into(),
            revision: format!("{i}"),
            ..Default::default()
        })
        .await
        .unwrap();
        let build = next_started(&mut events).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stored = step_rows(&db, build).iter().any(|row| {
                std::fs::metadata(m.dir.join(format!("logs/{}/{row}.idx", row / 1000)))
                    .is_ok_and(|m| m.len() > 0)
            });
            if stored {
                break;
            }
            assert!(Instant::now() < deadline, "no output stored");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        stored.push(start.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A step printing a timestamped line every 10 ms, read over SSE.
    debug
        .force(req(ForceRequest {
            builder: "ticks".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let build = next_started(&mut events).await;
    let mut s = tokio::net::TcpStream::connect(&m.addr).await.unwrap();
    s.write_all(
        format!(
            "GET /api/v1/builds/{build}/log/stream HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
            basic()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut sse = Vec::new();
    let mut pending = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = vec![0u8; 64 * 1024];
    'read: while Instant::now() < deadline {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .expect("SSE data")
            .unwrap();
        if n == 0 {
            break;
        }
        let at = now_ns();
        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            if event.contains("event: end") {
                break 'read;
            }
            for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
                    continue;
                };
                for line in v["text"].as_str().unwrap_or("").lines() {
                    if let Some(ts) = line.strip_prefix("t ").and_then(|t| t.parse::<u128>().ok()) {
                        sse.push((at.saturating_sub(ts)) as f64 / 1e6);
                    }
                }
            }
        }
    }
    assert!(sse.len() >= 250, "only {} lines arrived", sse.len());
    drop(m);
    Live { sse, stored }
}

struct Download {
    secs: f64,
    direct_secs: f64,
    bytes: u64,
    rss_before: u64,
    rss_peak: u64,
}

async fn download(log_bytes: u64) -> Download {
    let (m, _) = start_master("download", log_bytes, false);
    wait_worker(&m.addr).await;
    let mut debug = connect_debug(&m.addr).await;
    let mut events = debug
        .watch(req(WatchRequest {}))
        .await
        .unwrap()
        .into_inner();
    debug
        .force(req(ForceRequest {
            builder: "big".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let build = loop {
        let e = tokio::time::timeout(Duration::from_secs(600), events.next())
            .await
            .expect("the big build ends")
            .unwrap()
            .unwrap();
        if let Some(debug_event::Kind::BuildEnded(b)) = e.kind {
            assert_eq!(b.result, "success");
            break b.build;
        }
    };
    // Directly from the log files, through the store's reader.
    let start = Instant::now();
    let db = rusqlite::Connection::open_with_flags(
        m.dir.join("state.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let files = switchyard::store::logs::LogFiles::new(m.dir.join("logs"));
    let mut direct = 0u64;
    for row in step_rows(&db, build) {
        if let Some(r) = files.reader(row).unwrap() {
            let len = r.stats().bytes;
            let mut at = 0;
            while at < len {
                let to = (at + (1 << 20)).min(len);
                direct += r.read(at, to).unwrap().len() as u64;
                at = to;
            }
        }
    }
    let direct_secs = start.elapsed().as_secs_f64();
    assert_eq!(direct, log_bytes);
    // Through the API, the master's memory sampled meanwhile.
    let pid = m.proc.pid();
    let rss_before = status_kib(pid, "VmRSS:");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(status_kib(pid, "VmRSS:"));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(&m.addr).await.unwrap();
    s.write_all(
        format!(
            "GET /api/v1/builds/{build}/log HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
            basic()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    let mut head = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf))
            .await
            .expect("the download goes on")
            .unwrap();
        if n == 0 {
            break;
        }
        let mut data = &buf[..n];
        // The body's bytes only: the head says `text/plain`.
        if head.len() < 4 || !head.ends_with(b"\r\n\r\n") {
            let mut i = 0;
            while i < data.len() && !head.ends_with(b"\r\n\r\n") {
                head.push(data[i]);
                i += 1;
            }
            data = &data[i..];
        }
        got += data.iter().filter(|&&b| b == b'x').count() as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let rss_peak = sampler.join().unwrap();
    assert_eq!(got, log_bytes, "the whole log arrived");
    drop(m);
    Download {
        secs,
        direct_secs,
        bytes: log_bytes,
        rss_before,
        rss_peak,
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let (rounds, samples, log) = if quick {
        (50, 20, 64u64 << 20)
    } else {
        (300, 100, 1u64 << 30)
    };
    let args: Vec<String> = std::env::args().collect();
    let only: Option<Vec<u32>> = args
        .iter()
        .position(|a| a == "only")
        .and_then(|i| args.get(i + 1))
        .map(|l| l.split(',').filter_map(|n| n.parse().ok()).collect());
    let part = |n: u32| only.as_ref().is_none_or(|o| o.contains(&n));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if part(1) {
            let mut p = pages(rounds).await;
            let (h50, h99) = (percentile(&mut p.home, 0.5), percentile(&mut p.home, 0.99));
            let (b50, b99) = (percentile(&mut p.build, 0.5), percentile(&mut p.build, 0.99));
            let (c50, c99) = (percentile(&mut p.console, 0.5), percentile(&mut p.console, 0.99));
            println!(
                "1. {BUILDERS} builders, {} builds: home page p50 {h50:.2} ms, p99 {h99:.2} ms ({} bytes); build page p50 {b50:.2} ms, p99 {b99:.2} ms ({} bytes); console `builds` (--json) p50 {c50:.2} ms, p99 {c99:.2} ms ({} bytes); ratios home/console p50 {:.2}, p99 {:.2}; build/console p50 {:.2}, p99 {:.2} ({rounds} rounds, alternating)",
                BUILDERS * BUILDS_EACH,
                p.sizes.0,
                p.sizes.1,
                p.sizes.2,
                h50 / c50,
                h99 / c99,
                b50 / c50,
                b99 / c99
            );
        }
        if part(2) {
            let mut l = live(samples).await;
            let (s50, s99) = (percentile(&mut l.sse, 0.5), percentile(&mut l.sse, 0.99));
            let (p50, p99) = (percentile(&mut l.stored, 0.5), percentile(&mut l.stored, 0.99));
            println!(
                "2. a step's line to the same line over SSE: p50 {s50:.2} ms, p99 {s99:.2} ms ({} lines); push to first output stored: p50 {p50:.2} ms, p99 {p99:.2} ms ({samples} pushes); p99 ratio {:.2}",
                l.sse.len(),
                s99 / p99
            );
        }
        if part(3) {
            let d = download(log).await;
            let mib = d.bytes as f64 / (1 << 20) as f64;
            println!(
                "3. raw log download of {mib:.0} MiB: {:.2} s ({:.0} MiB/s); read straight from its files: {:.2} s ({:.0} MiB/s); ratio {:.2}; master RSS {} KiB before, peak {} KiB during",
                d.secs,
                mib / d.secs,
                d.direct_secs,
                mib / d.direct_secs,
                d.direct_secs / d.secs,
                d.rss_before,
                d.rss_peak
            );
        }
    });
}
