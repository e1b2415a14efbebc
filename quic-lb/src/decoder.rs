//! The load balancer's side: the server ID out of a connection ID.
use core::fmt;

use aes::{
    Aes128,
    cipher::{Array, KeyInit},
};

use crate::{
    bytes::{Nonce, ServerId},
    cipher::{self, Block},
    config::{ConfigError, MAX_PLAINTEXT_LEN, validate},
};

/// The config rotation codepoint of a connection ID (its first octet's top three bits), or
/// `None` for an empty one: how a load balancer picks the [`Decoder`] to use.
pub fn config_id(cid: &[u8]) -> Option<u8> {
    cid.first().map(|first| first >> 5)
}

/// Extracts server IDs from the connection IDs of one configuration: what a load balancer
/// (or a test) holds to route a packet by its destination connection ID.
#[derive(Clone)]
pub struct Decoder {
    config_id: u8,
    server_id_len: usize,
    nonce_len: usize,
    cipher: Option<Aes128>,
}

/// The key is left out, so a decoder can be logged.
impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder")
            .field("config_id", &self.config_id)
            .field("server_id_len", &self.server_id_len)
            .field("nonce_len", &self.nonce_len)
            .field("encrypted", &self.cipher.is_some())
            .finish()
    }
}

impl Decoder {
    /// A decoder for config rotation codepoint `config_id`, server IDs of `server_id_len`
    /// octets, nonces of `nonce_len` octets and, for encrypted connection IDs, `key`; the
    /// same limits apply as to [`Config::new`](crate::Config::new).
    pub fn new(
        config_id: u8,
        server_id_len: usize,
        nonce_len: usize,
        key: Option<[u8; 16]>,
    ) -> Result<Self, ConfigError> {
        validate(config_id, server_id_len, nonce_len)?;
        Ok(Self::from_parts(
            config_id,
            server_id_len,
            nonce_len,
            key.map(|key| Aes128::new(&Array::from(key))),
        ))
    }

    pub(crate) fn from_parts(
        config_id: u8,
        server_id_len: usize,
        nonce_len: usize,
        cipher: Option<Aes128>,
    ) -> Self {
        Self {
            config_id,
            server_id_len,
            nonce_len,
            cipher,
        }
    }

    /// The config rotation codepoint this decoder reads.
    pub fn config_id(&self) -> u8 {
        self.config_id
    }

    /// The shortest connection ID this decoder can read: first octet, server ID, nonce.
    pub fn cid_len(&self) -> usize {
        1 + self.server_id_len + self.nonce_len
    }

    /// Copies out the plaintext block, decrypted as far as `needed` octets require, or
    /// `None` for a connection ID of another config or too short to hold one of this
    /// config's. Octets a server appended past the nonce are ignored.
    fn plaintext(&self, cid: &[u8], needed: usize) -> Option<Block> {
        if cid.len() < self.cid_len() || config_id(cid) != Some(self.config_id) {
            return None;
        }
        let len = self.server_id_len + self.nonce_len;
        let mut block: Block = [0; MAX_PLAINTEXT_LEN];
        block[..len].copy_from_slice(&cid[1..=len]);
        if let Some(cipher) = &self.cipher {
            cipher::decrypt(cipher, &mut block[..len], needed);
        }
        Some(block)
    }

    /// The server ID in `cid`, or `None` when `cid` has another config ID or is shorter
    /// than this config's connection IDs. Any other bytes decode to *some* server ID
    /// (encryption carries no integrity check): the caller checks it names a live server.
    pub fn decode(&self, cid: &[u8]) -> Option<ServerId> {
        let block = self.plaintext(cid, self.server_id_len)?;
        ServerId::from_slice(&block[..self.server_id_len])
    }

    /// The server ID and the nonce in `cid`, as [`Decoder::decode`] finds them; the nonce
    /// costs the fourth decryption pass a load balancer can skip.
    pub fn decode_with_nonce(&self, cid: &[u8]) -> Option<(ServerId, Nonce)> {
        let len = self.server_id_len + self.nonce_len;
        let block = self.plaintext(cid, len)?;
        Some((
            ServerId::from_slice(&block[..self.server_id_len])?,
            Nonce::from_slice(&block[self.server_id_len..len])?,
        ))
    }
}
