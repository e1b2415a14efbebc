//! The daemon's configuration: the TOML schema of the design, parsed and validated as a
//! whole before anything starts. Pure: it reads text, never files or sockets.
//!
//! Every error names the file, the line and column, the service and the field, and says
//! what is allowed; all errors of a file are reported at once.
use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

pub use portshard_common::MAX_LISTENERS;
use portshard_common::MAX_SLOTS;

mod check;
mod quic;
mod raw;

use check::{Checker, Lines, check_service};
use raw::{RawConfig, RawService};

use crate::{
    ownership,
    service::{Listener, Proto},
};

/// The most workers a service may have: half the slots, so that a reload can start a whole
/// new generation beside the running one.
pub const MAX_WORKERS: u32 = MAX_SLOTS / 2;

/// The most services one daemon runs.
pub const MAX_SERVICES: usize = 64;

/// Open files the daemon holds for each service whatever its workers: its pinned maps and
/// program (a staged generation's program too) and a few for the service's sockets.
pub const FILES_PER_SERVICE: u64 = 24;

/// Open files the daemon holds for each worker: the listening socket it hands the worker
/// and the worker's pidfd, twice over while a reload runs both generations.
pub const FILES_PER_WORKER: u64 = 2 * 2;

/// Open files the daemon holds for each worker for each listener past the first: the
/// socket it hands the worker, twice over while a reload runs both generations.
pub const FILES_PER_EXTRA_LISTENER: u64 = 2;

/// Open files the daemon holds whatever its services: control and metrics sockets, signal
/// and event descriptors, logs, and a process being started.
pub const FILES_BASE: u64 = 256;

/// How a service steers new work (see the design's "Modes").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The consistent table over every live worker.
    Balance,
    /// New work to the newest generation only; older ones drain.
    Handover,
}

impl Mode {
    /// The name used in the config and in `status`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Balance => "balance",
            Self::Handover => "handover",
        }
    }
}

/// When and how often a dead worker is restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Delay before the first restart; doubles with each crash in a row.
    pub delay: Duration,
    /// The longest delay.
    pub delay_max: Duration,
    /// Crashes of one slot within `window` after which it is no longer restarted.
    pub limit: u32,
    /// A worker that lived this long ends a crash loop: the delay starts again from `delay`.
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(100),
            delay_max: Duration::from_secs(30),
            limit: 10,
            window: Duration::from_secs(60),
        }
    }
}

/// One validated service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Unique name, also its pin directory: `[a-z0-9-]{1,32}`.
    pub name: String,
    /// Transport of the first listener.
    pub proto: Proto,
    /// Address of the first listener.
    pub listen: SocketAddr,
    /// Every listener, in config order, the first being `proto` and `listen`: 1 to
    /// [`MAX_LISTENERS`], of different kinds (transport and IP family). Each worker holds
    /// one socket of each, in this order from fd 3, all in its slot.
    pub listeners: Vec<Listener>,
    /// How many copies of `command` run.
    pub workers: u32,
    /// Program and arguments of a worker.
    pub command: Vec<String>,
    /// How new work is steered.
    pub mode: Mode,
    /// Weight of each worker's slot.
    pub weight: u32,
    /// Keep existing UDP flows on their worker in balance mode (the flow table).
    pub sticky: bool,
    /// A worker of an old generation with no flow traffic (UDP) or no open connection
    /// (TCP) for this long is stopped.
    pub drain_idle: Duration,
    /// A worker of an old generation is stopped after this long at the latest.
    pub drain_timeout: Duration,
    /// A new generation's workers must stay up this long before new work is switched to
    /// them; one that exits sooner rolls the reload back.
    pub ready_delay: Duration,
    /// Capacity of the UDP flow table, in flows.
    pub flow_table: u32,
    /// A UDP flow with no datagram for this long is forgotten: its next datagram is
    /// steered as a new flow's, and the daemon sweeps it from the flow table.
    pub flow_idle: Duration,
    /// How dead workers are restarted.
    pub restart: RestartPolicy,
    /// How long a stopping worker gets between SIGTERM and SIGKILL.
    pub stop_timeout: Duration,
    /// Whom the workers run as; `None`: as the daemon (root).
    pub run_as: Option<RunAs>,
    /// The health probe of each worker; `None`: workers are only watched for exiting.
    pub probe: Option<Probe>,
    /// QUIC-LB connection-ID steering (`quic = true`); `None`: QUIC packets, if any, are
    /// steered by their 4-tuple like any datagram.
    pub quic: Option<QuicLb>,
}

