//! The library half of `portshard-quic-echo`: its client, shared by the binary's
//! `--connect` mode and the tests.
pub mod client;
