//! A server's QUIC-LB configuration, validated once so that encoding cannot fail.
use core::fmt;

use aes::{
    Aes128,
    cipher::{Array, KeyInit},
};

use crate::{
    bytes::{ConnectionId, Nonce, ServerId},
    cipher::{self, Block},
    decoder::Decoder,
};

/// The highest config rotation codepoint a configuration may use.
pub const MAX_CONFIG_ID: u8 = 6;
/// The config rotation codepoint of connection IDs no load balancer can route (0b111):
/// what a server without a usable configuration issues.
pub const UNROUTABLE_CONFIG_ID: u8 = 0b111;
/// The shortest server ID, in octets.
pub const MIN_SERVER_ID_LEN: usize = 1;
/// The longest server ID, in octets (with the shortest nonce, 19 octets in all).
pub const MAX_SERVER_ID_LEN: usize = 15;
/// The shortest nonce, in octets: fewer would run out too soon.
pub const MIN_NONCE_LEN: usize = 4;
/// The longest nonce, in octets (with the shortest server ID, 19 octets in all).
pub const MAX_NONCE_LEN: usize = 18;
/// The most server ID and nonce octets together: a QUIC version 1 connection ID holds at
/// most 20 octets, one of them the first octet.
pub const MAX_PLAINTEXT_LEN: usize = 19;
/// The longest connection ID QUIC version 1 allows.
pub const MAX_CID_LEN: usize = 20;

/// What is wrong with a QUIC-LB configuration's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The config rotation codepoint is not one a configuration may use.
    #[error(
        "config ID {0} is out of range 0..=6 (7, 0b111, marks connection IDs that no load balancer can route)"
    )]
    ConfigId(u8),
    /// The server ID is empty or longer than 15 octets.
    #[error("server ID length {0} is out of range 1..=15")]
    ServerIdLen(usize),
    /// The nonce is shorter than 4 or longer than 18 octets.
    #[error("nonce length {0} is out of range 4..=18")]
    NonceLen(usize),
    /// Server ID and nonce do not fit in a QUIC version 1 connection ID together.
    #[error(
        "server ID length {server_id_len} plus nonce length {nonce_len} is {}, more than 19: a QUIC version 1 connection ID holds at most 20 octets, one of them the first octet",
        server_id_len + nonce_len
    )]
    TooLong {
        /// The server ID length asked for.
        server_id_len: usize,
        /// The nonce length asked for.
        nonce_len: usize,
    },
}

/// Checks the parameters a load balancer and its servers share.
pub(crate) fn validate(
    config_id: u8,
    server_id_len: usize,
    nonce_len: usize,
) -> Result<(), ConfigError> {
    if config_id > MAX_CONFIG_ID {
        return Err(ConfigError::ConfigId(config_id));
    }
    if !(MIN_SERVER_ID_LEN..=MAX_SERVER_ID_LEN).contains(&server_id_len) {
        return Err(ConfigError::ServerIdLen(server_id_len));
    }
    if !(MIN_NONCE_LEN..=MAX_NONCE_LEN).contains(&nonce_len) {
        return Err(ConfigError::NonceLen(nonce_len));
    }
    if server_id_len + nonce_len > MAX_PLAINTEXT_LEN {
        return Err(ConfigError::TooLong {
            server_id_len,
            nonce_len,
        });
    }
    Ok(())
}

/// One server's QUIC-LB configuration: what it needs to issue connection IDs that a load
/// balancer sharing the config ID, lengths and key can route back to it.
#[derive(Clone)]
pub struct Config {
    config_id: u8,
    server_id: ServerId,
    nonce_len: usize,
    key: Option<[u8; 16]>,
    // The key schedule, computed once rather than per connection ID.
    cipher: Option<Aes128>,
    self_encode_length: bool,
}

/// The key is left out, so a config can be logged.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("config_id", &self.config_id)
            .field("server_id", &self.server_id)
            .field("nonce_len", &self.nonce_len)
            .field("encrypted", &self.key.is_some())
            .field("self_encode_length", &self.self_encode_length)
            .finish()
    }
}

impl PartialEq for Config {
    fn eq(&self, other: &Self) -> bool {
        (
            self.config_id,
            self.server_id,
            self.nonce_len,
            self.key,
            self.self_encode_length,
        ) == (
            other.config_id,
            other.server_id,
            other.nonce_len,
            other.key,
            other.self_encode_length,
        )
    }
}

impl Eq for Config {}

impl Config {
    /// A configuration with config rotation codepoint `config_id` (0 to 6), this server's
    /// `server_id` (1 to 15 octets), `nonce_len` octets of nonce (4 to 18; with the server
    /// ID at most 19) and, for encrypted connection IDs, an AES-128 `key`. Connection IDs
    /// encode their length in the first octet (see [`Config::with_self_encoded_length`]).
    pub fn new(
        config_id: u8,
        server_id: &[u8],
        nonce_len: usize,
        key: Option<[u8; 16]>,
    ) -> Result<Self, ConfigError> {
        validate(config_id, server_id.len(), nonce_len)?;
        Ok(Self {
            config_id,
            server_id: ServerId::from_slice(server_id).expect("length checked"),
            nonce_len,
            key,
            cipher: key.map(|key| Aes128::new(&Array::from(key))),
            self_encode_length: true,
        })
    }

