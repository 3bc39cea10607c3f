//! SCRAM-SHA-256 (RFC 5802, RFC 7677), both sides, as typed states.
//!
//! Each step of the exchange is its own type, consumed by the next step, so a
//! message out of order cannot even be expressed: the server can only check a
//! proof on a [`ServerFirst`] it issued, and the client can only verify the
//! server's signature on the [`ClientFinal`] it sent. Over TLS the client
//! binds the channel into its proof (SCRAM-SHA-256-PLUS, RFC 5802 §6):
//! `p=tls-exporter` (RFC 9266) or `p=tls-server-end-point` (RFC 5929); a
//! client sending `y` (it could bind, but believes the server cannot) to a
//! server that can is a downgrade, and is refused.
//! User names are compared as given (no SASLprep): the config's names are the
//! reference.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use subtle::ConstantTimeEq;

use super::verifier::{
    MAX_ITERATIONS, MIN_ITERATIONS, Verifier, derive_keys, hmac, salted_password, sha256,
};

/// The mechanism without channel binding.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// The mechanism with channel binding (TLS only).
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The password itself (RFC 4616), inside TLS only: for users that only a
/// `[[checker]]` (a program, a directory) can judge.
pub const MECHANISM_PLAIN: &str = "PLAIN";

/// Splits a PLAIN message, `authzid NUL authcid NUL passwd` (RFC 4616), into
/// the user and the password. The authorization identity must be empty or
/// the user: nobody logs in as somebody else.
pub fn parse_plain(message: &[u8]) -> Result<(String, Vec<u8>), ScramError> {
    let mut parts = message.splitn(3, |&b| b == 0);
    let (Some(authzid), Some(user), Some(password)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(ScramError::Malformed(
            "PLAIN message must be `authzid NUL user NUL password`",
        ));
    };
    let user = utf8(user)?;
    if user.is_empty() {
        return Err(ScramError::Malformed("empty user name"));
    }
    if !authzid.is_empty() && authzid != user.as_bytes() {
        return Err(ScramError::AuthzidMismatch);
    }
    if password.contains(&0) {
        return Err(ScramError::Malformed("NUL in the PLAIN password"));
    }
    Ok((user.to_string(), password.to_vec()))
}

/// A PLAIN message for `user` and `password`.
pub fn plain_message(user: &str, password: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(user.len() + password.len() + 2);
    out.push(0);
    out.extend_from_slice(user.as_bytes());
    out.push(0);
    out.extend_from_slice(password);
    out
}

/// The channel binding types this module knows.
pub const TLS_EXPORTER: &str = "tls-exporter";
pub const TLS_SERVER_END_POINT: &str = "tls-server-end-point";

/// What the client said of channel binding (its gs2 flag).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gs2Flag {
    /// `n`: the client does not bind.
    No,
    /// `y`: the client could bind but believes the server cannot.
    ClientOnly,
    /// `p=TYPE`: the client binds with this type.
    Bound(String),
}

/// The channel as the server sees it: the binding data of each type.
#[derive(Clone, Debug)]
pub struct ChannelBindings {
    pub tls_exporter: Vec<u8>,
    pub tls_server_end_point: Vec<u8>,
}

impl ChannelBindings {
    fn get(&self, kind: &str) -> Option<&[u8]> {
        match kind {
            TLS_EXPORTER => Some(&self.tls_exporter),
            TLS_SERVER_END_POINT => Some(&self.tls_server_end_point),
            _ => None,
        }
    }
}

/// What went wrong in a SCRAM exchange. `InvalidProof` is the only error a
/// correct client with a wrong password (or an unknown name) can cause.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("SCRAM message is not UTF-8")]
    NotUtf8,
    #[error("SCRAM message is malformed: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported on this connection")]
    ChannelBindingUnsupported,
    #[error("the channel binding does not match this connection (a relay in between?)")]
    ChannelBindingMismatch,
    #[error("authorization identity must be empty or equal the user name")]
    AuthzidMismatch,
    #[error("nonce does not continue the client's nonce")]
    NonceMismatch,
    #[error("invalid proof")]
    InvalidProof,
    #[error("iteration count {0} is out of range ({MIN_ITERATIONS} to {MAX_ITERATIONS})")]
    Iterations(u64),
    #[error("the server's signature does not match: it does not know this user's verifier")]
    ServerSignature,
    #[error("the server reported an error: {0}")]
    ServerError(String),
}

