//! `cargo xtask soak [--minutes M]`: the real `portshard serve` with 2 UDP and 2 TCP services
//! of 8 `portshard echo` workers each (one of each kind with a health probe) in a private
//! network namespace, under continuous load (fixed UDP flows whose datagrams carry a per-flow
//! sequence number, TCP connections opened, used and closed in a loop, others held open),
//! while a chaos loop at random intervals SIGKILLs workers, SIGSTOPs and later SIGCONTs them,
//! `kill -9`s the daemon and restarts it, drains and restores slots, changes weights and
//! reloads services (a new generation of workers takes over; the old one retires). Hostile
//! load runs throughout: a flood of one-datagram flows from many source addresses at both
//! UDP services, a storm of TCP connections opened and closed at once driving the TCP
//! workers past saturation, and a thread spinning on a CPU at the daemon's priority. A UDP
//! datagram lost where its worker's socket dropped datagrams (a full receive buffer) is
//! excused and counted; every other invariant holds as without the hostile load.
//! Every observation is checked against the invariants of `portshard_harness::soak`; after the
//! final SIGTERM no pin, process or fd may be left. Every violation is printed with its flow,
//! slot, pid and time; the last line is `soak faults=<n> violations=<n>`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use portshard::{
    control::{Reply, Request},
    dataplane::Dataplane,
    report::ServiceStatus,
    table::Slot,
};
use portshard_common::SlotState;
use portshard_harness::{
    daemon::{
        DaemonRun, UdpFlows, control_request, echo, portshard_exe, read_greeting, signal, workers,
    },
    flood::{Flood, udp_drops_by_inode},
    scenario::Sandbox,
    soak::{Fault, FaultKind, Ledger, Rng, TcpOutcome},
};

const WORKERS: usize = 8;
const UDP_FLOWS: usize = 256;
const HELD: usize = 8;
const CONNECTIONS_PER_LOOP: usize = 4;
const READY: Duration = Duration::from_secs(30);
const ROUND_TIMEOUT: Duration = Duration::from_millis(400);
/// How long the soak's own TCP connections wait to connect and for each answer: generous,
/// as the hostile load drives the TCP workers past saturation (a full accept queue drops
/// SYNs, which are sent again after 1 s and 3 s).
const TCP_TIMEOUT: Duration = Duration::from_secs(5);
/// Slack around each fault for delivery and scheduling.
const MARGIN: Duration = Duration::from_secs(1);
/// At most this many workers of a service are down (killed or stopped) at once.
const MAX_DOWN: usize = 2;
/// One-datagram flows the flood sends per burst, to one UDP service, and the pause after.
const FLOOD_BURST: u32 = 500;
const FLOOD_PAUSE: Duration = Duration::from_millis(10);

/// A service of the soak: name, transport, port, steering mode, and whether it has a
/// health probe.
struct Spec {
    name: &'static str,
    proto: &'static str,
    port: u16,
    mode: &'static str,
    probe: Option<&'static str>,
}

const SERVICES: [Spec; 4] = [
    Spec {
        name: "udp-a",
        proto: "udp",
        port: 5301,
        mode: "balance",
        probe: None,
    },
    Spec {
        name: "udp-b",
        proto: "udp",
        port: 5302,
        // With the flow table: flows stay on their worker through drains and weights.
        mode: "handover",
        probe: Some("udp:probe"),
    },
    Spec {
        name: "tcp-a",
        proto: "tcp",
        port: 5301,
        mode: "balance",
        probe: None,
    },
    Spec {
        name: "tcp-b",
        proto: "tcp",
        port: 5302,
        mode: "balance",
        probe: Some("tcp"),
    },
];

