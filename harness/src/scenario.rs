//! The measurements the kernel tests assert on and the demo prints: the same flows sent to
//! plain `SO_REUSEPORT` and to portshard while one listener closes and another joins, and
//! the fate of a closing TCP listener's queued connections.
use std::{
    fmt, io,
    io::Read as _,
    net::SocketAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use portshard::{
    bpffs::BpffsError,
    dataplane::{Dataplane, DataplaneError},
    group::{Group, GroupError, Holder},
    socket::Proto,
    table::Slot,
};
use portshard_common::{Counters, MAX_SLOTS, TableEntry};

use crate::{
    flows::{self, Flows, Landing, Listener},
    netns::{NetNs, raise_fd_limit},
};

/// A measurement could not be made (as opposed to measuring something wrong, which the
/// caller judges from the results).
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// Sockets or traffic failed (the message says which flow, listener or file).
    #[error(transparent)]
    Io(#[from] io::Error),
    /// portshard refused to set up or change the group.
    #[error(transparent)]
    Group(#[from] GroupError),
    /// The dataplane could not be read or removed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// The pin root could not be made.
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
    /// The traffic did not behave as the scenario needs.
    #[error("{0}")]
    Traffic(String),
}

type Result<T, E = MeasureError> = std::result::Result<T, E>;

/// Port every test service listens on (inside its private namespace).
pub const SERVICE_PORT: u16 = 5300;

/// A part of a whole, printed as both and as a fraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ratio {
    /// The part.
    pub part: usize,
    /// The whole.
    pub whole: usize,
}

impl Ratio {
    /// `part / whole`, 0 for an empty whole.
    pub fn value(self) -> f64 {
        if self.whole == 0 {
            0.0
        } else {
            self.part as f64 / self.whole as f64
        }
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} ({:.3})", self.part, self.whole, self.value())
    }
}

/// Of the flows that were not on `victim` in `before`, those that landed elsewhere in `after`.
pub fn survivor_moved(before: &Landing, after: &Landing, victim: usize) -> Ratio {
    let survivors: Vec<usize> = (0..before.len())
        .filter(|&f| before[f].is_some() && before[f] != Some(victim))
        .collect();
    Ratio {
        part: survivors.iter().filter(|&&f| after[f] != before[f]).count(),
        whole: survivors.len(),
    }
}

/// One listener of N closes, then a new one joins.
#[derive(Debug, Clone, Copy)]
pub struct CloseOne {
    /// Transport.
    pub proto: Proto,
    /// IPv6 loopback instead of IPv4.
    pub ipv6: bool,
    /// Listeners at the start (N).
    pub listeners: usize,
    /// Index of the one that closes.
    pub victim: usize,
    /// Number of flows.
    pub flows: usize,
}

impl CloseOne {
    /// The case with enough flows that the share of flows the new listener takes is within
    /// one percentage point of its table share with 4.5 standard deviations to spare:
    /// `202 500 * p * (1 - p)` flows for `p = 1 / N`, at least 4096.
    pub fn new(proto: Proto, ipv6: bool, listeners: usize, victim: usize) -> Self {
        let p = 1.0 / listeners as f64;
        let needed = (202_500.0 * p * (1.0 - p)).ceil() as usize;
        let flows = needed.max(4096).next_multiple_of(256);
        Self {
            proto,
            ipv6,
            listeners,
            victim,
            flows,
        }
    }

    /// The service address.
    pub fn target(&self) -> SocketAddr {
        flows::loopback(self.ipv6, SERVICE_PORT)
    }

    fn flows(&self) -> Flows {
        Flows::new(self.proto, self.target(), self.flows)
    }
}

/// Where the flows landed with plain `SO_REUSEPORT`.
#[derive(Debug)]
pub struct KernelRun {
    /// All N listeners open.
    pub before: Landing,
    /// After the victim closed.
    pub after_close: Landing,
    /// After a new listener joined the N - 1.
    pub after_add: Landing,
}

