//! A slot's life: spawned, serving, probed, dead and healed, restarted with backoff or
//! given up on, stopped.
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::{
    Action, Crashes, Drain, Exit, Role, ServiceId, Signal, SlotRun, Spawn, Supervisor, TableOp,
    Timer, Worker,
};
use crate::{
    probe::{Outcome, Tracker, Verdict},
    table::Slot,
};

/// Crashes in a row beyond which the backoff stops doubling (the cap applies anyway).
const MAX_DOUBLINGS: u32 = 20;

/// How long a stop waits for a worker after SIGKILL before it gives up on it.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

impl<L: Clone> Supervisor<L> {
    /// Starts a worker in `slot`: of the reload's generation if `staged`, else of the
    /// current one.
    pub(super) fn spawn(&mut self, service: ServiceId, slot: Slot, staged: bool) {
        if self.stopping {
            return;
        }
        let running = &mut self.services[service];
        let (spec, launch, generation) = match (&running.reload, staged) {
            (Some(reload), true) => (
                reload.spec.clone(),
                reload.launch.clone(),
                reload.generation,
            ),
            _ => (
                running.spec.clone(),
                running.launch.clone(),
                running.generation,
            ),
        };
        let restarts = running.crashes.get(&slot).map_or(0, |c| c.restarts);
        running.slots.insert(slot, SlotRun::Spawning { staged });
        self.push(Action::Spawn(Spawn {
            service,
            slot,
            spec: Box::new(spec),
            launch,
            generation,
            restarts,
            staged,
        }));
    }

    /// A spawn succeeded: the worker serves its slot (a current one is in the table).
    pub(super) fn spawned(&mut self, now: Instant, service: ServiceId, slot: Slot, pid: u32) {
        let running = &mut self.services[service];
        let Some(SlotRun::Spawning { staged }) = running.slots.get(&slot) else {
            return;
        };
        let staged = *staged;
        if running.removing {
            // Started while its service was being removed: it retires at once.
            running.slots.insert(
                slot,
                SlotRun::Serving(Worker {
                    pid,
                    since: now,
                    generation: running.generation,
                    role: Role::Retiring(Drain::new(now)),
                    stopping: false,
                    probe: None,
                }),
            );
            return;
        }
        if staged
            && !running
                .reload
                .as_ref()
                .is_some_and(|reload| reload.staged.contains(&slot))
        {
            // Its reload was rolled back (or the daemon is stopping) while it started: it
            // goes too, and its slot is freed when it has exited.
            let generation = running.generation + 1;
            running.slots.insert(
                slot,
                SlotRun::Serving(Worker {
                    pid,
                    since: now,
                    generation,
                    role: Role::Staged,
                    stopping: true,
                    probe: None,
                }),
            );
            self.signal(service, slot, pid, Signal::Kill);
            return;
        }
        let (role, generation, weight) = match (&running.reload, staged) {
            (Some(reload), true) => (Role::Staged, reload.generation, None),
            _ => (Role::Current, running.generation, Some(running.spec.weight)),
        };
        if let Some(weight) = weight {
            running.members.insert(slot, weight);
        }
        info!(
            service = %running.spec.name,
            slot,
            pid,
            generation,
            restarts = running.crashes.get(&slot).map_or(0, |c| c.restarts),
            staged,
            "worker started"
        );
        let worker = Worker {
            pid,
            since: now,
            generation,
            role,
            stopping: false,
            probe: None,
        };
        self.serve(service, slot, worker);
        if staged {
            self.staged_started(service);
        }
    }

    /// A spawn failed: a staged one rolls its reload back, a current one counts as a crash
    /// of its slot.
    pub(super) fn spawn_failed(&mut self, service: ServiceId, slot: Slot, error: &str) {
        let running = &mut self.services[service];
        let Some(SlotRun::Spawning { staged }) = running.slots.remove(&slot) else {
            return;
        };
        if running.removing {
            self.release(service, slot);
            self.finish_removal(service);
        } else if staged {
            self.release(service, slot);
            self.rollback(
                service,
                &format!("starting the worker for slot {slot}: {error}"),
            );
        } else {
            error!(service = %running.spec.name, slot, %error, "starting the worker failed");
            // As if it had lived a moment: no immediate retry.
            self.slot_died(service, slot, Some(Duration::ZERO));
        }
    }

    /// Records `worker` as serving `slot` and, if the service probes and the worker is
    /// not being stopped, starts probing it.
    pub(super) fn serve(&mut self, service: ServiceId, slot: Slot, mut worker: Worker) {
        let running = &mut self.services[service];
        let probe = match (&running.reload, &worker.role) {
            (Some(reload), Role::Staged) => reload.spec.probe.clone(),
            _ => running.spec.probe.clone(),
        };
        let pid = worker.pid;
        let probe = probe.filter(|_| !worker.stopping);
        if let Some(probe) = &probe {
            worker.probe = Some(Tracker::new(probe.failures));
        }
        let health = worker.probe.as_ref().map(Tracker::health);
        running.slots.insert(slot, SlotRun::Serving(worker));
        if let (Some(probe), Some(health)) = (probe, health) {
            self.table(service, TableOp::SetHealth { slot, health });
            self.push(Action::Probe {
                service,
                slot,
                pid,
                probe,
            });
        }
    }

