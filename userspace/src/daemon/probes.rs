//! Health probes in the daemon: each probed worker has a task that probes it every
//! interval, on a thread of its own ([`ProbeThread`]), so neither the event loop's work
//! (table rebuilds, status snapshots, spawns) delays a probe nor does probing block the
//! event loop. Outcomes come back as [`Event::Probed`]; the event loop keeps the verdicts
//! and kills a worker found hung.
use std::{os::fd::AsFd as _, sync::Arc, thread};

use portshard_common::ProbeState;
use tokio::{runtime, sync::oneshot};
use tracing::{debug, error, info, warn};

use super::{Daemon, Event, Role, SlotRun};
use crate::{
    metrics::ProbeOutcomes,
    probe::{Excuse, Outcome, Tracker, Verdict},
    prober::Prober,
    process,
    table::Slot,
};

/// Into how many fractions of an interval the slots' first probes are spread.
const STAGGER: u32 = 8;

/// The thread the probes run on, with its own runtime; it ends when this is dropped.
pub(super) struct ProbeThread {
    handle: runtime::Handle,
    _stop: oneshot::Sender<()>,
}

impl ProbeThread {
    /// Starts the probe thread.
    pub(super) fn start() -> std::io::Result<Self> {
        let runtime = runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        thread::Builder::new()
            .name("portshard-probes".into())
            .spawn(move || {
                let _ = runtime.block_on(stopped);
            })?;
        Ok(Self {
            handle,
            _stop: stop,
        })
    }
}

/// A worker's health probe: the task that probes it and the verdict so far.
pub(super) struct Probing {
    tracker: Tracker,
    task: tokio::task::JoinHandle<()>,
}

impl Probing {
    /// Whether the worker's last counted probe was answered.
    pub(super) fn passing(&self) -> bool {
        self.tracker.health().state == ProbeState::Passing as u32
    }
}

impl Drop for Probing {
    /// The probe ends with the worker it checks.
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Daemon {
    /// Every probed slot's probe outcomes so far, for the metrics.
    pub(super) fn probe_outcomes(&self) -> ProbeOutcomes {
        self.services
            .iter()
            .flat_map(|running| {
                running
                    .probe_outcomes
                    .iter()
                    .map(|(&slot, &counts)| ((running.spec.name.clone(), slot), counts))
            })
            .collect()
    }

    /// Starts probing worker `pid` of `slot` every interval, binding the slot's probe port
    /// and steering it to the slot the first time. A `staged` worker is probed as the
    /// reload that started it says.
    pub(super) fn probe(
        &mut self,
        index: usize,
        slot: Slot,
        pid: u32,
        staged: bool,
    ) -> Option<Probing> {
        let running = &mut self.services[index];
        let spec = match (&running.reload, staged) {
            (Some(reload), true) => reload.spec.probe.clone(),
            _ => running.spec.probe.clone(),
        }?;
        let prober = match running.probers.get(&slot) {
            Some(prober) => Arc::clone(prober),
            None => {
                // The probe's sockets join the probe thread's reactor.
                let _runtime = self.probes.handle.enter();
                let bound = Prober::bind(&spec.kind, running.spec.listen)
                    .map_err(|e| e.to_string())
                    .and_then(|prober| {
                        running
                            .group
                            .set_probe(prober.source(), slot)
                            .map_err(|e| e.to_string())?;
                        Ok(Arc::new(prober))
                    });
                match bound {
                    Ok(prober) => {
                        running.probers.insert(slot, Arc::clone(&prober));
                        prober
                    }
                    Err(error) => {
                        error!(service = %running.spec.name, slot, %error, "cannot set up the health probe of this slot; its workers are not probed");
                        return None;
                    }
                }
            }
        };
        let tracker = Tracker::new(spec.failures);
        if let Err(error) = running.group.set_health(slot, tracker.health()) {
            warn!(service = %running.spec.name, slot, %error, "cannot record the probe state");
        }
        let events = self.events.clone();
        let name = running.spec.name.clone();
        // Slots start a fraction of an interval apart, so their probes do not all fall due
        // at once on the probe thread.
        let start = tokio::time::Instant::now()
            + spec.interval
            + spec.interval * (u32::from(slot) % STAGGER) / STAGGER;
        let task = self.probes.handle.spawn(async move {
            let mut ticks = tokio::time::interval_at(start, spec.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut previous_end = start;
            loop {
                // A probe that ran past its successor's tick delays it; only the time
                // beyond that says the prober was late.
                let due = ticks.tick().await.max(previous_end);
                let outcome = match prober.check(pid, due, &spec).await {
                    Ok(outcome) => outcome,
                    Err(error) => {
                        warn!(service = %name, slot, pid, %error, source = %prober.source(), "the probe itself failed; not counted against the worker");
                        Outcome::Excused(Excuse::ProbeError)
                    }
                };
                previous_end = tokio::time::Instant::now();
                let event = Event::Probed {
                    service: index,
                    slot,
                    pid,
                    outcome,
                };
                if events.send(event).is_err() {
                    return;
                }
            }
        });
        Some(Probing { tracker, task })
    }

    /// A probe of worker `pid` ended: records it, and kills a worker that failed as many
    /// counted probes in a row as allowed (its entries go to their heirs; it is restarted).
    pub(super) fn probed(&mut self, index: usize, slot: Slot, pid: u32, outcome: Outcome) {
        let running = &mut self.services[index];
        let Some(SlotRun::Serving(worker)) = running.slots.get_mut(&slot) else {
            return;
        };
        let Some(probing) = worker.probing.as_mut().filter(|_| worker.pid == pid) else {
            return;
        };
        running.probe_outcomes.entry(slot).or_default().add(outcome);
        let was_failing = probing.tracker.health().failures > 0;
        let verdict = probing.tracker.record(outcome);
        if let Err(error) = running.group.set_health(slot, probing.tracker.health()) {
            warn!(service = %running.spec.name, slot, %error, "cannot record the probe state");
        }
        if let (Verdict::Hung(failures), Role::Staged) = (verdict, &worker.role) {
            // A new generation's worker that never answers is not ready: the reload fails.
            let reason = format!(
                "the worker in slot {slot} (pid {pid}) answered none of its first {failures} readiness probes"
            );
            return self.rollback(index, &reason);
        }
        let name = &running.spec.name;
        if let Outcome::Excused(excuse) = outcome {
            debug!(
                service = %name,
                slot,
                pid,
                excuse = excuse.as_str(),
                "probe unanswered but not counted"
            );
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
                worker.probing = None;
                if let Err(error) = process::signal(worker.pidfd.as_fd(), libc::SIGKILL) {
                    error!(service = %name, slot, pid, %error, "cannot kill the hung worker");
                }
            }
        }
    }
}
