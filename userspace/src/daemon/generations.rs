//! Generations: a reload starts the service's next generation in free slots, "staged" (in
//! the socket array, owning no table entry), waits until every new worker has stayed up
//! for `ready_delay`, and only then switches: each table member of the old generation is
//! replaced by a new slot one for one, and the shares are made exact, as one table change
//! ([`Group::switch`]), so each flow moves at most once and, with the flow table on, no
//! live UDP flow moves at all. A new worker that exits before the switch, or a switch the
//! kernel refuses, rolls the reload back: the new generation is stopped and its slots
//! freed, the old one never stopped serving.
//!
//! With a health probe configured, each new worker must also have answered one: its probe
//! port is steered to its slot before the slot owns any entry.
//!
//! The old generation's workers then retire: they keep their established connections and
//! (with the flow table) their UDP flows, take no new ones, and are sent SIGTERM once idle
//! for `drain_idle` (no datagram delivered to them, or no established connection) or after
//! `drain_timeout`; each slot is freed when its worker exits.
use std::{
    os::fd::AsFd as _,
    path::Path,
    time::{Duration, Instant},
};

use portshard_common::{Counters, MAX_SLOTS};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::{Daemon, DaemonError, Drain, Event, Launch, Role, SlotRun, service_record};
use crate::{
    config::{Config, Service},
    control::Reply,
    process,
    socket::Proto,
    table::Slot,
};

/// How often retiring workers are looked at.
pub(super) const TICK: Duration = Duration::from_millis(250);

/// A reload under way: the generation being started and who asked for it.
pub(super) struct Reload {
    /// Which attempt this is (see [`Event::ReloadReady`]).
    attempt: u64,
    pub(super) generation: u32,
    pub(super) spec: Service,
    pub(super) launch: Launch,
    staged: Vec<Slot>,
    reply: Option<mpsc::UnboundedSender<Reply>>,
    started: Instant,
    /// Whether the requester was told the switch waits for readiness probes.
    told_probing: bool,
}

impl Reload {
    /// Tells the requester (and the log) how the reload goes.
    fn progress(&self, message: String) {
        info!(service = %self.spec.name, generation = self.generation, "{message}");
        if let Some(reply) = &self.reply {
            let _ = reply.send(Reply::Progress { message });
        }
    }

    /// Gives the requester the reload's outcome.
    fn finish(self, outcome: Reply) {
        if let Some(reply) = self.reply {
            let _ = reply.send(outcome);
        }
    }
}

/// Reads and checks the config file at `path`.
pub fn read_config(path: &Path) -> Result<Config, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading config {}: {e}", path.display()))?;
    Config::parse(&text, path).map_err(|e| e.to_string())
}

/// Refuses a change of what the service's pins record (address, protocol, mode, flow
/// table), which no running service can take.
fn same_pins(running: &Service, wanted: &Service) -> Result<(), String> {
    let (pinned, wanted) = (service_record(running), service_record(wanted));
    if pinned == wanted {
        return Ok(());
    }
    Err(format!(
        "service {}: the address, protocol, mode and flow table of a running service cannot change (from {} to {}): stop portshard, remove the service's pins and start it again",
        running.name,
        super::describe(&pinned),
        super::describe(&wanted)
    ))
}

/// Datagrams, connections and flows the program sent to `slot`: what a retiring UDP
/// worker is still given.
fn delivered(counters: &Counters, slot: Slot) -> u64 {
    counters.slots.get(usize::from(slot)).map_or(0, |c| {
        c.selected + c.failed_over + c.probed + c.migrated + c.flow_hits
    })
}

impl Daemon {
    /// `portshard reload SERVICE`: a new generation with the service's configuration as the
    /// config file now says (the built-in default's stays as it is).
    pub(super) fn reload_request(
        &mut self,
        service: &str,
        reply: mpsc::UnboundedSender<Reply>,
    ) -> Result<(), String> {
        let index = self.index_of(service)?;
        let (spec, launch) = match &self.config {
            Some(path) => {
                let config = read_config(path)?;
                let spec = config
                    .services
                    .into_iter()
                    .find(|s| s.name == service)
                    .ok_or_else(|| {
                        format!(
                            "service {service} is no longer in {}: put it back, or restart portshard to drop it",
                            path.display()
                        )
                    })?;
                let launch = Launch::of(&spec).map_err(|e| format!("service {service}: {e}"))?;
                (spec, launch)
            }
            None => {
                let running = &self.services[index];
                (running.spec.clone(), running.launch.clone())
            }
        };
        self.reload(index, spec, launch, Some(reply))
    }

    /// The index of the service named `service`.
    pub(super) fn index_of(&self, service: &str) -> Result<usize, String> {
        self.services
            .iter()
            .position(|s| s.spec.name == service)
            .ok_or_else(|| {
                let names: Vec<&str> = self.services.iter().map(|s| s.spec.name.as_str()).collect();
                format!(
                    "no service {service:?}: this daemon serves {}",
                    names.join(", ")
                )
            })
    }

