//! The native handshake over real TCP: SCRAM, routing, and every way a
//! client can get it wrong, each followed by a good client still served.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use switchyard::auth::Verifier;
use switchyard::auth::scram::{ClientFirst, ScramClient};
use switchyard::client::ClientError;
use switchyard::proto::{
    ClientHandshake, Hello, RejectCode, Response, ServerHandshake, client_handshake,
    server_handshake,
};

const ADMIN: UserSpec = ("admin", "s3cret-admin", &["ping", "debug"]);
const MONITOR: UserSpec = ("monitor", "s3cret-monitor", &["debug"]);

fn hello(service: &str, mechanism: &str, initial: &str) -> ClientHandshake {
    ClientHandshake {
        kind: Some(client_handshake::Kind::Hello(Hello {
            service: service.into(),
            mechanism: mechanism.into(),
            initial_response: initial.as_bytes().to_vec(),
            client_agent: "test".into(),
            device_token: String::new(),
        })),
    }
}

fn response(data: &str) -> ClientHandshake {
    ClientHandshake {
        kind: Some(client_handshake::Kind::Response(Response {
            data: data.as_bytes().to_vec(),
        })),
    }
}

fn rejected(msg: Option<ServerHandshake>) -> (RejectCode, String) {
    match msg.and_then(|m| m.kind) {
        Some(server_handshake::Kind::Reject(r)) => {
            (RejectCode::try_from(r.code).unwrap(), r.message)
        }
        other => panic!("expected a Reject, got {other:?}"),
    }
}

fn challenge(msg: Option<ServerHandshake>) -> String {
    match msg.and_then(|m| m.kind) {
        Some(server_handshake::Kind::Challenge(c)) => String::from_utf8(c.data).unwrap(),
        other => panic!("expected a Challenge, got {other:?}"),
    }
}

fn reject_code(r: Result<switchyard::client::ClientSession, ClientError>) -> (RejectCode, String) {
    match r {
        Err(ClientError::Rejected { code, message }) => (code, message),
        Err(e) => panic!("expected a Reject, got error {e}"),
        Ok(_) => panic!("expected a Reject, got a session"),
    }
}