    /// A worker ended. A current worker's slot is healed (its entries go to their heirs)
    /// and restarted; a retiring worker's slot is freed; a staged worker's exit rolls its
    /// reload back.
    pub(super) fn exited(
        &mut self,
        now: Instant,
        service: ServiceId,
        slot: Slot,
        pid: u32,
        exit: Exit,
    ) {
        let stopping_all = self.stopping;
        let running = &mut self.services[service];
        let Some(worker) = running.worker(slot, pid) else {
            return;
        };
        let lived = now.saturating_duration_since(worker.since);
        let (stopping, generation, role, probed) = (
            worker.stopping,
            worker.generation,
            worker.role.clone(),
            worker.probe.is_some(),
        );
        let name = running.spec.name.clone();
        running.slots.remove(&slot);
        if probed {
            self.push(Action::Unprobe { service, slot });
        }
        match role {
            Role::Staged => {
                self.release(service, slot);
                if !stopping && !stopping_all {
                    let reason = format!(
                        "the worker in slot {slot} (pid {pid}) ended ({exit}) {} ms after it started",
                        lived.as_millis()
                    );
                    self.rollback(service, &reason);
                }
            }
            Role::Retiring(_) => {
                info!(service = %name, slot, pid, generation, %exit, "old worker exited; its slot is free");
                self.release(service, slot);
            }
            Role::Current => {
                let running = &mut self.services[service];
                running.members.remove(&slot);
                running.drained.remove(&slot);
                if stopping || stopping_all {
                    info!(service = %name, slot, pid, %exit, "worker stopped");
                } else {
                    warn!(
                        service = %name,
                        slot,
                        pid,
                        %exit,
                        lived_ms = lived.as_millis() as u64,
                        "worker died; its entries go to their heirs"
                    );
                }
                self.table(service, TableOp::Remove(slot));
                if !stopping && !stopping_all {
                    self.slot_died(service, slot, Some(lived));
                }
            }
        }
        self.finish_removal(service);
    }

    /// Frees `slot` for good; its crash history goes with it.
    pub(super) fn release(&mut self, service: ServiceId, slot: Slot) {
        let running = &mut self.services[service];
        running.crashes.remove(&slot);
        running.members.remove(&slot);
        running.drained.remove(&slot);
        self.table(service, TableOp::Release(slot));
    }

    /// Records a crash of `slot` (whose worker lived `lived`; `None` if it was found dead
    /// at adoption) and schedules its restart, doubling the delay with each crash in a row
    /// up to its cap, or gives up on a crash loop. A slot found dead at adoption restarts
    /// at once, unless it was already crashing.
    pub(super) fn slot_died(&mut self, service: ServiceId, slot: Slot, lived: Option<Duration>) {
        let running = &mut self.services[service];
        let policy = running.spec.restart;
        let crashes = running.crashes.entry(slot).or_default();
        if lived.is_some_and(|lived| lived >= policy.window) {
            crashes.in_a_row = 0;
        }
        crashes.in_a_row += 1;
        if crashes.in_a_row > policy.limit {
            error!(
                service = %running.spec.name,
                slot,
                crashes = crashes.in_a_row,
                "worker crashed {} times in a row, each within {}; not restarting this slot (its entries stay with their heirs): fix the worker and restart portshard",
                crashes.in_a_row,
                humantime::format_duration(policy.window)
            );
            running.slots.insert(slot, SlotRun::GaveUp);
            return;
        }
        let delay = backoff(policy.delay, policy.delay_max, crashes.in_a_row);
        let delay = if lived.is_none() && crashes.in_a_row == 1 {
            Duration::ZERO
        } else {
            delay
        };
        running.slots.insert(slot, SlotRun::Waiting);
        self.after(delay, Timer::RestartDue { service, slot });
    }

    /// A restart delay is over: start the slot's replacement worker.
    pub(super) fn restart(&mut self, service: ServiceId, slot: Slot) {
        if self.stopping {
            return;
        }
        let running = &mut self.services[service];
        // The slot may have been freed (its generation replaced) and taken again since.
        if !matches!(running.slots.get(&slot), Some(SlotRun::Waiting)) {
            return;
        }
        running.crashes.entry(slot).or_default().restarts += 1;
        self.spawn(service, slot, false);
    }

