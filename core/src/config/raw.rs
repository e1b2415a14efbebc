//! A config file as written: each `[[service]]` table read key by key, with the place of
//! each, so that an unknown key or a value of the wrong type is one problem among the
//! others rather than the end of the check (as serde's typed reading would make it).
use std::{collections::BTreeMap, ops::Range};

use serde::Deserialize;
use toml::{Spanned, Value};

use super::Checker;
use crate::service::is_valid_name;

/// The file: its `[[service]]` tables.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) service: Vec<Spanned<BTreeMap<Spanned<String>, Spanned<Value>>>>,
}

/// One service's keys, each of the type its field needs (`None` if absent or refused).
#[derive(Default)]
pub(super) struct RawService {
    pub(super) span: Range<usize>,
    pub(super) name: Option<Spanned<String>>,
    pub(super) proto: Option<Spanned<String>>,
    pub(super) listen: Option<Spanned<RawListen>>,
    pub(super) workers: Option<Spanned<i64>>,
    pub(super) command: Option<Spanned<Vec<String>>>,
    pub(super) mode: Option<Spanned<String>>,
    pub(super) weight: Option<Spanned<i64>>,
    pub(super) sticky: Option<Spanned<bool>>,
    pub(super) drain_idle: Option<Spanned<String>>,
    pub(super) drain_timeout: Option<Spanned<String>>,
    pub(super) flow_table: Option<Spanned<i64>>,
    pub(super) flow_idle: Option<Spanned<String>>,
    pub(super) restart_delay: Option<Spanned<String>>,
    pub(super) restart_delay_max: Option<Spanned<String>>,
    pub(super) restart_limit: Option<Spanned<i64>>,
    pub(super) restart_window: Option<Spanned<String>>,
    pub(super) stop_timeout: Option<Spanned<String>>,
    pub(super) ready_delay: Option<Spanned<String>>,
    pub(super) user: Option<Spanned<String>>,
    pub(super) group: Option<Spanned<String>>,
    pub(super) probe: Option<Spanned<String>>,
    pub(super) probe_interval: Option<Spanned<String>>,
    pub(super) probe_timeout: Option<Spanned<String>>,
    pub(super) probe_failures: Option<Spanned<i64>>,
    pub(super) quic: Option<Spanned<bool>>,
    pub(super) quic_config_id: Option<Spanned<i64>>,
    pub(super) quic_nonce_len: Option<Spanned<i64>>,
    pub(super) quic_encrypt: Option<Spanned<bool>>,
    /// How the service is named in problems: `service "dns"` or `service #2`.
    pub(super) label: String,
}

/// `listen` as written: one address (with `proto`), or a list of `PROTO:ADDRESS`.
#[derive(Clone, Debug)]
pub(super) enum RawListen {
    /// `listen = "127.0.0.1:5300"`.
    One(String),
    /// `listen = ["tcp:0.0.0.0:443", "udp:0.0.0.0:443"]`.
    Many(Vec<String>),
}

/// Every key a service may have.
const FIELDS: [&str; 28] = [
    "name",
    "proto",
    "listen",
    "workers",
    "command",
    "mode",
    "weight",
    "sticky",
    "drain_idle",
    "drain_timeout",
    "flow_table",
    "flow_idle",
    "restart_delay",
    "restart_delay_max",
    "restart_limit",
    "restart_window",
    "stop_timeout",
    "ready_delay",
    "user",
    "group",
    "probe",
    "probe_interval",
    "probe_timeout",
    "probe_failures",
    "quic",
    "quic_config_id",
    "quic_nonce_len",
    "quic_encrypt",
];

/// The keys a service must have.
const REQUIRED: [&str; 5] = ["name", "proto", "listen", "workers", "command"];

impl RawService {
    /// Reads service table number `index` (0-based), reporting each unknown key, each
    /// value of the wrong type and each missing key.
    pub(super) fn read(
        checker: &mut Checker<'_>,
        table: Spanned<BTreeMap<Spanned<String>, Spanned<Value>>>,
        index: usize,
    ) -> Self {
        let span = table.span();
        let table = table.into_inner();
        let label = table
            .iter()
            .find(|(key, _)| key.get_ref() == "name")
            .and_then(|(_, value)| value.get_ref().as_str())
            .filter(|name| is_valid_name(name))
            .map_or_else(
                || format!("service #{}", index + 1),
                |name| format!("service {name:?}"),
            );
        let mut raw = Self {
            span: span.clone(),
            label,
            ..Self::default()
        };
        let written: Vec<String> = table.keys().map(|key| key.get_ref().clone()).collect();
        // A list of listeners names each one's transport: `proto` is not needed then.
        let listen_list = table
            .iter()
            .any(|(key, value)| key.get_ref() == "listen" && value.get_ref().is_array());
        for (key, value) in table {
            raw.take(checker, key, value);
        }
        for field in REQUIRED {
            if field == "proto" && listen_list {
                continue;
            }
            if !written.iter().any(|key| key == field) {
                checker.report(
                    span.clone(),
                    raw.label.clone(),
                    format!(
                        "missing field `{field}`: every service needs {}",
                        REQUIRED.join(", ")
                    ),
                );
            }
        }
        raw
    }

