//! The native handshake: `Hello`, `Challenge`, `Response`, then `Welcome` or
//! `Reject`, over 4-byte length-prefixed frames of at most 8 KiB.
//!
//! The order of checks is part of the contract: `UNKNOWN_SERVICE` and
//! `UNSUPPORTED_MECHANISM` may come right after `Hello` (they say nothing
//! about users), `AUTH_FAILED` comes after the proof for a wrong password and
//! an unknown name alike (same message, same work), and `NOT_AUTHORIZED`
//! only after a proof that checked out. Every reject closes the connection.

use super::counters::LoginOutcome;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::wire::Transport;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::codec::{Framed, FramedParts, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::PasswordRefusal;
use super::registry::Route;
use super::session::{LiveSession, Session, hangup_for};
use super::{MAX_HANDSHAKE_FRAME, Shared};
use crate::auth::scram::{
    ChannelBindings, ClientFirst, Gs2Flag, MECHANISM, MECHANISM_PLAIN, MECHANISM_PLUS, ScramError,
};
use crate::auth::{Channel, Credential};
use crate::proto::{
    Challenge, ClientHandshake, Reject, RejectCode, ServerHandshake, Welcome, client_handshake,
    server_handshake,
};

type HandshakeStream = Framed<Transport, LengthDelimitedCodec>;

/// The same words for a wrong password and an unknown user.
pub const AUTH_FAILED_MESSAGE: &str = "authentication failed: wrong user name or password";

/// Why the handshake did not end in `Welcome`.
enum End {
    /// Answer with `Reject`, log `log` (never a secret), and close.
    Reject {
        code: RejectCode,
        message: String,
        log: String,
    },
    /// The peer went away or the link failed: nothing to answer.
    Closed(String),
}

fn reject(code: RejectCode, message: impl Into<String>) -> End {
    let message = message.into();
    End::Reject {
        code,
        log: message.clone(),
        message,
    }
}

fn protocol_error(message: impl Into<String>) -> End {
    reject(RejectCode::ProtocolError, message)
}

/// One frame holding `Reject`, ready to write (length prefix included).
pub(crate) fn reject_frame(code: RejectCode, message: &str) -> Vec<u8> {
    frame(&ServerHandshake {
        kind: Some(server_handshake::Kind::Reject(Reject {
            code: code as i32,
            message: message.to_string(),
        })),
    })
}

fn frame(msg: &ServerHandshake) -> Vec<u8> {
    let len = msg.encoded_len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut out).expect("Vec grows as needed");
    out
}

async fn send(framed: &mut HandshakeStream, kind: server_handshake::Kind) -> Result<(), End> {
    let msg = ServerHandshake { kind: Some(kind) };
    framed
        .send(Bytes::from(msg.encode_to_vec()))
        .await
        .map_err(|e| End::Closed(format!("write failed: {e}")))
}

async fn receive(
    framed: &mut HandshakeStream,
    expecting: &str,
) -> Result<client_handshake::Kind, End> {
    let frame = match framed.next().await {
        None => {
            return Err(End::Closed(format!(
                "closed while we waited for {expecting}"
            )));
        }
        Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
            return Err(protocol_error(format!(
                "handshake frame longer than the limit of {MAX_HANDSHAKE_FRAME} bytes"
            )));
        }
        Some(Err(e)) => return Err(End::Closed(format!("read failed: {e}"))),
        Some(Ok(f)) => f,
    };
    match ClientHandshake::decode(frame.freeze()) {
        Ok(ClientHandshake { kind: Some(kind) }) => Ok(kind),
        Ok(ClientHandshake { kind: None }) => Err(protocol_error(format!(
            "empty ClientHandshake; expected {expecting}"
        ))),
        Err(_) => Err(protocol_error(format!(
            "frame is not a ClientHandshake; expected {expecting}"
        ))),
    }
}

struct Accepted {
    proven: Proven,
    service: String,
    route: Route,
    client_agent: String,
    device_token: String,
}

/// A login whose password or proof checked out.
struct Proven {
    user: String,
    credential: Credential,
    /// `Welcome.data`: the server-final-message for SCRAM, empty for PLAIN.
    server_final: Vec<u8>,
}

/// The mechanisms a connection offers, for `UNSUPPORTED_MECHANISM`.
fn offered(tls: bool) -> String {
    if tls {
        format!("{MECHANISM_PLUS}, {MECHANISM} or {MECHANISM_PLAIN}")
    } else {
        MECHANISM.to_string()
    }
}

