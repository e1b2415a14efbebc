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
            if let Action::Spawn { service, slot, .. } = action {
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

fn spawns(actions: &[Action<()>]) -> Vec<(Slot, bool, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn {
                slot,
                staged,
                generation,
                ..
            } => Some((*slot, *staged, *generation)),
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

#[test]
fn a_new_service_starts_its_workers_in_the_lowest_slots() {
    let mut sup = Supervisor::<()>::new();
    sup.handle(
        Instant::now(),
        Event::Added {
            spec: Box::new(service("")),
            launch: (),
            adoption: Adoption::default(),
        },
    );
    let actions: Vec<_> = std::iter::from_fn(|| sup.poll_action()).collect();
    assert_eq!(
        spawns(&actions),
        vec![(0, false, 1), (1, false, 1), (2, false, 1), (3, false, 1)]
    );
}

#[test]
fn a_dead_worker_is_healed_then_restarted_into_its_slot() {
    let mut h = Harness::with(service("restart_delay = \"100ms\""));
    let actions = h.crash(2);
    assert_eq!(table_ops(&actions), vec![TableOp::Remove(2)]);
    assert_eq!(
        timers(&actions),
        vec![(
            Duration::from_millis(100),
            Timer::RestartDue {
                service: 0,
                slot: 2
            }
        )]
    );
    assert!(matches!(h.run(2), SlotRun::Waiting));
    h.advance(Duration::from_millis(100));
    let actions = h.feed(Event::Timer(Timer::RestartDue {
        service: 0,
        slot: 2,
    }));
    assert_eq!(spawns(&actions), vec![(2, false, 1)]);
    match &actions[0] {
        Action::Spawn { restarts, .. } => assert_eq!(*restarts, 1),
        other => panic!("{other:?}"),
    }
    assert!(matches!(h.run(2), SlotRun::Serving(_)));
}

#[test]
fn backoff_doubles_with_each_crash_in_a_row_up_to_its_cap() {
    let mut h = Harness::with(service(
        "restart_delay = \"100ms\"\nrestart_delay_max = \"1s\"\nrestart_limit = 10\nrestart_window = \"60s\"",
    ));
    let mut delays = Vec::new();
    for _ in 0..6 {
        h.advance(Duration::from_millis(10));
        let actions = h.crash(1);
        let (after, timer) = timers(&actions)[0];
        delays.push(after.as_millis());
        h.advance(after);
        h.feed(Event::Timer(timer));
    }
    assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
    assert_eq!(
        backoff(Duration::from_secs(1), Duration::MAX, 1000),
        Duration::from_secs(1 << 20)
    );
}

#[test]
fn a_worker_that_lived_the_window_starts_the_backoff_again() {
    let mut h = Harness::with(service(
        "restart_delay = \"100ms\"\nrestart_window = \"10s\"",
    ));
    for _ in 0..3 {
        let (after, timer) = timers(&h.crash(0))[0];
        h.advance(after);
        h.feed(Event::Timer(timer));
    }
    h.advance(Duration::from_secs(10));
    let (after, _) = timers(&h.crash(0))[0];
    assert_eq!(after, Duration::from_millis(100));
}

#[test]
fn a_crash_loop_is_given_up_after_the_limit() {
    let mut h = Harness::with(service("restart_limit = 3\nrestart_window = \"60s\""));
    for _ in 0..3 {
        let (after, timer) = timers(&h.crash(3))[0];
        h.advance(after);
        h.feed(Event::Timer(timer));
    }
    let actions = h.crash(3);
    assert_eq!(table_ops(&actions), vec![TableOp::Remove(3)]);
    assert!(timers(&actions).is_empty(), "no restart after the limit");
    assert!(matches!(h.run(3), SlotRun::GaveUp));
    // Its entries stay with the heirs; the other slots serve on.
    assert!(!h.sup.services[0].members.contains_key(&3));
    assert_eq!(h.sup.services[0].members.len(), 3);
}

#[test]
fn several_workers_dying_at_once_each_heal_and_restart() {
    let mut h = Harness::with(service("restart_delay = \"50ms\""));
    let mut actions = Vec::new();
    for slot in [0, 1, 3] {
        actions.extend(h.crash(slot));
    }
    assert_eq!(
        table_ops(&actions),
        vec![TableOp::Remove(0), TableOp::Remove(1), TableOp::Remove(3)]
    );
    assert_eq!(timers(&actions).len(), 3);
    assert_eq!(h.sup.services[0].members.keys().collect::<Vec<_>>(), [&2]);
    h.advance(Duration::from_millis(50));
    let mut restarted = Vec::new();
    for (_, timer) in timers(&actions) {
        restarted.extend(spawns(&h.feed(Event::Timer(timer))));
    }
    assert_eq!(restarted, vec![(0, false, 1), (1, false, 1), (3, false, 1)]);
    assert_eq!(h.sup.services[0].members.len(), 4);
}

#[test]
fn a_failed_spawn_counts_as_a_crash_with_a_delay() {
    let mut h = Harness::with(service("restart_delay = \"100ms\""));
    let (_, timer) = timers(&h.crash(1))[0];
    h.sup.handle(h.now, Event::Timer(timer));
    let Some(Action::Spawn { slot, .. }) = h.sup.poll_action() else {
        panic!("no spawn");
    };
    h.sup.handle(
        h.now,
        Event::SpawnFailed {
            service: 0,
            slot,
            error: "exec failed".into(),
        },
    );
    let actions: Vec<_> = std::iter::from_fn(|| h.sup.poll_action()).collect();
    assert_eq!(timers(&actions)[0].0, Duration::from_millis(200));
    assert!(matches!(h.run(1), SlotRun::Waiting));
}

#[test]
fn an_old_exit_or_timer_changes_nothing() {
    let mut h = Harness::with(service(""));
    let pid = h.pid(0);
    let stale = h.feed(Event::Exited {
        service: 0,
        slot: 0,
        pid: pid + 1000,
        exit: Exit::Code(0),
    });
    assert!(stale.is_empty());
    let due = h.feed(Event::Timer(Timer::RestartDue {
        service: 0,
        slot: 0,
    }));
    assert!(due.is_empty(), "slot 0 is served, not waiting");
    assert!(
        h.feed(Event::Timer(Timer::StopOverdue {
            service: 0,
            slot: 0,
            pid: 1
        }))
        .is_empty()
    );
}

#[test]
fn a_hung_worker_is_killed_after_its_failures_and_excuses_do_not_count() {
    let mut h = Harness::with(service("probe = \"udp:ping\"\nprobe_failures = 2"));
    let pid = h.pid(1);
    let probed = |outcome| Event::Probed {
        service: 0,
        slot: 1,
        pid,
        outcome,
    };
    assert!(signals(&h.feed(probed(Outcome::Answered))).is_empty());
    assert!(signals(&h.feed(probed(Outcome::Unanswered))).is_empty());
    let excused = Outcome::Excused(crate::probe::Excuse::WorkerBusy);
    assert!(signals(&h.feed(probed(excused))).is_empty());
    let actions = h.feed(probed(Outcome::Unanswered));
    assert_eq!(signals(&actions), vec![(1, pid, Signal::Kill)]);
    assert!(actions.contains(&Action::Unprobe {
        service: 0,
        slot: 1
    }));
    let counts = h.sup.probe_outcomes()[&("dns".to_owned(), 1)];
    assert_eq!(counts.named().iter().map(|(_, n)| n).sum::<u64>(), 4);
    // Its death is a crash like any other: healed and restarted.
    let actions = h.crash(1);
    assert_eq!(table_ops(&actions), vec![TableOp::Remove(1)]);
}

#[test]
fn every_worker_of_a_probed_service_is_probed() {
    let mut sup = Supervisor::<()>::new();
    sup.handle(
        Instant::now(),
        Event::Added {
            spec: Box::new(service("proto = \"tcp\"\nprobe = \"tcp\"\nworkers = 2")),
            launch: (),
            adoption: Adoption::default(),
        },
    );
    for slot in 0..2 {
        sup.poll_action();
        sup.handle(
            Instant::now(),
            Event::Spawned {
                service: 0,
                slot,
                pid: 10 + u32::from(slot),
            },
        );
    }
    let probes: Vec<_> = std::iter::from_fn(|| sup.poll_action())
        .filter_map(|a| match a {
            Action::Probe { slot, pid, .. } => Some((slot, pid)),
            _ => None,
        })
        .collect();
    assert_eq!(probes, vec![(0, 10), (1, 11)]);
}

fn reload_event(spec: Service) -> Event<()> {
    Event::Control {
        command: Command::Reload {
            spec: Box::new(spec),
            launch: (),
        },
        reply: ReplyTo(7),
    }
}

#[test]
fn a_reload_stages_waits_switches_and_retires_the_old_generation() {
    let mut h = Harness::with(service(
        "workers = 2\nready_delay = \"1s\"\ndrain_idle = \"2s\"",
    ));
    let new = service("workers = 2\nready_delay = \"1s\"\ndrain_idle = \"2s\"\nweight = 3");
    // Stage: the new generation in free slots, owning nothing yet.
    let actions = h.feed(reload_event(new));
    assert_eq!(spawns(&actions), vec![(2, true, 2), (3, true, 2)]);
    assert!(table_ops(&actions).is_empty(), "staged slots own no entry");
    let (after, ready) = timers(&actions)[0];
    assert_eq!(after, Duration::from_secs(1));
    assert!(matches!(replies(&actions)[..], [Reply::Progress { .. }]));
    assert_eq!(h.sup.staged(0), vec![(2, h.pid(2)), (3, h.pid(3))]);
    // Ready: one table change switches every old member to a new slot.
    h.advance(after);
    let actions = h.feed_table_ok(Event::Timer(ready), 65536);
    assert_eq!(
        table_ops(&actions),
        vec![TableOp::Switch {
            old: vec![0, 1],
            new: vec![2, 3],
            weight: 3
        }]
    );
    let replies = replies(&actions);
    assert!(matches!(
        replies.last(),
        Some(Reply::Done { moved: 65536, .. })
    ));
    assert_eq!(h.sup.services[0].generation, 2);
    assert_eq!(h.sup.services[0].members, [(2, 3), (3, 3)].into());
    // Retire: the old workers are stopped once idle for drain_idle.
    assert_eq!(h.sup.retiring().len(), 2);
    let old = [(0, h.pid(0)), (1, h.pid(1))];
    let busy = |delivered| {
        old.iter()
            .map(|&(slot, _)| (0, slot, Activity::Delivered(delivered)))
            .collect::<Vec<_>>()
    };
    h.feed(Event::Tick { activity: busy(5) });
    h.advance(Duration::from_secs(1));
    assert!(signals(&h.feed(Event::Tick { activity: busy(9) })).is_empty());
    h.advance(Duration::from_secs(2));
    let actions = h.feed(Event::Tick { activity: busy(9) });
    assert_eq!(
        signals(&actions),
        vec![(0, old[0].1, Signal::Term), (1, old[1].1, Signal::Term)]
    );
    // Their exits free their slots; nothing restarts.
    for (slot, pid) in old {
        let actions = h.feed(Event::Exited {
            service: 0,
            slot,
            pid,
            exit: Exit::Code(0),
        });
        assert_eq!(table_ops(&actions), vec![TableOp::Release(slot)]);
        assert!(timers(&actions).is_empty());
    }
}

#[test]
fn a_retiring_worker_is_stopped_at_its_drain_timeout_even_if_busy_and_killed_if_deaf() {
    let mut h = Harness::with(service(
        "workers = 1\nproto = \"tcp\"\nready_delay = \"1ms\"\ndrain_timeout = \"5s\"\nstop_timeout = \"1s\"",
    ));
    let actions = h.feed(reload_event(service(
        "workers = 1\nproto = \"tcp\"\nready_delay = \"1ms\"\ndrain_timeout = \"5s\"\nstop_timeout = \"1s\"",
    )));
    let (_, ready) = timers(&actions)[0];
    h.feed_table_ok(Event::Timer(ready), 1);
    let pid = h.pid(0);
    h.advance(Duration::from_secs(5));
    let actions = h.feed(Event::Tick {
        activity: vec![(0, 0, Activity::Connections(3))],
    });
    assert_eq!(signals(&actions), vec![(0, pid, Signal::Term)]);
    let (after, overdue) = timers(&actions)[0];
    assert_eq!(after, Duration::from_secs(1));
    assert_eq!(
        signals(&h.feed(Event::Timer(overdue))),
        vec![(0, pid, Signal::Kill)]
    );
}

#[test]
fn a_staged_worker_that_exits_rolls_the_reload_back() {
    let mut h = Harness::with(service("workers = 2"));
    let actions = h.feed(reload_event(service("workers = 2\ncommand = [\"new\"]")));
    let (_, ready) = timers(&actions)[0];
    let (staged_pid, other_pid) = (h.pid(2), h.pid(3));
    let actions = h.feed(Event::Exited {
        service: 0,
        slot: 2,
        pid: staged_pid,
        exit: Exit::Code(1),
    });
    assert_eq!(signals(&actions), vec![(3, other_pid, Signal::Kill)]);
    assert_eq!(
        table_ops(&actions),
        vec![TableOp::Release(2), TableOp::Release(3)]
    );
    match replies(&actions).last() {
        Some(Reply::Error { kind, message }) => {
            assert_eq!(*kind, crate::control::ErrorKind::RolledBack);
            assert!(message.contains("generation 1 keeps serving"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // The old generation never stopped; the old attempt's timer does nothing.
    assert_eq!(h.sup.services[0].generation, 1);
    assert_eq!(h.sup.services[0].members.len(), 2);
    assert!(h.feed(Event::Timer(ready)).is_empty());
}

#[test]
fn a_refused_switch_rolls_back() {
    let mut h = Harness::with(service("workers = 1"));
    let actions = h.feed(reload_event(service("workers = 1")));
    let (_, ready) = timers(&actions)[0];
    let actions = h.feed(Event::Timer(ready));
    let Some(Action::Table {
        ticket: Some(ticket),
        ..
    }) = actions.first().cloned()
    else {
        panic!("{actions:?}")
    };
    let actions = h.feed(Event::TableDone {
        ticket,
        result: Err("map update failed".into()),
    });
    assert!(matches!(
        replies(&actions).last(),
        Some(Reply::Error { message, .. }) if message.contains("map update failed")
    ));
    assert_eq!(h.sup.services[0].members, [(0, 1)].into());
}

#[test]
fn a_staged_worker_must_answer_a_readiness_probe_before_the_switch() {
    let text = "workers = 1\nready_delay = \"1s\"\nprobe = \"udp:ping\"\nprobe_interval = \"1s\"\nprobe_failures = 2";
    let mut h = Harness::with(service(text));
    let actions = h.feed(reload_event(service(text)));
    let (after, ready) = timers(&actions)[0];
    h.advance(after);
    // Not answered yet: wait one more interval, and tell the requester once.
    let actions = h.feed(Event::Timer(ready));
    assert!(table_ops(&actions).is_empty());
    assert!(matches!(replies(&actions)[..], [Reply::Progress { .. }]));
    let (after, ready) = timers(&actions)[0];
    let staged = h.pid(1);
    h.feed(Event::Probed {
        service: 0,
        slot: 1,
        pid: staged,
        outcome: Outcome::Answered,
    });
    h.advance(after);
    let actions = h.feed_table_ok(Event::Timer(ready), 65536);
    assert!(matches!(table_ops(&actions)[..], [TableOp::Switch { .. }]));
}

#[test]
fn a_staged_worker_that_never_answers_rolls_back() {
    let text = "workers = 1\nready_delay = \"1s\"\nprobe = \"udp:ping\"\nprobe_interval = \"1s\"\nprobe_timeout = \"100ms\"\nprobe_failures = 2";
    let mut h = Harness::with(service(text));
    let actions = h.feed(reload_event(service(text)));
    let (_, mut ready) = timers(&actions)[0];
    let mut last = Vec::new();
    for _ in 0..5 {
        h.advance(Duration::from_secs(1));
        last = h.feed(Event::Timer(ready));
        match timers(&last).first() {
            Some(&(_, next)) => ready = next,
            None => break,
        }
    }
    assert!(matches!(
        replies(&last).last(),
        Some(Reply::Error { message, .. }) if message.contains("answered no readiness probe")
    ));
    assert_eq!(h.sup.services[0].generation, 1);
}

#[test]
fn a_second_reload_and_too_few_free_slots_are_refused() {
    // While the old generation drains, the whole of a second one does not fit.
    let mut h = Harness::with(service("workers = 256"));
    let actions = h.feed(reload_event(service("workers = 256")));
    let (_, ready) = timers(&actions)[0];
    h.feed_table_ok(Event::Timer(ready), 65536);
    let refused = h.feed(reload_event(service("workers = 256")));
    assert!(spawns(&refused).is_empty());
    assert!(matches!(
        replies(&refused)[..],
        [Reply::Error { ref message, .. }] if message.contains("needs 256 slots but only 0 of 512 are free")
    ));
    let mut h = Harness::with(service("workers = 2"));
    h.feed(reload_event(service("workers = 2")));
    let refused = h.feed(reload_event(service("workers = 2")));
    assert!(matches!(
        replies(&refused)[..],
        [Reply::Error { ref message, .. }] if message.contains("already being started")
    ));
    let moved = service("workers = 2\nlisten = \"127.0.0.1:5301\"");
    let mut h = Harness::with(service("workers = 2"));
    let refused = h.feed(reload_event(moved));
    assert!(matches!(
        replies(&refused)[..],
        [Reply::Error { ref message, .. }] if message.contains("cannot change")
    ));
}

#[test]
fn drain_and_weight_move_through_the_table_and_refusals_name_what_exists() {
    let mut h = Harness::with(service("workers = 2"));
    let ask = |command| Event::Control {
        command,
        reply: ReplyTo(1),
    };
    let drain = |slot| {
        ask(Command::Drain {
            service: "dns".into(),
            slot,
        })
    };
    let actions = h.feed_table_ok(drain(0), 32768);
    assert_eq!(table_ops(&actions), vec![TableOp::Drain(0)]);
    assert!(
        matches!(replies(&actions)[..], [Reply::Done { moved: 32768, ref message }] if message.contains("32768 entries moved"))
    );
    let again = h.feed(drain(0));
    assert!(
        matches!(replies(&again)[..], [Reply::Error { ref message, .. }] if message.contains("already draining"))
    );
    let last = h.feed(drain(1));
    assert!(
        matches!(replies(&last)[..], [Reply::Error { ref message, .. }] if message.contains("only slot taking new work"))
    );
    let actions = h.feed_table_ok(
        ask(Command::Weight {
            service: "dns".into(),
            slot: 0,
            weight: 5,
        }),
        100,
    );
    assert_eq!(
        table_ops(&actions),
        vec![TableOp::Admit { slot: 0, weight: 5 }]
    );
    let unknown = h.feed(ask(Command::Drain {
        service: "web".into(),
        slot: 0,
    }));
    assert!(
        matches!(replies(&unknown)[..], [Reply::Error { ref message, .. }] if message.contains("this daemon serves dns"))
    );
    let empty = h.feed(drain(7));
    assert!(
        matches!(replies(&empty)[..], [Reply::Error { ref message, .. }] if message.contains("slots [0, 1]"))
    );
    let out_of_range = h.feed(drain(600));
    assert!(
        matches!(replies(&out_of_range)[..], [Reply::Error { ref message, .. }] if message.contains("0 to 511"))
    );
}

#[test]
fn a_refused_weight_leaves_the_membership_as_it_was() {
    let mut h = Harness::with(service("workers = 2"));
    let actions = h.feed(Event::Control {
        command: Command::Weight {
            service: "dns".into(),
            slot: 1,
            weight: 0,
        },
        reply: ReplyTo(1),
    });
    let Some(Action::Table {
        ticket: Some(ticket),
        ..
    }) = actions.first().cloned()
    else {
        panic!("{actions:?}")
    };
    let actions = h.feed(Event::TableDone {
        ticket,
        result: Err("weight 0 is out of range".into()),
    });
    assert!(matches!(replies(&actions)[..], [Reply::Error { .. }]));
    assert_eq!(h.sup.services[0].members, [(0, 1), (1, 1)].into());
}

#[test]
fn adoption_keeps_live_workers_restarts_dead_ones_and_rolls_back_a_half_done_reload() {
    let record = |slot, state, generation, alive| AdoptedSlot {
        slot,
        state,
        pid: 500 + u32::from(slot),
        generation,
        restarts: 2,
        alive,
    };
    let adoption = Adoption {
        generation: 3,
        members: [(0, 1), (1, 1), (2, 1)].into(),
        slots: vec![
            record(0, SlotState::Live, 3, true),
            record(1, SlotState::Live, 3, false),
            record(2, SlotState::Draining, 3, true),
            record(4, SlotState::Draining, 2, true),
            record(5, SlotState::Draining, 2, false),
            record(6, SlotState::Starting, 4, true),
            record(7, SlotState::Starting, 4, false),
        ],
    };
    let mut sup = Supervisor::<()>::new();
    let now = Instant::now();
    sup.handle(
        now,
        Event::Added {
            spec: Box::new(service("workers = 3")),
            launch: (),
            adoption,
        },
    );
    let actions: Vec<_> = std::iter::from_fn(|| sup.poll_action()).collect();
    assert_eq!(
        table_ops(&actions),
        vec![
            TableOp::Remove(1),
            TableOp::Release(5),
            TableOp::Release(6),
            TableOp::Release(7),
        ]
    );
    assert_eq!(signals(&actions), vec![(6, 506, Signal::Kill)]);
    // The dead current slot restarts at once, with its restart count.
    assert_eq!(
        timers(&actions),
        vec![(
            Duration::ZERO,
            Timer::RestartDue {
                service: 0,
                slot: 1
            }
        )]
    );
    let running = &sup.services[0];
    assert_eq!(running.generation, 3);
    assert!(
        matches!(&running.slots[&0], SlotRun::Serving(w) if w.role == Role::Current && w.pid == 500)
    );
    assert!(matches!(&running.slots[&2], SlotRun::Serving(w) if w.role == Role::Current));
    assert!(running.drained.contains(&2));
    assert!(
        matches!(&running.slots[&4], SlotRun::Serving(w) if matches!(w.role, Role::Retiring(_)))
    );
    assert!(matches!(&running.slots[&6], SlotRun::Serving(w) if w.stopping));
    assert_eq!(running.crashes[&1].restarts, 2);
    // The killed half-started worker's exit rolls nothing back and frees its slot again.
    sup.handle(
        now,
        Event::Exited {
            service: 0,
            slot: 6,
            pid: 506,
            exit: Exit::Unknown,
        },
    );
    let actions: Vec<_> = std::iter::from_fn(|| sup.poll_action()).collect();
    assert_eq!(table_ops(&actions), vec![TableOp::Release(6)]);
    assert!(replies(&actions).is_empty());
}

#[test]
fn hangup_adds_services_resizes_and_reloads_on_a_new_command() {
    let mut h = Harness::with(service("workers = 2"));
    let both = config(
        "[[service]]\nname = \"dns\"\nproto = \"udp\"\nlisten = \"127.0.0.1:5300\"\nworkers = 3\ncommand = [\"srv\"]\nweight = 2\n\
         [[service]]\nname = \"web\"\nproto = \"tcp\"\nlisten = \"127.0.0.1:8080\"\nworkers = 1\ncommand = [\"web\"]\n",
    );
    let actions = h.feed(Event::Hangup(both.into_iter().map(|s| (s, ())).collect()));
    assert_eq!(
        table_ops(&actions),
        vec![
            TableOp::SetWeight { slot: 0, weight: 2 },
            TableOp::SetWeight { slot: 1, weight: 2 },
            TableOp::SetFlags(0),
        ]
    );
    assert_eq!(spawns(&actions), vec![(2, false, 1)]);
    assert!(matches!(&actions.last(), Some(Action::AddService { spec, .. }) if spec.name == "web"));
    // Fewer workers: the highest current slot retires.
    let actions = h.feed(Event::Hangup(vec![(
        service("workers = 2\nweight = 2"),
        (),
    )]));
    assert_eq!(
        table_ops(&actions),
        vec![TableOp::SetFlags(0), TableOp::Drain(2)]
    );
    assert_eq!(h.sup.retiring(), vec![(0, 2, h.pid(2))]);
    // The same config again changes nothing.
    assert!(
        h.feed(Event::Hangup(vec![(
            service("workers = 2\nweight = 2"),
            ()
        )]))
        .is_empty()
    );
    // A new command takes a new generation.
    let actions = h.feed(Event::Hangup(vec![(
        service("workers = 2\nweight = 2\ncommand = [\"srv2\"]"),
        (),
    )]));
    assert_eq!(spawns(&actions), vec![(3, true, 2), (4, true, 2)]);
    // A change of what the pins record is refused: nothing happens.
    let actions = h.feed(Event::Hangup(vec![(
        service("workers = 2\nproto = \"tcp\""),
        (),
    )]));
    assert!(actions.is_empty());
}

#[test]
fn a_stop_terms_every_worker_kills_the_deaf_and_restarts_nothing() {
    let mut h = Harness::with(service("workers = 2\nstop_timeout = \"3s\""));
    let (a, b) = (h.pid(0), h.pid(1));
    let actions = h.feed(Event::Stop);
    assert_eq!(
        signals(&actions),
        vec![(0, a, Signal::Term), (1, b, Signal::Term)]
    );
    assert!(!h.sup.is_stopped());
    let exited = h.feed(Event::Exited {
        service: 0,
        slot: 0,
        pid: a,
        exit: Exit::Signal(15),
    });
    assert!(timers(&exited).is_empty(), "nothing restarts during a stop");
    let (_, overdue) = timers(&actions)[1];
    assert_eq!(
        signals(&h.feed(Event::Timer(overdue))),
        vec![(1, b, Signal::Kill)]
    );
    h.feed(Event::Exited {
        service: 0,
        slot: 1,
        pid: b,
        exit: Exit::Signal(9),
    });
    assert!(h.sup.is_stopped());
}

#[test]
fn exits_read_as_words() {
    assert_eq!(Exit::Code(3).to_string(), "exit code 3");
    assert_eq!(Exit::Signal(9).to_string(), "signal 9 (SIGKILL)");
}
