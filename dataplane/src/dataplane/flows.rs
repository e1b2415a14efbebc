//! A service's UDP flow table: how many flows it holds (from counters, never by walking
//! it), a listing read in batches, and the idle sweep that makes room.
//!
//! The program enters a flow on its second datagram and never removes one; the daemon
//! removes flows idle past `flow_idle` and counts them in the `flow_swept` map. So the
//! table holds exactly `flows_new - swept` flows, read in two lookups at any size.
use aya::maps::{MapData, MapError};
use portshard_common::{Flow, FlowCounters, FlowKey, TABLE_FLOWS, names};

use super::{Dataplane, DataplaneError, Result, batch, coarse_now_ns};

/// What one idle sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Flows read.
    pub seen: u64,
    /// Flows removed as idle.
    pub removed: u64,
}

impl Dataplane {
    /// Every flow in the flow table, read in batches. Flows entered or swept meanwhile may
    /// be missed or seen: a snapshot for listings, not a transaction.
    pub fn flows(&self) -> Result<Vec<(FlowKey, Flow)>> {
        let path = self.dir.join(names::FLOWS);
        let map = MapData::from_pin(&path).map_err(|source| DataplaneError::OpenPin {
            path: path.clone(),
            source: Box::new(source),
        })?;
        batch::read_all(&map).map_err(|source| DataplaneError::PinIo {
            action: "reading the flow table in batches from",
            path,
            source,
        })
    }

    /// How many flows the flow table holds: those entered less those swept.
    pub fn flows_held(&self) -> Result<u64> {
        Ok(self.counters()?.flows_new.wrapping_sub(self.flows_swept()?))
    }

    /// The flow table's events, summed over all CPUs.
    pub fn flow_counters(&self) -> Result<FlowCounters> {
        let per_cpu = self.flow_counters.get(&0, 0).map_err(self.map_error(
            names::FLOW_COUNTERS,
            "reading the flow table's counters".to_owned(),
        ))?;
        let mut sum = FlowCounters::default();
        per_cpu.iter().for_each(|cpu| sum.add(cpu));
        Ok(sum)
    }

    /// Flows removed from the flow table as idle, by every sweep so far.
    pub fn flows_swept(&self) -> Result<u64> {
        self.flow_swept
            .get(&0, 0)
            .map_err(self.map_error(names::FLOW_SWEPT, "reading the swept flow count".to_owned()))
    }

    /// Sets the swept count so the table is taken to hold `held` flows now: when pins are
    /// migrated from the LRU flow table, whose entries were counted in `flows_new` too.
    pub(super) fn set_flows_held(&mut self, held: u64) -> Result<()> {
        let swept = self.counters()?.flows_new.wrapping_sub(held);
        self.flow_swept.set(0, swept, 0).map_err(self.map_error(
            names::FLOW_SWEPT,
            "recording the swept flow count".to_owned(),
        ))
    }

    /// Removes the flows idle past the service's `flow_idle` and counts them as swept.
    /// Each is looked up again just before it is removed, so a flow whose datagram came
    /// since the table was read stays. Does nothing when the flow table is off.
    pub fn sweep_idle_flows(&mut self) -> Result<Sweep> {
        let switches = self.switches();
        if switches.flags & TABLE_FLOWS == 0 {
            return Ok(Sweep::default());
        }
        let idle_ns = u64::from(switches.flow_idle_s) * 1_000_000_000;
        let is_idle = |flow: &Flow| coarse_now_ns().saturating_sub(flow.last_seen) > idle_ns;
        let flows = self.flows()?;
        let mut sweep = Sweep {
            seen: flows.len() as u64,
            removed: 0,
        };
        for (key, _) in flows.iter().filter(|(_, flow)| is_idle(flow)) {
            let still_idle = match self.flows.get(key, 0) {
                Ok(flow) => is_idle(&flow),
                Err(MapError::KeyNotFound) => false,
                Err(source) => {
                    return Err(self
                        .map_error(names::FLOWS, "reading a flow to sweep".to_owned())(
                        source,
                    ));
                }
            };
            if !still_idle {
                continue;
            }
            match self.flows.remove(key) {
                Ok(()) => sweep.removed += 1,
                Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(self.map_error(
                        names::FLOWS,
                        format!("removing idle flow from {}", key.source()),
                    )(source));
                }
            }
        }
        if sweep.removed > 0 {
            let swept = self.flows_swept()?.wrapping_add(sweep.removed);
            self.flow_swept.set(0, swept, 0).map_err(self.map_error(
                names::FLOW_SWEPT,
                "recording the swept flow count".to_owned(),
            ))?;
        }
        Ok(sweep)
    }
}