fn address(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn config(exe: &Path) -> String {
    SERVICES
        .iter()
        .map(|s| {
            let probe = s.probe.map_or_else(String::new, |p| {
                format!("probe = \"{p}\"\nprobe_interval = \"250ms\"\nprobe_timeout = \"125ms\"\nprobe_failures = 3\n")
            });
            // Reloads switch after 300 ms (and a passed readiness probe); the old
            // generation retires when idle for 500 ms, held connections or not after 3 s.
            format!(
                "[[service]]\nname = \"{}\"\nproto = \"{}\"\nlisten = \"127.0.0.1:{}\"\nmode = \"{}\"\nworkers = {WORKERS}\ncommand = [\"{}\", \"echo\"]\nrestart_delay = \"50ms\"\nrestart_delay_max = \"500ms\"\nrestart_window = \"1s\"\nrestart_limit = 1000000\nstop_timeout = \"2s\"\nready_delay = \"300ms\"\ndrain_idle = \"500ms\"\ndrain_timeout = \"3s\"\n{probe}\n",
                s.name, s.proto, s.port, s.mode, exe.display()
            )
        })
        .collect()
}

/// A disturbance still going on: a stopped worker to continue, or a slot waiting for its
/// replacement or for its weight back.
struct Pending {
    fault: usize,
    service: &'static str,
    slot: Slot,
    pid: u32,
    kind: FaultKind,
    /// When the chaos loop undoes it (SIGCONT, restore); `None`: it ends by itself.
    undo_at: Option<Duration>,
}

/// A reload under way: its request waits for the final reply on a thread of its own, so the
/// load goes on meanwhile; it is over once the reply came and the service has exactly its
/// live workers again (the old generation exited, or the new one was rolled back).
struct Reloading {
    service: &'static str,
    from: Duration,
    /// The old generation's workers.
    old: Vec<Retiree>,
    /// When the old workers were last looked for in the status.
    looked: Duration,
    request: Option<JoinHandle<Result<Reply, String>>>,
}

/// A worker of the generation a reload replaces.
struct Retiree {
    slot: Slot,
    pid: u32,
    /// The ledger's span of its slot, once it has one: from the request in `balance` mode;
    /// from the worker's exit in `handover` mode, where its flows must stay on it until then.
    span: Option<usize>,
}

/// Datagrams dropped so far by each slot's socket (`sockets`: slot to inode).
fn slot_drops(sockets: &BTreeMap<Slot, u64>) -> BTreeMap<Slot, u64> {
    let drops = udp_drops_by_inode().unwrap_or_default();
    sockets
        .iter()
        .filter_map(|(&slot, inode)| Some((slot, *drops.get(inode)?)))
        .collect()
}

/// The hostile load's threads, each running until told to stop.
struct Hostile {
    /// Returns the one-datagram flows it sent.
    flood: JoinHandle<u64>,
    /// Returns the connections it opened.
    storm: JoinHandle<u64>,
    /// Spins on a CPU.
    hog: JoinHandle<()>,
}

impl Hostile {
    /// Waits for every thread (after `stop` was set); returns the flood's flows and the
    /// storm's connections.
    fn join(self) -> (u64, u64) {
        let _ = self.hog.join();
        (
            self.flood.join().unwrap_or(0),
            self.storm.join().unwrap_or(0),
        )
    }
}

/// Starts the hostile load, each part on a thread of its own until `stop`.
fn hostile(stop: &Arc<AtomicBool>) -> Result<Hostile> {
    let udp_ports: Vec<u16> = SERVICES
        .iter()
        .filter(|s| s.proto == "udp")
        .map(|s| s.port)
        .collect();
    let floods = udp_ports
        .iter()
        .map(|&port| Flood::new(SocketAddrV4::new([127, 0, 0, 1].into(), port)))
        .collect::<std::io::Result<Vec<_>>>()
        .context("opening the flood's raw sockets")?;
    let flood = {
        let stop = Arc::clone(stop);
        std::thread::spawn(move || {
            let (mut next, mut sent) = (0u32, 0);
            while !stop.load(Ordering::Relaxed) {
                for flood in &floods {
                    // Every flow new: sources cycle through about 16 million.
                    let first = next % (15 << 20);
                    sent += flood.send(first..first + FLOOD_BURST, 1).unwrap_or(0);
                    next = next.wrapping_add(FLOOD_BURST);
                }
                std::thread::sleep(FLOOD_PAUSE);
            }
            sent
        })
    };
    let tcp: Vec<SocketAddr> = SERVICES
        .iter()
        .filter(|s| s.proto == "tcp")
        .map(|s| address(s.port))
        .collect();
    let storm = {
        let stop = Arc::clone(stop);
        std::thread::spawn(move || {
            let mut opened = 0;
            while !stop.load(Ordering::Relaxed) {
                for &target in &tcp {
                    if TcpStream::connect_timeout(&target, TCP_TIMEOUT).is_ok() {
                        opened += 1;
                    }
                }
            }
            opened
        })
    };
    let hog = {
        let stop = Arc::clone(stop);
        std::thread::spawn(move || {
            let mut spins = 0u64;
            while !stop.load(Ordering::Relaxed) {
                spins = std::hint::black_box(spins.wrapping_add(1));
            }
        })
    };
    Ok(Hostile { flood, storm, hog })
}

/// Whether process `pid` runs (exists and is not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Processes running `exe` (the daemon and its echo workers).
fn processes_of(exe: &Path) -> usize {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|entry| entry.ok())
                .filter(|entry| {
                    std::fs::read_link(entry.path().join("exe")).is_ok_and(|p| p == exe)
                })
                .count()
        })
        .unwrap_or(0)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count())
}

