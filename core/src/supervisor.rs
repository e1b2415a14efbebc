//! The supervisor's decisions as a state machine with no I/O, in the spirit of
//! `quinn-proto`: the daemon turns what happens (a worker exited, a timer fired, a probe
//! ended, a control request, SIGHUP) into [`Event`]s, feeds them to
//! [`Supervisor::handle`], and carries out the [`Action`]s it then takes from
//! [`Supervisor::poll_action`] (spawn a worker, send a signal, change the table, set a
//! timer, reply). Results the machine waits for (a spawned worker's pid, a table change's
//! outcome) come back as events. Time is passed in, so every transition is unit-tested
//! without root, processes or a kernel.
//!
//! What it decides: restarts with doubling backoff and a crash-loop limit; healing a dead
//! slot (its entries go to their heirs); killing a hung worker; generations (stage a
//! reload's workers, wait until ready, switch, retire the old ones once idle, roll back a
//! failed reload); what adoption after a daemon restart keeps; SIGHUP diffs; drains and
//! weights asked for on the control socket; the stop.
mod adopt;
mod control;
mod reload;
mod remove;
mod slots;

mod io;

pub use adopt::{AdoptedSlot, Adoption};
pub use control::ControlError;
pub use io::{Action, Activity, Command, Event, Exit, Signal, Spawn, Switches, TableOp, Timer};
pub use slots::KILL_GRACE;

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::{Duration, Instant},
};

use portshard_common::MAX_SLOTS;

use crate::{
    config::Service,
    control::Reply,
    probe::{OutcomeCounts, Tracker},
    table::Slot,
};

/// A service, by its position in the order services were added.
pub type ServiceId = usize;

/// Names a request whose replies the daemon routes back to its asker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReplyTo(pub u64);

/// How often retiring workers are looked at ([`Event::Tick`]).
pub const TICK: Duration = Duration::from_millis(250);

/// What a worker is there for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Role {
    /// Takes new work in the current generation; restarted when it dies.
    Current,
    /// Of a reload's new generation, not switched to yet: its exit rolls the reload back.
    Staged,
    /// Of an old generation, or beyond the configured count: keeps what it has, takes no
    /// new work, stopped once idle; its slot is freed when it exits.
    Retiring(Drain),
}

/// A retiring worker's activity, as last seen.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Drain {
    since: Instant,
    idle_since: Instant,
    /// What [`Activity::Delivered`] said last time.
    delivered: Option<u64>,
}

impl Drain {
    fn new(now: Instant) -> Self {
        Self {
            since: now,
            idle_since: now,
            delivered: None,
        }
    }
}

/// One worker process serving a slot.
#[derive(Clone, Debug)]
struct Worker {
    pid: u32,
    since: Instant,
    generation: u32,
    role: Role,
    /// Asked to stop by the supervisor, so its exit is no crash.
    stopping: bool,
    /// Its probe verdicts, if probed.
    probe: Option<Tracker>,
}

/// What a slot of a service is doing.
#[derive(Clone, Debug)]
enum SlotRun {
    /// An [`Action::Spawn`] is under way.
    Spawning { staged: bool },
    /// A worker serves it.
    Serving(Worker),
    /// Its worker died; a restart is scheduled.
    Waiting,
    /// Its worker crashed too often in a row; it is no longer restarted.
    GaveUp,
}

impl SlotRun {
    /// Whether the slot counts towards the current generation.
    fn is_current(&self) -> bool {
        match self {
            Self::Serving(worker) => worker.role == Role::Current,
            Self::Spawning { staged } => !staged,
            Self::Waiting | Self::GaveUp => true,
        }
    }
}

/// A slot's crash history, kept across its workers.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
struct Crashes {
    /// Crashes in a row, each after less than the restart window.
    in_a_row: u32,
    /// Restarts so far.
    restarts: u32,
}

