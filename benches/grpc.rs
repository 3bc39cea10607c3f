//! gRPC change hooks: `PushChange` through the shared port against the same
//! tonic service served alone on a plain port (`Server::builder()`), in one
//! run, each pair with the same store:
//!
//! 1. both with SQLite persistence (full sync, group commit);
//! 2. both with the bench's own in-memory store, to isolate what the shared
//!    port costs (sniffing, hyper on an accepted socket, Basic credentials
//!    through the port's checkers);
//! 3. durable pushes per second with SQLite, as measured in 1;
//! 4. as 2 (in memory), both inside TLS: the shared port with
//!    `[master.tls]` against tonic serving rustls connections on its own
//!    port, the same certificate, the same client connector;
//! 5. durable pushes per second through the shared port with the state in
//!    PostgreSQL (the machine's server at 127.0.0.1:5432, a database made
//!    for the run and dropped after) against the same with SQLite,
//!    alternating (`-- postgres-only` runs this part alone).
//!
//! Run: `cargo bench --bench grpc` (add `-- quick` for a short run). Loopback
//! only; every loop is bounded in count and time.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::{Channel, Endpoint};

use switchyard::auth::{InMemoryChecker, Verifier};
use switchyard::dispatcher::tls::TlsSettings;
use switchyard::dispatcher::{AccessPolicy, Dispatcher, Limits};
use switchyard::grpc::change_source::ChangeSourceService;
use switchyard::grpc::{GrpcAuth, HttpFrontDoor};
use switchyard::proto::change_source_client::ChangeSourceClient;
use switchyard::proto::{Change, PushChangeRequest};
use switchyard::store::{ChangeStore, NewChange, StateDb, StateError};
use switchyard::wire::tls::{ClientTls, Trust};

/// The bench's in-memory store: ids from a counter, changes dropped.
struct MemoryStore(AtomicI64);

#[async_trait]
impl ChangeStore for MemoryStore {
    async fn add_changes(&self, batch: Vec<NewChange>) -> Result<Vec<i64>, StateError> {
        let first = self.0.fetch_add(batch.len() as i64, Ordering::Relaxed) + 1;
        Ok((0..batch.len() as i64).map(|i| first + i).collect())
    }

    async fn add_changes_keyed(
        &self,
        _key: (String, String),
        batch: Vec<NewChange>,
    ) -> Result<(Vec<i64>, bool), StateError> {
        // The bench sends no keys; a keyed push is stored like any other.
        Ok((self.add_changes(batch).await?, false))
    }
}

fn dispatcher() -> Dispatcher {
    let users = Arc::new(InMemoryChecker::new());
    users.insert("hook", Verifier::from_password(b"hook-pw", 4096).unwrap());
    Dispatcher::new(
        Limits::default(),
        users,
        AccessPolicy::default().grant("hook", ["change-source"]),
    )
}

/// The service on the shared port; returns its address.
async fn shared_port(store: Arc<dyn ChangeStore>) -> String {
    shared_port_tls(store, None).await
}

/// [`shared_port`], with TLS if given.
async fn shared_port_tls(store: Arc<dyn ChangeStore>, tls: Option<TlsSettings>) -> String {
    let d = dispatcher();
    d.set_tls(tls);
    let service = ChangeSourceService::new(store, GrpcAuth::new(d.clone())).into_server();
    let reg = d
        .registry()
        .register_http(HttpFrontDoor::grpc(tonic::service::Routes::new(service)))
        .unwrap();
    std::mem::forget(reg); // served for the whole bench
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { d.serve(listener, CancellationToken::new()).await });
    addr
}

/// The same service served alone by tonic on a plain port.
async fn plain_tonic(store: Arc<dyn ChangeStore>) -> String {
    let d = dispatcher();
    let service = ChangeSourceService::new(store, GrpcAuth::new(d)).into_server();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    addr
}

/// A rustls server connection, as tonic's own server takes its streams.
struct TlsConn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for TlsConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The same service served alone by tonic over rustls on its own port.
async fn tls_tonic(store: Arc<dyn ChangeStore>, tls: &TlsSettings) -> String {
    let d = dispatcher();
    let service = ChangeSourceService::new(store, GrpcAuth::new(d)).into_server();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let acceptor = tls.acceptor();
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsConn>>(64);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(s) = acceptor.accept(tcp).await {
                    let _ = tx.send(Ok(TlsConn(s))).await;
                }
            });
        }
    });
    let incoming = tokio_stream_from(rx);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    addr
}

