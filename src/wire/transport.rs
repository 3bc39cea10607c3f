//! One type for what a connection runs over, so that sessions, the
//! handshake, HTTP and the client are written once for plain TCP and TLS.
//! The master's side of TLS wraps a [`Rewind`]: the sniffer has already
//! read the ClientHello's first bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::Rewind;

/// A connection's byte stream: plain TCP, or TLS on either side.
pub enum Transport {
    Plain(TcpStream),
    /// The master's end of a TLS connection.
    TlsServer(Box<ServerTls>),
    /// A client's end of a TLS connection.
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// The master's end of a TLS connection, and the certificate it presented.
pub struct ServerTls {
    pub stream: tokio_rustls::server::TlsStream<Rewind<TcpStream>>,
    pub certificate: std::sync::Arc<Vec<u8>>,
}

impl Transport {
    /// Whether the bytes are encrypted (what a login came over).
    pub fn is_tls(&self) -> bool {
        !matches!(self, Transport::Plain(_))
    }

    /// The channel binding data of this connection (`None` in clear):
    /// `tls-exporter` (RFC 9266: the exporter with label
    /// `EXPORTER-Channel-Binding`, no context, 32 bytes) and
    /// `tls-server-end-point` (RFC 5929: the hash of the master's
    /// certificate). Both sides compute the same values unless someone in
    /// between terminates TLS.
    pub fn channel_bindings(&self) -> Option<crate::auth::scram::ChannelBindings> {
        let (exporter, cert) = match self {
            Transport::Plain(_) => return None,
            Transport::TlsServer(s) => (
                export(s.stream.get_ref().1),
                Some(s.certificate.as_ref().clone()),
            ),
            Transport::TlsClient(s) => {
                let conn = s.get_ref().1;
                (
                    export(conn),
                    conn.peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.to_vec()),
                )
            }
        };
        Some(crate::auth::scram::ChannelBindings {
            tls_exporter: exporter.unwrap_or_default(),
            tls_server_end_point: cert.map(|c| end_point_hash(&c)).unwrap_or_default(),
        })
    }
}

/// The `tls-exporter` binding of a connection (RFC 9266).
fn export<D>(conn: &rustls::ConnectionCommon<D>) -> Option<Vec<u8>> {
    conn.export_keying_material(vec![0u8; 32], b"EXPORTER-Channel-Binding", None)
        .ok()
}

/// RFC 5929's hash of a certificate: the hash of its signature algorithm,
/// SHA-256 for MD5, SHA-1 and anything else unnamed (Ed25519 included).
pub fn end_point_hash(der: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    const SHA384_SIGS: &[&[u8]] = &[
        // ecdsa-with-SHA384, sha384WithRSAEncryption
        &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],
        &[
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c,
        ],
    ];
    const SHA512_SIGS: &[&[u8]] = &[
        // ecdsa-with-SHA512, sha512WithRSAEncryption
        &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],
        &[
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d,
        ],
    ];
    // The signature algorithm is the certificate's last AlgorithmIdentifier
    // (before the signature itself); look in its tail.
    let tail = &der[der.len().saturating_sub(600)..];
    let has = |sigs: &[&[u8]]| sigs.iter().any(|s| tail.windows(s.len()).any(|w| w == *s));
    if has(SHA512_SIGS) {
        sha2::Sha512::digest(der).to_vec()
    } else if has(SHA384_SIGS) {
        sha2::Sha384::digest(der).to_vec()
    } else {
        sha2::Sha256::digest(der).to_vec()
    }
}

impl From<TcpStream> for Transport {
    fn from(s: TcpStream) -> Self {
        Transport::Plain(s)
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Transport::Plain($s) => $e,
            Transport::TlsServer(t) => {
                let $s = &mut t.stream;
                $e
            }
            Transport::TlsClient($s) => $e,
        }
    };
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::TlsServer(s) => s.stream.is_write_vectored(),
            Transport::TlsClient(s) => s.is_write_vectored(),
        }
    }
}
