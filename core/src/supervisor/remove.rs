//! Services taken out of the config file: at SIGHUP their workers drain (they keep
//! taking their flows, as no other socket can, until idle or the drain timeout) and stop,
//! then their pins are removed. Other services are untouched.
use std::time::Instant;

use tracing::info;

use super::{Action, Drain, Role, ServiceId, SlotRun, Supervisor};
use crate::table::Slot;

impl<L: Clone> Supervisor<L> {
    /// Starts removing `service`: a reload under way is rolled back, its current workers
    /// retire, and slots without a worker are freed.
    pub(super) fn remove(&mut self, now: Instant, service: ServiceId) {
        self.rollback(service, "the service was taken out of the config");
        let running = &mut self.services[service];
        running.removing = true;
        running.drained.clear();
        info!(service = %running.spec.name, "service taken out of the config: its workers drain and stop, then its pins are removed");
        let slots: Vec<Slot> = running.slots.keys().copied().collect();
        let mut free = Vec::new();
        for slot in slots {
            match running.slots.get_mut(&slot) {
                Some(SlotRun::Serving(worker)) => {
                    if worker.role == Role::Current {
                        worker.role = Role::Retiring(Drain::new(now));
                    }
                }
                // Retires once it has started (see `spawned`).
                Some(SlotRun::Spawning { .. }) => {}
                _ => free.push(slot),
            }
        }
        for slot in free {
            self.services[service].slots.remove(&slot);
            self.release(service, slot);
        }
        self.finish_removal(service);
    }

    /// Once a removed service's last worker has ended, has its pins removed.
    pub(super) fn finish_removal(&mut self, service: ServiceId) {
        let running = &mut self.services[service];
        if running.removing && !running.removed && running.slots.is_empty() {
            running.removed = true;
            info!(service = %running.spec.name, "every worker of the removed service has ended: removing its pins");
            self.push(Action::RemoveService { service });
        }
    }

    /// Whether `service` is being (or has been) removed.
    pub fn is_removed(&self, service: ServiceId) -> bool {
        self.services.get(service).is_some_and(|s| s.removing)
    }
}
