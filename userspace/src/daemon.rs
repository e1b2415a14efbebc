//! `portshard serve`: runs the configured services. For each, it creates (or adopts) the
//! pinned dataplane, starts `workers` copies of the command by socket activation, learns
//! of each worker's death through its pidfd, heals the table (the dead slot's entries go
//! to the heirs the kernel already sends them to) and restarts the worker with backoff,
//! giving it its entries back. A restarted daemon adopts the running workers and the pinned
//! state without moving a flow. Every worker belongs to a generation: `portshard reload`
//! (and SIGHUP) starts a new one and switches new work to it once it is ready.
//!
//! The decisions are [`crate::supervisor`]'s, a state machine without I/O; this module is
//! its shell ([`shell`]): one task turns pidfds, timers, signals and requests into events
//! and carries out the actions, in the order events arrive; the other tasks only watch
//! and forward.
mod accept;
mod control_socket;
mod metrics_http;
mod notify;
mod pins;
mod probes;
mod shell;
mod sweeper;
mod upgrade;

pub use upgrade::go_back;

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use portshard_common::{MAX_SLOTS, PIN_LAYOUT};
use tokio::{
    net::{TcpListener, UnixListener, UnixStream},
    sync::mpsc,
};
use tracing::{error, info};

use crate::{
    bpffs::{self, BpffsError},
    config::{Config, ConfigError, Service},
    dataplane::{Dataplane, DataplaneError},
    group::GroupError,
    handover::Handover,
    ownership::AddressInUse,
    process::{self, Credentials, ProcessError},
    socket::SocketError,
    table::Slot,
};
use probes::ProbeThread;
use shell::Shell;
use upgrade::Handles;

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
    /// What the previous image handed over, when this one was executed by `portshard
    /// upgrade` (see [`crate::handover`]).
    pub handover: Option<Handover>,
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
    /// Programs or accounts of the config could not be found; nothing was started.
    #[error("cannot run the configured workers; nothing was started:\n  {}", problems.join("\n  "))]
    Unlaunchable {
        /// One line per service whose program or account is missing.
        problems: Vec<String>,
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
    /// Something else already listens on a service's address: its group would be shared.
    #[error(transparent)]
    InUse(#[from] AddressInUse),
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
    /// The service was taken out of the config and its group is gone.
    #[error("service {service} was taken out of the config: no worker starts for it")]
    Removed {
        /// The service.
        service: String,
    },
    /// A new program could not be attached: no running worker's socket was reachable.
    #[error(
        "service {service}: cannot attach this build's program to the group: none of its running workers (pids {pids:?}) holds the socket recorded for its slot, or it cannot be reached (pidfd_getfd); the pinned program keeps steering. Check that the daemon runs as root and no security module forbids pidfd_getfd"
    )]
    Unreachable {
        /// The service.
        service: String,
        /// Its running workers.
        pids: Vec<u32>,
    },
    /// The config needs more open files than the daemon may hold; nothing was started.
    #[error(
        "the configured services need {needed} open files (listening sockets and pidfds of every worker, twice over during a reload, and each service's maps), but the limit is {soft} (hard {hard}) and raising it failed: {source}; raise it (systemd: LimitNOFILE={needed} in the unit; a shell: ulimit -Hn {needed}) or run fewer workers; nothing was started"
    )]
    OpenFiles {
        /// Open files the config needs.
        needed: u64,
        /// The soft limit found.
        soft: u64,
        /// The hard limit found.
        hard: u64,
        /// Why raising failed.
        #[source]
        source: io::Error,
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
    // Limits, programs and accounts first: a typo there is found before anything is made.
    raise_open_files(config.open_files_needed())?;
    let services = resolve(config)?;
    let made = Made::before(&options);
    let result = serve_resolved(services, &options).await;
    made.remove_if_empty();
    result
}