/// One supervised service.
struct Running<L> {
    spec: Service,
    launch: L,
    slots: BTreeMap<Slot, SlotRun>,
    crashes: BTreeMap<Slot, Crashes>,
    /// The table's members and their weights, as the supervisor's changes left them.
    members: BTreeMap<Slot, u32>,
    /// Current slots taken out of new work by `drain`.
    drained: BTreeSet<Slot>,
    /// The generation that takes new work.
    generation: u32,
    /// The reload under way, if any.
    reload: Option<reload::Reload<L>>,
    /// Reloads attempted so far, to tell one attempt's timers from the next one's.
    attempts: u64,
    /// Each probed slot's outcomes so far, across its workers.
    probe_outcomes: BTreeMap<Slot, OutcomeCounts>,
    /// Taken out of the config: its workers retire and nothing restarts.
    removing: bool,
    /// Removed: its last worker ended and its pins were handed over for removal.
    removed: bool,
}

impl<L> Running<L> {
    /// The lowest slot no worker of any generation uses.
    fn free_slot(&self) -> Option<Slot> {
        (0..MAX_SLOTS as Slot).find(|slot| !self.slots.contains_key(slot))
    }

    fn worker(&self, slot: Slot, pid: u32) -> Option<&Worker> {
        match self.slots.get(&slot) {
            Some(SlotRun::Serving(worker)) if worker.pid == pid => Some(worker),
            _ => None,
        }
    }

    fn worker_mut(&mut self, slot: Slot, pid: u32) -> Option<&mut Worker> {
        match self.slots.get_mut(&slot) {
            Some(SlotRun::Serving(worker)) if worker.pid == pid => Some(worker),
            _ => None,
        }
    }
}

/// What becomes of a table change's outcome.
enum Pending {
    /// A drain or weight request: reply with what moved (`{moved}` in `done`), or undo.
    Reply {
        to: ReplyTo,
        done: String,
        undo: control::Undo,
    },
    /// A reload's switch: finish it, or roll it back.
    Switch { service: ServiceId },
    /// A change no one waits on whose outcome is still worth a line in the log, saying
    /// `what` it did and how many entries moved, or why it was refused.
    Log { service: ServiceId, what: String },
}

/// The supervisor of every service, with the launch data `L` the daemon needs to start a
/// worker (tests use `()`).
pub struct Supervisor<L> {
    services: Vec<Running<L>>,
    actions: VecDeque<Action<L>>,
    pending: BTreeMap<u64, Pending>,
    tickets: u64,
    stopping: bool,
}

impl<L> Default for Supervisor<L> {
    fn default() -> Self {
        Self {
            services: Vec::new(),
            actions: VecDeque::new(),
            pending: BTreeMap::new(),
            tickets: 0,
            stopping: false,
        }
    }
}

/// How many of `running`'s current workers run and answer their probes (if probed).
fn serving<L>(running: &Running<L>) -> usize {
    running
        .slots
        .values()
        .filter(|run| match run {
            SlotRun::Serving(worker) => {
                worker.role == Role::Current
                    && !worker.stopping
                    && worker.probe.as_ref().is_none_or(Tracker::is_passing)
            }
            _ => false,
        })
        .count()
}

impl<L: Clone> Supervisor<L> {
    /// A supervisor of no service yet; services join with [`Event::Added`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles one event at `now`; the actions it takes are then in [`Self::poll_action`].
    pub fn handle(&mut self, now: Instant, event: Event<L>) {
        match event {
            Event::Added {
                spec,
                launch,
                adoption,
            } => self.added(now, *spec, launch, adoption),
            Event::Exited {
                service,
                slot,
                pid,
                exit,
            } => self.exited(now, service, slot, pid, exit),
            Event::Spawned { service, slot, pid } => self.spawned(now, service, slot, pid),
            Event::SpawnFailed {
                service,
                slot,
                error,
            } => self.spawn_failed(service, slot, &error),
            Event::Timer(Timer::RestartDue { service, slot }) => self.restart(service, slot),
            Event::Timer(Timer::ReloadReady { service, attempt }) => {
                self.reload_ready(now, service, attempt)
            }
            Event::Timer(Timer::StopOverdue { service, slot, pid }) => {
                self.stop_overdue(service, slot, pid)
            }
            Event::Timer(Timer::KillOverdue { service, slot, pid }) => {
                self.kill_overdue(now, service, slot, pid)
            }
            Event::Tick { activity } => self.tick(now, activity),
            Event::Probed {
                service,
                slot,
                pid,
                outcome,
            } => self.probed(service, slot, pid, outcome),
            Event::Control { command, reply } => self.control(now, command, reply),
            Event::TableDone { ticket, result } => self.table_done(now, ticket, result),
            Event::Hangup { services, named } => self.hangup(now, services, &named),
            Event::Stop => self.stop(),
        }
    }

