//! `portshard serve`: runs the configured services. For each, it creates (or adopts) the
//! pinned dataplane, starts `workers` copies of the command by socket activation, learns
//! of each worker's death through its pidfd, heals the table (the dead slot's entries go
//! to the heirs the kernel already sends them to) and restarts the worker with backoff,
//! giving it its entries back. A restarted daemon adopts the running workers and the pinned
//! state without moving a flow.
//!
//! Every worker belongs to a generation. `portshard reload` (and SIGHUP) starts a new one in
//! free slots and switches new work to it once it stayed up (see [`generations`]); the old
//! one keeps what it has and is stopped once idle.
//!
//! Everything that changes state happens on one task, in the order events arrive; the
//! other tasks only watch pidfds, timers and sockets and send it events.
mod generations;
mod probes;

use probes::{ProbeThread, Probing};

pub use generations::read_config;

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use portshard_common::{MAX_SLOTS, SlotMeta, SlotState, names};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    io::{Interest, unix::AsyncFd},
    net::{TcpListener, UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};
use tracing::{error, info, warn};

use crate::{
    bpffs::{self, BpffsError},
    config::{Config, Mode, Service},
    control::{self, Reply, Request},
    dataplane::{Dataplane, DataplaneError},
    group::{Group, GroupError, Holder},
    metrics,
    probe::{Outcome, OutcomeCounts},
    prober::Prober,
    process::{self, Activation, Credentials, Exit, ProcessError},
    report::{self, PROTO_TCP, PROTO_UDP, StatusReport, listen_address},
    socket::{self, Proto, SocketError},
    table::Slot,
};

/// Where the daemon keeps its state and listens.
#[derive(Clone, Debug)]
pub struct Options {
    /// The config file, read again by `reload` and SIGHUP; `None` for the built-in
    /// default.
    pub config: Option<PathBuf>,
    /// Pin root on a BPF filesystem.
    pub bpffs: PathBuf,
    /// Path of the control socket.
    pub control: PathBuf,
    /// Address of the Prometheus endpoint, if any.
    pub metrics: Option<SocketAddr>,
}

/// The daemon could not start, or failed while running.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The pin root is unusable.
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
    /// A service's pins are unusable.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// A service's group refused a change.
    #[error(transparent)]
    Group(#[from] GroupError),
    /// A worker could not be started.
    #[error("service {service} slot {slot}: {source}")]
    Worker {
        /// The service.
        service: String,
        /// The slot.
        slot: Slot,
        /// Why.
        #[source]
        source: ProcessError,
    },
    /// A worker's socket could not be made.
    #[error("service {service}: {source}")]
    Socket {
        /// The service.
        service: String,
        /// Why.
        #[source]
        source: SocketError,
    },
    /// Every slot of a service is taken.
    #[error(
        "service {service}: all {MAX_SLOTS} slots are in use (workers of every generation): wait for an old generation to drain, or lower `workers`"
    )]
    NoFreeSlot {
        /// The service.
        service: String,
    },
    /// Another daemon holds the pin root.
    #[error(
        "another portshard daemon already serves pin root {root} (it holds the lock on it): stop it first, or give this one its own --bpffs and --control"
    )]
    Locked {
        /// The pin root.
        root: PathBuf,
    },
    /// Pins left by a previous run describe another service than the config.
    #[error(
        "service {service} is pinned at {dir} as {pinned}, but the config says {configured}: stop what serves it and remove {dir}, or keep its address in the config"
    )]
    Changed {
        /// The service.
        service: String,
        /// Its pin directory.
        dir: PathBuf,
        /// What the pins record.
        pinned: String,
        /// What the config asks for.
        configured: String,
    },
    /// An I/O operation on a path or socket failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_error(
    action: &'static str,
    path: impl std::fmt::Display,
) -> impl FnOnce(io::Error) -> DaemonError {
    let path = path.to_string();
    move |source| DaemonError::Io {
        action,
        path,
        source,
    }
}

