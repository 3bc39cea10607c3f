//! Builds that survive faults, measured:
//!
//! 1. a campaign of 50 faults at random points of a running build, taking
//!    turns: the link cut (both sockets reset), the link black-holed
//!    (nothing forwarded, nothing closed), the master killed with -9 and
//!    started again on the same state; counted: builds that finish with a
//!    byte-exact log and no step run twice;
//! 2. the time from a link cut to the step being re-attached (the worker's
//!    new session), against the heartbeat interval;
//! 3. the time from a black hole to the step being re-attached on a new link
//!    (both sides must first notice the silence), against the heartbeat
//!    interval;
//! 4. two masters on one PostgreSQL database (the machine's server, a
//!    database of the bench's own): the time from a master's kill -9 to its
//!    running step re-attached on the other master, against the lease
//!    duration (1, 3 and 10 s), each failover also checked byte-exact.
//!
//! A real master process and a real worker process on 127.0.0.1, with a
//! fault-injecting proxy between them. Run: `cargo bench --bench resume`
//! (`-- quick` for 9 faults).

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{BIN, Proxy, Reaped, config_text, secrets_text};
use switchyard::proto::debug_client::DebugClient;
use switchyard::proto::{BuildsRequest, ForceRequest, LogRequest, WorkersRequest};
use tonic::Request;

const LINES: usize = 2000;
const STEPS: &str = r#"
[[builder]]
name = "count"
workers = ["w1"]
[[builder.step]]
name = "lines"
shell = "i=1; while [ $i -le 2000 ]; do echo \"line $i\"; if [ $((i % 200)) -eq 0 ]; then sleep 0.15; fi; i=$((i+1)); done"
[[builder.step]]
name = "after"
shell = "echo second step"
"#;

fn expected() -> Vec<u8> {
    (1..=LINES)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect()
}

fn start_master(dir: &std::path::Path) -> Reaped {
    common::master_process(dir).0
}

fn req<T>(m: T) -> Request<T> {
    let mut r = Request::new(m);
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("admin:admin-pw")
    );
    r.metadata_mut()
        .insert("authorization", auth.parse().unwrap());
    r
}

async fn client(addr: &str) -> DebugClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match DebugClient::connect(format!("http://{addr}")).await {
            Ok(c) => return c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("cannot reach the master: {e}"),
        }
    }
}

async fn worker_session(c: &mut DebugClient<tonic::transport::Channel>) -> Option<String> {
    let w = c.workers(req(WorkersRequest {})).await.ok()?.into_inner();
    w.workers
        .into_iter()
        .find(|w| w.connected)
        .map(|w| w.session_id)
}

