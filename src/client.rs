//! The client side of the native protocol: connect, log in with SCRAM, and
//! get a framed session to a service. Workers, the debug console, `ping`,
//! the tests and the benchmarks all log in through here.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, FramedParts, LengthDelimitedCodec};

use crate::auth::scram::{MECHANISM, ScramClient, ScramError};
use crate::auth::verifier::salted_password;
use crate::proto::{
    ClientHandshake, Hello, RejectCode, Response, ServerHandshake, client_handshake,
    server_handshake,
};
use crate::wire::{DEFAULT_MAX_FRAME_LENGTH, MAX_HANDSHAKE_FRAME, NATIVE_MAGIC, Transport};

/// A user name and password, with a cache of SaltedPassword per salt, so a
/// client that logs in again and again (a worker reconnecting, a monitor)
/// pays for PBKDF2 once, as real SCRAM clients do. The cache holds derived
/// keys, never the password.
/// SaltedPassword by (salt, iterations).
type SaltCache = HashMap<(Vec<u8>, u32), [u8; 32]>;

pub struct Credentials {
    user: String,
    password: String,
    cache: Mutex<SaltCache>,
    /// The device token the master issued on the last login: presented on
    /// the next, so others' failed logins never throttle this client (a
    /// worker reconnecting mid-build, say).
    device_token: Mutex<Option<String>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            user: user.into(),
            password: password.into(),
            cache: Mutex::new(HashMap::new()),
            device_token: Mutex::new(None),
        }
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// The device token from the last login, if any.
    pub fn device_token(&self) -> Option<String> {
        self.device_token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Keeps a device token the master issued (or one saved from an earlier
    /// run) for the next login.
    pub fn set_device_token(&self, token: Option<String>) {
        *self.device_token.lock().unwrap_or_else(|e| e.into_inner()) =
            token.filter(|t| !t.is_empty());
    }

    fn salted(&self, password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
        let key = (salt.to_vec(), iterations);
        if let Some(v) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return *v;
        }
        let v = salted_password(password, salt, iterations);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() > 64 {
            cache.clear();
        }
        cache.insert(key, v);
        v
    }
}

/// Reads a device token kept by [`save_device_token`] (none if the file is
/// missing or empty).
pub fn load_device_token(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

/// Keeps a device token for a client's next run, in a file readable by its
/// owner alone (mode 600, replaced atomically). Best effort: a token that
/// cannot be kept costs only the exemption from others' failed logins.
pub fn save_device_token(path: &std::path::Path, token: &str) {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir);
    }
    let tmp = path.with_extension("tmp");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, token.as_bytes()));
    if written.is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// How a client connects.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Sent in `Hello.client_agent`.
    pub client_agent: String,
    /// Bound on connecting plus the whole handshake.
    pub timeout: Duration,
    /// The largest session frame this client accepts.
    pub max_frame_length: usize,
    /// Connect with TLS (`None`: plain TCP).
    pub tls: Option<crate::wire::tls::ClientTls>,
    /// How a login inside TLS binds the channel.
    pub channel_binding: ChannelBinding,
    /// How the client proves who it is.
    pub mechanism: Mechanism,
}

/// How a client proves who it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mechanism {
    /// SCRAM-SHA-256 (-PLUS inside TLS): the password never crosses the
    /// wire.
    #[default]
    Scram,
    /// PLAIN: the password itself, inside TLS only, for users the master's
    /// `[[checker]]` judges (a directory, a program) rather than a verifier
    /// in its secrets file. A client never sends it over plain TCP.
    Plain,
}

/// How a login inside TLS binds the channel (RFC 5802 §6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChannelBinding {
    /// `p=tls-exporter` (RFC 9266), SCRAM-SHA-256-PLUS: what this client
    /// does.
    #[default]
    TlsExporter,
    /// `p=tls-server-end-point` (RFC 5929), SCRAM-SHA-256-PLUS: what many
    /// other SCRAM clients do.
    TlsServerEndPoint,
    /// No binding, and say so with `y` (SCRAM-SHA-256): the master takes it
    /// for a downgrade and refuses.
    ClaimUnsupported,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            client_agent: format!("switchyard/{}", env!("CARGO_PKG_VERSION")),
            timeout: Duration::from_secs(30),
            max_frame_length: DEFAULT_MAX_FRAME_LENGTH,
            tls: None,
            channel_binding: ChannelBinding::default(),
            mechanism: Mechanism::default(),
        }
    }
}

