//! gRPC change hooks on the shared port, with a tonic client.

mod common;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use switchyard::store::BuildStore;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

use common::*;
use switchyard::grpc::client::{ChangeSourceConnection, SendChangeError};
use switchyard::proto::change_source_client::ChangeSourceClient;
use switchyard::proto::{Change, PushChangeRequest};

const HOOK: UserSpec = ("hook", "hook-pw", &["change-source"]);
const PUSHER: UserSpec = ("pusher", "pusher-pw", &["change-source"]);
const OTHER_HOOK: UserSpec = ("hook2", "hook2-pw", &["change-source", "ping"]);
const PINGER: UserSpec = ("pinger", "pinger-pw", &["ping"]);

fn change(n: usize) -> Change {
    Change {
        repository: "https://git.example.org/widgets.git".into(),
        branch: "main".into(),
        revision: format!("{n:040x}"),
        author: "Ada <ada@example.org>".into(),
        comments: format!("commit number {n}"),
        category: "push".into(),
        project: "widgets".into(),
        files: vec!["src/lib.rs".into(), format!("docs/{n}.md")],
        when: Some(prost_types::Timestamp {
            seconds: 1_750_000_000 + n as i64,
            nanos: 0,
        }),
        properties: [("ci".to_string(), "yes".to_string())].into(),
    }
}

fn with_basic<T>(msg: T, user: &str, password: &str) -> Request<T> {
    let mut req = Request::new(msg);
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    req.metadata_mut()
        .insert("authorization", format!("Basic {token}").parse().unwrap());
    req
}

async fn push_as(
    client: &mut ChangeSourceClient<Channel>,
    user: &str,
    password: &str,
    c: Change,
) -> Result<i64, tonic::Status> {
    let req = with_basic(
        PushChangeRequest {
            change: Some(c),
            ..Default::default()
        },
        user,
        password,
    );
    within("PushChange", client.push_change(req))
        .await
        .map(|r| r.into_inner().id)
}

#[tokio::test]
async fn credentials_are_checked_like_native_logins() {
    let m = TestMaster::start("", &[HOOK, PINGER]).await;
    let mut client = ChangeSourceClient::new(m.grpc().await);

    // No credentials at all.
    let req = Request::new(PushChangeRequest {
        change: Some(change(0)),
        ..Default::default()
    });
    let s = within("PushChange", client.push_change(req))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("Basic"), "{}", s.message());
    // Not Basic.
    let mut req = Request::new(PushChangeRequest {
        change: Some(change(0)),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", "Bearer abc".parse().unwrap());
    assert_eq!(
        within("PushChange", client.push_change(req))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    // Wrong password and unknown user: the same answer.
    let wrong = push_as(&mut client, "hook", "nope", change(0))
        .await
        .unwrap_err();
    let unknown = push_as(&mut client, "ghost", "nope", change(0))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert_eq!(
        (wrong.code(), wrong.message()),
        (unknown.code(), unknown.message())
    );
    // A real user without the service.
    let denied = push_as(&mut client, "pinger", "pinger-pw", change(0))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains("change-source"),
        "{}",
        denied.message()
    );
    assert_eq!(
        m.master.state().change_count().await.unwrap(),
        0,
        "nothing stored by refused pushes"
    );

    // The right credentials, twice (the second from the cache).
    let a = push_as(&mut client, "hook", "hook-pw", change(1))
        .await
        .unwrap();
    let b = push_as(&mut client, "hook", "hook-pw", change(2))
        .await
        .unwrap();
    assert!(a > 0 && b > a);
    // A wrong password right after a cached success is still refused.
    assert_eq!(
        push_as(&mut client, "hook", "hook-pw2", change(3))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    m.stop().await;
}

#[tokio::test]
async fn a_pushed_change_survives_a_restart() {
    let m = TestMaster::start("", &[HOOK]).await;
    let mut client = ChangeSourceClient::new(m.grpc().await);
    let id = push_as(&mut client, "hook", "hook-pw", change(7))
        .await
        .unwrap();
    drop(client);
    let dir = m.stop_keeping_files().await;

    let m = TestMaster::start_in(dir).await;
    let stored = m
        .master
        .state()
        .change(id)
        .await
        .unwrap()
        .expect("the change is still there");
    let c = change(7);
    assert_eq!(stored.change.repository, c.repository);
    assert_eq!(stored.change.revision, c.revision);
    assert_eq!(stored.change.author, c.author);
    assert_eq!(stored.change.comments, c.comments);
    assert_eq!(stored.change.files, c.files);
    assert_eq!(stored.change.when, Some((1_750_000_007, 0)));
    assert_eq!(
        stored.change.properties.get("ci").map(String::as_str),
        Some("yes")
    );
    // New ids keep growing after the restart.
    let mut client = ChangeSourceClient::new(m.grpc().await);
    assert!(
        push_as(&mut client, "hook", "hook-pw", change(8))
            .await
            .unwrap()
            > id
    );
    m.stop().await;
}

#[tokio::test]
async fn a_batch_is_stored_in_order_or_not_at_all() {
    let m = TestMaster::start("", &[HOOK]).await;
    let mut conn = within(
        "connect",
        ChangeSourceConnection::connect(&m.addr.to_string(), "hook", "hook-pw"),
    )
    .await
    .unwrap();
    let ids = within("PushChanges", conn.push_batch((0..5).map(change).collect()))
        .await
        .unwrap();
    assert_eq!(ids.len(), 5);
    assert!(ids.windows(2).all(|w| w[1] > w[0]), "{ids:?}");
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            m.master
                .state()
                .change(*id)
                .await
                .unwrap()
                .unwrap()
                .change
                .revision,
            change(i).revision
        );
    }

    // One bad change in the middle: the error names it, nothing is stored.
    let mut bad = (0..4).map(change).collect::<Vec<_>>();
    bad[2].repository.clear();
    let err = within("PushChanges", conn.push_batch(bad))
        .await
        .unwrap_err();
    match err {
        SendChangeError::Invalid(msg) => assert_eq!(msg, "changes[2].repository: required"),
        other => panic!("{other}"),
    }
    // Too many in one batch.
    let err = within(
        "PushChanges",
        conn.push_batch((0..1001).map(change).collect()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, SendChangeError::Invalid(m) if m.contains("more than 1000")),
        "{err}"
    );
    assert_eq!(m.master.state().change_count().await.unwrap(), 5);
    m.stop().await;
}