/// Raises the open-file limit to `needed` (the config's [`Config::open_files_needed`]), the
/// hard limit too if it is lower and the daemon may (root with `CAP_SYS_RESOURCE`); refuses
/// to start, naming the numbers, if it may not: a worker spawned past the limit would fail
/// halfway, with some services up and others not.
fn raise_open_files(needed: u64) -> Result<(), DaemonError> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_none_or(|soft| soft >= needed) {
        return Ok(());
    }
    let mut raised = limit;
    raised.current = Some(needed);
    if raised.maximum.is_some_and(|hard| hard < needed) {
        raised.maximum = Some(needed);
    }
    setrlimit(Resource::Nofile, raised).map_err(|errno| DaemonError::OpenFiles {
        needed,
        soft: limit.current.unwrap_or(u64::MAX),
        hard: limit.maximum.unwrap_or(u64::MAX),
        source: errno.into(),
    })
}

/// Resolves every service's program on `PATH` and its `user` and `group`, reporting every
/// one that cannot be found at once.
fn resolve(config: Config) -> Result<Vec<(Service, Launch)>, DaemonError> {
    let mut services = Vec::new();
    let mut problems = Vec::new();
    for service in config.services {
        match Launch::of(&service) {
            Ok(launch) => services.push((service, launch)),
            Err(error) => problems.push(format!("service {}: {error}", service.name)),
        }
    }
    if problems.is_empty() {
        Ok(services)
    } else {
        Err(DaemonError::Unlaunchable { problems })
    }
}

/// The directories the daemon makes for its pins and its control socket, removed again
/// (when empty) once it stops, so a clean stop leaves nothing behind.
struct Made {
    dirs: Vec<PathBuf>,
}

impl Made {
    fn before(options: &Options) -> Self {
        let control_dir = options.control.parent().map(Path::to_path_buf);
        Self {
            dirs: [Some(options.bpffs.clone()), control_dir]
                .into_iter()
                .flatten()
                .filter(|dir| !dir.as_os_str().is_empty() && !dir.exists())
                .collect(),
        }
    }

