//! Generations: a reload starts the service's next generation in free slots, "staged" (in
//! the socket array, owning no table entry), waits until every new worker has stayed up
//! for `ready_delay` (and, with a probe, answered one), and only then switches: each old
//! member is replaced by a new slot one for one, as one table change, so each flow moves
//! at most once. A new worker that exits or never answers, or a switch the kernel
//! refuses, rolls the reload back: the new generation is stopped and its slots freed; the
//! old one never stopped serving. The old generation then retires: it keeps what it has,
//! takes no new work, and is stopped once idle for `drain_idle` or after `drain_timeout`.
//!
//! SIGHUP applies a config service by service: a new service is added, a new command
//! takes a new generation, anything else applies to the running one.
use std::time::Instant;

use portshard_common::MAX_SLOTS;
use tracing::{error, info, warn};

use super::{
    Action, Activity, ControlError, Drain, Pending, ReplyTo, Role, ServiceId, Signal, SlotRun,
    Supervisor, TableOp, Timer,
};
use crate::{config::Service, control::Reply, probe::Tracker, table::Slot};

/// A reload under way.
pub(super) struct Reload<L> {
    /// Which attempt this is (see [`Timer::ReloadReady`]).
    attempt: u64,
    pub(super) generation: u32,
    pub(super) spec: Service,
    pub(super) launch: L,
    /// The slots of the new generation.
    pub(super) staged: Vec<Slot>,
    /// Spawns not answered yet.
    spawning: usize,
    reply: Option<ReplyTo>,
    started: Instant,
    /// Whether the requester was told the switch waits for readiness probes.
    told_probing: bool,
    /// Whether the switch was asked of the table (its outcome is awaited).
    switching: bool,
}

impl<L: Clone> Supervisor<L> {
    /// Starts generation `current + 1` of `service` with `spec`; the outcome goes to
    /// `reply` (and the log) when the switch is done or rolled back. Refused at once, with
    /// nothing started, if a reload is under way, if `spec` changes what the pins record,
    /// or if there are not enough free slots.
    pub(super) fn reload(
        &mut self,
        now: Instant,
        service: ServiceId,
        spec: Service,
        launch: L,
        reply: Option<ReplyTo>,
    ) -> Result<(), ControlError> {
        if self.stopping {
            return Err(ControlError::Stopping);
        }
        let running = &mut self.services[service];
        let name = running.spec.name.clone();
        if let Some(reload) = &running.reload {
            return Err(ControlError::ReloadUnderWay {
                service: name,
                generation: reload.generation,
            });
        }
        same_pins(&running.spec, &spec)?;
        let free: Vec<Slot> = (0..MAX_SLOTS as Slot)
            .filter(|slot| !running.slots.contains_key(slot))
            .take(spec.workers as usize)
            .collect();
        if free.len() < spec.workers as usize {
            return Err(ControlError::NoFreeSlots {
                service: name,
                generation: running.generation + 1,
                needed: spec.workers,
                free: free.len(),
            });
        }
        running.attempts += 1;
        running.reload = Some(Reload {
            attempt: running.attempts,
            generation: running.generation + 1,
            spec,
            launch,
            staged: free.clone(),
            spawning: free.len(),
            reply,
            started: now,
            told_probing: false,
            switching: false,
        });
        for slot in free {
            self.spawn(service, slot, true);
        }
        Ok(())
    }

    /// A reload's new worker started; once all have, they get their ready delay.
    pub(super) fn staged_started(&mut self, service: ServiceId) {
        let running = &mut self.services[service];
        let Some(reload) = running.reload.as_mut() else {
            return;
        };
        reload.spawning -= 1;
        if reload.spawning > 0 {
            return;
        }
        let pids: Vec<String> = reload
            .staged
            .iter()
            .filter_map(|slot| match running.slots.get(slot) {
                Some(SlotRun::Serving(worker)) => Some(format!("{slot}:{}", worker.pid)),
                _ => None,
            })
            .collect();
        let (generation, attempt, delay) =
            (reload.generation, reload.attempt, reload.spec.ready_delay);
        let message = format!(
            "generation {generation} started {} workers (slot:pid {}); switching to them once they have stayed up for {}",
            pids.len(),
            pids.join(" "),
            humantime::format_duration(delay)
        );
        self.progress(service, message);
        self.after(delay, Timer::ReloadReady { service, attempt });
    }

