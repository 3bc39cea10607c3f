//! What a client and the master share on the wire: the native protocol's
//! magic and frame limits, and the transport a connection runs over (plain
//! TCP or TLS), whichever side holds it.

pub mod ids;
pub mod rewind;

/// Bytes as lowercase hex (digests, ids, pins, file names).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}
pub mod tls;
pub mod transport;

pub use ids::StepId;
pub use rewind::Rewind;
pub use transport::Transport;

/// The native session protocol's magic.
pub const NATIVE_MAGIC: &[u8; 8] = b"SWYD/1\r\n";

/// The HTTP/2 connection preface, as gRPC clients send it.
pub const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The largest handshake frame either side reads: a SCRAM message is a few
/// hundred bytes, so 8 KiB is generous and bounds what a stranger can make
/// the master hold.
pub const MAX_HANDSHAKE_FRAME: usize = 8 * 1024;

/// The largest session frame by default: 16 MiB, large enough for a log
/// chunk or a config, small enough that one peer cannot make the other
/// allocate without bound.
pub const DEFAULT_MAX_FRAME_LENGTH: usize = 16 * 1024 * 1024;