/// Runs the daemon until SIGTERM or SIGINT, then stops every worker and removes the pins.
/// Returns once everything is stopped; an error before any worker started leaves nothing
/// behind.
pub async fn serve(config: Config, options: Options) -> Result<(), DaemonError> {
    bpffs::ensure_dir(&options.bpffs)?;
    Dataplane::check_root(&options.bpffs)?;
    let lock = lock_root(&options.bpffs)?;
    let launches = config
        .services
        .iter()
        .map(|service| {
            Launch::of(service).map_err(|source| DaemonError::Worker {
                service: service.name.clone(),
                slot: 0,
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let control = bind_control(&options.control).await?;
    let metrics = match options.metrics {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(io_error("binding the metrics endpoint on", addr))?,
        ),
        None => None,
    };
    let (events, inbox) = mpsc::unbounded_channel();
    let mut daemon = Daemon {
        root: options.bpffs.clone(),
        config: options.config.clone(),
        services: Vec::new(),
        events: events.clone(),
        stopping: false,
        adopted: false,
        probes: ProbeThread::start()
            .map_err(io_error("starting the probe thread", "portshard-probes"))?,
    };
    if let Err(error) = daemon.start(config, launches) {
        let _ = std::fs::remove_file(&options.control);
        if daemon.adopted {
            error!("leaving the adopted workers running: the kernel keeps steering their flows");
        } else {
            daemon.stop().await;
        }
        return Err(error);
    }
    tokio::spawn(control_server(control, events.clone()));
    if let Some(listener) = metrics {
        tokio::spawn(metrics_server(listener, events.clone()));
    }
    info!(
        bpffs = %options.bpffs.display(),
        control = %options.control.display(),
        metrics = ?options.metrics,
        "portshard is serving"
    );
    daemon.run(inbox).await;
    daemon.stop().await;
    let _ = std::fs::remove_file(&options.control);
    drop(lock);
    info!("portshard stopped");
    Ok(())
}

/// Takes an exclusive lock on the pin root, held until the daemon exits (the kernel drops
/// it even on `kill -9`), so two daemons never manage the same pins.
fn lock_root(root: &Path) -> Result<OwnedFd, DaemonError> {
    let dir = std::fs::File::open(root).map_err(io_error("opening pin root", root.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = io::Error::last_os_error();
        return Err(if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            DaemonError::Locked {
                root: root.to_path_buf(),
            }
        } else {
            io_error("locking pin root", root.display())(error)
        });
    }
    Ok(dir.into())
}

/// Binds the control socket, refusing one another daemon still answers on and replacing
/// one a dead daemon left behind. Only root may connect (checked per connection), and the
/// socket is mode 0600.
async fn bind_control(path: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(io_error("creating control directory", dir.display()))?;
    }
    if UnixStream::connect(path).await.is_ok() {
        return Err(DaemonError::Io {
            action: "binding the control socket",
            path: path.display().to_string(),
            source: io::Error::new(
                io::ErrorKind::AddrInUse,
                "another daemon answers on it: stop it, or use another --control",
            ),
        });
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_error("removing stale control socket", path.display())(e));
        }
        _ => {}
    }
    let listener =
        UnixListener::bind(path).map_err(io_error("binding control socket", path.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_error("restricting control socket", path.display()))?;
    Ok(listener)
}

/// What the state-owning task reacts to.
enum Event {
    /// A worker's pidfd became readable: it ended.
    Exited {
        service: usize,
        slot: Slot,
        pid: u32,
    },
    /// A dead slot's restart delay is over.
    RestartDue { service: usize, slot: Slot },
    /// Reload attempt `attempt` has had its new generation up for its ready delay.
    ReloadReady { service: usize, attempt: u64 },
    /// A worker asked to stop had its stop timeout: SIGKILL it if it still runs.
    StopOverdue {
        service: usize,
        slot: Slot,
        pid: u32,
    },
    /// Time to look at the retiring workers again.
    Tick,
    /// SIGHUP: read the config file again and apply what changed.
    Hangup,
    /// A control request; its replies go back on `reply`, the last one final.
    Control {
        request: Request,
        reply: mpsc::UnboundedSender<Reply>,
    },
    /// A health probe of a worker ended.
    Probed {
        service: usize,
        slot: Slot,
        pid: u32,
        outcome: Outcome,
    },
    /// The metrics endpoint wants a snapshot.
    Scrape { reply: oneshot::Sender<String> },
    /// SIGTERM or SIGINT.
    Stop,
}

/// What a worker is there for.
enum Role {
    /// Takes new work in its service's current generation; restarted when it dies.
    Current,
    /// Of a new generation not switched to yet: its exit rolls the reload back.
    Staged,
    /// Of an old generation, or beyond the configured count: keeps the flows and
    /// connections it has, takes no new ones, is stopped once idle for `drain_idle` or
    /// after `drain_timeout`, and its slot is freed when it exits.
    Retiring(Drain),
}

/// A retiring worker's activity, as last seen.
struct Drain {
    since: Instant,
    idle_since: Instant,
    /// Datagrams delivered to its slot so far (UDP), to notice new ones.
    delivered: u64,
}

impl Drain {
    fn new(delivered: u64) -> Self {
        let now = Instant::now();
        Self {
            since: now,
            idle_since: now,
            delivered,
        }
    }
}

/// One worker process serving a slot.
struct Worker {
    pid: u32,
    pidfd: OwnedFd,
    since: Instant,
    generation: u32,
    role: Role,
    /// Ended by this daemon's request (a stop), so its exit is not a crash.
    stopping: bool,
    /// Its health probe, if the service has one.
    probing: Option<Probing>,
}

impl Worker {
    /// Worker `pid` behind `pidfd` of `generation`, as of now; `stopping` if it was asked to
    /// stop.
    fn new(pid: u32, pidfd: OwnedFd, generation: u32, role: Role, stopping: bool) -> Self {
        Self {
            pid,
            pidfd,
            since: Instant::now(),
            generation,
            role,
            stopping,
            probing: None,
        }
    }
}

/// What a slot of a running service is doing.
enum SlotRun {
    /// A worker serves it.
    Serving(Worker),
    /// Its worker died; a restart is scheduled.
    Waiting,
    /// Its worker crashed too often in a row; it is no longer restarted.
    GaveUp,
}

impl SlotRun {
    /// Whether the slot counts towards its service's current generation.
    fn is_current(&self) -> bool {
        match self {
            Self::Serving(worker) => matches!(worker.role, Role::Current),
            Self::Waiting | Self::GaveUp => true,
        }
    }
}

/// A slot's crash history, kept across its workers.
#[derive(Default, Clone, Copy)]
struct Crashes {
    /// Crashes in a row, each after less than the restart window.
    in_a_row: u32,
    /// Restarts so far.
    restarts: u32,
}

/// How a service's workers are started: the resolved program and identity.
#[derive(Clone)]
struct Launch {
    program: PathBuf,
    credentials: Option<Credentials>,
}

impl Launch {
    /// Resolves `service`'s program on `PATH` and its `user` and `group`.
    fn of(service: &Service) -> Result<Self, ProcessError> {
        Ok(Self {
            program: process::resolve(&service.command[0])?,
            credentials: service
                .run_as
                .as_ref()
                .map(|r| Credentials::lookup(&r.user, r.group.as_deref()))
                .transpose()?,
        })
    }
}

struct Running {
    spec: Service,
    launch: Launch,
    group: Group,
    slots: BTreeMap<Slot, SlotRun>,
    crashes: BTreeMap<Slot, Crashes>,
    /// The generation that takes new work.
    generation: u32,
    /// The reload under way, if any.
    reload: Option<generations::Reload>,
    /// Reloads attempted so far, to tell one attempt's timers from the next one's.
    attempts: u64,
    /// Each probed slot's probe, kept across its workers (so is its source port).
    probers: BTreeMap<Slot, Arc<Prober>>,
    /// Each probed slot's probe outcomes so far, across its workers.
    probe_outcomes: BTreeMap<Slot, OutcomeCounts>,
}

impl Running {
    /// The lowest slot no worker of any generation uses.
    fn free_slot(&self) -> Option<Slot> {
        (0..MAX_SLOTS as Slot).find(|slot| !self.slots.contains_key(slot))
    }
}

struct Daemon {
    root: PathBuf,
    config: Option<PathBuf>,
    services: Vec<Running>,
    events: mpsc::UnboundedSender<Event>,
    stopping: bool,
    /// Whether a previous daemon's state was taken over (a failed start then leaves it be).
    adopted: bool,
    /// Where the health probes run.
    probes: ProbeThread,
}

impl Daemon {
    /// Creates or adopts every service, then starts the missing workers: a service whose
    /// dataplane cannot be loaded stops the start before any worker runs.
    fn start(&mut self, config: Config, launches: Vec<Launch>) -> Result<(), DaemonError> {
        let adoptions = config
            .services
            .into_iter()
            .zip(launches)
            .map(|(spec, launch)| self.add_group(spec, launch))
            .collect::<Result<Vec<_>, _>>()?;
        for (index, adopted) in adoptions.into_iter().enumerate() {
            self.fill(index, adopted)?;
        }
        Ok(())
    }

    /// Creates (or adopts) one service and starts its missing workers.
    fn add_service(&mut self, spec: Service, launch: Launch) -> Result<(), DaemonError> {
        let adopted = self.add_group(spec, launch)?;
        self.fill(self.services.len() - 1, adopted)
    }

    /// Creates (or adopts, if pinned) the dataplane of a service; returns what adoption
    /// found, for [`Daemon::fill`].
    fn add_group(&mut self, spec: Service, launch: Launch) -> Result<Adopted, DaemonError> {
        let pinned = self.root.join(&spec.name).join(names::PROGRAM).exists();
        let (mut group, mut adopted) = if pinned {
            self.adopted = true;
            adopt(&self.root, &spec)?
        } else {
            let mut group = Group::create(&self.root, &spec.name, spec.flow_capacity())?;
            group.record_service(service_record(&spec))?;
            (group, Adopted::default())
        };
        // Probe ports of a previous daemon are closed now, free for anyone to use.
        group.clear_probes()?;
        group.dataplane().set_flags(table_flags(&spec));
        self.services.push(Running {
            spec,
            launch,
            group,
            slots: BTreeMap::new(),
            crashes: std::mem::take(&mut adopted.crashes),
            probers: BTreeMap::new(),
            probe_outcomes: BTreeMap::new(),
            generation: adopted.generation.max(1),
            reload: None,
            attempts: 0,
        });
        Ok(adopted)
    }

    /// Takes over service `index`'s adopted workers, restarts those that died meanwhile and
    /// starts the missing ones.
    fn fill(&mut self, index: usize, adopted: Adopted) -> Result<(), DaemonError> {
        for (slot, worker) in adopted.alive {
            self.serve(index, slot, worker);
        }
        for slot in adopted.dead {
            self.slot_died(index, slot, Duration::ZERO);
        }
        self.resize(index)
    }

    /// Starts or retires current workers until the service has as many as configured.
    fn resize(&mut self, index: usize) -> Result<(), DaemonError> {
        let running = &self.services[index];
        let current: Vec<Slot> = running
            .slots
            .iter()
            .filter(|(_, run)| run.is_current())
            .map(|(&slot, _)| slot)
            .collect();
        let wanted = running.spec.workers as usize;
        for &slot in current.iter().skip(wanted) {
            self.retire(index, slot)?;
        }
        for _ in current.len()..wanted {
            let slot = self.services[index]
                .free_slot()
                .ok_or_else(|| DaemonError::NoFreeSlot {
                    service: self.services[index].spec.name.clone(),
                })?;
            self.start_worker(index, slot)?;
        }
        Ok(())
    }

    /// Handles events until asked to stop.
    async fn run(&mut self, mut inbox: mpsc::UnboundedReceiver<Event>) {
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            error!("cannot install signal handlers; stopping");
            return;
        };
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: stopping workers and removing pins"),
                _ = int.recv() => info!("SIGINT: stopping workers and removing pins"),
            }
            let _ = events.send(Event::Stop);
        });
        let events = self.events.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if events.send(Event::Hangup).is_err() {
                    return;
                }
            }
        });
        let events = self.events.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(generations::TICK);
            loop {
                ticks.tick().await;
                if events.send(Event::Tick).is_err() {
                    return;
                }
            }
        });
        while let Some(event) = inbox.recv().await {
            match event {
                Event::Exited { service, slot, pid } => self.exited(service, slot, pid),
                Event::RestartDue { service, slot } => self.restart(service, slot),
                Event::ReloadReady { service, attempt } => self.reload_ready(service, attempt),
                Event::StopOverdue { service, slot, pid } => self.stop_overdue(service, slot, pid),
                Event::Tick => self.tick(),
                Event::Hangup => self.hangup(),
                Event::Probed {
                    service,
                    slot,
                    pid,
                    outcome,
                } => self.probed(service, slot, pid, outcome),
                Event::Control { request, reply } => self.control(request, reply),
                Event::Scrape { reply } => {
                    let _ = reply.send(metrics::encode_status(
                        &self.status(),
                        &self.probe_outcomes(),
                    ));
                }
                Event::Stop => return,
            }
        }
    }

    /// Starts a worker of the current generation in `slot` and puts it in the table,
    /// getting back the entries the slot had, if it had any.
    fn start_worker(&mut self, index: usize, slot: Slot) -> Result<(), DaemonError> {
        self.launch(index, slot, Role::Current)
    }

    /// Binds a socket for `slot`, starts a worker on it (a staged one with the reload's
    /// command and generation, else the service's), hands the socket to the group (into
    /// the table, or staged), closes the daemon's copy and watches the worker.
    fn launch(&mut self, index: usize, slot: Slot, role: Role) -> Result<(), DaemonError> {
        let running = &mut self.services[index];
        let (spec, launch, generation) = match (&role, &running.reload) {
            (Role::Staged, Some(reload)) => (
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
        let socket = socket::bind_reuseport(spec.proto, spec.listen).map_err(|source| {
            DaemonError::Socket {
                service: spec.name.clone(),
                source,
            }
        })?;
        let spawned = process::spawn(
            &launch.program,
            &spec.command,
            socket.as_fd(),
            &Activation {
                name: &spec.name,
                slot,
            },
            launch.credentials.as_ref(),
        )
        .map_err(|source| DaemonError::Worker {
            service: spec.name.clone(),
            slot,
            source,
        })?;
        let restarts = running.crashes.get(&slot).map_or(0, |c| c.restarts);
        let holder = Holder {
            pid: spawned.pid,
            generation,
            started: process::start_time(spawned.pid).unwrap_or(0),
            restarts,
        };
        let placed = match role {
            Role::Staged => running
                .group
                .stage(slot, socket.as_fd(), spec.weight, holder),
            _ => running
                .group
                .add(slot, socket.as_fd(), spec.weight, holder)
                .map(drop),
        };
        if let Err(error) = placed {
            let _ = process::signal(spawned.pidfd.as_fd(), libc::SIGKILL);
            return Err(error.into());
        }
        drop(socket);
        info!(
            service = %spec.name,
            slot,
            pid = spawned.pid,
            generation,
            restarts,
            staged = matches!(role, Role::Staged),
            "worker started"
        );
        let worker = Worker::new(spawned.pid, spawned.pidfd, generation, role, false);
        self.serve(index, slot, worker);
        Ok(())
    }

    /// Records `worker` as serving `slot`, watches for its exit and, if the service has a
    /// probe and the worker is not being stopped, starts probing it.
    fn serve(&mut self, index: usize, slot: Slot, mut worker: Worker) {
        self.watch(index, slot, &worker);
        if !worker.stopping {
            let staged = matches!(worker.role, Role::Staged);
            worker.probing = self.probe(index, slot, worker.pid, staged);
        }
        self.services[index]
            .slots
            .insert(slot, SlotRun::Serving(worker));
    }

    /// Sends `event` to this task after `delay`.
    fn after(&self, delay: Duration, event: Event) {
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(event);
        });
    }

    /// Sends [`Event::Exited`] when `worker` ends.
    fn watch(&self, service: usize, slot: Slot, worker: &Worker) {
        let events = self.events.clone();
        let pid = worker.pid;
        let fd = match exit_watch(&worker.pidfd) {
            Ok(fd) => fd,
            Err(e) => {
                error!(pid, error = %e, "cannot watch worker; treating it as dead");
                let _ = events.send(Event::Exited { service, slot, pid });
                return;
            }
        };
        tokio::spawn(async move {
            let _ = fd.readable().await;
            let _ = events.send(Event::Exited { service, slot, pid });
        });
    }

    /// A worker ended. A current worker's slot is healed (its entries go to their heirs)
    /// and restarted; a retiring worker's slot is freed; a staged worker's exit rolls its
    /// reload back.
    fn exited(&mut self, index: usize, slot: Slot, pid: u32) {
        let running = &mut self.services[index];
        let Some(SlotRun::Serving(worker)) = running.slots.get(&slot) else {
            return;
        };
        if worker.pid != pid {
            return;
        }
        let exit = process::reap(worker.pidfd.as_fd())
            .ok()
            .flatten()
            .unwrap_or(Exit::Unknown);
        let lived = worker.since.elapsed();
        let stopping = worker.stopping;
        let generation = worker.generation;
        match worker.role {
            Role::Current => {}
            Role::Staged => {
                running.slots.remove(&slot);
                self.release(index, slot);
                if !stopping && !self.stopping {
                    let reason = format!(
                        "the worker in slot {slot} (pid {pid}) ended ({exit}) {} ms after it started",
                        lived.as_millis()
                    );
                    self.rollback(index, &reason);
                }
                return;
            }
            Role::Retiring(_) => {
                info!(service = %running.spec.name, slot, pid, generation, %exit, "old worker exited; its slot is free");
                running.slots.remove(&slot);
                self.release(index, slot);
                return;
            }
        }
        let entries = running
            .group
            .table()
            .counts()
            .get(&slot)
            .copied()
            .unwrap_or(0);
        if stopping || self.stopping {
            info!(service = %running.spec.name, slot, pid, %exit, "worker stopped");
        } else {
            warn!(
                service = %running.spec.name,
                slot,
                pid,
                %exit,
                lived_ms = lived.as_millis() as u64,
                entries,
                "worker died; its entries go to their heirs"
            );
        }
        if let Err(error) = running.group.remove(slot) {
            error!(service = %running.spec.name, slot, %error, "cannot take the dead slot out of the table");
        }
        if stopping || self.stopping {
            running.slots.remove(&slot);
            return;
        }
        self.slot_died(index, slot, lived);
    }

    /// Frees `slot` of service `index` for good (see [`Group::release`]).
    fn release(&mut self, index: usize, slot: Slot) {
        let running = &mut self.services[index];
        running.crashes.remove(&slot);
        if let Err(error) = running.group.release(slot) {
            error!(service = %running.spec.name, slot, %error, "cannot free the slot");
        }
    }

    /// Records a crash of `slot` (whose worker lived `lived`) and schedules its restart,
    /// or gives up on a crash loop.
    fn slot_died(&mut self, index: usize, slot: Slot, lived: Duration) {
        let running = &mut self.services[index];
        let policy = running.spec.restart;
        let crashes = running.crashes.entry(slot).or_default();
        if lived >= policy.window {
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
        let doublings = (crashes.in_a_row - 1).min(20);
        let delay = policy
            .delay
            .saturating_mul(1 << doublings)
            .min(policy.delay_max);
        let delay = if lived == Duration::ZERO && crashes.in_a_row == 1 {
            Duration::ZERO
        } else {
            delay
        };
        running.slots.insert(slot, SlotRun::Waiting);
        self.after(
            delay,
            Event::RestartDue {
                service: index,
                slot,
            },
        );
    }

    /// A restart delay is over: start the slot's replacement worker.
    fn restart(&mut self, index: usize, slot: Slot) {
        if self.stopping {
            return;
        }
        let running = &mut self.services[index];
        // The slot may have been freed (its generation replaced) and taken again since.
        if !matches!(running.slots.get(&slot), Some(SlotRun::Waiting)) {
            return;
        }
        running.slots.remove(&slot);
        running.crashes.entry(slot).or_default().restarts += 1;
        if let Err(error) = self.start_worker(index, slot) {
            error!(service = %self.services[index].spec.name, slot, %error, "restarting the worker failed");
            self.slot_died(index, slot, Duration::from_nanos(1));
        }
    }

    /// Answers a control request on `reply`; a refused one changes nothing. A reload
    /// answers when its new generation is switched to or rolled back.
    fn control(&mut self, request: Request, reply: mpsc::UnboundedSender<Reply>) {
        let result = match request {
            Request::Ping => Ok(Reply::Done {
                message: format!(
                    "portshard daemon pid {} serves {} services",
                    std::process::id(),
                    self.services.len()
                ),
                moved: 0,
            }),
            Request::Drain { service, slot } => self.drain(&service, slot),
            Request::Weight {
                service,
                slot,
                weight,
            } => self.weight(&service, slot, weight),
            Request::Reload { service } => match self.reload_request(&service, reply.clone()) {
                // The reload replies itself, as it goes.
                Ok(()) => return,
                Err(message) => Err(message),
            },
        };
        let _ = reply.send(result.unwrap_or_else(|message| Reply::Error { message }));
    }

    fn find(&mut self, service: &str) -> Result<&mut Running, String> {
        let names: Vec<&str> = self.services.iter().map(|s| s.spec.name.as_str()).collect();
        let message = format!(
            "no service {service:?}: this daemon serves {}",
            names.join(", ")
        );
        self.services
            .iter_mut()
            .find(|s| s.spec.name == service)
            .ok_or(message)
    }

    fn slot_state(running: &Running, slot: Slot) -> Result<SlotState, String> {
        let pid = match running.slots.get(&slot) {
            Some(SlotRun::Serving(worker)) if matches!(worker.role, Role::Current) => worker.pid,
            Some(SlotRun::Serving(worker)) => {
                return Err(format!(
                    "service {} slot {slot} (pid {}) belongs to generation {}, which is {} generation {}: only the current generation's slots can be drained or weighted",
                    running.spec.name,
                    worker.pid,
                    worker.generation,
                    if matches!(worker.role, Role::Staged) {
                        "starting to replace"
                    } else {
                        "replaced by"
                    },
                    running.generation
                ));
            }
            _ => {
                return Err(format!(
                    "service {} slot {slot} has no running worker: `portshard status` lists its slots",
                    running.spec.name
                ));
            }
        };
        let meta = running
            .group
            .dataplane()
            .meta(slot)
            .map_err(|e| e.to_string())?;
        SlotState::from_raw(meta.state).ok_or_else(|| {
            format!(
                "slot {slot} (pid {pid}) has an unknown state {}",
                meta.state
            )
        })
    }

    fn drain(&mut self, service: &str, slot: Slot) -> Result<Reply, String> {
        let running = self.find(service)?;
        match Self::slot_state(running, slot)? {
            SlotState::Draining => {
                Err(format!("service {service} slot {slot} is already draining"))
            }
            _ if running.group.table().members().len() == 1 => Err(format!(
                "service {service} slot {slot} is the only slot taking new work; draining it would leave none"
            )),
            _ => {
                let delta = running.group.drain(slot).map_err(|e| e.to_string())?;
                info!(service, slot, moved = delta.moved, "slot drained");
                Ok(Reply::Done {
                    message: format!(
                        "service {service} slot {slot} drained: {} entries moved to their heirs; its worker keeps its established connections. `portshard weight {service} {slot} W` puts it back",
                        delta.moved
                    ),
                    moved: delta.moved,
                })
            }
        }
    }

    fn weight(&mut self, service: &str, slot: Slot, weight: u32) -> Result<Reply, String> {
        let running = self.find(service)?;
        let state = Self::slot_state(running, slot)?;
        let delta = if state == SlotState::Draining {
            running.group.admit(slot, weight)
        } else {
            running.group.set_weight(slot, weight)
        }
        .map_err(|e| e.to_string())?;
        info!(service, slot, weight, moved = delta.moved, "weight set");
        Ok(Reply::Done {
            message: format!(
                "service {service} slot {slot} has weight {weight}: {} entries moved",
                delta.moved
            ),
            moved: delta.moved,
        })
    }

    /// What `status` would print, from the daemon's open handles.
    fn status(&self) -> StatusReport {
        StatusReport {
            services: self
                .services
                .iter()
                .filter_map(|s| s.group.dataplane().status().ok())
                .collect(),
        }
    }

    /// Stops every worker (SIGTERM, then SIGKILL after the service's stop timeout), waits
    /// for each through its pidfd, and removes the pins.
    async fn stop(&mut self) {
        self.stopping = true;
        let mut waiting = Vec::new();
        for (index, running) in self.services.iter_mut().enumerate() {
            let deadline = tokio::time::Instant::now() + running.spec.stop_timeout;
            for (&slot, run) in &mut running.slots {
                let SlotRun::Serving(worker) = run else {
                    continue;
                };
                worker.stopping = true;
                if let Err(e) = process::signal(worker.pidfd.as_fd(), libc::SIGTERM) {
                    warn!(service = %running.spec.name, slot, pid = worker.pid, error = %e, "cannot send SIGTERM");
                }
                match exit_watch(&worker.pidfd) {
                    Ok(fd) => waiting.push((index, slot, worker.pid, deadline, fd)),
                    Err(e) => warn!(pid = worker.pid, error = %e, "cannot wait for worker"),
                }
            }
        }
        for (index, slot, pid, deadline, fd) in waiting {
            if tokio::time::timeout_at(deadline, fd.readable())
                .await
                .is_err()
            {
                warn!(service = %self.services[index].spec.name, slot, pid, "worker ignored SIGTERM; sending SIGKILL");
                let _ = process::signal(fd.get_ref().as_fd(), libc::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(5), fd.readable()).await;
            }
            self.exited(index, slot, pid);
        }
        for running in &self.services {
            if let Err(error) = Dataplane::remove_pins(&self.root, &running.spec.name) {
                error!(service = %running.spec.name, %error, "cannot remove pins");
            }
        }
    }
}