    /// Tells the reload's requester (and the log) how it goes.
    fn progress(&mut self, service: ServiceId, message: String) {
        let running = &self.services[service];
        let Some(reload) = &running.reload else {
            return;
        };
        info!(service = %running.spec.name, generation = reload.generation, "{message}");
        if let Some(to) = reload.reply {
            self.reply(to, Reply::Progress { message });
        }
    }

    /// The new workers stayed up for the ready delay: switch to them once each has also
    /// answered a probe (if the service probes), or roll back if one never does.
    pub(super) fn reload_ready(&mut self, now: Instant, service: ServiceId, attempt: u64) {
        if self.stopping {
            return;
        }
        let running = &self.services[service];
        let Some(reload) = running
            .reload
            .as_ref()
            .filter(|r| r.attempt == attempt && !r.switching)
        else {
            return;
        };
        if let Some(probe) = &reload.spec.probe {
            let unready: Vec<Slot> = reload
                .staged
                .iter()
                .copied()
                .filter(|slot| {
                    !matches!(running.slots.get(slot), Some(SlotRun::Serving(worker))
                        if worker.probe.as_ref().is_some_and(Tracker::is_passing))
                })
                .collect();
            if !unready.is_empty() {
                let patience =
                    reload.spec.ready_delay + probe.interval * (probe.failures + 1) + probe.timeout;
                if now.saturating_duration_since(reload.started) >= patience {
                    let reason = format!(
                        "the workers in slots {unready:?} answered no readiness probe within {}",
                        humantime::format_duration(patience)
                    );
                    return self.rollback(service, &reason);
                }
                let interval = probe.interval;
                if let Some(reload) = &mut self.services[service].reload
                    && !std::mem::replace(&mut reload.told_probing, true)
                {
                    let message = format!(
                        "waiting for the workers in slots {unready:?} to answer their readiness probe"
                    );
                    self.progress(service, message);
                }
                return self.after(interval, Timer::ReloadReady { service, attempt });
            }
        }
        let running = &mut self.services[service];
        let Some(reload) = running.reload.as_mut() else {
            return;
        };
        reload.switching = true;
        let op = TableOp::Switch {
            old: running.members.keys().copied().collect(),
            new: reload.staged.clone(),
            weight: reload.spec.weight,
        };
        self.table_awaited(service, op, Pending::Switch { service });
    }

    /// The table answered the switch: the new generation takes new work and the old one
    /// retires, or, refused, the reload rolls back.
    pub(super) fn switched(
        &mut self,
        now: Instant,
        service: ServiceId,
        result: Result<u32, String>,
    ) {
        let moved = match result {
            Ok(moved) => moved,
            Err(error) => return self.rollback(service, &format!("switching the table: {error}")),
        };
        let running = &mut self.services[service];
        let Some(reload) = running.reload.take() else {
            return;
        };
        let old_generation = running.generation;
        let mut gone = Vec::new();
        let mut retiring = Vec::new();
        for (&slot, run) in &mut running.slots {
            match run {
                SlotRun::Serving(worker) => match worker.role {
                    Role::Current => {
                        worker.role = Role::Retiring(Drain::new(now));
                        retiring.push(slot);
                    }
                    Role::Staged => worker.role = Role::Current,
                    Role::Retiring(_) => {}
                },
                SlotRun::Waiting | SlotRun::GaveUp => gone.push(slot),
                SlotRun::Spawning { .. } => {}
            }
        }
        for slot in &gone {
            running.slots.remove(slot);
        }
        running.members = reload
            .staged
            .iter()
            .map(|&slot| (slot, reload.spec.weight))
            .collect();
        running.drained.clear();
        running.generation = reload.generation;
        running.spec = reload.spec.clone();
        running.launch = reload.launch.clone();
        let (drain_idle, drain_timeout) = (running.spec.drain_idle, running.spec.drain_timeout);
        let name = running.spec.name.clone();
        let switches = Self::table_switches(&running.spec);
        for slot in gone {
            self.release(service, slot);
        }
        // The new generation's settings the program reads (flow_idle, probes) apply with it.
        self.table(service, TableOp::SetSwitches(switches));
        let message = format!(
            "service {name} generation {} takes new work in slots {:?}: {moved} table entries moved; generation {old_generation} (slots {retiring:?}) keeps its connections and flows and stops once idle for {} (at most {})",
            reload.generation,
            reload.staged,
            humantime::format_duration(drain_idle),
            humantime::format_duration(drain_timeout),
        );
        info!(service = %name, generation = reload.generation, "switched to generation {}", reload.generation);
        if let Some(to) = reload.reply {
            self.reply(
                to,
                Reply::Progress {
                    message: format!("switched to generation {}", reload.generation),
                },
            );
            self.reply(to, Reply::Done { message, moved });
        }
    }