/// Takes a place in the login throttle for `user` from `peer`.
async fn begin_attempt(
    shared: &Shared,
    peer: SocketAddr,
    user: &str,
    device_token: &str,
) -> Result<crate::auth::Attempt, End> {
    let device = shared.devices.check(user, device_token);
    let patience = shared
        .limits
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .handshake_timeout;
    match shared
        .throttle
        .begin(Some(peer.ip()), user, device, patience)
        .await
    {
        Ok(a) => Ok(a),
        Err(refused) => {
            shared.counters.login(LoginOutcome::Throttled);
            Err(End::Reject {
                code: RejectCode::AuthFailed,
                message: format!(
                    "too many failed logins for this user from this address; retry in {} s",
                    refused.retry_secs()
                ),
                log: format!("login for user {user:?} refused by the throttle ({refused:?})"),
            })
        }
    }
}

async fn exchange(
    shared: &Shared,
    framed: &mut HandshakeStream,
    peer: SocketAddr,
    bindings: Option<&ChannelBindings>,
) -> Result<Accepted, End> {
    let hello = match receive(framed, "Hello").await? {
        client_handshake::Kind::Hello(h) => h,
        client_handshake::Kind::Response(_) => {
            return Err(protocol_error("expected Hello, got Response"));
        }
    };
    let service = hello.service;
    if shared.registry.route(&service).is_none() {
        return Err(reject(
            RejectCode::UnknownService,
            format!("no service named {service:?} on this port"),
        ));
    }
    // SCRAM-SHA-256 anywhere; SCRAM-SHA-256-PLUS (channel binding) and
    // PLAIN (the password itself, for `[[checker]]`s) inside TLS only.
    let tls = bindings.is_some();
    let proven = match (hello.mechanism.as_str(), tls) {
        (MECHANISM, _) => {
            scram_login(
                shared,
                framed,
                peer,
                bindings,
                false,
                &hello.initial_response,
                &hello.device_token,
            )
            .await?
        }
        (MECHANISM_PLUS, true) => {
            scram_login(
                shared,
                framed,
                peer,
                bindings,
                true,
                &hello.initial_response,
                &hello.device_token,
            )
            .await?
        }
        (MECHANISM_PLAIN, true) => {
            plain_login(shared, peer, &hello.initial_response, &hello.device_token).await?
        }
        (m @ (MECHANISM_PLUS | MECHANISM_PLAIN), false) => {
            return Err(reject(
                RejectCode::UnsupportedMechanism,
                format!(
                    "mechanism {m:?} is offered only inside TLS; use {}",
                    offered(false)
                ),
            ));
        }
        (m, tls) => {
            return Err(reject(
                RejectCode::UnsupportedMechanism,
                format!(
                    "mechanism {m:?} is not offered on this connection; use {}",
                    offered(tls)
                ),
            ));
        }
    };
    let device_token = shared.devices.issue(&proven.user);
    let policy = shared
        .policy
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if !policy.allows(&proven.user, &service) {
        return Err(reject(
            RejectCode::NotAuthorized,
            format!("user {:?} may not use service {service:?}", proven.user),
        ));
    }
    // The service may have left the port while we were authenticating.
    let route = shared.registry.route(&service).ok_or_else(|| {
        reject(
            RejectCode::UnknownService,
            format!("no service named {service:?} on this port"),
        )
    })?;
    Ok(Accepted {
        proven,
        service,
        route,
        client_agent: hello.client_agent,
        device_token,
    })
}

/// PLAIN (RFC 4616), inside TLS: the password is checked against the
/// user's verifier or, for users the secrets file does not know, by the
/// `[[checker]]`s; a wrong one counts in the throttle like a wrong SCRAM
/// proof, and gets the same answer.
async fn plain_login(
    shared: &Shared,
    peer: SocketAddr,
    message: &[u8],
    device_token: &str,
) -> Result<Proven, End> {
    let (user, password) =
        crate::auth::scram::parse_plain(message).map_err(|e| protocol_error(e.to_string()))?;
    let attempt = begin_attempt(shared, peer, &user, device_token).await?;
    match shared
        .password_matches(&user, &password, Channel::Tls)
        .await
    {
        Ok(credential) => {
            attempt.succeeded();
            shared.counters.login(LoginOutcome::Ok);
            Ok(Proven {
                user,
                credential,
                server_final: Vec::new(),
            })
        }
        Err(PasswordRefusal::Failed) => {
            shared.counters.login(LoginOutcome::Failed);
            let delay = attempt.failed();
            tokio::time::sleep(delay).await;
            Err(End::Reject {
                code: RejectCode::AuthFailed,
                message: AUTH_FAILED_MESSAGE.to_string(),
                log: format!("authentication failed for user {user:?} (PLAIN)"),
            })
        }
        Err(e) => Err(End::Reject {
            code: RejectCode::Overloaded,
            message: e.to_string(),
            log: format!("PLAIN login for user {user:?} not checked: {e}"),
        }),
    }
}