impl KernelRun {
    /// Measures `case` on a group with no program.
    pub fn measure(case: &CloseOne) -> Result<Self> {
        let flows = case.flows();
        let mut listeners = flows::bind_listeners(case.proto, case.target(), case.listeners)?;
        let before = flows.round(&listeners)?;
        listeners[case.victim] = None;
        let after_close = flows.round(&listeners)?;
        listeners.push(Some(Listener::bind(case.proto, case.target())?));
        let after_add = flows.round(&listeners)?;
        Ok(Self {
            before,
            after_close,
            after_add,
        })
    }
}

/// Where the flows landed with portshard, round by round, with what the table said and any
/// disagreement between the program's counters and the flows observed.
#[derive(Debug)]
pub struct PortshardRun {
    /// All N listeners in slots 0..N.
    pub before: Landing,
    /// With a table whose every entry is owned by its heir: where each flow's heir is.
    pub heirs: Landing,
    /// After the victim's socket closed, before userspace did anything.
    pub after_close: Landing,
    /// After userspace removed the victim's slot from the table.
    pub after_remove: Landing,
    /// After a new listener joined in slot N.
    pub after_add: Landing,
    /// Entries the new slot took from the table.
    pub entries_taken: u32,
    /// Every round where a counter disagreed with the flows seen, described.
    pub counter_errors: Vec<String>,
}

impl PortshardRun {
    /// Measures `case` with portshard's program and table, pinned under `pins`.
    pub fn measure(case: &CloseOne, pins: &Path) -> Result<Self> {
        let service = "close-one";
        let flows = case.flows();
        let mut listeners = flows::bind_listeners(case.proto, case.target(), case.listeners)?;
        let mut group = steer(pins, service, &listeners)?;
        let mut counters = CounterCheck::new(group.dataplane())?;

        let before = flows.round(&listeners)?;
        counters.expect("all listeners", group.dataplane(), &before, None)?;

        let heirs = with_heir_view(group.dataplane(), group.table().entries(), || {
            flows.round(&listeners)
        })?;
        counters.expect("heir view", group.dataplane(), &heirs, None)?;

        listeners[case.victim] = None;
        let after_close = flows.round(&listeners)?;
        let failed_over = |f: usize| before[f] == Some(case.victim);
        counters.expect(
            "after close",
            group.dataplane(),
            &after_close,
            Some(&failed_over),
        )?;

        group.remove(case.victim as Slot)?;
        let after_remove = flows.round(&listeners)?;
        counters.expect("after remove", group.dataplane(), &after_remove, None)?;

        let newcomer = Listener::bind(case.proto, case.target())?;
        let slot = listeners.len() as Slot;
        let added = group.add(slot, newcomer.as_fd(), 1, Holder::this_process())?;
        listeners.push(Some(newcomer));
        let after_add = flows.round(&listeners)?;
        counters.expect("after add", group.dataplane(), &after_add, None)?;

        drop(listeners);
        Dataplane::remove_pins(pins, service)?;
        Ok(Self {
            before,
            heirs,
            after_close,
            after_remove,
            after_add,
            entries_taken: added.moved,
            counter_errors: counters.errors,
        })
    }
}

/// Runs `round` while the kernel's table names each entry's heir as its owner, then puts
/// `table` back: the flows land where their heirs are.
fn with_heir_view<T>(
    dataplane: &Dataplane,
    table: &[TableEntry],
    round: impl FnOnce() -> io::Result<T>,
) -> Result<T> {
    let view: Vec<TableEntry> = table
        .iter()
        .map(|e| TableEntry {
            owner: e.heir,
            heir: e.heir,
        })
        .collect();
    dataplane.write_all(&view)?;
    let result = round();
    dataplane.write_all(table)?;
    Ok(result?)
}

/// Compares the program's counters, round by round, with the flows observed. Listener `i`
/// sits in slot `i` in every scenario here.
struct CounterCheck {
    last: Counters,
    errors: Vec<String>,
}

impl CounterCheck {
    fn new(dataplane: &Dataplane) -> Result<Self> {
        Ok(Self {
            last: dataplane.counters()?,
            errors: Vec::new(),
        })
    }