fn utf8(bytes: &[u8]) -> Result<&str, ScramError> {
    std::str::from_utf8(bytes).map_err(|_| ScramError::NotUtf8)
}

/// `saslname` decoding: `=2C` is ',' and `=3D` is '='; any other '=' is an error.
fn decode_saslname(s: &str) -> Result<String, ScramError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(ScramError::Malformed("bad escape in user name")),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    if out.is_empty() {
        return Err(ScramError::Malformed("empty user name"));
    }
    Ok(out)
}

fn encode_saslname(s: &str) -> String {
    s.replace('=', "=3D").replace(',', "=2C")
}

fn valid_nonce(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

fn new_nonce() -> String {
    let mut raw = [0u8; 18];
    rand::fill(&mut raw[..]);
    B64.encode(raw)
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for i in 0..32 {
        out[i] = a[i] ^ b[i];
    }
    out
}

// ---------------------------------------------------------------- server side

/// A parsed client-first-message: who says they are logging in.
#[derive(Debug)]
pub struct ClientFirst {
    user: String,
    flag: Gs2Flag,
    gs2_header: String,
    bare: String,
    client_nonce: String,
}

impl ClientFirst {
    /// Parses `gs2-header client-first-bare`, e.g. `n,,n=user,r=NONCE`.
    pub fn parse(msg: &[u8]) -> Result<Self, ScramError> {
        let msg = utf8(msg)?;
        let mut parts = msg.splitn(3, ',');
        let cbind = parts.next().unwrap_or("");
        let authzid = parts.next().ok_or(ScramError::Malformed("no gs2 header"))?;
        let bare = parts.next().ok_or(ScramError::Malformed("no gs2 header"))?;
        let flag = match cbind {
            "n" => Gs2Flag::No,
            "y" => Gs2Flag::ClientOnly,
            c if c.starts_with("p=") => match &c[2..] {
                t @ (TLS_EXPORTER | TLS_SERVER_END_POINT) => Gs2Flag::Bound(t.to_string()),
                _ => return Err(ScramError::ChannelBindingUnsupported),
            },
            _ => return Err(ScramError::Malformed("bad channel binding flag")),
        };
        let gs2_header = format!("{cbind},{authzid},");
        let mut attrs = bare.split(',');
        let user = match attrs.next() {
            Some(a) if a.starts_with("m=") => {
                return Err(ScramError::Malformed(
                    "mandatory extensions are not supported",
                ));
            }
            Some(a) => a
                .strip_prefix("n=")
                .ok_or(ScramError::Malformed("client-first must start with n="))?,
            None => return Err(ScramError::Malformed("empty client-first")),
        };
        let user = decode_saslname(user)?;
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("client-first has no nonce"))?;
        if !valid_nonce(nonce) {
            return Err(ScramError::Malformed("invalid nonce"));
        }
        if !authzid.is_empty() {
            let a = authzid
                .strip_prefix("a=")
                .ok_or(ScramError::Malformed("bad authzid"))?;
            if decode_saslname(a)? != user {
                return Err(ScramError::AuthzidMismatch);
            }
        }
        Ok(ClientFirst {
            client_nonce: nonce.to_string(),
            user,
            flag,
            gs2_header,
            bare: bare.to_string(),
        })
    }

    /// The user name the client claims.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// What the client said of channel binding.
    pub fn flag(&self) -> &Gs2Flag {
        &self.flag
    }

    /// Answers with a server-first-message built on `verifier`. For a name
    /// the checkers do not know, pass `known = false` with a mock verifier:
    /// the challenge looks the same and the proof will fail the same way.
    pub fn challenge(self, verifier: Verifier, known: bool) -> ServerFirst {
        self.challenge_with_nonce(verifier, known, &new_nonce())
    }

    /// As [`ClientFirst::challenge`], with a chosen server nonce (test vectors).
    pub fn challenge_with_nonce(
        self,
        verifier: Verifier,
        known: bool,
        server_nonce: &str,
    ) -> ServerFirst {
        let nonce = format!("{}{}", self.client_nonce, server_nonce);
        let message = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        ServerFirst {
            first: self,
            verifier,
            known,
            nonce,
            message,
        }
    }
}

/// The server has sent its challenge and waits for the client's proof.
pub struct ServerFirst {
    first: ClientFirst,
    verifier: Verifier,
    known: bool,
    nonce: String,
    message: String,
}

