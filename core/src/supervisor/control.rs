//! Control requests the supervisor decides on: drain, weight and reload, each refused with
//! a typed error that says what is wrong and what exists, or carried out.
use std::time::Instant;

use portshard_common::MAX_SLOTS;

use super::{Command, Pending, ReplyTo, Role, ServiceId, SlotRun, Supervisor, TableOp};
use crate::{
    control::{ErrorKind, Reply},
    table::Slot,
};

/// Why a control request was refused or did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// No service of that name.
    #[error("no service {service:?}: this daemon serves {known}")]
    NoService {
        /// The name asked for.
        service: String,
        /// The services there are, comma-separated.
        known: String,
    },
    /// The service was taken out of the config and its workers have not all ended.
    #[error(
        "service {service} was taken out of the config and its workers are still draining: send SIGHUP again once they have ended (`portshard status` shows them)"
    )]
    StillRemoving {
        /// The service.
        service: String,
    },
    /// The slot number cannot name a slot.
    #[error("service {service} has no slot {slot}: slots are numbered 0 to {}", MAX_SLOTS - 1)]
    SlotOutOfRange {
        /// The service.
        service: String,
        /// The slot asked for.
        slot: Slot,
    },
    /// No worker runs in the slot.
    #[error(
        "service {service} slot {slot} has no running worker; the current generation's workers are in slots {current:?} (`portshard status` lists them)"
    )]
    NoWorker {
        /// The service.
        service: String,
        /// The slot asked for.
        slot: Slot,
        /// The current generation's slots.
        current: Vec<Slot>,
    },
    /// The slot belongs to a generation being started or replaced.
    #[error(
        "service {service} slot {slot} (pid {pid}) belongs to generation {generation}, which is {what} generation {current}: only the current generation's slots can be drained or weighted"
    )]
    NotCurrent {
        /// The service.
        service: String,
        /// The slot.
        slot: Slot,
        /// Its worker.
        pid: u32,
        /// Its generation.
        generation: u32,
        /// "starting to replace" or "replaced by".
        what: &'static str,
        /// The current generation.
        current: u32,
    },
    /// The slot is drained already.
    #[error("service {service} slot {slot} is already draining")]
    AlreadyDraining {
        /// The service.
        service: String,
        /// The slot.
        slot: Slot,
    },
    /// Draining the slot would leave no slot taking new work.
    #[error(
        "service {service} slot {slot} is the only slot taking new work; draining it would leave none"
    )]
    LastMember {
        /// The service.
        service: String,
        /// The slot.
        slot: Slot,
    },
    /// A reload is under way.
    #[error(
        "service {service}: generation {generation} is already being started; wait until it is switched to or rolled back"
    )]
    ReloadUnderWay {
        /// The service.
        service: String,
        /// The generation being started.
        generation: u32,
    },
    /// The change would alter what the pins record.
    #[error(
        "service {service}: the address, protocol, mode and flow table of a running service cannot change (from {from} to {to}): stop portshard, remove the service's pins and start it again"
    )]
    PinsChange {
        /// The service.
        service: String,
        /// What runs.
        from: String,
        /// What was asked for.
        to: String,
    },
    /// Not enough free slots for a generation.
    #[error(
        "service {service}: generation {generation} needs {needed} slots but only {free} of {MAX_SLOTS} are free; wait for the old generation to drain, or lower `workers`"
    )]
    NoFreeSlots {
        /// The service.
        service: String,
        /// The generation.
        generation: u32,
        /// Slots it needs.
        needed: u32,
        /// Slots free.
        free: usize,
    },
    /// The daemon is stopping: it takes no more changes.
    #[error("the daemon is stopping: it takes no more changes")]
    Stopping,
    /// The group refused the table change.
    #[error("the table change was refused: {message}")]
    Table {
        /// The group's error.
        message: String,
    },
    /// A reload was rolled back.
    #[error(
        "service {service} generation {generation} rolled back: {reason}; generation {current} keeps serving and no flow moved"
    )]
    RolledBack {
        /// The service.
        service: String,
        /// The generation that was started.
        generation: u32,
        /// Why it was rolled back.
        reason: String,
        /// The generation that keeps serving.
        current: u32,
    },
}

impl ControlError {
    /// The reply that carries this error.
    pub fn reply(&self) -> Reply {
        Reply::Error {
            message: self.to_string(),
            kind: match self {
                Self::RolledBack { .. } => ErrorKind::RolledBack,
                _ => ErrorKind::Refused,
            },
        }
    }
}