    fn remove_if_empty(&self) {
        for dir in &self.dirs {
            // Fails, leaving it, if anything is still in it.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

async fn serve_resolved(
    services: Vec<(Service, Launch)>,
    options: &Options,
) -> Result<(), DaemonError> {
    bpffs::ensure_dir(&options.bpffs)?;
    Dataplane::check_root(&options.bpffs)?;
    // An upgraded image takes over its predecessor's lock and control listener: no other
    // daemon could take the root meanwhile, and requests sent meanwhile wait in the backlog.
    let (lock, control, mut client) = match &options.handover {
        Some(handover) => {
            let taken = upgrade::take_over(handover, &options.bpffs)?;
            let control = UnixListener::from_std(taken.control).map_err(io_error(
                "taking over the control socket",
                options.control.display(),
            ))?;
            (taken.lock, control, Some(taken.client))
        }
        None => (
            lock_root(&options.bpffs)?,
            bind_control(&options.control).await?,
            None,
        ),
    };
    let metrics = match options.metrics {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(io_error("binding the metrics endpoint on", addr))?,
        ),
        None => None,
    };
    let (events, mut inbox) = mpsc::unbounded_channel();
    let probes =
        ProbeThread::start().map_err(io_error("starting the probe thread", "portshard-probes"))?;
    let handles = Handles {
        lock: lock.as_raw_fd(),
        control: control.as_raw_fd(),
    };
    let mut shell = Shell::new(
        options.bpffs.clone(),
        options.config.clone(),
        events.clone(),
        probes,
        handles,
    );
    shell.listen_for_signals();
    upgrade::release_signals();
    if let Err(error) = shell.start(services, options.handover.is_some()) {
        if options.handover.is_some() {
            // The previous image gets everything back (see `go_back`): nothing is removed.
            return Err(error);
        }
        let _ = std::fs::remove_file(&options.control);
        if shell.adopted {
            error!("leaving the adopted workers running: the kernel keeps steering their flows");
        } else {
            shell.stop(&mut inbox).await;
            shell.remove_pins();
        }
        return Err(error);
    }
    sweeper::start(options.bpffs.clone()).map_err(io_error(
        "starting the flow sweeper thread",
        "portshard-sweep",
    ))?;
    tokio::spawn(control_socket::control_server(control, events.clone()));
    if let Some(listener) = metrics {
        tokio::spawn(metrics_http::serve(listener, events.clone()));
    }
    let metrics = options
        .metrics
        .map_or_else(|| "off".to_owned(), |addr| format!("http://{addr}/metrics"));
    info!(
        bpffs = %options.bpffs.display(),
        control = %options.control.display(),
        %metrics,
        "portshard is serving"
    );
    if let (Some(client), Some(handover)) = (client.as_mut(), &options.handover) {
        #[cfg(feature = "upgrade-test")]
        if std::env::var_os(UPGRADE_TEST_FAIL).is_some() {
            return Err(DaemonError::Io {
                action: "taking over, in the upgrade-test build asked to fail by",
                path: UPGRADE_TEST_FAIL.to_owned(),
                source: io::Error::other("a failure on purpose, after adopting everything"),
            });
        }
        let outcome = upgrade::outcome(handover, &shell.programs());
        info!(outcome = ?outcome, "upgrade over");
        upgrade::reply(client, &outcome);
        upgrade::finish(handover);
    }
    drop(client);
    shell.run(&mut inbox).await;
    shell.remove_pins();
    let _ = std::fs::remove_file(&options.control);
    drop(lock);
    info!("portshard stopped");
    Ok(())
}

/// `serve` in check mode, the first step of `portshard upgrade` run by the daemon being
/// upgraded: could this build take over the pins `config` describes? Changes nothing (no
/// lock, no socket, no pin written). Returns a one-line summary.
pub fn check_takeover(config: Config, options: &Options) -> Result<String, DaemonError> {
    let services = resolve(config)?;
    Dataplane::check_root(&options.bpffs)?;
    let mut found = Vec::new();
    for (spec, _) in &services {
        let layout = pins::check(&options.bpffs, spec)?;
        // In this build's layout every map exists, so the program can be verified over
        // them without creating any (an older layout is verified after its migration).
        if layout == Some(PIN_LAYOUT) {
            Dataplane::verify_program(&options.bpffs, &spec.name)?;
        }
        found.push(match layout {
            None => format!("{} (not pinned yet)", spec.name),
            Some(PIN_LAYOUT) => format!("{} (pin layout {PIN_LAYOUT})", spec.name),
            Some(layout) => format!(
                "{} (pin layout {layout}, migrated to {PIN_LAYOUT})",
                spec.name
            ),
        });
    }
    Ok(format!(
        "portshard {} can take over: {}",
        env!("CARGO_PKG_VERSION"),
        found.join(", ")
    ))
}

/// In the upgrade tests' second build only: a takeover fails on purpose, after adopting
/// everything, when this variable is set, so the tests see the previous image come back.
#[cfg(feature = "upgrade-test")]
const UPGRADE_TEST_FAIL: &str = "PORTSHARD_UPGRADE_TEST_FAIL";

/// Takes an exclusive lock on the pin root, held until the daemon exits (the kernel drops
/// it even on `kill -9`), so two daemons never manage the same pins.
fn lock_root(root: &Path) -> Result<OwnedFd, DaemonError> {
    let dir = std::fs::File::open(root).map_err(io_error("opening pin root", root.display()))?;
    match rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            return Err(DaemonError::Locked {
                root: root.to_path_buf(),
            });
        }
        Err(error) => return Err(io_error("locking pin root", root.display())(error.into())),
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

/// The config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// It could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// It has problems (all of them listed).
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Reads and checks the config file at `path`.
pub fn read_config(path: &Path) -> Result<Config, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Config::parse(&text, path)?)
}