#[tokio::test]
async fn bad_fields_are_invalid_argument_naming_the_field() {
    let m = TestMaster::start("", &[HOOK]).await;
    let mut client = ChangeSourceClient::new(m.grpc().await);
    let cases: Vec<(Change, &str)> = vec![
        (
            Change {
                repository: String::new(),
                ..change(0)
            },
            "change.repository: required",
        ),
        (
            Change {
                branch: "b".repeat(5000),
                ..change(0)
            },
            "change.branch: 5000 bytes is over the limit of 1024",
        ),
        (
            Change {
                comments: "c".repeat(70_000),
                ..change(0)
            },
            "change.comments: 70000 bytes",
        ),
        (
            Change {
                files: vec!["f".into(); 10_001],
                ..change(0)
            },
            "change.files: 10001 files",
        ),
    ];
    for (c, expected) in cases {
        let s = push_as(&mut client, "hook", "hook-pw", c)
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message().starts_with(expected),
            "{} / {expected}",
            s.message()
        );
    }
    let req = with_basic(
        PushChangeRequest {
            change: None,
            ..Default::default()
        },
        "hook",
        "hook-pw",
    );
    let s = within("PushChange", client.push_change(req))
        .await
        .unwrap_err();
    assert_eq!(
        (s.code(), s.message()),
        (Code::InvalidArgument, "change: required")
    );
    assert_eq!(m.master.state().change_count().await.unwrap(), 0);
    // And the port still takes good pushes.
    push_as(&mut client, "hook", "hook-pw", change(1))
        .await
        .unwrap();
    m.stop().await;
}

