//! The build master end to end, with a real `switchyard master` process and
//! real `switchyard worker` processes on 127.0.0.1:
//!
//! 1. trivial steps per second, with 1 and with 8 workers;
//! 2. latency from `PushChange` to the first output line being stored at the
//!    master (p50, p99), against a bare `ping` round trip in the same run,
//!    and the same for a step whose command and environment interpolate
//!    properties, pushes of both kinds alternating in one run;
//! 3. log ingest: a step writing 1 GiB (`head -c 1G /dev/zero`) against a raw
//!    TCP copy of the same bytes on loopback, with the master's peak memory;
//! 4. the worker's resident memory, idle and while streaming that 1 GiB;
//! 5. an incremental git-step build of a 1,000-commit repository after one
//!    new commit, push to build end, against `git fetch && git checkout` run
//!    by hand in a clone of the same repository, alternating, in one run;
//! 7. an upload step sending a 1 GiB file (random bytes) to the master,
//!    its duration as the master records it, against a raw TCP copy of as
//!    many bytes on loopback (medians of alternating rounds); then a
//!    download of it to another builder's step;
//! 6. trivial steps per second with one worker, steps under their
//!    supervisor against the same with the supervisor switched off
//!    (`worker --bench-unsupervised-steps`), alternating rounds.
//!
//! Run: `cargo bench --bench builds` (add `-- quick` for a short run with a
//! 64 MiB log, `-- only 2,5` for some parts). Every loop is bounded in count
//! and time.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use tonic::Request;
use tonic::metadata::MetadataValue;

use switchyard::client::{self, Credentials};
use switchyard::proto::debug_client::DebugClient;
use switchyard::proto::{
    Change, DebugEvent, ForceRequest, WatchRequest, WorkersRequest, debug_event,
};

mod support;
use support::{Proc, percentile, spawn_master, spawn_worker_args, status_kib};

struct Master {
    dir: PathBuf,
    addr: String,
    proc: Proc,
    workers: Vec<Proc>,
}

const BUILDERS: &str = r#"
[[builder]]
name = "trivial"
workers = ["w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8"]
[[builder.step]]
name = "a"
command = ["true"]
[[builder.step]]
name = "b"
command = ["true"]
[[builder.step]]
name = "c"
command = ["true"]
[[builder.step]]
name = "d"
command = ["true"]

[[builder]]
name = "echo"
workers = ["w1"]
[[builder.step]]
name = "first"
shell = "echo first line"

[[builder]]
name = "echo-props"
workers = ["w1"]
[[builder.step]]
name = "first"
shell = "echo %(prop:branch)s %(prop:revision)s %(prop:worker_os)s %(prop:channel)s %(prop:missing:-none)s"
env = { BUILD_TAG = "%(prop:builder)s-%(prop:build_number)s", CHANNEL = "%(prop:channel)s" }

[[builder]]
name = "checkout"
workers = ["w1"]
[[builder.step]]
name = "git"
git = { repository = "%(prop:repository)s", mode = "incremental" }

[[scheduler]]
name = "latency"
builders = ["echo"]
branches = ["latency"]

[[scheduler]]
name = "latency-props"
builders = ["echo-props"]
branches = ["latency-props"]
[scheduler.properties]
channel = "stable"

[[scheduler]]
name = "checkout"
builders = ["checkout"]
branches = ["main"]
"#;

fn start_master(tag: &str, workers: usize, log_bytes: u64) -> Master {
    start_master_with(tag, workers, log_bytes, &[])
}

