//! `portshard serve`: runs the configured services. For each, it creates (or adopts) the
//! pinned dataplane, starts `workers` copies of the command by socket activation, learns
//! of each worker's death through its pidfd, heals the table (the dead slot's entries go
//! to the heirs the kernel already sends them to) and restarts the worker with backoff,
//! giving it its entries back. A restarted daemon adopts the running workers and the pinned
//! state without moving a flow.
//!
//! Everything that changes state happens on one task, in the order events arrive; the
//! other tasks only watch pidfds, timers and sockets and send it events.
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
    probe::{Tracker, Verdict},
    prober::Prober,
    process::{self, Activation, Credentials, Exit, ProcessError},
    report::{self, PROTO_TCP, PROTO_UDP, StatusReport, listen_address},
    socket::{self, Proto, SocketError},
    table::Slot,
};

/// Where the daemon keeps its state and listens.
#[derive(Clone, Debug)]
pub struct Options {
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
    let programs = config
        .services
        .iter()
        .map(|service| {
            let credentials = service
                .run_as
                .as_ref()
                .map(|r| Credentials::lookup(&r.user, r.group.as_deref()))
                .transpose();
            let program = process::resolve(&service.command[0]);
            program
                .and_then(|program| {
                    Ok(Launch {
                        program,
                        credentials: credentials?,
                    })
                })
                .map_err(|source| DaemonError::Worker {
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
        services: Vec::new(),
        events: events.clone(),
        stopping: false,
        adopted: false,
    };
    if let Err(error) = daemon.start(config, programs) {
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
    /// A control request; the reply goes back on `reply`.
    Control {
        request: Request,
        reply: oneshot::Sender<Reply>,
    },
    /// A health probe of a worker ended.
    Probed {
        service: usize,
        slot: Slot,
        pid: u32,
        answered: bool,
    },
    /// The metrics endpoint wants a snapshot.
    Scrape { reply: oneshot::Sender<String> },
    /// SIGTERM or SIGINT.
    Stop,
}

/// One worker process serving a slot.
struct Worker {
    pid: u32,
    pidfd: OwnedFd,
    since: Instant,
    /// Ended by this daemon's request (a stop), so its exit is not a crash.
    stopping: bool,
    /// Its health probe, if the service has one.
    probing: Option<Probing>,
}

impl Worker {
    /// Worker `pid` behind `pidfd`, as of now; `stopping` if it was asked to stop.
    fn new(pid: u32, pidfd: OwnedFd, stopping: bool) -> Self {
        Self {
            pid,
            pidfd,
            since: Instant::now(),
            stopping,
            probing: None,
        }
    }
}

/// A worker's health probe: the task that probes it and the verdict so far.
struct Probing {
    tracker: Tracker,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Probing {
    /// The probe ends with the worker it checks.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a slot of a running service is doing.
enum SlotRun {
    /// A worker serves it (live or draining, as its record says).
    Serving(Worker),
    /// Its worker died; a restart is scheduled.
    Waiting,
    /// Its worker crashed too often in a row; it is no longer restarted.
    GaveUp,
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
struct Launch {
    program: PathBuf,
    credentials: Option<Credentials>,
}

struct Running {
    spec: Service,
    launch: Launch,
    group: Group,
    slots: BTreeMap<Slot, SlotRun>,
    crashes: BTreeMap<Slot, Crashes>,
    /// Each probed slot's probe, kept across its workers (so is its source port).
    probers: BTreeMap<Slot, Arc<Prober>>,
}

struct Daemon {
    root: PathBuf,
    services: Vec<Running>,
    events: mpsc::UnboundedSender<Event>,
    stopping: bool,
    /// Whether a previous daemon's state was taken over (a failed start then leaves it be).
    adopted: bool,
}

impl Daemon {
    /// Creates or adopts every service, then starts the missing workers: a service whose
    /// dataplane cannot be loaded stops the start before any worker runs.
    fn start(&mut self, config: Config, launches: Vec<Launch>) -> Result<(), DaemonError> {
        let mut adoptions = Vec::new();
        for (spec, launch) in config.services.into_iter().zip(launches) {
            let pinned = self.root.join(&spec.name).join(names::PROGRAM).exists();
            let (mut group, adopted) = if pinned {
                self.adopted = true;
                adopt(&self.root, &spec)?
            } else {
                let mut group = Group::create(&self.root, &spec.name)?;
                group.record_service(service_record(&spec))?;
                (group, Adopted::default())
            };
            // Probe ports of a previous daemon are closed now, free for anyone to use.
            group.clear_probes()?;
            self.services.push(Running {
                spec,
                launch,
                group,
                slots: BTreeMap::new(),
                crashes: adopted.crashes,
                probers: BTreeMap::new(),
            });
            adoptions.push((adopted.alive, adopted.dead));
        }
        for (index, (alive, dead)) in adoptions.into_iter().enumerate() {
            for (slot, worker) in alive {
                self.serve(index, slot, worker);
            }
            for slot in dead {
                self.slot_died(index, slot, Duration::ZERO);
            }
            let workers = self.services[index].spec.workers as Slot;
            for slot in 0..workers {
                if !self.services[index].slots.contains_key(&slot) {
                    self.start_worker(index, slot)?;
                }
            }
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
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                warn!(
                    "SIGHUP ignored: this portshard has no config reload; restart the daemon to apply a new config (workers and flows are kept)"
                );
            }
        });
        while let Some(event) = inbox.recv().await {
            match event {
                Event::Exited { service, slot, pid } => self.exited(service, slot, pid),
                Event::RestartDue { service, slot } => self.restart(service, slot),
                Event::Probed {
                    service,
                    slot,
                    pid,
                    answered,
                } => self.probed(service, slot, pid, answered),
                Event::Control { request, reply } => {
                    let _ = reply.send(self.control(request));
                }
                Event::Scrape { reply } => {
                    let _ = reply.send(metrics::encode_status(&self.status()));
                }
                Event::Stop => return,
            }
        }
    }

    /// Binds a socket for `slot`, starts a worker on it, puts it in the table (getting
    /// back the entries the slot had, if it had any) and closes the daemon's copy.
    fn start_worker(&mut self, index: usize, slot: Slot) -> Result<(), DaemonError> {
        let running = &mut self.services[index];
        let spec = &running.spec;
        let socket = socket::bind_reuseport(spec.proto, spec.listen).map_err(|source| {
            DaemonError::Socket {
                service: spec.name.clone(),
                source,
            }
        })?;
        let worker_error = |source| DaemonError::Worker {
            service: spec.name.clone(),
            slot,
            source,
        };
        let spawned = process::spawn(
            &running.launch.program,
            &spec.command,
            socket.as_fd(),
            &Activation {
                name: &spec.name,
                slot,
            },
            running.launch.credentials.as_ref(),
        )
        .map_err(worker_error)?;
        let restarts = running.crashes.get(&slot).map_or(0, |c| c.restarts);
        let holder = Holder {
            pid: spawned.pid,
            generation: 1,
            started: process::start_time(spawned.pid).unwrap_or(0),
            restarts,
        };
        if let Err(error) = running.group.add(slot, socket.as_fd(), spec.weight, holder) {
            let _ = process::signal(spawned.pidfd.as_fd(), libc::SIGKILL);
            return Err(error.into());
        }
        drop(socket);
        info!(
            service = %spec.name,
            slot,
            pid = spawned.pid,
            restarts,
            "worker started"
        );
        self.serve(index, slot, Worker::new(spawned.pid, spawned.pidfd, false));
        Ok(())
    }

    /// Records `worker` as serving `slot`, watches for its exit and, if the service has a
    /// probe and the worker is not being stopped, starts probing it.
    fn serve(&mut self, index: usize, slot: Slot, mut worker: Worker) {
        self.watch(index, slot, &worker);
        if !worker.stopping {
            worker.probing = self.probe(index, slot, worker.pid);
        }
        self.services[index]
            .slots
            .insert(slot, SlotRun::Serving(worker));
    }

    /// Starts probing worker `pid` of `slot` every interval, binding the slot's probe port
    /// and steering it to the slot the first time.
    fn probe(&mut self, index: usize, slot: Slot, pid: u32) -> Option<Probing> {
        let running = &mut self.services[index];
        let spec = running.spec.probe.clone()?;
        let prober = match running.probers.get(&slot) {
            Some(prober) => Arc::clone(prober),
            None => {
                let bound = Prober::bind(&spec.kind, running.spec.listen, spec.timeout)
                    .map_err(|e| e.to_string())
                    .and_then(|prober| {
                        running
                            .group
                            .set_probe(prober.port(), slot)
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
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(spec.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is immediate: give the worker an interval to start.
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let answered = prober.check(pid).await;
                let event = Event::Probed {
                    service: index,
                    slot,
                    pid,
                    answered,
                };
                if events.send(event).is_err() {
                    return;
                }
            }
        });
        Some(Probing { tracker, task })
    }

    /// A probe of worker `pid` ended: records it, and kills a worker that failed as many
    /// probes in a row as allowed (its entries go to their heirs; it is restarted).
    fn probed(&mut self, index: usize, slot: Slot, pid: u32, answered: bool) {
        let running = &mut self.services[index];
        let Some(SlotRun::Serving(worker)) = running.slots.get_mut(&slot) else {
            return;
        };
        let Some(probing) = worker.probing.as_mut().filter(|_| worker.pid == pid) else {
            return;
        };
        let was_failing = probing.tracker.health().failures > 0;
        let verdict = probing.tracker.record(answered);
        if let Err(error) = running.group.set_health(slot, probing.tracker.health()) {
            warn!(service = %running.spec.name, slot, %error, "cannot record the probe state");
        }
        let name = &running.spec.name;
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

    /// A worker ended: heal the table and schedule its restart.
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
        if stopping || self.stopping || slot as u32 >= running.spec.workers {
            running.slots.remove(&slot);
            return;
        }
        self.slot_died(index, slot, lived);
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
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(Event::RestartDue {
                service: index,
                slot,
            });
        });
    }

    /// A restart delay is over: start the slot's replacement worker.
    fn restart(&mut self, index: usize, slot: Slot) {
        if self.stopping {
            return;
        }
        let running = &mut self.services[index];
        let Some(SlotRun::Waiting) = running.slots.remove(&slot) else {
            return;
        };
        running.crashes.entry(slot).or_default().restarts += 1;
        if let Err(error) = self.start_worker(index, slot) {
            error!(service = %self.services[index].spec.name, slot, %error, "restarting the worker failed");
            self.slot_died(index, slot, Duration::from_nanos(1));
        }
    }

    /// Answers a control request; a refused one changes nothing.
    fn control(&mut self, request: Request) -> Reply {
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
        };
        result.unwrap_or_else(|message| Reply::Error { message })
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
            Some(SlotRun::Serving(worker)) => worker.pid,
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
            running.group.undrain(slot, weight)
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

/// The pinned record of `spec`.
fn service_record(spec: &Service) -> portshard_common::ServiceMeta {
    let proto = match spec.proto {
        Proto::Udp => PROTO_UDP,
        Proto::Tcp => PROTO_TCP,
    };
    report::service_meta(spec.listen, proto, u32::from(spec.mode == Mode::Handover))
}

/// What adoption found: workers still running, slots whose workers died while no daemon
/// watched, and crash histories.
#[derive(Default)]
struct Adopted {
    alive: Vec<(Slot, Worker)>,
    dead: Vec<Slot>,
    crashes: BTreeMap<Slot, Crashes>,
}

/// Takes over the pinned state of `spec` left by a previous daemon: the workers its
/// records name that still run (same pid and start time) are kept with every entry they
/// own; slots whose workers died meanwhile are taken out of the table (their flows already
/// go to the heirs) and restarted.
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
    let mut adopted = Adopted::default();
    for (slot, meta) in metas.iter().enumerate() {
        let slot = slot as Slot;
        let state = SlotState::from_raw(meta.state);
        if meta.state != SlotState::Free as u32 {
            adopted.crashes.insert(
                slot,
                Crashes {
                    in_a_row: 0,
                    restarts: meta.restarts,
                },
            );
        }
        let recorded = matches!(state, Some(SlotState::Live | SlotState::Draining));
        let alive = recorded.then(|| alive(meta)).flatten();
        match alive {
            Some(pidfd) if u32::from(slot) < spec.workers => {
                info!(service = %spec.name, slot, pid = meta.pid, "adopted running worker");
                adopted
                    .alive
                    .push((slot, Worker::new(meta.pid, pidfd, false)));
            }
            Some(pidfd) => {
                info!(service = %spec.name, slot, pid = meta.pid, "stopping a worker beyond the configured count");
                if group.table().members().contains_key(&slot) {
                    group.drain(slot)?;
                }
                let _ = process::signal(pidfd.as_fd(), libc::SIGTERM);
                adopted
                    .alive
                    .push((slot, Worker::new(meta.pid, pidfd, true)));
            }
            None if recorded || group.table().members().contains_key(&slot) => {
                warn!(service = %spec.name, slot, pid = meta.pid, "worker died while no daemon ran; its entries go to their heirs");
                group.remove(slot)?;
                if u32::from(slot) < spec.workers {
                    adopted.dead.push(slot);
                }
            }
            None => {}
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
    format!("{proto} {} ({mode})", listen_address(meta))
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
                let (tx, rx) = oneshot::channel();
                if events.send(Event::Control { request, reply: tx }).is_err() {
                    return Ok(());
                }
                rx.await.unwrap_or(Reply::Error {
                    message: "the daemon is stopping".to_owned(),
                })
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
