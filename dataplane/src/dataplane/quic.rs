//! A QUIC service's state in the dataplane: how its packets were steered, and the key its
//! workers encrypt connection IDs with.
use portshard_common::{
    names,
    quic::{QuicCounters, QuicKey},
};

use super::{Dataplane, DataplaneError, Result};

impl Dataplane {
    /// The program's QUIC steering counters, summed over all CPUs.
    pub fn quic_counters(&self) -> Result<QuicCounters> {
        let per_cpu = self
            .quic_counters
            .get(&0, 0)
            .map_err(|source| DataplaneError::Map {
                action: "reading the QUIC counters".to_owned(),
                path: self.dir.join(names::QUIC_COUNTERS),
                source: Box::new(source),
            })?;
        let mut sum = QuicCounters::default();
        per_cpu.iter().for_each(|cpu| sum.add(cpu));
        Ok(sum)
    }

    /// The service's QUIC-LB key, made now if the pins hold none: 16 octets from the
    /// kernel's random source, pinned with their round keys so the program decrypts what
    /// the workers encrypt, and a restarted daemon and every generation keep the same key.
    pub fn quic_key(&mut self) -> Result<[u8; 16]> {
        let path = self.dir.join(names::QUIC_KEY);
        let pinned = self
            .quic_key
            .get(&0, 0)
            .map_err(|source| DataplaneError::Map {
                action: "reading the QUIC-LB key".to_owned(),
                path: path.clone(),
                source: Box::new(source),
            })?;
        if pinned.is_set() {
            return Ok(pinned.key);
        }
        let mut key = [0u8; 16];
        let drawn = rustix::rand::getrandom(&mut key, rustix::rand::GetRandomFlags::empty())
            .map_err(std::io::Error::from)
            .and_then(|n| match n {
                16 => Ok(()),
                n => Err(std::io::Error::other(format!("{n} of 16 octets"))),
            });
        drawn.map_err(|source| DataplaneError::Random {
            dir: self.dir.clone(),
            source,
        })?;
        self.quic_key
            .set(0, QuicKey::new(key), 0)
            .map_err(|source| DataplaneError::Map {
                action: "recording a new QUIC-LB key".to_owned(),
                path,
                source: Box::new(source),
            })?;
        Ok(key)
    }
}