    /// Starts generation `current + 1` of service `index` with `spec`; the outcome goes to
    /// `reply` (and the log) when the switch is done or rolled back. Refused at once, with
    /// nothing started, if a reload is under way, if `spec` changes what the pins record
    /// (address, protocol, mode, flow table), or if there are not enough free slots.
    fn reload(
        &mut self,
        index: usize,
        spec: Service,
        launch: Launch,
        reply: Option<mpsc::UnboundedSender<Reply>>,
    ) -> Result<(), String> {
        let running = &mut self.services[index];
        let name = running.spec.name.clone();
        if let Some(reload) = &running.reload {
            return Err(format!(
                "service {name}: generation {} is already being started; wait until it is switched to or rolled back",
                reload.generation
            ));
        }
        same_pins(&running.spec, &spec)?;
        let free: Vec<Slot> = (0..MAX_SLOTS as Slot)
            .filter(|slot| !running.slots.contains_key(slot))
            .take(spec.workers as usize)
            .collect();
        if free.len() < spec.workers as usize {
            return Err(format!(
                "service {name}: generation {} needs {} slots but only {} of {MAX_SLOTS} are free; wait for the old generation to drain",
                running.generation + 1,
                spec.workers,
                free.len()
            ));
        }
        let generation = running.generation + 1;
        let ready_delay = spec.ready_delay;
        running.attempts += 1;
        let attempt = running.attempts;
        running.reload = Some(Reload {
            attempt,
            generation,
            spec,
            launch,
            staged: Vec::new(),
            reply,
            started: Instant::now(),
            told_probing: false,
        });
        for slot in free {
            if let Err(error) = self.launch(index, slot, Role::Staged) {
                self.rollback(
                    index,
                    &format!("starting the worker for slot {slot}: {error}"),
                );
                return Ok(());
            }
            if let Some(reload) = &mut self.services[index].reload {
                reload.staged.push(slot);
            }
        }
        let running = &self.services[index];
        if let Some(reload) = &running.reload {
            let pids: Vec<String> = reload
                .staged
                .iter()
                .filter_map(|slot| match running.slots.get(slot) {
                    Some(SlotRun::Serving(worker)) => Some(format!("{slot}:{}", worker.pid)),
                    _ => None,
                })
                .collect();
            reload.progress(format!(
                "generation {generation} started {} workers (slot:pid {}); switching to them once they have stayed up for {}",
                pids.len(),
                pids.join(" "),
                humantime::format_duration(ready_delay)
            ));
        }
        self.after(
            ready_delay,
            Event::ReloadReady {
                service: index,
                attempt,
            },
        );
        Ok(())
    }

    /// A reload's new workers stayed up for the ready delay: switch to them, unless one of
    /// them ended meanwhile (its exit event may still be on its way).
    pub(super) fn reload_ready(&mut self, index: usize, attempt: u64) {
        let running = &self.services[index];
        let Some(reload) = running.reload.as_ref().filter(|r| r.attempt == attempt) else {
            return;
        };
        let gone = reload
            .staged
            .iter()
            .find_map(|slot| match running.slots.get(slot) {
                Some(SlotRun::Serving(worker)) if process::has_exited(worker.pidfd.as_fd()) => {
                    Some((*slot, worker.pid))
                }
                Some(SlotRun::Serving(_)) => None,
                _ => Some((*slot, 0)),
            });
        if let Some((slot, pid)) = gone {
            let reason =
                format!("the worker in slot {slot} (pid {pid}) exited before it was ready");
            return self.rollback(index, &reason);
        }
        // With a probe, each new worker must also have answered one (its probe port is
        // steered to its slot although the slot owns no entry yet).
        if let Some(probe) = &reload.spec.probe {
            let unready: Vec<Slot> = reload
                .staged
                .iter()
                .copied()
                .filter(|slot| {
                    !matches!(running.slots.get(slot), Some(SlotRun::Serving(worker))
                        if worker.probing.as_ref().is_some_and(|p| p.passing()))
                })
                .collect();
            if !unready.is_empty() {
                let patience =
                    reload.spec.ready_delay + probe.interval * (probe.failures + 1) + probe.timeout;
                if reload.started.elapsed() >= patience {
                    let reason = format!(
                        "the workers in slots {unready:?} answered no readiness probe within {}",
                        humantime::format_duration(patience)
                    );
                    return self.rollback(index, &reason);
                }
                let interval = probe.interval;
                if let Some(reload) = &mut self.services[index].reload
                    && !std::mem::replace(&mut reload.told_probing, true)
                {
                    reload.progress(format!(
                        "waiting for the workers in slots {unready:?} to answer their readiness probe"
                    ));
                }
                return self.after(
                    interval,
                    Event::ReloadReady {
                        service: index,
                        attempt,
                    },
                );
            }
        }
        self.switch(index);
    }