/// [`start_master`], its workers started with `worker_args`.
fn start_master_with(tag: &str, workers: usize, log_bytes: u64, worker_args: &[&str]) -> Master {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-builds-bench-{}-{tag}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = String::from(
        "[master]\nlisten = \"127.0.0.1:0\"\nsecrets = \"secrets.toml\"\n\n[[user]]\nname = \"admin\"\nservices = [\"debug\", \"change-source\", \"ping\"]\n",
    );
    let mut secrets = String::from("[verifiers]\n");
    secrets.push_str(&format!("admin = {:?}\n", support::verifier("admin-pw")));
    for i in 1..=8 {
        config.push_str(&format!("\n[[worker]]\nname = \"w{i}\"\n"));
        secrets.push_str(&format!("w{i} = {:?}\n", support::verifier("worker-pw")));
    }
    config.push_str(BUILDERS);
    config.push_str(&format!(
        "\n[[builder]]\nname = \"big\"\nworkers = [\"w1\"]\n[[builder.step]]\nname = \"print\"\nshell = \"head -c {log_bytes} /dev/zero\"\n"
    ));
    config.push_str(&format!(
        "\n[[builder]]\nname = \"upload\"\nworkers = [\"w1\"]\n[[builder.step]]\nname = \"make\"\nshell = \"head -c {log_bytes} /dev/urandom > big\"\n[[builder.step]]\nname = \"send\"\nupload = {{ source = \"big\", name = \"big\" }}\n\n[[builder]]\nname = \"fetch\"\nworkers = [\"w1\"]\n[[builder.step]]\nname = \"get\"\ndownload = {{ name = \"big\", from = \"latest-success:upload\", dest = \"big\" }}\n"
    ));
    std::fs::write(dir.join("master.toml"), config).unwrap();
    std::fs::write(dir.join("secrets.toml"), secrets).unwrap();
    let (proc, addr) = spawn_master(&dir);
    let procs = (1..=workers)
        .map(|i| {
            spawn_worker_args(
                &addr,
                &format!("w{i}"),
                &dir.join(format!("basedir-w{i}")),
                worker_args,
            )
        })
        .collect();
    Master {
        dir,
        addr,
        proc,
        workers: procs,
    }
}

fn auth() -> MetadataValue<tonic::metadata::Ascii> {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("admin:admin-pw")
    )
    .parse()
    .unwrap()
}

fn req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", auth());
    r
}

