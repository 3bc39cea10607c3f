//! TLS on the shared port, against a real master with certificates made
//! at test time (rcgen): a worker process building over TLS, the console,
//! HTTP/1 and the API inside TLS; wrong CA, wrong name, stalled and
//! garbage handshakes; `require`; rotation by reload.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use switchyard::client::{self, ClientOptions, Credentials};
use switchyard::wire::tls::{ClientTls, Trust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Writes a self-signed certificate for `localhost` into `dir` as
/// cert.pem/key.pem (replacing any); returns its pin.
fn certificate(dir: &std::path::Path) -> String {
    let (cert, key, pin) = switchyard::dispatcher::tls::self_signed(&["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    pin
}

fn tls_section(require: bool) -> String {
    format!("[master.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\nrequire = {require}\n")
}

/// A widgets master with TLS; its pin.
async fn tls_master(users: &[UserSpec<'_>], shell: &str, require: bool) -> (TestMaster, String) {
    let dir = tempfile::tempdir().unwrap();
    let pin = certificate(dir.path());
    std::fs::write(
        dir.path().join("master.toml"),
        // A short sniff deadline: a stalled handshake is cut at it.
        widgets_config_with(
            &format!("sniff_timeout = \"2s\"\n{}", tls_section(require)),
            users,
            shell,
            "",
        ),
    )
    .unwrap();
    let secrets = secrets_text(users)
        + secrets_text(&[("w1", "w1-pw", &[])]).trim_start_matches("[verifiers]\n");
    std::fs::write(dir.path().join("secrets.toml"), secrets).unwrap();
    (TestMaster::start_in(dir).await, pin)
}

fn tls_opts(trust: Trust, name: Option<&str>) -> ClientOptions {
    ClientOptions {
        tls: Some(ClientTls::new(&trust, name.map(String::from)).unwrap()),
        timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

/// A native `Hello` with `mechanism` over plain TCP is answered
/// `UNSUPPORTED_MECHANISM`, its message saying `says`.
async fn refused_in_clear(
    addr: std::net::SocketAddr,
    mechanism: &str,
    initial_response: &[u8],
    says: &str,
) {
    let mut raw = Raw::native(addr).await;
    raw.send(&switchyard::proto::ClientHandshake {
        kind: Some(switchyard::proto::client_handshake::Kind::Hello(
            switchyard::proto::Hello {
                service: "debug".into(),
                mechanism: mechanism.into(),
                initial_response: initial_response.to_vec(),
                ..Default::default()
            },
        )),
    })
    .await;
    match raw.recv().await.and_then(|m| m.kind) {
        Some(switchyard::proto::server_handshake::Kind::Reject(r)) => {
            assert_eq!(
                r.code,
                switchyard::proto::RejectCode::UnsupportedMechanism as i32
            );
            assert!(r.message.contains(says), "{}", r.message);
        }
        other => panic!("expected a Reject, got {other:?}"),
    }
}

/// An HTTP/1 request inside TLS, trusting `cert_pem`; the whole answer.
async fn https(m: &TestMaster, cert_pem: &std::path::Path, request: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(cert_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config =
        rustls::ClientConfig::builder_with_provider(switchyard::dispatcher::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(m.addr).await.unwrap();
    let mut s = within(
        "a TLS handshake",
        connector.connect("localhost".try_into().unwrap(), tcp),
    )
    .await
    .unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = within("the answer", s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_worker_builds_and_the_console_and_http_work_over_tls() {
    let users = [HOOK, ADMIN];
    let (m, pin) = tls_master(&users, "echo over-tls", false).await;
    let cert = m.dir.path().join("cert.pem");
    let _w = spawn_worker_with(
        &m,
        "w1",
        "w1-pw",
        "basedir-w1",
        &[
            "--tls",
            "--ca-file",
            cert.to_str().unwrap(),
            "--server-name",
            "localhost",
        ],
        &[],
    );
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    // The change arrives by gRPC inside TLS (`sendchange --tls`).
    let tls = ClientTls::new(&Trust::Pin(pin.clone()), Some("localhost".into())).unwrap();
    let mut hook = within(
        "a gRPC connection over TLS",
        switchyard::grpc::client::ChangeSourceConnection::connect_with(
            &m.addr.to_string(),
            HOOK.0,
            HOOK.1,
            Some(&tls),
        ),
    )
    .await
    .unwrap();
    within(
        "a push over TLS",
        hook.push(switchyard::proto::Change {
            repository: "widgets".into(),
            branch: "main".into(),
            revision: "r1".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    let (build, result) = builds_ended(&mut events, 1).await.remove(0);
    assert_eq!(result, "success");
    assert_eq!(log_text(&m, build, 0).await, "over-tls\n");

    // The console, pinned to the self-signed certificate.
    let creds = Credentials::new(ADMIN.0, ADMIN.1);
    let opts = tls_opts(Trust::Pin(pin.clone()), Some("localhost"));
    let mut console = within(
        "a console over TLS",
        switchyard::debug::console::Console::connect_with(&m.addr.to_string(), &creds, &opts),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    console
        .run(
            switchyard::debug::console::parse(&["builds".to_string()]).unwrap(),
            &mut out,
            std::future::pending(),
        )
        .await
        .unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("widgets") && out.contains("success"), "{out}");

    // HTTP/1 inside TLS: health, the API with Basic.
    let reply = https(
        &m,
        &cert,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.ends_with("ok\n"),
        "{reply}"
    );
    let reply = https(
        &m,
        &cert,
        &format!(
            "GET /api/v1/builds/{build} HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\n\r\n",
            basic(ADMIN.0, ADMIN.1)
        ),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"result\":\"success\""), "{reply}");
    // The web login inside TLS: SCRAM as the page runs it, and a session
    // cookie marked Secure.
    let scram = switchyard::auth::scram::ScramClient::new(ADMIN.0, ADMIN.1.as_bytes());
    let post = |path: &str, body: String| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let reply = https(
        &m,
        &cert,
        &post(
            "/api/v1/login/start",
            serde_json::json!({ "client_first": scram.client_first() }).to_string(),
        ),
    )
    .await;
    let start: serde_json::Value =
        serde_json::from_str(reply.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let fin = scram
        .answer_uncached(start["server_first"].as_str().unwrap().as_bytes())
        .unwrap();
    let reply = https(
        &m,
        &cert,
        &post(
            "/api/v1/login/finish",
            serde_json::json!({ "login": start["login"], "client_final": fin.message() })
                .to_string(),
        ),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let cookie = reply
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: switchyard_session=")
        })
        .unwrap();
    assert!(cookie.contains("; Secure"), "{cookie}");
    assert!(
        web_login(&m, ADMIN.0, ADMIN.1)
            .await
            .unwrap()
            .0
            .starts_with("switchyard_session=")
    );

    // Plain TCP still works when TLS is not required.
    let (head, _) = http_get(&m, "/healthz", None).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    m.stop().await;
}

#[tokio::test]
async fn untrusted_or_misnamed_certificates_and_bad_handshakes_are_refused() {
    let users = [ADMIN];
    let (m, pin) = tls_master(&users, "true", false).await;
    let addr = m.addr.to_string();
    let creds = Credentials::new(ADMIN.0, ADMIN.1);
    // Another CA.
    let other = tempfile::tempdir().unwrap();
    certificate(other.path());
    let e = client::connect_with(
        &addr,
        "debug",
        &creds,
        &tls_opts(
            Trust::CaFile(other.path().join("cert.pem")),
            Some("localhost"),
        ),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("not trusted"), "{e}");
    // The right CA, the wrong name.
    let e = client::connect_with(
        &addr,
        "debug",
        &creds,
        &tls_opts(
            Trust::CaFile(m.dir.path().join("cert.pem")),
            Some("example.org"),
        ),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("not trusted"), "{e}");
    assert!(e.to_string().contains("NotValidForName"), "{e}");
    // A wrong pin.
    let e = client::connect_with(
        &addr,
        "debug",
        &creds,
        &tls_opts(Trust::Pin("00".repeat(32)), Some("localhost")),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("pinned"), "{e}");
    // The start of a ClientHello, then silence: cut at the sniff deadline.
    let mut stalled = Raw::connect(m.addr).await;
    stalled.write(b"\x16\x03\x01\x02\x00\x01").await;
    // Garbage that claims to be TLS: refused at once.
    let mut garbage = Raw::connect(m.addr).await;
    garbage.write(b"\x16\x03\x01\x00\x05hello-not-tls").await;
    let got = garbage.read_to_close().await;
    assert!(got.len() < 64, "a short alert at most: {got:?}");
    // Everyone else is served meanwhile.
    client::connect_with(
        &addr,
        "debug",
        &creds,
        &tls_opts(Trust::Pin(pin), Some("localhost")),
    )
    .await
    .unwrap();
    assert!(stalled.read_to_close().await.len() < 64);
    m.stop().await;
}

#[tokio::test]
async fn require_refuses_cleartext_except_healthz() {
    let users = [ADMIN];
    let (m, pin) = tls_master(&users, "true", true).await;
    // Native in clear: a Reject saying TLS is required.
    let e = m.login(ADMIN.0, ADMIN.1, "debug").await.unwrap_err();
    assert_eq!(
        e.reject_code(),
        Some(switchyard::proto::RejectCode::ProtocolError),
        "{e}"
    );
    assert!(e.to_string().contains("requires TLS"), "{e}");
    // HTTP/1 in clear: 426, but health checks pass.
    let (head, body) = http_get(&m, "/api/v1/builders", Some(&basic(ADMIN.0, ADMIN.1))).await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    assert!(body.contains("requires TLS"), "{body}");
    let (head, _) = http_get(&m, "/healthz", None).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Over TLS, all is well.
    let creds = Credentials::new(ADMIN.0, ADMIN.1);
    client::connect_with(
        &m.addr.to_string(),
        "debug",
        &creds,
        &tls_opts(Trust::Pin(pin), Some("localhost")),
    )
    .await
    .unwrap();
    m.stop().await;
}

#[tokio::test]
async fn a_reload_rotates_the_certificate_and_live_sessions_stay() {
    let users = [ADMIN, ("pinger", "pinger-pw", &["ping"])];
    let (m, old_pin) = tls_master(&users, "true", false).await;
    let addr = m.addr.to_string();
    let creds = Credentials::new("pinger", "pinger-pw");
    let mut live = client::connect_with(
        &addr,
        "ping",
        &creds,
        &tls_opts(Trust::Pin(old_pin.clone()), Some("localhost")),
    )
    .await
    .unwrap();
    assert_echo(&mut live, b"before").await;

    // A key that does not match the certificate: the reload is rejected
    // whole, naming [master.tls].
    let dir = m.dir.path().to_path_buf();
    let good_key = std::fs::read(dir.join("key.pem")).unwrap();
    let other = tempfile::tempdir().unwrap();
    certificate(other.path());
    std::fs::copy(other.path().join("key.pem"), dir.join("key.pem")).unwrap();
    let e = within("a reload", m.master.reload()).await.unwrap_err();
    assert!(e.to_string().contains("master.tls"), "{e}");
    assert!(e.to_string().contains("does not belong"), "{e}");
    std::fs::write(dir.join("key.pem"), &good_key).unwrap();
    std::fs::write(dir.join("cert.pem"), "not PEM").unwrap();
    let e = within("a reload", m.master.reload()).await.unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");

    // A new certificate: new connections get it, the live session stays.
    let new_pin = certificate(&dir);
    let report = within("a reload", m.master.reload()).await.unwrap();
    assert!(report.to_string().contains(&new_pin), "{report}");
    assert_echo(&mut live, b"after").await;
    let e = client::connect_with(
        &addr,
        "ping",
        &creds,
        &tls_opts(Trust::Pin(old_pin), Some("localhost")),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("pinned"), "{e}");
    let mut fresh = client::connect_with(
        &addr,
        "ping",
        &creds,
        &tls_opts(Trust::Pin(new_pin), Some("localhost")),
    )
    .await
    .unwrap();
    assert_echo(&mut fresh, b"new").await;
    m.stop().await;
}

/// A relay that terminates TLS with its own certificate (which the client
/// was made to trust) and opens its own TLS connection to the master: what
/// a man in the middle does. Returns its address and its pin.
async fn tls_relay(master: std::net::SocketAddr, master_pin: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let pin = certificate(dir.path());
    let settings = switchyard::dispatcher::tls::TlsSettings::load(
        &dir.path().join("cert.pem"),
        &dir.path().join("key.pem"),
        false,
    )
    .unwrap();
    let acceptor = settings.acceptor();
    let upstream = ClientTls::new(
        &Trust::Pin(master_pin.to_string()),
        Some("localhost".into()),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let _keep = dir;
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                let Ok(mut down) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = upstream.connect(&master.to_string()).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            });
        }
    });
    (addr, pin)
}

#[tokio::test]
async fn channel_binding_is_checked_and_a_tls_relay_cannot_pass_a_login_on() {
    let users = [ADMIN];
    let (m, pin) = tls_master(&users, "true", false).await;
    let addr = m.addr.to_string();
    let creds = Credentials::new(ADMIN.0, ADMIN.1);
    let opts = |binding| ClientOptions {
        channel_binding: binding,
        ..tls_opts(Trust::Pin(pin.clone()), Some("localhost"))
    };
    // SCRAM-SHA-256-PLUS with either binding type.
    for binding in [
        client::ChannelBinding::TlsExporter,
        client::ChannelBinding::TlsServerEndPoint,
    ] {
        client::connect_with(&addr, "debug", &creds, &opts(binding))
            .await
            .unwrap_or_else(|e| panic!("{binding:?}: {e}"));
    }
    // A client told (by someone in between) that the master cannot bind:
    // its `y` flag gives the downgrade away.
    let e = client::connect_with(
        &addr,
        "debug",
        &creds,
        &opts(client::ChannelBinding::ClaimUnsupported),
    )
    .await
    .unwrap_err();
    assert_eq!(
        e.reject_code(),
        Some(switchyard::proto::RejectCode::AuthFailed),
        "{e}"
    );
    assert!(e.to_string().contains("downgrade"), "{e}");
    // PLUS in clear is not offered.
    refused_in_clear(
        m.addr,
        "SCRAM-SHA-256-PLUS",
        b"p=tls-exporter,,n=admin,r=abc",
        "use SCRAM-SHA-256",
    )
    .await;
    // Through a relay that terminates TLS: the client's channel is not the
    // master's, so its proof does not hold there.
    let (relay, relay_pin) = tls_relay(m.addr, &pin).await;
    for binding in [
        client::ChannelBinding::TlsExporter,
        client::ChannelBinding::TlsServerEndPoint,
    ] {
        let e = client::connect_with(
            &relay,
            "debug",
            &creds,
            &ClientOptions {
                channel_binding: binding,
                ..tls_opts(Trust::Pin(relay_pin.clone()), Some("localhost"))
            },
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.reject_code(),
            Some(switchyard::proto::RejectCode::AuthFailed),
            "{binding:?}: {e}"
        );
        assert!(
            e.to_string().contains("channel binding"),
            "{binding:?}: {e}"
        );
    }
    // The master serves everyone else meanwhile.
    client::connect_with(
        &addr,
        "debug",
        &creds,
        &opts(client::ChannelBinding::TlsExporter),
    )
    .await
    .unwrap();
    m.stop().await;
}

#[tokio::test]
async fn an_expired_certificate_is_one_clear_line() {
    let users = [ADMIN];
    let (m, _) = tls_master(&users, "true", false).await;
    // Replace the certificate with one that expired in 2001, and reload.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    let dir = m.dir.path();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    within("a reload", m.master.reload()).await.unwrap();
    let e = client::connect_with(
        &m.addr.to_string(),
        "debug",
        &Credentials::new(ADMIN.0, ADMIN.1),
        &tls_opts(Trust::CaFile(dir.join("cert.pem")), Some("localhost")),
    )
    .await
    .unwrap_err();
    let line = e.to_string();
    assert!(
        line.contains("not trusted") && line.contains("Expired"),
        "{line}"
    );
    assert!(!line.contains('\n'), "one line: {line}");
    m.stop().await;
}

#[tokio::test]
async fn a_worker_that_does_not_trust_the_master_keeps_retrying() {
    let users = [HOOK];
    let (m, _) = tls_master(&users, "echo hi", false).await;
    // The worker trusts another certificate than the one the master has.
    let trusted = tempfile::tempdir().unwrap();
    certificate(trusted.path());
    let ca = trusted.path().join("cert.pem");
    let _w = spawn_worker_with(
        &m,
        "w1",
        "w1-pw",
        "basedir-w1",
        &[
            "--tls",
            "--ca-file",
            ca.to_str().unwrap(),
            "--server-name",
            "localhost",
        ],
        &[],
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        m.master.builds().connected().is_empty(),
        "connected without trusting the master"
    );
    // The master takes the certificate the worker trusts: the worker's next
    // attempt gets in.
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(trusted.path().join(f), m.dir.path().join(f)).unwrap();
    }
    within("a reload", m.master.reload()).await.unwrap();
    wait_connected(&m, 1).await;
    m.stop().await;
}

/// A user the secrets file does not know, judged by a `[[checker]]`
/// program: it counts in `asked` each time it is run.
const CAROL: UserSpec = (
    "carol",
    "from-directory",
    &["debug", "web", "change-source"],
);

#[tokio::test]
async fn the_command_checker_is_asked_inside_tls_and_never_over_plain_tcp() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pin = certificate(dir.path());
    let script = dir.path().join("check.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nread -r user\nread -r pw\necho \"$user\" >> \"$(dirname \"$0\")/asked\"\n\
         [ \"$user\" = carol ] && [ \"$pw\" = from-directory ] && exit 0\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        dir.path().join("master.toml"),
        widgets_config_with(
            &format!(
                "auth_max_failures = 6\nauth_block = \"1h\"\n{}",
                tls_section(false)
            ),
            &[ADMIN, CAROL],
            "true",
            "\n[[checker]]\nkind = \"command\"\ncommand = [\"./check.sh\"]\ntimeout = \"5s\"\nconcurrency = 2\n",
        ),
    )
    .unwrap();
    // carol has no verifier: only the checker can let her in.
    let secrets = secrets_text(&[ADMIN])
        + secrets_text(&[("w1", "w1-pw", &[])]).trim_start_matches("[verifiers]\n");
    std::fs::write(dir.path().join("secrets.toml"), secrets).unwrap();
    let m = TestMaster::start_in(dir).await;
    let asked = || {
        std::fs::read_to_string(m.dir.path().join("asked"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let addr = m.addr.to_string();
    let carol = Credentials::new(CAROL.0, CAROL.1);

    // Over plain TCP the checker is never asked: SCRAM fails as a wrong
    // password does, PLAIN is not offered (and our client never sends it),
    // and HTTP Basic (API and gRPC) is refused.
    let e = m.login(CAROL.0, CAROL.1, "debug").await.unwrap_err();
    assert_eq!(
        e.reject_code(),
        Some(switchyard::proto::RejectCode::AuthFailed),
        "{e}"
    );
    let plain = ClientOptions {
        mechanism: client::Mechanism::Plain,
        timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let e = client::connect_with(&addr, "debug", &carol, &plain)
        .await
        .unwrap_err();
    assert!(matches!(e, client::ClientError::PlainWithoutTls), "{e}");
    refused_in_clear(
        m.addr,
        "PLAIN",
        b"\0carol\0from-directory",
        "only inside TLS",
    )
    .await;
    let (head, _) = http_get(&m, "/api/v1/builders", Some(&basic(CAROL.0, CAROL.1))).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let refused = match switchyard::grpc::client::ChangeSourceConnection::connect_with(
        &addr, CAROL.0, CAROL.1, None,
    )
    .await
    {
        Ok(mut conn) => within(
            "a push in clear",
            conn.push(switchyard::proto::Change {
                repository: "widgets".into(),
                ..Default::default()
            }),
        )
        .await
        .is_err(),
        Err(_) => true,
    };
    assert!(
        refused,
        "a Basic login over plain TCP must not reach the checker"
    );
    // The web UI: over plain HTTP the page runs SCRAM, and the password
    // endpoint refuses without looking.
    let page = http(&m, "GET", "/login", &[], "").await;
    assert!(!page.body.contains("data-password"), "{}", page.body);
    let json = [("Content-Type", "application/json")];
    let body = serde_json::json!({ "user": CAROL.0, "password": CAROL.1 }).to_string();
    let r = http(&m, "POST", "/api/v1/login/password", &json, &body).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("only inside TLS"), "{}", r.body);
    assert!(asked().is_empty(), "asked over plain TCP: {:?}", asked());

    // Inside TLS: PLAIN, the API's Basic and gRPC's Basic all reach it.
    let tls = tls_opts(Trust::Pin(pin.clone()), Some("localhost"));
    let plain_tls = ClientOptions {
        mechanism: client::Mechanism::Plain,
        ..tls.clone()
    };
    let s = client::connect_with(&addr, "debug", &carol, &plain_tls)
        .await
        .unwrap();
    assert!(s.stream.get_ref().is_tls());
    assert_eq!(asked(), ["carol"]);
    let reply = https(
        &m,
        &m.dir.path().join("cert.pem"),
        &format!(
            "GET /api/v1/builders HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
            basic(CAROL.0, CAROL.1)
        ),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let tls_client = ClientTls::new(&Trust::Pin(pin.clone()), Some("localhost".into())).unwrap();
    let mut hook = switchyard::grpc::client::ChangeSourceConnection::connect_with(
        &addr,
        CAROL.0,
        CAROL.1,
        Some(&tls_client),
    )
    .await
    .unwrap();
    within(
        "a push as carol over TLS",
        hook.push(switchyard::proto::Change {
            repository: "widgets".into(),
            branch: "main".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    // The web UI inside TLS: the page posts the password, and the session
    // it gets reads the API.
    let cert = m.dir.path().join("cert.pem");
    let page = https(
        &m,
        &cert,
        "GET /login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(page.contains("data-password"), "{page}");
    let reply = https(
        &m,
        &cert,
        &format!(
            "POST /api/v1/login/password HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let cookie = reply
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: switchyard_session=")
                .then(|| l["set-cookie: ".len()..].to_string())
        })
        .unwrap();
    assert!(cookie.contains("; Secure"), "{cookie}");
    let session = cookie.split(';').next().unwrap();
    let reply = https(
        &m,
        &cert,
        &format!("GET /api/v1/builders HTTP/1.1\r\nHost: localhost\r\nCookie: {session}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("widgets"), "{reply}");

    // A user the secrets file knows is its to judge: the checker is not
    // asked, by PLAIN or SCRAM.
    let n = asked().len();
    client::connect_with(
        &addr,
        "debug",
        &Credentials::new(ADMIN.0, ADMIN.1),
        &plain_tls,
    )
    .await
    .unwrap();
    let e = client::connect_with(
        &addr,
        "debug",
        &Credentials::new(ADMIN.0, "wrong"),
        &plain_tls,
    )
    .await
    .unwrap_err();
    assert_eq!(
        e.reject_code(),
        Some(switchyard::proto::RejectCode::AuthFailed)
    );
    assert_eq!(asked().len(), n, "{:?}", asked());
    // The console works as carol, logged in by PLAIN.
    drop(s);
    let mut console = within(
        "a console logged in by PLAIN",
        switchyard::debug::console::Console::connect_with(&addr, &carol, &plain_tls),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    within(
        "the console's answer",
        console.run(
            switchyard::debug::console::parse(&["workers".to_string()]).unwrap(),
            &mut out,
            std::future::pending(),
        ),
    )
    .await
    .unwrap();
    assert!(String::from_utf8(out).unwrap().contains("w1"));

    // The command line: `--mechanism plain` needs `--tls`, and with it the
    // console logs in as carol.
    let cli = |extra: &[&str]| {
        let mut c = tokio::process::Command::new(BIN);
        c.args(["debug", "--master", &addr, "--user", CAROL.0])
            .args(extra)
            .env("SWITCHYARD_PASSWORD", CAROL.1)
            .env("HOME", m.dir.path())
            .kill_on_drop(true);
        c
    };
    let out = within(
        "debug without --tls",
        cli(&["--mechanism", "plain", "workers"]).output(),
    )
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--mechanism plain sends the password itself: it needs --tls"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = within(
        "debug --tls --mechanism plain",
        cli(&[
            "--tls",
            "--pin-sha256",
            &pin,
            "--server-name",
            "localhost",
            "--mechanism",
            "plain",
            "workers",
        ])
        .output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("w1"));

    // Its refusals count in the throttle: with the three failures in clear
    // above, three wrong passwords make six, and then the right one is
    // refused too, without asking the checker again.
    for _ in 0..3 {
        let e = client::connect_with(
            &addr,
            "debug",
            &Credentials::new(CAROL.0, "guess"),
            &plain_tls,
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.reject_code(),
            Some(switchyard::proto::RejectCode::AuthFailed),
            "{e}"
        );
    }
    let before = asked().len();
    let e = client::connect_with(
        &addr,
        "debug",
        &Credentials::new(CAROL.0, CAROL.1),
        &plain_tls,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("too many failed logins"), "{e}");
    assert_eq!(asked().len(), before);
    m.stop().await;
}