/// A stream of what `rx` receives.
fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}

fn change(n: usize) -> Change {
    Change {
        repository: "https://git.example.org/widgets.git".into(),
        branch: "main".into(),
        revision: format!("{n:040x}"),
        author: "Ada <ada@example.org>".into(),
        comments: "fix the frobnicator".into(),
        files: vec!["src/lib.rs".into(), "src/frob.rs".into()],
        ..Default::default()
    }
}

/// Pushes from `clients` tasks over `channels` connections until `count`
/// pushes or `cap`; returns pushes per second.
async fn push_rate(
    addr: &str,
    channels: usize,
    clients: usize,
    count: usize,
    cap: Duration,
    tls: Option<&ClientTls>,
) -> f64 {
    let auth: tonic::metadata::MetadataValue<_> = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("hook:hook-pw")
    )
    .parse()
    .unwrap();
    let mut conns: Vec<Channel> = Vec::new();
    for _ in 0..channels {
        let endpoint = Endpoint::from_shared(format!("http://{addr}")).unwrap();
        conns.push(match tls {
            None => endpoint.connect().await.unwrap(),
            Some(tls) => {
                let (tls, target) = (tls.clone(), addr.to_string());
                let connector = tower::service_fn(move |_uri: http::Uri| {
                    let (tls, target) = (tls.clone(), target.clone());
                    async move {
                        let s = tls.connect(&target).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                });
                endpoint.connect_with_connector(connector).await.unwrap()
            }
        });
    }
    // One warm-up push fills the credential cache, as for a hook that pushes often.
    let mut warm = ChangeSourceClient::new(conns[0].clone());
    let mut req = Request::new(PushChangeRequest {
        change: Some(change(0)),
        ..Default::default()
    });
    req.metadata_mut().insert("authorization", auth.clone());
    warm.push_change(req).await.unwrap();

    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let mut client = ChangeSourceClient::new(conns[i % channels].clone());
        let (done, auth) = (done.clone(), auth.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let n = done.fetch_add(1, Ordering::Relaxed);
                if n >= count || start.elapsed() >= cap {
                    break;
                }
                let mut req = Request::new(PushChangeRequest {
                    change: Some(change(n)),
                    ..Default::default()
                });
                req.metadata_mut().insert("authorization", auth.clone());
                client.push_change(req).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = done.load(Ordering::Relaxed).min(count);
    n as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Measures the two servers in short alternating slices (the order flips
/// every round) so that the machine's drift hits both alike, and reports the
/// median rate of each and the median of the per-round ratios.
async fn pair(
    shared: &str,
    plain: &str,
    names: [&str; 2],
    rounds: usize,
    count: usize,
    cap: Duration,
    tls: Option<&ClientTls>,
) -> (f64, f64, f64) {
    let (mut a, mut b, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (x, y) = if round % 2 == 0 {
            let x = push_rate(shared, 4, 32, count, cap, tls).await;
            (x, push_rate(plain, 4, 32, count, cap, tls).await)
        } else {
            let y = push_rate(plain, 4, 32, count, cap, tls).await;
            (push_rate(shared, 4, 32, count, cap, tls).await, y)
        };
        a.push(x);
        b.push(y);
        ratios.push(x / y);
    }
    let show = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "   rounds: {} [{}], {} [{}]",
        names[0],
        show(&a),
        names[1],
        show(&b)
    );
    (median(a), median(b), median(ratios))
}

/// What [`pair`] compares in parts 1, 2 and 4.
const PORTS: [&str; 2] = ["shared port", "plain tonic"];

/// Part 5: PostgreSQL against SQLite, both durable, through the shared port.
async fn postgres_against_sqlite(
    dir: &std::path::Path,
    rounds: usize,
    count: usize,
    cap: Duration,
) {
    let db = format!("switchyard_bench_{}", std::process::id());
    support::pg_admin(&format!("CREATE DATABASE {db}")).await;
    let url = format!("postgres://postgres@127.0.0.1:5432/{db}");
    let pg: Arc<dyn ChangeStore> = Arc::new(
        switchyard::store::postgres::PgState::connect(&url)
            .await
            .unwrap(),
    );
    let sqlite: Arc<dyn ChangeStore> =
        Arc::new(StateDb::open(&dir.join("against-pg.sqlite")).unwrap());
    let (pg_addr, sqlite_addr) = (shared_port(pg).await, shared_port(sqlite).await);
    let (pg_rate, sqlite_rate, ratio) = pair(
        &pg_addr,
        &sqlite_addr,
        ["PostgreSQL", "SQLite"],
        rounds,
        count,
        cap,
        None,
    )
    .await;
    println!(
        "5. durable PushChange/s through the shared port, 32 concurrent clients: PostgreSQL {pg_rate:.0}, SQLite {sqlite_rate:.0}, median ratio {ratio:.3}"
    );
    support::pg_admin(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let (rounds, count, cap) = if quick {
        (2, 2_000, Duration::from_secs(1))
    } else {
        (15, 20_000, Duration::from_secs(2))
    };
    let dir = std::env::temp_dir().join(format!("switchyard-grpc-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if std::env::args().any(|a| a == "postgres-only") {
            postgres_against_sqlite(&dir, rounds, count, cap).await;
            return;
        }
        if std::env::args().any(|a| a == "memory-only") {
            let shared = shared_port(Arc::new(MemoryStore(AtomicI64::new(0)))).await;
            let plain = plain_tonic(Arc::new(MemoryStore(AtomicI64::new(0)))).await;
            let (_, _, ratio) = pair(&shared, &plain, PORTS, rounds, count * 2, cap, None).await;
            println!("2. in memory: ratio {ratio:.3}");
            return;
        }
        let sqlite_shared: Arc<dyn ChangeStore> = Arc::new(StateDb::open(&dir.join("shared.sqlite")).unwrap());
        let sqlite_plain: Arc<dyn ChangeStore> = Arc::new(StateDb::open(&dir.join("plain.sqlite")).unwrap());
        let shared = shared_port(sqlite_shared).await;
        let plain = plain_tonic(sqlite_plain).await;
        let (ours, base, ratio) = pair(&shared, &plain, PORTS, rounds, count, cap, None).await;
        println!(
            "1. PushChange/s with SQLite: shared port {ours:.0}, plain tonic {base:.0}, median ratio {ratio:.3} (target >= 0.95)"
        );
        println!("3. durable pushes/s with SQLite (shared port, 32 concurrent clients): {ours:.0}");

        let shared = shared_port(Arc::new(MemoryStore(AtomicI64::new(0)))).await;
        let plain = plain_tonic(Arc::new(MemoryStore(AtomicI64::new(0)))).await;
        let (ours, base, ratio) = pair(&shared, &plain, PORTS, rounds, count * 2, cap, None).await;
        println!(
            "2. PushChange/s in memory: shared port {ours:.0}, plain tonic {base:.0}, median ratio {ratio:.3} (target >= 0.97)"
        );

        // 4. Inside TLS, in memory.
        let (cert, key, pin) = switchyard::dispatcher::tls::self_signed(&["localhost".into()]).unwrap();
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        let load = || TlsSettings::load(&dir.join("cert.pem"), &dir.join("key.pem"), true).unwrap();
        let shared = shared_port_tls(Arc::new(MemoryStore(AtomicI64::new(0))), Some(load())).await;
        let plain = tls_tonic(Arc::new(MemoryStore(AtomicI64::new(0))), &load()).await;
        let client = ClientTls::new(&Trust::Pin(pin), Some("localhost".into())).unwrap();
        let (ours, base, ratio) = pair(&shared, &plain, PORTS, rounds, count * 2, cap, Some(&client)).await;
        println!(
            "4. PushChange/s inside TLS, in memory: shared port {ours:.0}, tonic over rustls on its own port {base:.0}, median ratio {ratio:.3} (target >= 0.95)"
        );

        postgres_against_sqlite(&dir, rounds, count, cap).await;
    });
    let _ = std::fs::remove_dir_all(&dir);
}
