//! Using the Dispatcher as a library: registering services, what a handler
//! is given, and pluggable checkers.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use common::*;
use switchyard::auth::{Capability, ChainChecker, Checker, CheckerError, InMemoryChecker};
use switchyard::client::{self, ClientError, Credentials};
use switchyard::dispatcher::{
    AccessPolicy, Dispatcher, Limits, RegistryError, ServiceOptions, Session,
};
use switchyard::proto::RejectCode;

/// A directory-style checker that can only judge cleartext passwords; it
/// counts how often it is asked.
struct Directory {
    asked: AtomicUsize,
}

#[async_trait]
impl Checker for Directory {
    fn capability(&self) -> Capability {
        Capability::Cleartext
    }
    async fn check_cleartext(
        &self,
        _user: &str,
        password: &[u8],
    ) -> Result<Option<bool>, CheckerError> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        Ok(Some(password == b"directory-pw"))
    }
}

async fn whoami(mut session: Session) {
    let line = format!(
        "{} {} {} {}",
        session.user,
        session.service,
        session.peer.ip(),
        session.id
    );
    let _ = session.stream.send(bytes::Bytes::from(line)).await;
    // Then echo until hung up or closed.
    loop {
        tokio::select! {
            _ = session.hangup.requested() => break,
            f = session.stream.next() => match f {
                Some(Ok(b)) => { let _ = session.stream.send(b.freeze()).await; }
                _ => break,
            },
        }
    }
}

struct Port {
    addr: String,
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
}

async fn port(
    checker: Arc<dyn Checker>,
    policy: AccessPolicy,
    options: ServiceOptions,
) -> (Port, switchyard::dispatcher::Registration) {
    let dispatcher = Dispatcher::new(Limits::default(), checker, policy);
    let reg = dispatcher
        .registry()
        .register("whoami", options, whoami)
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    let (d, s) = (dispatcher.clone(), shutdown.clone());
    tokio::spawn(async move { d.serve(listener, s).await });
    (
        Port {
            addr,
            dispatcher,
            shutdown,
        },
        reg,
    )
}

#[tokio::test]
async fn handler_gets_user_service_peer_and_session_id_and_unregistering_stops_new_sessions() {
    let users = Arc::new(InMemoryChecker::new());
    users.insert_password("alice", "alice-pw");
    let (p, reg) = port(
        users,
        AccessPolicy::default().grant("alice", ["whoami"]),
        ServiceOptions::default(),
    )
    .await;
    let creds = Credentials::new("alice", "alice-pw");
    let mut s = within("login", client::connect(&p.addr, "whoami", &creds))
        .await
        .unwrap();
    let first = within("whoami line", s.stream.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8(first.to_vec()).unwrap(),
        format!("alice whoami 127.0.0.1 {}", s.session_id)
    );

    assert_eq!(
        p.dispatcher
            .registry()
            .register("whoami", ServiceOptions::default(), whoami)
            .err(),
        Some(RegistryError::AlreadyRegistered("whoami".into()))
    );
    assert_eq!(p.dispatcher.registry().names(), vec!["whoami".to_string()]);

    reg.unregister();
    let err = within("login", client::connect(&p.addr, "whoami", &creds))
        .await
        .err()
        .unwrap();
    assert_eq!(err.reject_code(), Some(RejectCode::UnknownService));
    // The session that was already running is the handler's to finish.
    s.stream
        .send(bytes::Bytes::from_static(b"still"))
        .await
        .unwrap();
    assert_eq!(
        &within("echo", s.stream.next()).await.unwrap().unwrap()[..],
        b"still"
    );

    // Registering again puts the service back.
    let _reg = p
        .dispatcher
        .registry()
        .register("whoami", ServiceOptions::default(), whoami)
        .unwrap();
    within("login", client::connect(&p.addr, "whoami", &creds))
        .await
        .unwrap();
    p.shutdown.cancel();
}

#[tokio::test]
async fn per_service_frame_limit() {
    let users = Arc::new(InMemoryChecker::new());
    users.insert_password("alice", "alice-pw");
    let (p, _reg) = port(
        users,
        AccessPolicy::default().grant("alice", ["whoami"]),
        ServiceOptions {
            max_frame_length: 1024,
        },
    )
    .await;
    let creds = Credentials::new("alice", "alice-pw");
    let mut s = within("login", client::connect(&p.addr, "whoami", &creds))
        .await
        .unwrap();
    within("whoami line", s.stream.next())
        .await
        .unwrap()
        .unwrap();
    s.stream
        .send(bytes::Bytes::from(vec![1u8; 1024]))
        .await
        .unwrap();
    assert_eq!(
        within("echo", s.stream.next())
            .await
            .unwrap()
            .unwrap()
            .len(),
        1024
    );
    s.stream
        .send(bytes::Bytes::from(vec![1u8; 1025]))
        .await
        .unwrap();
    assert_hung_up(&mut s, WAIT).await;
    p.shutdown.cancel();
}