fn entries_under(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |dir| dir.count())
}

/// Table entries of `service` with neither a live owner nor a live heir, and one of them.
fn orphaned_entries(pins: &Path, service: &str) -> Result<(usize, String)> {
    let dataplane = Dataplane::open(pins, service)?;
    let live = |slot: u16| {
        dataplane.meta(slot).is_ok_and(|meta| {
            matches!(
                SlotState::from_raw(meta.state),
                Some(SlotState::Live | SlotState::Draining)
            ) && running(meta.pid)
        })
    };
    let mut alive = BTreeMap::new();
    let mut orphaned = 0;
    let mut example = String::new();
    for (index, entry) in dataplane.read_entries().iter().enumerate() {
        let owner = *alive
            .entry(entry.owner)
            .or_insert_with(|| live(entry.owner));
        let heir = *alive.entry(entry.heir).or_insert_with(|| live(entry.heir));
        if !owner && !heir {
            if orphaned == 0 {
                example = format!("entry {index}: owner {} heir {}", entry.owner, entry.heir);
            }
            orphaned += 1;
        }
    }
    Ok((orphaned, example))
}

struct Soak {
    exe: std::path::PathBuf,
    daemon: DaemonRun,
    ledger: Ledger,
    rng: Rng,
    start: Instant,
    pending: Vec<Pending>,
    reloading: Vec<Reloading>,
    udp: Vec<(&'static str, UdpFlows)>,
    held: BTreeMap<&'static str, Vec<(TcpStream, portshard_harness::daemon::Answer, Duration)>>,
    connections: usize,
}

impl Soak {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn pids(&self) -> Result<BTreeMap<String, BTreeMap<Slot, u32>>> {
        Ok(workers(&self.daemon.status()?))
    }

    /// One UDP round per UDP service, checked (after noting which retiring workers exited
    /// meanwhile: their flows may have moved in this very round).
    fn udp_rounds(&mut self) -> Result<()> {
        for index in 0..self.udp.len() {
            let service = self.udp[index].0;
            let sockets = self.sockets_of(service)?;
            let before = slot_drops(&sockets);
            let answers = self.udp[index].1.round(ROUND_TIMEOUT)?;
            let done = self.start.elapsed();
            let after = slot_drops(&sockets);
            let dropped: BTreeSet<Slot> = after
                .iter()
                .filter(|&(slot, drops)| before.get(slot).is_some_and(|b| drops > b))
                .map(|(&slot, _)| slot)
                .collect();
            if self.reloading.iter().any(|r| r.service == service) {
                let status = self.daemon.status()?;
                self.note_retired(&status);
            }
            self.ledger
                .udp_round_with_drops(service, done, &answers, &dropped);
        }
        Ok(())
    }

    /// The inode of each slot's listening socket (its worker's fd 3) of `service`.
    fn sockets_of(&self, service: &str) -> Result<BTreeMap<Slot, u64>> {
        Ok(self
            .pids()?
            .remove(service)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(slot, pid)| {
                let link = std::fs::read_link(format!("/proc/{pid}/fd/3")).ok()?;
                let inode = link
                    .to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()?;
                Some((slot, inode))
            })
            .collect())
    }