    /// Each flow of `landing` ran the program once and counted as `failed_over` on the
    /// slot it reached if `failed_over(flow)`, as `selected` otherwise.
    fn expect(
        &mut self,
        round: &str,
        dataplane: &Dataplane,
        landing: &Landing,
        failed_over: Option<&dyn Fn(usize) -> bool>,
    ) -> Result<()> {
        let now = dataplane.counters()?;
        let mut expected = Counters::ZERO;
        for (flow, slot) in landing.iter().enumerate() {
            if let Some(slot) = slot {
                let row = &mut expected.slots[*slot];
                if failed_over.is_some_and(|f| f(flow)) {
                    row.failed_over += 1;
                } else {
                    row.selected += 1;
                }
            }
        }
        let observed = now.since(&self.last);
        for slot in 0..MAX_SLOTS as usize {
            if observed.slots[slot] != expected.slots[slot] {
                self.errors.push(format!(
                    "{round}: slot {slot} counters {:?}, flows observed {:?}",
                    observed.slots[slot], expected.slots[slot]
                ));
            }
        }
        if observed.fell_through != 0 {
            self.errors.push(format!(
                "{round}: {} runs fell through to the kernel",
                observed.fell_through
            ));
        }
        self.last = now;
        Ok(())
    }
}

/// TCP connections queued, never accepted, when one listener of N closes.
#[derive(Debug, Clone, Copy)]
pub struct QueuedOnClose {
    /// IPv6 loopback instead of IPv4.
    pub ipv6: bool,
    /// Listeners (N).
    pub listeners: usize,
    /// Index of the one that closes.
    pub victim: usize,
    /// Connections opened before it closes.
    pub connections: usize,
}

/// What became of the queued connections.
#[derive(Debug)]
pub struct QueueOutcome {
    /// Connections waiting in the victim's accept queue when it closed.
    pub queued_at_victim: usize,
    /// Connections a surviving listener accepted and that got an answer.
    pub served: usize,
    /// Connections reset or never answered.
    pub reset: usize,
    /// Where each connection was accepted in the end.
    pub accepted_by: Landing,
}

/// The same case with portshard, plus where each connection's table entry pointed.
#[derive(Debug)]
pub struct PortshardQueueOutcome {
    /// What became of the connections.
    pub outcome: QueueOutcome,
    /// Where each flow lands with the table as it is (its owner).
    pub owners: Landing,
    /// Where each flow lands with every entry given to its heir.
    pub heirs: Landing,
    /// The program's `migrated` counter per slot over the close.
    pub migrated: Vec<u64>,
}

impl QueuedOnClose {
    fn flows(&self) -> Flows {
        Flows::new(
            Proto::Tcp,
            flows::loopback(self.ipv6, SERVICE_PORT),
            self.connections,
        )
    }

    fn listeners(&self) -> io::Result<Vec<Option<Listener>>> {
        flows::bind_listeners(
            Proto::Tcp,
            flows::loopback(self.ipv6, SERVICE_PORT),
            self.listeners,
        )
    }

    /// Plain `SO_REUSEPORT` (migration disabled, the kernel's default).
    pub fn kernel(&self) -> Result<QueueOutcome> {
        let mut listeners = self.listeners()?;
        self.close_with_queue(&mut listeners)
    }

    /// With portshard's select-or-migrate program.
    pub fn portshard(&self, pins: &Path) -> Result<PortshardQueueOutcome> {
        let service = "queued";
        let flows = self.flows();
        let mut listeners = self.listeners()?;
        let group = steer(pins, service, &listeners)?;
        let owners = flows.round(&listeners)?;
        let heirs = with_heir_view(group.dataplane(), group.table().entries(), || {
            flows.round(&listeners)
        })?;
        let before = group.dataplane().counters()?;
        let outcome = self.close_with_queue(&mut listeners)?;
        let delta = group.dataplane().counters()?.since(&before);
        let migrated = delta.slots[..self.listeners]
            .iter()
            .map(|row| row.migrated)
            .collect();
        drop(listeners);
        Dataplane::remove_pins(pins, service)?;
        Ok(PortshardQueueOutcome {
            outcome,
            owners,
            heirs,
            migrated,
        })
    }