    /// The next action to carry out, in order.
    pub fn poll_action(&mut self) -> Option<Action<L>> {
        self.actions.pop_front()
    }

    /// Whether a stop was asked for and every worker has ended.
    pub fn is_stopped(&self) -> bool {
        self.stopping
            && self.services.iter().all(|running| {
                running
                    .slots
                    .values()
                    .all(|run| !matches!(run, SlotRun::Serving(_) | SlotRun::Spawning { .. }))
            })
    }

    /// Whether a reload or a removal of any service is under way, or the stop: an upgrade
    /// waits (the next image would not know what to finish).
    pub fn is_busy(&self) -> bool {
        self.stopping
            || self
                .services
                .iter()
                .any(|running| running.reload.is_some() || (running.removing && !running.removed))
    }

    /// The service named `name`, if supervised (and not being removed).
    pub fn find(&self, name: &str) -> Option<ServiceId> {
        self.services
            .iter()
            .position(|s| s.spec.name == name && !s.removing)
    }

    /// The settings service `service` runs with, and how its workers are launched.
    pub fn spec(&self, service: ServiceId) -> Option<(&Service, &L)> {
        self.services.get(service).map(|s| (&s.spec, &s.launch))
    }

    /// The retiring workers still running, as `(service, slot, pid)`, for [`Event::Tick`].
    pub fn retiring(&self) -> Vec<(ServiceId, Slot, u32)> {
        self.workers()
            .filter(|(_, _, worker)| matches!(worker.role, Role::Retiring(_)) && !worker.stopping)
            .map(|(service, slot, worker)| (service, slot, worker.pid))
            .collect()
    }

    /// A reload's new workers, as `(slot, pid)`: the daemon checks whether any has exited
    /// (its exit event may still be on its way) before it feeds a
    /// [`Timer::ReloadReady`].
    pub fn staged(&self, service: ServiceId) -> Vec<(Slot, u32)> {
        self.workers()
            .filter(|(s, _, worker)| *s == service && worker.role == Role::Staged)
            .map(|(_, slot, worker)| (slot, worker.pid))
            .collect()
    }

