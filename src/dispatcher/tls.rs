//! TLS on the shared port: the certificate and key the master presents,
//! loaded from PEM files (rustls, no OpenSSL), and whether cleartext is
//! still accepted. A reload loads them again; new connections get the new
//! certificate, live ones keep theirs.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// The port's TLS, as of the last (re)load.
pub struct TlsSettings {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    /// Cleartext connections are refused (but HTTP/1 `GET /healthz`).
    pub require: bool,
    /// The SHA-256 of the certificate (the first of the chain), hex: what
    /// clients pin a self-signed master by.
    pub pin_sha256: String,
    /// The certificate presented (DER, the first of the chain), for
    /// `tls-server-end-point` channel binding.
    pub(crate) certificate: Arc<Vec<u8>>,
}

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificate file {path}: {why}")]
    Cert { path: String, why: String },
    #[error("cannot read the key file {path}: {why}")]
    Key { path: String, why: String },
    #[error("the key in {key} does not belong to the certificate in {cert}")]
    Mismatch { cert: String, key: String },
    #[error("TLS setup failed: {0}")]
    Rustls(String),
}

/// The crypto the master and its clients use (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The ALPN protocols the master offers: gRPC and the UI's HTTP, and the
/// native protocol's own name.
pub const ALPN: &[&[u8]] = &[b"h2", b"http/1.1", b"swyd/1"];

/// SHA-256 of a DER certificate, hex.
pub fn pin_of(der: &[u8]) -> String {
    crate::wire::hex(&Sha256::digest(der))
}

impl TlsSettings {
    /// The acceptor these settings make (for a relay in a test, or a
    /// program that embeds the port's TLS).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.acceptor.clone()
    }

    /// Loads a PEM certificate chain and its key.
    pub fn load(cert: &Path, key: &Path, require: bool) -> Result<TlsSettings, TlsError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TlsError::Cert {
                path: cert.display().to_string(),
                why: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(TlsError::Cert {
                path: cert.display().to_string(),
                why: "no PEM certificate in it".into(),
            });
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
            path: key.display().to_string(),
            why: e.to_string(),
        })?;
        let provider = provider();
        let signing = provider
            .key_provider
            .load_private_key(key_der.clone_key())
            .map_err(|e| TlsError::Key {
                path: key.display().to_string(),
                why: e.to_string(),
            })?;
        let pin_sha256 = pin_of(&certs[0]);
        let certificate = Arc::new(certs[0].to_vec());
        let certified = rustls::sign::CertifiedKey::new(certs.clone(), signing);
        if certified.keys_match().is_err() {
            return Err(TlsError::Mismatch {
                cert: cert.display().to_string(),
                key: key.display().to_string(),
            });
        }
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key_der)
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(TlsSettings {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            require,
            pin_sha256,
            certificate,
        })
    }
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("require", &self.require)
            .field("pin_sha256", &self.pin_sha256)
            .finish_non_exhaustive()
    }
}

/// Writes `dir/cert.pem` and `dir/key.pem`: a self-signed certificate for
/// `names` (rcgen), for trying TLS out. Returns its SHA-256 pin. Existing
/// files are not overwritten; the key is readable by its owner only.
pub fn write_self_signed(names: &[String], dir: &Path) -> Result<String, String> {
    let (cert_pem, key_pem, pin) = self_signed(names)?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let write = |name: &str, text: &str, mode: u32| -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        f.write_all(text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write("key.pem", &key_pem, 0o600)?;
    write("cert.pem", &cert_pem, 0o644)?;
    Ok(pin)
}

/// A self-signed certificate for `names`: its PEM, its key's PEM and its
/// SHA-256 pin.
pub fn self_signed(names: &[String]) -> Result<(String, String, String), String> {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(names.to_vec()).map_err(|e| e.to_string())?;
    Ok((cert.pem(), signing_key.serialize_pem(), pin_of(cert.der())))
}
