//! quinn integration: a `quinn_proto::ConnectionIdGenerator` that issues QUIC-LB CIDs, so a
//! quinn server behind a QUIC-LB load balancer needs one line of set-up.
use std::{sync::Arc, time::Duration};

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};

use crate::{
    config::{Config, UNROUTABLE_CONFIG_ID},
    decoder::config_id,
    generator::{Generator, OsEntropy},
};

/// Issues QUIC-LB connection IDs for quinn. Install it with
/// `EndpointConfig::cid_generator(QuicLbGenerator::factory(config))`.
///
/// Once an encrypted config has used every nonce it issues unroutable connection IDs
/// (config ID 0b111) of the same length rather than repeat one.
#[derive(Debug, Clone)]
pub struct QuicLbGenerator {
    generator: Generator<OsEntropy>,
    lifetime: Option<Duration>,
}

impl QuicLbGenerator {
    /// A generator for `config` whose connection IDs never expire.
    pub fn new(config: Config) -> Self {
        Self {
            generator: Generator::new(config, OsEntropy),
            lifetime: None,
        }
    }

    /// Has quinn retire each connection ID after `lifetime`, so that a config change (a
    /// new key, a new server ID) reaches long-lived connections.
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = Some(lifetime);
        self
    }

    /// What `quinn_proto::EndpointConfig::cid_generator` takes: a new generator (with its
    /// own random nonce start) for `config` at each call.
    pub fn factory(
        config: Config,
    ) -> impl Fn() -> Box<dyn ConnectionIdGenerator> + Send + Sync + 'static {
        let config = Arc::new(config);
        move || Box::new(Self::new(Config::clone(&config)))
    }
}

impl ConnectionIdGenerator for QuicLbGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        ConnectionId::new(&self.generator.generate_or_unroutable())
    }

    /// Accepts connection IDs of the config's length whose config ID is the config's (or
    /// the unroutable one this generator falls back to); quinn then answers other short
    /// packets for unknown connections with nothing instead of a stateless reset.
    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        let config = self.generator.config();
        let id = config_id(cid);
        if cid.len() == config.cid_len()
            && (id == Some(config.config_id()) || id == Some(UNROUTABLE_CONFIG_ID))
        {
            Ok(())
        } else {
            Err(InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        self.generator.config().cid_len()
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
        let mut generator = QuicLbGenerator::factory(config)();
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
}