    /// Abandons `service`'s reload: its new workers are killed and their slots freed; the
    /// current generation never stopped serving and nothing moved.
    pub(super) fn rollback(&mut self, service: ServiceId, reason: &str) {
        let running = &mut self.services[service];
        let Some(reload) = running.reload.take() else {
            return;
        };
        let mut staged = Vec::new();
        for (&slot, run) in &mut running.slots {
            if let SlotRun::Serving(worker) = run
                && worker.role == Role::Staged
            {
                worker.stopping = true;
                staged.push((slot, worker.pid, worker.probe.take().is_some()));
            }
        }
        let current = running.generation;
        let name = running.spec.name.clone();
        // The killed workers keep their slots until they have exited (so no new worker
        // takes a slot an old one still holds); the group frees the slots now.
        for (slot, pid, probed) in staged {
            if probed {
                self.push(Action::Unprobe { service, slot });
            }
            self.signal(service, slot, pid, Signal::Kill);
            self.release(service, slot);
        }
        warn!(service = %name, generation = reload.generation, %reason, "reload rolled back");
        if let Some(to) = reload.reply {
            let error = ControlError::RolledBack {
                service: name,
                generation: reload.generation,
                reason: reason.to_owned(),
                current,
            };
            self.reply(to, error.reply());
        }
    }

    /// Takes `slot` out of new work and lets its worker retire; a slot with no worker is
    /// freed.
    pub(super) fn retire(&mut self, now: Instant, service: ServiceId, slot: Slot) {
        let running = &mut self.services[service];
        if running.members.remove(&slot).is_some() {
            running.drained.remove(&slot);
            self.table(service, TableOp::Drain(slot));
        }
        let running = &mut self.services[service];
        match running.slots.get_mut(&slot) {
            Some(SlotRun::Serving(worker)) => {
                info!(service = %running.spec.name, slot, pid = worker.pid, "worker beyond the configured count retires");
                worker.role = Role::Retiring(Drain::new(now));
            }
            Some(_) => {
                running.slots.remove(&slot);
                self.release(service, slot);
            }
            None => {}
        }
    }

    /// Starts or retires current workers until `service` has as many as configured.
    pub(super) fn resize(&mut self, now: Instant, service: ServiceId) -> Result<(), ControlError> {
        let running = &self.services[service];
        let current: Vec<Slot> = running
            .slots
            .iter()
            .filter(|(_, run)| run.is_current())
            .map(|(&slot, _)| slot)
            .collect();
        let wanted = running.spec.workers as usize;
        for &slot in current.iter().skip(wanted) {
            self.retire(now, service, slot);
        }
        for _ in current.len()..wanted {
            let running = &self.services[service];
            let slot = running
                .free_slot()
                .ok_or_else(|| ControlError::NoFreeSlots {
                    service: running.spec.name.clone(),
                    generation: running.generation,
                    needed: running.spec.workers,
                    free: 0,
                })?;
            self.spawn(service, slot, false);
        }
        Ok(())
    }