/// A logged-in session.
pub struct ClientSession {
    pub stream: Framed<Transport, LengthDelimitedCodec>,
    pub session_id: String,
    pub heartbeat_interval: Duration,
    pub server_agent: String,
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("session_id", &self.session_id)
            .field("server_agent", &self.server_agent)
            .field("tls", &self.stream.get_ref().is_tls())
            .finish_non_exhaustive()
    }
}

/// Why a login did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("the connection failed during the handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("the master refused the login ({}): {message}", code.as_str_name())]
    Rejected { code: RejectCode, message: String },
    #[error("the master broke the handshake protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Scram(#[from] ScramError),
    #[error("no answer from the master within {0:?}")]
    Timeout(Duration),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("PLAIN sends the password itself: it is used only inside TLS (--tls)")]
    PlainWithoutTls,
}

/// A failed TLS handshake, in one line.
fn tls_failure(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(c)) => {
            format!("the master's certificate is not trusted: {c:?}")
        }
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}

impl ClientError {
    /// The reject code, if the master refused the login.
    pub fn reject_code(&self) -> Option<RejectCode> {
        match self {
            ClientError::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Connects to `addr` and logs in to `service`.
pub async fn connect(
    addr: &str,
    service: &str,
    creds: &Credentials,
) -> Result<ClientSession, ClientError> {
    connect_with(addr, service, creds, &ClientOptions::default()).await
}

pub async fn connect_with(
    addr: &str,
    service: &str,
    creds: &Credentials,
    opts: &ClientOptions,
) -> Result<ClientSession, ClientError> {
    let work = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let transport = match &opts.tls {
            None => Transport::Plain(stream),
            Some(tls) => {
                let name = tls.name_for(addr).map_err(ClientError::Tls)?;
                let s = tls
                    .connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| ClientError::Tls(tls_failure(&e)))?;
                Transport::TlsClient(Box::new(s))
            }
        };
        login(transport, service, creds, opts).await
    };
    tokio::time::timeout(opts.timeout, work)
        .await
        .map_err(|_| ClientError::Timeout(opts.timeout))?
}

type HandshakeStream = Framed<Transport, LengthDelimitedCodec>;

async fn send(
    framed: &mut HandshakeStream,
    kind: client_handshake::Kind,
) -> Result<(), ClientError> {
    let msg = ClientHandshake { kind: Some(kind) };
    framed.send(Bytes::from(msg.encode_to_vec())).await?;
    Ok(())
}

async fn receive(framed: &mut HandshakeStream) -> Result<server_handshake::Kind, ClientError> {
    let frame = framed.next().await.ok_or_else(|| {
        ClientError::Protocol("the master closed the connection during the handshake".into())
    })??;
    let msg = ServerHandshake::decode(frame.freeze())
        .map_err(|e| ClientError::Protocol(format!("undecodable ServerHandshake: {e}")))?;
    match msg.kind {
        Some(server_handshake::Kind::Reject(r)) => Err(ClientError::Rejected {
            code: RejectCode::try_from(r.code).unwrap_or(RejectCode::Unspecified),
            message: r.message,
        }),
        Some(kind) => Ok(kind),
        None => Err(ClientError::Protocol("empty ServerHandshake".into())),
    }
}

/// Logs in over an already connected stream (sends the magic first).
pub async fn login(
    stream: impl Into<Transport>,
    service: &str,
    creds: &Credentials,
    opts: &ClientOptions,
) -> Result<ClientSession, ClientError> {
    let mut stream = stream.into();
    stream.write_all(NATIVE_MAGIC).await?;
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_HANDSHAKE_FRAME)
        .new_codec();
    // Inside TLS, bind the channel into the proof (SCRAM-SHA-256-PLUS with
    // tls-exporter): a relay that terminates TLS cannot pass the login on.
    if opts.mechanism == Mechanism::Plain && !stream.is_tls() {
        return Err(ClientError::PlainWithoutTls);
    }
    let binding = stream.channel_bindings();
    let mut framed = Framed::new(stream, codec);
    if opts.mechanism == Mechanism::Plain {
        let hello = Hello {
            service: service.to_string(),
            mechanism: crate::auth::scram::MECHANISM_PLAIN.to_string(),
            initial_response: crate::auth::scram::plain_message(
                &creds.user,
                creds.password.as_bytes(),
            ),
            client_agent: opts.client_agent.clone(),
            device_token: creds.device_token().unwrap_or_default(),
        };
        send(&mut framed, client_handshake::Kind::Hello(hello)).await?;
        let welcome = match receive(&mut framed).await? {
            server_handshake::Kind::Welcome(w) => w,
            _ => return Err(ClientError::Protocol("expected Welcome or Reject".into())),
        };
        return Ok(into_session(framed, welcome, creds, opts));
    }
    let mut scram = ScramClient::new(&creds.user, creds.password.as_bytes());
    use crate::auth::scram::{MECHANISM_PLUS, TLS_EXPORTER, TLS_SERVER_END_POINT};
    let mechanism = match (binding, opts.channel_binding) {
        (None, _) => MECHANISM,
        (Some(b), ChannelBinding::TlsExporter) => {
            scram = scram.bind(TLS_EXPORTER, b.tls_exporter);
            MECHANISM_PLUS
        }
        (Some(b), ChannelBinding::TlsServerEndPoint) => {
            scram = scram.bind(TLS_SERVER_END_POINT, b.tls_server_end_point);
            MECHANISM_PLUS
        }
        (Some(_), ChannelBinding::ClaimUnsupported) => {
            scram = scram.could_bind();
            MECHANISM
        }
    };
    let hello = Hello {
        service: service.to_string(),
        mechanism: mechanism.to_string(),
        initial_response: scram.client_first().into_bytes(),
        client_agent: opts.client_agent.clone(),
        device_token: creds.device_token().unwrap_or_default(),
    };
    send(&mut framed, client_handshake::Kind::Hello(hello)).await?;
    let challenge = match receive(&mut framed).await? {
        server_handshake::Kind::Challenge(c) => c,
        _ => return Err(ClientError::Protocol("expected Challenge".into())),
    };
    let fin = scram.answer(&challenge.data, |pw, salt, i| creds.salted(pw, salt, i))?;
    send(
        &mut framed,
        client_handshake::Kind::Response(Response {
            data: fin.message().as_bytes().to_vec(),
        }),
    )
    .await?;
    let welcome = match receive(&mut framed).await? {
        server_handshake::Kind::Welcome(w) => w,
        _ => return Err(ClientError::Protocol("expected Welcome or Reject".into())),
    };
    fin.verify_server(&welcome.data)?;
    Ok(into_session(framed, welcome, creds, opts))
}

/// The session a `Welcome` opened: the device token kept, the handshake's
/// frame limit replaced by the session's.
fn into_session(
    framed: HandshakeStream,
    welcome: crate::proto::Welcome,
    creds: &Credentials,
    opts: &ClientOptions,
) -> ClientSession {
    if !welcome.device_token.is_empty() {
        creds.set_device_token(Some(welcome.device_token.clone()));
    }
    let old = framed.into_parts();
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(opts.max_frame_length)
        .new_codec();
    let mut parts = FramedParts::new::<Bytes>(old.io, codec);
    parts.read_buf = old.read_buf;
    ClientSession {
        stream: Framed::from_parts(parts),
        session_id: welcome.session_id,
        heartbeat_interval: Duration::from_millis(welcome.heartbeat_interval_ms as u64),
        server_agent: welcome.server_agent,
    }
}