#[tokio::test]
async fn scram_matches_rfc7677_example() {
    // RFC 7677 section 3: user "user", password "pencil".
    let salt = base64_decode("W22ZaJ0SNY7soEsUEjb6gQ==");
    let verifier = Verifier::from_password_and_salt(b"pencil", &salt, 4096).unwrap();
    let client = ScramClient::with_nonce("user", b"pencil", "rOprNGfwEbeRWgbNEkqO");
    assert_eq!(client.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
    let first = ClientFirst::parse(client.client_first().as_bytes()).unwrap();
    let server =
        first.challenge_with_nonce(verifier.clone(), true, "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0");
    assert_eq!(
        server.message(),
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    );
    let fin = client.answer_uncached(server.message().as_bytes()).unwrap();
    assert_eq!(
        fin.message(),
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    );
    let done = server.verify(fin.message().as_bytes()).unwrap();
    assert_eq!(
        done.server_final,
        "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    );
    assert_eq!(done.user, "user");
    fin.verify_server(done.server_final.as_bytes()).unwrap();

    // And the same user logs in over the wire.
    let m = TestMaster::start("", &[("user", "pencil", &["ping"])]).await;
    m.assert_serves("user", "pencil").await;
    m.stop().await;
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[tokio::test]
async fn ping_echoes_frames_and_welcome_says_who_we_are() {
    let m = TestMaster::start("heartbeat_interval = \"7s\"", &[ADMIN]).await;
    let mut s = m.login("admin", "s3cret-admin", "ping").await.unwrap();
    assert_eq!(s.session_id.len(), 32);
    assert!(s.session_id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(s.heartbeat_interval, Duration::from_secs(7));
    assert!(s.server_agent.starts_with("switchyard/"));
    assert_echo(&mut s, b"hello").await;
    assert_echo(&mut s, b"").await;
    assert_echo(&mut s, &vec![7u8; 1 << 20]).await;
    assert_eq!(m.master.dispatcher().session_count(), 1);
    drop(s);
    m.stop().await;
}

#[tokio::test]
async fn fifty_sessions_at_once() {
    let m = TestMaster::start("", &[ADMIN]).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let addr = m.addr.to_string();
        tasks.push(tokio::spawn(async move {
            let creds = switchyard::client::Credentials::new("admin", "s3cret-admin");
            let mut s = switchyard::client::connect(&addr, "ping", &creds)
                .await
                .unwrap();
            assert_echo(&mut s, format!("session {i}").as_bytes()).await;
            s
        }));
    }
    let mut sessions = Vec::new();
    for t in tasks {
        sessions.push(within("a session", t).await.unwrap());
    }
    let ids: HashSet<_> = sessions.iter().map(|s| s.session_id.clone()).collect();
    assert_eq!(ids.len(), 50, "session ids must be unique");
    assert_eq!(m.master.dispatcher().session_count(), 50);
    for s in &mut sessions {
        assert_echo(s, b"again").await;
    }
    m.stop().await;
}

#[tokio::test]
async fn wrong_password_and_unknown_user_look_the_same() {
    let m = TestMaster::start("", &[ADMIN]).await;
    let wrong = reject_code(m.login("admin", "not-it", "ping").await);
    let unknown = reject_code(m.login("ghost", "not-it", "ping").await);
    assert_eq!(wrong.0, RejectCode::AuthFailed);
    assert_eq!(
        wrong, unknown,
        "code and message must not tell which users exist"
    );

    // The unknown user's challenge looks like a real one, and is stable.
    let mut salts = Vec::new();
    for user in ["ghost", "ghost", "admin"] {
        let mut raw = Raw::native(m.addr).await;
        raw.send(&hello(
            "ping",
            "SCRAM-SHA-256",
            &format!("n,,n={user},r=abcdefgh"),
        ))
        .await;
        let c = challenge(raw.recv().await);
        let parts: Vec<&str> = c.split(',').collect();
        assert!(
            parts[0].starts_with("r=abcdefgh") && parts[0].len() > 12,
            "{c}"
        );
        assert_eq!(parts[2], "i=4096");
        salts.push(parts[1].to_string());
    }
    assert_eq!(
        salts[0], salts[1],
        "an unknown user's salt must not change between attempts"
    );
    assert_eq!(
        base64_decode(&salts[0][2..]).len(),
        base64_decode(&salts[2][2..]).len()
    );
    m.assert_serves("admin", "s3cret-admin").await;
    m.stop().await;
}

#[tokio::test]
async fn unknown_service_is_refused_right_after_hello() {
    let m = TestMaster::start("", &[ADMIN]).await;
    let mut raw = Raw::native(m.addr).await;
    raw.send(&hello("nosuch", "SCRAM-SHA-256", "n,,n=admin,r=abcdefgh"))
        .await;
    let (code, message) = rejected(raw.recv().await);
    assert_eq!(code, RejectCode::UnknownService);
    assert!(message.contains("nosuch"), "{message}");
    raw.read_to_close().await;
    m.assert_serves("admin", "s3cret-admin").await;
    m.stop().await;
}

#[tokio::test]
async fn not_authorized_only_after_a_valid_proof() {
    let m = TestMaster::start("", &[ADMIN, MONITOR]).await;
    // The user exists but may not use ping: a wrong password still says
    // AUTH_FAILED, so the reject does not reveal the grant.
    assert_eq!(
        reject_code(m.login("monitor", "wrong", "ping").await).0,
        RejectCode::AuthFailed
    );
    let (code, message) = reject_code(m.login("monitor", "s3cret-monitor", "ping").await);
    assert_eq!(code, RejectCode::NotAuthorized);
    assert!(
        message.contains("monitor") && message.contains("ping"),
        "{message}"
    );
    m.assert_serves("admin", "s3cret-admin").await;
    m.stop().await;
}

#[tokio::test]
async fn unsupported_mechanism() {
    let m = TestMaster::start("", &[ADMIN]).await;
    for mech in ["PLAIN", "SCRAM-SHA-1", ""] {
        let mut raw = Raw::native(m.addr).await;
        raw.send(&hello("ping", mech, "\0admin\0s3cret-admin"))
            .await;
        let (code, message) = rejected(raw.recv().await);
        assert_eq!(code, RejectCode::UnsupportedMechanism, "{mech}");
        assert!(message.contains("SCRAM-SHA-256"), "{message}");
        raw.read_to_close().await;
    }
    m.assert_serves("admin", "s3cret-admin").await;
    m.stop().await;
}

#[tokio::test]
async fn out_of_order_and_malformed_messages_are_protocol_errors() {
    let m = TestMaster::start("", &[ADMIN]).await;
    // Response before Hello.
    let mut raw = Raw::native(m.addr).await;
    raw.send(&response("c=biws,r=x,p=AAAA")).await;
    assert_eq!(rejected(raw.recv().await).0, RejectCode::ProtocolError);
    // A frame that is not a protobuf message.
    let mut raw = Raw::native(m.addr).await;
    raw.write(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await;
    assert_eq!(rejected(raw.recv().await).0, RejectCode::ProtocolError);
    // A client-first-message that is not SCRAM.
    let mut raw = Raw::native(m.addr).await;
    raw.send(&hello("ping", "SCRAM-SHA-256", "hello")).await;
    assert_eq!(rejected(raw.recv().await).0, RejectCode::ProtocolError);
    // A client-final with the wrong nonce.
    let mut raw = Raw::native(m.addr).await;
    raw.send(&hello("ping", "SCRAM-SHA-256", "n,,n=admin,r=abcdefgh"))
        .await;
    challenge(raw.recv().await);
    raw.send(&response(
        "c=biws,r=abcdefghXX,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
    ))
    .await;
    assert_eq!(rejected(raw.recv().await).0, RejectCode::ProtocolError);
    raw.read_to_close().await;
    m.assert_serves("admin", "s3cret-admin").await;
    m.stop().await;
}

#[tokio::test]
async fn garbage_bytes_are_closed() {
    let m = TestMaster::start("", &[ADMIN]).await;
    for garbage in [
        &b"hello there, master\r\n"[..],
        &[0u8; 32][..],
        &b"SWYD/2\r\n"[..],
        &[0x16, 0x01][..],
    ] {
        let mut raw = Raw::connect(m.addr).await;
        raw.write(garbage).await;
        assert!(
            raw.read_to_close().await.is_empty(),
            "nothing is answered to garbage"
        );
    }
    m.assert_serves("admin", "s3cret-admin").await;
    m.stop().await;
}

#[tokio::test]
async fn tls_is_closed_until_configured() {
    let m = TestMaster::start("", &[ADMIN]).await;
    let mut raw = Raw::connect(m.addr).await;
    raw.write(&[0x16, 0x03, 0x01, 0x00, 0x10]).await;
    assert!(raw.read_to_close().await.is_empty());
    m.assert_serves("admin", "s3cret-admin").await;
    m.stop().await;
}

#[tokio::test]
async fn four_gib_frame_length_is_refused_without_allocating() {
    let m = TestMaster::start("", &[ADMIN]).await;
    let mut raw = Raw::native(m.addr).await;
    raw.write(&[0xff, 0xff, 0xff, 0xff]).await;
    let (code, message) = rejected(raw.recv().await);
    assert_eq!(code, RejectCode::ProtocolError);
    assert!(message.contains("8192"), "{message}");
    raw.read_to_close().await;

    // After login, frames over the service's limit (16 MiB) close the session.
    let mut s = m.login("admin", "s3cret-admin", "ping").await.unwrap();
    tokio::io::AsyncWriteExt::write_all(s.stream.get_mut(), &[0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    assert_hung_up(&mut s, WAIT).await;
    m.assert_serves("admin", "s3cret-admin").await;
    m.stop().await;
}

#[tokio::test]
async fn silence_before_and_after_the_magic() {
    let m = TestMaster::start(
        "sniff_timeout = \"300ms\"\nhandshake_timeout = \"300ms\"",
        &[ADMIN],
    )
    .await;
    // Before the magic: closed without a word.
    let mut silent = Raw::connect(m.addr).await;
    // Half a magic is still silence.
    let mut half = Raw::connect(m.addr).await;
    half.write(b"SWY").await;
    // After the magic: TIMEOUT.
    let mut after = Raw::native(m.addr).await;
    // After Hello: TIMEOUT too.
    let mut mid = Raw::native(m.addr).await;
    mid.send(&hello("ping", "SCRAM-SHA-256", "n,,n=admin,r=abcdefgh"))
        .await;
    challenge(mid.recv().await);

    assert!(silent.read_to_close().await.is_empty());
    assert!(half.read_to_close().await.is_empty());
    let (code, _) = rejected(after.recv().await);
    assert_eq!(code, RejectCode::Timeout);
    let (code, message) = rejected(mid.recv().await);
    assert_eq!(code, RejectCode::Timeout);
    assert!(message.contains("300ms"), "{message}");
    m.assert_serves("admin", "s3cret-admin").await;
    m.stop().await;
}

#[tokio::test]
async fn http1_healthz_and_a_note_for_anything_else() {
    let m = TestMaster::start("", &[ADMIN]).await;
    let mut raw = Raw::connect(m.addr).await;
    raw.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let reply = String::from_utf8(raw.read_to_close().await).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.ends_with("\r\n\r\nok\n"), "{reply}");

    let mut raw = Raw::connect(m.addr).await;
    raw.write(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let reply = String::from_utf8(raw.read_to_close().await).unwrap();
    assert!(reply.starts_with("HTTP/1.1 404 Not Found\r\n"), "{reply}");
    assert!(
        reply.contains("SWYD/1") && reply.contains("HTTP/1"),
        "{reply}"
    );

    let mut raw = Raw::connect(m.addr).await;
    raw.write(b"POST /healthz HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi")
        .await;
    let reply = String::from_utf8(raw.read_to_close().await).unwrap();
    // A known path with the wrong method says which methods it takes.
    assert!(
        (reply.starts_with("HTTP/1.0 405") || reply.starts_with("HTTP/1.1 405"))
            && reply.to_ascii_lowercase().contains("allow: get,head"),
        "{reply}"
    );

    // A malformed request gets an error, not a hang.
    let mut raw = Raw::connect(m.addr).await;
    raw.write(b"GET \x01\x02 nonsense\r\n\r\n").await;
    let reply = String::from_utf8_lossy(&raw.read_to_close().await).to_string();
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 400"),
        "{reply}"
    );
    m.assert_serves("admin", "s3cret-admin").await;
    m.stop().await;
}

#[tokio::test]
async fn more_connections_than_the_limit_get_overloaded() {
    let m = TestMaster::start("max_connections = 3", &[ADMIN]).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(m.login("admin", "s3cret-admin", "ping").await.unwrap());
    }
    let (code, _) = reject_code(m.login("admin", "s3cret-admin", "ping").await);
    assert_eq!(code, RejectCode::Overloaded);
    // HTTP over the limit gets a 503.
    let mut raw = Raw::connect(m.addr).await;
    raw.write(b"GET /healthz HTTP/1.1\r\n\r\n").await;
    let reply = String::from_utf8(raw.read_to_close().await).unwrap();
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    // The sessions we hold are untouched.
    for s in &mut held {
        assert_echo(s, b"fine").await;
    }
    // Closing one frees its slot.
    drop(held.pop());
    let mut ok = None;
    for _ in 0..50 {
        match m.login("admin", "s3cret-admin", "ping").await {
            Ok(s) => {
                ok = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert_echo(
        ok.as_mut().expect("a freed slot takes a new session"),
        b"in",
    )
    .await;
    m.stop().await;
}

#[tokio::test]
async fn too_many_handshakes_at_once_get_overloaded() {
    let m = TestMaster::start("max_handshakes = 2", &[ADMIN]).await;
    let mut session = m.login("admin", "s3cret-admin", "ping").await.unwrap();
    let _stalled1 = Raw::native(m.addr).await;
    let _stalled2 = Raw::native(m.addr).await;
    // Give the master a moment to start both handshakes.
    let mut code = None;
    for _ in 0..50 {
        match m.login("admin", "s3cret-admin", "ping").await {
            Err(ClientError::Rejected { code: c, .. }) => {
                code = Some(c);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(code, Some(RejectCode::Overloaded));
    assert_echo(&mut session, b"unaffected").await;
    drop((_stalled1, _stalled2));
    m.stop().await;
}

#[tokio::test]
async fn a_stranger_cannot_lock_out_a_user_who_has_logged_in_before() {
    let m = TestMaster::start(
        "auth_max_failures = 3\nauth_block = \"1h\"",
        &[ADMIN, MONITOR],
    )
    .await;
    let addr = m.addr.to_string();
    // The operator's console logged in once before: it holds a device token.
    let known = switchyard::client::Credentials::new("admin", "s3cret-admin");
    within(
        "a login",
        switchyard::client::connect(&addr, "ping", &known),
    )
    .await
    .unwrap();
    assert!(
        known.device_token().is_some(),
        "Welcome carries a device token"
    );
    let held = m.assert_serves("admin", "s3cret-admin").await;
    // So did the operator's command line (it keeps its token in ~/.switchyard).
    debug_cli(&m, "admin", "s3cret-admin", &["status"])
        .await
        .unwrap();
    // A stranger on the same address guesses admin's password.
    for _ in 0..3 {
        assert_eq!(
            reject_code(m.login("admin", "guess", "ping").await).0,
            RejectCode::AuthFailed
        );
    }
    // Guessing stays slow: a new client for admin from here is refused,
    // even with the right password...
    let (code, message) = reject_code(m.login("admin", "s3cret-admin", "ping").await);
    assert_eq!(code, RejectCode::AuthFailed);
    assert!(message.contains("too many failed logins"), "{message}");
    // ...but the client that logged in before is not, from the same address...
    for _ in 0..3 {
        let mut s = within(
            "a login",
            switchyard::client::connect(&addr, "ping", &known),
        )
        .await
        .expect("a known client must never be locked out by others' failures");
        assert_echo(&mut s, b"known device").await;
    }
    // ...nor is any other user at that address, nor the open session.
    m.login("monitor", "s3cret-monitor", "debug").await.unwrap();
    let mut held = held;
    assert_echo(&mut held, b"still mine").await;
    // A forged or foreign token buys nothing.
    let forged = switchyard::client::Credentials::new("admin", "s3cret-admin");
    forged.set_device_token(Some(
        "1764000000.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
    ));
    assert!(
        within(
            "a login",
            switchyard::client::connect(&addr, "ping", &forged)
        )
        .await
        .is_err()
    );
    let theirs = switchyard::client::Credentials::new("admin", "s3cret-admin");
    theirs.set_device_token(m.login_token("monitor", "s3cret-monitor", "debug").await);
    assert!(
        within(
            "a login",
            switchyard::client::connect(&addr, "ping", &theirs)
        )
        .await
        .is_err()
    );
    // The operator lifts the block from the console.
    let out = debug_cli(&m, "admin", "s3cret-admin", &["unblock", "127.0.0.1"])
        .await
        .unwrap();
    assert!(out.contains("unblocked"), "{out}");
    m.assert_serves("admin", "s3cret-admin").await;
    m.stop().await;
}

#[tokio::test]
async fn concurrent_guesses_cannot_all_pass_before_the_first_failure_counts() {
    let m = TestMaster::start("auth_max_failures = 5\nauth_block = \"1h\"", &[ADMIN]).await;
    let guesses: Vec<_> = (0..40)
        .map(|i| {
            let addr = m.addr.to_string();
            tokio::spawn(async move {
                let c = switchyard::client::Credentials::new("admin", format!("guess-{i}"));
                match switchyard::client::connect(&addr, "ping", &c).await {
                    Err(ClientError::Rejected { message, .. }) => message,
                    Err(e) => panic!("a guess must be refused with a message: {e}"),
                    Ok(_) => panic!("a guess logged in"),
                }
            })
        })
        .collect();
    let mut checked = 0;
    for g in guesses {
        let message = within("a guess", g).await.unwrap();
        if !message.contains("too many failed logins") {
            checked += 1;
        }
    }
    assert!(
        checked <= 5,
        "{checked} of 40 concurrent guesses were checked; the limit is 5"
    );
    m.stop().await;
}

#[tokio::test]
async fn shutdown_closes_sessions_and_connections_in_every_state() {
    let m = TestMaster::start("", &[ADMIN]).await;
    let mut session = m.login("admin", "s3cret-admin", "ping").await.unwrap();
    let mut sniffing = Raw::connect(m.addr).await;
    let mut handshaking = Raw::native(m.addr).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    m.shutdown.cancel();
    within("shutdown", m.served).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "shutdown waited on idle connections"
    );
    assert_hung_up(&mut session, WAIT).await;
    sniffing.read_to_close().await;
    handshaking.read_to_close().await;
}

/// Logs in to `ping` from the loopback address `from` (another address than
/// the strangers' 127.0.0.1).
async fn login_from(
    m: &TestMaster,
    from: &str,
    user: &str,
    password: &str,
) -> Result<switchyard::client::ClientSession, ClientError> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let stream = within("connect", socket.connect(m.addr)).await.unwrap();
    within(
        "a login",
        switchyard::client::login(
            stream,
            "ping",
            &switchyard::client::Credentials::new(user, password),
            &switchyard::client::ClientOptions::default(),
        ),
    )
    .await
}

#[tokio::test]
async fn strangers_from_one_address_cannot_fill_the_port() {
    let m = TestMaster::start(
        "max_unauthenticated_per_address = 5\nmax_handshakes = 8",
        &[ADMIN],
    )
    .await;
    // Five connections that send the magic and one byte, and stop.
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut r = Raw::native(m.addr).await;
        r.write(&[0]).await;
        held.push(r);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The sixth from the same address is told why, at once.
    let mut sixth = Raw::native(m.addr).await;
    let (code, message) = rejected(sixth.recv().await);
    assert_eq!(code, RejectCode::Overloaded);
    assert!(message.contains("your address"), "{message}");
    // Everybody else is served: a user from another address, while the
    // strangers still hold their connections.
    let mut s = login_from(&m, "127.0.0.2", "admin", "s3cret-admin")
        .await
        .expect("another address must be served");
    assert_echo(&mut s, b"served").await;
    // A login gives its slot back: with the strangers gone, 127.0.0.1 logs in
    // again, more times than the cap, and stays logged in.
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut sessions = Vec::new();
    for _ in 0..8 {
        sessions.push(m.assert_serves("admin", "s3cret-admin").await);
    }
    m.stop().await;
}

#[tokio::test]
async fn unknown_users_get_the_iteration_count_most_verifiers_use() {
    let m = TestMaster::start("", &[ADMIN, MONITOR]).await;
    // Most verifiers now use 6000 iterations; one uses 9000.
    let mut secrets = String::from("[verifiers]\n");
    for (user, pw, i) in [
        ("admin", "s3cret-admin", 6000),
        ("monitor", "s3cret-monitor", 6000),
        ("ops", "s3cret-ops", 9000),
    ] {
        let v = Verifier::from_password(pw.as_bytes(), i).unwrap();
        secrets.push_str(&format!("{user:?} = {:?}\n", v.encode()));
    }
    std::fs::write(m.dir.path().join("secrets.toml"), secrets).unwrap();
    std::fs::write(
        m.config_path(),
        config_text("", &[ADMIN, MONITOR, ("ops", "s3cret-ops", &["ping"])]),
    )
    .unwrap();
    m.master.reload().await.unwrap();
    let count_for = |user: &'static str| {
        let addr = m.addr;
        async move {
            let mut raw = Raw::native(addr).await;
            raw.send(&hello(
                "ping",
                "SCRAM-SHA-256",
                &format!("n,,n={user},r=abcdefgh"),
            ))
            .await;
            let c = challenge(raw.recv().await);
            c.split(',').nth(2).unwrap().to_string()
        }
    };
    assert_eq!(count_for("admin").await, "i=6000");
    assert_eq!(count_for("ops").await, "i=9000");
    assert_eq!(
        count_for("ghost").await,
        "i=6000",
        "an unknown user must look like most users"
    );
    m.assert_serves("admin", "s3cret-admin").await;
    m.stop().await;
}