    /// Starts the ledger's span of each retiring worker that has exited (by `status`, just
    /// read) since last looked for; in `balance` mode its span started with the request.
    fn note_retired(&mut self, status: &[ServiceStatus]) {
        let now = self.now();
        for reload in &mut self.reloading {
            let service = status.iter().find(|s| s.name == reload.service);
            for retiree in reload.old.iter_mut().filter(|r| r.span.is_none()) {
                let listed =
                    service.is_some_and(|s| s.slots.iter().any(|slot| slot.pid == retiree.pid));
                if !(listed && running(retiree.pid)) {
                    let span = self
                        .ledger
                        .retiring(reload.service, retiree.slot, reload.looked);
                    retiree.span = Some(span);
                }
            }
            reload.looked = now;
        }
    }

    /// A few connections per TCP service opened, used and closed; every held connection
    /// used (one that failed is replaced).
    fn tcp_load(&mut self) -> Result<()> {
        for spec in SERVICES.iter().filter(|s| s.proto == "tcp") {
            for _ in 0..CONNECTIONS_PER_LOOP {
                let from = self.now();
                self.connections += 1;
                let flow = format!("tcp {}", self.connections);
                let outcome = connection(address(spec.port), &flow);
                self.ledger.tcp(spec.name, from, self.now(), flow, outcome);
            }
            let held = self.held.entry(spec.name).or_default();
            let mut kept = Vec::new();
            for (i, (mut stream, answer, since)) in held.drain(..).enumerate() {
                let text = format!("held {i}\n");
                match echo(&mut stream, &text, TCP_TIMEOUT) {
                    Ok(()) => kept.push((stream, answer, since)),
                    Err(error) => {
                        let outcome = TcpOutcome::Failed {
                            answer: Some(answer),
                            what: format!("held connection failed: {error}"),
                        };
                        self.ledger.tcp(
                            spec.name,
                            since,
                            self.start.elapsed(),
                            format!("held {i}"),
                            outcome,
                        );
                    }
                }
            }
            while kept.len() < HELD {
                let since = self.start.elapsed();
                match TcpStream::connect_timeout(&address(spec.port), TCP_TIMEOUT)
                    .map_err(|e| e.to_string())
                    .and_then(|s| {
                        read_greeting(&s, TCP_TIMEOUT)
                            .map(|a| (s, a))
                            .map_err(|e| e.to_string())
                    }) {
                    Ok((stream, answer)) => kept.push((stream, answer, since)),
                    Err(_) => break,
                }
            }
            *self.held.entry(spec.name).or_default() = kept;
        }
        Ok(())
    }

    /// Ends what is over: continues stopped workers, restores drained slots, and closes
    /// kill spans once the slot serves again.
    fn settle(&mut self) -> Result<()> {
        let now = self.now();
        let pids = self.pids()?;
        let mut still = Vec::new();
        for mut pending in std::mem::take(&mut self.pending) {
            let current = pids
                .get(pending.service)
                .and_then(|s| s.get(&pending.slot))
                .copied();
            let due = pending.undo_at.is_some_and(|at| at <= now);
            match pending.kind {
                FaultKind::Stop if due => {
                    // Already killed by its probe (hung): then it ends like a kill.
                    let _ = signal(pending.pid, libc::SIGCONT);
                    pending.undo_at = None;
                    if current == Some(pending.pid) {
                        self.ledger.end(pending.fault, now);
                    } else {
                        pending.kind = FaultKind::Kill;
                        still.push(pending);
                    }
                }
                FaultKind::Drain if due => {
                    let request = Request::Weight {
                        service: pending.service.to_owned(),
                        slot: pending.slot,
                        weight: 1,
                    };
                    if self.daemon.request(&request).is_ok() {
                        let fault = Fault {
                            kind: FaultKind::Restore,
                            service: pending.service.to_owned(),
                            slot: Some(pending.slot),
                            from: now,
                            until: Some(now),
                        };
                        self.ledger.fault(fault);
                        self.ledger.end(pending.fault, now);
                    } else {
                        still.push(pending);
                    }
                }
                FaultKind::Kill if current.is_some_and(|pid| pid != pending.pid) => {
                    self.ledger.end(pending.fault, now);
                }
                _ => still.push(pending),
            }
        }
        self.pending = still;
        self.settle_reloads()
    }

