//! Reload time on a big master: 10,000 connected worker sessions and 1,000
//! builders, when one builder changes, against the time to parse and
//! validate the same files in the same run; and how many unchanged sessions
//! the reload disturbed (target: none).
//!
//! The master is a real `switchyard master` process; the 10,000 workers are
//! in-process clients of this bench (logged in over SCRAM, saying hello and
//! answering heartbeats like a real worker). Loopback only.
//!
//! Run: `cargo bench --bench reload` (add `-- quick` for 1,000 workers).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use tonic::Request;

use switchyard::auth::Verifier;
use switchyard::client::{self, Credentials};
use switchyard::config::{Config, Secrets};
use switchyard::proto::debug_client::DebugClient;
use switchyard::proto::{
    MasterMessage, ReloadRequest, StatusRequest, WorkerHello, WorkerMessage, master_message,
    worker_message,
};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config_text(workers: usize, builders: usize, variant: usize) -> String {
    let mut t = format!(
        "[master]\nlisten = \"127.0.0.1:0\"\nsecrets = \"secrets.toml\"\nheartbeat_interval = \"60s\"\nmax_connections = {}\n\n[[user]]\nname = \"admin\"\nservices = [\"debug\"]\n",
        workers + 1000
    );
    for w in 0..workers {
        t.push_str(&format!("\n[[worker]]\nname = \"w{w:05}\"\n"));
    }
    for b in 0..builders {
        let ws: Vec<String> = (0..10)
            .map(|i| format!("\"w{:05}\"", (b * 10 + i) % workers))
            .collect();
        // Builder 0 is the one that changes between reloads.
        let step = if b == 0 {
            format!("make all VARIANT={variant}")
        } else {
            "make all".to_string()
        };
        t.push_str(&format!(
            "\n[[builder]]\nname = \"b{b:04}\"\nworkers = [{}]\n[[builder.step]]\nname = \"compile\"\nshell = \"{step}\"\ntimeout = \"20m\"\n[[builder.step]]\nname = \"test\"\ncommand = [\"make\", \"check\"]\n",
            ws.join(", ")
        ));
    }
    t
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn parse_both(dir: &Path) -> f64 {
    let start = Instant::now();
    let c = Config::load(&dir.join("master.toml")).unwrap();
    let s = Secrets::load(&c.secrets_path).unwrap();
    assert!(!c.workers.is_empty() && !s.verifiers.is_empty());
    start.elapsed().as_secs_f64() * 1000.0
}

fn parse_config(dir: &Path) -> f64 {
    let start = Instant::now();
    let c = Config::load(&dir.join("master.toml")).unwrap();
    assert!(!c.builders.is_empty());
    start.elapsed().as_secs_f64() * 1000.0
}

/// A worker that logs in, says hello, answers heartbeats, and counts itself
/// in `lost` if its session ends.
async fn fake_worker(
    addr: String,
    name: String,
    lost: Arc<AtomicUsize>,
    up: Arc<AtomicUsize>,
    login_slot: tokio::sync::OwnedSemaphorePermit,
) {
    let creds = Credentials::new(name, "worker-pw");
    let mut s = loop {
        match client::connect(&addr, "worker", &creds).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let hello = WorkerMessage {
        kind: Some(worker_message::Kind::Hello(WorkerHello {
            hostname: "bench".into(),
            ..Default::default()
        })),
    };
    if s.stream
        .send(bytes::Bytes::from(hello.encode_to_vec()))
        .await
        .is_err()
    {
        lost.fetch_add(1, Ordering::SeqCst);
        return;
    }
    up.fetch_add(1, Ordering::SeqCst);
    drop(login_slot);
    while let Some(Ok(frame)) = s.stream.next().await {
        if let Ok(MasterMessage {
            kind: Some(master_message::Kind::Heartbeat(hb)),
        }) = MasterMessage::decode(frame.freeze())
        {
            let reply = WorkerMessage {
                kind: Some(worker_message::Kind::Heartbeat(hb)),
            };
            if s.stream
                .send(bytes::Bytes::from(reply.encode_to_vec()))
                .await
                .is_err()
            {
                break;
            }
        }
    }
    lost.fetch_add(1, Ordering::SeqCst);
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let (workers, builders, rounds) = if quick {
        (1_000, 100, 3)
    } else {
        (10_000, 1_000, 5)
    };
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    let dir = std::env::temp_dir().join(format!("switchyard-reload-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Every worker shares one verifier (same password and salt): the bench
    // measures the master, not PBKDF2.
    let worker_v = Verifier::from_password_and_salt(b"worker-pw", b"bench-salt-00000", 4096)
        .unwrap()
        .encode();
    let admin_v = Verifier::from_password(b"admin-pw", 4096).unwrap().encode();
    let mut secrets = format!("[verifiers]\nadmin = {admin_v:?}\n");
    for w in 0..workers {
        secrets.push_str(&format!("w{w:05} = {worker_v:?}\n"));
    }
    std::fs::write(dir.join("secrets.toml"), secrets).unwrap();
    std::fs::write(dir.join("master.toml"), config_text(workers, builders, 0)).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["master", "--config"])
        .arg(dir.join("master.toml"))
        .env(
            "RUST_LOG",
            std::env::var("BENCH_MASTER_LOG")
                .unwrap_or_else(|_| "warn,switchyard::master=info".into()),
        )
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
    let echo = std::env::var("BENCH_MASTER_LOG").is_ok();
    std::thread::spawn(move || {
        for line in lines.by_ref().map_while(Result::ok) {
            if echo && line.contains("reload") {
                eprintln!("master: {line}");
            }
        }
    });
    let _master = Proc(child);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let lost = Arc::new(AtomicUsize::new(0));
        let up = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(128));
        for w in 0..workers {
            let (addr, lost, up, sem) = (addr.clone(), lost.clone(), up.clone(), sem.clone());
            tokio::spawn(async move {
                // Bounds the logins in flight; released once logged in.
                let slot = sem.acquire_owned().await.unwrap();
                fake_worker(addr, format!("w{w:05}"), lost, up, slot).await
            });
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while up.load(Ordering::SeqCst) < workers {
            assert!(Instant::now() < deadline, "only {} of {workers} workers connected", up.load(Ordering::SeqCst));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let auth: tonic::metadata::MetadataValue<_> =
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("admin:admin-pw")).parse().unwrap();
        fn req<T>(m: T, auth: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>) -> Request<T> {
            let mut r = Request::new(m);
            r.metadata_mut().insert("authorization", auth.clone());
            r
        }
        let mut debug = DebugClient::connect(format!("http://{addr}")).await.unwrap();
        let status = debug.status(req(StatusRequest {}, &auth)).await.unwrap().into_inner();
        assert_eq!(status.workers_connected as usize, workers);
        println!(
            "   {workers} workers connected in {:.1} s; {} builders configured",
            start.elapsed().as_secs_f64(),
            status.builders
        );

        let (mut reload_ms, mut parse_ms, mut config_ms) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=rounds {
            std::fs::write(dir.join("master.toml"), config_text(workers, builders, round)).unwrap();
            parse_ms.push(parse_both(&dir));
            config_ms.push(parse_config(&dir));
            let t = Instant::now();
            let summary = debug.reload(req(ReloadRequest {}, &auth)).await.unwrap().into_inner().summary;
            reload_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            assert!(summary.contains("changed [b0000]"), "{summary}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let status = debug.status(req(StatusRequest {}, &auth)).await.unwrap().into_inner();
        let disturbed = lost.load(Ordering::SeqCst);
        let (r, p, c) = (median(reload_ms), median(parse_ms), median(config_ms));
        println!(
            "1. reload with {workers} worker sessions and {builders} builders, one builder changed: {r:.1} ms; parse+validate of the same config and secrets {p:.1} ms (config alone {c:.1} ms); ratio {:.2} (target <= 2); unchanged sessions disturbed: {disturbed} (still connected: {})",
            r / p,
            status.workers_connected
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
}
