//! The server's side: a stream of connection IDs whose nonces never repeat.
use crate::{
    bytes::ConnectionId,
    config::{Config, MAX_CID_LEN, MAX_NONCE_LEN, UNROUTABLE_CONFIG_ID},
};

/// A source of random bytes. The crate makes no system call of its own: the caller picks
/// the source (the system's with `OsEntropy`, a fixed one in tests). Any
/// `FnMut(&mut [u8])` is one.
pub trait Entropy {
    /// Fills `bytes` with random bytes.
    fn fill(&mut self, bytes: &mut [u8]);
}

impl<F: FnMut(&mut [u8])> Entropy for F {
    fn fill(&mut self, bytes: &mut [u8]) {
        self(bytes)
    }
}

/// The operating system's random source (`getrandom`), what a server normally uses.
#[cfg(feature = "std")]
#[derive(Debug, Clone, Copy, Default)]
pub struct OsEntropy;

#[cfg(feature = "std")]
impl Entropy for OsEntropy {
    fn fill(&mut self, bytes: &mut [u8]) {
        // Without randomness no connection ID is safe to issue; the system's source failing
        // is not something a server can carry on from.
        getrandom::fill(bytes).expect("the system's random source failed");
    }
}

/// Every nonce of an encrypted config has been used once: issuing more would repeat one
/// and, the draft warns, risk exposing the key. The server needs a new config (or issues
/// unroutable connection IDs, as [`Generator::generate_or_unroutable`] does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "every nonce of this QUIC-LB config has been used once: reusing one could expose the key; a new config (key) is needed"
)]
pub struct NoncesExhausted;

/// Issues the connection IDs of one [`Config`].
///
/// With a key, the nonce is a counter that starts at a random value and goes up by one per
/// connection ID, so no nonce repeats until the counter comes back to where it started
/// (draft section 10.4); then [`Generator::generate`] refuses. Without a key the nonce is
/// fresh random bytes each time, as the draft requires of unencrypted connection IDs (a
/// counter in the clear would link them); its length then bounds how many a server can
/// issue before two are likely to collide (about `2^(4 * nonce_len)`).
///
/// It is deliberately not `Clone`: a copy would repeat the original's nonces. Share one
/// generator (as the `quinn` feature's `QuicLbGenerator` does) instead.
#[derive(Debug)]
pub struct Generator<E> {
    config: Config,
    entropy: E,
    counter: [u8; MAX_NONCE_LEN],
    start: [u8; MAX_NONCE_LEN],
    exhausted: bool,
}

impl<E: Entropy> Generator<E> {
    /// A generator for `config` drawing on `entropy`; the nonce counter starts at a random
    /// value.
    pub fn new(config: Config, mut entropy: E) -> Self {
        let mut start = [0; MAX_NONCE_LEN];
        entropy.fill(&mut start[..config.nonce_len()]);
        Self {
            config,
            entropy,
            counter: start,
            start,
            exhausted: false,
        }
    }

    /// The config the connection IDs follow.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A new connection ID, or [`NoncesExhausted`] when an encrypted config has used every
    /// nonce.
    pub fn generate(&mut self) -> Result<ConnectionId, NoncesExhausted> {
        let nonce_len = self.config.nonce_len();
        let mut nonce = [0u8; MAX_NONCE_LEN];
        if self.config.key().is_some() {
            if self.exhausted {
                return Err(NoncesExhausted);
            }
            nonce[..nonce_len].copy_from_slice(&self.counter[..nonce_len]);
            increment(&mut self.counter[..nonce_len]);
            self.exhausted = self.counter == self.start;
        } else {
            self.entropy.fill(&mut nonce[..nonce_len]);
        }
        let mut random_bits = [0u8];
        if !self.config.self_encodes_length() {
            self.entropy.fill(&mut random_bits);
        }
        Ok(self.config.encode(&nonce[..nonce_len], random_bits[0]))
    }

    /// A new connection ID, or once the nonces run out an unroutable one (config ID 0b111,
    /// the length self-encoded, the rest random) of the same length, which the draft has a
    /// server without a usable config issue instead.
    pub fn generate_or_unroutable(&mut self) -> ConnectionId {
        self.generate().unwrap_or_else(|NoncesExhausted| {
            let len = self.config.cid_len();
            let mut cid = [0u8; MAX_CID_LEN];
            self.entropy.fill(&mut cid[1..len]);
            cid[0] = (UNROUTABLE_CONFIG_ID << 5) | (len - 1) as u8;
            ConnectionId::from_slice(&cid[..len]).expect("at most 20 octets")
        })
    }
}

/// Adds one to a big-endian counter, wrapping to zero.
fn increment(counter: &mut [u8]) {
    for byte in counter.iter_mut().rev() {
        let (next, carry) = byte.overflowing_add(1);
        *byte = next;
        if !carry {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increment_carries_and_wraps() {
        let mut counter = [0x00, 0xff, 0xff];
        increment(&mut counter);
        assert_eq!(counter, [0x01, 0x00, 0x00]);
        let mut counter = [0xff; 4];
        increment(&mut counter);
        assert_eq!(counter, [0; 4]);
    }

    #[test]
    fn encrypted_nonces_count_up_from_a_random_start() {
        let config = Config::new(1, &[9, 9, 9], 4, Some([3; 16])).unwrap();
        let mut generator = Generator::new(config.clone(), |bytes: &mut [u8]| bytes.fill(0xfe));
        let nonces: Vec<_> = (0..3)
            .map(|_| config.nonce_of(&generator.generate().unwrap()).unwrap())
            .collect();
        assert_eq!(nonces[0].as_bytes(), [0xfe, 0xfe, 0xfe, 0xfe]);
        assert_eq!(nonces[1].as_bytes(), [0xfe, 0xfe, 0xfe, 0xff]);
        assert_eq!(nonces[2].as_bytes(), [0xfe, 0xfe, 0xff, 0x00]);
    }

    #[test]
    fn refuses_once_every_nonce_is_used_then_issues_unroutable_ids() {
        let config = Config::new(1, &[9], 4, Some([3; 16])).unwrap();
        let mut generator = Generator::new(config, |bytes: &mut [u8]| bytes.fill(0));
        // Skip most of the 2^32 nonces.
        generator.counter[..4].copy_from_slice(&[0xff, 0xff, 0xff, 0xfe]);
        assert!(generator.generate().is_ok());
        assert!(generator.generate().is_ok());
        assert_eq!(generator.generate(), Err(NoncesExhausted));
        let cid = generator.generate_or_unroutable();
        assert_eq!(cid.len(), 6);
        assert_eq!(cid[0], (0b111 << 5) | 5);
    }

    #[test]
    fn unencrypted_nonces_are_fresh_random_bytes() {
        let config = Config::new(0, &[1, 2], 4, None).unwrap();
        let mut next = 0u8;
        let mut generator = Generator::new(config.clone(), move |bytes: &mut [u8]| {
            for byte in bytes {
                next = next.wrapping_add(17);
                *byte = next;
            }
        });
        let first = generator.generate().unwrap();
        let second = generator.generate().unwrap();
        assert_eq!(&first[1..3], [1, 2]);
        assert_ne!(first, second);
        assert_ne!(config.nonce_of(&first), config.nonce_of(&second));
    }
}