/// SCRAM-SHA-256, or SCRAM-SHA-256-PLUS when `plus`: challenge, proof,
/// and the server's signature for the client to check.
async fn scram_login(
    shared: &Shared,
    framed: &mut HandshakeStream,
    peer: SocketAddr,
    bindings: Option<&ChannelBindings>,
    plus: bool,
    initial_response: &[u8],
    device_token: &str,
) -> Result<Proven, End> {
    let first = ClientFirst::parse(initial_response).map_err(|e| protocol_error(e.to_string()))?;
    // RFC 5802 §6: the flag must fit the mechanism, and a client that could
    // have bound (`y`) on a channel where the master can is being
    // downgraded by someone in between.
    match (first.flag(), plus) {
        (Gs2Flag::Bound(_), false) => {
            return Err(protocol_error(format!(
                "channel binding (p=) needs mechanism {MECHANISM_PLUS}"
            )));
        }
        (Gs2Flag::No | Gs2Flag::ClientOnly, true) => {
            return Err(protocol_error(format!(
                "{MECHANISM_PLUS} needs channel binding (p=tls-exporter or p=tls-server-end-point)"
            )));
        }
        (Gs2Flag::ClientOnly, false) if bindings.is_some() => {
            shared.counters.login(LoginOutcome::Failed);
            return Err(End::Reject {
                code: RejectCode::AuthFailed,
                message: format!(
                    "channel binding downgrade: this connection offers {MECHANISM_PLUS}, but the client was told it does not"
                ),
                log:
                    "refused a login: SCRAM channel binding downgrade (y flag on a TLS connection)"
                        .into(),
            });
        }
        _ => {}
    }
    let user = first.user().to_string();
    let attempt = begin_attempt(shared, peer, &user, device_token).await?;
    // The mock is computed for every login, known or not, so that both
    // paths do the same work.
    let mock = shared.mock.verifier(&user);
    let (verifier, known, checker_down) = match shared.checker.verifier(&user).await {
        Ok(Some(v)) => (v, true, false),
        Ok(None) => (mock, false, false),
        Err(e) => {
            tracing::error!(%peer, user = ?user, error = %e, "credential checker failed; refusing the login");
            (mock, false, true)
        }
    };
    let server_first = first.challenge(verifier, known);
    send(
        framed,
        server_handshake::Kind::Challenge(Challenge {
            data: server_first.message().as_bytes().to_vec(),
        }),
    )
    .await?;
    let response = match receive(framed, "Response").await? {
        client_handshake::Kind::Response(r) => r,
        client_handshake::Kind::Hello(_) => {
            return Err(protocol_error("expected Response, got a second Hello"));
        }
    };
    let auth = match server_first.verify_bound(&response.data, bindings) {
        Ok(a) => a,
        Err(e) => {
            let failed = matches!(
                e,
                ScramError::InvalidProof | ScramError::ChannelBindingMismatch
            );
            if failed {
                shared.counters.login(LoginOutcome::Failed);
            }
            if !checker_down && failed {
                // Answered late when this address fails a lot (spraying).
                let delay = attempt.failed();
                tokio::time::sleep(delay).await;
            }
            return Err(match e {
                ScramError::InvalidProof => End::Reject {
                    code: RejectCode::AuthFailed,
                    message: AUTH_FAILED_MESSAGE.to_string(),
                    log: format!("authentication failed for user {user:?}"),
                },
                ScramError::ChannelBindingMismatch => End::Reject {
                    code: RejectCode::AuthFailed,
                    message: ScramError::ChannelBindingMismatch.to_string(),
                    log: format!(
                        "refused a login for user {user:?}: its channel binding is not this connection's (a relay in between?)"
                    ),
                },
                other => protocol_error(other.to_string()),
            });
        }
    };
    attempt.succeeded();
    shared.counters.login(LoginOutcome::Ok);
    Ok(Proven {
        user: auth.user,
        credential: Credential::Verifier(auth.verifier),
        server_final: auth.server_final.into_bytes(),
    })
}

pub(crate) fn session_id() -> String {
    let mut raw = [0u8; 16];
    rand::fill(&mut raw[..]);
    crate::wire::hex(&raw)
}