    /// Stops the retiring workers idle for `drain_idle`, or draining for `drain_timeout`.
    pub(super) fn tick(&mut self, now: Instant, activity: Vec<(ServiceId, Slot, Activity)>) {
        let mut done = Vec::new();
        for (service, slot, seen) in activity {
            let Some(running) = self.services.get_mut(service) else {
                continue;
            };
            let (idle, timeout) = (running.spec.drain_idle, running.spec.drain_timeout);
            let Some(SlotRun::Serving(worker)) = running.slots.get_mut(&slot) else {
                continue;
            };
            let Role::Retiring(drain) = &mut worker.role else {
                continue;
            };
            if worker.stopping {
                continue;
            }
            let busy = match seen {
                Activity::Delivered(delivered) => {
                    drain.delivered.replace(delivered) != Some(delivered)
                }
                Activity::Connections(open) => open > 0,
                Activity::Both {
                    delivered,
                    connections,
                } => drain.delivered.replace(delivered) != Some(delivered) || connections > 0,
                Activity::Unknown => true,
            };
            if busy {
                drain.idle_since = now;
            }
            if now.saturating_duration_since(drain.idle_since) >= idle {
                done.push((service, slot, "idle"));
            } else if now.saturating_duration_since(drain.since) >= timeout {
                done.push((service, slot, "drain timeout"));
            }
        }
        for (service, slot, why) in done {
            self.stop_worker(service, slot, why);
        }
    }

    /// SIGHUP: applies the config read again, service by service (see the module
    /// documentation). A service that cannot take its change keeps running as it was.
    pub(super) fn hangup(&mut self, now: Instant, services: Vec<(Service, L)>, named: &[String]) {
        if self.stopping {
            warn!("SIGHUP during the stop: not applied");
            return;
        }
        let gone: Vec<ServiceId> = (0..self.services.len())
            .filter(|&service| {
                let running = &self.services[service];
                !running.removing && !named.contains(&running.spec.name)
            })
            .collect();
        for service in gone {
            self.remove(now, service);
        }
        for (spec, launch) in services {
            let name = spec.name.clone();
            if let Err(error) = self.apply(now, spec, launch) {
                error!(service = %name, %error, "SIGHUP: not applied to this service");
            }
        }
    }

    /// Brings one service in line with `spec`.
    fn apply(&mut self, now: Instant, spec: Service, launch: L) -> Result<(), ControlError> {
        let still_removing = self
            .services
            .iter()
            .any(|running| running.spec.name == spec.name && running.removing && !running.removed);
        if still_removing {
            return Err(ControlError::StillRemoving { service: spec.name });
        }
        let Some(service) = self.find(&spec.name) else {
            self.push(Action::AddService {
                spec: Box::new(spec),
                launch,
            });
            return Ok(());
        };
        let running = &mut self.services[service];
        if running.spec == spec {
            return Ok(());
        }
        if running.spec.command != spec.command {
            return self.reload(now, service, spec, launch, None);
        }
        same_pins(&running.spec, &spec)?;
        info!(service = %spec.name, "applying the changed settings to the running generation");
        if spec.weight != running.spec.weight && !running.members.is_empty() {
            // One rebalance for every member: member by member, the shares in between
            // would move entries that the final shares put back (every weight doubled
            // moves nothing).
            running
                .members
                .values_mut()
                .for_each(|weight| *weight = spec.weight);
            let weights = running.members.clone();
            let what = format!("weight {} on every slot", spec.weight);
            self.table_awaited(
                service,
                TableOp::SetWeights(weights),
                Pending::Log { service, what },
            );
        }
        self.table(service, TableOp::SetSwitches(Self::table_switches(&spec)));
        let running = &mut self.services[service];
        running.spec = spec;
        running.launch = launch;
        self.resize(now, service)
    }
}

/// Refuses a change of what the service's pins record (address, protocol, mode, flow
/// table), which no running service can take.
fn same_pins(running: &Service, wanted: &Service) -> Result<(), ControlError> {
    if pinned(running) == pinned(wanted) {
        return Ok(());
    }
    Err(ControlError::PinsChange {
        service: running.name.clone(),
        from: describe(running),
        to: describe(wanted),
    })
}

fn pinned(spec: &Service) -> impl PartialEq {
    (spec.listeners.clone(), spec.mode, spec.flow_capacity())
}

/// What the pins record of `spec`, in words.
pub fn describe(spec: &Service) -> String {
    let flows = match spec.flow_capacity() {
        0 => String::new(),
        n => format!(", flow table of {n}"),
    };
    let listens = if spec.listeners.len() == 1 {
        format!("{} {}", spec.proto, spec.listen)
    } else {
        let listeners: Vec<String> = spec.listeners.iter().map(ToString::to_string).collect();
        listeners.join(", ")
    };
    format!("{listens} ({}{flows})", spec.mode.name())
}