    /// Checks each reload's final reply once it came, and ends its spans once the service
    /// has settled.
    fn settle_reloads(&mut self) -> Result<()> {
        // One reading for both: a worker seen gone gets its span before its reload is over.
        let status = self.daemon.status()?;
        self.note_retired(&status);
        let mut still = Vec::new();
        for mut reload in std::mem::take(&mut self.reloading) {
            let now = self.now();
            let service = status.iter().find(|s| s.name == reload.service);
            if let Some(request) = reload.request.take_if(|r| r.is_finished()) {
                let outcome = request
                    .join()
                    .unwrap_or_else(|_| Err("the request's thread panicked".to_owned()));
                match outcome {
                    Ok(Reply::Done { .. }) => {}
                    Ok(other) => {
                        let what = format!("the daemon answered {other:?}");
                        self.ledger
                            .reload_failed(reload.service, reload.from, now, what);
                    }
                    Err(error) => {
                        self.ledger
                            .reload_failed(reload.service, reload.from, now, error);
                    }
                }
            }
            let settled = service.is_some_and(|s| {
                let serving: Vec<_> = s.slots.iter().filter(|slot| slot.state != "free").collect();
                serving.len() == WORKERS && serving.iter().all(|slot| slot.state == "live")
            });
            if reload.request.is_none() && settled {
                for span in reload.old.iter().filter_map(|r| r.span) {
                    self.ledger.end(span, now);
                }
            } else {
                still.push(reload);
            }
        }
        self.reloading = still;
        Ok(())
    }

    /// Injects one random fault.
    fn chaos(&mut self) -> Result<()> {
        let now = self.now();
        let pids = self.pids()?;
        let spec = &SERVICES[self.rng.below(0..SERVICES.len() as u64) as usize];
        if self.reloading.iter().any(|r| r.service == spec.name) {
            // Its slots are changing hands: no other fault until the reload is over.
            return Ok(());
        }
        let busy: Vec<Slot> = self
            .pending
            .iter()
            .filter(|p| p.service == spec.name)
            .map(|p| p.slot)
            .collect();
        let free: Vec<(Slot, u32)> = pids
            .get(spec.name)
            .map(|slots| {
                slots
                    .iter()
                    .filter(|(s, _)| !busy.contains(s))
                    .map(|(&s, &p)| (s, p))
                    .collect()
            })
            .unwrap_or_default();
        let down = self
            .pending
            .iter()
            .filter(|p| {
                p.service == spec.name && matches!(p.kind, FaultKind::Kill | FaultKind::Stop)
            })
            .count();
        let Some(&(slot, pid)) = free.get(self.rng.below(0..free.len().max(1) as u64) as usize)
        else {
            return Ok(());
        };
        let roll = self.rng.below(0..100);
        let kind = match roll {
            0..4 => FaultKind::DaemonKill,
            4..34 if down < MAX_DOWN => FaultKind::Kill,
            34..60 if down < MAX_DOWN => FaultKind::Stop,
            60..78 if free.len() > 3 => FaultKind::Drain,
            78..84 if busy.is_empty() && free.len() == WORKERS => FaultKind::Reload,
            _ => FaultKind::Weight,
        };
        let fault = |kind, until| Fault {
            kind,
            service: spec.name.to_owned(),
            slot: Some(slot),
            from: now,
            until,
        };
        match kind {
            FaultKind::DaemonKill => {
                self.ledger.fault(Fault {
                    kind,
                    service: String::new(),
                    slot: None,
                    from: now,
                    until: Some(now),
                });
                self.daemon.kill9()?;
                // Steering goes on without the daemon: one round of load while it is down.
                self.udp_rounds()?;
                self.tcp_load()?;
                self.daemon.spawn()?;
                self.daemon.wait_control(READY)?;
            }
            FaultKind::Kill | FaultKind::Stop => {
                let undo_at = (kind == FaultKind::Stop).then(|| now + self.rng.millis(100..1500));
                let number = if kind == FaultKind::Kill {
                    libc::SIGKILL
                } else {
                    libc::SIGSTOP
                };
                signal(pid, number)?;
                self.pend(fault(kind, None), spec.name, pid, undo_at);
            }
            FaultKind::Drain => {
                let request = Request::Drain {
                    service: spec.name.to_owned(),
                    slot,
                };
                if let Reply::Done { .. } = self.daemon.request(&request)? {
                    let undo_at = Some(now + self.rng.millis(300..2000));
                    self.pend(fault(kind, None), spec.name, pid, undo_at);
                }
            }
            FaultKind::Weight | FaultKind::Restore => {
                let weight = self.rng.below(1..5) as u32;
                let request = Request::Weight {
                    service: spec.name.to_owned(),
                    slot,
                    weight,
                };
                if let Reply::Done { .. } = self.daemon.request(&request)? {
                    self.ledger.fault(fault(FaultKind::Weight, Some(now)));
                }
            }
            FaultKind::Reload => {
                self.ledger.count_reload();
                let old = free
                    .iter()
                    .map(|&(slot, pid)| Retiree {
                        slot,
                        pid,
                        span: (spec.mode == "balance")
                            .then(|| self.ledger.retiring(spec.name, slot, now)),
                    })
                    .collect();
                let control = self.daemon.control().to_path_buf();
                let request = Request::Reload {
                    service: spec.name.to_owned(),
                };
                let request = std::thread::spawn(move || {
                    control_request(&control, &request).map_err(|e| e.to_string())
                });
                self.reloading.push(Reloading {
                    service: spec.name,
                    from: now,
                    old,
                    looked: now,
                    request: Some(request),
                });
            }
        }
        Ok(())
    }

