//! Health probes in the dataplane: the ports whose packets go to the slot they check, and
//! the results the daemon records for the CLI.
use std::{collections::BTreeMap, net::SocketAddr};

use aya::maps::MapError;
use portshard_common::{ProbeHealth, ProbeRoute, names};

use super::{Dataplane, Result};
use crate::table::Slot;

impl Dataplane {
    /// Sends packets from `source` (a health probe's address and port) to `slot`'s socket.
    pub fn set_probe(&mut self, source: SocketAddr, slot: Slot) -> Result<()> {
        let error = self.map_error(
            names::PROBES,
            format!("registering probe source {source} for slot {slot}"),
        );
        let route = ProbeRoute::new(u32::from(slot), source.ip());
        self.probes
            .insert(u32::from(source.port()), route, 0)
            .map_err(error)
    }

    /// Where each probed slot's probes come from, by slot.
    pub fn probe_sources(&self) -> BTreeMap<Slot, SocketAddr> {
        self.probes
            .iter()
            .filter_map(std::result::Result::ok)
            .filter_map(|(port, route)| {
                let slot = Slot::try_from(route.slot).ok()?;
                Some((
                    slot,
                    SocketAddr::new(route.source(), u16::try_from(port).ok()?),
                ))
            })
            .collect()
    }

    /// Forgets every probe port (those of a previous daemon, whose sockets are gone).
    pub fn clear_probes(&mut self) -> Result<()> {
        let ports: Vec<u32> = self
            .probes
            .keys()
            .filter_map(std::result::Result::ok)
            .collect();
        for port in ports {
            let error = self.map_error(names::PROBES, format!("removing probe port {port}"));
            match self.probes.remove(&port) {
                Err(MapError::KeyNotFound) => {}
                other => other.map_err(error)?,
            }
        }
        Ok(())
    }

    /// Records the probe results of `slot`'s worker.
    pub fn set_health(&mut self, slot: Slot, health: ProbeHealth) -> Result<()> {
        let error = self.map_error(
            names::HEALTH,
            format!("recording the probe result of slot {slot}"),
        );
        self.health.set(u32::from(slot), health, 0).map_err(error)
    }

    /// The probe results recorded for `slot`'s worker.
    pub fn health(&self, slot: Slot) -> Result<ProbeHealth> {
        let error = self.map_error(
            names::HEALTH,
            format!("reading the probe result of slot {slot}"),
        );
        self.health.get(&u32::from(slot), 0).map_err(error)
    }
}
