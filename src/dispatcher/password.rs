//! The port's side of logins that carry the password itself (HTTP Basic,
//! the web UI's password login, native PLAIN) and of the web UI's SCRAM
//! over HTTP: they use the same checkers, the same grants, the same
//! throttle and the same session table as native logins. The refusals, the
//! `Basic` header and the cache of accepted passwords are in
//! [`crate::auth::password`]. An unknown user costs the same PBKDF2 as a
//! known one, so timing does not tell which users exist.

use super::counters::LoginOutcome;
use std::net::SocketAddr;
use std::sync::Arc;

use super::Dispatcher;
use super::session::ConnectionSessions;
pub use crate::auth::password::{
    CHECKED_PASSWORD_CACHE, PasswordLogin, PasswordRefusal, parse_basic,
};
use crate::auth::{Channel, Credential, Verifier};

impl Dispatcher {
    /// Takes a place in the login throttle for a webhook's deliveries from
    /// `peer`: a wrong signature counts as a failed login would, per
    /// (address, webhook).
    pub async fn begin_webhook_attempt(
        &self,
        hook: &str,
        peer: Option<SocketAddr>,
    ) -> Result<crate::auth::Attempt, PasswordRefusal> {
        // No user name holds a NUL, so no user shares these counts.
        self.begin_attempt(&format!("\0webhook\0{hook}"), peer, None)
            .await
    }

    /// Counts a failed login in the port's counters.
    pub(crate) fn count_failed_login(&self) {
        self.shared.counters.login(LoginOutcome::Failed);
    }

    /// Takes a place in the login throttle for `user` from `peer` (by the
    /// device token, if the client presented a valid one).
    async fn begin_attempt(
        &self,
        user: &str,
        peer: Option<SocketAddr>,
        device_token: Option<&str>,
    ) -> Result<crate::auth::Attempt, PasswordRefusal> {
        let shared = &self.shared;
        let device = device_token.and_then(|t| shared.devices.check(user, t));
        shared
            .throttle
            .begin(
                peer.map(|p| p.ip()),
                user,
                device,
                std::time::Duration::from_secs(10),
            )
            .await
            .map_err(|r| {
                shared.counters.login(LoginOutcome::Throttled);
                PasswordRefusal::Throttled(r)
            })
    }

