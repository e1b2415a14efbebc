//! What goes in and out of the [`Supervisor`](super::Supervisor): the events the daemon
//! feeds it and the actions it asks of the daemon.
use std::{collections::BTreeMap, fmt, time::Duration};

use portshard_common::ProbeHealth;

use super::{Adoption, ReplyTo, ServiceId};
use crate::{
    config::{Probe, Service},
    control::Reply,
    probe::Outcome,
    table::Slot,
};

/// How a worker ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// It was not the daemon's child (adopted after a daemon restart), so the kernel
    /// reports its end but not how.
    Unknown,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Code(code) => write!(f, "exit code {code}"),
            Self::Signal(signal) => write!(f, "signal {signal} ({})", signal_name(signal)),
            Self::Unknown => f.write_str("unknown status (adopted worker, not our child)"),
        }
    }
}

/// The names of the signals a worker usually dies of (numbers as on every Linux
/// architecture portshard builds for).
fn signal_name(signal: i32) -> &'static str {
    match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        6 => "SIGABRT",
        7 => "SIGBUS",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => "other",
    }
}

/// A signal the supervisor sends a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Asks it to stop.
    Term,
    /// Ends it.
    Kill,
}

/// A delay the daemon waits out, then feeds back as [`Event::Timer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    /// A dead slot's restart delay is over.
    RestartDue {
        /// The service.
        service: ServiceId,
        /// The slot.
        slot: Slot,
    },
    /// A reload's new generation has been up for its ready delay (or one more probe
    /// interval).
    ReloadReady {
        /// The service.
        service: ServiceId,
        /// Which attempt, so an old attempt's timer does nothing.
        attempt: u64,
    },
    /// A worker killed during a stop has had [`KILL_GRACE`](super::KILL_GRACE) to end.
    KillOverdue {
        /// The service.
        service: ServiceId,
        /// The slot.
        slot: Slot,
        /// The worker.
        pid: u32,
    },
    /// A worker asked to stop has had its stop timeout.
    StopOverdue {
        /// The service.
        service: ServiceId,
        /// The slot.
        slot: Slot,
        /// The worker.
        pid: u32,
    },
}

/// The words the program reads beside the table: what it does for a service, changed by
/// one store each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switches {
    /// [`portshard_common::TABLE_FLOWS`] and [`portshard_common::TABLE_PROBES`].
    pub flags: u32,
    /// Seconds after which an idle UDP flow is forgotten (`flow_idle`).
    pub flow_idle_s: u32,
}

/// A change of a service's group (sockets, table, records) for the daemon to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableOp {
    /// A slot's worker died: its entries go to their heirs, which the kernel already does.
    Remove(Slot),
    /// A slot is freed for good (its worker retired or was never switched to).
    Release(Slot),
    /// A slot takes no new work; its worker keeps what it has.
    Drain(Slot),
    /// A drained slot takes new work again with `weight`.
    Admit {
        /// The slot.
        slot: Slot,
        /// Its weight.
        weight: u32,
    },
    /// The named members take these weights, as one rebalance (see
    /// [`Table::set_weights`](crate::table::Table::set_weights)): one member's for a weight
    /// request, every member's for a SIGHUP.
    SetWeights(BTreeMap<Slot, u32>),
    /// After an adoption, every member gets its share if a change the previous daemon cut
    /// short left one with too few entries, such as a live slot seated but never given any
    /// (see [`Table::settle`](crate::table::Table::settle)); otherwise nothing moves.
    Settle,
    /// A reload's switch: the `new` slots take over all of `old`'s entries.
    Switch {
        /// The members of the old generation.
        old: Vec<Slot>,
        /// The staged slots of the new one.
        new: Vec<Slot>,
        /// The new generation's weight.
        weight: u32,
    },
    /// The switches the program reads beside the table, for the service's settings.
    SetSwitches(Switches),
    /// A slot's probe state, for `status`.
    SetHealth {
        /// The slot.
        slot: Slot,
        /// Its probe state.
        health: ProbeHealth,
    },
}

/// A worker to start in `slot`: a socket, the process, then the group (into the table, or
/// staged for a reload).
#[derive(Clone, Debug, PartialEq)]
pub struct Spawn<L> {
    /// The service.
    pub service: ServiceId,
    /// The slot.
    pub slot: Slot,
    /// The service's settings for this worker.
    pub spec: Box<Service>,
    /// How to run it (the resolved program and identity).
    pub launch: L,
    /// Its generation.
    pub generation: u32,
    /// Restarts of this slot so far, for its record.
    pub restarts: u32,
    /// Whether it is a reload's new worker (staged, owning no entry yet).
    pub staged: bool,
}

