//! Every transition of the supervisor, driven by events with a test clock: no root, no
//! processes, no kernel. The daemon's integration tests check the same on real workers.
use std::path::Path;

use super::*;
use portshard_common::SlotState;

use super::slots::backoff;
use crate::{config::Config, probe::Outcome};

/// A supervisor with a clock, answering spawns with made-up pids.
struct Harness {
    sup: Supervisor<()>,
    now: Instant,
    next_pid: u32,
}

fn config(text: &str) -> Vec<Service> {
    Config::parse(text, Path::new("test.toml"))
        .unwrap_or_else(|e| panic!("{e}"))
        .services
}

/// Service "dns" (UDP, 4 workers) with the `key = value` lines of `extra` replacing or
/// adding to its defaults.
fn service(extra: &str) -> Service {
    let mut keys: Vec<(String, String)> = [
        ("name", "\"dns\""),
        ("proto", "\"udp\""),
        ("listen", "\"127.0.0.1:5300\""),
        ("workers", "4"),
        ("command", "[\"srv\"]"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for line in extra.lines() {
        let (key, value) = line.split_once(" = ").expect("key = value");
        keys.retain(|(k, _)| k != key);
        if key == "listen" && value.starts_with('[') {
            keys.retain(|(k, _)| k != "proto");
        }
        keys.push((key.to_owned(), value.to_owned()));
    }
    let body: String = keys.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
    config(&format!("[[service]]\n{body}")).remove(0)
}

impl Harness {
    /// One service from `spec`, every worker spawned.
    fn with(spec: Service) -> Self {
        let mut h = Self {
            sup: Supervisor::new(),
            now: Instant::now(),
            next_pid: 100,
        };
        h.feed(Event::Added {
            spec: Box::new(spec),
            launch: (),
            adoption: Adoption::default(),
        });
        h
    }

    /// Handles `event`, answers every spawn with a new pid (and its follow-ups), and
    /// returns the other actions, in order.
    fn feed(&mut self, event: Event<()>) -> Vec<Action<()>> {
        self.sup.handle(self.now, event);
        let mut out = Vec::new();
        while let Some(action) = self.sup.poll_action() {
            if let Action::Spawn(Spawn { service, slot, .. }) = action {
                self.next_pid += 1;
                let pid = self.next_pid;
                out.push(action);
                self.sup
                    .handle(self.now, Event::Spawned { service, slot, pid });
            } else {
                out.push(action);
            }
        }
        out
    }

    /// Handles `event` and answers every table change with `moved` entries.
    fn feed_table_ok(&mut self, event: Event<()>, moved: u32) -> Vec<Action<()>> {
        let mut out = self.feed(event);
        let mut i = 0;
        while i < out.len() {
            if let Action::Table {
                ticket: Some(ticket),
                ..
            } = out[i]
            {
                let more = self.feed(Event::TableDone {
                    ticket,
                    result: Ok(moved),
                });
                out.extend(more);
            }
            i += 1;
        }
        out
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    /// The pid serving `slot` of service 0.
    fn pid(&self, slot: Slot) -> u32 {
        match self.sup.services[0].slots.get(&slot) {
            Some(SlotRun::Serving(worker)) => worker.pid,
            other => panic!("slot {slot} is not served: {other:?}"),
        }
    }

    fn run(&self, slot: Slot) -> &SlotRun {
        &self.sup.services[0].slots[&slot]
    }

    fn crash(&mut self, slot: Slot) -> Vec<Action<()>> {
        let pid = self.pid(slot);
        self.feed(Event::Exited {
            service: 0,
            slot,
            pid,
            exit: Exit::Signal(9),
        })
    }
}

/// The ticket of the first action, a table change whose outcome is awaited.
fn first_ticket(actions: &[Action<()>]) -> u64 {
    match actions.first() {
        Some(Action::Table {
            ticket: Some(ticket),
            ..
        }) => *ticket,
        _ => panic!("no awaited table change first: {actions:?}"),
    }
}

fn spawns(actions: &[Action<()>]) -> Vec<(Slot, bool, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn(Spawn {
                slot,
                staged,
                generation,
                ..
            }) => Some((*slot, *staged, *generation)),
            _ => None,
        })
        .collect()
}

fn timers(actions: &[Action<()>]) -> Vec<(Duration, Timer)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Timer { after, timer } => Some((*after, *timer)),
            _ => None,
        })
        .collect()
}

fn table_ops(actions: &[Action<()>]) -> Vec<TableOp> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Table { op, .. } if !matches!(op, TableOp::SetHealth { .. }) => {
                Some(op.clone())
            }
            _ => None,
        })
        .collect()
}

fn signals(actions: &[Action<()>]) -> Vec<(Slot, u32, Signal)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Signal {
                slot, pid, signal, ..
            } => Some((*slot, *pid, *signal)),
            _ => None,
        })
        .collect()
}

fn replies(actions: &[Action<()>]) -> Vec<Reply> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Reply { reply, .. } => Some(reply.clone()),
            _ => None,
        })
        .collect()
}

mod adopt;
mod control;
mod lifecycle;
mod reload;
mod slots;

#[test]
fn the_switches_name_each_listeners_index_by_its_kind() {
    use portshard_common::{TABLE_FLOWS, listener_index, listener_kind};
    let single = Supervisor::<()>::table_switches(&service(""));
    assert_eq!(
        single.flags, 0,
        "a single listener leaves every listener bit 0"
    );
    let spec = service(
        "listen = [\"udp:[::1]:443\", \"tcp:127.0.0.1:443\", \"udp:127.0.0.1:443\"]\nsticky = true",
    );
    let flags = Supervisor::<()>::table_switches(&spec).flags;
    assert_eq!(flags & TABLE_FLOWS, TABLE_FLOWS);
    assert_eq!(listener_index(flags, listener_kind(true, true)), 0);
    assert_eq!(listener_index(flags, listener_kind(false, false)), 1);
    assert_eq!(listener_index(flags, listener_kind(true, false)), 2);
    assert_eq!(listener_index(flags, listener_kind(false, true)), 0);
}