    /// Switches service `index` to its staged generation (see [`Group::switch`]); the old
    /// workers retire. A refused switch rolls the reload back.
    fn switch(&mut self, index: usize) {
        let running = &mut self.services[index];
        let Some(reload) = running.reload.take() else {
            return;
        };
        let old_members: Vec<Slot> = running.group.table().members().keys().copied().collect();
        let moved = match running
            .group
            .switch(&old_members, &reload.staged, reload.spec.weight)
        {
            Ok(delta) => delta.moved,
            Err(error) => {
                running.reload = Some(reload);
                return self.rollback(index, &format!("switching the table: {error}"));
            }
        };
        let old_generation = running.generation;
        let counters = running
            .group
            .dataplane()
            .counters()
            .unwrap_or(Counters::ZERO);
        let mut gone = Vec::new();
        let mut retiring = Vec::new();
        for (&slot, run) in &mut running.slots {
            match run {
                SlotRun::Serving(worker) => match worker.role {
                    Role::Current => {
                        worker.role = Role::Retiring(Drain::new(delivered(&counters, slot)));
                        retiring.push(slot);
                    }
                    Role::Staged => worker.role = Role::Current,
                    Role::Retiring(_) => {}
                },
                SlotRun::Waiting | SlotRun::GaveUp => gone.push(slot),
            }
        }
        for &slot in &gone {
            running.slots.remove(&slot);
        }
        running.generation = reload.generation;
        running.spec = reload.spec.clone();
        running.launch = reload.launch.clone();
        let (drain_idle, drain_timeout) = (running.spec.drain_idle, running.spec.drain_timeout);
        let name = running.spec.name.clone();
        for slot in gone {
            self.release(index, slot);
        }
        let message = format!(
            "service {name} generation {} takes new work in slots {:?}: {moved} table entries moved; generation {old_generation} (slots {retiring:?}) keeps its connections and flows and stops once idle for {} (at most {})",
            reload.generation,
            reload.staged,
            humantime::format_duration(drain_idle),
            humantime::format_duration(drain_timeout),
        );
        reload.progress(format!("switched to generation {}", reload.generation));
        reload.finish(Reply::Done { message, moved });
    }

    /// Abandons service `index`'s reload: its new workers are killed and their slots freed;
    /// the current generation never stopped serving and nothing moved.
    pub(super) fn rollback(&mut self, index: usize, reason: &str) {
        let running = &mut self.services[index];
        let Some(reload) = running.reload.take() else {
            return;
        };
        let staged: Vec<Slot> = running
            .slots
            .iter_mut()
            .filter_map(|(&slot, run)| match run {
                SlotRun::Serving(worker) if matches!(worker.role, Role::Staged) => {
                    worker.stopping = true;
                    let _ = process::signal(worker.pidfd.as_fd(), libc::SIGKILL);
                    Some(slot)
                }
                _ => None,
            })
            .collect();
        let current = running.generation;
        let name = running.spec.name.clone();
        for slot in staged {
            self.release(index, slot);
        }
        let message = format!(
            "service {name} generation {} rolled back: {reason}; generation {current} keeps serving and no flow moved",
            reload.generation
        );
        warn!(service = %name, generation = reload.generation, %reason, "reload rolled back");
        reload.finish(Reply::Error { message });
    }

    /// Takes `slot` of service `index` out of new work and lets its worker retire; a slot
    /// with no worker is freed.
    pub(super) fn retire(&mut self, index: usize, slot: Slot) -> Result<(), DaemonError> {
        let running = &mut self.services[index];
        if running.group.table().members().contains_key(&slot) {
            running.group.drain(slot)?;
        }
        let counters = running.group.dataplane().counters()?;
        match running.slots.get_mut(&slot) {
            Some(SlotRun::Serving(worker)) => {
                info!(service = %running.spec.name, slot, pid = worker.pid, "worker beyond the configured count retires");
                worker.role = Role::Retiring(Drain::new(delivered(&counters, slot)));
            }
            Some(_) => {
                running.slots.remove(&slot);
                self.release(index, slot);
            }
            None => {}
        }
        Ok(())
    }