/// Registers a copy of `pidfd` with the reactor, so its worker's exit can be awaited: a
/// pidfd becomes readable when its process ends.
fn exit_watch(pidfd: &OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    let fd = pidfd.try_clone()?;
    // SAFETY: `fd` is an `OwnedFd`, so it stays open and refers to the same pidfd until the
    // `AsyncFd` drops it.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

/// The table's switches for `spec` (see [`portshard_common::TABLE_FLOWS`] and
/// [`portshard_common::TABLE_PROBES`]).
fn table_flags(spec: &Service) -> u32 {
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
    flows | probes
}

/// The pinned record of `spec`.
fn service_record(spec: &Service) -> portshard_common::ServiceMeta {
    let proto = match spec.proto {
        Proto::Udp => PROTO_UDP,
        Proto::Tcp => PROTO_TCP,
    };
    report::service_meta(
        spec.listen,
        proto,
        u32::from(spec.mode == Mode::Handover),
        spec.flow_capacity(),
    )
}

/// What adoption found: workers still running, slots whose workers died while no daemon
/// watched, and crash histories.
#[derive(Default)]
struct Adopted {
    alive: Vec<(Slot, Worker)>,
    dead: Vec<Slot>,
    crashes: BTreeMap<Slot, Crashes>,
    /// The generation that takes new work (0 if none was recorded).
    generation: u32,
}

/// Takes over the pinned state of `spec` left by a previous daemon: the workers its
/// records name that still run (same pid and start time) are kept with every entry they
/// own, and an old generation's go on draining; slots whose workers died meanwhile are
/// taken out of the table (their flows already go to the heirs) and restarted; a reload
/// the previous daemon left halfway is rolled back.
fn adopt(root: &Path, spec: &Service) -> Result<(Group, Adopted), DaemonError> {
    let dataplane = Dataplane::open(root, &spec.name)?;
    let pinned = dataplane.service()?;
    let configured = service_record(spec);
    if pinned != configured {
        return Err(DaemonError::Changed {
            service: spec.name.clone(),
            dir: dataplane.dir().to_path_buf(),
            pinned: describe(&pinned),
            configured: describe(&configured),
        });
    }
    let entries = dataplane.read_entries();
    let mut owns = vec![false; MAX_SLOTS as usize];
    entries
        .iter()
        .filter(|e| u32::from(e.owner) < MAX_SLOTS)
        .for_each(|e| owns[usize::from(e.owner)] = true);
    let metas: Vec<SlotMeta> = (0..MAX_SLOTS as Slot)
        .map(|slot| dataplane.meta(slot))
        .collect::<Result<_, _>>()?;
    drop(dataplane);
    let members: Vec<(Slot, u32)> = metas
        .iter()
        .enumerate()
        .filter(|&(slot, meta)| owns[slot] || meta.state == SlotState::Live as u32)
        .map(|(slot, meta)| (slot as Slot, meta.weight.max(1)))
        .collect();
    let (mut group, rebuilt) = Group::adopt(root, &spec.name, &members)?;
    if let Some(reason) = rebuilt {
        warn!(service = %spec.name, %reason, "rebuilt the table from scratch; some flows moved");
    }
    // The current generation: the newest with live slots (else with any recorded slot).
    let newest = |states: &[SlotState]| {
        metas
            .iter()
            .filter(|m| SlotState::from_raw(m.state).is_some_and(|s| states.contains(&s)))
            .map(|m| m.generation)
            .max()
    };
    let generation = newest(&[SlotState::Live])
        .or_else(|| newest(&[SlotState::Dead, SlotState::Draining]))
        .unwrap_or(1);
    let mut adopted = Adopted {
        generation,
        ..Adopted::default()
    };
    for (slot, meta) in metas.iter().enumerate() {
        let slot = slot as Slot;
        let Some(state) = SlotState::from_raw(meta.state).filter(|&s| s != SlotState::Free) else {
            continue;
        };
        adopted.crashes.insert(
            slot,
            Crashes {
                in_a_row: 0,
                restarts: meta.restarts,
            },
        );
        let recorded = matches!(
            state,
            SlotState::Live | SlotState::Draining | SlotState::Starting
        );
        let alive = recorded.then(|| alive(meta)).flatten();
        let worker =
            |pidfd, role, stopping| Worker::new(meta.pid, pidfd, meta.generation, role, stopping);
        let old = meta.generation < generation;
        match (state, alive) {
            (SlotState::Starting, Some(pidfd)) => {
                warn!(service = %spec.name, slot, pid = meta.pid, generation = meta.generation, "a reload was under way when the previous daemon stopped; stopping its new worker");
                let _ = process::signal(pidfd.as_fd(), libc::SIGKILL);
                group.release(slot)?;
                adopted
                    .alive
                    .push((slot, worker(pidfd, Role::Staged, true)));
            }
            (SlotState::Starting, None) => group.release(slot)?,
            (_, Some(pidfd)) if old => {
                info!(service = %spec.name, slot, pid = meta.pid, generation = meta.generation, "adopted an old generation's worker; it goes on draining");
                adopted
                    .alive
                    .push((slot, worker(pidfd, Role::Retiring(Drain::new(0)), false)));
            }
            (_, Some(pidfd)) => {
                info!(service = %spec.name, slot, pid = meta.pid, "adopted running worker");
                adopted
                    .alive
                    .push((slot, worker(pidfd, Role::Current, false)));
            }
            (_, None) if old => group.release(slot)?,
            (_, None) if recorded || group.table().members().contains_key(&slot) => {
                warn!(service = %spec.name, slot, pid = meta.pid, "worker died while no daemon ran; its entries go to their heirs");
                group.remove(slot)?;
                adopted.dead.push(slot);
            }
            (_, None) => {}
        }
    }
    Ok((group, adopted))
}

/// A pidfd on the process `meta` records, if that very process (same start time) runs.
fn alive(meta: &SlotMeta) -> Option<OwnedFd> {
    let pidfd = process::pidfd_open(meta.pid).ok()?;
    (process::start_time(meta.pid).ok()? == meta.started).then_some(pidfd)
}

fn describe(meta: &portshard_common::ServiceMeta) -> String {
    let proto = if meta.proto == PROTO_TCP {
        "tcp"
    } else {
        "udp"
    };
    let mode = if meta.mode == 1 {
        "handover"
    } else {
        "balance"
    };
    let flows = match meta.flow_table {
        0 => String::new(),
        n => format!(", flow table of {n}"),
    };
    format!("{proto} {} ({mode}{flows})", listen_address(meta))
}

/// Accepts control connections: root only, one request per line.
async fn control_server(listener: UnixListener, events: mpsc::UnboundedSender<Event>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let events = events.clone();
        tokio::spawn(async move {
            if let Err(error) = control_connection(stream, events).await {
                warn!(%error, "control connection failed");
            }
        });
    }
}

