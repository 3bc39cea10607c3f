//! TLS on the shared port, each figure against a baseline measured in the
//! same run, reported as a ratio:
//!
//! 1. TLS sessions per second (TCP connect, TLS handshake, SCRAM-SHA-256-PLUS
//!    login to `ping`, one echo, close) against a plain rustls TLS echo
//!    server (connect, handshake, one echo, close), four clients at once;
//! 2. echo round trips on one TLS session against a raw TLS echo server
//!    with the same framing.
//!
//! Both servers run in this process with the same certificate and crypto
//! (rustls, ring). Run: `cargo bench --bench tls` (`-- quick` for a short
//! run). Everything talks to 127.0.0.1, every loop is bounded in count and
//! time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use switchyard::auth::{InMemoryChecker, Verifier};
use switchyard::client::{self, ClientOptions, Credentials};
use switchyard::dispatcher::tls::TlsSettings;
use switchyard::dispatcher::{AccessPolicy, Dispatcher, Limits};
use switchyard::services::ping;
use switchyard::wire::tls::{ClientTls, Trust};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Runs `op` from `workers` tasks until `count` ops or `cap`; ops/s.
async fn rate<F, Fut>(workers: usize, count: usize, cap: Duration, op: F) -> f64
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

/// A certificate for localhost in a temp dir, loaded.
fn settings(dir: &std::path::Path) -> (TlsSettings, String) {
    let (cert, key, pin) = switchyard::dispatcher::tls::self_signed(&["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    let s = TlsSettings::load(&dir.join("cert.pem"), &dir.join("key.pem"), true).unwrap();
    (s, pin)
}

/// The shared port with `ping`, TLS required.
async fn switchyard_port(tls: TlsSettings) -> (String, CancellationToken) {
    let users = Arc::new(InMemoryChecker::new());
    users.insert("bench", Verifier::from_password(b"bench-pw", 4096).unwrap());
    let dispatcher = Dispatcher::new(
        Limits {
            max_connections: 50_000,
            ..Limits::default()
        },
        users,
        AccessPolicy::default().grant("bench", ["ping"]),
    );
    dispatcher.set_tls(Some(tls));
    let reg = dispatcher
        .registry()
        .register(ping::NAME, Default::default(), ping::serve)
        .unwrap();
    std::mem::forget(reg);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move { dispatcher.serve(listener, s).await });
    (addr, shutdown)
}

/// The baseline: rustls echoing bytes, one task per connection.
async fn tls_echo_port(tls: &TlsSettings) -> String {
    let acceptor = tls.acceptor();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() || s.flush().await.is_err() {
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

async fn framed_echo<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut Framed<T, LengthDelimitedCodec>,
    payload: &Bytes,
) {
    stream.send(payload.clone()).await.unwrap();
    let back = stream.next().await.unwrap().unwrap();
    assert_eq!(back.len(), payload.len());
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let (rounds, sessions, echoes, cap) = if quick {
        (3, 300, 2_000, Duration::from_secs(2))
    } else {
        (5, 2_000, 20_000, Duration::from_secs(5))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (ours_tls, pin) = settings(dir.path());
        let theirs_tls =
            TlsSettings::load(&dir.path().join("cert.pem"), &dir.path().join("key.pem"), true)
                .unwrap();
        let (addr, _shutdown) = switchyard_port(ours_tls).await;
        let baseline = tls_echo_port(&theirs_tls).await;
        let client_tls = ClientTls::new(&Trust::Pin(pin), Some("localhost".into())).unwrap();
        let opts = Arc::new(ClientOptions {
            tls: Some(client_tls.clone()),
            ..Default::default()
        });
        let creds = Arc::new(Credentials::new("bench", "bench-pw"));
        let payload = Bytes::from_static(&[42u8; 64]);

        // 1. Sessions per second.
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (a, o, c, p) = (addr.clone(), opts.clone(), creds.clone(), payload.clone());
            ours.push(
                rate(4, sessions, cap, move || {
                    let (a, o, c, p) = (a.clone(), o.clone(), c.clone(), p.clone());
                    async move {
                        let mut s = client::connect_with(&a, ping::NAME, &c, &o).await.unwrap();
                        assert!(s.stream.get_ref().is_tls());
                        framed_echo(&mut s.stream, &p).await;
                    }
                })
                .await,
            );
            let (a, t, p) = (baseline.clone(), client_tls.clone(), payload.clone());
            base.push(
                rate(4, sessions, cap, move || {
                    let (a, t, p) = (a.clone(), t.clone(), p.clone());
                    async move {
                        let s = t.connect(&a).await.unwrap();
                        let mut f = Framed::new(s, LengthDelimitedCodec::new());
                        framed_echo(&mut f, &p).await;
                    }
                })
                .await,
            );
        }
        let (o, b) = (median(ours), median(base));
        println!(
            "1. TLS sessions/s (connect, TLS handshake, SCRAM-SHA-256-PLUS login, one echo, close; 4 clients): switchyard {o:.0}, rustls TLS echo {b:.0}, ratio {:.2} (median of {rounds} rounds)",
            o / b
        );

        // 2. Echo round trips on one session.
        let mut session = client::connect_with(&addr, ping::NAME, &creds, &opts)
            .await
            .unwrap();
        let mut raw = Framed::new(
            client_tls.connect(&baseline).await.unwrap(),
            LengthDelimitedCodec::new(),
        );
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let start = Instant::now();
            let mut n = 0;
            while n < echoes && start.elapsed() < cap {
                framed_echo(&mut session.stream, &payload).await;
                n += 1;
            }
            ours.push(n as f64 / start.elapsed().as_secs_f64());
            let start = Instant::now();
            let mut n = 0;
            while n < echoes && start.elapsed() < cap {
                framed_echo(&mut raw, &payload).await;
                n += 1;
            }
            base.push(n as f64 / start.elapsed().as_secs_f64());
        }
        let (o, b) = (median(ours), median(base));
        println!(
            "2. echo round trips/s on one TLS session (64-byte frames): switchyard {o:.0}, raw TLS echo {b:.0}, ratio {:.2} (median of {rounds} rounds)",
            o / b
        );
    });
}
