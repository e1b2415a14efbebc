//! Validation of each service as read ([`RawService`]): every value in its range, every
//! problem reported with its place, its service and its field, and what is allowed.
use std::{net::SocketAddr, ops::Range, time::Duration};

use toml::Spanned;

use super::{
    DEFAULT_DRAIN_IDLE, DEFAULT_DRAIN_TIMEOUT, DEFAULT_FLOW_IDLE, DEFAULT_FLOW_TABLE,
    DEFAULT_PROBE_FAILURES, DEFAULT_PROBE_INTERVAL, DEFAULT_PROBE_TIMEOUT, DEFAULT_READY_DELAY,
    DEFAULT_STOP_TIMEOUT, MAX_FLOW_TABLE, MAX_LISTENERS, MAX_WORKERS, Mode, Probe, ProbeKind,
    Problem, RestartPolicy, RunAs, Service,
    quic::{RawQuic, check_quic},
    raw::RawListen,
    raw::RawService,
};
use crate::{
    service::{Listener, Proto, is_valid_name},
    table::MAX_WEIGHT,
};

/// Byte offsets to line and column.
pub(super) struct Lines<'a>(pub(super) &'a str);

impl Lines<'_> {
    fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.0[..offset.min(self.0.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, column)
    }
}

/// Collects the problems of one file.
pub(super) struct Checker<'a> {
    pub(super) lines: Lines<'a>,
    pub(super) problems: Vec<Problem>,
}