/// How a QUIC service's workers build their connection IDs (draft-ietf-quic-load-balancers),
/// so the program can read the server ID back from any packet: config rotation bits, then
/// the worker's server ID and a nonce, in the clear or as one AES-128 block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuicLb {
    /// The config rotation codepoint (`quic_config_id`, 0..=6) in each connection ID's
    /// first octet; a packet with another one is steered by the table.
    pub config_id: u8,
    /// Octets of nonce after the server ID (`quic_nonce_len`).
    pub nonce_len: u8,
    /// Server ID and nonce are encrypted (`quic_encrypt`), in the draft's single-pass mode
    /// under a key the daemon makes for the service and keeps in its pins.
    pub encrypted: bool,
}

/// A per-worker health probe: a worker that fails `failures` in a row is taken to be hung,
/// so it is killed (its entries go to their heirs) and restarted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// What is sent and what counts as an answer.
    pub kind: ProbeKind,
    /// Time between two probes of a worker (`probe_interval`).
    pub interval: Duration,
    /// How long a probe waits for its answer (`probe_timeout`).
    pub timeout: Duration,
    /// Unanswered probes in a row after which the worker is restarted (`probe_failures`).
    pub failures: u32,
}

/// What a probe does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// `udp:<payload>`: sends the payload; any datagram back is an answer.
    Udp(Vec<u8>),
    /// `tcp`: connects; the worker accepting the connection is an answer.
    Tcp,
}

/// The unprivileged identity of a service's workers, as written in the config (names or
/// numeric ids); the daemon resolves it when it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// `user`: a user name or uid.
    pub user: String,
    /// `group`: a group name or gid; `None`: the user's primary group.
    pub group: Option<String>,
}

impl Service {
    /// Capacity of the service's flow table, 0 if it has none: UDP services in `handover`
    /// mode, or with `sticky`, keep each flow on the worker that took its first datagram
    /// (a service with a UDP listener among others too).
    pub fn flow_capacity(&self) -> u32 {
        let sticky_flows = self.mode == Mode::Handover || self.sticky;
        let udp = self.listeners.iter().any(|l| l.proto == Proto::Udp);
        if udp && sticky_flows {
            self.flow_table
        } else {
            0
        }
    }
}

/// A whole validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The services, in file order.
    pub services: Vec<Service>,
}

impl Config {
    /// How many open files the daemon needs to run these services, reloads included, so it
    /// can raise its limit, or refuse to start with the numbers, before it spawns a worker
    /// it could not hold (a worker started past the limit fails halfway: `EMFILE`).
    pub fn open_files_needed(&self) -> u64 {
        FILES_BASE
            + self
                .services
                .iter()
                .map(|s| {
                    let extra = s.listeners.len().saturating_sub(1) as u64;
                    FILES_PER_SERVICE
                        + (FILES_PER_WORKER + FILES_PER_EXTRA_LISTENER * extra)
                            * u64::from(s.workers)
                })
                .sum::<u64>()
    }
}

/// One thing wrong in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, 0 when the problem has no place (an empty file).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// `service "name" field `workers``, or empty for a syntax error.
    pub what: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

/// The config was refused; nothing was started.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file (or `<built-in>`).
    pub origin: PathBuf,
    /// Everything wrong, in file order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        write!(
            f,
            "config {} is invalid ({count} problem{}); nothing was started",
            self.origin.display(),
            if count == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {}:{}:{}: ", self.origin.display(), p.line, p.column)?;
            if !p.what.is_empty() {
                write!(f, "{}: ", p.what)?;
            }
            f.write_str(&p.message)?;
        }
        Ok(())
    }
}

