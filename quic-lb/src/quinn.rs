//! quinn integration: a `quinn_proto::ConnectionIdGenerator` that issues QUIC-LB CIDs, so a
//! quinn server behind a QUIC-LB load balancer needs one line of set-up.
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};

use crate::{
    config::{Config, UNROUTABLE_CONFIG_ID},
    decoder::config_id,
    generator::{Generator, OsEntropy},
};

/// Issues QUIC-LB connection IDs for quinn. Install it with
/// `EndpointConfig::cid_generator(QuicLbGenerator::new(config).factory())`.
///
/// Every handle cloned from one `QuicLbGenerator` (every endpoint its factory equips) draws
/// on the same nonce counter, so a process never repeats a nonce however many endpoints it
/// runs. Once an encrypted config has used every nonce it issues unroutable connection IDs
/// (config ID 0b111) of the same length rather than repeat one.
#[derive(Debug, Clone)]
pub struct QuicLbGenerator {
    generator: Arc<Mutex<Generator<OsEntropy>>>,
    config_id: u8,
    cid_len: usize,
    lifetime: Option<Duration>,
}

impl QuicLbGenerator {
    /// A generator for `config` whose connection IDs never expire; its nonce counter
    /// starts at a random value.
    pub fn new(config: Config) -> Self {
        Self {
            config_id: config.config_id(),
            cid_len: config.cid_len(),
            generator: Arc::new(Mutex::new(Generator::new(config, OsEntropy))),
            lifetime: None,
        }
    }

    /// Has quinn retire each connection ID after `lifetime`, so that a config change (a
    /// new key, a new server ID) reaches long-lived connections.
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = Some(lifetime);
        self
    }

    /// What `quinn_proto::EndpointConfig::cid_generator` takes: at each call a handle on
    /// this generator, sharing its nonce counter.
    pub fn factory(self) -> impl Fn() -> Box<dyn ConnectionIdGenerator> + Send + Sync + 'static {
        move || Box::new(self.clone())
    }
}

impl ConnectionIdGenerator for QuicLbGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        // A panic elsewhere while holding the lock leaves the counter intact: keep using it.
        let mut generator = self
            .generator
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ConnectionId::new(&generator.generate_or_unroutable())
    }

    /// Accepts connection IDs of the config's length whose config ID is the config's (or
    /// the unroutable one this generator falls back to); quinn then answers other short
    /// packets for unknown connections with nothing instead of a stateless reset.
    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        let id = config_id(cid);
        if cid.len() == self.cid_len
            && (id == Some(self.config_id) || id == Some(UNROUTABLE_CONFIG_ID))
        {
            Ok(())
        } else {
            Err(InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        self.cid_len
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        self.lifetime
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_decodable_ids_of_the_configured_length() {
        let config = Config::new(3, &[0, 5, 10], 6, Some([1; 16])).unwrap();
        let decoder = config.decoder();
        let mut generator = QuicLbGenerator::new(config).factory()();
        assert_eq!(generator.cid_len(), 10);
        assert_eq!(generator.cid_lifetime(), None);
        let first = generator.generate_cid();
        let second = generator.generate_cid();
        assert_ne!(first, second);
        for cid in [first, second] {
            assert_eq!(cid.len(), 10);
            assert_eq!(decoder.decode(&cid).unwrap().as_bytes(), [0, 5, 10]);
            assert!(generator.validate(&cid).is_ok());
        }
        assert!(generator.validate(&ConnectionId::new(&[0; 10])).is_err());
        assert!(
            generator
                .validate(&ConnectionId::new(&[3 << 5; 8]))
                .is_err()
        );
    }

    #[test]
    fn endpoints_of_one_factory_share_the_nonce_counter() {
        let config = Config::new(0, &[7], 4, Some([2; 16])).unwrap();
        let factory = QuicLbGenerator::new(config.clone())
            .with_lifetime(Duration::from_secs(60))
            .factory();
        let (mut one, mut two) = (factory(), factory());
        assert_eq!(one.cid_lifetime(), Some(Duration::from_secs(60)));
        let nonce = |cid: &ConnectionId| {
            let bytes = config.nonce_of(cid).unwrap();
            u32::from_be_bytes(bytes.as_bytes().try_into().unwrap())
        };
        let a = nonce(&one.generate_cid());
        let b = nonce(&two.generate_cid());
        let c = nonce(&one.generate_cid());
        assert_eq!((b, c), (a.wrapping_add(1), a.wrapping_add(2)));
    }
}