    /// Every probed slot's probe outcomes so far, by service name and slot.
    pub fn probe_outcomes(&self) -> BTreeMap<(String, Slot), OutcomeCounts> {
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

    /// How many services are supervised (not counting removed ones).
    pub fn services(&self) -> usize {
        self.services.iter().filter(|s| !s.removing).count()
    }

    /// Whether every service serves as configured: no reload or stop under way, and each
    /// service's current generation has all its workers running, in the table, and
    /// answering their probes if probed, but for slots given up on as crash loops (waiting
    /// longer would change nothing; `STATUS=` counts them out). What `READY=1` waits for.
    pub fn is_ready(&self) -> bool {
        !self.stopping
            && self
                .services
                .iter()
                .filter(|running| !running.removing)
                .all(|running| {
                    let given_up = running
                        .slots
                        .values()
                        .filter(|run| matches!(run, SlotRun::GaveUp))
                        .count();
                    running.reload.is_none()
                        && serving(running) + given_up >= running.spec.workers as usize
                })
    }

    /// Workers serving (current, running, answering their probes if probed) and workers
    /// configured, over every service: for `STATUS=` lines.
    pub fn serving(&self) -> (usize, usize) {
        self.services
            .iter()
            .filter(|running| !running.removing)
            .fold((0, 0), |(serving_now, wanted), running| {
                (
                    serving_now + serving(running),
                    wanted + running.spec.workers as usize,
                )
            })
    }

    fn workers(&self) -> impl Iterator<Item = (ServiceId, Slot, &Worker)> {
        self.services
            .iter()
            .enumerate()
            .flat_map(|(index, running)| {
                running
                    .slots
                    .iter()
                    .filter_map(move |(&slot, run)| match run {
                        SlotRun::Serving(worker) => Some((index, slot, worker)),
                        _ => None,
                    })
            })
    }

    fn push(&mut self, action: Action<L>) {
        self.actions.push_back(action);
    }

    fn table(&mut self, service: ServiceId, op: TableOp) {
        self.push(Action::Table {
            service,
            op,
            ticket: None,
        });
    }

    /// A table change whose outcome decides what comes next (see [`Pending`]).
    fn table_awaited(&mut self, service: ServiceId, op: TableOp, pending: Pending) {
        self.tickets += 1;
        let ticket = self.tickets;
        self.pending.insert(ticket, pending);
        self.push(Action::Table {
            service,
            op,
            ticket: Some(ticket),
        });
    }

    fn after(&mut self, after: Duration, timer: Timer) {
        self.push(Action::Timer { after, timer });
    }

    fn signal(&mut self, service: ServiceId, slot: Slot, pid: u32, signal: Signal) {
        self.push(Action::Signal {
            service,
            slot,
            pid,
            signal,
        });
    }

    fn reply(&mut self, to: ReplyTo, reply: Reply) {
        self.push(Action::Reply { to, reply });
    }

    fn table_done(&mut self, now: Instant, ticket: u64, result: Result<u32, String>) {
        match self.pending.remove(&ticket) {
            Some(Pending::Reply { to, done, undo }) => {
                let reply = match result {
                    Ok(moved) => {
                        let message = done.replace("{moved}", &moved.to_string());
                        tracing::info!(moved, "{message}");
                        Reply::Done { message, moved }
                    }
                    Err(message) => {
                        self.undo(undo);
                        ControlError::Table { message }.reply()
                    }
                };
                self.reply(to, reply);
            }
            Some(Pending::Switch { service }) => self.switched(now, service, result),
            Some(Pending::Log { service, what }) => {
                let service = &self.services[service].spec.name;
                match result {
                    Ok(moved) => tracing::info!(%service, moved, "{what}: {moved} entries moved"),
                    Err(error) => tracing::error!(%service, %error, "{what}: refused"),
                }
            }
            None => {}
        }
    }

    /// The switches the program reads beside the table for `spec` (see
    /// [`portshard_common::TABLE_FLOWS`], [`portshard_common::TABLE_PROBES`], the listener
    /// indexes ([`portshard_common::listener_flags`]), the QUIC-LB bits
    /// ([`portshard_common::quic::quic_flags`]) and [`portshard_common::Table::flow_idle_s`]).
    pub fn table_switches(spec: &Service) -> Switches {
        let flows = if spec.flow_capacity() > 0 {
            portshard_common::TABLE_FLOWS
        } else {
            0
        };
        let probes = if spec.probe.is_some() {
            portshard_common::TABLE_PROBES
        } else {
            0
        };
        // Single-listener services leave the listener bits 0: their sockets are in `sockets`.
        let listeners = spec
            .listeners
            .iter()
            .zip(0..)
            .fold(0, |flags, (listener, index)| {
                flags | portshard_common::listener_flags(listener.kind(), index)
            });
        let quic = spec.quic.map_or(0, |quic| {
            portshard_common::quic::quic_flags(quic.config_id, quic.nonce_len, quic.encrypted)
        });
        Switches {
            flags: flows | probes | listeners | quic,
            flow_idle_s: u32::try_from(spec.flow_idle.as_secs().max(1)).unwrap_or(u32::MAX),
        }
    }
}

#[cfg(test)]
mod tests;