    /// Records `fault` on worker `pid` of `service` as going on until undone (at `undo_at`)
    /// or over by itself.
    fn pend(&mut self, fault: Fault, service: &'static str, pid: u32, undo_at: Option<Duration>) {
        let (kind, slot) = (fault.kind, fault.slot.expect("a slot's fault"));
        let fault = self.ledger.fault(fault);
        self.pending.push(Pending {
            fault,
            service,
            slot,
            pid,
            kind,
            undo_at,
        });
    }

    /// Checks that every table entry names a live owner or heir.
    fn check_tables(&mut self) -> Result<()> {
        for spec in &SERVICES {
            let (orphaned, example) = orphaned_entries(self.daemon.pins(), spec.name)?;
            let at = self.now();
            self.ledger.table(spec.name, at, orphaned, example);
        }
        Ok(())
    }
}

/// Opens a connection, reads the greeting, echoes a line and closes.
fn connection(target: SocketAddr, flow: &str) -> TcpOutcome {
    let stream = match TcpStream::connect_timeout(&target, TCP_TIMEOUT) {
        Ok(stream) => stream,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return TcpOutcome::Refused,
        Err(e) => {
            return TcpOutcome::Failed {
                answer: None,
                what: format!("connect: {e}"),
            };
        }
    };
    let answer = match read_greeting(&stream, TCP_TIMEOUT) {
        Ok(answer) => answer,
        Err(e) => {
            return TcpOutcome::Failed {
                answer: None,
                what: format!("greeting: {e}"),
            };
        }
    };
    let mut stream = stream;
    match echo(&mut stream, &format!("{flow}\n"), TCP_TIMEOUT) {
        Ok(()) => TcpOutcome::Served(answer),
        Err(e) => TcpOutcome::Failed {
            answer: Some(answer),
            what: format!("echo: {e}"),
        },
    }
}