/// Runs the handshake on a connection whose magic was already read (`rest`
/// holds any bytes the sniffer read past it) and, on success, hands the
/// session to its service in a task of its own.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    stream: Transport,
    rest: BytesMut,
    peer: SocketAddr,
    (permit, stranger): (OwnedSemaphorePermit, super::strangers::StrangerPermit),
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let bindings = stream.channel_bindings();
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_HANDSHAKE_FRAME)
        .new_codec();
    let mut parts = FramedParts::new::<Bytes>(stream, codec);
    parts.read_buf = rest;
    let mut framed = Framed::from_parts(parts);

    let Ok(handshake_slot) = shared.handshakes.clone().try_acquire_owned() else {
        if let Some(silent) = shared.strangers.should_log(peer.ip(), "handshake limit") {
            tracing::warn!(%peer, refused_since_last_line = silent, "refused connection: too many logins in progress (logged once a minute per address)");
        }
        return refuse_quietly(
            framed,
            peer,
            reject(
                RejectCode::Overloaded,
                "too many logins in progress; retry shortly",
            ),
        )
        .await;
    };
    let limits = shared
        .limits
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let outcome = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = tokio::time::timeout(limits.handshake_timeout, exchange(&shared, &mut framed, peer, bindings.as_ref())) => r,
    };
    drop(handshake_slot);
    let accepted = match outcome {
        Ok(Ok(a)) => a,
        Ok(Err(end)) => return refuse(framed, peer, end).await,
        Err(_) => {
            let message = format!(
                "handshake not finished within {:?}",
                limits.handshake_timeout
            );
            return refuse(framed, peer, reject(RejectCode::Timeout, message)).await;
        }
    };

    let Accepted {
        proven,
        service,
        route,
        client_agent,
        device_token,
    } = accepted;
    let id = session_id();
    let welcome = Welcome {
        data: proven.server_final,
        session_id: id.clone(),
        heartbeat_interval_ms: limits.heartbeat_interval.as_millis().min(u32::MAX as u128) as u32,
        server_agent: shared.server_agent.clone(),
        device_token,
    };
    if let Err(End::Closed(why)) | Err(End::Reject { log: why, .. }) =
        send(&mut framed, server_handshake::Kind::Welcome(welcome)).await
    {
        tracing::debug!(%peer, user = %proven.user, reason = %why, "connection lost while sending Welcome");
        return;
    }
    let client: String = client_agent.chars().take(128).collect();
    tracing::info!(%peer, user = %proven.user, %service, session = %id, client = ?client, "session opened");
    shared.counters.session(&service);

    // Hand the session over with empty buffers: they grow with the service's
    // traffic, so an idle session costs a few hundred bytes, not 16 KiB.
    let leftover = framed.into_parts();
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(route.options.max_frame_length)
        .new_codec();
    let mut parts = FramedParts::new::<Bytes>(leftover.io, codec);
    if !leftover.read_buf.is_empty() {
        parts.read_buf = BytesMut::from(&leftover.read_buf[..]);
    }
    let token = shutdown.child_token();
    let guard = shared.sessions.insert(
        LiveSession {
            user: proven.user.clone(),
            service: service.clone(),
            id: id.clone(),
            credential: proven.credential,
            token: token.clone(),
        },
        Some(permit),
    );
    // Logged in: no longer one of its address's strangers.
    drop(stranger);
    let session = Session {
        user: proven.user,
        service,
        peer,
        id,
        heartbeat_interval: limits.heartbeat_interval,
        stream: Framed::from_parts(parts),
        hangup: hangup_for(token),
        _guard: guard,
    };
    tracker.spawn(route.handler.serve(session));
}

async fn refuse(framed: HandshakeStream, peer: SocketAddr, end: End) {
    match &end {
        End::Closed(why) => {
            tracing::info!(%peer, reason = %why, "connection closed during the handshake");
        }
        End::Reject { code, log, .. } => {
            tracing::info!(%peer, code = code.as_str_name(), reason = %log, "refused connection");
        }
    }
    refuse_quietly(framed, peer, end).await
}

/// [`refuse`] without the log line (the caller logged, or rate-limits it).
async fn refuse_quietly(framed: HandshakeStream, _peer: SocketAddr, end: End) {
    match end {
        End::Closed(_) => {}
        End::Reject { code, message, .. } => {
            let mut io = framed.into_inner();
            let reply = reject_frame(code, &message);
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::io::AsyncWriteExt::write_all(&mut io, &reply),
            )
            .await;
            super::listener::close_gracefully(io).await;
        }
    }
}
