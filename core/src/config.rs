//! The daemon's configuration: the TOML schema of the design, parsed and validated as a
//! whole before anything starts. Pure: it reads text, never files or sockets.
//!
//! Every error names the file, the line and column, the service and the field, and says
//! what is allowed; all errors of a file are reported at once.
use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use portshard_common::MAX_SLOTS;
use serde::Deserialize;
use toml::Spanned;

use crate::{
    service::{Proto, is_valid_name},
    table::MAX_WEIGHT,
};

/// The most workers a service may have: half the slots, so that a reload can start a whole
/// new generation beside the running one.
pub const MAX_WORKERS: u32 = MAX_SLOTS / 2;

/// The most services one daemon runs.
pub const MAX_SERVICES: usize = 64;

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
    /// Transport.
    pub proto: Proto,
    /// Address every worker's socket is bound to.
    pub listen: SocketAddr,
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
    /// How dead workers are restarted.
    pub restart: RestartPolicy,
    /// How long a stopping worker gets between SIGTERM and SIGKILL.
    pub stop_timeout: Duration,
    /// Whom the workers run as; `None`: as the daemon (root).
    pub run_as: Option<RunAs>,
    /// The health probe of each worker; `None`: workers are only watched for exiting.
    pub probe: Option<Probe>,
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
    /// mode, or with `sticky`, keep each flow on the worker that took its first datagram.
    pub fn flow_capacity(&self) -> u32 {
        let sticky_flows = self.mode == Mode::Handover || self.sticky;
        if self.proto == Proto::Udp && sticky_flows {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    proto: Spanned<String>,
    listen: Spanned<String>,
    workers: Spanned<i64>,
    command: Spanned<Vec<String>>,
    mode: Option<Spanned<String>>,
    weight: Option<Spanned<i64>>,
    sticky: Option<Spanned<bool>>,
    drain_idle: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
    flow_table: Option<Spanned<i64>>,
    restart_delay: Option<Spanned<String>>,
    restart_delay_max: Option<Spanned<String>>,
    restart_limit: Option<Spanned<i64>>,
    restart_window: Option<Spanned<String>>,
    stop_timeout: Option<Spanned<String>>,
    ready_delay: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    probe: Option<Spanned<String>>,
    probe_interval: Option<Spanned<String>>,
    probe_timeout: Option<Spanned<String>>,
    probe_failures: Option<Spanned<i64>>,
}

/// Byte offsets to line and column.
struct Lines<'a>(&'a str);

impl Lines<'_> {
    fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.0[..offset.min(self.0.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, column)
    }
}