/// Waits for a worker session other than `old`; returns how long it took.
async fn new_session(addr: &str, old: &str, since: Instant) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut c = client(addr).await;
    loop {
        if let Some(s) = worker_session(&mut c).await
            && s != old
        {
            return since.elapsed();
        }
        assert!(Instant::now() < deadline, "the worker did not come back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits for the newest build to end; true if it succeeded with one
/// attempt per step and a byte-exact log.
async fn check_last_build(addr: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut c = client(addr).await;
    let b = loop {
        if let Ok(r) = c
            .builds(req(BuildsRequest {
                builder: "count".into(),
                limit: 1,
                ..Default::default()
            }))
            .await
            && let Some(b) = r.into_inner().builds.into_iter().next()
            && !b.result.is_empty()
        {
            break b;
        }
        assert!(Instant::now() < deadline, "the build did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if b.result != "success" || b.steps.len() != 2 || b.steps.iter().any(|s| s.attempt != 1) {
        eprintln!(
            "   build {} ended {} with steps {:?}",
            b.id,
            b.result,
            b.steps
                .iter()
                .map(|s| (&s.name, s.attempt, &s.result))
                .collect::<Vec<_>>()
        );
        return false;
    }
    let mut log = Vec::new();
    let mut stream = c
        .log(req(LogRequest {
            build: b.id,
            step: "lines".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    while let Some(chunk) = stream.message().await.unwrap() {
        log.extend_from_slice(&chunk.data);
    }
    if log != expected() {
        eprintln!(
            "   build {}: log of {} bytes differs from the {} expected",
            b.id,
            log.len(),
            expected().len()
        );
        return false;
    }
    true
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Part 4: `trials` failovers between two master processes on a shared
/// PostgreSQL state with this lease; the seconds from each kill -9 to the
/// worker's session on the other master (its held step re-attached), and
/// how many builds ended byte-exact with nothing re-run.
async fn failovers(lease: Duration, trials: usize, heartbeat: Duration) -> (Vec<f64>, usize) {
    let db = switchyard::store::postgres::testing::TempPg::new().await;
    let shared = tempfile::tempdir().unwrap();
    let users = [("admin", "admin-pw", &["debug"][..])];
    let mut dirs = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let keys = format!(
            "heartbeat_interval = \"{}ms\"\nworker_reconnect_grace = \"60s\"\nstate = {:?}\ndata_dir = {:?}\nlease_duration = \"{}ms\"",
            heartbeat.as_millis(),
            db.url,
            shared.path(),
            lease.as_millis()
        );
        let config = config_text(&keys, &users).replace("127.0.0.1:0", &addr)
            + "\n[[worker]]\nname = \"w1\"\n"
            + STEPS;
        std::fs::write(dir.path().join("master.toml"), config).unwrap();
        let secrets = secrets_text(&users)
            + secrets_text(&[("w1", "w1-pw", &[])]).trim_start_matches("[verifiers]\n");
        std::fs::write(dir.path().join("secrets.toml"), secrets).unwrap();
        dirs.push(dir);
        addrs.push(addr);
    }
    let mut masters: Vec<Reaped> = dirs.iter().map(|d| start_master(d.path())).collect();
    let _worker = Reaped(
        Command::new(BIN)
            .args([
                "worker",
                "--master",
                &addrs[0],
                "--master",
                &addrs[1],
                "--name",
                "w1",
                "--basedir",
            ])
            .arg(shared.path().join("basedir"))
            .env("SWITCHYARD_PASSWORD", "w1-pw")
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Where the worker is: it starts with the first.
    let mut on = 0;
    let mut c = client(&addrs[on]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker_session(&mut c).await.is_none() {
        assert!(Instant::now() < deadline, "the worker did not connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut times, mut ok) = (Vec::new(), 0);
    for _ in 0..trials {
        let other = 1 - on;
        let mut c = client(&addrs[on]).await;
        c.force(req(ForceRequest {
            builder: "count".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100 + rand::random::<u64>() % 800)).await;
        let at = Instant::now();
        masters[on].0.kill().unwrap();
        masters[on].0.wait().unwrap();
        let took = new_session(&addrs[other], "", at).await;
        times.push(took.as_secs_f64());
        if check_last_build(&addrs[other]).await {
            ok += 1;
        }
        // The killed master comes back (it adopts nothing: its builds are
        // the other's now) for the next failover, the other way.
        masters[on] = start_master(dirs[on].path());
        on = other;
    }
    drop(masters);
    db.drop_database().await;
    (times, ok)
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    if std::env::args().any(|a| a == "failover-only") {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(part4(quick));
        return;
    }
    let faults = if quick { 9 } else { 50 };
    let heartbeat = Duration::from_millis(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let users = [("admin", "admin-pw", &["debug"][..])];
        let master_keys = format!("heartbeat_interval = \"{}ms\"\nworker_reconnect_grace = \"60s\"", heartbeat.as_millis());
        let config = config_text(&master_keys, &users).replace("127.0.0.1:0", &addr) + "\n[[worker]]\nname = \"w1\"\n" + STEPS;
        std::fs::write(dir.path().join("master.toml"), config).unwrap();
        let secrets = secrets_text(&users) + secrets_text(&[("w1", "w1-pw", &[])]).trim_start_matches("[verifiers]\n");
        std::fs::write(dir.path().join("secrets.toml"), secrets).unwrap();

        let mut master = start_master(dir.path());
        let proxy = Proxy::start(addr.parse().unwrap()).await;
        let _worker = Reaped(
            Command::new(BIN)
                .args(["worker", "--master", &proxy.addr.to_string(), "--name", "w1", "--basedir"])
                .arg(dir.path().join("basedir"))
                .env("SWITCHYARD_PASSWORD", "w1-pw")
                .env("RUST_LOG", "error")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let mut c = client(&addr).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while worker_session(&mut c).await.is_none() {
            assert!(Instant::now() < deadline, "the worker did not connect");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let kinds = ["cut", "black hole", "master kill -9"];
        let (mut ok, mut per_kind) = (0, [0usize; 3]);
        let (mut cut_times, mut hole_times) = (Vec::new(), Vec::new());
        let started = Instant::now();
        for i in 0..faults {
            let kind = i % 3;
            let mut c = client(&addr).await;
            let before = worker_session(&mut c).await.unwrap_or_default();
            c.force(req(ForceRequest { builder: "count".into(), ..Default::default() })).await.unwrap();
            // A random point in the step's first second.
            let wait = Duration::from_millis(100 + rand::random::<u64>() % 800);
            tokio::time::sleep(wait).await;
            let at = Instant::now();
            match kind {
                0 => proxy.cut(),
                1 => proxy.black_hole(),
                _ => {
                    master.0.kill().unwrap();
                    master.0.wait().unwrap();
                    proxy.cut();
                    master = start_master(dir.path());
                }
            }
            let took = new_session(&addr, &before, at).await;
            match kind {
                0 => cut_times.push(took.as_secs_f64()),
                1 => hole_times.push(took.as_secs_f64()),
                _ => {}
            }
            if check_last_build(&addr).await {
                ok += 1;
                per_kind[kind] += 1;
            } else {
                eprintln!("   fault {i} ({}) lost the build", kinds[kind]);
            }
        }
        println!(
            "1. {ok} of {faults} builds finished byte-exact with no step re-run ({} cuts: {}, {} black holes: {}, {} master kills: {}) in {:.0} s",
            faults.div_ceil(3),
            per_kind[0],
            (faults + 1) / 3,
            per_kind[1],
            faults / 3,
            per_kind[2],
            started.elapsed().as_secs_f64()
        );
        println!(
            "2. link cut -> step re-attached on a new session: median {:.2} s (heartbeat interval {:.1} s; reconnect backoff 0.5-1 s)",
            median(cut_times),
            heartbeat.as_secs_f64()
        );
        println!(
            "3. black hole -> noticed and re-attached on a new link: median {:.2} s (heartbeat interval {:.1} s: detection within two intervals, then the backoff)",
            median(hole_times),
            heartbeat.as_secs_f64()
        );
        part4(quick).await;
    });
}

async fn part4(quick: bool) {
    let heartbeat = Duration::from_millis(1000);
    for lease in [1, 3, 10].map(Duration::from_secs) {
        let trials = if quick { 1 } else { 4 };
        let (times, ok) = failovers(lease, trials, heartbeat).await;
        println!(
            "4. lease {:.0} s: master kill -9 -> step re-attached on the other master: median {:.2} s, min {:.2}, max {:.2} ({} failovers, {ok} byte-exact with no step re-run; heartbeat {:.1} s)",
            lease.as_secs_f64(),
            median(times.clone()),
            times.iter().cloned().fold(f64::INFINITY, f64::min),
            times.iter().cloned().fold(0.0, f64::max),
            times.len(),
            heartbeat.as_secs_f64()
        );
    }
}
