//! Generations: stage, ready, switch, retire, rollback, refusals.
use super::*;

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
    // Ready: one table change switches every old member to a new slot, and the new
    // generation's settings reach the program.
    h.advance(after);
    let actions = h.feed_table_ok(Event::Timer(ready), 65536);
    assert_eq!(
        table_ops(&actions),
        vec![
            TableOp::Switch {
                old: vec![0, 1],
                new: vec![2, 3],
                weight: 3
            },
            TableOp::SetSwitches(Switches {
                flags: 0,
                flow_idle_s: 120
            })
        ]
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
fn a_retiring_worker_with_udp_and_tcp_listeners_is_busy_while_either_shows_activity() {
    let text = "workers = 1\nlisten = [\"tcp:127.0.0.1:443\", \"udp:127.0.0.1:443\"]\nready_delay = \"1ms\"\ndrain_idle = \"2s\"";
    let mut h = Harness::with(service(text));
    let actions = h.feed(reload_event(service(text)));
    let (_, ready) = timers(&actions)[0];
    h.feed_table_ok(Event::Timer(ready), 1);
    let pid = h.pid(0);
    let tick = |h: &mut Harness, delivered, connections| {
        let activity = vec![(
            0,
            0,
            Activity::Both {
                delivered,
                connections,
            },
        )];
        signals(&h.feed(Event::Tick { activity }))
    };
    // Datagrams keep arriving: busy, though no connection is open.
    assert!(tick(&mut h, 1, 0).is_empty());
    h.advance(Duration::from_secs(2));
    assert!(tick(&mut h, 5, 0).is_empty());
    // No more datagrams, but a connection stays open: still busy.
    h.advance(Duration::from_secs(2));
    assert!(tick(&mut h, 5, 1).is_empty());
    // Neither for drain_idle: stopped.
    h.advance(Duration::from_secs(1));
    assert!(tick(&mut h, 5, 0).is_empty());
    h.advance(Duration::from_secs(1));
    assert_eq!(tick(&mut h, 5, 0), vec![(0, pid, Signal::Term)]);
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
    let ticket = first_ticket(&actions);
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
    assert!(matches!(
        table_ops(&actions)[..],
        [TableOp::Switch { .. }, TableOp::SetSwitches(_)]
    ));
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
fn a_staged_worker_that_starts_after_a_rollback_is_killed_and_never_joins() {
    let mut h = Harness::with(service("workers = 1"));
    // Both new workers' spawns are asked for at once; the first fails, the second starts.
    h.sup.handle(h.now, reload_event(service("workers = 2")));
    let asked: Vec<_> = std::iter::from_fn(|| h.sup.poll_action()).collect();
    assert_eq!(spawns(&asked), vec![(1, true, 2), (2, true, 2)]);
    let failed = h.feed(Event::SpawnFailed {
        service: 0,
        slot: 1,
        error: "exec failed".into(),
    });
    assert!(matches!(
        replies(&failed).last(),
        Some(Reply::Error { message, .. }) if message.contains("exec failed")
    ));
    let late = h.feed(Event::Spawned {
        service: 0,
        slot: 2,
        pid: 777,
    });
    assert_eq!(signals(&late), vec![(2, 777, Signal::Kill)]);
    assert!(!late.iter().any(|a| matches!(a, Action::Probe { .. })));
    assert_eq!(h.sup.services[0].members, [(0, 1)].into());
    // Its exit frees its slot and rolls nothing back.
    let exited = h.feed(Event::Exited {
        service: 0,
        slot: 2,
        pid: 777,
        exit: Exit::Signal(9),
    });
    assert_eq!(table_ops(&exited), vec![TableOp::Release(2)]);
    assert!(replies(&exited).is_empty());
}

#[test]
fn a_rolled_back_worker_keeps_its_slot_until_it_has_exited() {
    // One staged worker's exit rolls the reload back: the other is killed.
    let mut h = Harness::with(service("workers = 2"));
    h.feed(reload_event(service("workers = 2")));
    let (first, second) = (h.pid(2), h.pid(3));
    let actions = h.feed(Event::Exited {
        service: 0,
        slot: 2,
        pid: first,
        exit: Exit::Code(1),
    });
    assert_eq!(signals(&actions), vec![(3, second, Signal::Kill)]);
    assert!(matches!(h.run(3), SlotRun::Serving(w) if w.stopping));
    // A new reload cannot take slot 3 while its killed worker still holds it.
    let retry = h.feed(reload_event(service("workers = 2")));
    assert_eq!(spawns(&retry), vec![(2, true, 2), (4, true, 2)]);
}

#[test]
fn a_hung_staged_worker_stops_being_probed() {
    let text = "workers = 1\nprobe = \"udp:ping\"\nprobe_failures = 1";
    let mut h = Harness::with(service(text));
    h.feed(reload_event(service(text)));
    let staged = h.pid(1);
    let actions = h.feed(Event::Probed {
        service: 0,
        slot: 1,
        pid: staged,
        outcome: Outcome::Unanswered,
    });
    assert!(actions.contains(&Action::Unprobe {
        service: 0,
        slot: 1
    }));
    assert!(matches!(
        replies(&actions).last(),
        Some(Reply::Error { .. })
    ));
}

#[test]
fn a_stop_rolls_back_a_reload_and_takes_no_more_changes() {
    let mut h = Harness::with(service("workers = 1\nready_delay = \"1s\""));
    let actions = h.feed(reload_event(service("workers = 1\nready_delay = \"1s\"")));
    let (_, ready) = timers(&actions)[0];
    let (old, new) = (h.pid(0), h.pid(1));
    let stopping = h.feed(Event::Stop);
    assert!(matches!(
        replies(&stopping).last(),
        Some(Reply::Error { message, .. }) if message.contains("portshard is stopping")
    ));
    assert_eq!(
        signals(&stopping),
        vec![(1, new, Signal::Kill), (0, old, Signal::Term)]
    );
    // No switch, no reload, no SIGHUP change, no restart while stopping.
    assert!(h.feed(Event::Timer(ready)).is_empty());
    let refused = h.feed(reload_event(service("workers = 1")));
    assert!(matches!(
        replies(&refused)[..],
        [Reply::Error { ref message, .. }] if message.contains("the daemon is stopping")
    ));
    assert!(spawns(&refused).is_empty());
    let hangup = h.feed(Event::Hangup {
        services: vec![(service("workers = 3"), ())],
        named: vec!["dns".to_owned()],
    });
    assert!(hangup.is_empty());
    for (slot, pid) in [(0, old), (1, new)] {
        h.feed(Event::Exited {
            service: 0,
            slot,
            pid,
            exit: Exit::Signal(15),
        });
    }
    assert!(h.sup.is_stopped());
}
