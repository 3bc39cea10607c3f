//! A client's TLS: whom it trusts (a CA file, the system's roots, or one
//! pinned certificate) and the name it checks. There is no way to skip
//! verification.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Whom a client trusts.
#[derive(Clone, Debug)]
pub enum Trust {
    /// The system's root certificates.
    System,
    /// The CA certificates in a PEM file.
    CaFile(std::path::PathBuf),
    /// Exactly the certificate whose SHA-256 is this (hex), as
    /// `switchyard tls self-signed` prints it.
    Pin(String),
}

/// A client's TLS settings, ready to connect with.
#[derive(Clone)]
pub struct ClientTls {
    pub(crate) connector: tokio_rustls::TlsConnector,
    /// The name the certificate must carry (or `None`: the host of the
    /// address connected to).
    pub server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Why a client's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("cannot read the CA file {path}: {why}")]
    CaFile { path: String, why: String },
    #[error("no usable root certificates on this system: {0}")]
    NoRoots(String),
    #[error("--pin-sha256 takes the 64 hex digits of a certificate's SHA-256, not {0:?}")]
    BadPin(String),
    #[error("TLS setup failed: {0}")]
    Rustls(String),
}

impl ClientTls {
    pub fn new(trust: &Trust, server_name: Option<String>) -> Result<ClientTls, ClientTlsError> {
        let provider = crate::dispatcher::tls::provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientTlsError::Rustls(e.to_string()))?;
        let config = match trust {
            Trust::Pin(hex) => {
                let hex = hex.trim().to_ascii_lowercase();
                if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(ClientTlsError::BadPin(hex));
                }
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(PinnedCert { pin: hex, provider }))
                    .with_no_client_auth()
            }
            Trust::CaFile(path) => {
                let mut roots = rustls::RootCertStore::empty();
                let certs = read_certs(path).map_err(|why| ClientTlsError::CaFile {
                    path: path.display().to_string(),
                    why,
                })?;
                for c in certs {
                    roots.add(c).map_err(|e| ClientTlsError::CaFile {
                        path: path.display().to_string(),
                        why: e.to_string(),
                    })?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Trust::System => {
                let mut roots = rustls::RootCertStore::empty();
                let found = rustls_native_certs::load_native_certs();
                for c in found.certs {
                    let _ = roots.add(c);
                }
                if roots.is_empty() {
                    return Err(ClientTlsError::NoRoots(format!("{:?}", found.errors)));
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
        let mut config = config;
        config.alpn_protocols = vec![b"swyd/1".to_vec()];
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// Connects to `addr` (`HOST:PORT`) and completes the TLS handshake.
    pub async fn connect(
        &self,
        addr: &str,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let name = self.name_for(addr).map_err(std::io::Error::other)?;
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        self.connector.connect(name, tcp).await
    }

    /// The name to check for a connection to `addr` (`HOST:PORT`).
    pub(crate) fn name_for(&self, addr: &str) -> Result<ServerName<'static>, String> {
        let host = match &self.server_name {
            Some(n) => n.clone(),
            None => addr
                .rsplit_once(':')
                .map(|(h, _)| h)
                .unwrap_or(addr)
                .trim_matches(['[', ']'])
                .to_string(),
        };
        ServerName::try_from(host.clone()).map_err(|_| format!("{host:?} is not a server name"))
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    Ok(certs)
}

/// Trusts one certificate, by its SHA-256; the handshake's signatures are
/// still checked against it.
#[derive(Debug)]
struct PinnedCert {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = crate::dispatcher::tls::pin_of(end_entity);
        if bool::from(subtle::ConstantTimeEq::ct_eq(
            got.as_bytes(),
            self.pin.as_bytes(),
        )) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the master's certificate has SHA-256 {got}, not the pinned {}",
                self.pin
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