impl ServerFirst {
    /// The server-first-message to send.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Checks the client-final-message. On success returns the
    /// authenticated identity and the server-final-message to send.
    pub fn verify(self, client_final: &[u8]) -> Result<Authenticated, ScramError> {
        self.verify_bound(client_final, None)
    }

    /// [`ServerFirst::verify`] on a channel with these bindings: a client
    /// that sent `p=TYPE` must have bound exactly this channel's data of
    /// that type into its proof.
    pub fn verify_bound(
        self,
        client_final: &[u8],
        bindings: Option<&ChannelBindings>,
    ) -> Result<Authenticated, ScramError> {
        let msg = utf8(client_final)?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("client-final has no proof"))?;
        let mut attrs = without_proof.split(',');
        let cbind = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed("client-final must start with c="))?;
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("client-final has no nonce"))?;
        let cbind = B64
            .decode(cbind)
            .map_err(|_| ScramError::Malformed("channel binding is not base64"))?;
        let mut expected = self.first.gs2_header.as_bytes().to_vec();
        if let Gs2Flag::Bound(kind) = &self.first.flag {
            let data = bindings
                .and_then(|b| b.get(kind))
                .ok_or(ScramError::ChannelBindingUnsupported)?;
            expected.extend_from_slice(data);
        }
        if !bool::from(cbind.ct_eq(&expected)) {
            return Err(ScramError::ChannelBindingMismatch);
        }
        if nonce != self.nonce {
            return Err(ScramError::NonceMismatch);
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("proof is not 32 base64 bytes"))?;
        let auth_message = format!("{},{},{}", self.first.bare, self.message, without_proof);
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key = xor(&proof, &client_signature);
        let ok = sha256(&client_key).ct_eq(&self.verifier.stored_key)
            & subtle::Choice::from(self.known as u8);
        if !bool::from(ok) {
            return Err(ScramError::InvalidProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(Authenticated {
            user: self.first.user,
            verifier: self.verifier,
            server_final: format!("v={}", B64.encode(server_signature)),
        })
    }
}

/// A proof that checked out.
pub struct Authenticated {
    pub user: String,
    /// The verifier the proof was checked against (to notice later that it
    /// changed).
    pub verifier: Verifier,
    /// The server-final-message, for `Welcome.data`.
    pub server_final: String,
}

// ---------------------------------------------------------------- client side

/// The client's first step: holds the name, the password and its nonce.
pub struct ScramClient<'a> {
    user: &'a str,
    password: &'a [u8],
    nonce: String,
    /// The gs2 header, and the channel binding data bound into the proof.
    gs2_header: String,
    binding: Vec<u8>,
}

impl<'a> ScramClient<'a> {
    pub fn new(user: &'a str, password: &'a [u8]) -> Self {
        Self::with_nonce(user, password, &new_nonce())
    }

    /// With a chosen client nonce (test vectors only: a real client must use
    /// a fresh random one).
    pub fn with_nonce(user: &'a str, password: &'a [u8], nonce: &str) -> Self {
        ScramClient {
            user,
            password,
            nonce: nonce.to_string(),
            gs2_header: "n,,".into(),
            binding: Vec::new(),
        }
    }

    /// Binds the channel: `kind` (`tls-exporter` or `tls-server-end-point`)
    /// with the data this client sees for it (SCRAM-SHA-256-PLUS).
    pub fn bind(mut self, kind: &str, data: Vec<u8>) -> Self {
        self.gs2_header = format!("p={kind},,");
        self.binding = data;
        self
    }

    /// Says the client could bind but believes the server cannot (`y`).
    pub fn could_bind(mut self) -> Self {
        self.gs2_header = "y,,".into();
        self.binding.clear();
        self
    }

    fn bare(&self) -> String {
        format!("n={},r={}", encode_saslname(self.user), self.nonce)
    }

    /// The client-first-message, for `Hello.initial_response`.
    pub fn client_first(&self) -> String {
        format!("{}{}", self.gs2_header, self.bare())
    }