    /// Opens every connection, waits until all are queued, closes the victim, then accepts
    /// on the survivors and answers each connection once.
    fn close_with_queue(&self, listeners: &mut [Option<Listener>]) -> Result<QueueOutcome> {
        let flows = self.flows();
        let mut clients = Vec::with_capacity(self.connections);
        for flow in 0..self.connections {
            let client = flows
                .open(flow)?
                .ok_or_else(|| MeasureError::Traffic(format!("connection {flow} refused")))?;
            client.set_read_timeout(Some(Duration::from_secs(2)))?;
            clients.push(client);
        }
        let queued = |listeners: &[Option<Listener>]| -> io::Result<Vec<usize>> {
            listeners
                .iter()
                .map(|l| l.as_ref().map_or(Ok(0), Listener::accept_queue_len))
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while queued(listeners)?.iter().sum::<usize>() < self.connections {
            if Instant::now() > deadline {
                return Err(MeasureError::Traffic(format!(
                    "only {:?} of {} connections queued",
                    queued(listeners)?,
                    self.connections
                )));
            }
            thread::sleep(Duration::from_millis(1));
        }
        let queued_at_victim = queued(listeners)?[self.victim];
        listeners[self.victim] = None;

        let mut accepted_by = vec![None; self.connections];
        let mut accepted = Vec::new();
        for (i, listener) in listeners.iter().enumerate() {
            let Some(listener) = listener else { continue };
            for (connection, peer) in listener.accept_waiting()? {
                let flow = usize::from(peer.port().wrapping_sub(flows::FIRST_SOURCE_PORT));
                if flow < self.connections {
                    accepted_by[flow] = Some(i);
                }
                accepted.push(connection);
            }
        }
        for connection in &accepted {
            // A queued connection the kernel reset fails here; the client side tells.
            let _ = connection.send(b"ok");
        }
        let (mut served, mut reset) = (0, 0);
        for client in &mut clients {
            let mut answer = [0u8; 2];
            match client.read_exact(&mut answer) {
                Ok(()) if &answer == b"ok" => served += 1,
                _ => reset += 1,
            }
        }
        // Clients reset first, so no packet of theirs outlives the server side (see rounds).
        drop(clients);
        drop(accepted);
        Ok(QueueOutcome {
            queued_at_victim,
            served,
            reset,
            accepted_by,
        })
    }
}

/// A new portshard group for `service` under `pins` with listener `i` in slot `i`, weight 1.
pub fn steer(pins: &Path, service: &str, listeners: &[Option<Listener>]) -> Result<Group> {
    steer_with_flows(pins, service, listeners, 0)
}

/// [`steer`], with the UDP flow table on, sized for `flow_capacity` flows, if that is not 0.
pub fn steer_with_flows(
    pins: &Path,
    service: &str,
    listeners: &[Option<Listener>],
    flow_capacity: u32,
) -> Result<Group> {
    let mut group = Group::create(pins, service, flow_capacity)?;
    if flow_capacity > 0 {
        group
            .dataplane()
            .set_switches(portshard::supervisor::Switches {
                flags: portshard_common::TABLE_FLOWS,
                flow_idle_s: 120,
            });
    }
    for (slot, listener) in listeners.iter().enumerate() {
        if let Some(listener) = listener {
            group.add(slot as Slot, listener.as_fd(), 1, Holder::this_process())?;
        }
    }
    Ok(group)
}

/// What every kernel test and the demo run in: this thread in a private network namespace,
/// the open-file limit raised, and a private pin root (removed first, then the namespace).
pub struct Sandbox {
    pins: PinRoot,
    _netns: NetNs,
}

impl Sandbox {
    /// Enters it; fails with what is missing (root, a BPF filesystem) otherwise.
    pub fn enter() -> Result<Self> {
        let netns = NetNs::enter()?;
        raise_fd_limit()?;
        Ok(Self {
            pins: PinRoot::new()?,
            _netns: netns,
        })
    }

    /// The private pin root.
    pub fn pins(&self) -> &Path {
        self.pins.path()
    }
}

/// A private pin root for one test or demo run, removed with everything in it on drop.
pub struct PinRoot {
    path: PathBuf,
}

impl PinRoot {
    /// A new, empty directory under the default BPF filesystem mount.
    pub fn new() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = Path::new(portshard::bpffs::DEFAULT_MOUNT).join(format!(
            "portshard-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        portshard::bpffs::ensure_dir(&path)?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