    /// A probe of worker `pid` ended: records it, and kills a worker that failed as many
    /// counted probes in a row as allowed (its entries go to their heirs; it is
    /// restarted). A staged worker that never answers rolls its reload back.
    pub(super) fn probed(&mut self, service: ServiceId, slot: Slot, pid: u32, outcome: Outcome) {
        let running = &mut self.services[service];
        let name = running.spec.name.clone();
        let Some(worker) = running.worker_mut(slot, pid) else {
            return;
        };
        let Some(tracker) = worker.probe.as_mut() else {
            return;
        };
        let was_failing = tracker.health().failures > 0;
        let verdict = tracker.record(outcome);
        let health = tracker.health();
        let staged = worker.role == Role::Staged;
        let hung = matches!(verdict, Verdict::Hung(_));
        if hung {
            worker.probe = None;
        }
        running.probe_outcomes.entry(slot).or_default().add(outcome);
        self.table(service, TableOp::SetHealth { slot, health });
        if hung {
            self.push(Action::Unprobe { service, slot });
        }
        if let (Verdict::Hung(failures), true) = (verdict, staged) {
            let reason = format!(
                "the worker in slot {slot} (pid {pid}) answered none of its first {failures} readiness probes"
            );
            return self.rollback(service, &reason);
        }
        if let Outcome::Excused(excuse) = outcome {
            debug!(service = %name, slot, pid, excuse = excuse.as_str(), "probe unanswered but not counted");
            return;
        }
        match verdict {
            Verdict::Passing if was_failing => {
                info!(service = %name, slot, pid, "worker answers its probe again");
            }
            Verdict::Passing => {}
            Verdict::Failing(failures) => {
                warn!(service = %name, slot, pid, failures, "worker did not answer its probe");
            }
            Verdict::Hung(failures) => {
                warn!(
                    service = %name,
                    slot,
                    pid,
                    failures,
                    "worker is hung (alive, but answered none of its last {failures} probes): killing it, so its entries go to their heirs, and restarting it"
                );
                self.signal(service, slot, pid, Signal::Kill);
            }
        }
    }

    /// Sends SIGTERM to `slot`'s worker, and SIGKILL after the stop timeout.
    pub(super) fn stop_worker(&mut self, service: ServiceId, slot: Slot, why: &str) {
        let running = &mut self.services[service];
        let timeout = running.spec.stop_timeout;
        let name = running.spec.name.clone();
        let Some(SlotRun::Serving(worker)) = running.slots.get_mut(&slot) else {
            return;
        };
        if std::mem::replace(&mut worker.stopping, true) {
            return;
        }
        let (pid, probed) = (worker.pid, worker.probe.take().is_some());
        info!(service = %name, slot, pid, generation = worker.generation, why, "stopping a worker");
        if probed {
            self.push(Action::Unprobe { service, slot });
        }
        self.signal(service, slot, pid, Signal::Term);
        self.after(timeout, Timer::StopOverdue { service, slot, pid });
    }

    /// A worker sent SIGTERM had its stop timeout: SIGKILL it if it still runs. During a
    /// stop, a worker that outlives even that by [`KILL_GRACE`] (stuck in the kernel) is
    /// given up on, so the stop ends.
    pub(super) fn stop_overdue(&mut self, service: ServiceId, slot: Slot, pid: u32) {
        let running = &self.services[service];
        if running.worker(slot, pid).is_some() {
            warn!(service = %running.spec.name, slot, pid, "worker ignored SIGTERM; sending SIGKILL");
            self.signal(service, slot, pid, Signal::Kill);
            if self.stopping {
                self.after(KILL_GRACE, Timer::KillOverdue { service, slot, pid });
            }
        }
    }

    /// A worker sent SIGKILL during a stop has still not ended: stop waiting for it.
    pub(super) fn kill_overdue(&mut self, now: Instant, service: ServiceId, slot: Slot, pid: u32) {
        let running = &self.services[service];
        if self.stopping && running.worker(slot, pid).is_some() {
            error!(service = %running.spec.name, slot, pid, "worker survived SIGKILL (stuck in the kernel?); no longer waiting for it");
            self.exited(now, service, slot, pid, Exit::Unknown);
        }
    }

    /// SIGTERM or SIGINT: every worker is asked to stop (and killed after its stop
    /// timeout); nothing is restarted any more. [`Supervisor::is_stopped`] tells when all
    /// have ended.
    pub(super) fn stop(&mut self) {
        self.stopping = true;
        for service in 0..self.services.len() {
            self.rollback(service, "portshard is stopping");
        }
        for service in 0..self.services.len() {
            let slots: Vec<Slot> = self.services[service].slots.keys().copied().collect();
            for slot in slots {
                self.stop_worker(service, slot, "portshard is stopping");
            }
        }
    }

    /// Crash history of `slot`, for adoption.
    pub(super) fn set_crashes(&mut self, service: ServiceId, slot: Slot, crashes: Crashes) {
        self.services[service].crashes.insert(slot, crashes);
    }
}

/// The restart delay after `in_a_row` crashes in a row (at least 1): `delay` doubled
/// for each crash after the first, capped at `max`.
pub(super) fn backoff(delay: Duration, max: Duration, in_a_row: u32) -> Duration {
    let doublings = in_a_row.saturating_sub(1).min(MAX_DOUBLINGS);
    delay.saturating_mul(1 << doublings).min(max)
}