/// What the daemon should do. Carried out in the order taken.
#[derive(Clone, Debug, PartialEq)]
pub enum Action<L> {
    /// Start a worker (see [`Spawn`]). Answer with [`Event::Spawned`] or
    /// [`Event::SpawnFailed`].
    Spawn(Spawn<L>),
    /// Send `signal` to worker `pid` of `slot`.
    Signal {
        /// The service.
        service: ServiceId,
        /// The slot.
        slot: Slot,
        /// The worker.
        pid: u32,
        /// Which signal.
        signal: Signal,
    },
    /// Change the group. With a `ticket`, answer with [`Event::TableDone`].
    Table {
        /// The service.
        service: ServiceId,
        /// The change.
        op: TableOp,
        /// Whether (and under which ticket) the outcome is awaited.
        ticket: Option<u64>,
    },
    /// Feed `timer` back after `after`.
    Timer {
        /// How long to wait.
        after: Duration,
        /// What to feed back.
        timer: Timer,
    },
    /// Probe worker `pid` of `slot` every interval, reporting with [`Event::Probed`].
    Probe {
        /// The service.
        service: ServiceId,
        /// The slot.
        slot: Slot,
        /// The worker.
        pid: u32,
        /// How.
        probe: Probe,
    },
    /// Stop probing `slot` (its worker ended or is being stopped).
    Unprobe {
        /// The service.
        service: ServiceId,
        /// The slot.
        slot: Slot,
    },
    /// Create (or adopt) a service's group, then feed [`Event::Added`].
    AddService {
        /// The service.
        spec: Box<Service>,
        /// How to run its workers.
        launch: L,
    },
    /// Remove the pins of a service taken out of the config, whose workers have all
    /// ended, and forget its group.
    RemoveService {
        /// The service.
        service: ServiceId,
    },
    /// Send `reply` to the asker `to`.
    Reply {
        /// The asker.
        to: ReplyTo,
        /// The reply; the request is over when [`Reply::is_final`].
        reply: Reply,
    },
}

/// A control request the supervisor decides on (the daemon answers `ping` itself, and
/// reads the config file for a reload).
#[derive(Clone, Debug, PartialEq)]
pub enum Command<L> {
    /// Take `slot` out of new work.
    Drain {
        /// The service.
        service: String,
        /// The slot.
        slot: Slot,
    },
    /// Set `slot`'s weight (a drained slot takes new work again).
    Weight {
        /// The service.
        service: String,
        /// The slot.
        slot: Slot,
        /// The weight.
        weight: u32,
    },
    /// Start a new generation with `spec` and switch to it once ready.
    Reload {
        /// The service's settings as the config now says.
        spec: Box<Service>,
        /// How to run its workers.
        launch: L,
    },
}

/// Something that happened, for [`Supervisor::handle`].
#[derive(Clone, Debug, PartialEq)]
pub enum Event<L> {
    /// A service's group was created, or adopted with what its pins record.
    Added {
        /// The service.
        spec: Box<Service>,
        /// How to run its workers.
        launch: L,
        /// What adoption found (empty for a new group).
        adoption: Adoption,
    },
    /// A worker ended.
    Exited {
        /// The service.
        service: ServiceId,
        /// The slot.
        slot: Slot,
        /// The worker.
        pid: u32,
        /// How.
        exit: Exit,
    },
    /// An [`Action::Spawn`] started worker `pid`.
    Spawned {
        /// The service.
        service: ServiceId,
        /// The slot.
        slot: Slot,
        /// The worker.
        pid: u32,
    },
    /// An [`Action::Spawn`] failed; nothing of it is left.
    SpawnFailed {
        /// The service.
        service: ServiceId,
        /// The slot.
        slot: Slot,
        /// Why.
        error: String,
    },
    /// A timer set with [`Action::Timer`] fired.
    Timer(Timer),
    /// Time to look at the retiring workers: how busy each of [`Supervisor::retiring`] is.
    Tick {
        /// Per retiring worker.
        activity: Vec<(ServiceId, Slot, Activity)>,
    },
    /// A probe of worker `pid` ended.
    Probed {
        /// The service.
        service: ServiceId,
        /// The slot.
        slot: Slot,
        /// The worker.
        pid: u32,
        /// How.
        outcome: Outcome,
    },
    /// A control request from `reply`.
    Control {
        /// The request.
        command: Command<L>,
        /// Where its replies go.
        reply: ReplyTo,
    },
    /// An [`Action::Table`] with a ticket was carried out: entries moved, or why not.
    TableDone {
        /// The ticket.
        ticket: u64,
        /// Entries whose owner changed, or the error.
        result: Result<u32, String>,
    },
    /// SIGHUP with the config file read again.
    Hangup {
        /// Each service whose program and account were found, with its launch.
        services: Vec<(Service, L)>,
        /// Every service the file names (some may have been left out of `services`).
        named: Vec<String>,
    },
    /// SIGTERM or SIGINT: stop every worker.
    Stop,
}

/// How busy a retiring worker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    /// Datagrams, connections and flows delivered to its slot so far (UDP).
    Delivered(u64),
    /// Its established connections (TCP).
    Connections(usize),
    /// Both, for a worker with UDP and TCP listeners: busy if either shows activity.
    Both {
        /// As [`Activity::Delivered`].
        delivered: u64,
        /// As [`Activity::Connections`].
        connections: usize,
    },
    /// Unknown (counted as busy).
    Unknown,
}
