//! A slot's life: start, death and healing, backoff, crash loops, probes, stop.
use super::*;

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
        Action::Spawn(Spawn { restarts, .. }) => assert_eq!(*restarts, 1),
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
    let Some(Action::Spawn(Spawn { slot, .. })) = h.sup.poll_action() else {
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

#[test]
fn a_stop_gives_up_on_a_worker_that_survives_sigkill() {
    let mut h = Harness::with(service("workers = 1\nstop_timeout = \"1s\""));
    let pid = h.pid(0);
    let actions = h.feed(Event::Stop);
    let (_, overdue) = timers(&actions)[0];
    let killed = h.feed(Event::Timer(overdue));
    assert_eq!(signals(&killed), vec![(0, pid, Signal::Kill)]);
    let (after, given_up) = timers(&killed)[0];
    assert_eq!(after, KILL_GRACE);
    assert!(!h.sup.is_stopped());
    h.feed(Event::Timer(given_up));
    assert!(h.sup.is_stopped());
}