#[tokio::test]
async fn a_cleartext_only_checker_is_never_offered_on_a_plain_connection() {
    let directory = Arc::new(Directory {
        asked: AtomicUsize::new(0),
    });
    let users = Arc::new(InMemoryChecker::new());
    users.insert_password("alice", "alice-pw");
    let chain = ChainChecker::new(vec![directory.clone(), users]);
    let policy = AccessPolicy::default()
        .grant("alice", ["whoami"])
        .grant("dave", ["whoami"]);
    let (p, _reg) = port(Arc::new(chain), policy, ServiceOptions::default()).await;

    // Dave is known only to the directory: SCRAM cannot use it, so he fails
    // like an unknown user, and the directory never sees his password.
    let dave = Credentials::new("dave", "directory-pw");
    let err = within("login", client::connect(&p.addr, "whoami", &dave))
        .await
        .err()
        .unwrap();
    assert_eq!(err.reject_code(), Some(RejectCode::AuthFailed));
    // A mechanism that would carry the password is not offered here.
    let mut raw = Raw::native(p.addr.parse().unwrap()).await;
    raw.send(&switchyard::proto::ClientHandshake {
        kind: Some(switchyard::proto::client_handshake::Kind::Hello(
            switchyard::proto::Hello {
                service: "whoami".into(),
                mechanism: "PLAIN".into(),
                initial_response: b"\0dave\0directory-pw".to_vec(),
                client_agent: String::new(),
                device_token: String::new(),
            },
        )),
    })
    .await;
    match raw.recv().await.and_then(|m| m.kind) {
        Some(switchyard::proto::server_handshake::Kind::Reject(r)) => {
            assert_eq!(r.code, RejectCode::UnsupportedMechanism as i32)
        }
        other => panic!("expected UNSUPPORTED_MECHANISM, got {other:?}"),
    }
    assert_eq!(directory.asked.load(Ordering::SeqCst), 0);
    // The verifier-capable member of the chain still serves alice.
    let alice = Credentials::new("alice", "alice-pw");
    within("login", client::connect(&p.addr, "whoami", &alice))
        .await
        .unwrap();
    p.shutdown.cancel();
}

#[tokio::test]
async fn a_client_refuses_an_impostor_master() {
    // A fake master that accepts any proof and answers Welcome with a made-up
    // signature: it does not know alice's verifier, and the client must say so.
    use prost::Message;
    use switchyard::proto::{
        Challenge, ClientHandshake, ServerHandshake, Welcome, client_handshake, server_handshake,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn read_msg(io: &mut tokio::net::TcpStream) -> ClientHandshake {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        io.read_exact(&mut body).await.unwrap();
        ClientHandshake::decode(&body[..]).unwrap()
    }
    async fn write_msg(io: &mut tokio::net::TcpStream, kind: server_handshake::Kind) {
        let body = ServerHandshake { kind: Some(kind) }.encode_to_vec();
        io.write_all(&(body.len() as u32).to_be_bytes())
            .await
            .unwrap();
        io.write_all(&body).await.unwrap();
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fake = tokio::spawn(async move {
        let (mut io, _) = listener.accept().await.unwrap();
        let mut magic = [0u8; 8];
        io.read_exact(&mut magic).await.unwrap();
        let Some(client_handshake::Kind::Hello(h)) = read_msg(&mut io).await.kind else {
            panic!("no Hello")
        };
        let first = String::from_utf8(h.initial_response).unwrap();
        let nonce = first.rsplit_once("r=").unwrap().1.to_string();
        let data = format!("r={nonce}fake,s=c2FsdHNhbHQ=,i=4096").into_bytes();
        write_msg(
            &mut io,
            server_handshake::Kind::Challenge(Challenge { data }),
        )
        .await;
        read_msg(&mut io).await;
        let data = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=".to_vec();
        write_msg(
            &mut io,
            server_handshake::Kind::Welcome(Welcome {
                data,
                session_id: "x".into(),
                ..Default::default()
            }),
        )
        .await;
    });
    let err = within(
        "login",
        client::connect(&addr, "whoami", &Credentials::new("alice", "alice-pw")),
    )
    .await
    .expect_err("an impostor must not get a session");
    assert!(
        matches!(
            err,
            ClientError::Scram(switchyard::auth::scram::ScramError::ServerSignature)
        ),
        "{err}"
    );
    within("fake master", fake).await.unwrap();
}
