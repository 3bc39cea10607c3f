//! Webhook ingest against a real `switchyard master` process on 127.0.0.1:
//! GitHub push deliveries of 20 commits each (signed, verified, parsed,
//! stored durably with a delivery id) at `POST /hooks/gh`, against
//! `PushChanges` of the same 20 changes over gRPC to the same master, in
//! alternating rounds of one run. Both over HTTP/2 on the shared port,
//! 8 concurrent clients over one connection each; no scheduler, so what is
//! measured is ingest.
//!
//! 2. Commit statuses: a `[[reporter]]` (kind `github`) pointed at a
//!    stand-in API served by this process; a worker process runs a build
//!    of one `true` step per pushed change, one after another. Measured:
//!    the build's end as the master stored it (`finished_ms`) to the
//!    `success` status arriving at the stand-in, p50 and p99, against a
//!    POST of the same JSON from this process to the same stand-in (its
//!    floor: one loopback HTTP request), in the same run.
//!
//! Run: `cargo bench --bench webhooks` (`-- quick` for a short run). Every
//! loop is bounded in count and time.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use hmac::{KeyInit, Mac};
use http_body_util::BodyExt;
use tonic::Request;

use support::{median, percentile, rate, spawn_master, spawn_worker};
use switchyard::proto::change_source_client::ChangeSourceClient;
use switchyard::proto::{Change, PushChangeRequest};

const SECRET: &str = "bench-webhook-secret-0123456789";
const COMMITS: usize = 20;
const CLIENTS: usize = 8;

fn payload() -> serde_json::Value {
    let commits: Vec<serde_json::Value> = (0..COMMITS)
        .map(|i| {
            serde_json::json!({
                "id": format!("{i:040x}"),
                "message": format!("commit {i}: a change of some length, as commit messages are"),
                "timestamp": "2026-11-25T13:50:07-08:00",
                "author": { "name": "Garen Torikian", "email": "lolwut@noway.biz", "username": "octokitty" },
                "added": [format!("src/new_{i}.rs")],
                "removed": [],
                "modified": ["README.md", "src/lib.rs"]
            })
        })
        .collect();
    serde_json::json!({
        "ref": "refs/heads/main",
        "before": "17c497ccc7cca9c2f735aa07e9e3813060ce9a6a",
        "after": format!("{:040x}", COMMITS - 1),
        "deleted": false,
        "commits": commits,
        "repository": {
            "clone_url": "https://github.com/octokitty/testing.git",
            "ssh_url": "git@github.com:octokitty/testing.git",
            "html_url": "https://github.com/octokitty/testing"
        },
        "pusher": { "name": "octokitty", "email": "lolwut@noway.biz" }
    })
}

/// The same 20 changes as `PushChanges` would carry them.
fn changes() -> Vec<Change> {
    (0..COMMITS)
        .map(|i| Change {
            repository: "https://github.com/octokitty/testing.git".into(),
            branch: "main".into(),
            revision: format!("{i:040x}"),
            author: "Garen Torikian <lolwut@noway.biz>".into(),
            comments: format!("commit {i}: a change of some length, as commit messages are"),
            category: "push".into(),
            files: vec![
                format!("src/new_{i}.rs"),
                "README.md".into(),
                "src/lib.rs".into(),
            ],
            when: Some(prost_types::Timestamp {
                seconds: 1_795_000_000,
                nanos: 0,
            }),
            ..Default::default()
        })
        .collect()
}