    /// Stops the retiring workers that have been idle for `drain_idle`, or draining for
    /// `drain_timeout`.
    pub(super) fn tick(&mut self) {
        for index in 0..self.services.len() {
            let running = &mut self.services[index];
            let retiring = running.slots.values().any(|run| {
                matches!(run, SlotRun::Serving(w) if matches!(w.role, Role::Retiring(_)) && !w.stopping)
            });
            if !retiring {
                continue;
            }
            let counters = running.group.dataplane().counters().ok();
            let spec = &running.spec;
            let now = Instant::now();
            let mut done = Vec::new();
            for (&slot, run) in &mut running.slots {
                let SlotRun::Serving(worker) = run else {
                    continue;
                };
                let Role::Retiring(drain) = &mut worker.role else {
                    continue;
                };
                if worker.stopping {
                    continue;
                }
                let busy = match spec.proto {
                    Proto::Udp => counters.as_ref().is_none_or(|c| {
                        let now_delivered = delivered(c, slot);
                        std::mem::replace(&mut drain.delivered, now_delivered) != now_delivered
                    }),
                    Proto::Tcp => process::established_connections(worker.pid, spec.listen.port())
                        .map_or(true, |open| open > 0),
                };
                if busy {
                    drain.idle_since = now;
                }
                if now - drain.idle_since >= spec.drain_idle {
                    done.push((slot, "idle"));
                } else if now - drain.since >= spec.drain_timeout {
                    done.push((slot, "drain timeout"));
                }
            }
            for (slot, why) in done {
                self.stop_worker(index, slot, why);
            }
        }
    }

    /// Sends SIGTERM to `slot`'s worker, and SIGKILL after the stop timeout.
    fn stop_worker(&mut self, index: usize, slot: Slot, why: &str) {
        let running = &mut self.services[index];
        let Some(SlotRun::Serving(worker)) = running.slots.get_mut(&slot) else {
            return;
        };
        worker.stopping = true;
        info!(service = %running.spec.name, slot, pid = worker.pid, generation = worker.generation, why, "stopping an old worker");
        if let Err(error) = process::signal(worker.pidfd.as_fd(), libc::SIGTERM) {
            warn!(service = %running.spec.name, slot, pid = worker.pid, %error, "cannot send SIGTERM");
        }
        let (pid, timeout) = (worker.pid, running.spec.stop_timeout);
        self.after(
            timeout,
            Event::StopOverdue {
                service: index,
                slot,
                pid,
            },
        );
    }

    /// A worker sent SIGTERM had its stop timeout: SIGKILL it if it still runs.
    pub(super) fn stop_overdue(&mut self, index: usize, slot: Slot, pid: u32) {
        let running = &self.services[index];
        if let Some(SlotRun::Serving(worker)) = running.slots.get(&slot)
            && worker.pid == pid
        {
            warn!(service = %running.spec.name, slot, pid, "worker ignored SIGTERM; sending SIGKILL");
            let _ = process::signal(worker.pidfd.as_fd(), libc::SIGKILL);
        }
    }

    /// SIGHUP: reads the config file again and applies what changed, service by service: a
    /// new service starts, a changed `workers` count starts or retires workers, any other
    /// change starts a new generation. A file with errors changes nothing.
    pub(super) fn hangup(&mut self) {
        let Some(path) = self.config.clone() else {
            warn!("SIGHUP: the built-in default has no config file to read again");
            return;
        };
        let config = match read_config(&path) {
            Ok(config) => config,
            Err(error) => {
                error!(%error, "SIGHUP: the config was not applied; everything runs as before");
                return;
            }
        };
        info!(config = %path.display(), "SIGHUP: applying the config");
        for running in &self.services {
            if !config.services.iter().any(|s| s.name == running.spec.name) {
                warn!(service = %running.spec.name, "service is no longer in the config but keeps running: restart portshard to drop it");
            }
        }
        for spec in config.services {
            let name = spec.name.clone();
            if let Err(error) = self.apply(spec) {
                error!(service = %name, %error, "SIGHUP: not applied to this service");
            }
        }
    }

    /// Brings one service in line with `spec` (see [`Daemon::hangup`]): a new command
    /// takes a new generation; the rest applies to the running one.
    fn apply(&mut self, spec: Service) -> Result<(), String> {
        let launch = Launch::of(&spec).map_err(|e| e.to_string())?;
        let Ok(index) = self.index_of(&spec.name) else {
            return self.add_service(spec, launch).map_err(|e| e.to_string());
        };
        let running = &mut self.services[index];
        if running.spec == spec {
            return Ok(());
        }
        if running.spec.command != spec.command {
            return self.reload(index, spec, launch, None);
        }
        same_pins(&running.spec, &spec)?;
        info!(service = %spec.name, "applying the changed settings to the running generation");
        if spec.weight != running.spec.weight {
            let members: Vec<Slot> = running.group.table().members().keys().copied().collect();
            for slot in members {
                running
                    .group
                    .set_weight(slot, spec.weight)
                    .map_err(|e| e.to_string())?;
            }
        }
        running
            .group
            .dataplane()
            .set_flags(super::table_flags(&spec));
        running.spec = spec;
        running.launch = launch;
        self.resize(index).map_err(|e| e.to_string())
    }
}