fn main() -> Result<()> {
    let minutes: f64 = match std::env::args().nth(1).as_deref() {
        Some("--minutes") => std::env::args()
            .nth(2)
            .context("--minutes needs a number")?
            .parse()
            .context("--minutes")?,
        Some(other) => bail!("unknown argument {other:?}: use --minutes M"),
        None => 1.0,
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let exe = portshard_exe()?;
    let sandbox = Sandbox::enter().context("setting up the soak's private namespace and pins")?;
    let (processes_before, fds_before) = (processes_of(&exe), open_fds());
    println!(
        "soak: {minutes} min, seed {seed}; 2 UDP and 2 TCP services of {WORKERS} workers (udp-b and tcp-b probed), {UDP_FLOWS} UDP flows each, {HELD} held connections per TCP service"
    );
    let duration = Duration::from_secs_f64(minutes * 60.0);
    let mut soak = Soak {
        daemon: DaemonRun::start(&exe, &config(&exe), sandbox.pins())?,
        exe: exe.clone(),
        ledger: Ledger::new(MARGIN),
        rng: Rng::new(seed),
        start: Instant::now(),
        pending: Vec::new(),
        reloading: Vec::new(),
        udp: Vec::new(),
        held: BTreeMap::new(),
        connections: 0,
    };
    let ready: Vec<(&str, usize)> = SERVICES.iter().map(|s| (s.name, WORKERS)).collect();
    soak.daemon.wait_ready(&ready, READY)?;
    for spec in SERVICES.iter().filter(|s| s.proto == "udp") {
        let mut flows = UdpFlows::new(address(spec.port), UDP_FLOWS)?;
        flows.settle(READY)?;
        soak.udp.push((spec.name, flows));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let hostile = hostile(&stop)?;
    soak.start = Instant::now();
    let mut next_fault = soak.rng.millis(200..800);
    let mut next_table = Duration::from_secs(1);
    while soak.now() < duration {
        soak.udp_rounds()?;
        soak.tcp_load()?;
        soak.settle()?;
        if soak.now() >= next_fault {
            soak.chaos()?;
            next_fault = soak.now() + soak.rng.millis(100..600);
        }
        if soak.now() >= next_table {
            soak.check_tables()?;
            next_table = soak.now() + Duration::from_secs(1);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (flooded, stormed) = hostile.join();
    // Undo every disturbance, then stop everything and count what is left.
    for pending in &soak.pending {
        let _ = signal(pending.pid, libc::SIGCONT);
    }
    let status = soak.daemon.terminate()?;
    // Reloads still under way end with the daemon; their requests' sockets close with them.
    for reload in std::mem::take(&mut soak.reloading) {
        if let Some(request) = reload.request {
            let _ = request.join();
        }
    }
    // The daemon's log, kept for reading the violations against.
    let log = std::env::temp_dir().join("portshard-soak-daemon.log");
    std::fs::write(&log, soak.daemon.log_text())
        .with_context(|| format!("writing {}", log.display()))?;
    println!("daemon log: {}", log.display());
    let at = soak.now();
    if !status.success() {
        soak.ledger
            .other(at, format!("the daemon exited with {status} on SIGTERM"));
    }
    let Soak {
        mut ledger,
        udp,
        held,
        daemon,
        exe,
        connections,
        ..
    } = soak;
    drop((udp, held, daemon));
    let pins = entries_under(sandbox.pins());
    let processes = processes_of(&exe);
    let fds = open_fds();
    for (what, before, after) in [
        ("pins", 0, pins),
        ("processes", processes_before, processes),
        ("fds", fds_before, fds),
    ] {
        if after > before {
            ledger.other(
                at,
                format!(
                    "{} {what} left after SIGTERM (before the start: {before})",
                    after - before
                ),
            );
        }
    }
    println!(
        "leftovers after SIGTERM: pins {pins}, processes {processes} (before {processes_before}), fds {fds} (before {fds_before})"
    );
    for violation in ledger.violations() {
        println!("{violation}");
    }
    let by_kind: Vec<String> = ledger
        .faults_by_kind()
        .iter()
        .map(|(k, n)| format!("{}={n}", k.name()))
        .collect();
    println!(
        "faults by kind: {}; {connections} TCP connections opened and closed",
        by_kind.join(" ")
    );
    println!(
        "hostile load: {} one-datagram flows flooded, {} storm connections; {} datagrams lost where their worker's socket dropped datagrams (excused)",
        flooded,
        stormed,
        ledger.buffer_losses()
    );
    println!(
        "soak faults={} violations={}",
        ledger.fault_count(),
        ledger.violations().len()
    );
    if !ledger.violations().is_empty() {
        // The pin root and namespace go first; the summary stays the last line.
        drop(sandbox);
        std::process::exit(1);
    }
    Ok(())
}