    /// Whether the five low bits of the first octet hold the connection ID's length minus
    /// one (`true`, the default, as in the draft's test vectors; hardware offload may rely
    /// on it) or random bits (`false`).
    pub fn with_self_encoded_length(mut self, self_encode_length: bool) -> Self {
        self.self_encode_length = self_encode_length;
        self
    }

    /// The config rotation codepoint, the first octet's top three bits.
    pub fn config_id(&self) -> u8 {
        self.config_id
    }

    /// This server's ID.
    pub fn server_id(&self) -> &ServerId {
        &self.server_id
    }

    /// The nonce length in octets.
    pub fn nonce_len(&self) -> usize {
        self.nonce_len
    }

    /// The AES-128 key, if connection IDs are encrypted.
    pub fn key(&self) -> Option<&[u8; 16]> {
        self.key.as_ref()
    }

    /// Whether the first octet encodes the length (see [`Config::with_self_encoded_length`]).
    pub fn self_encodes_length(&self) -> bool {
        self.self_encode_length
    }

    /// The length of every connection ID this config issues: the first octet, the server
    /// ID and the nonce.
    pub fn cid_len(&self) -> usize {
        1 + self.server_id.len() + self.nonce_len
    }

    /// The first octet for a connection ID: the config ID in the top three bits, then the
    /// length minus one or, without length self-encoding, `random_bits`.
    pub(crate) fn first_octet(&self, random_bits: u8) -> u8 {
        let low = if self.self_encode_length {
            (self.cid_len() - 1) as u8
        } else {
            random_bits
        };
        (self.config_id << 5) | (low & 0x1f)
    }

    /// The connection ID for `nonce`: deterministic, so the draft's test vectors can be
    /// checked; servers use a [`Generator`](crate::Generator), which never repeats a nonce.
    /// `random_bits` fill the first octet's low five bits when the length is not
    /// self-encoded, and are ignored otherwise.
    ///
    /// # Panics
    ///
    /// When `nonce` is not [`Config::nonce_len`] octets long.
    pub fn encode(&self, nonce: &[u8], random_bits: u8) -> ConnectionId {
        assert_eq!(
            nonce.len(),
            self.nonce_len,
            "the nonce must be nonce_len octets"
        );
        let sid_len = self.server_id.len();
        let len = sid_len + self.nonce_len;
        let mut block: Block = [0; MAX_PLAINTEXT_LEN];
        block[..sid_len].copy_from_slice(&self.server_id);
        block[sid_len..len].copy_from_slice(nonce);
        if let Some(cipher) = &self.cipher {
            cipher::encrypt(cipher, &mut block[..len]);
        }
        let mut cid = [0u8; MAX_CID_LEN];
        cid[0] = self.first_octet(random_bits);
        cid[1..=len].copy_from_slice(&block[..len]);
        ConnectionId::from_slice(&cid[..=len]).expect("at most 20 octets")
    }

    /// A decoder for this config's connection IDs: what a load balancer holds.
    pub fn decoder(&self) -> Decoder {
        Decoder::from_parts(
            self.config_id,
            self.server_id.len(),
            self.nonce_len,
            self.cipher.clone(),
        )
    }

    /// The nonce this config's `cid` carries, or `None` if `cid` is not one of its connection
    /// IDs (wrong config ID, too short, or another server's ID).
    pub fn nonce_of(&self, cid: &[u8]) -> Option<Nonce> {
        let (server_id, nonce) = self.decoder().decode_with_nonce(cid)?;
        (server_id == self.server_id).then_some(nonce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_is_wrong() {
        let message = |e: ConfigError| e.to_string();
        assert_eq!(
            message(Config::new(0, &[0; 16], 4, None).unwrap_err()),
            "server ID length 16 is out of range 1..=15"
        );
        assert_eq!(
            message(Config::new(0, &[], 4, None).unwrap_err()),
            "server ID length 0 is out of range 1..=15"
        );
        assert_eq!(
            message(Config::new(0, &[1], 3, None).unwrap_err()),
            "nonce length 3 is out of range 4..=18"
        );
        assert_eq!(
            Config::new(7, &[1], 4, None).unwrap_err(),
            ConfigError::ConfigId(7)
        );
        assert!(
            message(Config::new(0, &[1; 3], 17, None).unwrap_err())
                .starts_with("server ID length 3 plus nonce length 17 is 20, more than 19")
        );
        assert!(Config::new(6, &[1; 15], 4, None).is_ok());
        assert!(Config::new(6, &[1], 18, None).is_ok());
    }

    #[test]
    fn first_octet_holds_config_id_and_length_or_random_bits() {
        let config = Config::new(5, &[1, 2, 3], 4, None).unwrap();
        assert_eq!(config.cid_len(), 8);
        assert_eq!(config.encode(&[0; 4], 0x1f)[0], (5 << 5) | 7);
        let random = config.with_self_encoded_length(false);
        assert_eq!(random.encode(&[0; 4], 0xff)[0], (5 << 5) | 0x1f);
        assert_eq!(random.encode(&[0; 4], 0x03)[0], (5 << 5) | 0x03);
    }

    #[test]
    fn debug_leaves_the_key_out() {
        let config = Config::new(0, &[1], 4, Some([0xab; 16])).unwrap();
        let text = format!("{config:?}");
        assert!(text.contains("encrypted: true"), "{text}");
        assert!(!text.contains("171"), "{text}");
    }
}