async fn control_connection(
    stream: UnixStream,
    events: mpsc::UnboundedSender<Event>,
) -> io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    // A peer that is not root gets its requests read (so it sees the refusal rather than a
    // broken pipe) and each refused; nothing reaches the daemon.
    let refusal = (uid != 0).then(|| {
        warn!(uid, "control connection refused: not root");
        format!("permission denied: uid {uid} is not root; only root may control portshard")
    });
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut lines)
            .take(control::MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let too_long = line.last() != Some(&b'\n') && line.len() > control::MAX_REQUEST;
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        let decoded = match &refusal {
            Some(message) => Err(message.clone()),
            None if too_long => Err(control::ProtocolError::TooLong.to_string()),
            None => control::decode_request(&line).map_err(|error| error.to_string()),
        };
        let reply = match decoded {
            Err(message) => Reply::Error { message },
            Ok(request) => {
                let (tx, mut rx) = mpsc::unbounded_channel();
                if events.send(Event::Control { request, reply: tx }).is_err() {
                    return Ok(());
                }
                // Progress replies go out as they come; the final one ends the request.
                loop {
                    let reply = rx.recv().await.unwrap_or(Reply::Error {
                        message: "the daemon is stopping".to_owned(),
                    });
                    if reply.is_final() {
                        break reply;
                    }
                    write.write_all(&control::encode_reply(&reply)).await?;
                }
            }
        };
        write.write_all(&control::encode_reply(&reply)).await?;
        if too_long || refusal.is_some() {
            return Ok(());
        }
    }
}

/// Serves `GET /metrics` in the OpenMetrics text format.
async fn metrics_server(listener: TcpListener, events: mpsc::UnboundedSender<Event>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let events = events.clone();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buffer = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buffer[..n]),
                }
            }
            let wanted = head.starts_with(b"GET /metrics ") || head.starts_with(b"GET / ");
            let (status, body) = if wanted {
                let (tx, rx) = oneshot::channel();
                let _ = events.send(Event::Scrape { reply: tx });
                ("200 OK", rx.await.unwrap_or_default())
            } else {
                ("404 Not Found", "only GET /metrics is served\n".to_owned())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}