#[tokio::test]
async fn health_and_reflection_answer_without_credentials() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let m = TestMaster::start("", &[HOOK]).await;
    let channel = m.grpc().await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "switchyard.v1.ChangeSource"] {
        let r = within(
            "Health.Check",
            health.check(HealthCheckRequest {
                service: service.into(),
            }),
        )
        .await
        .unwrap();
        assert_eq!(
            r.into_inner().status(),
            ServingStatus::Serving,
            "{service:?}"
        );
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = within(
        "reflection",
        reflection.server_reflection_info(futures_util::stream::iter([req])),
    )
    .await
    .unwrap()
    .into_inner();
    let first = within("reflection answer", answers.message())
        .await
        .unwrap()
        .unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("expected a service list, got {first:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"switchyard.v1.ChangeSource".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    m.stop().await;
}

#[tokio::test]
async fn native_sessions_and_grpc_pushes_share_the_port() {
    let m = TestMaster::start("", &[HOOK, PINGER]).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let addr = m.addr.to_string();
        tasks.push(tokio::spawn(async move {
            let creds = switchyard::client::Credentials::new("pinger", "pinger-pw");
            let mut s = switchyard::client::connect(&addr, "ping", &creds)
                .await
                .unwrap();
            for j in 0..20 {
                assert_echo(&mut s, format!("{i}/{j}").as_bytes()).await;
            }
        }));
    }
    let channel = m.grpc().await;
    for i in 0..20 {
        let mut client = ChangeSourceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            for j in 0..5 {
                push_as(&mut client, "hook", "hook-pw", change(i * 100 + j))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        within("all clients", t).await.unwrap();
    }
    assert_eq!(m.master.state().change_count().await.unwrap(), 100);
    m.stop().await;
}

#[tokio::test]
async fn repeated_failures_throttle_new_grpc_clients_but_not_known_ones() {
    let m = TestMaster::start("auth_max_failures = 3", &[HOOK, PUSHER]).await;
    // The hook pushed before: its connection holds a device token.
    let mut known = switchyard::grpc::client::ChangeSourceConnection::connect(
        &m.addr.to_string(),
        "hook",
        "hook-pw",
    )
    .await
    .unwrap();
    known.push(change(1)).await.unwrap();
    assert!(known.device_token().is_some());
    let mut client = ChangeSourceClient::new(m.grpc().await);
    for _ in 0..3 {
        push_as(&mut client, "hook", "guess", change(0))
            .await
            .unwrap_err();
    }
    let s = push_as(&mut client, "hook", "hook-pw", change(0))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(
        s.message().contains("too many failed logins"),
        "{}",
        s.message()
    );
    // The same (address, user) is throttled on the native protocol as well...
    let err = m.login("hook", "hook-pw", "ping").await.err().unwrap();
    assert!(err.to_string().contains("too many failed logins"), "{err}");
    // ...but not the hook that pushed before, nor another user.
    within("a known push", known.push(change(2))).await.unwrap();
    push_as(&mut client, "pusher", "pusher-pw", change(3))
        .await
        .unwrap();
    m.stop().await;
}

/// A TCP stream that notes when the connection ends: the server closed it
/// (EOF or reset), or the client let go of it after the server's GOAWAY.
struct Watched {
    inner: TcpStream,
    closed: Arc<AtomicBool>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(res) = &r
            && (res.is_err() || buf.filled().len() == before)
        {
            self.closed.store(true, Ordering::SeqCst);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One HTTP/2 connection whose closing we can see.
async fn watched_channel(addr: std::net::SocketAddr) -> (Channel, Arc<AtomicBool>) {
    let closed = Arc::new(AtomicBool::new(false));
    let flag = closed.clone();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let flag = flag.clone();
        async move {
            let inner = TcpStream::connect(addr).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(Watched {
                inner,
                closed: flag,
            }))
        }
    });
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).unwrap();
    let channel = within("connect", endpoint.connect_with_connector(connector))
        .await
        .unwrap();
    (channel, closed)
}

#[tokio::test]
async fn a_reload_closes_the_http2_connections_of_a_revoked_user() {
    let m = TestMaster::start("", &[HOOK, OTHER_HOOK]).await;
    let (revoked_channel, revoked_closed) = watched_channel(m.addr).await;
    let (kept_channel, kept_closed) = watched_channel(m.addr).await;
    let mut revoked = ChangeSourceClient::new(revoked_channel);
    let mut kept = ChangeSourceClient::new(kept_channel);
    push_as(&mut revoked, "hook", "hook-pw", change(1))
        .await
        .unwrap();
    push_as(&mut kept, "hook2", "hook2-pw", change(2))
        .await
        .unwrap();

    // Remove `hook` from the config (its verifier line stays).
    std::fs::write(m.config_path(), config_text("", &[OTHER_HOOK])).unwrap();
    let report = m.master.reload().await.unwrap();
    assert_eq!(report.hung_up.len(), 1, "{report}");

    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !revoked_closed.load(Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked user's connection is still open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !kept_closed.load(Ordering::SeqCst),
        "another user's connection was closed"
    );
    push_as(&mut kept, "hook2", "hook2-pw", change(3))
        .await
        .unwrap();
    assert!(!kept_closed.load(Ordering::SeqCst));
    // The revoked user cannot come back.
    let mut fresh = ChangeSourceClient::new(m.grpc().await);
    assert_eq!(
        push_as(&mut fresh, "hook", "hook-pw", change(4))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    m.stop().await;
}

#[tokio::test]
async fn idle_http2_connections_of_strangers_are_closed_but_logged_in_ones_stay() {
    let m = TestMaster::start("handshake_timeout = \"300ms\"", &[HOOK]).await;
    // A stranger that sends the preface and nothing else.
    let mut silent = Raw::connect(m.addr).await;
    silent.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    // A real client that logs in, then idles.
    let (channel, closed) = watched_channel(m.addr).await;
    let mut client = ChangeSourceClient::new(channel);
    push_as(&mut client, "hook", "hook-pw", change(1))
        .await
        .unwrap();
    // A real client that never logs in (only asks for health).
    let (idle_channel, idle_closed) = watched_channel(m.addr).await;

    silent.read_to_close().await;
    // Health checks every 50 ms do not keep a stranger's connection open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(idle_channel.clone());
    let deadline = std::time::Instant::now() + WAIT;
    while !idle_closed.load(Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "a connection without a login stayed open (health checks kept it alive)"
        );
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            health.check(tonic_health::pb::HealthCheckRequest::default()),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !closed.load(Ordering::SeqCst),
        "a logged-in connection was closed for idling"
    );
    push_as(&mut client, "hook", "hook-pw", change(2))
        .await
        .unwrap();
    assert!(!closed.load(Ordering::SeqCst));
    drop(idle_channel);
    m.stop().await;
}