fn sign(body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

type H2 = hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>;

async fn h2(addr: &str) -> H2 {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    // As providers' clients and tonic do: no Nagle delay between a
    // request's HEADERS and DATA frames.
    tcp.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let (rounds, count, cap) = if quick {
        (2, 200, Duration::from_secs(2))
    } else {
        (7, 2_000, Duration::from_secs(5))
    };
    let dir = std::env::temp_dir().join(format!("switchyard-webhook-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("master.toml"),
        "[master]\nlisten = \"127.0.0.1:0\"\nsecrets = \"secrets.toml\"\n\
         \n[[user]]\nname = \"hook\"\nservices = [\"change-source\"]\n\
         \n[[webhook]]\nname = \"gh\"\nkind = \"github\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("secrets.toml"),
        format!(
            "[verifiers]\nhook = {:?}\n\n[webhook_secrets]\ngh = {SECRET:?}\n",
            support::verifier("hook-pw")
        ),
    )
    .unwrap();
    let (_master, addr) = spawn_master(&dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let body = bytes::Bytes::from(payload().to_string());
        let signature = sign(&body);
        let deliveries = Arc::new(AtomicUsize::new(0));
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("hook:hook-pw")
        );
        let (mut hooks, mut grpcs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            // Webhook deliveries, each with its own delivery id.
            let mut senders = Vec::new();
            for _ in 0..CLIENTS {
                senders.push(h2(&addr).await);
            }
            let senders = Arc::new(senders);
            let next = Arc::new(AtomicUsize::new(0));
            let (b, s, a, d) = (body.clone(), signature.clone(), addr.clone(), deliveries.clone());
            let hook_rate = rate(CLIENTS, count, cap, move || {
                let (b, s, a, d) = (b.clone(), s.clone(), a.clone(), d.clone());
                let mut sender = senders[next.fetch_add(1, Ordering::Relaxed) % CLIENTS].clone();
                async move {
                    let id = d.fetch_add(1, Ordering::Relaxed);
                    let request = http::Request::post(format!("http://{a}/hooks/gh"))
                        .header("content-type", "application/json")
                        .header("x-github-event", "push")
                        .header("x-github-delivery", format!("bench-{id}"))
                        .header("x-hub-signature-256", s)
                        .body(http_body_util::Full::new(b))
                        .unwrap();
                    let response = sender.send_request(request).await.unwrap();
                    assert_eq!(response.status(), 200);
                    response.into_body().collect().await.unwrap();
                }
            })
            .await;
            // PushChanges of the same 20 changes.
            let mut clients = Vec::new();
            for _ in 0..CLIENTS {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                clients.push(ChangeSourceClient::new(channel));
            }
            let clients = Arc::new(clients);
            let next = Arc::new(AtomicUsize::new(0));
            let basic = basic.clone();
            let grpc_rate = rate(CLIENTS, count, cap, move || {
                let mut client = clients[next.fetch_add(1, Ordering::Relaxed) % CLIENTS].clone();
                let basic = basic.clone();
                async move {
                    let batch: Vec<PushChangeRequest> = changes()
                        .into_iter()
                        .map(|c| PushChangeRequest { change: Some(c), ..Default::default() })
                        .collect();
                    let mut r = Request::new(futures_util::stream::iter(batch));
                    r.metadata_mut()
                        .insert("authorization", basic.parse().unwrap());
                    let ids = client.push_changes(r).await.unwrap().into_inner().ids;
                    assert_eq!(ids.len(), COMMITS);
                }
            })
            .await;
            println!("   round {round}: webhook {hook_rate:.0}/s, PushChanges {grpc_rate:.0}/s");
            hooks.push(hook_rate);
            grpcs.push(grpc_rate);
            ratios.push(hook_rate / grpc_rate);
        }
        println!(
            "1. 20-commit pushes/s, durable: webhook deliveries (signed, verified, parsed) {:.0}, PushChanges of the same 20 changes {:.0}, median ratio {:.3}",
            median(hooks),
            median(grpcs),
            median(ratios)
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
    rt.block_on(statuses(quick));
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Part 2: build end to commit status arriving.
async fn statuses(quick: bool) {
    use std::sync::Mutex;
    let builds = if quick { 10 } else { 60 };
    // The stand-in API: notes when each status arrived, by (sha, state).
    let arrived: Arc<Mutex<std::collections::HashMap<(String, String), i64>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap().to_string();
    {
        let arrived = arrived.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                let arrived = arrived.clone();
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let arrived = arrived.clone();
                        async move {
                            let at = now_ms();
                            let sha = req
                                .uri()
                                .path()
                                .rsplit('/')
                                .next()
                                .unwrap_or_default()
                                .to_string();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let v: serde_json::Value =
                                serde_json::from_slice(&body).unwrap_or_default();
                            let state = v["state"].as_str().unwrap_or_default().to_string();
                            arrived.lock().unwrap().insert((sha, state), at);
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"{}")),
                            ))
                        }
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
    }
    let dir = std::env::temp_dir().join(format!("switchyard-status-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("master.toml"),
        format!(
            "[master]\nlisten = \"127.0.0.1:0\"\nsecrets = \"secrets.toml\"\n\
             \n[web]\nurl = \"https://ci.example.org\"\n\
             \n[[user]]\nname = \"hook\"\nservices = [\"change-source\"]\n\
             \n[[worker]]\nname = \"w1\"\n\
             \n[[builder]]\nname = \"widgets\"\nworkers = [\"w1\"]\n[[builder.step]]\nname = \"s\"\nshell = \"true\"\n\
             \n[[scheduler]]\nname = \"all\"\nbuilders = [\"widgets\"]\n\
             \n[[reporter]]\nname = \"gh\"\nkind = \"github\"\napi_url = \"http://{api}\"\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("secrets.toml"),
        format!(
            "[verifiers]\nhook = {:?}\nw1 = {:?}\n\n[reporter_tokens]\ngh = \"bench-token\"\n",
            support::verifier("hook-pw"),
            support::verifier("worker-pw")
        ),
    )
    .unwrap();
    let (_master, addr) = spawn_master(&dir);
    let _worker = spawn_worker(&addr, "w1", &dir.join("basedir"));
    let mut hook =
        switchyard::grpc::client::ChangeSourceConnection::connect(&addr, "hook", "hook-pw")
            .await
            .unwrap();
    let db = rusqlite::Connection::open_with_flags(
        dir.join("state.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut report = Vec::new();
    let mut floor = Vec::new();
    let client = reqwest::Client::new();
    for i in 0..builds {
        let sha = format!("{:040x}", 0xb0000 + i);
        hook.push(Change {
            repository: "https://github.com/octo/widgets.git".into(),
            branch: "main".into(),
            revision: sha.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let at = loop {
            if let Some(at) = arrived
                .lock()
                .unwrap()
                .get(&(sha.clone(), "success".to_string()))
            {
                break *at;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no status for build {i}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let finished: i64 = db
            .query_row(
                "SELECT b.finished_ms FROM builds b JOIN build_requests r ON r.id = b.request_id WHERE r.revision = ?1",
                [&sha],
                |r| r.get(0),
            )
            .unwrap();
        report.push((at - finished) as f64);
        // The floor: one POST of a status to the same stand-in.
        let started = now_ms();
        let probe = format!("probe{i:035x}");
        client
            .post(format!("http://{api}/repos/octo/widgets/statuses/{probe}"))
            .body(r#"{"state":"probe","context":"switchyard/widgets"}"#)
            .send()
            .await
            .unwrap();
        let arrived_at = arrived.lock().unwrap()[&(probe, "probe".to_string())];
        floor.push((arrived_at - started).max(0) as f64);
    }
    let (p50, p99) = (percentile(&mut report, 0.5), percentile(&mut report, 0.99));
    let (f50, f99) = (percentile(&mut floor, 0.5), percentile(&mut floor, 0.99));
    println!(
        "2. build end to its commit status at the API ({builds} builds, ms): p50 {p50:.0}, p99 {p99:.0}; one loopback POST to the same API: p50 {f50:.0}, p99 {f99:.0}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
