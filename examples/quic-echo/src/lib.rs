//! The library half of `portshard-quic-echo`: its clients, shared by the binary's
//! `--connect` mode and the tests, and the application protocols both sides speak.
pub mod client;
pub mod http3;

/// The echo protocol's ALPN: one request per bidirectional stream, answered with the
/// worker's identity and the request.
pub const ECHO_ALPN: &[u8] = b"portshard-echo";
/// HTTP/3's ALPN (RFC 9114): every request answered with the worker's identity.
pub const H3_ALPN: &[u8] = b"h3";