impl Checker<'_> {
    pub(super) fn report(&mut self, span: Range<usize>, what: String, message: String) {
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
            Err(_) => {
                self.report(
                    field.span(),
                    what.to_owned(),
                    format!(
                        "{:?} is not a duration: write a number and a unit, like \"100ms\", \"30s\" or \"5m\"",
                        field.get_ref()
                    ),
                );
                default
            }
        }
    }

    pub(super) fn integer(&mut self, field: &Spanned<i64>, what: &str, allowed: Range<u32>) -> u32 {
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

/// Where the fields that must be unique were written.
pub(super) struct Spans {
    pub(super) name: Range<usize>,
    pub(super) listen: Range<usize>,
}

/// Validates one service; `None` (with problems reported) if it cannot be used.
pub(super) fn check_service(
    checker: &mut Checker<'_>,
    raw: RawService,
    index: usize,
) -> Option<(Service, Spans)> {
    let before = checker.problems.len();
    // A missing required field was reported when the table was read; the others are
    // still checked, with a stand-in for it, so every problem is found at once.
    let listen_list = matches!(
        raw.listen.as_ref().map(Spanned::get_ref),
        Some(RawListen::Many(_))
    );
    let complete = raw.name.is_some()
        && (raw.proto.is_some() || listen_list)
        && raw.listen.is_some()
        && raw.workers.is_some()
        && raw.command.is_some();
    let name_field = raw
        .name
        .clone()
        .unwrap_or_else(|| Spanned::new(raw.span.clone(), String::new()));
    let name = name_field.get_ref().clone();
    if raw.name.is_some() && !is_valid_name(&name) {
        checker.report(
            name_field.span(),
            format!("service #{} field `name`", index + 1),
            format!("{name:?} is not a valid name: use 1 to 32 characters from a-z, 0-9 and '-'"),
        );
    }
    let label = raw.label.clone();
    let workers_field = raw
        .workers
        .clone()
        .unwrap_or_else(|| Spanned::new(raw.span.clone(), 1));
    let command_field = raw
        .command
        .clone()
        .unwrap_or_else(|| Spanned::new(raw.span.clone(), vec!["-".to_owned()]));
    let what = |field: &str| format!("{label} field `{field}`");

    let listen_span = raw
        .listen
        .as_ref()
        .map_or_else(|| raw.span.clone(), Spanned::span);
    let listeners = check_listen(checker, raw.proto.as_ref(), raw.listen.as_ref(), &what);
    let Listener {
        proto,
        addr: listen,
    } = listeners[0];
    let workers = checker.integer(&workers_field, &what("workers"), 1..MAX_WORKERS + 1);
    let command = command_field.get_ref().clone();
    if command.first().is_none_or(|program| program.is_empty()) {
        checker.report(
            command_field.span(),
            what("command"),
            "is empty: give the program and its arguments, like [\"/usr/bin/my-server\", \"--flag\"]"
                .to_owned(),
        );
    } else if command.iter().any(|arg| arg.contains('\0')) {
        checker.report(
            command_field.span(),
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
    let quic = check_quic(
        checker,
        listeners.iter().any(|l| l.proto == Proto::Udp),
        RawQuic {
            quic: raw.quic,
            config_id: raw.quic_config_id,
            nonce_len: raw.quic_nonce_len,
            encrypt: raw.quic_encrypt,
        },
        &what,
    );
    let service = Service {
        name,
        proto,
        listen,
        listeners,
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
        flow_idle: checker.duration(raw.flow_idle, &what("flow_idle"), DEFAULT_FLOW_IDLE),
        restart,
        stop_timeout: checker.duration(
            raw.stop_timeout,
            &what("stop_timeout"),
            DEFAULT_STOP_TIMEOUT,
        ),
        ready_delay: checker.duration(raw.ready_delay, &what("ready_delay"), DEFAULT_READY_DELAY),
        run_as,
        probe,
        quic,
    };
    (complete && checker.problems.len() == before).then(|| {
        (
            service,
            Spans {
                name: name_field.span(),
                listen: listen_span,
            },
        )
    })
}

/// Validates `proto` and `listen`: one address with `proto`, or a list of at most
/// [`MAX_LISTENERS`] `PROTO:ADDRESS` listeners without it, of different transports or IP
/// families. Returns the listeners in order, never none: a stand-in takes the place of
/// what cannot be read, so the other fields are still checked.
fn check_listen(
    checker: &mut Checker<'_>,
    proto: Option<&Spanned<String>>,
    listen: Option<&Spanned<RawListen>>,
    what: &dyn Fn(&str) -> String,
) -> Vec<Listener> {
    let stand_in = Listener::new(Proto::Udp, SocketAddr::from(([0, 0, 0, 0], 0)));
    let check_port = |checker: &mut Checker<'_>, span: Range<usize>, listener: Listener| {
        if listener.addr.port() == 0 {
            checker.report(
                span,
                what("listen"),
                "port 0 is not allowed: workers of one service must share a fixed port".to_owned(),
            );
        }
    };
    let read_proto =
        |checker: &mut Checker<'_>, proto: &Spanned<String>| match proto.get_ref().as_str() {
            "udp" => Proto::Udp,
            "tcp" => Proto::Tcp,
            other => {
                checker.report(
                    proto.span(),
                    what("proto"),
                    format!("{other:?} is not a transport: use \"udp\" or \"tcp\""),
                );
                Proto::Udp
            }
        };
    let Some(listen) = listen else {
        // Missing: reported when the table was read.
        if let Some(proto) = proto {
            read_proto(checker, proto);
        }
        return vec![stand_in];
    };
    let addresses = match listen.get_ref() {
        RawListen::One(address) => {
            let proto = proto.map_or(Proto::Udp, |proto| read_proto(checker, proto));
            let Ok(addr) = address.parse::<SocketAddr>() else {
                checker.report(
                    listen.span(),
                    what("listen"),
                    format!(
                        "{address:?} is not an address: write \"127.0.0.1:5300\" or \"[::1]:5300\""
                    ),
                );
                return vec![stand_in];
            };
            let listener = Listener::new(proto, addr);
            check_port(checker, listen.span(), listener);
            return vec![listener];
        }
        RawListen::Many(addresses) => addresses,
    };
    if let Some(proto) = proto {
        checker.report(
            proto.span(),
            what("proto"),
            "is set, but `listen` is a list of listeners, each naming its own transport (\"tcp:0.0.0.0:443\"): remove `proto`".to_owned(),
        );
    }
    if addresses.is_empty() || addresses.len() > MAX_LISTENERS {
        checker.report(
            listen.span(),
            what("listen"),
            format!(
                "{} listeners, a service has 1 to {MAX_LISTENERS}: at most one each of TCP and UDP over IPv4 and IPv6",
                addresses.len()
            ),
        );
    }
    let mut listeners: Vec<(Listener, &String)> = Vec::new();
    for address in addresses.iter().take(MAX_LISTENERS) {
        let Some(listener) = Listener::parse(address) else {
            checker.report(
                listen.span(),
                what("listen"),
                format!(
                    "{address:?} is not a listener: write \"PROTO:ADDRESS\" with PROTO udp or tcp, like \"udp:0.0.0.0:443\" or \"tcp:[::]:443\""
                ),
            );
            continue;
        };
        check_port(checker, listen.span(), listener);
        if let Some((_, first)) = listeners.iter().find(|(l, _)| l.kind() == listener.kind()) {
            checker.report(
                listen.span(),
                what("listen"),
                format!(
                    "listeners {first:?} and {address:?} are both {}: a service takes one listener per transport and IP family (tcp4, tcp6, udp4, udp6); give the other one its own service",
                    listener.kind_name()
                ),
            );
            continue;
        }
        listeners.push((listener, address));
    }
    if listeners.is_empty() {
        return vec![stand_in];
    }
    listeners.into_iter().map(|(l, _)| l).collect()
}

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
