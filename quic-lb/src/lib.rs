//! QUIC-LB connection IDs, as draft-ietf-quic-load-balancers-21 defines them.
//!
//! A QUIC client may change its address (and so its 4-tuple) in the middle of a connection;
//! what stays is the connection ID the server chose. A server that encodes its own *server
//! ID* in every connection ID it issues lets a load balancer in front of it route each packet
//! to it without per-connection state. portshard gives each worker a server ID (the slot
//! number, big-endian `u16`, then the low byte of the slot's generation) so that whatever
//! steers QUIC packets can find the worker that owns a connection.
//!
//! A connection ID is the first octet (three config-rotation bits, then either the CID
//! length minus one or random bits), then the server ID, then a nonce, in the clear or
//! encrypted with AES-128: one AES-ECB block when server ID and nonce add up to 16 octets, a
//! four-pass Feistel network otherwise.
//!
//! The crate does no I/O and holds no clock: [`Config::encode`] and [`Decoder::decode`] are
//! pure functions of their inputs, and [`Generator`] draws its randomness from an
//! [`Entropy`] the caller supplies. With the default `std` feature, `OsEntropy` reads the
//! system's random source and `Config::from_env` reads a worker's environment; without
//! it the crate is `no_std` and allocates nothing. The `quinn` feature adds
//! `QuicLbGenerator`, a `quinn_proto::ConnectionIdGenerator`.
//!
//! # The worker environment
//!
//! portshard sets these for each worker of a service that uses QUIC-LB; `Config::from_env`
//! reads them:
//!
//! | variable | value |
//! |---|---|
//! | `PORTSHARD_QUIC_LB_CONFIG_ID` | the config rotation codepoint, `0` to `6` |
//! | `PORTSHARD_QUIC_LB_SERVER_ID` | the server ID in lowercase hex, 1 to 15 octets, e.g. `00050a` |
//! | `PORTSHARD_QUIC_LB_NONCE_LEN` | the nonce length in octets, `4` to `18` |
//! | `PORTSHARD_QUIC_LB_KEY` | the AES-128 key, 32 hex digits; absent for unencrypted CIDs |
//!
//! None of them set means no QUIC-LB config (the worker issues whatever CIDs it likes);
//! some but not all of the first three is an error. Server ID and nonce lengths add up to
//! at most 19, since a QUIC version 1 CID holds at most 20 octets.
//!
//! ```
//! use portshard_quic_lb::{Config, Generator};
//!
//! let config = Config::new(2, &[0x00, 0x05, 0x0a], 6, Some([7; 16])).unwrap();
//! let decoder = config.decoder();
//! let mut generator = Generator::new(config, |bytes: &mut [u8]| bytes.fill(0x5a));
//! let cid = generator.generate().unwrap();
//! assert_eq!(cid.len(), 10);
//! assert_eq!(decoder.decode(&cid).unwrap().as_ref(), &[0x00, 0x05, 0x0a]);
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]

mod bytes;
mod cipher;
mod config;
mod decoder;
#[cfg(feature = "std")]
mod env;
mod generator;
#[cfg(feature = "quinn")]
mod quinn;

pub use bytes::{ByteString, ConnectionId, Nonce, ServerId};
pub use config::{
    Config, ConfigError, MAX_CID_LEN, MAX_CONFIG_ID, MAX_NONCE_LEN, MAX_PLAINTEXT_LEN,
    MAX_SERVER_ID_LEN, MIN_NONCE_LEN, MIN_SERVER_ID_LEN, UNROUTABLE_CONFIG_ID,
};
pub use decoder::{Decoder, config_id};
#[cfg(feature = "std")]
pub use env::{
    ENV_CONFIG_ID, ENV_KEY, ENV_NONCE_LEN, ENV_SERVER_ID, EnvError, format_hex, parse_hex,
};
#[cfg(feature = "std")]
pub use generator::OsEntropy;
pub use generator::{Entropy, Generator, NoncesExhausted};
#[cfg(feature = "quinn")]
pub use quinn::QuicLbGenerator;