impl<L: Clone> Supervisor<L> {
    /// Decides on a control request from `reply`; a refused one changes nothing.
    pub(super) fn control(&mut self, now: Instant, command: super::Command<L>, reply: ReplyTo) {
        let result = match command {
            _ if self.stopping => Err(ControlError::Stopping),
            Command::Drain { service, slot } => self.drain(&service, slot, reply),
            Command::Weight {
                service,
                slot,
                weight,
            } => self.weight(&service, slot, weight, reply),
            Command::Reload { spec, launch } => self
                .service_id(&spec.name)
                .and_then(|service| self.reload(now, service, *spec, launch, Some(reply))),
        };
        if let Err(error) = result {
            self.reply(reply, error.reply());
        }
    }

    /// The id of the service named `name`, or the error listing those there are.
    pub fn service_id(&self, name: &str) -> Result<ServiceId, ControlError> {
        self.find(name).ok_or_else(|| ControlError::NoService {
            service: name.to_owned(),
            known: self
                .services
                .iter()
                .map(|s| s.spec.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Checks that `slot` of `service` runs a current worker: drains and weights apply to
    /// those only.
    fn current_slot(&self, service: ServiceId, slot: Slot) -> Result<(), ControlError> {
        let running = &self.services[service];
        let name = running.spec.name.clone();
        if u32::from(slot) >= MAX_SLOTS {
            return Err(ControlError::SlotOutOfRange {
                service: name,
                slot,
            });
        }
        match running.slots.get(&slot) {
            Some(SlotRun::Serving(worker)) if worker.role == Role::Current => Ok(()),
            Some(SlotRun::Serving(worker)) => Err(ControlError::NotCurrent {
                service: name,
                slot,
                pid: worker.pid,
                generation: worker.generation,
                what: if worker.role == Role::Staged {
                    "starting to replace"
                } else {
                    "replaced by"
                },
                current: running.generation,
            }),
            _ => Err(ControlError::NoWorker {
                service: name,
                slot,
                current: running
                    .slots
                    .iter()
                    .filter(
                        |(_, run)| matches!(run, SlotRun::Serving(w) if w.role == Role::Current),
                    )
                    .map(|(&slot, _)| slot)
                    .collect(),
            }),
        }
    }

    fn drain(&mut self, name: &str, slot: Slot, reply: ReplyTo) -> Result<(), ControlError> {
        let service = self.service_id(name)?;
        self.current_slot(service, slot)?;
        let running = &mut self.services[service];
        let name = running.spec.name.clone();
        if running.drained.contains(&slot) {
            return Err(ControlError::AlreadyDraining {
                service: name,
                slot,
            });
        }
        if running.members.len() == 1 && running.members.contains_key(&slot) {
            return Err(ControlError::LastMember {
                service: name,
                slot,
            });
        }
        let undo = Undo::of(running, service, slot);
        running.members.remove(&slot);
        running.drained.insert(slot);
        let done = format!(
            "service {name} slot {slot} drained: {{moved}} entries moved to their heirs; its worker keeps its established connections. `portshard weight {name} {slot} W` puts it back"
        );
        self.table_awaited(
            service,
            TableOp::Drain(slot),
            Pending::Reply {
                to: reply,
                done,
                undo,
            },
        );
        Ok(())
    }

    fn weight(
        &mut self,
        name: &str,
        slot: Slot,
        weight: u32,
        reply: ReplyTo,
    ) -> Result<(), ControlError> {
        let service = self.service_id(name)?;
        self.current_slot(service, slot)?;
        let running = &mut self.services[service];
        let name = running.spec.name.clone();
        let undo = Undo::of(running, service, slot);
        let op = if running.drained.remove(&slot) {
            TableOp::Admit { slot, weight }
        } else {
            TableOp::SetWeights([(slot, weight)].into())
        };
        running.members.insert(slot, weight);
        let done =
            format!("service {name} slot {slot} has weight {weight}: {{moved}} entries moved");
        let pending = Pending::Reply {
            to: reply,
            done,
            undo,
        };
        self.table_awaited(service, op, pending);
        Ok(())
    }

    /// A refused table change changed nothing: neither does the supervisor's view of it.
    pub(super) fn undo(&mut self, undo: Undo) {
        let running = &mut self.services[undo.service];
        match undo.weight {
            Some(weight) => running.members.insert(undo.slot, weight),
            None => running.members.remove(&undo.slot),
        };
        if undo.drained {
            running.drained.insert(undo.slot);
        } else {
            running.drained.remove(&undo.slot);
        }
    }
}

/// A slot's membership before a change the table may refuse.
pub(super) struct Undo {
    service: ServiceId,
    slot: Slot,
    weight: Option<u32>,
    drained: bool,
}

impl Undo {
    fn of<L>(running: &super::Running<L>, service: ServiceId, slot: Slot) -> Self {
        Self {
            service,
            slot,
            weight: running.members.get(&slot).copied(),
            drained: running.drained.contains(&slot),
        }
    }
}