#[tokio::test]
async fn big_changes_and_batches_are_refused_by_their_documented_limits() {
    let m = TestMaster::start("", &[HOOK]).await;
    let mut client = ChangeSourceClient::new(m.grpc().await);
    let with_properties = |n: usize| Change {
        properties: (0..n)
            .map(|i| (format!("p{i}"), "v".repeat(64_000)))
            .collect(),
        ..change(0)
    };
    // 3.2 MB, every field within its limit: accepted, not OUT_OF_RANGE.
    push_as(&mut client, "hook", "hook-pw", with_properties(50))
        .await
        .expect("a change within every limit is accepted");
    // 5.1 MB: over the total for one change, told as such.
    let s = push_as(&mut client, "hook", "hook-pw", with_properties(80))
        .await
        .unwrap_err();
    assert_eq!(
        s.code(),
        Code::InvalidArgument,
        "{} {:?}",
        s.message(),
        s.metadata()
    );
    assert!(s.message().contains("limit"), "{}", s.message());
    // A batch of six 3.2 MB changes: over the batch's byte cap, nothing stored.
    let mut conn = ChangeSourceConnection::connect(&m.addr.to_string(), "hook", "hook-pw")
        .await
        .unwrap();
    let err = within(
        "PushChanges",
        conn.push_batch((0..6).map(|_| with_properties(50)).collect()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, SendChangeError::Invalid(m) if m.contains("bytes in one batch")),
        "{err}"
    );
    assert_eq!(m.master.state().change_count().await.unwrap(), 1);
    // Not protobuf at all (a string field that is not UTF-8): INVALID_ARGUMENT.
    let mut raw = tonic::client::Grpc::new(m.grpc().await);
    raw.ready().await.unwrap();
    let change_bytes = vec![0x0a, 0x02, 0xff, 0xfe]; // Change.repository = b"\xff\xfe"
    let req = with_basic(change_bytes, "hook", "hook-pw");
    let s = within(
        "a raw PushChange",
        raw.unary::<_, switchyard::proto::PushChangeResponse, _>(
            req,
            "/switchyard.v1.ChangeSource/PushChange".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
    // The port still takes good pushes.
    push_as(&mut client, "hook", "hook-pw", change(2))
        .await
        .unwrap();
    m.stop().await;
}

/// One router serves HTTP/1.1 and HTTP/2: `/healthz` answers over HTTP/2
/// as well (plain, not gRPC), and an unknown path gets the note.
#[tokio::test]
async fn http2_gets_the_same_router_as_http1() {
    use http_body_util::{BodyExt, Empty};
    let m = TestMaster::start("", &[ADMIN]).await;
    let stream = TcpStream::connect(m.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for (path, status, body) in [("/healthz", 200, "ok\n"), ("/no/such/page", 404, "SWYD/1")] {
        let req = http::Request::get(format!("http://{}{path}", m.addr))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = within("an HTTP/2 answer", send.send_request(req))
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path}");
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&text);
        assert!(text.contains(body), "{path}: {text}");
    }
    m.stop().await;
}

#[tokio::test]
async fn metrics_need_the_metrics_grant_and_count_builds() {
    const PROM: UserSpec = ("prom", "prom-pw", &["metrics"]);
    let users = [HOOK, ADMIN, PROM];
    let config = |extra: &str| widgets_config(&users, "echo hello", extra);
    let m = widgets_master(&users, "echo hello").await;

    let (head, _) = get_metrics(&m, None).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: basic"),
        "{head}"
    );
    let (head, _) = get_metrics(&m, Some(&basic("prom", "wrong"))).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let (head, body) = get_metrics(&m, Some(&basic(ADMIN.0, ADMIN.1))).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(body.contains("may not use service \"metrics\""), "{body}");

    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    push(&m, "main").await;
    assert_eq!(builds_ended(&mut events, 1).await[0].1, "success");
    let (head, body) = get_metrics(&m, Some(&basic("prom", "prom-pw"))).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    for line in [
        "switchyard_builds_total{builder=\"widgets\",result=\"success\"} 1",
        "switchyard_build_duration_seconds_count{builder=\"widgets\"} 1",
        "switchyard_step_duration_seconds_count{builder=\"widgets\",step=\"step\",result=\"success\"} 1",
        "switchyard_workers_connected 1",
        "switchyard_queue_length{builder=\"widgets\"} 0",
        "switchyard_log_bytes_stored_total 6",
        // The one wrong password above; nobody throttled; the worker's
        // native session.
        "switchyard_logins_total{outcome=\"failed\"} 1",
        "switchyard_logins_total{outcome=\"throttled\"} 0",
        "switchyard_sessions_opened_total{service=\"worker\"} 1",
    ] {
        assert!(body.lines().any(|l| l == line), "no {line} in:\n{body}");
    }
    // Requests by route and status, gRPC calls by method and code; paths
    // not served are `other`.
    for line in [
        "switchyard_http_requests_total{route=\"/metrics\",status=\"401\"} 2",
        "switchyard_http_requests_total{route=\"/metrics\",status=\"403\"} 1",
        "switchyard_grpc_requests_total{method=\"/switchyard.v1.ChangeSource/PushChange\",code=\"OK\"} 1",
    ] {
        assert!(body.lines().any(|l| l == line), "no {line} in:\n{body}");
    }
    // Four HTTP/1 connections so far (this scrape included).
    let http1: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("switchyard_connections_total{protocol=\"http1\"} "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert_eq!(http1, 4, "{body}");

    // A broken config is rejected (and counted).
    std::fs::write(m.config_path(), config("\n[web]\npublik = true\n")).unwrap();
    let err = within("a reload", m.master.reload()).await.unwrap_err();
    assert!(err.to_string().contains("publik"), "{err}");
    // `[web] public_metrics = true`: no credentials needed.
    std::fs::write(m.config_path(), config("\n[web]\npublic_metrics = true\n")).unwrap();
    within("a reload", m.master.reload()).await.unwrap();
    let mut raw = Raw::connect(m.addr).await;
    raw.write(b"GET /made/up/path HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    raw.read_to_close().await;
    let (head, body) = get_metrics(&m, None).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        body.contains("switchyard_reloads_total{outcome=\"applied\"} 1")
            && body.contains("switchyard_reloads_total{outcome=\"rejected\"} 1")
            && body.contains("switchyard_reload_duration_seconds_count 2"),
        "{body}"
    );
    assert!(
        body.lines()
            .any(|l| l == "switchyard_http_requests_total{route=\"other\",status=\"404\"} 1"),
        "{body}"
    );
    assert!(!body.contains("made/up"), "{body}");
    m.stop().await;
}

#[tokio::test]
async fn the_json_api_lists_filters_and_pages_builds_for_a_web_user() {
    const VIEWER: UserSpec = ("viewer", "viewer-pw", &["web"]);
    let users = [HOOK, ADMIN, VIEWER];
    let check = "test \"$SWITCHYARD_BRANCH\" != bad";
    let config = |extra: &str| widgets_config(&users, check, extra);
    let m = widgets_master(&users, check).await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    for branch in ["main", "bad", "main"] {
        push(&m, branch).await;
        builds_ended(&mut events, 1).await;
    }
    let viewer = basic("viewer", "viewer-pw");
    let get = |path: String| api_get(&m, path, viewer.clone());
    // Who may read.
    let (head, _) = http_get(&m, "/api/v1/builds", None).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    // `debug` may read too; a hook may not.
    let (head, _) = http_get(&m, "/api/v1/builds", Some(&basic(ADMIN.0, ADMIN.1))).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (head, _) = http_get(&m, "/api/v1/builds", Some(&basic(HOOK.0, HOOK.1))).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    // Newest first; filters; pages.
    let (status, all) = get("/api/v1/builds".into()).await;
    assert_eq!(status, 200, "{all}");
    let builds = all["builds"].as_array().unwrap();
    assert_eq!(builds.len(), 3);
    assert!(builds[0]["id"].as_i64() > builds[1]["id"].as_i64());
    assert_eq!(builds[1]["branch"], "bad");
    assert!(all["next_before"].is_null());
    let (_, failed) = get("/api/v1/builds?result=failure".into()).await;
    assert_eq!(failed["builds"].as_array().unwrap().len(), 1);
    assert_eq!(failed["builds"][0]["branch"], "bad");
    let (_, main) = get("/api/v1/builds?branch=main&builder=widgets".into()).await;
    assert_eq!(main["builds"].as_array().unwrap().len(), 2);
    let (_, page) = get("/api/v1/builds?limit=2".into()).await;
    assert_eq!(page["builds"].as_array().unwrap().len(), 2);
    assert_eq!(page["next_before"], builds[1]["id"]);
    let next = format!(
        "/api/v1/builds?limit=2&before={}",
        page["next_before"].as_i64().unwrap()
    );
    let (_, rest) = get(next).await;
    assert_eq!(rest["builds"].as_array().unwrap().len(), 1);
    assert_eq!(rest["builds"][0]["id"], builds[2]["id"]);

    // One build, with its change; builders; workers.
    let one = format!("/api/v1/builds/{}", builds[1]["id"]);
    let (status, b) = get(one).await;
    assert_eq!(status, 200);
    assert_eq!(b["result"], "failure");
    assert_eq!(b["changes"][0]["branch"], "bad");
    assert_eq!(b["properties"]["branch"]["source"], "change");
    let (_, builders) = get("/api/v1/builders".into()).await;
    assert_eq!(builders["builders"][0]["name"], "widgets");
    let (_, workers) = get("/api/v1/workers".into()).await;
    assert_eq!(workers["workers"][0]["name"], "w1");
    assert_eq!(workers["workers"][0]["connected"], true);
    // Changes, newest first, with the builds they made; nothing waits.
    let (_, changes) = get("/api/v1/changes?limit=2".into()).await;
    let list = changes["changes"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[1]["branch"], "bad");
    assert_eq!(list[1]["builds"][0], builds[1]["id"]);
    let next = format!(
        "/api/v1/changes?before={}",
        changes["next_before"].as_i64().unwrap()
    );
    let (_, older) = get(next).await;
    assert_eq!(older["changes"].as_array().unwrap().len(), 1);
    let (_, requests) = get("/api/v1/requests".into()).await;
    assert_eq!(requests["requests"], serde_json::json!([]));

    // Mistakes are 400 or 404, with what went wrong.
    for (path, status, says) in [
        ("/api/v1/builds?limit=0", 400, "limit"),
        ("/api/v1/builds?result=weird", 400, "result"),
        ("/api/v1/builds?colour=red", 400, "colour"),
        ("/api/v1/builds?builder=nosuch", 404, "nosuch"),
        ("/api/v1/builds/abc", 400, "number"),
        ("/api/v1/builds/99999", 404, "99999"),
    ] {
        let (got, body) = get(path.to_string()).await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(says),
            "{path}: {body}"
        );
    }

    // Actions need the `debug` grant.
    let (status, _) = http_post(&m, "/api/v1/builders/widgets/force", None, "").await;
    assert_eq!(status, 401);
    let (status, _) = http_post(&m, "/api/v1/builders/widgets/force", Some(&viewer), "").await;
    assert_eq!(status, 403);
    let admin = basic(ADMIN.0, ADMIN.1);
    let (status, body) = http_post(
        &m,
        "/api/v1/builders/widgets/force",
        Some(&admin),
        r#"{"branch": "feature", "properties": {"ticket": "T-7"}}"#,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert!(body["request_id"].as_i64().unwrap() > 0);
    let forced = builds_ended(&mut events, 1).await;
    let forced = m.master.state().build(forced[0].0).await.unwrap().unwrap();
    assert_eq!(forced.branch, "feature");
    for (path, body, status, says) in [
        ("/api/v1/builders/widgets/force", "{not json", 400, "body"),
        (
            "/api/v1/builders/widgets/force",
            r#"{"colour": 1}"#,
            400,
            "colour",
        ),
        ("/api/v1/builders/nosuch/force", "", 404, "nosuch"),
        ("/api/v1/builds/1/stop", "", 404, "1"),
    ] {
        let (got, reply) = http_post(&m, path, Some(&admin), body).await;
        assert_eq!(got, status, "{path}: {reply}");
        assert!(
            reply["error"].as_str().unwrap().contains(says),
            "{path}: {reply}"
        );
    }
    // A rebuild of the failed build builds the same branch again.
    let path = format!("/api/v1/builds/{}/rebuild", builds[1]["id"]);
    let (status, reply) = http_post(&m, &path, Some(&admin), "").await;
    assert_eq!(status, 202, "{reply}");
    let again = builds_ended(&mut events, 1).await;
    assert_eq!(again[0].1, "failure");
    let again = m.master.state().build(again[0].0).await.unwrap().unwrap();
    assert_eq!(again.branch, "bad");
    let of = again.properties.iter().find(|(n, _, _)| n == "rebuild_of");
    assert_eq!(
        of.map(|(_, v, _)| v.as_str()),
        builds[1]["id"].to_string().as_str().into()
    );

    // `[web] public = true`: anyone may read, nobody may act unnamed.
    std::fs::write(m.config_path(), config("\n[web]\npublic = true\n")).unwrap();
    within("a reload", m.master.reload()).await.unwrap();
    let (head, _) = http_get(&m, "/api/v1/builders", None).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (status, _) = http_post(&m, "/api/v1/builders/widgets/force", None, "").await;
    assert_eq!(status, 401);
    m.stop().await;
}

#[tokio::test]
async fn a_builds_log_downloads_raw_whole_or_by_range() {
    const VIEWER: UserSpec = ("viewer", "viewer-pw", &["web"]);
    let users = [HOOK, ADMIN, VIEWER];
    let gate = tempfile::tempdir().unwrap();
    let go = gate.path().join("go");
    let m = widgets_master(
        &users,
        &format!(
            "seq 1 200000; while [ ! -e {} ]; do sleep 0.05; done; echo done",
            go.display()
        ),
    )
    .await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    push(&m, "main").await;
    let expected: String = (1..=200000).map(|n| format!("{n}\n")).collect::<String>() + "done\n";
    let viewer = basic("viewer", "viewer-pw");
    // (All on stdout: how two streams interleave is up to the worker's
    // reads.) HTTP/1.0: the body ends with the connection (no chunked
    // encoding).
    let get = |path: String| {
        let viewer = viewer.clone();
        let addr = m.addr;
        async move {
            let mut raw = Raw::connect(addr).await;
            raw.write(format!("GET {path} HTTP/1.0\r\nAuthorization: {viewer}\r\n\r\n").as_bytes())
                .await;
            let reply = raw.read_to_close().await;
            let at = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            let head = String::from_utf8_lossy(&reply[..at]).to_string();
            (head, reply[at + 4..].to_vec())
        }
    };
    // While the step runs: its last lines and a range, from the log file
    // being written.
    let id = within("the build to start", async {
        loop {
            if let Some(b) = m.master.state().builds(None, 1).await.unwrap().first() {
                return b.id;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    within("the output so far", async {
        loop {
            let (_, last) = get(format!("/api/v1/builds/{id}/log?tail=2")).await;
            if last == b"199999\n200000\n" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (_, range) = get(format!("/api/v1/builds/{id}/log?start=100000&end=100020")).await;
    assert_eq!(range, &expected.as_bytes()[100000..100020]);
    std::fs::write(&go, "").unwrap();
    assert_eq!(builds_ended(&mut events, 1).await[0].0, id);
    // Once ended, the log is compressed, and reads the same.
    let logs = m.dir.path().join("logs");
    within("the log to be compressed", async {
        loop {
            let zst = walk(&logs)
                .into_iter()
                .any(|p| p.extension().is_some_and(|e| e == "zst"));
            let plain = walk(&logs)
                .into_iter()
                .any(|p| p.extension().is_some_and(|e| e == "log"));
            if zst && !plain {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (head, body) = get(format!("/api/v1/builds/{id}/log")).await;
    assert!(
        head.contains(" 200 ") && head.contains("text/plain"),
        "{head}"
    );
    assert!(
        body == expected.as_bytes(),
        "the log differs ({} bytes)",
        body.len()
    );
    let (_, one) = get(format!("/api/v1/builds/{id}/log?step=step")).await;
    assert!(one == expected.as_bytes());
    let (_, range) = get(format!("/api/v1/builds/{id}/log?start=100000&end=100020")).await;
    assert_eq!(range, &expected.as_bytes()[100000..100020]);
    let (_, tail) = get(format!(
        "/api/v1/builds/{id}/log?start={}",
        expected.len() - 12
    ))
    .await;
    assert_eq!(tail, b"0\n200000\ndone\n"[2..]);
    // The last lines, read backwards (what a huge log opens at).
    let (head, last) = get(format!("/api/v1/builds/{id}/log?tail=3")).await;
    assert!(head.contains(" 200 "), "{head}");
    assert_eq!(String::from_utf8_lossy(&last), "199999\n200000\ndone\n");
    let (_, last) = get(format!("/api/v1/builds/{id}/log?tail=1&step=0")).await;
    assert_eq!(String::from_utf8_lossy(&last), "done\n");
    for (path, status) in [
        (format!("/api/v1/builds/{id}/log?tail=0"), " 400 "),
        (format!("/api/v1/builds/{id}/log?tail=2&start=5"), " 400 "),
        (format!("/api/v1/builds/{id}/log?step=nosuch"), " 404 "),
        (format!("/api/v1/builds/{id}/log?start=9&end=3"), " 400 "),
        ("/api/v1/builds/99999/log".to_string(), " 404 "),
    ] {
        let (head, _) = get(path.clone()).await;
        assert!(head.contains(status), "{path}: {head}");
    }
    // The database keeps the log's size and line count, not its bytes.
    let (bytes, lines): (i64, i64) = m
        .master
        .state()
        .read(move |c| {
            c.query_row(
                "SELECT log_bytes, log_lines FROM steps WHERE build_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
        .unwrap();
    assert_eq!((bytes as usize, lines), (expected.len(), 200_001));
    let compressed: u64 = walk(&logs)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "zst"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(compressed < expected.len() as u64 / 2, "{compressed} bytes");
    m.stop().await;
}

/// Every file under `dir`, recursively.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn a_spool_sends_in_order_and_sets_aside_what_the_master_refuses() {
    use switchyard::grpc::spool::ChangeSpool;
    let m = TestMaster::start("", &[HOOK]).await;
    let dir = tempfile::tempdir().unwrap();
    let spool = ChangeSpool::open(&dir.path().join("spool")).unwrap();
    let lock = spool.lock(Duration::from_secs(5)).await.unwrap();
    let mut bad = change(2);
    bad.repository.clear();
    for c in [change(1), bad, change(3)] {
        lock.add(&c).unwrap();
    }
    // A second sendchange waits for the lock, and gives up in time.
    let busy = spool.lock(Duration::from_millis(200)).await;
    assert!(busy.is_err());
    let mut conn = switchyard::grpc::client::ChangeSourceConnection::connect(
        &m.addr.to_string(),
        HOOK.0,
        HOOK.1,
    )
    .await
    .unwrap();
    let flushed = lock.flush(&mut conn).await.unwrap();
    assert_eq!(flushed.sent.len(), 2);
    assert!(flushed.stopped.is_none());
    assert_eq!(flushed.rejected.len(), 1);
    let (moved, why) = &flushed.rejected[0];
    assert!(
        moved.starts_with(dir.path().join("spool/rejected")),
        "{moved:?}"
    );
    assert!(why.contains("repository"), "{why}");
    assert!(moved.with_extension("why").exists());
    assert!(lock.pending().unwrap().is_empty());
    let stored = m.master.state().changes_after(0, 10).await.unwrap();
    let revisions: Vec<&str> = stored.iter().map(|c| c.change.revision.as_str()).collect();
    assert_eq!(revisions, [change(1).revision, change(3).revision]);

    // The master stored a change but its answer never came (or the hook
    // died before removing the file): the file is still there and is sent
    // again, and the master stores nothing twice.
    lock.add(&change(4)).unwrap();
    let file = lock.pending().unwrap().remove(0);
    let kept = std::fs::read(&file).unwrap();
    let first = lock.flush(&mut conn).await.unwrap();
    assert_eq!(first.sent.len(), 1);
    std::fs::write(&file, &kept).unwrap();
    let again = lock.flush(&mut conn).await.unwrap();
    assert_eq!(again.sent.len(), 1);
    assert_eq!(again.sent[0].1, first.sent[0].1, "the same change's id");
    assert!(lock.pending().unwrap().is_empty());
    let stored = m.master.state().changes_after(0, 10).await.unwrap();
    assert_eq!(stored.len(), 3, "{stored:?}");

    // A spool written before keys existed (a bare `Change` per file) is
    // still sent, in order.
    std::fs::write(
        dir.path().join("spool/000000000007.change"),
        prost::Message::encode_to_vec(&change(5)),
    )
    .unwrap();
    lock.add(&change(6)).unwrap();
    let flushed = lock.flush(&mut conn).await.unwrap();
    assert_eq!(flushed.sent.len(), 2);
    let stored = m.master.state().changes_after(0, 10).await.unwrap();
    let revisions: Vec<&str> = stored.iter().map(|c| c.change.revision.as_str()).collect();
    assert_eq!(revisions[3..], [change(5).revision, change(6).revision]);
    m.stop().await;
}

#[tokio::test]
async fn a_push_with_a_key_is_stored_once_per_user() {
    let m = TestMaster::start("", &[HOOK, PUSHER]).await;
    let mut client = ChangeSourceClient::new(m.grpc().await);
    let keyed = |n: usize, key: &str| PushChangeRequest {
        change: Some(change(n)),
        idempotency_key: key.to_string(),
    };
    let push = |req: PushChangeRequest, user: &'static str, pw: &'static str| {
        let mut client = client.clone();
        async move {
            within("PushChange", client.push_change(with_basic(req, user, pw)))
                .await
                .map(|r| r.into_inner().id)
        }
    };
    let a = push(keyed(1, "k-1"), HOOK.0, HOOK.1).await.unwrap();
    // The same key again: the first id, whatever the change says.
    assert_eq!(push(keyed(1, "k-1"), HOOK.0, HOOK.1).await.unwrap(), a);
    assert_eq!(push(keyed(9, "k-1"), HOOK.0, HOOK.1).await.unwrap(), a);
    // Keys are the user's own: another user's same key is another push.
    let b = push(keyed(2, "k-1"), PUSHER.0, PUSHER.1).await.unwrap();
    assert_ne!(a, b);
    // No key: every push is stored.
    let c = push(keyed(3, ""), HOOK.0, HOOK.1).await.unwrap();
    let d = push(keyed(3, ""), HOOK.0, HOOK.1).await.unwrap();
    assert_ne!(c, d);
    // A key too long is refused, and says why.
    let long = "x".repeat(129);
    let e = push(keyed(4, &long), HOOK.0, HOOK.1).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("idempotency_key"), "{}", e.message());
    let stored = m.master.state().changes_after(0, 10).await.unwrap();
    let revisions: Vec<&str> = stored.iter().map(|s| s.change.revision.as_str()).collect();
    assert_eq!(
        revisions,
        [
            change(1).revision,
            change(2).revision,
            change(3).revision,
            change(3).revision
        ]
    );

    // A batch: the first message's key covers it; sent again, the same ids.
    let batch = |keys: [&str; 2]| {
        let reqs: Vec<PushChangeRequest> = vec![keyed(5, keys[0]), keyed(6, keys[1])];
        with_basic(futures_util::stream::iter(reqs), HOOK.0, HOOK.1)
    };
    let first = within("PushChanges", client.push_changes(batch(["b-1", ""])))
        .await
        .unwrap()
        .into_inner()
        .ids;
    let second = within("PushChanges", client.push_changes(batch(["b-1", "b-1"])))
        .await
        .unwrap()
        .into_inner()
        .ids;
    assert_eq!(first.len(), 2);
    assert_eq!(first, second);
    let e = within("PushChanges", client.push_changes(batch(["b-2", "b-3"])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("changes[1].idempotency_key"),
        "{}",
        e.message()
    );
    assert_eq!(
        m.master.state().changes_after(0, 10).await.unwrap().len(),
        6
    );
    m.stop().await;
}