    /// Checks a user name and password for `service`, as carried by a
    /// request on a connection from `peer` over `channel`, with the device
    /// token the client presented (if any; see [`crate::auth::throttle`]).
    /// On success, records the login on `conn` so that a reload revoking the
    /// user hangs the connection up, and returns what proved it with a
    /// fresh device token for the client.
    #[allow(clippy::too_many_arguments)]
    pub async fn check_password_login(
        &self,
        user: &str,
        password: &str,
        service: &str,
        peer: Option<SocketAddr>,
        channel: Channel,
        device_token: Option<&str>,
        conn: Option<&ConnectionSessions>,
    ) -> Result<PasswordLogin, PasswordRefusal> {
        let shared = &self.shared;
        // A password this port accepted a moment ago (a gRPC client sends
        // Basic with every request) is no guess: it takes no place in the
        // throttle, so a client's concurrent requests do not queue behind
        // each other; a block still refuses it.
        let device = device_token.and_then(|t| shared.devices.check(user, t));
        shared
            .throttle
            .refuse_if_blocked(peer.map(|p| p.ip()), user, device)
            .map_err(|r| {
                shared.counters.login(LoginOutcome::Throttled);
                PasswordRefusal::Throttled(r)
            })?;
        let cached = shared
            .cached_password(user, password.as_bytes(), channel)
            .await;
        let credential = match cached {
            Some(c) => c,
            None => {
                let attempt = self.begin_attempt(user, peer, device_token).await?;
                match shared
                    .password_matches(user, password.as_bytes(), channel)
                    .await
                {
                    Ok(c) => c,
                    Err(PasswordRefusal::Failed) => {
                        shared.counters.login(LoginOutcome::Failed);
                        let delay = attempt.failed();
                        tracing::info!(peer = ?peer, user = ?user, "refused password login: authentication failed");
                        tokio::time::sleep(delay).await;
                        return Err(PasswordRefusal::Failed);
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        shared.counters.login(LoginOutcome::Ok);
        if !self.policy().allows(user, service) {
            tracing::info!(peer = ?peer, user = ?user, service, "refused password login: service not granted");
            return Err(PasswordRefusal::NotAuthorized {
                user: user.to_string(),
                service: service.to_string(),
            });
        }
        if let Some(conn) = conn {
            conn.note_login(user, service, &credential);
        }
        Ok(PasswordLogin {
            device_token: shared.devices.issue(user),
            credential,
        })
    }

    /// Whether `[[checker]]`s judge passwords on this port (inside TLS).
    pub fn has_password_checkers(&self) -> bool {
        self.shared
            .password_checkers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

impl super::Shared {
    /// The `[[checker]]`s that may judge a password arriving over
    /// `channel` for a user the port's checker knows (`known`) or not.
    fn password_checkers_for(
        &self,
        channel: Channel,
        known: bool,
    ) -> Option<Arc<crate::auth::ChainChecker>> {
        self.password_checkers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|_| channel == Channel::Tls && !known)
    }

    /// What accepted `password` for `user` a moment ago, if the credential
    /// cache remembers it and it still holds: the same verifier, or a
    /// `[[checker]]`'s yes younger than [`CHECKED_PASSWORD_CACHE`] for a user
    /// still without a verifier, inside TLS.
    pub(crate) async fn cached_password(
        &self,
        user: &str,
        password: &[u8],
        channel: Channel,
    ) -> Option<Credential> {
        let slot = self.credential_cache.slot(user, password);
        let (credential, at) = self.credential_cache.get(&slot)?;
        // A checker that cannot answer now: the full check says why.
        let current = self.checker.verifier(user).await.ok()?;
        match (credential, current) {
            (Credential::Verifier(v), Some(now)) if v == now => Some(Credential::Verifier(v)),
            (Credential::Checked, None)
                if at.elapsed() < CHECKED_PASSWORD_CACHE
                    && self.password_checkers_for(channel, false).is_some() =>
            {
                Some(Credential::Checked)
            }
            _ => None,
        }
    }

    /// The verifier to check `user` against and whether the user is known
    /// (an unknown user gets the mock, so both cost the same).
    pub(crate) async fn verifier_for(
        &self,
        user: &str,
    ) -> Result<(Verifier, bool), PasswordRefusal> {
        match self.checker.verifier(user).await {
            Ok(Some(v)) => Ok((v, true)),
            Ok(None) => Ok((self.mock.verifier(user), false)),
            Err(e) => {
                tracing::error!(user = ?user, error = %e, "credential checker failed; refusing the login");
                Err(PasswordRefusal::CheckerDown)
            }
        }
    }

    /// Whether `password` is `user`'s, and what says so: the user's
    /// verifier, if the port's checker knows the user (one PBKDF2, cached);
    /// otherwise, inside TLS only, the `[[checker]]`s in turn (their yes
    /// cached for [`CHECKED_PASSWORD_CACHE`]). On a plain connection a
    /// password checker is never asked: an unknown user costs the same
    /// PBKDF2 as a known one and fails as a wrong password does.
    /// `Err(Failed)` is a wrong password or an unknown user; the caller
    /// counts it in the throttle.
    pub(crate) async fn password_matches(
        &self,
        user: &str,
        password: &[u8],
        channel: Channel,
    ) -> Result<Credential, PasswordRefusal> {
        if let Some(c) = self.cached_password(user, password, channel).await {
            return Ok(c);
        }
        let (verifier, known) = self.verifier_for(user).await?;
        let checkers = self.password_checkers_for(channel, known);
        let slot = self.credential_cache.slot(user, password);
        let credential = match checkers {
            Some(chain) => match chain.check_password(user, password, Channel::Tls).await {
                Ok(Some(true)) => Credential::Checked,
                Ok(_) => return Err(PasswordRefusal::Failed),
                Err(e) => {
                    tracing::error!(user = ?user, error = %e, "password checker failed; refusing the login");
                    return Err(PasswordRefusal::CheckerDown);
                }
            },
            None => {
                let (v, pw) = (verifier.clone(), password.to_vec());
                let matches = tokio::task::spawn_blocking(move || v.matches_password(&pw))
                    .await
                    .unwrap_or(false);
                if !(matches && known) {
                    return Err(PasswordRefusal::Failed);
                }
                Credential::Verifier(verifier)
            }
        };
        self.credential_cache.insert(slot, credential.clone());
        Ok(credential)
    }
}

/// A SCRAM-SHA-256 login over HTTP (the web UI's: the browser computes the
/// proof, the password never leaves it) between its two requests: the
/// challenge is sent, the proof is awaited. It holds its place in the login
/// throttle until it ends; dropped unfinished, it is forgotten.
pub struct PendingScram {
    attempt: crate::auth::Attempt,
    server_first: crate::auth::scram::ServerFirst,
    user: String,
    peer: Option<SocketAddr>,
}

impl PendingScram {
    /// The server-first-message, for the client.
    pub fn challenge(&self) -> &str {
        self.server_first.message()
    }
}

/// A SCRAM login over HTTP that succeeded.
pub struct ScramLogin {
    pub user: String,
    /// What the proof was checked against: a session made from this login
    /// ends when the user's verifier changes.
    pub verifier: Verifier,
    /// The server-final-message (`v=...`): the client checks it to know it
    /// talked to a server that holds its verifier.
    pub server_final: String,
    /// A device token for the client (see [`crate::auth::throttle`]).
    pub device_token: String,
}

impl Dispatcher {
    /// Starts a SCRAM login carried by HTTP: parses the client-first-message
    /// (`n,,n=USER,r=NONCE`), takes a place in the throttle (with the
    /// client's device token, if any), and answers with the challenge. An
    /// unknown user is challenged like a known one.
    pub async fn begin_scram_login(
        &self,
        client_first: &str,
        peer: Option<SocketAddr>,
        device_token: Option<&str>,
    ) -> Result<PendingScram, PasswordRefusal> {
        let first = crate::auth::scram::ClientFirst::parse(client_first.as_bytes())
            .map_err(|e| PasswordRefusal::BadScram(e.to_string()))?;
        let user = first.user().to_string();
        let attempt = self.begin_attempt(&user, peer, device_token).await?;
        let (verifier, known) = self.shared.verifier_for(&user).await?;
        Ok(PendingScram {
            attempt,
            server_first: first.challenge(verifier, known),
            user,
            peer,
        })
    }

    /// Checks the client-final-message of a login begun by
    /// [`Dispatcher::begin_scram_login`]: a wrong proof counts as a failed
    /// login (and is answered late when the address fails a lot); a user
    /// granted none of `services` is refused after a good proof.
    pub async fn finish_scram_login(
        &self,
        pending: PendingScram,
        client_final: &str,
        services: &[&str],
    ) -> Result<ScramLogin, PasswordRefusal> {
        let shared = &self.shared;
        let PendingScram {
            attempt,
            server_first,
            user,
            peer,
        } = pending;
        let auth = match server_first.verify(client_final.as_bytes()) {
            Ok(a) => a,
            Err(crate::auth::scram::ScramError::InvalidProof) => {
                shared.counters.login(LoginOutcome::Failed);
                let delay = attempt.failed();
                tracing::info!(peer = ?peer, user = ?user, "refused web login: authentication failed");
                tokio::time::sleep(delay).await;
                return Err(PasswordRefusal::Failed);
            }
            Err(e) => return Err(PasswordRefusal::BadScram(e.to_string())),
        };
        attempt.succeeded();
        shared.counters.login(LoginOutcome::Ok);
        let policy = self.policy();
        if !services.iter().any(|s| policy.allows(&auth.user, s)) {
            tracing::info!(peer = ?peer, user = ?auth.user, "refused web login: no grant for the web");
            return Err(PasswordRefusal::NotAuthorized {
                user: auth.user,
                service: services.join(" or "),
            });
        }
        tracing::info!(peer = ?peer, user = ?auth.user, "web login");
        Ok(ScramLogin {
            device_token: shared.devices.issue(&auth.user),
            user: auth.user,
            verifier: auth.verifier,
            server_final: auth.server_final,
        })
    }

    /// Whether a login proved by `credential` still holds for `service`:
    /// the user is still configured and granted `service`, and what proved
    /// the login still decides for the user (the same verifier; or, for a
    /// password a `[[checker]]` accepted, still no verifier and still a
    /// checker). A checker that cannot answer now keeps it (an outage must
    /// not log everybody out).
    pub async fn login_still_valid(
        &self,
        user: &str,
        credential: &Credential,
        service: &str,
    ) -> bool {
        let policy = self.policy();
        if !policy.has_user(user) || !policy.allows(user, service) {
            return false;
        }
        match (self.shared.checker.verifier(user).await, credential) {
            (Err(_), _) => true,
            (Ok(Some(v)), Credential::Verifier(old)) => v == *old,
            (Ok(None), Credential::Checked) => self.has_password_checkers(),
            _ => false,
        }
    }
}