    /// Answers the server's challenge. `salted` computes (or fetches from a
    /// cache) the SaltedPassword for a salt and iteration count, so a client
    /// that logs in often pays for PBKDF2 once per salt.
    pub fn answer(
        self,
        server_first: &[u8],
        salted: impl FnOnce(&[u8], &[u8], u32) -> [u8; 32],
    ) -> Result<ClientFinal, ScramError> {
        let server_first = utf8(server_first)?;
        if let Some(e) = server_first.strip_prefix("e=") {
            return Err(ScramError::ServerError(e.to_string()));
        }
        let mut attrs = server_first.split(',');
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("server-first has no nonce"))?;
        let salt = attrs
            .next()
            .and_then(|a| a.strip_prefix("s="))
            .ok_or(ScramError::Malformed("server-first has no salt"))?;
        let iterations = attrs
            .next()
            .and_then(|a| a.strip_prefix("i="))
            .ok_or(ScramError::Malformed("server-first has no iteration count"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() || !valid_nonce(nonce)
        {
            return Err(ScramError::NonceMismatch);
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| ScramError::Malformed("salt is not base64"))?;
        let iterations: u64 = iterations
            .parse()
            .map_err(|_| ScramError::Malformed("iteration count is not a number"))?;
        if !(MIN_ITERATIONS as u64..=MAX_ITERATIONS as u64).contains(&iterations) {
            return Err(ScramError::Iterations(iterations));
        }
        let salted = salted(self.password, &salt, iterations as u32);
        let (client_key, stored_key, server_key) = derive_keys(&salted);
        let mut cbind = self.gs2_header.as_bytes().to_vec();
        cbind.extend_from_slice(&self.binding);
        let without_proof = format!("c={},r={nonce}", B64.encode(cbind));
        let auth_message = format!("{},{server_first},{without_proof}", self.bare());
        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        let proof = xor(&client_key, &client_signature);
        Ok(ClientFinal {
            message: format!("{without_proof},p={}", B64.encode(proof)),
            server_signature: hmac(&server_key, auth_message.as_bytes()),
        })
    }

    /// [`ScramClient::answer`] computing PBKDF2 every time.
    pub fn answer_uncached(self, server_first: &[u8]) -> Result<ClientFinal, ScramError> {
        self.answer(server_first, salted_password)
    }
}

/// The client has sent its proof and waits for the server's signature.
pub struct ClientFinal {
    message: String,
    server_signature: [u8; 32],
}

impl ClientFinal {
    /// The client-final-message, for `Response.data`.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Checks the server-final-message: the server proves it knows the
    /// verifier, so a client cannot be fooled by an impostor.
    pub fn verify_server(self, server_final: &[u8]) -> Result<(), ScramError> {
        let msg = utf8(server_final)?;
        if let Some(e) = msg.strip_prefix("e=") {
            return Err(ScramError::ServerError(e.to_string()));
        }
        let v = msg
            .strip_prefix("v=")
            .ok_or(ScramError::Malformed("server-final has no signature"))?;
        let v = v.split(',').next().unwrap_or("");
        let sig = B64
            .decode(v)
            .map_err(|_| ScramError::Malformed("server signature is not base64"))?;
        if bool::from(sig.ct_eq(&self.server_signature[..])) {
            Ok(())
        } else {
            Err(ScramError::ServerSignature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_messages() {
        assert_eq!(
            parse_plain(&plain_message("alice", b"pw")).unwrap(),
            ("alice".to_string(), b"pw".to_vec())
        );
        assert_eq!(
            parse_plain(b"alice\0alice\0pw").unwrap(),
            ("alice".to_string(), b"pw".to_vec())
        );
        assert_eq!(
            parse_plain(b"admin\0alice\0pw").unwrap_err(),
            ScramError::AuthzidMismatch
        );
        assert!(parse_plain(b"alice\0pw").is_err());
        assert!(parse_plain(b"\0\0pw").is_err());
    }

    #[test]
    fn saslname_escapes() {
        assert_eq!(encode_saslname("a,b=c"), "a=2Cb=3Dc");
        assert_eq!(decode_saslname("a=2Cb=3Dc").unwrap(), "a,b=c");
        assert!(decode_saslname("a=2").is_err());
    }

    #[test]
    fn rejects_channel_binding_and_bad_authzid() {
        assert_eq!(
            ClientFirst::parse(b"p=tls-unique,,n=u,r=abc").unwrap_err(),
            ScramError::ChannelBindingUnsupported
        );
        assert_eq!(
            ClientFirst::parse(b"n,a=other,n=u,r=abc").unwrap_err(),
            ScramError::AuthzidMismatch
        );
        assert!(ClientFirst::parse(b"n,,n=u").is_err());
        assert!(ClientFirst::parse(b"garbage").is_err());
    }
}
