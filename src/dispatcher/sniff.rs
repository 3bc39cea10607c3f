//! Telling the port's protocols apart from their first bytes.
//!
//! Only fixed prefixes are matched (cmux's lesson: never parse HTTP/2 frames,
//! since a gRPC client waits for the server's SETTINGS before it sends its
//! HEADERS). Every byte read here is handed on to the chosen protocol. The
//! caller bounds the whole sniff with a deadline.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

pub use crate::wire::{HTTP2_PREFACE, NATIVE_MAGIC};
const HTTP1_METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Native,
    Http2,
    Tls,
    Http1,
    /// Bytes that match nothing this port speaks.
    Unknown,
    /// The peer closed before saying anything recognisable.
    Closed,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Native => "native (SWYD/1)",
            Protocol::Http2 => "HTTP/2",
            Protocol::Tls => "TLS",
            Protocol::Http1 => "HTTP/1",
            Protocol::Unknown => "unknown",
            Protocol::Closed => "closed",
        }
    }
}

/// `Some` once `buf` decides the protocol.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let mut undecided = false;
    let mut check = |pattern: &[u8], p: Protocol| -> Option<Protocol> {
        if buf.starts_with(pattern) {
            Some(p)
        } else {
            if pattern.starts_with(buf) {
                undecided = true;
            }
            None
        }
    };
    if let Some(p) = check(NATIVE_MAGIC, Protocol::Native) {
        return Some(p);
    }
    if let Some(p) = check(HTTP2_PREFACE, Protocol::Http2) {
        return Some(p);
    }
    for m in HTTP1_METHODS {
        if let Some(p) = check(m, Protocol::Http1) {
            return Some(p);
        }
    }
    // A TLS handshake record: content type 22, then major version 3.
    if buf[0] == 0x16 {
        return match buf.get(1) {
            None => None,
            Some(0x03) => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Unknown),
        };
    }
    if undecided {
        None
    } else {
        Some(Protocol::Unknown)
    }
}

/// Reads until the protocol is known. Returns it with every byte read.
pub async fn sniff<R: AsyncRead + Unpin>(io: &mut R) -> std::io::Result<(Protocol, BytesMut)> {
    let mut buf = BytesMut::with_capacity(64);
    loop {
        if let Some(p) = classify(&buf) {
            return Ok((p, buf));
        }
        if io.read_buf(&mut buf).await? == 0 {
            return Ok((Protocol::Closed, buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(classify(b"SWYD/1\r\n\0\0"), Some(Protocol::Native));
        assert_eq!(classify(b"SWYD"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0"), None);
        assert_eq!(classify(HTTP2_PREFACE), Some(Protocol::Http2));
        assert_eq!(
            classify(b"GET /healthz HTTP/1.1\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Protocol::Tls));
        assert_eq!(classify(b"\x16"), None);
        assert_eq!(classify(b"hello"), Some(Protocol::Unknown));
        assert_eq!(classify(b"SWYD/2\r\n"), Some(Protocol::Unknown));
    }
}