async fn debug_client(addr: &str) -> DebugClient<tonic::transport::Channel> {
    DebugClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

async fn wait_workers(client: &mut DebugClient<tonic::transport::Channel>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let w = client
            .workers(req(WorkersRequest {}))
            .await
            .unwrap()
            .into_inner();
        if w.workers.iter().filter(|w| w.connected).count() >= n {
            return;
        }
        assert!(Instant::now() < deadline, "workers did not connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn watch(
    client: &mut DebugClient<tonic::transport::Channel>,
) -> tonic::Streaming<DebugEvent> {
    client
        .watch(req(WatchRequest {}))
        .await
        .unwrap()
        .into_inner()
}

/// Waits for `n` builds to end; returns how many succeeded.
async fn builds_ended(events: &mut tonic::Streaming<DebugEvent>, n: usize, cap: Duration) -> usize {
    let (mut ended, mut ok) = (0, 0);
    let deadline = tokio::time::Instant::now() + cap;
    while ended < n {
        let Ok(Some(Ok(e))) = tokio::time::timeout_at(deadline, events.next()).await else {
            panic!("only {ended} of {n} builds ended in time")
        };
        if let Some(debug_event::Kind::BuildEnded(b)) = e.kind {
            ended += 1;
            ok += (b.result == "success") as usize;
        }
    }
    ok
}

async fn steps_per_second(workers: usize, builds: usize) -> f64 {
    steps_per_second_with(workers, builds, &[]).await
}

/// [`steps_per_second`], the workers started with `worker_args`.
async fn steps_per_second_with(workers: usize, builds: usize, worker_args: &[&str]) -> f64 {
    let tag = format!("steps{workers}{}", worker_args.len());
    let m = start_master_with(&tag, workers, 1, worker_args);
    let mut client = debug_client(&m.addr).await;
    wait_workers(&mut client, workers).await;
    let mut events = watch(&mut client).await;
    let start = Instant::now();
    for _ in 0..builds {
        client
            .force(req(ForceRequest {
                builder: "trivial".into(),
                ..Default::default()
            }))
            .await
            .unwrap();
    }
    let ok = builds_ended(&mut events, builds, Duration::from_secs(300)).await;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(ok, builds, "every trivial build succeeds");
    let _ = std::fs::remove_dir_all(&m.dir);
    (builds * 4) as f64 / secs
}

/// Once `m`'s worker is connected: a console client, its event stream,
/// and a change-source connection to push with.
async fn pushing(
    m: &Master,
) -> (
    DebugClient<tonic::transport::Channel>,
    tonic::Streaming<DebugEvent>,
    switchyard::grpc::client::ChangeSourceConnection,
) {
    let mut client = debug_client(&m.addr).await;
    wait_workers(&mut client, 1).await;
    let events = watch(&mut client).await;
    let push =
        switchyard::grpc::client::ChangeSourceConnection::connect(&m.addr, "admin", "admin-pw")
            .await
            .unwrap();
    (client, events, push)
}

/// Push-to-first-output latencies in ms, plain then with properties.
struct Latency {
    plain: Vec<f64>,
    props: Vec<f64>,
    ping: Vec<f64>,
}

async fn latency(samples: usize) -> Latency {
    let m = start_master("latency", 1, 1);
    let (_client, mut events, mut push) = pushing(&m).await;
    let db = rusqlite::Connection::open_with_flags(
        m.dir.join("state.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let logs_dir = m.dir.join("logs");
    let (mut plain, mut props) = (Vec::new(), Vec::new());
    // Alternating, so both kinds see the same machine.
    for i in 0..samples * 2 {
        let with_props = i % 2 == 1;
        let start = Instant::now();
        push.push(Change {
            repository: "r".into(),
            branch: if with_props {
                "latency-props"
            } else {
                "latency"
            }
            .into(),
            revision: format!("{i}"),
            ..Default::default()
        })
        .await
        .unwrap();
        let build = loop {
            let e = tokio::time::timeout(Duration::from_secs(30), events.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Some(debug_event::Kind::BuildStarted(b)) = e.kind {
                break b.build;
            }
        };
        // Poll the master's log files for the first stored output chunk
        // (its index record).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let rows: Vec<i64> = db
                .prepare("SELECT id FROM steps WHERE build_id = ?1")
                .and_then(|mut s| {
                    s.query_map([build], |r| r.get(0))?
                        .collect::<rusqlite::Result<Vec<i64>>>()
                })
                .unwrap_or_default();
            let stored = rows.iter().any(|row| {
                std::fs::metadata(logs_dir.join(format!("{}/{row}.idx", row / 1000)))
                    .is_ok_and(|m| m.len() > 0)
            });
            if stored {
                break;
            }
            assert!(Instant::now() < deadline, "no output stored");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        if with_props { &mut props } else { &mut plain }.push(ms);
        assert_eq!(
            builds_ended(&mut events, 1, Duration::from_secs(30)).await,
            1,
            "the build succeeds"
        );
    }
    // Baseline: a bare ping round trip on an authenticated session.
    let mut session = client::connect(&m.addr, "ping", &Credentials::new("admin", "admin-pw"))
        .await
        .unwrap();
    let mut ping = Vec::new();
    for _ in 0..samples * 10 {
        let start = Instant::now();
        session
            .stream
            .send(bytes::Bytes::from_static(b"ping"))
            .await
            .unwrap();
        session.stream.next().await.unwrap().unwrap();
        ping.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = std::fs::remove_dir_all(&m.dir);
    Latency { plain, props, ping }
}

/// Runs git with `args` in `dir`; panics on failure.
fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.org")
        .env("GIT_COMMITTER_NAME", "Bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.org")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A bare repository of `commits` commits on `main` over `files` files
/// (each commit changes three), made with `git fast-import`.
fn make_repository(bare: &std::path::Path, commits: usize, files: usize) {
    git(
        bare.parent().unwrap(),
        &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()],
    );
    let mut stream = String::new();
    for c in 1..=commits {
        let msg = format!("commit {c}");
        stream.push_str(&format!(
            "commit refs/heads/main\ncommitter Bench <bench@example.org> {} +0000\ndata {}\n{msg}\n",
            1_700_000_000 + c,
            msg.len()
        ));
        let touched: Vec<usize> = if c == 1 {
            (0..files).collect()
        } else {
            (0..3).map(|k| (c * 7 + k * 131) % files).collect()
        };
        for f in touched {
            let body = format!("file {f}, version {c}\n").repeat(64);
            stream.push_str(&format!(
                "M 100644 inline src/dir{}/file{f}.txt\ndata {}\n{body}\n",
                f % 20,
                body.len()
            ));
        }
    }
    let mut child = Command::new("git")
        .args(["fast-import", "--quiet"])
        .current_dir(bare)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stream.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

fn median(v: &mut [f64]) -> f64 {
    percentile(v, 0.5)
}

/// Incremental git-step builds vs `git fetch && git checkout` by hand, in
/// ms (medians), over `rounds` new commits.
async fn checkout(rounds: usize) -> Checkout {
    let m = start_master("checkout", 1, 1);
    let bare = m.dir.join("widgets.git");
    make_repository(&bare, 1000, 2000);
    let dev = m.dir.join("dev");
    let hand = m.dir.join("hand");
    git(
        &m.dir,
        &["clone", "-q", bare.to_str().unwrap(), dev.to_str().unwrap()],
    );
    git(
        &m.dir,
        &[
            "clone",
            "-q",
            bare.to_str().unwrap(),
            hand.to_str().unwrap(),
        ],
    );
    let (_client, mut events, mut push) = pushing(&m).await;
    let mut build = async |rev: &str| {
        let start = Instant::now();
        let pushed_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        push.push(Change {
            repository: bare.to_str().unwrap().into(),
            branch: "main".into(),
            revision: rev.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(
            builds_ended(&mut events, 1, Duration::from_secs(120)).await,
            1,
            "the checkout build succeeds"
        );
        (start.elapsed().as_secs_f64() * 1000.0, pushed_ms)
    };
    // The first build clones: not what is measured.
    let head = git(&dev, &["rev-parse", "HEAD"]);
    build(head.trim()).await;
    let (mut ours, mut by_hand, mut pushed) = (Vec::new(), Vec::new(), Vec::new());
    let mut ours_push = |(ms, at): (f64, i64)| {
        ours.push(ms);
        pushed.push(at);
    };
    for r in 0..rounds {
        let file = dev.join(format!("src/dir{}/file{}.txt", r % 20, r * 20 + r % 20));
        std::fs::write(&file, format!("round {r}\n")).unwrap();
        git(&dev, &["commit", "-q", "-am", &format!("round {r}")]);
        git(&dev, &["push", "-q", "origin", "main"]);
        let rev = git(&dev, &["rev-parse", "HEAD"]).trim().to_string();
        let hand_run = |rev: &str| {
            let start = Instant::now();
            git(&hand, &["fetch", "-q", "origin"]);
            git(&hand, &["checkout", "-q", rev]);
            start.elapsed().as_secs_f64() * 1000.0
        };
        // Alternate which goes first.
        if r % 2 == 0 {
            by_hand.push(hand_run(&rev));
            ours_push(build(&rev).await);
        } else {
            ours_push(build(&rev).await);
            by_hand.push(hand_run(&rev));
        }
        let checked_out = std::fs::read_to_string(
            m.dir
                .join("basedir-w1/checkout")
                .join(file.strip_prefix(&dev).unwrap()),
        )
        .unwrap();
        assert_eq!(
            checked_out,
            format!("round {r}\n"),
            "the build checked out the new commit"
        );
    }
    // Where a build's time goes, from the master's own records (ms):
    // push to build start, build start to step start, the step, step end
    // to build end. The first (cloning) build is left out.
    let db = rusqlite::Connection::open_with_flags(
        m.dir.join("state.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut parts: [Vec<f64>; 4] = Default::default();
    let mut durations = Vec::new();
    let mut q = db
        .prepare(
            "SELECT b.started_ms, s.started_ms, s.finished_ms, b.finished_ms FROM builds b JOIN steps s ON s.build_id = b.id WHERE b.builder = 'checkout' ORDER BY b.id",
        )
        .unwrap();
    let rows: Vec<[i64; 4]> = q
        .query_map([], |r| Ok([r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?]))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (row, at) in rows.iter().skip(1).zip(&pushed) {
        let marks = [*at, row[0], row[1], row[2], row[3]];
        for (i, part) in parts.iter_mut().enumerate() {
            part.push((marks[i + 1] - marks[i]) as f64);
        }
        durations.push((row[3] - row[0]) as f64);
    }
    let ratios: Vec<f64> = ours.iter().zip(&by_hand).map(|(o, h)| o / h).collect();
    let out = Checkout {
        build: median(&mut ours),
        hand: median(&mut by_hand),
        ratio_of_rounds: median(&mut ratios.clone()),
        parts: parts.map(|mut p| median(&mut p)),
        duration: median(&mut durations),
    };
    let _ = std::fs::remove_dir_all(&m.dir);
    out
}

/// Medians of the git-step measurement, in ms.
struct Checkout {
    build: f64,
    hand: f64,
    ratio_of_rounds: f64,
    /// Push to build start, build start to step start, the step itself,
    /// step end to build end.
    parts: [f64; 4],
    /// The build's own duration, as the master records it (start to end).
    duration: f64,
}

/// Copies `bytes` from `head -c` through a loopback TCP connection to a
/// reader that discards them; returns seconds.
fn raw_tcp_copy(bytes: u64) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
        total
    });
    let start = Instant::now();
    let mut head = Command::new("head")
        .args(["-c", &bytes.to_string(), "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = head.stdout.take().unwrap();
    let mut conn = TcpStream::connect(addr).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        conn.write_all(&buf[..n]).unwrap();
    }
    drop(conn);
    let total = sink.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    let _ = head.wait();
    assert_eq!(total, bytes);
    secs
}

struct Ingest {
    secs: f64,
    stored: i64,
    master_rss_before: u64,
    master_peak: u64,
    worker_idle: u64,
    worker_peak: u64,
}

async fn ingest(bytes: u64) -> Ingest {
    let m = start_master("ingest", 1, bytes);
    let mut client = debug_client(&m.addr).await;
    wait_workers(&mut client, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let master_rss_before = status_kib(m.proc.pid(), "VmRSS:");
    let worker_pid = m.workers[0].pid();
    let worker_idle = status_kib(worker_pid, "VmRSS:");
    let mut events = watch(&mut client).await;
    let start = Instant::now();
    client
        .force(req(ForceRequest {
            builder: "big".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let mut worker_peak = worker_idle;
    let mut done = Box::pin(builds_ended(&mut events, 1, Duration::from_secs(900)));
    loop {
        tokio::select! {
            ok = &mut done => { assert_eq!(ok, 1, "the big build succeeds"); break; }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                worker_peak = worker_peak.max(status_kib(worker_pid, "VmRSS:"));
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let master_peak = status_kib(m.proc.pid(), "VmHWM:");
    worker_peak = worker_peak.max(status_kib(worker_pid, "VmHWM:"));
    let db = rusqlite::Connection::open_with_flags(
        m.dir.join("state.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let stored: i64 = db
        .query_row("SELECT COALESCE(SUM(log_bytes), 0) FROM steps", [], |r| {
            r.get(0)
        })
        .unwrap();
    drop(db);
    drop(m.workers);
    drop(m.proc);
    let _ = std::fs::remove_dir_all(&m.dir);
    Ingest {
        secs,
        stored,
        master_rss_before,
        master_peak,
        worker_idle,
        worker_peak,
    }
}

/// The duration of a build's step as the master recorded it, and the
/// build's result, once `builder`'s build has ended.
async fn run_and_time(
    client: &mut DebugClient<tonic::transport::Channel>,
    builder: &str,
    step: usize,
) -> (f64, String) {
    let mut events = watch(client).await;
    client
        .force(req(ForceRequest {
            builder: builder.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    builds_ended(&mut events, 1, Duration::from_secs(900)).await;
    let b = client
        .builds(req(switchyard::proto::BuildsRequest {
            builder: builder.into(),
            limit: 1,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .builds
        .remove(0);
    let s = &b.steps[step];
    let secs = (s.finished_unix_ms - s.started_unix_ms) as f64 / 1000.0;
    (secs, b.result)
}

/// Runs the `upload` builder `rounds` times, each after a raw TCP copy of
/// as many bytes (alternating, as part 3 does), then the `fetch` builder
/// once, which downloads the last upload to the worker: each step's
/// duration as the master recorded it, the build's result, and the raw
/// copies' durations.
async fn upload(bytes: u64, rounds: usize) -> (Vec<(f64, String)>, (f64, String), Vec<f64>) {
    let m = start_master("upload", 1, bytes);
    let mut client = debug_client(&m.addr).await;
    wait_workers(&mut client, 1).await;
    let (mut ups, mut raws) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        raws.push(raw_tcp_copy(bytes));
        ups.push(run_and_time(&mut client, "upload", 1).await);
    }
    let down = run_and_time(&mut client, "fetch", 0).await;
    drop(m.workers);
    drop(m.proc);
    let _ = std::fs::remove_dir_all(&m.dir);
    (ups, down, raws)
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let (builds_1, builds_8, samples, log, rounds) = if quick {
        (25, 50, 20, 64u64 << 20, 10)
    } else {
        (150, 400, 100, 1u64 << 30, 40)
    };
    let rounds_3 = if quick { 1 } else { 3 };
    // Only some parts: `-- only 2,5`.
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
            let one = steps_per_second(1, builds_1).await;
            let eight = steps_per_second(8, builds_8).await;
            println!("1. trivial steps/s end to end: 1 worker {one:.0}, 8 workers {eight:.0} ({builds_1} and {builds_8} builds of 4 `true` steps)");
        }
        if part(2) {
            let mut l = latency(samples).await;
            let (p50, p99) = (percentile(&mut l.plain, 0.5), percentile(&mut l.plain, 0.99));
            let (q50, q99) = (percentile(&mut l.props, 0.5), percentile(&mut l.props, 0.99));
            let (ping50, ping99) = (percentile(&mut l.ping, 0.5), percentile(&mut l.ping, 0.99));
            println!(
                "2. PushChange -> first output line stored: p50 {p50:.2} ms, p99 {p99:.2} ms; with properties and interpolation p50 {q50:.2} ms, p99 {q99:.2} ms (p99 ratio {:.2}, p50 ratio {:.2}); bare ping round trip p50 {ping50:.3} ms, p99 {ping99:.3} ms ({samples} samples of each, alternating)",
                q99 / p99,
                q50 / p50
            );
        }
        if part(3) || part(4) {
            // Alternating rounds, medians: the raw copy alone swings by
            // half from one run to the next on a shared machine.
            let (mut raws, mut ingests) = (Vec::new(), Vec::new());
            for _ in 0..rounds_3 {
                raws.push(raw_tcp_copy(log));
                ingests.push(ingest(log).await);
            }
            let raw = support::median(raws.clone());
            let secs = support::median(ingests.iter().map(|i| i.secs).collect());
            let mib = log as f64 / (1 << 20) as f64;
            let i = &ingests[0];
            println!(
                "3. log ingest of {mib:.0} MiB: switchyard {secs:.2} s ({:.0} MiB/s, {} bytes stored), raw TCP copy {raw:.2} s ({:.0} MiB/s), ratio {:.3} (medians of {rounds_3} alternating rounds; switchyard {:.2?} s, raw {:.2?} s); master RSS {} KiB before, peak {} KiB",
                mib / secs,
                i.stored,
                mib / raw,
                raw / secs,
                ingests.iter().map(|i| i.secs).collect::<Vec<_>>(),
                raws,
                i.master_rss_before,
                ingests.iter().map(|i| i.master_peak).max().unwrap_or(0)
            );
            println!(
                "4. worker RSS: idle {} KiB, peak while streaming {} KiB",
                i.worker_idle,
                ingests.iter().map(|i| i.worker_peak).max().unwrap_or(0)
            );
        }
        if part(7) {
            let (ups, (down, down_ok), raws) = upload(log, rounds_3).await;
            let ok = ups.iter().map(|u| u.1.as_str()).collect::<Vec<_>>().join(", ");
            let secs = support::median(ups.iter().map(|u| u.0).collect());
            let raw = support::median(raws.clone());
            let mib = log as f64 / (1 << 20) as f64;
            println!(
                "7. artifact upload of {mib:.0} MiB (the upload step, the master's record): {secs:.2} s ({:.0} MiB/s, {ok}); raw TCP copy {raw:.2} s ({:.0} MiB/s); ratio {:.3} (medians of {rounds_3} alternating rounds; upload {:.2?} s, raw {:.2?} s)",
                mib / secs,
                mib / raw,
                raw / secs,
                ups.iter().map(|u| u.0).collect::<Vec<_>>(),
                raws,
            );
            println!(
                "7. artifact download of {mib:.0} MiB to another builder's step (its duration, the master's record): {down:.2} s ({:.0} MiB/s, {down_ok}); ratio to the raw TCP copy {:.3}",
                mib / down,
                raw / down
            );
        }
        if part(6) {
            // The step supervisor's cost: the same bench with it switched
            // off (a worker flag for benchmarks only), alternating rounds.
            let (mut on, mut off) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                on.push(steps_per_second(1, builds_1).await);
                off.push(steps_per_second_with(1, builds_1, &["--bench-unsupervised-steps"]).await);
            }
            let ratios: Vec<f64> = on.iter().zip(&off).map(|(a, b)| a / b).collect();
            println!(
                "6. trivial steps/s, 1 worker: supervised {on:.0?}, unsupervised {off:.0?} ({builds_1} builds of 4 `true` steps a round, 3 alternating rounds); median ratio {:.2}",
                support::median(ratios)
            );
        }
        if part(5) {
            let c = checkout(rounds).await;
            println!(
                "5. incremental git-step build of a 1,000-commit repository (2,000 files), push to build end: median {:.1} ms; `git fetch && git checkout` by hand: median {:.1} ms; ratio {:.2} (median of per-round ratios {:.2}, {rounds} rounds, alternating); the build's own duration (start to end, master's record) median {} ms, ratio {:.2}; its parts (medians, ms): push to build start {}, to step start {}, the git step {}, step end to build end {}",
                c.build,
                c.hand,
                c.build / c.hand,
                c.ratio_of_rounds,
                c.duration,
                c.duration / c.hand,
                c.parts[0],
                c.parts[1],
                c.parts[2],
                c.parts[3]
            );
        }
    });
}