/// Collects the problems of one file.
struct Checker<'a> {
    lines: Lines<'a>,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn report(&mut self, span: Range<usize>, what: String, message: String) {
        let (line, column) = self.lines.position(span.start);
        self.problems.push(Problem {
            line,
            column,
            what,
            message,
        });
    }

    fn duration(
        &mut self,
        field: Option<Spanned<String>>,
        what: &str,
        default: Duration,
    ) -> Duration {
        let Some(field) = field else {
            return default;
        };
        match humantime::parse_duration(field.get_ref()) {
            Ok(duration) if !duration.is_zero() => duration,
            Ok(_) => {
                self.report(
                    field.span(),
                    what.to_owned(),
                    "must be longer than zero".to_owned(),
                );
                default
            }
            Err(e) => {
                self.report(
                    field.span(),
                    what.to_owned(),
                    format!(
                        "{:?} is not a duration ({e}): write it like \"100ms\", \"30s\" or \"5m\"",
                        field.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn integer(&mut self, field: &Spanned<i64>, what: &str, allowed: Range<u32>) -> u32 {
        let value = *field.get_ref();
        match u32::try_from(value) {
            Ok(v) if allowed.contains(&v) => v,
            _ => {
                self.report(
                    field.span(),
                    what.to_owned(),
                    format!(
                        "{value} is out of range: use {} to {}",
                        allowed.start,
                        allowed.end - 1
                    ),
                );
                allowed.start
            }
        }
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
            checker.problems.push(Problem {
                line: 0,
                column: 0,
                what: String::new(),
                message: "no service: add at least one [[service]] table".to_owned(),
            });
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
        let mut addresses: BTreeMap<(Proto, SocketAddr), String> = BTreeMap::new();
        let mut services = Vec::new();
        for (index, raw) in raw.service.into_iter().enumerate() {
            let raw = raw.into_inner();
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
            let key = (service.0.proto, service.0.listen);
            if let Some(other) = addresses.get(&key) {
                checker.report(
                    service.1.listen.clone(),
                    format!("service {:?} field `listen`", service.0.name),
                    format!(
                        "duplicate address: service {other:?} already listens on {} {}; give each service its own address or port",
                        key.0, key.1
                    ),
                );
            } else {
                addresses.insert(key, service.0.name.clone());
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
        let echo = |name: &str, proto| Service {
            name: name.to_owned(),
            proto,
            listen: SocketAddr::from(([127, 0, 0, 1], BUILTIN_PORT)),
            workers: 4,
            command: vec![exe.display().to_string(), "echo".to_owned()],
            mode: Mode::Balance,
            weight: 1,
            sticky: false,
            drain_idle: DEFAULT_DRAIN_IDLE,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            flow_table: DEFAULT_FLOW_TABLE,
            restart: RestartPolicy::default(),
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            ready_delay: DEFAULT_READY_DELAY,
            run_as: None,
            probe: None,
        };
        Self {
            services: vec![echo("echo-udp", Proto::Udp), echo("echo-tcp", Proto::Tcp)],
        }
    }
}

/// The port of the built-in default services.
pub const BUILTIN_PORT: u16 = 5300;
const DEFAULT_DRAIN_IDLE: Duration = Duration::from_secs(30);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_READY_DELAY: Duration = Duration::from_secs(1);
/// Default capacity of the UDP flow table.
pub const DEFAULT_FLOW_TABLE: u32 = 65_536;
/// Largest UDP flow table a service may ask for.
pub const MAX_FLOW_TABLE: u32 = 1 << 24;

/// Where the fields that must be unique were written.
struct Spans {
    name: Range<usize>,
    listen: Range<usize>,
}

/// Validates one service; `None` (with problems reported) if it cannot be used.
fn check_service(
    checker: &mut Checker<'_>,
    raw: RawService,
    index: usize,
) -> Option<(Service, Spans)> {
    let before = checker.problems.len();
    let name = raw.name.get_ref().clone();
    let label = if is_valid_name(&name) {
        format!("service {name:?}")
    } else {
        checker.report(
            raw.name.span(),
            format!("service #{} field `name`", index + 1),
            format!("{name:?} is not a valid name: use 1 to 32 characters from a-z, 0-9 and '-'"),
        );
        format!("service #{}", index + 1)
    };
    let what = |field: &str| format!("{label} field `{field}`");

    let proto = match raw.proto.get_ref().as_str() {
        "udp" => Proto::Udp,
        "tcp" => Proto::Tcp,
        other => {
            checker.report(
                raw.proto.span(),
                what("proto"),
                format!("{other:?} is not a transport: use \"udp\" or \"tcp\""),
            );
            Proto::Udp
        }
    };
    let listen = match raw.listen.get_ref().parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 => addr,
        Ok(_) => {
            checker.report(
                raw.listen.span(),
                what("listen"),
                "port 0 is not allowed: workers of one service must share a fixed port".to_owned(),
            );
            SocketAddr::from(([0, 0, 0, 0], 0))
        }
        Err(_) => {
            checker.report(
                raw.listen.span(),
                what("listen"),
                format!(
                    "{:?} is not an address: write \"127.0.0.1:5300\" or \"[::1]:5300\"",
                    raw.listen.get_ref()
                ),
            );
            SocketAddr::from(([0, 0, 0, 0], 0))
        }
    };
    let workers = checker.integer(&raw.workers, &what("workers"), 1..MAX_WORKERS + 1);
    let command = raw.command.get_ref().clone();
    if command.first().is_none_or(|program| program.is_empty()) {
        checker.report(
            raw.command.span(),
            what("command"),
            "is empty: give the program and its arguments, like [\"/usr/bin/my-server\", \"--flag\"]"
                .to_owned(),
        );
    } else if command.iter().any(|arg| arg.contains('\0')) {
        checker.report(
            raw.command.span(),
            what("command"),
            "contains a NUL character, which no program argument can hold".to_owned(),
        );
    }
    let mode = match raw.mode.as_ref().map(|m| m.get_ref().as_str()) {
        None | Some("balance") => Mode::Balance,
        Some("handover") => Mode::Handover,
        Some(other) => {
            checker.report(
                raw.mode.as_ref().map_or(0..0, Spanned::span),
                what("mode"),
                format!("{other:?} is not a mode: use \"balance\" or \"handover\""),
            );
            Mode::Balance
        }
    };
    let sticky = raw.sticky.as_ref().is_some_and(|s| *s.get_ref());
    let weight = raw.weight.as_ref().map_or(1, |w| {
        checker.integer(w, &what("weight"), 1..MAX_WEIGHT + 1)
    });
    let flow_table = raw.flow_table.as_ref().map_or(DEFAULT_FLOW_TABLE, |f| {
        checker.integer(f, &what("flow_table"), 1..MAX_FLOW_TABLE + 1)
    });
    let defaults = RestartPolicy::default();
    let restart = RestartPolicy {
        delay: checker.duration(raw.restart_delay, &what("restart_delay"), defaults.delay),
        delay_max: checker.duration(
            raw.restart_delay_max,
            &what("restart_delay_max"),
            defaults.delay_max,
        ),
        limit: raw.restart_limit.as_ref().map_or(defaults.limit, |l| {
            checker.integer(l, &what("restart_limit"), 1..1_000_001)
        }),
        window: checker.duration(raw.restart_window, &what("restart_window"), defaults.window),
    };
    let run_as = check_run_as(checker, raw.user, raw.group, &what);
    let probe = check_probe(
        checker,
        proto,
        RawProbe {
            probe: raw.probe,
            interval: raw.probe_interval,
            timeout: raw.probe_timeout,
            failures: raw.probe_failures,
        },
        &what,
    );
    let service = Service {
        name,
        proto,
        listen,
        workers,
        command,
        mode,
        weight,
        sticky,
        drain_idle: checker.duration(raw.drain_idle, &what("drain_idle"), DEFAULT_DRAIN_IDLE),
        drain_timeout: checker.duration(
            raw.drain_timeout,
            &what("drain_timeout"),
            DEFAULT_DRAIN_TIMEOUT,
        ),
        flow_table,
        restart,
        stop_timeout: checker.duration(
            raw.stop_timeout,
            &what("stop_timeout"),
            DEFAULT_STOP_TIMEOUT,
        ),
        ready_delay: checker.duration(raw.ready_delay, &what("ready_delay"), DEFAULT_READY_DELAY),
        run_as,
        probe,
    };
    (checker.problems.len() == before).then(|| {
        (
            service,
            Spans {
                name: raw.name.span(),
                listen: raw.listen.span(),
            },
        )
    })
}

/// Default time between two probes of a worker.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Default time a probe waits for its answer.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Default number of unanswered probes in a row that make a worker hung.
pub const DEFAULT_PROBE_FAILURES: u32 = 3;

/// The probe fields of a service, as written.
struct RawProbe {
    probe: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    failures: Option<Spanned<i64>>,
}

/// Validates the probe of a service of transport `proto`.
fn check_probe(
    checker: &mut Checker<'_>,
    proto: Proto,
    raw: RawProbe,
    what: &dyn Fn(&str) -> String,
) -> Option<Probe> {
    let Some(probe) = raw.probe else {
        let stray = [
            ("probe_interval", raw.interval.map(|f| f.span())),
            ("probe_timeout", raw.timeout.map(|f| f.span())),
            ("probe_failures", raw.failures.map(|f| f.span())),
        ];
        for (field, span) in stray {
            if let Some(span) = span {
                checker.report(span, what(field), "is set without `probe`: add `probe = \"udp:<payload>\"` or `probe = \"tcp\"`, or remove it".to_owned());
            }
        }
        return None;
    };
    let kind = match (
        probe.get_ref().split_once(':'),
        probe.get_ref().as_str(),
        proto,
    ) {
        (Some(("udp", payload)), _, Proto::Udp) if !payload.is_empty() => {
            ProbeKind::Udp(payload.as_bytes().to_vec())
        }
        (_, "tcp", Proto::Tcp) => ProbeKind::Tcp,
        _ => {
            let allowed = match proto {
                Proto::Udp => {
                    "\"udp:<payload>\" with a payload the worker answers, like \"udp:ping\""
                }
                Proto::Tcp => "\"tcp\"",
            };
            checker.report(
                probe.span(),
                what("probe"),
                format!(
                    "{:?} is not a probe for a {proto} service: use {allowed}",
                    probe.get_ref()
                ),
            );
            return None;
        }
    };
    let interval = checker.duration(
        raw.interval,
        &what("probe_interval"),
        DEFAULT_PROBE_INTERVAL,
    );
    let timeout_span = raw.timeout.as_ref().map(|f| f.span());
    let timeout = checker.duration(
        raw.timeout,
        &what("probe_timeout"),
        DEFAULT_PROBE_TIMEOUT.min(interval),
    );
    if timeout > interval {
        checker.report(
            timeout_span.unwrap_or(probe.span()),
            what("probe_timeout"),
            format!(
                "{} is longer than probe_interval {}: a probe must end before the next starts",
                humantime::format_duration(timeout),
                humantime::format_duration(interval)
            ),
        );
    }
    let failures = raw.failures.as_ref().map_or(DEFAULT_PROBE_FAILURES, |f| {
        checker.integer(f, &what("probe_failures"), 1..101)
    });
    Some(Probe {
        kind,
        interval,
        timeout,
        failures,
    })
}

/// Whether `name` can name a user or group: a POSIX portable name (`[a-z_][a-z0-9_-]*`, at
/// most 32 characters, as `useradd` accepts) or a numeric id.
fn is_account_name(name: &str) -> bool {
    let numeric = !name.is_empty() && name.len() <= 10 && name.bytes().all(|b| b.is_ascii_digit());
    let portable = (1..=32).contains(&name.len())
        && name.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase() || b == b'_' || (i > 0 && (b.is_ascii_digit() || b == b'-'))
        });
    (numeric && name.parse::<u32>().is_ok()) || portable
}

/// Validates `user` and `group`; a group alone is refused, since it would leave the workers
/// running as root.
fn check_run_as(
    checker: &mut Checker<'_>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    what: &dyn Fn(&str) -> String,
) -> Option<RunAs> {
    for (field, value) in [("user", &user), ("group", &group)] {
        if let Some(value) = value
            && !is_account_name(value.get_ref())
        {
            checker.report(
                value.span(),
                what(field),
                format!(
                    "{:?} is not a {field} name: use a name like \"nobody\" ([a-z_][a-z0-9_-]*, at most 32 characters) or a numeric id",
                    value.get_ref()
                ),
            );
        }
    }
    match (user, group) {
        (Some(user), group) => Some(RunAs {
            user: user.into_inner(),
            group: group.map(Spanned::into_inner),
        }),
        (None, Some(group)) => {
            checker.report(
                group.span(),
                what("group"),
                "is set without `user`, which would leave the workers running as root: set `user` too".to_owned(),
            );
            None
        }
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests;