    /// Takes one key: into its field if known and of the right type, else a problem.
    fn take(&mut self, checker: &mut Checker<'_>, key: Spanned<String>, value: Spanned<Value>) {
        let what = format!("{} field `{}`", self.label, key.get_ref());
        let mut typed = Typed {
            checker,
            what,
            value: &value,
        };
        match key.get_ref().as_str() {
            "name" => self.name = typed.string(),
            "proto" => self.proto = typed.string(),
            "listen" => self.listen = typed.listen(),
            "workers" => self.workers = typed.integer(),
            "command" => self.command = typed.strings(),
            "mode" => self.mode = typed.string(),
            "weight" => self.weight = typed.integer(),
            "sticky" => self.sticky = typed.boolean(),
            "drain_idle" => self.drain_idle = typed.string(),
            "drain_timeout" => self.drain_timeout = typed.string(),
            "flow_table" => self.flow_table = typed.integer(),
            "flow_idle" => self.flow_idle = typed.string(),
            "restart_delay" => self.restart_delay = typed.string(),
            "restart_delay_max" => self.restart_delay_max = typed.string(),
            "restart_limit" => self.restart_limit = typed.integer(),
            "restart_window" => self.restart_window = typed.string(),
            "stop_timeout" => self.stop_timeout = typed.string(),
            "ready_delay" => self.ready_delay = typed.string(),
            "user" => self.user = typed.string(),
            "group" => self.group = typed.string(),
            "probe" => self.probe = typed.string(),
            "probe_interval" => self.probe_interval = typed.string(),
            "probe_timeout" => self.probe_timeout = typed.string(),
            "probe_failures" => self.probe_failures = typed.integer(),
            "quic" => self.quic = typed.boolean(),
            "quic_config_id" => self.quic_config_id = typed.integer(),
            "quic_nonce_len" => self.quic_nonce_len = typed.integer(),
            "quic_encrypt" => self.quic_encrypt = typed.boolean(),
            unknown => {
                let hint = match closest(unknown) {
                    Some(field) => format!("did you mean `{field}`?"),
                    None => format!("a service takes {}", FIELDS.join(", ")),
                };
                checker.report(
                    key.span(),
                    self.label.clone(),
                    format!("unknown field `{unknown}`: {hint}"),
                );
            }
        }
    }
}

/// One value being read as its field's type.
struct Typed<'c, 'a, 'v> {
    checker: &'c mut Checker<'a>,
    what: String,
    value: &'v Spanned<Value>,
}

impl Typed<'_, '_, '_> {
    fn wrong(&mut self, expected: &str) {
        let found = describe(self.value.get_ref());
        self.checker.report(
            self.value.span(),
            self.what.clone(),
            format!("expected {expected}, found {found}"),
        );
    }

    fn spanned<T>(&self, value: T) -> Spanned<T> {
        Spanned::new(self.value.span(), value)
    }

    fn string(&mut self) -> Option<Spanned<String>> {
        match self.value.get_ref() {
            Value::String(s) => Some(self.spanned(s.clone())),
            _ => {
                self.wrong("a string");
                None
            }
        }
    }

    fn listen(&mut self) -> Option<Spanned<RawListen>> {
        let listen = match self.value.get_ref() {
            Value::String(s) => Some(RawListen::One(s.clone())),
            Value::Array(items) => items
                .iter()
                .map(|item| item.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .map(RawListen::Many),
            _ => None,
        };
        if listen.is_none() {
            self.wrong(
                "an address like \"127.0.0.1:5300\", or a list of listeners like [\"tcp:0.0.0.0:443\", \"udp:0.0.0.0:443\"]",
            );
        }
        listen.map(|l| self.spanned(l))
    }

    fn integer(&mut self) -> Option<Spanned<i64>> {
        match self.value.get_ref() {
            Value::Integer(i) => Some(self.spanned(*i)),
            _ => {
                self.wrong("a whole number");
                None
            }
        }
    }

    fn boolean(&mut self) -> Option<Spanned<bool>> {
        match self.value.get_ref() {
            Value::Boolean(b) => Some(self.spanned(*b)),
            _ => {
                self.wrong("true or false");
                None
            }
        }
    }

    fn strings(&mut self) -> Option<Spanned<Vec<String>>> {
        let strings = match self.value.get_ref() {
            Value::Array(items) => items
                .iter()
                .map(|item| item.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>(),
            _ => None,
        };
        if strings.is_none() {
            self.wrong("a list of strings, like [\"/usr/bin/my-server\", \"--flag\"]");
        }
        strings.map(|s| self.spanned(s))
    }
}

/// A value as a user would name it in a problem.
fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("the string {s:?}"),
        Value::Integer(i) => format!("the number {i}"),
        Value::Float(f) => format!("the number {f}"),
        Value::Boolean(b) => format!("{b}"),
        Value::Datetime(d) => format!("the date {d}"),
        Value::Array(_) => "a list".to_owned(),
        Value::Table(_) => "a table".to_owned(),
    }
}

/// The known field nearest to `unknown`, if a typo away (edit distance 2 at most).
fn closest(unknown: &str) -> Option<&'static str> {
    FIELDS
        .iter()
        .map(|field| (strsim::levenshtein(unknown, field), *field))
        .filter(|&(distance, _)| distance <= 2)
        .min()
        .map(|(_, field)| field)
}
