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
mod pins;
mod probes;
mod servers;
mod shell;

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use portshard_common::MAX_SLOTS;
use tokio::{
    net::{TcpListener, UnixListener, UnixStream},
    sync::mpsc,
};
use tracing::{error, info};

use crate::{
    bpffs::{self, BpffsError},
    config::{Config, Service},
    dataplane::{Dataplane, DataplaneError},
    group::GroupError,
    process::{self, Credentials, ProcessError},
    socket::SocketError,
    table::Slot,
};
use probes::ProbeThread;
use shell::Shell;

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
    let services = config
        .services
        .into_iter()
        .map(|service| match Launch::of(&service) {
            Ok(launch) => Ok((service, launch)),
            Err(source) => Err(DaemonError::Worker {
                service: service.name.clone(),
                slot: 0,
                source,
            }),
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
    let (events, mut inbox) = mpsc::unbounded_channel();
    let probes =
        ProbeThread::start().map_err(io_error("starting the probe thread", "portshard-probes"))?;
    let mut shell = Shell::new(
        options.bpffs.clone(),
        options.config.clone(),
        events.clone(),
        probes,
    );
    shell.listen_for_signals();
    if let Err(error) = shell.start(services) {
        let _ = std::fs::remove_file(&options.control);
        if shell.adopted {
            error!("leaving the adopted workers running: the kernel keeps steering their flows");
        } else {
            shell.stop(&mut inbox).await;
            shell.remove_pins();
        }
        return Err(error);
    }
    tokio::spawn(servers::control_server(control, events.clone()));
    if let Some(listener) = metrics {
        tokio::spawn(servers::metrics_server(listener, events.clone()));
    }
    info!(
        bpffs = %options.bpffs.display(),
        control = %options.control.display(),
        metrics = ?options.metrics,
        "portshard is serving"
    );
    shell.run(&mut inbox).await;
    shell.remove_pins();
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

/// Reads and checks the config file at `path`.
pub fn read_config(path: &Path) -> Result<Config, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading config {}: {e}", path.display()))?;
    Config::parse(&text, path).map_err(|e| e.to_string())
}
