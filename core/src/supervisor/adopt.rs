//! Adoption: a restarted daemon takes over what the pins of a previous one record. The
//! workers still running (same pid and start time) are kept with every entry they own, an
//! old generation's go on draining, slots whose workers died meanwhile are healed and
//! restarted, and a reload left halfway is rolled back. Then the table is settled: a
//! previous daemon killed between seating a slot and writing its entries left a live member
//! that owns nothing, and it takes its share from the others' surplus.
use std::{collections::BTreeMap, time::Instant};

use portshard_common::SlotState;
use tracing::{info, warn};

use super::{
    Crashes, Drain, Pending, Role, Running, ServiceId, Signal, Supervisor, TableOp, Worker,
};
use crate::{config::Service, table::Slot};

/// What a service's pins record, as the daemon read it; empty for a new group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Adoption {
    /// The generation that takes new work (0 if none was recorded).
    pub generation: u32,
    /// The adopted table's members and their weights.
    pub members: BTreeMap<Slot, u32>,
    /// Every slot with a record.
    pub slots: Vec<AdoptedSlot>,
}

/// One slot's record, and whether the process it names still runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdoptedSlot {
    /// The slot.
    pub slot: Slot,
    /// Its recorded state.
    pub state: SlotState,
    /// Its worker's pid.
    pub pid: u32,
    /// Its worker's generation.
    pub generation: u32,
    /// Its restarts so far.
    pub restarts: u32,
    /// Whether that very process (same start time) still runs; the daemon then holds a
    /// pidfd on it and reports its exit.
    pub alive: bool,
}

impl<L: Clone> Supervisor<L> {
    /// A service joins: its group was created, or adopted as `adoption` says. Each adopted
    /// slot is kept, healed or rolled back, missing workers are started and extra ones
    /// retire; then a member left with fewer entries than any operation leaves it gets its
    /// share with the fewest moves (see [`TableOp::Settle`]).
    pub(super) fn added(&mut self, now: Instant, spec: Service, launch: L, adoption: Adoption) {
        let service: ServiceId = self.services.len();
        let generation = adoption.generation.max(1);
        self.services.push(Running {
            spec,
            launch,
            slots: BTreeMap::new(),
            crashes: BTreeMap::new(),
            members: adoption.members,
            drained: Default::default(),
            generation,
            reload: None,
            attempts: 0,
            probe_outcomes: BTreeMap::new(),
            removing: false,
            removed: false,
        });
        for record in adoption.slots {
            if record.state == SlotState::Free {
                continue;
            }
            self.adopt_slot(now, service, generation, record);
        }
        if let Err(error) = self.resize(now, service) {
            tracing::error!(service = %self.services[service].spec.name, %error, "cannot start every worker");
        }
        // After the removals, drains and retirements above, so no entry goes to a member
        // that is about to give it up.
        if !self.services[service].members.is_empty() {
            let what = "adoption settled every member's share".to_owned();
            self.table_awaited(service, TableOp::Settle, Pending::Log { service, what });
        }
    }

    fn adopt_slot(&mut self, now: Instant, service: ServiceId, current: u32, record: AdoptedSlot) {
        let AdoptedSlot {
            slot,
            state,
            pid,
            generation,
            restarts,
            alive,
        } = record;
        self.set_crashes(
            service,
            slot,
            Crashes {
                in_a_row: 0,
                restarts,
            },
        );
        let name = self.services[service].spec.name.clone();
        let recorded = matches!(
            state,
            SlotState::Live | SlotState::Draining | SlotState::Starting
        );
        let alive = alive && recorded;
        let old = generation < current;
        let worker = |role, stopping| Worker {
            pid,
            since: now,
            generation,
            role,
            stopping,
            probe: None,
        };
        match (state, alive) {
            (SlotState::Starting, true) => {
                warn!(service = %name, slot, pid, generation, "a reload was under way when the previous daemon stopped; stopping its new worker");
                self.signal(service, slot, pid, Signal::Kill);
                self.release(service, slot);
                self.serve(service, slot, worker(Role::Staged, true));
            }
            (SlotState::Starting, false) => self.release(service, slot),
            (_, true) if old => {
                info!(service = %name, slot, pid, generation, "adopted an old generation's worker; it goes on draining");
                // An old worker the table still names (a switch cut short) takes no new work.
                if self.services[service].members.remove(&slot).is_some() {
                    self.table(service, TableOp::Drain(slot));
                }
                self.serve(
                    service,
                    slot,
                    worker(Role::Retiring(Drain::new(now)), false),
                );
            }
            (_, true) => {
                info!(service = %name, slot, pid, "adopted running worker");
                if state == SlotState::Draining {
                    self.services[service].drained.insert(slot);
                }
                self.serve(service, slot, worker(Role::Current, false));
            }
            (_, false) if old => self.release(service, slot),
            (_, false) if recorded || self.services[service].members.contains_key(&slot) => {
                warn!(service = %name, slot, pid, "worker died while no daemon ran; its entries go to their heirs");
                self.services[service].members.remove(&slot);
                self.table(service, TableOp::Remove(slot));
                self.slot_died(service, slot, None);
            }
            (_, false) => {}
        }
    }
}
