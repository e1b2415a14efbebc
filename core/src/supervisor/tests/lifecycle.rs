//! Readiness (what `READY=1` waits for) and services taken out of the config at SIGHUP.
use super::*;

fn hangup(services: Vec<Service>) -> Event<()> {
    let named = services.iter().map(|s| s.name.clone()).collect();
    Event::Hangup {
        services: services.into_iter().map(|s| (s, ())).collect(),
        named,
    }
}

#[test]
fn ready_once_every_worker_runs_and_answers_its_probe() {
    let mut h = Harness::with(service("workers = 2\nprobe = \"udp:ping\""));
    assert_eq!(h.sup.serving(), (0, 2));
    assert!(!h.sup.is_ready(), "spawned but not probed yet");
    let answered = |slot, pid| Event::Probed {
        service: 0,
        slot,
        pid,
        outcome: Outcome::Answered,
    };
    let first = h.pid(0);
    h.feed(answered(0, first));
    assert_eq!(h.sup.serving(), (1, 2));
    assert!(!h.sup.is_ready());
    let second = h.pid(1);
    h.feed(answered(1, second));
    assert_eq!(h.sup.serving(), (2, 2));
    assert!(h.sup.is_ready());
    h.feed(Event::Probed {
        service: 0,
        slot: 1,
        pid: second,
        outcome: Outcome::Unanswered,
    });
    assert!(
        !h.sup.is_ready(),
        "a worker failing its probe is not serving"
    );
}

#[test]
fn ready_without_probes_once_spawned_and_not_during_a_reload_or_stop() {
    let mut h = Harness::with(service("workers = 2\nready_delay = \"1ms\""));
    assert!(h.sup.is_ready());
    let actions = h.feed(Event::Control {
        command: Command::Reload {
            spec: Box::new(service(
                "workers = 2\nready_delay = \"1ms\"\ncommand = [\"srv2\"]",
            )),
            launch: (),
        },
        reply: ReplyTo(1),
    });
    assert!(!h.sup.is_ready(), "a reload is under way");
    let (_, ready) = timers(&actions)[0];
    h.feed_table_ok(Event::Timer(ready), 7);
    assert!(h.sup.is_ready(), "the new generation serves");
    h.feed(Event::Stop);
    assert!(!h.sup.is_ready());
}

#[test]
fn a_slot_given_up_on_does_not_hold_readiness_back_and_a_restarting_one_does() {
    let mut h = Harness::with(service("restart_limit = 2\nrestart_window = \"60s\""));
    assert!(h.sup.is_ready());
    let (after, timer) = timers(&h.crash(3))[0];
    assert!(!h.sup.is_ready(), "a restart is due");
    h.advance(after);
    h.feed(Event::Timer(timer));
    assert!(h.sup.is_ready(), "restarted");
    for _ in 0..2 {
        if let Some(&(after, timer)) = timers(&h.crash(3)).first() {
            h.advance(after);
            h.feed(Event::Timer(timer));
        }
    }
    assert!(matches!(h.run(3), SlotRun::GaveUp));
    assert!(h.sup.is_ready(), "nothing more will happen to slot 3");
    assert_eq!(h.sup.serving(), (3, 4));
}

#[test]
fn an_upgrade_waits_for_reloads_and_removals() {
    let mut h = Harness::with(service("workers = 1"));
    assert!(!h.sup.is_busy());
    h.feed(hangup(Vec::new()));
    assert!(h.sup.is_busy(), "a removal is draining");
    let pid = h.pid(0);
    h.feed(Event::Exited {
        service: 0,
        slot: 0,
        pid,
        exit: Exit::Code(0),
    });
    assert!(!h.sup.is_busy(), "removed");
}

#[test]
fn a_service_taken_out_of_the_config_drains_stops_and_has_its_pins_removed() {
    let kept = service("name = \"web\"\nlisten = \"127.0.0.1:8080\"\nworkers = 1");
    let mut h = Harness::with(service(
        "workers = 2\ndrain_idle = \"1s\"\ndrain_timeout = \"10s\"",
    ));
    h.feed(Event::Added {
        spec: Box::new(kept.clone()),
        launch: (),
        adoption: Adoption::default(),
    });
    let (a, b) = (h.pid(0), h.pid(1));
    let actions = h.feed(hangup(vec![kept.clone()]));
    assert!(signals(&actions).is_empty(), "draining first: {actions:?}");
    assert!(
        table_ops(&actions).is_empty(),
        "its flows stay where they are"
    );
    assert_eq!(h.sup.find("dns"), None, "no longer controllable");
    assert_eq!(h.sup.services(), 1);
    assert!(h.sup.is_ready(), "the kept service serves");
    assert_eq!(h.sup.retiring(), vec![(0, 0, a), (0, 1, b)]);
    // Busy, then idle for `drain_idle`: stopped.
    let busy = |n| Event::Tick {
        activity: vec![
            (0, 0, Activity::Delivered(n)),
            (0, 1, Activity::Delivered(n)),
        ],
    };
    h.feed(busy(1));
    h.advance(Duration::from_millis(500));
    assert!(signals(&h.feed(busy(2))).is_empty());
    h.advance(Duration::from_secs(1));
    let actions = h.feed(busy(2));
    assert_eq!(
        signals(&actions),
        vec![(0, a, Signal::Term), (1, b, Signal::Term)]
    );
    let exit = |slot, pid| Event::Exited {
        service: 0,
        slot,
        pid,
        exit: Exit::Code(0),
    };
    let actions = h.feed(exit(0, a));
    assert_eq!(table_ops(&actions), vec![TableOp::Release(0)]);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::RemoveService { .. }))
    );
    let actions = h.feed(exit(1, b));
    assert_eq!(table_ops(&actions), vec![TableOp::Release(1)]);
    assert!(matches!(
        actions.last(),
        Some(Action::RemoveService { service: 0 })
    ));
    assert!(spawns(&actions).is_empty(), "nothing restarts");
    // Back in the file later: a new service of that name.
    let actions = h.feed(hangup(vec![kept, service("workers = 2")]));
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::AddService { spec, .. } if spec.name == "dns"))
    );
}

#[test]
fn a_removed_service_is_not_added_back_while_its_workers_drain() {
    let mut h = Harness::with(service("workers = 1"));
    h.feed(hangup(Vec::new()));
    let actions = h.feed(hangup(vec![service("workers = 1")]));
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::AddService { .. })),
        "{actions:?}"
    );
    assert_eq!(h.sup.retiring().len(), 1);
}
