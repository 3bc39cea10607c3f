//! TLS on the shared port, each figure against a baseline measured in the
//! same run, reported as a ratio:
//!
//! 1. TLS sessions per second (TCP connect, TLS handshake, SCRAM-SHA-256-PLUS
//!    login to `ping`, one echo, close) against a plain rustls TLS echo
//!    server (connect, handshake, one echo, close), four clients at once;
//! 2. echo round trips on one TLS session against a raw TLS echo server
//!    with the same framing;
//! 3. a step printing 1 GiB, force to build end, on a worker connected over
//!    TLS against the same on a worker connected over plain TCP, with a real
//!    master process and real worker processes (alternating).
//!
//! Both servers run in this process with the same certificate and crypto
//! (rustls, ring). Run: `cargo bench --bench tls` (`-- quick` for a short
//! run). Everything talks to 127.0.0.1, every loop is bounded in count and
//! time.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use support::{framed_echo, median, rate, switchyard_port};
use switchyard::client::{self, ClientOptions, Credentials};
use switchyard::dispatcher::tls::TlsSettings;
use switchyard::services::ping;
use switchyard::wire::tls::{ClientTls, Trust};

/// A certificate for localhost in a temp dir, loaded.
fn settings(dir: &std::path::Path) -> (TlsSettings, String) {
    let (cert, key, pin) = switchyard::dispatcher::tls::self_signed(&["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    let s = TlsSettings::load(&dir.join("cert.pem"), &dir.join("key.pem"), true).unwrap();
    (s, pin)
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

/// Part 3: a master process with TLS, a worker over TLS and one in clear;
/// each builds a step printing `bytes`, alternately. Seconds, force to
/// build end: (over TLS, in clear) medians.
async fn big_log(bytes: u64, rounds: usize) -> (f64, f64) {
    use switchyard::proto::debug_client::DebugClient;
    use switchyard::proto::{ForceRequest, WatchRequest, WorkersRequest, debug_event};
    let dir = tempfile::tempdir().unwrap();
    let (_, pin) = settings(dir.path());
    let mut config = String::from(
        "[master]\nlisten = \"127.0.0.1:0\"\nsecrets = \"secrets.toml\"\n[master.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\n[[user]]\nname = \"admin\"\nservices = [\"debug\"]\n\n[[worker]]\nname = \"tls\"\n\n[[worker]]\nname = \"plain\"\n",
    );
    for w in ["tls", "plain"] {
        config.push_str(&format!(
            "\n[[builder]]\nname = \"big-{w}\"\nworkers = [\"{w}\"]\n[[builder.step]]\nname = \"print\"\nshell = \"head -c {bytes} /dev/zero\"\n"
        ));
    }
    std::fs::write(dir.path().join("master.toml"), config).unwrap();
    std::fs::write(
        dir.path().join("secrets.toml"),
        format!(
            "[verifiers]\nadmin = {:?}\ntls = {:?}\nplain = {:?}\n",
            support::verifier("admin-pw"),
            support::verifier("worker-pw"),
            support::verifier("worker-pw")
        ),
    )
    .unwrap();
    let (_master, addr) = support::spawn_master(dir.path());
    let _tls = support::spawn_worker_args(
        &addr,
        "tls",
        &dir.path().join("w-tls"),
        &["--tls", "--pin-sha256", &pin, "--server-name", "localhost"],
    );
    let _plain = support::spawn_worker(&addr, "plain", &dir.path().join("w-plain"));
    let auth: tonic::metadata::MetadataValue<_> = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "admin:admin-pw")
    )
    .parse()
    .unwrap();
    fn with<T>(
        m: T,
        auth: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    ) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.metadata_mut().insert("authorization", auth.clone());
        r
    }
    let req_workers = || with(WorkersRequest {}, &auth);
    let mut debug = DebugClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let w = debug.workers(req_workers()).await.unwrap().into_inner();
        if w.workers.iter().filter(|w| w.connected).count() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the workers did not connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut events = debug
        .watch(with(WatchRequest {}, &auth))
        .await
        .unwrap()
        .into_inner();
    let (mut over_tls, mut clear) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (builder, out) in [("big-tls", &mut over_tls), ("big-plain", &mut clear)] {
            let start = Instant::now();
            debug
                .force(with(
                    ForceRequest {
                        builder: builder.into(),
                        ..Default::default()
                    },
                    &auth,
                ))
                .await
                .unwrap();
            loop {
                let e = tokio::time::timeout(Duration::from_secs(600), events.next())
                    .await
                    .expect("the build ends")
                    .unwrap()
                    .unwrap();
                if let Some(debug_event::Kind::BuildEnded(b)) = e.kind {
                    assert_eq!(b.result, "success");
                    break;
                }
            }
            out.push(start.elapsed().as_secs_f64());
        }
    }
    (median(over_tls), median(clear))
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
        let (addr, _, _shutdown) = switchyard_port(Some(ours_tls)).await;
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

        // 3. A big log over a TLS worker link.
        let (log, log_rounds) = if quick { (64u64 << 20, 2) } else { (1u64 << 30, 3) };
        let (t, p) = big_log(log, log_rounds).await;
        let mib = (log >> 20) as f64;
        println!(
            "3. a step printing {mib:.0} MiB, force to build end: worker over TLS {t:.2} s ({:.0} MiB/s), worker in clear {p:.2} s ({:.0} MiB/s), ratio (clear/TLS time) {:.2} (median of {log_rounds} rounds each, alternating)",
            mib / t,
            mib / p,
            p / t
        );
    });
}