impl Config {
    /// Parses and validates `text`, read from `origin` (named in errors).
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let mut checker = Checker {
            lines: Lines(text),
            problems: Vec::new(),
        };
        let fail = |problems| ConfigError {
            origin: origin.to_path_buf(),
            problems,
        };
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                checker.report(span, String::new(), e.message().to_owned());
                return Err(fail(checker.problems));
            }
        };
        if raw.service.is_empty() {
            let message = if text.trim().is_empty() {
                "the file is empty: add at least one [[service]] table, like the example in docs/configuration.md"
            } else {
                "no service: add at least one [[service]] table"
            };
            checker.report(0..0, String::new(), message.to_owned());
        }
        if raw.service.len() > MAX_SERVICES {
            let span = raw.service[MAX_SERVICES].span();
            checker.report(
                span,
                String::new(),
                format!(
                    "{} services, at most {MAX_SERVICES} are allowed: split them over several daemons, each with its own --bpffs and --control",
                    raw.service.len()
                ),
            );
        }
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        let mut addresses: Vec<(Proto, SocketAddr, String)> = Vec::new();
        let mut services = Vec::new();
        for (index, raw) in raw.service.into_iter().enumerate() {
            let raw = RawService::read(&mut checker, raw, index);
            let service = check_service(&mut checker, raw, index);
            let Some(service) = service else { continue };
            services.push(service);
        }
        // Uniqueness, once every service parsed.
        for (service, position) in services.iter().zip(0..) {
            if let Some(&first) = names.get(&service.0.name) {
                let span = service.1.name.clone();
                checker.report(
                    span,
                    format!("service {:?} field `name`", service.0.name),
                    format!(
                        "duplicate name: service #{} already has it; names must be unique",
                        first + 1
                    ),
                );
            } else {
                names.insert(service.0.name.clone(), position);
            }
            for listener in &service.0.listeners {
                let (proto, listen) = (listener.proto, listener.addr);
                // portshard's own sockets: IPv6 ones are IPv6-only.
                let shared = addresses.iter().find(|(other_proto, other, _)| {
                    *other_proto == proto && ownership::overlaps(*other, listen, Some(true))
                });
                match shared {
                    Some((_, other, name)) if *other == listen => checker.report(
                        service.1.listen.clone(),
                        format!("service {:?} field `listen`", service.0.name),
                        format!(
                            "duplicate address: service {name:?} already listens on {proto} {listen}; give each service its own address or port"
                        ),
                    ),
                    Some((_, other, name)) => checker.report(
                        service.1.listen.clone(),
                        format!("service {:?} field `listen`", service.0.name),
                        format!(
                            "overlapping address: service {name:?} listens on {proto} {other}, and one of the two addresses is the wildcard that covers the other, so they would share traffic; give each service its own port"
                        ),
                    ),
                    None => addresses.push((proto, listen, service.0.name.clone())),
                }
            }
        }
        if !checker.problems.is_empty() {
            checker.problems.sort_by_key(|p| (p.line, p.column));
            return Err(fail(checker.problems));
        }
        Ok(Self {
            services: services.into_iter().map(|(s, _)| s).collect(),
        })
    }

    /// The built-in default: a UDP and a TCP echo service on 127.0.0.1:5300, four workers
    /// each, served by `portshard echo` (`exe` is the path of this binary).
    pub fn builtin(exe: &Path) -> Self {
        let listen = SocketAddr::from(([127, 0, 0, 1], BUILTIN_PORT));
        let echo = |name: &str, proto| Service {
            name: name.to_owned(),
            proto,
            listen,
            listeners: vec![Listener::new(proto, listen)],
            workers: 4,
            command: vec![exe.display().to_string(), "echo".to_owned()],
            mode: Mode::Balance,
            weight: 1,
            sticky: false,
            drain_idle: DEFAULT_DRAIN_IDLE,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            flow_table: DEFAULT_FLOW_TABLE,
            flow_idle: DEFAULT_FLOW_IDLE,
            restart: RestartPolicy::default(),
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            ready_delay: DEFAULT_READY_DELAY,
            run_as: None,
            probe: None,
            quic: None,
        };
        Self {
            services: vec![echo("echo-udp", Proto::Udp), echo("echo-tcp", Proto::Tcp)],
        }
    }
}

/// The port of the built-in default services.
pub const BUILTIN_PORT: u16 = 5300;
const DEFAULT_DRAIN_IDLE: Duration = Duration::from_secs(30);
/// Like QUIC's idle timeouts and udpgrm's flow expiry: about two minutes.
const DEFAULT_FLOW_IDLE: Duration = Duration::from_secs(120);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_READY_DELAY: Duration = Duration::from_secs(1);
/// Nonce octets of a QUIC service's connection IDs when `quic_nonce_len` is not given:
/// with the config octet and the 3-octet server ID, 12-octet connection IDs.
const DEFAULT_QUIC_NONCE_LEN: u8 = 8;
/// Default capacity of the UDP flow table.
pub const DEFAULT_FLOW_TABLE: u32 = 65_536;
/// Largest UDP flow table a service may ask for.
pub const MAX_FLOW_TABLE: u32 = 1 << 24;

/// Default time between two probes of a worker.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Default time a probe waits for its answer.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Default number of unanswered probes in a row that make a worker hung.
pub const DEFAULT_PROBE_FAILURES: u32 = 3;

#[cfg(test)]
mod tests;
